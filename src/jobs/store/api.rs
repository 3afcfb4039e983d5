//! The store's interface: the [`Store`] trait and the types its methods
//! take and return, shared by every implementation and its callers.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde_json::Value;

use crate::error::Result;
use crate::jobs::model::{
    CancelOutcome, Job, JobId, JobStats, ListFilter, NewJob, Node, NodePool, Submitted,
};

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
    /// The PostgreSQL schema that holds the tables (`--jobs-schema`);
    /// `None` is the URL's `schema=` parameter, else `cluster`.
    pub schema: Option<String>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            retry_base: Duration::from_secs(1),
            retry_cap: Duration::from_secs(600),
            busy_timeout: Duration::from_secs(5),
            create: true,
            schema: None,
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

/// What a watcher registers about itself as a node of a shared store.
#[derive(Debug, Clone)]
pub(crate) struct NodeInfo {
    /// `--node`, or the host name plus a per-start id.
    pub name: String,
    /// Differs at every start, so a node that is replaced is not
    /// mistaken for the one that replaced it.
    pub instance: String,
    pub host: String,
    pub pid: u32,
    pub pools: Vec<NodePool>,
    /// Jobs it runs at once: slots × concurrency.
    pub capacity: u32,
    /// Every queue its pools take.
    pub queues: Vec<String>,
    /// `--node-timeout`: silent longer than this, it is dead.
    pub timeout: Duration,
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Heartbeat {
    /// The node is alive, as it was.
    Alive,
    /// The node had been declared dead (it was silent too long) and its
    /// running jobs were queued again; it is alive again from now.
    WasDead,
    /// Another watcher took this node's name.
    Replaced,
}

/// What one rescue round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RescueReport {
    /// The nodes declared dead in this round.
    pub dead: Vec<String>,
    /// What happened to the jobs they (or nodes gone before) left running.
    pub jobs: RecoverReport,
}

/// The nodes of a store that many watchers share (PostgreSQL): joining,
/// heartbeats, the rescue of dead nodes' jobs, wake-ups.
#[async_trait]
pub(crate) trait Nodes: Send + Sync {
    /// Registers `node` as alive. A node row of the same name whose
    /// heartbeat is fresh is refused ([`Error::is_config`]) unless it
    /// is a dead process of this host (then it is taken over); the jobs a
    /// previous watcher of this name left running are queued again.
    async fn join(&self, node: &NodeInfo) -> Result<RecoverReport>;

    /// Records that `node` is alive. When it had been declared dead, the
    /// jobs still running on it are queued again (or failed) first: they
    /// are void, and the dispatcher drops what it holds of them.
    async fn heartbeat(&self, node: &NodeInfo) -> Result<Heartbeat>;

    /// If no other node is doing it now (an advisory lock): declares dead
    /// the alive nodes silent past their timeout, queues again (or fails,
    /// "node NAME lost") the jobs left running on nodes that are not
    /// alive, and forgets nodes gone or dead for a day. `None` when
    /// another node holds the lock.
    async fn rescue(&self) -> Result<Option<RescueReport>>;

    /// Marks `node` gone (a clean stop) and unregisters its queues.
    async fn leave(&self, node: &NodeInfo) -> Result<()>;

    /// Every node the store knows, by name.
    async fn list(&self) -> Result<Vec<Node>>;

    /// Runs until dropped: listens for the store's job notifications on
    /// one connection of its own, calling `wake` for each (and after every
    /// reconnect, since notifications may have been missed meanwhile).
    async fn listen(&self, wake: Box<dyn Fn() + Send + Sync>);
}

/// The durable job store. Object-safe (`Arc<dyn Store>`); every method is
/// one transaction and returns the store's error as
/// [`Error::is_store`](crate::Error::is_store).
// The watcher's job dispatcher (DESIGN 4a, being written) is the caller.
#[allow(dead_code)]
#[async_trait]
pub(crate) trait Store: Send + Sync + std::fmt::Debug {
    /// The URL (or path) it was opened with, for messages.
    fn url(&self) -> &str;

    /// The node side of a store that many watchers share (PostgreSQL);
    /// `None` for one that has one watcher (SQLite).
    fn nodes(&self) -> Option<&dyn Nodes> {
        None
    }

    /// Inserts the jobs in one transaction, in order; returns one entry per
    /// job. A job with `dedupe` whose effective key is queued or running
    /// (including earlier in the batch) is not inserted:
    /// `Submitted::Existing(that id)`. Any invalid job (`max_attempts` 0,
    /// empty queue) or a queue no registered pool takes fails the whole
    /// batch with [`Error::is_config`](crate::Error::is_config) and nothing
    /// is inserted.
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
    /// more try. A queued, running or done job:
    /// [`Error::is_config`](crate::Error::is_config); no such job:
    /// [`Error::is_not_found`](crate::Error::is_not_found).
    async fn retry(&self, id: JobId) -> Result<()>;

    /// Queued → cancelled at once; running → `cancel_requested` (the
    /// watcher running it stops it); finished → unchanged. No such job:
    /// [`Error::is_not_found`](crate::Error::is_not_found).
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

    /// Gives back claimed jobs that never started (a clean stop): each
    /// `(id, attempt)` still running goes back to `queued`, due now, with
    /// its attempt uncounted (`attempt - 1`) and no error. Fenced like
    /// `finish`; returns how many applied. A job whose cancel was
    /// requested becomes cancelled instead.
    async fn release(&self, jobs: Vec<(JobId, u32)>) -> Result<u64>;

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
