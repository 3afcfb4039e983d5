//! The durable job store behind one object-safe async trait, [`Store`],
//! chosen at run time by URL ([`open`]).
//!
//! The watcher is the only process that claims jobs and records outcomes
//! (DESIGN 4a); producers (the `cluster jobs` CLI, [`crate::JobQueue`])
//! submit, inspect, cancel and retry. Every method is one transaction, so
//! a batch is all or nothing.
//!
//! # Guarantees every store gives
//!
//! * **Claims are exclusive**: a queued job is handed to one claim only;
//!   the claim moves it to `running` and increments `attempt` in the same
//!   transaction.
//! * **Fencing**: `finish`, `assign` and the recovery of a dead node apply
//!   only where `(id, attempt)` still match and the job is `running`, so a
//!   late report of an old attempt cannot overwrite a newer one.
//! * **Safe mode** (a claim's `safe_mode`): never two running jobs with the
//!   same effective key, counting the jobs already running in the store and
//!   the batch being claimed.
//! * **Deduplication** (`NewJob::dedupe`): no insert while a job with the
//!   same effective key is queued or running; the existing id is returned.
//! * At-least-once execution: a job runs again only when the worker, the
//!   watcher or the node running it died (or failed it) before its outcome
//!   was recorded.

pub(crate) mod sqlite;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde_json::Value;

use crate::error::{Error, Kind, Result};

use super::model::{CancelOutcome, Job, JobId, JobStats, ListFilter, NewJob, Submitted};

/// How long finished jobs are kept before `purge` removes them, unless
/// configured otherwise: 7 days.
#[allow(dead_code)] // The watcher's periodic purge (being written) uses it.
pub(crate) const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Settings of a store handle.
#[derive(Debug, Clone)]
pub(crate) struct StoreOptions {
    /// Retry backoff: `retry_base × 2^(attempt-1)` capped at `retry_cap`,
    /// ±25 % jitter.
    pub retry_base: Duration,
    /// The cap of the retry backoff.
    pub retry_cap: Duration,
    /// How long a statement waits for another process's write lock.
    pub busy_timeout: Duration,
    /// Create the database when it does not exist (the CLI's read-only
    /// commands say no, so that a typo does not create a file).
    pub create: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            retry_base: Duration::from_secs(1),
            retry_cap: Duration::from_secs(600),
            busy_timeout: Duration::from_secs(5),
            create: true,
        }
    }
}

/// One claim: up to `limit` queued, due jobs for `pool` on `node`.
#[derive(Debug, Clone)]
pub(crate) struct ClaimRequest {
    /// The pool that will run the jobs (recorded on each job).
    pub pool: String,
    /// The queues the pool takes, in priority order: all of the first
    /// queue that fits the limit, then the second, ...
    pub queues: Vec<String>,
    /// At most this many jobs.
    pub limit: usize,
    /// The claiming watcher's node name (recorded on each job).
    pub node: String,
    /// Never return a job whose effective key is running (in the store or
    /// earlier in this batch).
    pub safe_mode: bool,
}

/// How one attempt ended.
// The watcher's job dispatcher (DESIGN 4a, being written) is the caller.
#[allow(dead_code)]
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Success, with the handler's result.
    Done(Option<Value>),
    /// The handler reported an error.
    Failed(String),
    /// The watcher stopped it after a cancel request.
    Cancelled,
    /// The worker died or its channel broke while it ran.
    Lost(String),
}

/// The outcome of attempt `attempt` of job `id`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Finished {
    pub id: JobId,
    pub attempt: u32,
    /// Who ran it, like `slot 2 pid 1234`.
    pub worker: Option<String>,
    pub outcome: Outcome,
}

/// What a `finish` batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FinishReport {
    /// How many outcomes were recorded.
    pub applied: usize,
    /// The `(id, attempt)` of outcomes that were fenced off: the job is not
    /// running that attempt any more (retried, rescued, cancelled, purged).
    pub stale: Vec<(JobId, u32)>,
}

/// What `recover` did with the jobs left running.
// The watcher's job dispatcher (DESIGN 4a, being written) is the caller.
#[allow(dead_code)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RecoverReport {
    /// Queued again (attempts left).
    pub requeued: u64,
    /// Failed (that was their last attempt).
    pub failed: u64,
    /// Cancelled (a cancel had been requested).
    pub cancelled: u64,
}

