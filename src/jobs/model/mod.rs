//! The job model shared by every store, the library API and the CLI. The
//! derived key is computed in `key.rs`, the retry backoff in `backoff.rs`.

mod backoff;
mod key;
mod node;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Kind, Result};

use super::time::{rfc3339, rfc3339_opt};

pub(crate) use backoff::{random_unit, retry_delay};
pub(crate) use key::derived_key;
pub use node::{Node, NodePool, NodeState};
// Their paths from before the split (`model::canonical_json`, ...).
#[allow(unused_imports)]
pub(crate) use backoff::retry_delay_jittered;
#[allow(unused_imports)]
pub(crate) use key::canonical_json;

/// The name of the queue a [`NewJob`] goes to unless told otherwise.
pub const DEFAULT_QUEUE: &str = "default";

/// How many times a job is claimed at most unless told otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// A job's id: assigned by the store, never reused.
///
/// Prints and parses as the bare number; serializes as a JSON number.
///
/// ```no_run
/// let id: cluster::JobId = "42".parse()?;
/// assert_eq!(id.get(), 42);
/// assert_eq!(id.to_string(), "42");
/// # Ok::<(), cluster::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(i64);

impl JobId {
    /// The id with this number (ids are positive).
    pub fn new(id: i64) -> JobId {
        JobId(id)
    }

    /// The number.
    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for JobId {
    type Err = Error;

    /// # Errors
    ///
    /// Not a positive integer: [`Error::is_config`].
    fn from_str(s: &str) -> Result<JobId> {
        match s.trim().parse::<i64>() {
            Ok(n) if n > 0 => Ok(JobId(n)),
            _ => Err(Error::new(
                Kind::Config,
                format!("'{s}' is not a job id (a positive number)"),
            )),
        }
    }
}

impl From<JobId> for i64 {
    fn from(id: JobId) -> i64 {
        id.0
    }
}

/// Where a job is in its life: `queued → running → done | failed |
/// cancelled`; a failed attempt with attempts left goes back to `queued`.
///
/// Lowercase in the database, in JSON and on the command line.
///
/// ```no_run
/// use cluster::JobState;
/// let s: JobState = "running".parse()?;
/// assert_eq!(s, JobState::Running);
/// assert!(!s.is_finished());
/// # Ok::<(), cluster::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for its `run_at` and a free worker.
    Queued,
    /// Claimed by a watcher; a worker runs it.
    Running,
    /// Finished successfully.
    Done,
    /// Failed its last allowed attempt.
    Failed,
    /// Cancelled before or while it ran.
    Cancelled,
}

impl JobState {
    /// Every state, in life order.
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Done,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Done, failed or cancelled: the job will not run again unless retried.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = Error;

    /// # Errors
    ///
    /// Not one of the five names: [`Error::is_config`].
    fn from_str(s: &str) -> Result<JobState> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                Error::new(
                    Kind::Config,
                    format!("unknown job state '{s}' (queued, running, done, failed, cancelled)"),
                )
            })
    }
}

/// A job to submit: its arguments plus where and how it runs.
///
/// Built with [`NewJob::new`] and the setters; checked when submitted.
///
/// ```no_run
/// use std::time::Duration;
/// use cluster::NewJob;
///
/// let job = NewJob::new(serde_json::json!({"user": 7}))
///     .queue("mail")
///     .name("send_welcome")
///     .key("welcome-7")
///     .dedupe(true)
///     .max_attempts(5)
///     .delay(Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct NewJob {
    /// The queue (default `"default"`): pools take jobs from queues.
    pub queue: String,
    /// The handler name, for workers that run several kinds of job.
    pub name: Option<String>,
    /// The arguments, handed to the worker as they are.
    pub args: Value,
    /// The key for safe mode and deduplication; `None` derives one from
    /// (queue, name, args) (see [`NewJob::effective_key`]).
    pub key: Option<String>,
    /// How many times the job may be claimed (at least 1, default 3).
    pub max_attempts: u32,
    /// Not before this time; `None` is as soon as possible.
    pub run_at: Option<SystemTime>,
    /// Lower runs first within a queue (default 0).
    pub priority: i32,
    /// Skip the insert when a job with the same effective key is queued or
    /// running; the submit then returns that job's id.
    pub dedupe: bool,
}

impl NewJob {
    /// A job with these arguments and the defaults: queue `"default"`, no
    /// name, a derived key, 3 attempts, now, priority 0, no deduplication.
    pub fn new(args: Value) -> NewJob {
        NewJob {
            queue: DEFAULT_QUEUE.to_string(),
            name: None,
            args,
            key: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            run_at: None,
            priority: 0,
            dedupe: false,
        }
    }

