//! The watcher's job settings (`--jobs` and the options around it).

use std::sync::Arc;
use std::time::Duration;

use super::pools::{Pool, PoolSpec};
use crate::jobs::NewJob;

/// How long a node may miss heartbeats before it is declared dead.
pub(crate) const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(30);

/// A job source given as a library closure: called once per pool every
/// interval with the pool's name and its slot count; returns the jobs to
/// queue (deduplicated by key against queued and running jobs).
pub type JobSourceFn = Arc<
    dyn Fn(
            String,
            usize,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<NewJob>> + Send>>
        + Send
        + Sync,
>;

/// A job source.
#[derive(Clone)]
pub(crate) enum Source {
    /// `--job-source CMD`: run through `sh -c` once per pool.
    Command(String),
    /// A closure from `ClusterWatcherBuilder::job_source`.
    Closure(JobSourceFn),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Command(c) => f.debug_tuple("Command").field(c).finish(),
            Source::Closure(_) => f.write_str("Closure"),
        }
    }
}

/// In-memory calls that may wait for a worker unless configured otherwise.
pub(crate) const DEFAULT_CALL_QUEUE_LIMIT: usize = 10_000;

/// Everything the job dispatcher is configured with.
#[derive(Debug, Clone)]
pub(crate) struct JobsConfig {
    /// The store URL (`jobs.db`, `sqlite://…`).
    pub url: String,
    /// `--pool` as given; `pools` is the plan made from it.
    pub specs: Vec<PoolSpec>,
    pub pools: Vec<Pool>,
    /// `--per-job`: one process per job instead of persistent workers.
    pub per_job: bool,
    /// `--job-concurrency`: jobs per persistent worker at once.
    pub concurrency: u32,
    /// `--job-prefetch`: jobs claimed per queue beyond what its pools can
    /// start now (they wait in the watcher, `running` in the store).
    pub prefetch: usize,
    /// Never two running jobs with the same key (default on).
    pub safe_mode: bool,
    /// Attempts of the jobs a source queues.
    pub max_attempts: u32,
    /// `--job-timeout`: an attempt that runs longer is stopped.
    pub timeout: Option<Duration>,
    /// The first retry delay (doubling, ±25 % jitter, capped at 10 min).
    pub retry_delay: Duration,
    pub sources: Vec<Source>,
    pub source_interval: Duration,
    /// How long finished jobs are kept.
    pub retention: Duration,
    /// What the pool plan warned about, logged at start.
    pub warnings: Vec<String>,
    /// `--job-queue-limit`: in-memory calls that may wait for a worker.
    pub call_queue_limit: usize,
    /// `--node`: this watcher's node name [default: host name plus a
    /// per-start id].
    pub node: Option<String>,
    /// `--node-timeout`: a node silent longer than this is dead and its
    /// running jobs run elsewhere (shared stores only).
    pub node_timeout: Duration,
    /// `--jobs-schema`: the PostgreSQL schema of the store.
    pub schema: Option<String>,
}

impl JobsConfig {
    pub(crate) fn new(url: String) -> JobsConfig {
        JobsConfig {
            url,
            specs: Vec::new(),
            pools: Vec::new(),
            per_job: false,
            concurrency: 1,
            prefetch: 0,
            safe_mode: true,
            max_attempts: crate::jobs::DEFAULT_MAX_ATTEMPTS,
            timeout: None,
            retry_delay: Duration::from_secs(1),
            sources: Vec::new(),
            source_interval: Duration::from_secs(5),
            retention: crate::jobs::store::DEFAULT_RETENTION,
            warnings: Vec::new(),
            call_queue_limit: DEFAULT_CALL_QUEUE_LIMIT,
            node: None,
            node_timeout: DEFAULT_NODE_TIMEOUT,
            schema: None,
        }
    }

    /// Whether a store was given (`--jobs`); without one the dispatcher
    /// runs the job server's in-memory calls only.
    pub(crate) fn has_store(&self) -> bool {
        !self.url.is_empty()
    }

    /// The workers the pools need in all.
    pub(crate) fn slots(&self) -> usize {
        self.pools.iter().map(|p| p.slots as usize).sum()
    }

    /// Every queue some pool takes, in pool order, each once.
    pub(crate) fn queues(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for q in self.pools.iter().flat_map(|p| p.queues.iter()) {
            if !out.contains(q) {
                out.push(q.clone());
            }
        }
        out
    }
}