/// The durable job store. Object-safe (`Arc<dyn Store>`); every method is
/// one transaction and returns the store's error as [`Error::is_store`].
// The watcher's job dispatcher (DESIGN 4a, being written) is the caller.
#[allow(dead_code)]
#[async_trait]
pub(crate) trait Store: Send + Sync + std::fmt::Debug {
    /// The URL (or path) it was opened with, for messages.
    fn url(&self) -> &str;

    /// Inserts the jobs in one transaction, in order; returns one entry per
    /// job. A job with `dedupe` whose effective key is queued or running
    /// (including earlier in the batch) is not inserted:
    /// `Submitted::Existing(that id)`. Any invalid job (`max_attempts` 0,
    /// empty queue) or a queue no registered pool takes fails the whole
    /// batch with [`Error::is_config`] and nothing is inserted.
    async fn submit(&self, jobs: Vec<NewJob>) -> Result<Vec<Submitted>>;

    /// Claims up to `limit` due queued jobs (see [`ClaimRequest`]); within
    /// a queue by priority, then run_at, then id. Each claimed job is
    /// `running`, with `attempt + 1`, `started_at` now, `pool` and `node`
    /// set, `worker` cleared, and is returned as it now is.
    async fn claim(&self, req: ClaimRequest) -> Result<Vec<Job>>;

    /// Records outcomes, fenced on `(id, attempt, running)`. `Failed` and
    /// `Lost` append the error with its attempt number, then re-queue at
    /// `now + retry_delay(attempt)` while `attempt < max_attempts`, else
    /// the job fails. A job whose cancel was requested becomes `cancelled`
    /// whatever the outcome other than `Done`.
    async fn finish(&self, done: Vec<Finished>) -> Result<FinishReport>;

    /// Records which worker runs attempt `attempt` of `id`; fenced like
    /// `finish`. Returns whether it applied.
    async fn assign(&self, id: JobId, attempt: u32, worker: String) -> Result<bool>;

    /// One job, `None` when there is no such id (or it was purged).
    async fn get(&self, id: JobId) -> Result<Option<Job>>;

    /// Jobs newest first (by id), filtered.
    async fn list(&self, filter: ListFilter) -> Result<Vec<Job>>;

    /// Counts per state, in total and per queue.
    async fn stats(&self) -> Result<JobStats>;

    /// A failed or cancelled job is queued again, due now. The attempt
    /// counter is kept (its errors stay numbered); when the attempts are
    /// used up, `max_attempts` becomes `attempt + 1`, so a retry is one
    /// more try. A queued, running or done job: [`Error::is_config`]; no
    /// such job: [`Error::is_not_found`].
    async fn retry(&self, id: JobId) -> Result<()>;

    /// Queued → cancelled at once; running → `cancel_requested` (the
    /// watcher running it stops it); finished → unchanged. No such job:
    /// [`Error::is_not_found`].
    async fn cancel(&self, id: JobId) -> Result<CancelOutcome>;

    /// The running jobs of `node` whose cancel was requested, as
    /// `(id, attempt)`; the dispatcher polls this.
    async fn cancel_requests(&self, node: &str) -> Result<Vec<(JobId, u32)>>;

    /// At watcher start: every job still `running` on `node` (every node
    /// with `None`) was left by a watcher that died. Each gets the error
    /// "the watcher stopped while it ran (attempt N)" and is queued again
    /// (due now) or failed per `max_attempts`; one with a cancel request
    /// becomes cancelled.
    async fn recover(&self, node: Option<&str>) -> Result<RecoverReport>;

    /// Deletes done, failed and cancelled jobs that finished more than
    /// `older_than` ago; returns how many.
    async fn purge(&self, older_than: Duration) -> Result<u64>;

    /// Records the queues `node`'s pools take, replacing what it recorded
    /// before (an empty list unregisters the node). While any node has
    /// registered queues, `submit` refuses other queues.
    async fn register_queues(&self, node: &str, queues: &[String]) -> Result<()>;

    /// Every registered queue, sorted, without duplicates.
    async fn known_queues(&self) -> Result<Vec<String>>;

    /// The earliest `run_at` of the queued jobs of these queues, `None`
    /// when they have none. The dispatcher sleeps until then (or a wake).
    async fn next_due(&self, queues: &[String]) -> Result<Option<SystemTime>>;
}

