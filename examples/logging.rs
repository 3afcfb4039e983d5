//! Structured logging from workers with `tracing`, collected by the watcher.
//!
//! Run with:
//!
//! ```text
//! cargo build --examples --bin cluster
//! target/debug/cluster --workers 2 target/debug/examples/logging                  # text
//! target/debug/cluster --workers 2 --log-format json target/debug/examples/logging
//! target/debug/examples/logging                                                   # standalone: stderr
//! ```
//!
//! Each worker logs a start-up line, then a tick every second inside a
//! span, and a line when it is asked to stop. Under `cluster` every record
//! arrives in the watcher's one stream, tagged with the worker's slot and
//! pid; a `println!` shows up there too (captured stdout).

use std::time::Duration;

use cluster::Cluster;
use tracing_subscriber::prelude::*;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    tracing_subscriber::registry()
        .with(Cluster::log_layer())
        .init();
    let slot = Cluster::slot().unwrap_or(0);
    tracing::info!(slot, worker = Cluster::is_worker(), "started");
    println!("plain stdout line from slot {slot}");

    let termination = Cluster::await_termination();
    tokio::pin!(termination);
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                n += 1;
                let span = tracing::info_span!("tick", n);
                let _enter = span.enter();
                if n.is_multiple_of(5) {
                    tracing::warn!(n, "every fifth tick is a warning");
                } else {
                    tracing::info!(n, "tick");
                }
            }
            _ = &mut termination => break,
        }
    }
    tracing::info!(ticks = n, "stopping");
}
