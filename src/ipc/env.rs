//! Environment variables through which the watcher describes a worker.
//! Both sides read these names from here: the watcher sets them for every
//! worker it spawns, the worker reads them on its first call into `Cluster`.

/// Number of the inherited IPC descriptor.
pub(crate) const IPC_FD: &str = "CLUSTER_IPC_FD";
/// Pid of the watcher (the creator of the socketpair).
pub(crate) const WATCHER_PID: &str = "CLUSTER_WATCHER_PID";
/// Context id of this spawn.
pub(crate) const CONTEXT_ID: &str = "CLUSTER_CONTEXT_ID";
/// Slot (1..N).
pub(crate) const SLOT: &str = "CLUSTER_SLOT";
/// The worker's name (`--name`, `--names`), when it has one.
pub(crate) const NAME: &str = "CLUSTER_NAME";
/// Milliseconds a worker has to exit once its watcher is gone.
pub(crate) const SHUTDOWN_TIMEOUT_MS: &str = "CLUSTER_SHUTDOWN_TIMEOUT_MS";
/// The watcher's log filter (`EnvFilter` directives), applied by the
/// worker's log layer before records are queued.
pub(crate) const LOG_FILTER: &str = "CLUSTER_LOG_FILTER";
/// Requests (connections accepted through the crate's listener) after
/// which the worker asks to be replaced (`--max-requests`, jitter included).
pub(crate) const MAX_REQUESTS: &str = "CLUSTER_RECYCLE_AFTER";
/// The pool a worker belongs to (job pools).
pub(crate) const POOL: &str = "CLUSTER_POOL";
/// How many jobs a worker runs at once (`--job-concurrency`).
pub(crate) const JOB_CONCURRENCY: &str = "CLUSTER_JOB_CONCURRENCY";
/// A per-job process's job id, attempt, queue and node.
pub(crate) const JOB_ID: &str = "CLUSTER_JOB_ID";
pub(crate) const JOB_ATTEMPT: &str = "CLUSTER_JOB_ATTEMPT";
pub(crate) const QUEUE: &str = "CLUSTER_QUEUE";
pub(crate) const NODE: &str = "CLUSTER_NODE";
/// How many jobs a job source should list at most (the pool's slots).
pub(crate) const LIMIT: &str = "CLUSTER_LIMIT";
