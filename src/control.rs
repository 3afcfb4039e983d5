//! The control socket's protocol and its client: a Unix stream socket
//! beside the pid file (mode 0600) through which `cluster status`, `reload`,
//! `stop` and `scale` talk to a running watcher. The server side is
//! `watcher/control.rs`.
//!
//! Protocol: the client writes one JSON object on one line and reads one
//! JSON object on one line, then both close. Requests:
//! `{"command":"status"}`, `{"command":"reload"}`, `{"command":"stop"}`,
//! `{"command":"scale","workers":N}`, `{"command":"reopen-logs"}`,
//! `{"command":"stop_worker","slot":N}`,
//! `{"command":"storage_get","path":"a.b"}`, `{"command":"storage_set",
//! "path":"a.b","value":1}`, `{"command":"storage_delete","path":"a.b"}`,
//! `{"command":"storage_dump"}`, `{"command":"command","to":"all",
//! "name":"ping","args":null}`. Responses carry `"ok": true` and the
//! result, or `"ok": false` and `"error"`.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::{Error, Kind, Result};

/// The control socket path that goes with a pid file: `x.pid` → `x.sock`.
pub fn socket_for_pid_file(pid_file: &Path) -> PathBuf {
    pid_file.with_extension("sock")
}

/// A request to the watcher.
///
/// ```no_run
/// use cluster::control::Request;
/// let line = serde_json::to_string(&Request::Scale { workers: 4 }).unwrap();
/// assert_eq!(line, r#"{"command":"scale","workers":4}"#);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
#[non_exhaustive]
pub enum Request {
    /// The workers and their state. `quick` skips the 200 ms CPU sample
    /// (CPU% is then absent), for `cluster status -q` and scripts.
    Status {
        /// Skip sampling CPU use.
        #[serde(default)]
        quick: bool,
    },
    /// A rolling restart; answered when it is done.
    Reload,
    /// A graceful stop; answered at once.
    Stop,
    /// Set the number of workers.
    Scale {
        /// The new number of workers.
        workers: usize,
    },
    /// Reopen the log file (`--log-file`), after logrotate moved it.
    #[serde(rename = "reopen-logs")]
    ReopenLogs,
    /// Stop one worker (by slot or name): at once when it is idle, else
    /// asked to stop and killed after `timeout_ms`.
    #[serde(rename = "stop_worker")]
    StopWorker {
        /// The worker's slot.
        #[serde(default)]
        slot: Option<u32>,
        /// Or its name.
        #[serde(default)]
        name: Option<String>,
        /// Milliseconds before a busy worker is killed (default: the
        /// watcher's shutdown timeout).
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// The value at `path` in the shared storage (`value`, `found`).
    #[serde(rename = "storage_get")]
    StorageGet {
        /// A dot path.
        path: String,
    },
    /// Set `path` to `value` (`version` answers).
    #[serde(rename = "storage_set")]
    StorageSet {
        /// A dot path.
        path: String,
        /// Any JSON value.
        value: serde_json::Value,
        /// Expire it after this many milliseconds.
        #[serde(default)]
        ttl_ms: Option<u64>,
    },
    /// Delete `path` (`found` says whether it existed).
    #[serde(rename = "storage_delete")]
    StorageDelete {
        /// A dot path.
        path: String,
    },
    /// The whole shared storage (`value`).
    #[serde(rename = "storage_dump")]
    StorageDump,
    /// Send command `name` to `to` (`watcher`, a slot, a name, `all`);
    /// `replies` has one entry per process that answered.
    Command {
        /// The target.
        to: String,
        /// The command's name.
        name: String,
        /// Its arguments.
        #[serde(default)]
        args: serde_json::Value,
        /// How long to wait, in milliseconds (default 10,000).
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
}

/// Commands and messages one worker sent and received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TrafficStatus {
    /// Commands it sent.
    pub commands_sent: u64,
    /// Commands it was sent.
    pub commands_received: u64,
    /// User messages it sent the watcher.
    pub messages_sent: u64,
    /// User messages the watcher sent it.
    pub messages_received: u64,
}

/// The shared storage in a status response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StorageStatus {
    /// Keys stored (at every level).
    pub keys: usize,
    /// Bytes used, as the limit counts them.
    pub bytes: usize,
    /// `--storage-max-bytes`.
    pub max_bytes: usize,
    /// Operations since start.
    pub operations: u64,
    /// Operations per second over the last second.
    pub operations_per_sec: f64,
}