/// Where a store lives, parsed from a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreUrl {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A private in-memory SQLite database (tests).
    SqliteMemory,
    /// A PostgreSQL URL.
    Postgres(String),
}

impl StoreUrl {
    /// Accepts `jobs.db`, `./x/jobs.db`, `/abs/jobs.db`, `sqlite://path`,
    /// `sqlite:path`, `sqlite::memory:`, `postgres://…`, `postgresql://…`.
    ///
    /// # Errors
    ///
    /// An empty URL or an unknown scheme: [`Error::is_config`].
    pub(crate) fn parse(url: &str) -> Result<StoreUrl> {
        let url = url.trim();
        if url.is_empty() {
            return Err(Error::new(Kind::Config, "the job store URL is empty"));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(url.to_string()));
        }
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            return match path {
                ":memory:" => Ok(StoreUrl::SqliteMemory),
                "" => Err(Error::new(
                    Kind::Config,
                    format!("the job store URL '{url}' names no file"),
                )),
                p => Ok(StoreUrl::Sqlite(PathBuf::from(p))),
            };
        }
        if url == ":memory:" {
            return Ok(StoreUrl::SqliteMemory);
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return Err(Error::new(
                Kind::Config,
                format!(
                    "unknown job store URL scheme '{scheme}' in '{url}' (a SQLite file path, sqlite://PATH or postgres://...)"
                ),
            ));
        }
        Ok(StoreUrl::Sqlite(PathBuf::from(url)))
    }
}

/// Opens the store that `url` names.
///
/// # Errors
///
/// A bad URL: [`Error::is_config`]; a store that cannot be opened (see
/// [`sqlite::SqliteStore::open`]), or PostgreSQL (not built yet):
/// [`Error::is_store`].
pub(crate) async fn open(url: &str, options: StoreOptions) -> Result<Arc<dyn Store>> {
    match StoreUrl::parse(url)? {
        StoreUrl::Sqlite(path) => Ok(Arc::new(
            sqlite::SqliteStore::open(Some(&path), url, options).await?,
        )),
        StoreUrl::SqliteMemory => Ok(Arc::new(
            sqlite::SqliteStore::open(None, url, options).await?,
        )),
        StoreUrl::Postgres(_) => Err(Error::new(
            Kind::Store,
            format!("cannot open the job store {url}: the PostgreSQL store is not built yet (use a SQLite file)"),
        )),
    }
}

/// The wake socket of a SQLite store at `db`: `<db>.wake`.
pub(crate) fn wake_path_for(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(".wake");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let p = |s: &str| StoreUrl::parse(s).unwrap();
        assert_eq!(p("jobs.db"), StoreUrl::Sqlite("jobs.db".into()));
        assert_eq!(p("./x/jobs.db"), StoreUrl::Sqlite("./x/jobs.db".into()));
        assert_eq!(
            p("sqlite://x/jobs.db"),
            StoreUrl::Sqlite("x/jobs.db".into())
        );
        assert_eq!(
            p("sqlite:///abs/jobs.db"),
            StoreUrl::Sqlite("/abs/jobs.db".into())
        );
        assert_eq!(p("sqlite:jobs.db"), StoreUrl::Sqlite("jobs.db".into()));
        assert_eq!(p("sqlite::memory:"), StoreUrl::SqliteMemory);
        assert!(matches!(p("postgres://u@h/db"), StoreUrl::Postgres(_)));
        assert!(StoreUrl::parse("").unwrap_err().is_config());
        assert!(StoreUrl::parse("sqlite://").unwrap_err().is_config());
        assert!(StoreUrl::parse("mysql://h/db").unwrap_err().is_config());
    }

    #[tokio::test]
    async fn postgres_is_a_clear_store_error() {
        let e = open("postgres://localhost/jobs", StoreOptions::default())
            .await
            .unwrap_err();
        assert!(e.is_store(), "{e}");
        assert!(
            e.to_string().contains("PostgreSQL store is not built yet"),
            "{e}"
        );
    }

    #[test]
    fn wake_path_is_beside_the_database() {
        assert_eq!(
            wake_path_for(Path::new("/x/jobs.db")),
            Path::new("/x/jobs.db.wake")
        );
    }
}
