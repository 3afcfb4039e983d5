//! The control socket's server: accepts connections on the Unix socket
//! beside the pid file, reads one JSON request line, turns it into a
//! [`Command`] for the supervisor and writes the answer (the protocol and
//! the client are in `crate::control`).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;

use super::control_hub;
use super::event::{Command, CommandSender, Scale, WorkerSelector};
use super::hub::Hub;
use super::process::signal_name;
use super::procfs;
use super::sampler::Sampler;
use crate::control::{Request, Response, StorageStatus, TrafficStatus, WorkerStatus};
use crate::error::{Error, Kind, Result};

/// Largest request line accepted (a value for `cluster storage set`).
const MAX_REQUEST: usize = 1024 * 1024;

/// How long `status` samples CPU use.
const CPU_SAMPLE: Duration = Duration::from_millis(200);

/// How long a client has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Binds `path` with mode 0600 and serves requests, sending them to
    /// the supervisor as commands.
    ///
    /// The socket is bound inside a fresh directory of mode 0700 beside
    /// `path` and renamed into place, so it is never reachable by anyone
    /// else, whatever the umask. A stale socket at `path` is replaced; a
    /// live one (another watcher answers on it) or a file that is not a
    /// socket is an error.
    pub(crate) fn bind(
        path: &Path,
        commands: CommandSender,
        sampler: Option<Sampler>,
        hub: Arc<Hub>,
    ) -> Result<Server> {
        let err = |e: io::Error| {
            Error::with_io(
                Kind::Control,
                format!("cannot create control socket {}", path.display()),
                e,
            )
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(Error::new(
                        Kind::Control,
                        format!(
                            "another watcher is serving control socket {}",
                            path.display()
                        ),
                    ));
                }
            }
            Ok(_) => {
                return Err(err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                )))
            }
            Err(_) => {}
        }
        let listener = bind_private(path).map_err(err)?;
        let me = nix::unistd::geteuid().as_raw();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let (commands, sampler) = (commands.clone(), sampler.clone());
                let hub = hub.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, commands, sampler, hub, me).await;
                });
            }
        });
        Ok(Server {
            path: path.to_path_buf(),
            task,
        })
    }
}

/// Binds a Unix listener at `path` that is never accessible to others:
/// inside a new 0700 directory beside it, then chmod 0600, then renamed
/// over `path` (replacing a stale socket atomically).
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let nonce = {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    };
    let private = parent.join(format!(".{}.{nonce:016x}.d", name.to_string_lossy()));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let inner = private.join("s");
    let bound = (|| {
        let listener = UnixListener::bind(&inner)?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inner, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&private);
    bound
}