/// One process's answer to a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CommandReply {
    /// The worker's slot; 0 for the watcher.
    pub slot: u32,
    /// Its name.
    #[serde(default)]
    pub name: Option<String>,
    /// Its pid.
    pub pid: u32,
    /// Whether its handler succeeded.
    pub ok: bool,
    /// The result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One worker in a status response.
///
/// ```no_run
/// # async fn ask() -> Result<(), cluster::Error> {
/// use cluster::control::{request, Request};
/// let status = request("x.sock".as_ref(), &Request::Status { quick: true }).await?;
/// for w in &status.workers {
///     println!("slot {} {} pid {} last exit {:?}", w.slot, w.state, w.pid, w.last_exit_code);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WorkerStatus {
    /// Slot, 1..=N.
    pub slot: u32,
    /// Context id of this spawn.
    pub context_id: u64,
    /// Process id.
    pub pid: u32,
    /// `starting`, `ready` or `stopping` for a worker process; `backoff`
    /// for a slot waiting to respawn its crashed worker, `failed` for a
    /// slot that gave up after `--max-restarts` (both without a process:
    /// `pid` and `context_id` are 0).
    pub state: String,
    /// Seconds since the worker started.
    pub uptime_secs: f64,
    /// Workers started for this slot after the first.
    pub restarts: u32,
    /// Resident memory in bytes (`VmRSS`).
    #[serde(default)]
    pub rss_bytes: Option<u64>,
    /// CPU time used since the worker started (user + system), in seconds.
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
    /// CPU use in percent of one core, sampled over 200 ms while the
    /// request was answered.
    #[serde(default)]
    pub cpu_percent: Option<f64>,
    /// How the previous worker of this slot ended, if one did.
    #[serde(default)]
    pub last_exit: Option<String>,
    /// Its exit status, if it exited.
    #[serde(default)]
    pub last_exit_code: Option<i32>,
    /// The signal that killed it, if one did (`SIGKILL`).
    #[serde(default)]
    pub last_exit_signal: Option<String>,
    /// For a `backoff` slot: seconds until its next worker starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_start_secs: Option<f64>,
    /// The worker's name (`--name`, `--names`).
    #[serde(default)]
    pub name: Option<String>,
    /// What it last set with `Cluster::set_status`, or said with `STATUS=`
    /// (`--notify`).
    #[serde(default)]
    pub status: Option<String>,
    /// It said `RELOADING=1` and not `READY=1` since (`--notify`).
    #[serde(default)]
    pub reloading: bool,
    /// Commands and messages it sent and received.
    #[serde(default)]
    pub stats: TrafficStatus,
}

