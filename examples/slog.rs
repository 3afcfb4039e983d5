//! Logging from workers with `slog`, collected by the watcher.
//!
//! Run with:
//!
//! ```text
//! cargo build --features slog --example slog --bin cluster
//! target/debug/cluster --workers 2 target/debug/examples/slog
//! ```

use cluster::Cluster;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let log = slog::Logger::root(Cluster::slog_drain(), slog::o!("app" => "slog-demo"));
    slog::info!(log, "started"; "slot" => Cluster::slot().unwrap_or(0));
    Cluster::await_termination().await;
    slog::warn!(log, "stopping"; "reason" => "asked to");
}
