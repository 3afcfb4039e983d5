//! A persistent job worker: handlers that keep running between jobs.
//!
//! Run with
//!
//! ```text
//! cargo build --release --examples
//! target/release/cluster --workers 4 --jobs jobs.db target/release/examples/jobs
//! target/release/cluster jobs submit --jobs jobs.db --name echo --json '{"hello": 1}'
//! target/release/cluster jobs submit --jobs jobs.db --name sleep --json '{"ms": 1000}'
//! target/release/cluster jobs show --jobs jobs.db 1
//! ```
//!
//! Handlers:
//!
//! * `sleep` (`{"ms": N}`): waits N milliseconds, returns `{"slept_ms": N,
//!   "node": NODE}` (the watcher's node name, `JobContext::node`);
//! * `echo`: returns its arguments;
//! * `fail`: returns an error (`{"message": "..."}` sets its text), so the
//!   job is retried and, after its last attempt, failed with every error;
//! * `panic`: panics, which fails that attempt, not the worker.
//!
//! With `JOBS_TRACE=FILE`, every job appends `start` and `end` lines to
//! FILE (`start JOB ATTEMPT POOL QUEUE PID UNIX_MICROS`), to watch how
//! jobs spread over pools and workers.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cluster::{Cluster, JobContext, JobError};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing_subscriber::prelude::*;

#[derive(Deserialize)]
struct Sleep {
    ms: u64,
}

#[derive(Deserialize, Default)]
struct Fail {
    #[serde(default)]
    message: Option<String>,
}

fn trace(what: &str, ctx: &JobContext) {
    let Some(path) = std::env::var_os("JOBS_TRACE") else {
        return;
    };
    let us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    let id = ctx
        .id()
        .map(|i| i.to_string())
        .unwrap_or_else(|| "-".into());
    let line = format!(
        "{what} {id} {} {} {} {} {us}\n",
        ctx.attempt(),
        ctx.pool(),
        ctx.queue(),
        std::process::id()
    );
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), cluster::Error> {
    tracing_subscriber::registry()
        .with(Cluster::log_layer())
        .init();
    Cluster::jobs()
        .handle_with_context("sleep", |args: Sleep, ctx| async move {
            trace("start", &ctx);
            tokio::time::sleep(Duration::from_millis(args.ms)).await;
            trace("end", &ctx);
            Ok::<_, JobError>(json!({ "slept_ms": args.ms, "node": ctx.node() }))
        })
        .handle_with_context("echo", |args: Value, ctx| async move {
            trace("start", &ctx);
            trace("end", &ctx);
            Ok::<_, JobError>(args)
        })
        .handle_with_context("fail", |args: Fail, ctx| async move {
            trace("start", &ctx);
            let message = args
                .message
                .unwrap_or_else(|| format!("failed on purpose (attempt {})", ctx.attempt()));
            Err::<Value, _>(JobError::new(message))
        })
        .handle_with_context("panic", |_: Value, ctx| async move {
            trace("start", &ctx);
            if ctx.attempt() < 1000 {
                panic!("this handler panics on purpose");
            }
            Ok::<_, JobError>(Value::Null)
        })
        .run()
        .await?;
    tracing::info!("stopped");
    Ok(())
}