/// The watcher's answer.
///
/// ```no_run
/// # async fn ask() -> Result<(), cluster::Error> {
/// use cluster::control::{request, Request};
/// let status = request("x.sock".as_ref(), &Request::Status { quick: true }).await?;
/// if status.degraded {
///     eprintln!("{:?} of {:?} ready", status.workers_ready, status.workers_wanted);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[non_exhaustive]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// It failed because the caller may not use the control socket (only
    /// the watcher's user and root may).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub denied: bool,
    /// The watcher's pid.
    #[serde(default)]
    pub pid: u32,
    /// Number of worker slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_wanted: Option<usize>,
    /// Every slot (for `status`): its worker, or a `backoff` or
    /// `failed` row for a slot without one. Always present in a status
    /// answer, empty when nothing runs.
    #[serde(default)]
    pub workers: Vec<WorkerStatus>,
    /// Slots whose worker is ready (for `status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_ready: Option<usize>,
    /// Fewer workers are ready than wanted, or a slot gave up (for
    /// `status`; `cluster status` then exits 5).
    #[serde(default)]
    pub degraded: bool,
    /// The program the workers run (for `status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<String>,
    /// The addresses the watcher listens on (for `status`).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The daemon's log file (`--log-file`), for `cluster logs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file: Option<String>,
    /// The job dispatcher (for `status`, when the watcher runs jobs): the
    /// store, its pools (`name`, `slots`, `workers`, `running`,
    /// `capacity`), the counters since start (`claimed`, `done`, `failed`,
    /// `retried`, `cancelled`, `lost`) and the store's counts per state
    /// (`store_counts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<serde_json::Value>,
    /// The shared storage (for `status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageStatus>,
    /// A stored value (`storage_get`, `storage_dump`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
    /// Whether something was at the path (`storage_get`, `storage_delete`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub found: Option<bool>,
    /// The new version (`storage_set`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// One answer per process (`command`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replies: Vec<CommandReply>,
    /// The worker `stop_worker` stopped: its slot and pid, and whether it
    /// was idle (stopped at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<serde_json::Value>,
}

impl Response {
    /// A success from this process (the watcher).
    pub(crate) fn success() -> Response {
        Response {
            ok: true,
            pid: std::process::id(),
            ..Response::default()
        }
    }

    /// A failure from this process, with its one-line reason.
    pub(crate) fn failure(error: String) -> Response {
        Response {
            ok: false,
            error: Some(error),
            pid: std::process::id(),
            ..Response::default()
        }
    }
}

/// Sends `request` to the watcher listening on `socket` and returns its
/// answer (the client side, used by the CLI's subcommands).
///
/// # Errors
///
/// [`Error::is_control`] when no watcher answers on `socket` (not
/// running), the socket is not ours to use (`io_error()` is
/// `PermissionDenied`), or it answers something that is not a response.
/// A watcher refuses requests from users other than its own and root:
/// the [`Response`] then has `ok: false` and `denied: true`.
///
/// ```no_run
/// # async fn ask() -> Result<(), cluster::Error> {
/// use cluster::control::{request, socket_for_pid_file, Request};
/// let socket = socket_for_pid_file(std::path::Path::new("/run/app.pid"));
/// let status = request(&socket, &Request::Status { quick: true }).await?;
/// println!("{} worker(s)", status.workers.len());
/// # Ok(()) }
/// ```
pub async fn request(socket: &Path, request: &Request) -> Result<Response> {
    let not_running = |e: io::Error| {
        let what = if e.kind() == io::ErrorKind::PermissionDenied {
            "permission denied: only the watcher's user and root may use its control socket"
        } else {
            "no watcher is running"
        };
        Error::with_io(
            Kind::Control,
            format!("{what} (control socket {})", socket.display()),
            e,
        )
    };
    let stream = UnixStream::connect(socket).await.map_err(not_running)?;
    let (read, mut write) = stream.into_split();
    let mut line =
        serde_json::to_vec(request).map_err(|e| Error::new(Kind::Control, e.to_string()))?;
    line.push(b'\n');
    write.write_all(&line).await.map_err(not_running)?;
    let mut answer = String::new();
    BufReader::new(read)
        .read_line(&mut answer)
        .await
        .map_err(not_running)?;
    if answer.trim().is_empty() {
        return Err(Error::new(
            Kind::Control,
            "the watcher closed the control connection without answering",
        ));
    }
    serde_json::from_str(answer.trim())
        .map_err(|e| Error::new(Kind::Control, format!("bad answer from the watcher: {e}")))
}
