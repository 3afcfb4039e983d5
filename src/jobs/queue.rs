//! [`JobQueue`]: the library's producer API on a job store.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Kind, Result};

use super::model::{CancelOutcome, Job, JobId, JobStats, ListFilter, NewJob, Submitted};
use super::store::{self, Store, StoreOptions};

/// A handle on a durable job store, for programs that submit and inspect
/// jobs. The watcher's dispatcher claims them and records their outcomes.
///
/// Cheap to clone; every clone shares one connection (on its own thread,
/// so no call blocks the async runtime). Calls need a tokio runtime;
/// [`wait`](JobQueue::wait) also needs its timer.
///
/// URLs: a SQLite file path (`jobs.db`, `./x/jobs.db`), `sqlite://PATH`,
/// `sqlite:PATH`, or `sqlite::memory:` (private to this handle, for
/// tests); or PostgreSQL, `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`
/// (libpq's URL parameters, plus `schema=NAME` for the schema of the job
/// tables, default `cluster`). A PostgreSQL handle holds at most four
/// connections.
///
/// ```no_run
/// use std::time::Duration;
/// use cluster::{JobQueue, JobState, NewJob};
///
/// # async fn f() -> cluster::Result<()> {
/// let queue = JobQueue::open("jobs.db").await?;
/// let id = queue
///     .submit(NewJob::new(serde_json::json!({"to": "a@example.com"})).queue("mail"))
///     .await?;
/// let job = queue.wait(id, Duration::from_secs(30)).await?;
/// assert_eq!(job.state, JobState::Done);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct JobQueue {
    store: Arc<dyn Store>,
}

impl fmt::Debug for JobQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobQueue")
            .field("url", &self.store.url())
            .finish()
    }
}

impl JobQueue {
    /// Opens the store at `url`, creating a SQLite file (and its schema)
    /// when it does not exist yet.
    ///
    /// # Errors
    ///
    /// A malformed URL: [`Error::is_config`]. The store cannot be opened
    /// (its directory does not exist, the file is not a SQLite database or
    /// not writable, its schema is newer than this build): [`Error::is_store`].
    pub async fn open(url: &str) -> Result<JobQueue> {
        Self::open_with(url, StoreOptions::default()).await
    }

    /// Like [`open`](JobQueue::open), but a SQLite file that does not exist
    /// is an error instead of being created (for tools that only inspect).
    ///
    /// # Errors
    ///
    /// As `open`; a missing file is [`Error::is_store`].
    ///
    /// ```no_run
    /// # async fn f() -> cluster::Result<()> {
    /// let queue = cluster::JobQueue::open_existing("/var/lib/app/jobs.db").await?;
    /// println!("{} queued", queue.stats().await?.queued);
    /// # Ok(()) }
    /// ```
    pub async fn open_existing(url: &str) -> Result<JobQueue> {
        let options = StoreOptions {
            create: false,
            ..StoreOptions::default()
        };
        Self::open_with(url, options).await
    }

    /// Opens the store of the watcher whose pid file is `pid_file`: the
    /// watcher writes its store URL beside it (`x.pid` → `x.jobs`). The
    /// store must exist.
    ///
    /// # Errors
    ///
    /// No readable URL file: [`Error::is_config`]; then as
    /// [`open_existing`](JobQueue::open_existing).
    pub async fn open_for_pid_file(pid_file: &std::path::Path) -> Result<JobQueue> {
        let url = super::paths::jobs_url_from_pid_file(pid_file)?;
        Self::open_existing(&url).await
    }

    pub(crate) async fn open_with(url: &str, options: StoreOptions) -> Result<JobQueue> {
        Ok(JobQueue {
            store: store::open(url, options).await?,
        })
    }

    /// The URL it was opened with.
    pub fn url(&self) -> &str {
        self.store.url()
    }

    /// Submits one job; returns its id (with [`NewJob::dedupe`], the id of
    /// the queued or running job with the same key, when there is one).
    ///
    /// # Errors
    ///
    /// An invalid job (`max_attempts` 0, an empty queue name) or a queue
    /// that no pool takes while a watcher has registered its queues:
    /// [`Error::is_config`]. The store failed: [`Error::is_store`].
    pub async fn submit(&self, job: NewJob) -> Result<JobId> {
        let mut out = self.store.submit(vec![job]).await?;
        out.pop()
            .map(Submitted::id)
            .ok_or_else(|| Error::new(Kind::Store, "the job store returned no id"))
    }

