//! Durable jobs (DESIGN 4a): the model, the store trait with its SQLite
//! implementation, and the producer API [`JobQueue`].
//!
//! A job is a row: id, queue, optional handler name, JSON args, key,
//! attempt / max attempts, state (`queued → running → done | failed |
//! cancelled`), run-at, priority, the pool, node and worker of its last
//! attempt, result, one error per failed attempt, timestamps.
//!
//! * **The watcher is the only process that claims and finishes jobs**;
//!   producers ([`JobQueue`], `cluster jobs`) submit, inspect, cancel and
//!   retry. Workers never open the store.
//! * **Claims** take due queued jobs from a pool's queues in the given
//!   order (within a queue by priority, run-at, id), in batches, in one
//!   transaction; each claim increments `attempt`.
//! * **Fencing**: outcomes apply only where `(id, attempt)` still match a
//!   running job, so a late report of an old attempt changes nothing.
//! * **Safe mode**: a claim never returns a job whose effective key is
//!   already running. The effective key is the explicit key, or a hash of
//!   (queue, name, canonical args).
//! * **Retries**: a failed attempt is re-queued after `1 s × 2^(attempt-1)`
//!   (capped at 10 min, ±25 % jitter) while attempts are left.
//! * **At-least-once**: a job runs twice only when the worker or watcher
//!   running it died before its outcome was recorded; `recover` at watcher
//!   start fails such attempts ("the watcher stopped while it ran").
//!
//! See `store/sqlite/` for the threading (`mod.rs`), the schema
//! (`schema.rs`) and the wake-up channel (`wake.rs`).

mod call_error;
mod client;
pub(crate) mod dispatch;
pub(crate) mod line;
mod model;
mod paths;
mod queue;
pub(crate) mod store;
mod time;

pub use call_error::CallError;
pub use client::{JobClient, RemoteJob};
pub use model::{
    AttemptError, CancelOutcome, Job, JobId, JobState, JobStats, ListFilter, NewJob, Node,
    NodePool, NodeState, StateCounts, Submitted,
};
pub(crate) use model::{DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE};
pub use queue::JobQueue;

// The old paths of the pid-file helpers, kept for the watcher's code (it
// writes the store URL file; `JobQueue::open_for_pid_file` reads it).
#[allow(unused_imports)]
pub(crate) use paths::{jobs_url_file_for_pid_file, jobs_url_from_pid_file};

/// RFC 3339 helpers for the `cluster` binary; not a stable API.
#[doc(hidden)]
pub mod cli_support {
    pub use super::time::{format_rfc3339, parse_rfc3339};
}

/// Internals exposed for `benches/jobs_store.rs`; not a stable API.
#[doc(hidden)]
pub mod bench {
    use std::sync::Arc;

    use serde_json::json;

    use super::store::{self, ClaimRequest, Finished, Outcome, Store, StoreOptions};
    use super::NewJob;

    /// A store handle for the benchmarks.
    pub struct BenchStore(Arc<dyn Store>);

    impl BenchStore {
        /// Opens (creates) the SQLite store at `url`.
        pub async fn open(url: &str) -> crate::Result<BenchStore> {
            Ok(BenchStore(store::open(url, StoreOptions::default()).await?))
        }

        /// Submits `n` small jobs to queue `q` in one transaction.
        pub async fn submit(&self, q: &str, n: usize) -> crate::Result<usize> {
            let jobs = (0..n)
                .map(|i| NewJob::new(json!({"n": i, "to": "someone@example.com"})).queue(q))
                .collect();
            Ok(self.0.submit(jobs).await?.len())
        }

        /// Claims up to `batch` jobs of queue `q`; returns their
        /// `(id, attempt)`.
        pub async fn claim(&self, q: &str, batch: usize) -> crate::Result<Vec<(i64, u32)>> {
            self.claim_as(q, batch, "bench", false).await
        }

        /// Claims up to `batch` jobs of queue `q` as `node`, in safe mode
        /// or not; returns their `(id, attempt)`.
        pub async fn claim_as(
            &self,
            q: &str,
            batch: usize,
            node: &str,
            safe_mode: bool,
        ) -> crate::Result<Vec<(i64, u32)>> {
            let jobs = self
                .0
                .claim(ClaimRequest {
                    pool: "bench".into(),
                    queues: vec![q.into()],
                    limit: batch,
                    node: node.into(),
                    safe_mode,
                })
                .await?;
            Ok(jobs.into_iter().map(|j| (j.id.get(), j.attempt)).collect())
        }

        /// Records a failed attempt for each; returns how many applied.
        pub async fn fail(&self, jobs: Vec<(i64, u32)>, error: &str) -> crate::Result<usize> {
            let done = jobs
                .into_iter()
                .map(|(id, attempt)| Finished {
                    id: super::JobId::new(id),
                    attempt,
                    worker: None,
                    outcome: Outcome::Failed(error.to_string()),
                })
                .collect();
            Ok(self.0.finish(done).await?.applied)
        }

        /// Gives claimed jobs back unstarted; returns how many applied.
        pub async fn release(&self, jobs: Vec<(i64, u32)>) -> crate::Result<u64> {
            let jobs = jobs
                .into_iter()
                .map(|(id, a)| (super::JobId::new(id), a))
                .collect();
            self.0.release(jobs).await
        }

        /// Deletes finished jobs older than `older_than`.
        pub async fn purge(&self, older_than: std::time::Duration) -> crate::Result<u64> {
            self.0.purge(older_than).await
        }

        /// Finishes claimed jobs as done, in one transaction.
        pub async fn finish(&self, jobs: Vec<(i64, u32)>) -> crate::Result<usize> {
            let done = jobs
                .into_iter()
                .map(|(id, attempt)| Finished {
                    id: super::JobId::new(id),
                    attempt,
                    worker: Some("slot 1 pid 1".into()),
                    outcome: Outcome::Done(Some(json!({"ok": true}))),
                })
                .collect();
            Ok(self.0.finish(done).await?.applied)
        }

        /// Claims up to `batch` jobs of queue `q` and finishes them all as
        /// done in one more transaction; returns how many.
        pub async fn claim_finish(&self, q: &str, batch: usize) -> crate::Result<usize> {
            let jobs = self.claim(q, batch).await?;
            self.finish(jobs).await
        }
    }
}