async fn serve(
    stream: UnixStream,
    commands: CommandSender,
    sampler: Option<Sampler>,
    hub: Arc<Hub>,
    me: u32,
) -> io::Result<()> {
    let peer = stream.peer_cred().map(|c| c.uid()).ok();
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await;
    let allowed = peer.is_some_and(|uid| uid == me || uid == 0);
    let response = match read {
        _ if !allowed => Response {
            denied: true,
            ..failure(format!(
                "permission denied: only uid {me} (the watcher's) and root may use the control socket"
            ))
        },
        Ok(Ok(_)) => match serde_json::from_str::<Request>(line.trim()) {
            Ok(request) => handle(request, &commands, sampler.as_ref(), hub).await,
            Err(e) => failure(format!("bad request: {e}")),
        },
        Ok(Err(e)) => failure(format!("bad request: {e}")),
        Err(_) => failure(format!("no request within {READ_TIMEOUT:?}")),
    };
    let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

pub(crate) fn failure(error: String) -> Response {
    Response::failure(error)
}

fn success() -> Response {
    Response::success()
}

/// Sends the command `make` builds around a reply channel and waits for
/// the answer; `None` when the supervisor is gone.
pub(crate) async fn ask<T>(
    commands: &CommandSender,
    make: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    commands.send(make(tx)).ok()?;
    rx.await.ok()
}

/// The answer to `status`: the workers (CPU use from the sampler, when it
/// has a sample, else measured now unless `quick`) and the job dispatcher's
/// report. `None` when the supervisor is gone. The dashboard's
/// `/api/status` answers the same.
pub(crate) async fn status(
    commands: &CommandSender,
    sampler: Option<&Sampler>,
    quick: bool,
) -> Option<Response> {
    let report = ask(commands, Command::Status).await?;
    let jobs = tokio::time::timeout(
        Duration::from_secs(2),
        ask(commands, |reply| Command::JobsStatus {
            reply,
            counts: true,
        }),
    )
    .await
    .ok()
    .flatten()
    .and_then(|j| serde_json::to_value(j).ok());
    let pids: Vec<u32> = report.workers.iter().map(|w| w.pid).collect();
    let mut cpu: Vec<Option<f64>> = match sampler {
        Some(s) => pids.iter().map(|&p| s.cpu_percent(p)).collect(),
        None => vec![None; pids.len()],
    };
    // A worker too new for the sampler is measured now, unless `quick`.
    let missing: Vec<usize> = (0..pids.len()).filter(|&i| cpu[i].is_none()).collect();
    if !quick && !missing.is_empty() {
        let some: Vec<u32> = missing.iter().map(|&i| pids[i]).collect();
        for (i, v) in missing
            .into_iter()
            .zip(procfs::cpu_percent(&some, CPU_SAMPLE).await)
        {
            cpu[i] = v;
        }
    }
    let mut workers: Vec<WorkerStatus> = report
        .workers
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
            last_exit_code: w.last_exit_code,
            last_exit_signal: w.last_exit_signal.map(signal_name),
            next_start_secs: None,
            name: w.name,
            status: w.status,
            reloading: w.reloading,
            stats: TrafficStatus {
                commands_sent: w.traffic.commands_sent,
                commands_received: w.traffic.commands_received,
                messages_sent: w.traffic.messages_sent,
                messages_received: w.traffic.messages_received,
            },
        })
        .collect();
    let gave_up = report.idle.iter().any(|s| s.gave_up);
    workers.extend(report.idle.into_iter().map(|s| {
        WorkerStatus {
            slot: s.slot,
            context_id: 0,
            pid: 0,
            // Given up after --max-restarts, waiting for its respawn, or left
            // empty (`--revive`, `cluster stop --slot`).
            state: match (s.gave_up, s.next_start) {
                (true, _) => "failed",
                (false, Some(_)) => "backoff",
                (false, None) => "stopped",
            }
            .into(),
            uptime_secs: 0.0,
            restarts: s.restarts,
            rss_bytes: None,
            cpu_seconds: None,
            cpu_percent: None,
            last_exit: s.last_exit,
            last_exit_code: s.last_exit_code,
            last_exit_signal: s.last_exit_signal.map(signal_name),
            next_start_secs: s.next_start.map(|d| d.as_secs_f64()),
            name: s.name,
            status: None,
            reloading: false,
            stats: TrafficStatus::default(),
        }
    }));
    workers.sort_by_key(|w| (w.slot, w.context_id == 0, w.context_id));
    Some(Response {
        workers_wanted: Some(report.wanted),
        workers_ready: Some(report.ready),
        degraded: report.ready < report.wanted || gave_up,
        program: Some(report.program),
        addresses: report.addresses,
        log_file: report.log_file.map(|p| p.display().to_string()),
        jobs,
        workers,
        storage: Some(StorageStatus {
            keys: report.storage.keys,
            bytes: report.storage.bytes,
            max_bytes: report.storage.max_bytes,
            operations: report.storage.ops_total,
            operations_per_sec: report.storage.ops_per_sec,
        }),
        ..success()
    })
}

async fn handle(
    request: Request,
    commands: &CommandSender,
    sampler: Option<&Sampler>,
    hub: Arc<Hub>,
) -> Response {
    let gone = || failure("the watcher is stopping".into());
    match request {
        Request::StorageGet { .. }
        | Request::StorageSet { .. }
        | Request::StorageDelete { .. }
        | Request::StorageDump
        | Request::Command { .. } => control_hub::handle(request, hub).await,
        Request::StopWorker {
            slot,
            name,
            timeout_ms,
        } => {
            let which = match (slot, name) {
                (Some(n), None) => WorkerSelector::Slot(n),
                (None, Some(name)) => WorkerSelector::Name(name),
                _ => return failure("stop_worker needs a slot or a name".into()),
            };
            let timeout = timeout_ms.map(|ms| Duration::from_millis(ms.min(86_400_000)));
            let stopped = ask(commands, |done| Command::StopWorker {
                which,
                timeout,
                done,
            });
            match stopped.await {
                Some(Ok(s)) => Response {
                    stopped: Some(serde_json::json!({
                        "slot": s.slot, "pid": s.pid, "context_id": s.context_id, "at_once": s.at_once,
                    })),
                    ..success()
                },
                Some(Err(e)) => failure(e.to_string()),
                None => gone(),
            }
        }
        Request::Status { quick } => status(commands, sampler, quick).await.unwrap_or_else(gone),
        Request::Reload => {
            let reload = ask(commands, |done| Command::Restart {
                reason: "reload requested".into(),
                done: Some(done),
            });
            match reload.await {
                Some(Ok(())) => success(),
                Some(Err(e)) => failure(e.to_string()),
                None => gone(),
            }
        }
        Request::ReopenLogs => match ask(commands, Command::ReopenLogs).await {
            Some(Ok(())) => success(),
            Some(Err(e)) => failure(e.to_string()),
            None => gone(),
        },
        Request::Stop => {
            tracing::info!("stop requested");
            if commands.send(Command::Stop { timeout: None }).is_err() {
                return gone();
            }
            success()
        }
        Request::Scale { workers } => {
            let scale = ask(commands, |done| Command::Scale {
                to: Scale::To(workers),
                done: Some(done),
            });
            match scale.await {
                Some(Ok(n)) => Response {
                    workers_wanted: Some(n),
                    ..success()
                },
                Some(Err(e)) => failure(e.to_string()),
                None => gone(),
            }
        }
    }
}