    /// Submits many jobs in one transaction (all or none); returns their
    /// ids in order.
    ///
    /// # Errors
    ///
    /// As [`submit`](JobQueue::submit); one invalid job fails the batch.
    ///
    /// ```no_run
    /// # async fn f(q: cluster::JobQueue) -> cluster::Result<()> {
    /// use cluster::NewJob;
    /// let jobs = (0..1000).map(|i| NewJob::new(serde_json::json!([i]))).collect();
    /// let ids = q.submit_many(jobs).await?;
    /// assert_eq!(ids.len(), 1000);
    /// # Ok(()) }
    /// ```
    pub async fn submit_many(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>> {
        Ok(self
            .store
            .submit(jobs)
            .await?
            .into_iter()
            .map(Submitted::id)
            .collect())
    }

    /// Like [`submit_many`](JobQueue::submit_many), telling which jobs were
    /// inserted and which were deduplicated against an existing one.
    ///
    /// # Errors
    ///
    /// As [`submit`](JobQueue::submit).
    pub async fn submit_all(&self, jobs: Vec<NewJob>) -> Result<Vec<Submitted>> {
        self.store.submit(jobs).await
    }

    /// The job, or `None` when there is no such id (or it was purged).
    ///
    /// # Errors
    ///
    /// The store failed or the row is corrupt: [`Error::is_store`].
    pub async fn get(&self, id: JobId) -> Result<Option<Job>> {
        self.store.get(id).await
    }

    /// Jobs, newest first, as the filter says.
    ///
    /// # Errors
    ///
    /// The store failed or a row is corrupt: [`Error::is_store`].
    ///
    /// ```no_run
    /// # async fn f(q: cluster::JobQueue) -> cluster::Result<()> {
    /// use cluster::{JobState, ListFilter};
    /// for job in q.list(ListFilter::new().state(JobState::Failed)).await? {
    ///     println!("{} {:?}", job.id, job.last_error().map(|e| &e.error));
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list(&self, filter: ListFilter) -> Result<Vec<Job>> {
        self.store.list(filter).await
    }

    /// Counts per state, in total and per queue.
    ///
    /// # Errors
    ///
    /// The store failed: [`Error::is_store`].
    pub async fn stats(&self) -> Result<JobStats> {
        self.store.stats().await
    }

    /// Cancels a job: a queued one at once; a running one is stopped by the
    /// watcher running it ([`CancelOutcome::Requested`]); a finished one is
    /// left as it is.
    ///
    /// # Errors
    ///
    /// No such job: [`Error::is_not_found`]. The store failed:
    /// [`Error::is_store`].
    pub async fn cancel(&self, id: JobId) -> Result<CancelOutcome> {
        self.store.cancel(id).await
    }

    /// Queues a failed or cancelled job again, due now. Its attempt count
    /// and errors are kept; if it had used all its attempts it gets one
    /// more.
    ///
    /// # Errors
    ///
    /// No such job: [`Error::is_not_found`]. The job is queued, running or
    /// done: [`Error::is_config`]. The store failed: [`Error::is_store`].
    pub async fn retry(&self, id: JobId) -> Result<()> {
        self.store.retry(id).await
    }

    /// The queues that running watchers' pools take (empty when none
    /// registered any: then every queue is accepted).
    ///
    /// # Errors
    ///
    /// The store failed: [`Error::is_store`].
    pub async fn known_queues(&self) -> Result<Vec<String>> {
        self.store.known_queues().await
    }

    /// The nodes (watchers) of a shared store, by name: alive, dead or
    /// gone, with their last heartbeat and running jobs.
    ///
    /// # Errors
    ///
    /// A store that has no nodes (SQLite: one watcher):
    /// [`Error::is_config`]. The store failed: [`Error::is_store`].
    pub async fn nodes(&self) -> Result<Vec<super::model::Node>> {
        match self.store.nodes() {
            Some(nodes) => nodes.list().await,
            None => Err(Error::new(
                Kind::Config,
                format!(
                    "the job store {} has no nodes: only a PostgreSQL store is shared by several watchers",
                    self.store.url()
                ),
            )),
        }
    }

    /// Waits until the job is done, failed or cancelled, and returns it.
    /// Polls the store, starting at 1 ms and backing off to 100 ms.
    ///
    /// # Errors
    ///
    /// Still not finished after `timeout`: [`Error::is_timeout`]. No such
    /// job: [`Error::is_not_found`]. The store failed: [`Error::is_store`].
    ///
    /// ```no_run
    /// # async fn f(q: cluster::JobQueue, id: cluster::JobId) -> cluster::Result<()> {
    /// match q.wait(id, std::time::Duration::from_secs(5)).await {
    ///     Ok(job) => println!("{}: {:?}", job.state, job.result),
    ///     Err(e) if e.is_timeout() => println!("still running"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn wait(&self, id: JobId, timeout: Duration) -> Result<Job> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            let job = self
                .store
                .get(id)
                .await?
                .ok_or_else(|| Error::new(Kind::NotFound, format!("no job {id}")))?;
            if job.state.is_finished() {
                return Ok(job);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::new(
                    Kind::Timeout,
                    format!(
                        "job {id} is still {} after {:.3}s",
                        job.state,
                        timeout.as_secs_f64()
                    ),
                ));
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::jobs::model::JobState;
    use crate::jobs::store::{ClaimRequest, Finished, Outcome};

    async fn memory() -> JobQueue {
        JobQueue::open("sqlite::memory:").await.unwrap()
    }

    #[tokio::test]
    async fn submit_variants() {
        let q = memory().await;
        let a = q.submit(NewJob::new(json!(1))).await.unwrap();
        let many = q
            .submit_many(vec![NewJob::new(json!(2)), NewJob::new(json!(3))])
            .await
            .unwrap();
        assert_eq!(many.len(), 2);
        assert!(many[0] > a && many[1] > many[0]);
        let k = || NewJob::new(json!(4)).key("k").dedupe(true);
        let first = q.submit(k()).await.unwrap();
        assert_eq!(
            q.submit(k()).await.unwrap(),
            first,
            "deduplicated to the same id"
        );
        assert_eq!(
            q.submit_all(vec![k()]).await.unwrap(),
            [Submitted::Existing(first)]
        );
        assert_eq!(q.stats().await.unwrap().queued, 4);
        let e = q
            .submit(NewJob::new(json!(1)).max_attempts(0))
            .await
            .unwrap_err();
        assert!(e.is_config(), "{e}");
        assert_eq!(q.url(), "sqlite::memory:");
    }

    #[tokio::test]
    async fn wait_returns_the_finished_job() {
        let q = memory().await;
        let id = q.submit(NewJob::new(json!(1))).await.unwrap();
        let store = q.store.clone();
        let worker = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let job = store
                .claim(ClaimRequest {
                    pool: "p".into(),
                    queues: vec!["default".into()],
                    limit: 1,
                    node: "n".into(),
                    safe_mode: true,
                })
                .await
                .unwrap()
                .remove(0);
            store
                .finish(vec![Finished {
                    id: job.id,
                    attempt: job.attempt,
                    worker: None,
                    outcome: Outcome::Done(Some(json!("ok"))),
                }])
                .await
                .unwrap();
        });
        let job = q.wait(id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(job.state, JobState::Done);
        assert_eq!(job.result, Some(json!("ok")));
        worker.await.unwrap();
    }