    /// Sets the queue.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Sets the handler name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets an explicit key (safe mode and deduplication compare keys).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets how many times the job may be claimed (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Runs the job not before `t`.
    pub fn run_at(mut self, t: SystemTime) -> Self {
        self.run_at = Some(t);
        self
    }

    /// Runs the job not before `d` from now.
    pub fn delay(mut self, d: Duration) -> Self {
        self.run_at = Some(SystemTime::now() + d);
        self
    }

    /// Sets the priority: lower runs first within a queue.
    pub fn priority(mut self, p: i32) -> Self {
        self.priority = p;
        self
    }

    /// Turns deduplication on or off.
    pub fn dedupe(mut self, on: bool) -> Self {
        self.dedupe = on;
        self
    }

    /// The key that safe mode and deduplication compare: the explicit key,
    /// else 32 hex digits of SHA-256 over (queue, name, the arguments as
    /// canonical JSON with object keys sorted), stable across runs,
    /// platforms and versions of this crate.
    pub fn effective_key(&self) -> String {
        match &self.key {
            Some(k) => k.clone(),
            None => derived_key(&self.queue, self.name.as_deref(), &self.args),
        }
    }

    /// Checks what a store cannot fix later.
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::new(Kind::Config, m));
        if self.queue.is_empty() {
            return bad("a job's queue name cannot be empty".into());
        }
        if self.queue.chars().any(char::is_control) {
            return bad(format!("invalid queue name {:?}", self.queue));
        }
        if self.max_attempts == 0 {
            return bad("max_attempts must be at least 1".into());
        }
        if self.max_attempts > i32::MAX as u32 {
            return bad(format!("max_attempts {} is too large", self.max_attempts));
        }
        if self.key.as_deref() == Some("") {
            return bad("a job's key cannot be empty".into());
        }
        if self.name.as_deref() == Some("") {
            return bad("a job's name cannot be empty".into());
        }
        Ok(())
    }
}

/// The error of one failed attempt.
///
/// ```no_run
/// # fn f(job: cluster::Job) {
/// for e in &job.errors {
///     println!("attempt {}: {}", e.attempt, e.error);
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AttemptError {
    /// Which attempt (1 is the first claim).
    pub attempt: u32,
    /// What went wrong, as the worker or the watcher said it.
    pub error: String,
    /// When it was recorded.
    #[serde(with = "rfc3339")]
    pub at: SystemTime,
}

impl AttemptError {
    pub(crate) fn new(attempt: u32, error: String, at: SystemTime) -> Self {
        AttemptError { attempt, error, at }
    }
}

/// A job as stored: what `get`, `list` and claims return.
///
/// Timestamps serialize as RFC 3339 strings (UTC).
///
/// ```no_run
/// # async fn f(q: cluster::JobQueue, id: cluster::JobId) -> cluster::Result<()> {
/// if let Some(job) = q.get(id).await? {
///     println!("{} is {} after {} attempt(s)", job.id, job.state, job.attempt);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Job {
    /// The id.
    pub id: JobId,
    /// The queue.
    pub queue: String,
    /// The handler name.
    pub name: Option<String>,
    /// The arguments.
    pub args: Value,
    /// The effective key (explicit or derived).
    pub key: String,
    /// Whether the key was given by the submitter.
    pub key_explicit: bool,
    /// How many times it has been claimed.
    pub attempt: u32,
    /// How many claims it may have.
    pub max_attempts: u32,
    /// The state.
    pub state: JobState,
    /// Not before this time (the next retry's time after a failure).
    #[serde(with = "rfc3339")]
    pub run_at: SystemTime,
    /// Lower runs first.
    pub priority: i32,
    /// The pool that claimed it last.
    pub pool: Option<String>,
    /// The node (watcher) that claimed it last.
    pub node: Option<String>,
    /// The worker that ran it last, like `slot 2 pid 1234`.
    pub worker: Option<String>,
    /// What the handler returned, once done.
    pub result: Option<Value>,
    /// One entry per failed attempt, oldest first.
    pub errors: Vec<AttemptError>,
    /// When it was submitted.
    #[serde(with = "rfc3339")]
    pub created_at: SystemTime,
    /// When the last attempt started.
    #[serde(with = "rfc3339_opt")]
    pub started_at: Option<SystemTime>,
    /// When it reached done, failed or cancelled.
    #[serde(with = "rfc3339_opt")]
    pub finished_at: Option<SystemTime>,
    /// A cancel was asked while it ran; the watcher stops it.
    pub cancel_requested: bool,
}

impl Job {
    /// The error of the last failed attempt, if any.
    pub fn last_error(&self) -> Option<&AttemptError> {
        self.errors.last()
    }
}

