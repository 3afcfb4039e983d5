//! The embedded SQLite store (bundled rusqlite, WAL).
//!
//! # Threading: one actor thread per handle
//!
//! A rusqlite `Connection` is `Send` but not `Sync`, and every call blocks.
//! Each [`SqliteStore`] owns one thread (`cluster-jobs-db`) that owns the
//! connection; async callers send it boxed closures over a channel and get
//! the answer on a `tokio::sync::oneshot`, so no runtime thread ever waits
//! on SQLite (or on another process's write lock, up to `busy_timeout`).
//! Requests run one at a time in arrival order, which also makes every
//! transaction's read-check-write sequence race-free within the process;
//! between processes, write transactions start with `BEGIN IMMEDIATE`, so
//! they serialize on SQLite's write lock instead of failing on upgrade.
//! Dropping the handle ends the thread after the queued requests.
//!
//! # Layout
//!
//! * `mod.rs`: [`SqliteStore`], the handle and its actor thread, and
//!   `impl Store`.
//! * `db.rs`: the actor's state (`Db`) and what every statement shares.
//! * `schema.rs`: opening, pragmas, the schema (documented there) and its
//!   migrations.
//! * `lifecycle.rs`: submit, claim, assign, finish, recover.
//! * `admin.rs`: get, list, stats, retry, cancel, purge, queues, next due.
//! * `rows.rs`: decoding a row into a `Job`.
//! * `wake.rs`: the wake-up side channel and [`WakeListener`].

mod admin;
mod db;
mod lifecycle;
mod rows;
mod schema;
mod wake;

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::oneshot;

use crate::error::{Error, Kind, Result};
use crate::jobs::model::{CancelOutcome, Job, JobId, JobStats, ListFilter, NewJob, Submitted};
use crate::jobs::store::api::{
    ClaimRequest, FinishReport, Finished, RecoverReport, Store, StoreOptions,
};

use admin::known_queues;
use db::Db;

// Their paths from before the split; the watcher's job dispatcher (DESIGN
// 4a, being written) binds the listener.
#[allow(unused_imports)]
pub(crate) use schema::SCHEMA_VERSION;
#[allow(unused_imports)]
pub(crate) use wake::{wake_path_for, WakeListener};

type Request = Box<dyn FnOnce(&mut Db) + Send>;

/// A handle on a SQLite job store: a channel to its actor thread.
#[derive(Debug)]
pub(crate) struct SqliteStore {
    requests: mpsc::Sender<Request>,
    url: String,
    label: String,
}

impl SqliteStore {
    /// Opens (creating unless `options.create` is false) the database at
    /// `path`, or a private in-memory one for `None`; sets WAL,
    /// `synchronous = NORMAL` and the busy timeout, and migrates the schema.
    ///
    /// # Errors
    ///
    /// [`Error::is_store`], with one line naming the path: the directory
    /// does not exist, the file does not exist (`create` false), is not a
    /// SQLite database, is not writable, or has a newer schema version.
    pub(crate) async fn open(
        path: Option<&Path>,
        url: &str,
        options: StoreOptions,
    ) -> Result<SqliteStore> {
        let label = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| ":memory:".into());
        let (requests, inbox) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<()>>();
        let path = path.map(Path::to_path_buf);
        let thread_label = label.clone();
        std::thread::Builder::new()
            .name("cluster-jobs-db".into())
            .spawn(
                move || match Db::open(path.as_deref(), thread_label, options) {
                    Ok(mut db) => {
                        let _ = ready_tx.send(Ok(()));
                        while let Ok(request) = inbox.recv() {
                            request(&mut db);
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                },
            )
            .map_err(|e| {
                Error::with_io(
                    Kind::Store,
                    format!("cannot open the job store {label}: cannot start its thread"),
                    e,
                )
            })?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(SqliteStore {
                requests,
                url: url.to_string(),
                label,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::new(
                Kind::Store,
                format!("cannot open the job store {label}: its thread stopped"),
            )),
        }
    }

    /// Runs `f` on the actor thread.
    async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Db) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = oneshot::channel();
        let request: Request = Box::new(move |db: &mut Db| {
            let _ = tx.send(f(db));
        });
        let gone = || {
            Error::new(
                Kind::Store,
                format!("job store {}: its thread stopped", self.label),
            )
        };
        self.requests.send(request).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn url(&self) -> &str {
        &self.url
    }

    async fn submit(&self, jobs: Vec<NewJob>) -> Result<Vec<Submitted>> {
        self.call(move |db| db.submit(jobs)).await
    }

    async fn claim(&self, req: ClaimRequest) -> Result<Vec<Job>> {
        self.call(move |db| db.claim(req)).await
    }

    async fn finish(&self, done: Vec<Finished>) -> Result<FinishReport> {
        self.call(move |db| db.finish(done)).await
    }

    async fn assign(&self, id: JobId, attempt: u32, worker: String) -> Result<bool> {
        self.call(move |db| db.assign(id, attempt, worker)).await
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>> {
        self.call(move |db| db.get(id)).await
    }

    async fn list(&self, filter: ListFilter) -> Result<Vec<Job>> {
        self.call(move |db| db.list(filter)).await
    }

    async fn stats(&self) -> Result<JobStats> {
        self.call(|db| db.stats()).await
    }

    async fn retry(&self, id: JobId) -> Result<()> {
        self.call(move |db| db.retry(id)).await
    }

    async fn cancel(&self, id: JobId) -> Result<CancelOutcome> {
        self.call(move |db| db.cancel(id)).await
    }

    async fn cancel_requests(&self, node: &str) -> Result<Vec<(JobId, u32)>> {
        let node = node.to_string();
        self.call(move |db| db.cancel_requests(node)).await
    }

    async fn recover(&self, node: Option<&str>) -> Result<RecoverReport> {
        let node = node.map(str::to_string);
        self.call(move |db| db.recover(node)).await
    }

    async fn release(&self, jobs: Vec<(JobId, u32)>) -> Result<u64> {
        self.call(move |db| db.release(jobs)).await
    }

    async fn purge(&self, older_than: Duration) -> Result<u64> {
        self.call(move |db| db.purge(older_than)).await
    }

    async fn register_queues(&self, node: &str, queues: &[String]) -> Result<()> {
        let (node, queues) = (node.to_string(), queues.to_vec());
        self.call(move |db| db.register_queues(node, queues)).await
    }

    async fn known_queues(&self) -> Result<Vec<String>> {
        self.call(|db| known_queues(&db.conn).map_err(db.err("known queues")))
            .await
    }

    async fn next_due(&self, queues: &[String]) -> Result<Option<SystemTime>> {
        let queues = queues.to_vec();
        self.call(move |db| db.next_due(queues)).await
    }
}

#[cfg(test)]
impl SqliteStore {
    /// Runs SQL on the store's connection; for tests.
    #[cfg(test)]
    pub(crate) async fn with_conn<R: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R> {
        self.call(move |db| {
            let label = db.label.clone();
            f(&db.conn).map_err(db::sql_error(&label, "test statement"))
        })
        .await
    }
}

#[cfg(test)]
mod tests;