    #[tokio::test]
    async fn wait_times_out_and_knows_missing_jobs() {
        let q = memory().await;
        let id = q.submit(NewJob::new(json!(1))).await.unwrap();
        let e = q.wait(id, Duration::from_millis(30)).await.unwrap_err();
        assert!(e.is_timeout(), "{e}");
        assert!(e.to_string().contains("still queued"), "{e}");
        let e = q
            .wait(JobId::new(77), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e}");
        // Cancel finishes a queued job: wait returns it.
        assert_eq!(q.cancel(id).await.unwrap(), CancelOutcome::Cancelled);
        let j = q.wait(id, Duration::from_secs(1)).await.unwrap();
        assert_eq!(j.state, JobState::Cancelled);
        q.retry(id).await.unwrap();
        assert_eq!(q.get(id).await.unwrap().unwrap().state, JobState::Queued);
    }

    #[tokio::test]
    async fn open_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.db");
        let e = JobQueue::open_existing(missing.to_str().unwrap())
            .await
            .unwrap_err();
        assert!(e.is_store(), "{e}");
        assert!(!missing.exists());
        let q = JobQueue::open(missing.to_str().unwrap()).await.unwrap();
        assert!(q.list(ListFilter::new()).await.unwrap().is_empty());
        assert!(JobQueue::open("").await.unwrap_err().is_config());
        let pid = dir.path().join("w.pid");
        assert!(JobQueue::open_for_pid_file(&pid)
            .await
            .unwrap_err()
            .is_config());
        std::fs::write(dir.path().join("w.jobs"), "missing.db\n").unwrap();
        let q = JobQueue::open_for_pid_file(&pid).await.unwrap();
        assert!(q.url().ends_with("missing.db"));
    }
}