/// What a submit did with one job.
///
/// ```no_run
/// # async fn f(q: cluster::JobQueue) -> cluster::Result<()> {
/// use cluster::{NewJob, Submitted};
/// match q.submit_all(vec![NewJob::new(serde_json::json!([1])).key("k").dedupe(true)]).await?[0] {
///     Submitted::New(id) => println!("{id}"),
///     Submitted::Existing(id) => println!("existing {id}"),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "submitted", content = "id")]
pub enum Submitted {
    /// Inserted with this id.
    New(JobId),
    /// Deduplicated: a job with the same key is queued or running.
    Existing(JobId),
}

impl Submitted {
    /// The new or existing job's id.
    pub fn id(self) -> JobId {
        match self {
            Submitted::New(id) | Submitted::Existing(id) => id,
        }
    }

    /// Whether a job was inserted.
    pub fn is_new(self) -> bool {
        matches!(self, Submitted::New(_))
    }
}

/// What a cancel did.
///
/// ```no_run
/// # async fn f(q: cluster::JobQueue, id: cluster::JobId) -> cluster::Result<()> {
/// use cluster::CancelOutcome;
/// match q.cancel(id).await? {
///     CancelOutcome::Cancelled => println!("cancelled"),
///     CancelOutcome::Requested => println!("cancel requested (running)"),
///     CancelOutcome::AlreadyFinished(state) => println!("already {state}"),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was queued and is now cancelled.
    Cancelled,
    /// It is running: the watcher running it stops it, and records it
    /// cancelled.
    Requested,
    /// It had already finished in this state; nothing changed.
    AlreadyFinished(JobState),
}

/// Counts of jobs per state.
///
/// ```no_run
/// # fn f(c: cluster::StateCounts) { println!("{} queued of {}", c.queued, c.total()); }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StateCounts {
    /// Queued.
    pub queued: u64,
    /// Running.
    pub running: u64,
    /// Done.
    pub done: u64,
    /// Failed.
    pub failed: u64,
    /// Cancelled.
    pub cancelled: u64,
}

impl StateCounts {
    /// All states together.
    pub fn total(&self) -> u64 {
        self.queued + self.running + self.done + self.failed + self.cancelled
    }

    /// The count of one state.
    pub fn get(&self, state: JobState) -> u64 {
        match state {
            JobState::Queued => self.queued,
            JobState::Running => self.running,
            JobState::Done => self.done,
            JobState::Failed => self.failed,
            JobState::Cancelled => self.cancelled,
        }
    }

    pub(crate) fn add(&mut self, state: JobState, n: u64) {
        let slot = match state {
            JobState::Queued => &mut self.queued,
            JobState::Running => &mut self.running,
            JobState::Done => &mut self.done,
            JobState::Failed => &mut self.failed,
            JobState::Cancelled => &mut self.cancelled,
        };
        *slot += n;
    }
}

/// Totals of the store and per queue (jobs not yet purged).
///
/// ```no_run
/// # async fn f(q: cluster::JobQueue) -> cluster::Result<()> {
/// let s = q.stats().await?;
/// println!("{} jobs, {} queued", s.total, s.queued);
/// for (queue, c) in &s.per_queue {
///     println!("{queue}: {} running", c.running);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobStats {
    /// Every job.
    pub total: u64,
    /// Queued.
    pub queued: u64,
    /// Running.
    pub running: u64,
    /// Done.
    pub done: u64,
    /// Failed.
    pub failed: u64,
    /// Cancelled.
    pub cancelled: u64,
    /// The same counts for each queue that has jobs.
    pub per_queue: BTreeMap<String, StateCounts>,
}

impl JobStats {
    pub(crate) fn from_rows(rows: impl IntoIterator<Item = (String, JobState, u64)>) -> Self {
        let mut s = JobStats::default();
        let mut all = StateCounts::default();
        for (queue, state, n) in rows {
            all.add(state, n);
            s.per_queue.entry(queue).or_default().add(state, n);
        }
        s.total = all.total();
        s.queued = all.queued;
        s.running = all.running;
        s.done = all.done;
        s.failed = all.failed;
        s.cancelled = all.cancelled;
        s
    }
}

/// Which jobs `list` returns: newest first, optionally of one state and
/// queue, at most `limit` (default 100).
///
/// ```no_run
/// use cluster::{JobState, ListFilter};
/// let failed_mail = ListFilter::new().state(JobState::Failed).queue("mail").limit(20);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListFilter {
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Only jobs of this queue.
    pub queue: Option<String>,
    /// At most this many.
    pub limit: usize,
}

impl Default for ListFilter {
    fn default() -> Self {
        ListFilter {
            state: None,
            queue: None,
            limit: 100,
        }
    }
}

impl ListFilter {
    /// Every state and queue, at most 100.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only jobs in `state`.
    pub fn state(mut self, state: JobState) -> Self {
        self.state = Some(state);
        self
    }

    /// Only jobs of `queue`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// At most `n` jobs.
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = n;
        self
    }
}

#[cfg(test)]
mod tests;
