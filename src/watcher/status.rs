//! What the watcher reports about its workers: the public [`WorkerInfo`]
//! and [`WorkerState`], and the counters of a metrics [`Snapshot`]. A leaf:
//! the supervisor fills these in, the control server, the metrics responder
//! and `ClusterWatcher::workers` read them.

use std::time::Duration;

use super::procfs;

/// What the watcher knows about one running worker.
///
/// ```no_run
/// # async fn run(watcher: cluster::ClusterWatcher) {
/// for w in watcher.workers().await {
///     println!("slot {} pid {} {} rss {:?}", w.slot, w.pid, w.state, w.rss_bytes);
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// The worker's slot, `1..=N`.
    pub slot: u32,
    /// The context id of this spawn.
    pub context_id: u64,
    /// The worker's process id.
    pub pid: u32,
    /// Where the worker is in its life.
    pub state: WorkerState,
    /// Workers started for this slot after the first (respawns and reloads).
    pub restarts: u32,
    /// How long this worker has been running.
    pub uptime: Duration,
    /// Resident memory in bytes (`VmRSS` of `/proc/PID/status`), when it
    /// could be read.
    pub rss_bytes: Option<u64>,
    /// CPU time used so far, user plus system (`/proc/PID/stat`), when it
    /// could be read.
    pub cpu_time: Option<Duration>,
    /// How the previous worker of this slot ended, if one did: for example
    /// `exited with status 1` or `killed by SIGKILL (missed heartbeats)`.
    pub last_exit: Option<String>,
    /// The exit status of the previous worker of this slot, if it exited.
    pub last_exit_code: Option<i32>,
    /// The signal that killed the previous worker of this slot, if one did.
    pub last_exit_signal: Option<i32>,
    /// The worker's name (`--name`, `--names`), if it has one.
    pub name: Option<String>,
    /// What the worker last said with `Cluster::set_status` (`idle`,
    /// `processing`, a short text) or with `STATUS=` on its notify socket
    /// (`--notify`), `stopping` once it was asked to stop; `None` when it
    /// never said.
    pub status: Option<String>,
    /// It said `RELOADING=1` and has not said `READY=1` since.
    pub reloading: bool,
    /// Commands and messages it sent and received.
    pub traffic: Traffic,
}

/// Commands and user messages one worker sent and received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Traffic {
    /// Commands it sent (`Cluster::command`).
    pub commands_sent: u64,
    /// Commands it was sent (by the watcher or other workers).
    pub commands_received: u64,
    /// User messages it sent the watcher (`MessageChannel::send`).
    pub messages_sent: u64,
    /// User messages the watcher sent it.
    pub messages_received: u64,
}

impl WorkerInfo {
    /// Reads the worker's memory and CPU time from `/proc`.
    pub(crate) fn read_proc(mut self) -> WorkerInfo {
        self.rss_bytes = procfs::rss_bytes(self.pid);
        self.cpu_time = procfs::cpu_time(self.pid);
        self
    }
}

/// The life of a worker: starting → ready → stopping → gone.
///
/// ```no_run
/// # async fn run(watcher: cluster::ClusterWatcher) {
/// let ready = watcher
///     .workers()
///     .await
///     .iter()
///     .filter(|w| w.state == cluster::WorkerState::Ready)
///     .count();
/// # drop(ready);
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WorkerState {
    /// Spawned, not yet ready.
    Starting,
    /// Called `Cluster::ready()` or `Cluster::await_termination()`.
    Ready,
    /// Asked to stop; waiting for it to exit.
    Stopping,
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Stopping => "stopping",
        })
    }
}

/// The workers and the number of slots, for `cluster status`.
#[derive(Debug, Clone, Default)]
pub(crate) struct StatusReport {
    pub workers: Vec<WorkerInfo>,
    pub wanted: usize,
    /// Slots whose worker is ready.
    pub ready: usize,
    /// Slots without a worker: waiting for a respawn, or given up.
    pub idle: Vec<IdleSlot>,
    /// The program the workers run.
    pub program: String,
    /// The addresses the watcher listens on.
    pub addresses: Vec<String>,
    /// Where the daemon's log goes (`--log-file`).
    pub log_file: Option<std::path::PathBuf>,
    /// The shared storage's counters.
    pub storage: HubStats,
}

