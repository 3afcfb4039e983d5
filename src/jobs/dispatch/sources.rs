//! Job sources (component-server's callback): every `--job-source-interval`
//! each source runs once per pool, with `CLUSTER_POOL` (the pool's name)
//! and `CLUSTER_LIMIT` (its slots) in its environment, and every line it
//! prints is a job for that pool's queue unless the line names another
//! (see `jobs/line.rs` for the line format). Jobs from a source are
//! deduplicated by key against queued and running jobs, so a source may
//! list the same pending rows on every pass and each still runs once.
//!
//! A listing can be stale: a source that lists a pending file while the
//! job for it finishes prints a line for work already done, and the key is
//! free again by the time the line arrives. So a line whose key ended (on
//! this watcher) after the pass started is dropped: each item still runs
//! once, however the pass and the job interleave ([`EndedKeys`]).
//!
//! A bad line is logged with its number and skipped (the others are
//! queued, in one transaction); a source that fails or runs past the
//! interval is logged and tried again at the next pass.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::config::{JobsConfig, Source};
use crate::ipc::env;
use crate::jobs::line::{job_from_line, LineDefaults};
use crate::jobs::store::Store;
use crate::jobs::NewJob;
use crate::watcher::process::{spawn_registered, unregister};

/// Most a source may print in one pass.
const MAX_OUTPUT: u64 = 16 * 1024 * 1024;

/// The keys of jobs that ended lately, and when: the dispatcher notes each
/// outcome (before the store frees the key), a source pass drops the lines
/// whose key ended after it started. Entries older than the longest pass
/// are forgotten, so the map holds at most the keys of that long.
#[derive(Debug)]
pub(crate) struct EndedKeys {
    keys: Mutex<HashMap<String, Instant>>,
    horizon: Duration,
}

impl EndedKeys {
    pub(crate) fn new(config: &JobsConfig) -> EndedKeys {
        EndedKeys {
            keys: Mutex::new(HashMap::new()),
            horizon: pass_timeout(config) + Duration::from_secs(1),
        }
    }

    /// Notes that the job with `key` ended now.
    pub(crate) fn note(&self, key: &str) {
        let Ok(mut keys) = self.keys.lock() else {
            return;
        };
        let now = Instant::now();
        if keys.len() >= 1024 && keys.len().is_power_of_two() {
            let horizon = self.horizon;
            keys.retain(|_, at| now.duration_since(*at) < horizon);
        }
        keys.insert(key.to_string(), now);
    }

    /// Whether the job with `key` ended at or after `since`.
    fn ended_since(&self, key: &str, since: Instant) -> bool {
        self.keys
            .lock()
            .map(|keys| keys.get(key).is_some_and(|at| *at >= since))
            .unwrap_or(false)
    }
}

/// How long one pass of a command source may run.
fn pass_timeout(config: &JobsConfig) -> Duration {
    config.source_interval.max(Duration::from_secs(1)) * 4
}

/// Starts the sources' loop; it ends when the handle is aborted.
pub(crate) fn start(
    config: &JobsConfig,
    store: Arc<dyn Store>,
    ended: Arc<EndedKeys>,
) -> Option<JoinHandle<()>> {
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
                    let started = Instant::now();
                    let mut jobs = run_once(source, &config, &pool.name, pool.slots as usize).await;
                    let listed = jobs.len();
                    jobs.retain(|j| !ended.ended_since(&j.effective_key(), started));
                    if jobs.len() < listed {
                        tracing::debug!(
                            "job source for pool {}: {} line(s) for jobs that ended during the pass dropped",
                            pool.name,
                            listed - jobs.len()
                        );
                    }
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
            let ran =
                tokio::time::timeout(pass_timeout(config), command_output(cmd, pool, limit)).await;
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

/// Forgets the child's pid when the source is done with it, however that ends.
struct Registered(u32);

impl Drop for Registered {
    fn drop(&mut self) {
        unregister(self.0);
    }
}

/// Runs `cmd` through `sh -c` and returns its stdout.
async fn command_output(cmd: &str, pool: &str, limit: usize) -> std::io::Result<String> {
    let mut command = tokio::process::Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(cmd)
        .env(env::POOL, pool)
        .env(env::LIMIT, limit.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Registered as the watcher's own child, so the orphan reaper of a
    // subreaper watcher neither kills it nor takes its exit status.
    let (mut child, pid) = spawn_registered(&mut command)?;
    let _registered = Registered(pid);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_key_counts_as_ended_only_for_passes_that_started_before_it_ended() {
        let ended = EndedKeys::new(&JobsConfig::new("jobs.db".into()));
        let before = Instant::now();
        tokio::time::advance(Duration::from_millis(10)).await;
        ended.note("avatar.png");
        tokio::time::advance(Duration::from_millis(10)).await;
        let after = Instant::now();
        assert!(ended.ended_since("avatar.png", before));
        assert!(!ended.ended_since("avatar.png", after));
        assert!(!ended.ended_since("other.png", before));
    }

    #[tokio::test(start_paused = true)]
    async fn old_keys_are_forgotten() {
        let ended = EndedKeys::new(&JobsConfig::new("jobs.db".into()));
        let start = Instant::now();
        for i in 0..1024 {
            ended.note(&format!("k{i}"));
        }
        tokio::time::advance(ended.horizon * 2).await;
        ended.note("new");
        let len = ended.keys.lock().unwrap().len();
        assert_eq!(len, 1, "the 1,024 keys older than the horizon were dropped");
        assert!(!ended.ended_since("k1", Instant::now()));
        assert!(ended.ended_since("new", start));
    }
}
