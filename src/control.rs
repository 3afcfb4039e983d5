//! The control socket: a Unix stream socket beside the pid file (mode
//! 0600) through which `cluster status`, `reload`, `stop` and `scale` talk
//! to a running watcher.
//!
//! Protocol: the client writes one JSON object on one line and reads one
//! JSON object on one line, then both close. Requests:
//! `{"command":"status"}`, `{"command":"reload"}`, `{"command":"stop"}`,
//! `{"command":"scale","workers":N}`. Responses carry `"ok": true` and the
//! result, or `"ok": false` and `"error"`.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Kind, Result};
use crate::watcher::procfs;
use crate::watcher::WorkerInfo;

/// Largest request line accepted.
const MAX_REQUEST: usize = 4096;

/// How long `status` samples CPU use.
const CPU_SAMPLE: Duration = Duration::from_millis(200);

/// The control socket path that goes with a pid file: `x.pid` → `x.sock`.
pub fn socket_for_pid_file(pid_file: &Path) -> PathBuf {
    pid_file.with_extension("sock")
}

/// A request to the watcher.
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
}

/// One worker in a status response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WorkerStatus {
    /// Slot, 1..=N.
    pub slot: u32,
    /// Context id of this spawn.
    pub context_id: u64,
    /// Process id.
    pub pid: u32,
    /// `starting`, `ready` or `stopping`.
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
}

/// The watcher's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[non_exhaustive]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The watcher's pid.
    #[serde(default)]
    pub pid: u32,
    /// Number of worker slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_wanted: Option<usize>,
    /// Workers (for `status`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<WorkerStatus>,
}

/// What the server asks the supervisor to do.
pub(crate) enum Action {
    Status(oneshot::Sender<(Vec<WorkerInfo>, usize)>),
    Reload(oneshot::Sender<Result<()>>),
    Stop,
    Scale(usize, oneshot::Sender<Result<usize>>),
}

/// A bound control socket; the file is removed when dropped.
pub(crate) struct Server {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Server {
    /// Binds `path` (replacing a stale socket; the caller holds the pid
    /// file lock, so no other watcher owns it) with mode 0600 and serves
    /// requests, forwarding them to `actions`.
    pub(crate) fn bind(path: &Path, actions: mpsc::UnboundedSender<Action>) -> Result<Server> {
        let err = |e: io::Error| {
            Error::with_io(
                Kind::PidFile,
                format!("cannot create control socket {}", path.display()),
                e,
            )
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
                std::fs::remove_file(path).map_err(err)?;
            }
            Ok(_) => {
                return Err(err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                )))
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let actions = actions.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, actions).await;
                });
            }
        });
        Ok(Server {
            path: path.to_path_buf(),
            task,
        })
    }
}

async fn serve(stream: UnixStream, actions: mpsc::UnboundedSender<Action>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
    let read = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
    let response = match read {
        Ok(Ok(_)) => match serde_json::from_str::<Request>(line.trim()) {
            Ok(request) => handle(request, &actions).await,
            Err(e) => failure(format!("bad request: {e}")),
        },
        Ok(Err(e)) => failure(format!("bad request: {e}")),
        Err(_) => failure("no request within 5 s".into()),
    };
    let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

fn failure(error: String) -> Response {
    Response {
        ok: false,
        error: Some(error),
        pid: std::process::id(),
        ..Response::default()
    }
}

fn success() -> Response {
    Response {
        ok: true,
        pid: std::process::id(),
        ..Response::default()
    }
}

async fn handle(request: Request, actions: &mpsc::UnboundedSender<Action>) -> Response {
    let gone = || failure("the watcher is stopping".into());
    match request {
        Request::Status { quick } => {
            let (tx, rx) = oneshot::channel();
            if actions.send(Action::Status(tx)).is_err() {
                return gone();
            }
            let Ok((workers, wanted)) = rx.await else {
                return gone();
            };
            let pids: Vec<u32> = workers.iter().map(|w| w.pid).collect();
            let cpu = if quick {
                vec![None; pids.len()]
            } else {
                procfs::cpu_percent(&pids, CPU_SAMPLE).await
            };
            Response {
                workers_wanted: Some(wanted),
                workers: workers
                    .into_iter()
                    .zip(cpu)
                    .map(|(w, cpu_percent)| WorkerStatus {
                        slot: w.slot,
                        context_id: w.context_id,
                        pid: w.pid,
                        state: w.state.to_string(),
                        uptime_secs: w.uptime.as_secs_f64(),
                        restarts: w.restarts,
                        rss_bytes: procfs::rss_bytes(w.pid),
                        cpu_seconds: procfs::cpu_time(w.pid).map(|d| d.as_secs_f64()),
                        cpu_percent,
                        last_exit: w.last_exit,
                    })
                    .collect(),
                ..success()
            }
        }
        Request::Reload => {
            let (tx, rx) = oneshot::channel();
            if actions.send(Action::Reload(tx)).is_err() {
                return gone();
            }
            match rx.await {
                Ok(Ok(())) => success(),
                Ok(Err(e)) => failure(e.to_string()),
                Err(_) => gone(),
            }
        }
        Request::Stop => {
            if actions.send(Action::Stop).is_err() {
                return gone();
            }
            success()
        }
        Request::Scale { workers } => {
            let (tx, rx) = oneshot::channel();
            if actions.send(Action::Scale(workers, tx)).is_err() {
                return gone();
            }
            match rx.await {
                Ok(Ok(n)) => Response {
                    workers_wanted: Some(n),
                    ..success()
                },
                Ok(Err(e)) => failure(e.to_string()),
                Err(_) => gone(),
            }
        }
    }
}

/// Sends `request` to the watcher listening on `socket` and returns its
/// answer (the client side, used by the CLI's subcommands).
///
/// # Errors
///
/// [`Error::is_ipc`] when no watcher answers on `socket` (not running).
pub async fn request(socket: &Path, request: &Request) -> Result<Response> {
    let not_running = |e: io::Error| {
        Error::with_io(
            Kind::Ipc,
            format!(
                "no watcher is running (control socket {})",
                socket.display()
            ),
            e,
        )
    };
    let stream = UnixStream::connect(socket).await.map_err(not_running)?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).map_err(|e| Error::new(Kind::Ipc, e.to_string()))?;
    line.push(b'\n');
    write.write_all(&line).await.map_err(not_running)?;
    let mut answer = String::new();
    BufReader::new(read)
        .read_line(&mut answer)
        .await
        .map_err(not_running)?;
    if answer.trim().is_empty() {
        return Err(Error::new(
            Kind::Ipc,
            "the watcher closed the control connection without answering",
        ));
    }
    serde_json::from_str(answer.trim())
        .map_err(|e| Error::new(Kind::Ipc, format!("bad answer from the watcher: {e}")))
}
