//! The PostgreSQL store, for many watchers (nodes) on many hosts sharing
//! one job table.
//!
//! * **Connections**: a [`deadpool_postgres`] pool of at most
//!   [`conn::POOL_SIZE`] connections per handle plus one listener
//!   connection per watcher, whatever `--workers` says: the watcher is the
//!   only process that talks to the store.
//! * **Claims** are one `UPDATE … WHERE id IN (SELECT … ORDER BY
//!   priority, run_at, id LIMIT n FOR UPDATE SKIP LOCKED) RETURNING`
//!   (`claim.rs`); outcomes of a batch are at most two statements
//!   (`finish.rs`), fenced on `(id, attempt, state = 'running')`.
//! * **Safe mode** is the unique index `jobs_running_key`: a safe claim
//!   skips keys already running and, if a concurrent claim took the same
//!   key first, fails on the index and is run again.
//! * **Wake-ups**: every transaction that queues jobs sends one
//!   `pg_notify` per queue it touched (`notify.rs` listens); the
//!   dispatcher's jittered one-second poll covers lost notifications and
//!   writers that bypass this code.
//! * **Nodes** (`nodes.rs`): a row per watcher with a heartbeat; one node
//!   at a time (an advisory lock) declares the silent ones dead and
//!   queues their running jobs again.
//!
//! Layout: `conn.rs` (URL, pool, errors), `schema.rs` (tables and
//! migrations), `rows.rs` (row → `Job`), `claim.rs` (submit, claim),
//! `finish.rs` (finish, assign, release, recovery), `admin.rs` (reads and
//! operator commands), `nodes.rs`, `notify.rs`.

mod admin;
mod claim;
mod conn;
mod db;
mod finish;
mod nodes;
mod notify;
mod rows;
mod schema;

use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::error::Result;
use crate::jobs::model::{CancelOutcome, Job, JobId, JobStats, ListFilter, NewJob, Submitted};
use crate::jobs::store::api::{ClaimRequest, FinishReport, Finished, Nodes, RecoverReport, Store};

pub(crate) use db::PgStore;
use db::Retry;

#[async_trait]
impl Store for PgStore {
    fn url(&self) -> &str {
        &self.label
    }

    fn nodes(&self) -> Option<&dyn Nodes> {
        Some(self)
    }

    async fn submit(&self, jobs: Vec<NewJob>) -> Result<Vec<Submitted>> {
        for job in &jobs {
            job.validate()?;
        }
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        self.run("submit", Retry::Never, || self.submit_once(&jobs))
            .await
    }

    async fn claim(&self, req: ClaimRequest) -> Result<Vec<Job>> {
        if req.limit == 0 || req.queues.is_empty() {
            return Ok(Vec::new());
        }
        self.run("claim", Retry::Briefly, || self.claim_once(&req))
            .await
    }

    async fn finish(&self, done: Vec<Finished>) -> Result<FinishReport> {
        if done.is_empty() {
            return Ok(FinishReport::default());
        }
        self.run("record outcomes", Retry::Outcomes, || {
            self.finish_once(&done)
        })
        .await
    }

    async fn assign(&self, id: JobId, attempt: u32, worker: String) -> Result<bool> {
        self.run("assign", Retry::Briefly, || {
            self.assign_once(id, attempt, &worker)
        })
        .await
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>> {
        self.run("get", Retry::Briefly, || self.get_once(id)).await
    }

    async fn list(&self, filter: ListFilter) -> Result<Vec<Job>> {
        if filter.limit == 0 {
            return Ok(Vec::new());
        }
        self.run("list", Retry::Briefly, || self.list_once(&filter))
            .await
    }

    async fn stats(&self) -> Result<JobStats> {
        self.run("stats", Retry::Briefly, || self.stats_once())
            .await
    }

    async fn retry(&self, id: JobId) -> Result<()> {
        self.run("retry", Retry::Briefly, || self.retry_once(id))
            .await
    }

    async fn cancel(&self, id: JobId) -> Result<CancelOutcome> {
        self.run("cancel", Retry::Briefly, || self.cancel_once(id))
            .await
    }

    async fn cancel_requests(&self, node: &str) -> Result<Vec<(JobId, u32)>> {
        self.run("cancel requests", Retry::Briefly, || {
            self.cancel_requests_once(node)
        })
        .await
    }

    async fn recover(&self, node: Option<&str>) -> Result<RecoverReport> {
        self.run("recover", Retry::Briefly, || self.recover_once(node))
            .await
    }

    async fn release(&self, jobs: Vec<(JobId, u32)>) -> Result<u64> {
        if jobs.is_empty() {
            return Ok(0);
        }
        self.run("give back jobs", Retry::Outcomes, || {
            self.release_once(&jobs)
        })
        .await
    }

    async fn purge(&self, older_than: Duration) -> Result<u64> {
        self.run("purge", Retry::Briefly, || self.purge_once(older_than))
            .await
    }

    async fn register_queues(&self, node: &str, queues: &[String]) -> Result<()> {
        self.run("register queues", Retry::Briefly, || {
            self.register_queues_once(node, queues)
        })
        .await
    }

    async fn known_queues(&self) -> Result<Vec<String>> {
        self.run("known queues", Retry::Briefly, || async {
            let c = self.client().await?;
            Ok(self.known_queues_on(&c).await?)
        })
        .await
    }

    async fn next_due(&self, queues: &[String]) -> Result<Option<SystemTime>> {
        self.run("next due", Retry::Briefly, || self.next_due_once(queues))
            .await
    }
}
