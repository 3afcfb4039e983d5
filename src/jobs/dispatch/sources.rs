//! Job sources (component-server's callback): every `--job-source-interval`
//! each source runs once per pool, with `CLUSTER_POOL` (the pool's name)
//! and `CLUSTER_LIMIT` (its slots) in its environment, and every line it
//! prints is a job for that pool's queue unless the line names another
//! (see `jobs/line.rs` for the line format). Jobs from a source are
//! deduplicated by key against queued and running jobs, so a source may
//! list the same pending rows on every pass and each still runs once.
//!
//! A bad line is logged with its number and skipped (the others are
//! queued, in one transaction); a source that fails or runs past the
//! interval is logged and tried again at the next pass.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;

use super::config::{JobsConfig, Source};
use crate::ipc::env;
use crate::jobs::line::{job_from_line, LineDefaults};
use crate::jobs::store::Store;
use crate::jobs::NewJob;

/// Most a source may print in one pass.
const MAX_OUTPUT: u64 = 16 * 1024 * 1024;

/// Starts the sources' loop; it ends when the handle is aborted.
pub(crate) fn start(config: &JobsConfig, store: Arc<dyn Store>) -> Option<JoinHandle<()>> {
    if config.sources.is_empty() {
        return None;
    }
    let config = config.clone();
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(config.source_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for pool in &config.pools {
                for source in &config.sources {
                    let jobs = run_once(source, &config, &pool.name, pool.slots as usize).await;
                    if jobs.is_empty() {
                        continue;
                    }
                    let n = jobs.len();
                    match store.submit(jobs).await {
                        Ok(submitted) => {
                            let new = submitted.iter().filter(|s| s.is_new()).count();
                            tracing::debug!(
                                "job source for pool {}: {n} job(s) listed, {new} new",
                                pool.name
                            );
                        }
                        Err(e) => {
                            tracing::error!("job source for pool {}: {e}", pool.name)
                        }
                    }
                }
            }
        }
    }))
}

/// One pass of `source` for `pool`: the jobs it lists.
async fn run_once(source: &Source, config: &JobsConfig, pool: &str, limit: usize) -> Vec<NewJob> {
    let defaults = LineDefaults {
        queue: Some(pool.to_string()),
        max_attempts: Some(config.max_attempts),
        dedupe: true,
        ..LineDefaults::default()
    };
    match source {
        Source::Closure(f) => f(pool.to_string(), limit)
            .await
            .into_iter()
            .map(|j| j.dedupe(true))
            .collect(),
        Source::Command(cmd) => {
            let ran = tokio::time::timeout(
                config.source_interval.max(Duration::from_secs(1)) * 4,
                command_output(cmd, pool, limit),
            )
            .await;
            let text = match ran {
                Ok(Ok(text)) => text,
                Ok(Err(e)) => {
                    tracing::error!("job source {cmd:?} for pool {pool}: {e}");
                    return Vec::new();
                }
                Err(_) => {
                    tracing::error!("job source {cmd:?} for pool {pool} did not finish in time");
                    return Vec::new();
                }
            };
            let mut jobs = Vec::new();
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                match job_from_line(line, &defaults) {
                    Ok(job) => jobs.push(job),
                    Err(why) => tracing::error!(
                        "job source {cmd:?} for pool {pool}, line {}: {why}; skipped",
                        i + 1
                    ),
                }
            }
            jobs
        }
    }
}

/// Runs `cmd` through `sh -c` and returns its stdout.
async fn command_output(cmd: &str, pool: &str, limit: usize) -> std::io::Result<String> {
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .env(env::POOL, pool)
        .env(env::LIMIT, limit.to_string())
        .env_remove(crate::watcher::upgrade::ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        stdout.take(MAX_OUTPUT).read_to_end(&mut out).await?;
    }
    let mut err = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        stderr.take(64 * 1024).read_to_end(&mut err).await?;
    }
    let status = child.wait().await?;
    if !status.success() {
        let err = String::from_utf8_lossy(&err);
        return Err(std::io::Error::other(format!(
            "{status}: {}",
            err.trim().lines().last().unwrap_or("")
        )));
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}