/// A slot without a worker process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IdleSlot {
    pub slot: u32,
    /// The slot's worker name (`--name`, `--names`).
    pub name: Option<String>,
    pub restarts: u32,
    /// When its next worker starts (`None`: never, it gave up).
    pub next_start: Option<Duration>,
    /// It crashed more than `--max-restarts` times within
    /// `--restart-window` and is not restarted any more.
    pub gave_up: bool,
    pub last_exit: Option<String>,
    pub last_exit_code: Option<i32>,
    pub last_exit_signal: Option<i32>,
}

/// A worker's slot, pid, name, status and traffic, for metrics.
pub(crate) type WorkerLabels = (u32, u32, Option<String>, Option<String>, Traffic);

/// What the supervisor reports for one metrics scrape.
#[derive(Debug, Default, Clone)]
pub(crate) struct Snapshot {
    /// Every worker process: slot, pid, state.
    pub workers: Vec<(u32, u32, WorkerState)>,
    /// Every worker process: slot, pid, name, status, traffic.
    pub info: Vec<WorkerLabels>,
    /// The shared storage's counters.
    pub storage: HubStats,
    /// Per slot: (slot, restarts, crashes).
    pub slots: Vec<(u32, u64, u64)>,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub log_records: u64,
    pub log_dropped: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    /// Slots that gave up after `--max-restarts`.
    pub gave_up: Vec<u32>,
    /// Workers replaced for `--max-requests` or `--max-memory`.
    pub recycled: u64,
}

/// One pool in a status report.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub(crate) struct PoolStatus {
    pub name: String,
    pub slots: u32,
    pub shared: bool,
    pub queues: Vec<String>,
    /// Workers that run jobs (persistent mode).
    pub workers: usize,
    pub running: usize,
    /// Jobs it can run at once now.
    pub capacity: usize,
}

/// What the dispatcher reports.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq, Eq)]
pub(crate) struct JobsStatus {
    pub store: String,
    pub node: String,
    pub pools: Vec<PoolStatus>,
    /// Claimed and waiting for a free worker.
    pub buffered: usize,
    pub claimed: u64,
    pub done: u64,
    pub failed: u64,
    pub retried: u64,
    pub cancelled: u64,
    pub lost: u64,
    /// The store's counts (every node's jobs), when they could be read.
    pub store_counts: Option<crate::jobs::JobStats>,
    /// The latest outcomes this watcher recorded, oldest first (at most
    /// [`RECENT_OUTCOMES`]); the dashboard's event stream sends the new
    /// ones as `job` events.
    pub recent: std::collections::VecDeque<JobOutcomeInfo>,
}

/// How many outcomes [`JobsStatus::recent`] keeps.
pub(crate) const RECENT_OUTCOMES: usize = 50;

/// One attempt's outcome, as the dashboard shows it.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub(crate) struct JobOutcomeInfo {
    /// Increases by one per outcome since the watcher started.
    pub seq: u64,
    pub id: i64,
    pub queue: String,
    pub name: Option<String>,
    pub attempt: u32,
    pub max_attempts: u32,
    /// `done`, `retry` (failed, another attempt follows), `failed`,
    /// `cancelled` or `lost` (its worker died; retried while attempts
    /// remain).
    pub outcome: &'static str,
    pub error: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl JobsStatus {
    /// Appends an outcome to `recent`, dropping the oldest past the bound.
    pub(crate) fn note(&mut self, mut info: JobOutcomeInfo) {
        info.seq = self.recent.back().map_or(1, |l| l.seq + 1);
        if self.recent.len() >= RECENT_OUTCOMES {
            self.recent.pop_front();
        }
        self.recent.push_back(info);
    }
}

/// The storage's counters, for `cluster status --stats` and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct HubStats {
    pub keys: usize,
    pub bytes: usize,
    pub max_bytes: usize,
    pub ops_total: u64,
    pub ops_per_sec: f64,
}
