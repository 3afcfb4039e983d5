//! The worker side: the [`Cluster`] facade.
//!
//! Inside a worker started by the watcher, the first call into `Cluster`
//! connects to the watcher: it takes the inherited socketpair end named by
//! `CLUSTER_IPC_FD` and starts a small background thread (`cluster-ipc`)
//! with its own single-threaded runtime that owns the channel. User code
//! talks to that thread through channels, so the API works from any runtime
//! and the watcher's messages are handled even while user code is busy.
//!
//! Without a watcher (standalone), the same calls bind locally and wait for
//! signals, so one program runs with and without `cluster`.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Kind, Result};
use crate::ipc::message::{ToWatcher, ToWorker, VERSION};
use crate::ipc::{Channel, RecvError};
use crate::socket::{Address, Listener, DEFAULT_BACKLOG};
use crate::{signal, sys};

/// Environment variables through which the watcher describes a worker.
pub(crate) mod env {
    /// Number of the inherited IPC descriptor.
    pub const IPC_FD: &str = "CLUSTER_IPC_FD";
    /// Pid of the watcher (the creator of the socketpair).
    pub const WATCHER_PID: &str = "CLUSTER_WATCHER_PID";
    /// Context id of this spawn.
    pub const CONTEXT_ID: &str = "CLUSTER_CONTEXT_ID";
    /// Slot (1..N).
    pub const SLOT: &str = "CLUSTER_SLOT";
    /// Milliseconds a worker has to exit once its watcher is gone.
    pub const SHUTDOWN_TIMEOUT_MS: &str = "CLUSTER_SHUTDOWN_TIMEOUT_MS";
}

/// Entry point of the worker API. All functions are associated functions:
/// there is one cluster connection per process.
///
/// ```no_run
/// # async fn run() -> Result<(), cluster::Error> {
/// use cluster::Cluster;
///
/// let listener = Cluster::server_socket_factory().listen("127.0.0.1:8080").await?;
/// tokio::spawn(async move {
///     while let Ok((stream, _peer)) = listener.accept().await {
///         // serve `stream` ...
/// #       drop(stream);
///     }
/// });
/// Cluster::await_termination().await; // ready; returns when asked to stop
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Cluster {
    _private: (),
}

impl Cluster {
    /// Whether this process is a worker started by a `cluster` watcher.
    pub fn is_worker() -> bool {
        link().is_some()
    }

    /// The context id of this worker: unique per spawn, so a respawned
    /// worker in the same slot gets a new one. `None` when standalone.
    pub fn context_id() -> Option<u64> {
        link().map(|l| l.context_id)
    }

    /// The worker's slot, `1..=N`, stable across respawns of that slot.
    /// `None` when standalone.
    pub fn slot() -> Option<u32> {
        link().map(|l| l.slot)
    }

    /// The factory that hands out listening sockets: from the watcher in a
    /// worker, bound locally when standalone.
    pub fn server_socket_factory() -> ServerSocketFactory {
        ServerSocketFactory { _private: () }
    }

    /// Tells the watcher that this worker is ready to serve. Idempotent;
    /// a no-op when standalone. [`await_termination`](Cluster::await_termination)
    /// calls it too, so most programs never need to.
    pub fn ready() {
        if let Some(link) = link() {
            if !link.ready_sent.swap(true, Ordering::SeqCst) {
                let _ = link.tx.send(Outgoing::Message(ToWatcher::Ready));
            }
        }
    }

    /// Marks the worker ready, then waits until it should stop: the watcher
    /// asked it to (graceful stop or restart), the watcher went away, or the
    /// process received SIGTERM, SIGINT, SIGQUIT or SIGHUP.
    ///
    /// Standalone, only the signals end the wait.
    pub async fn await_termination() {
        Self::ready();
        match link() {
            Some(link) => {
                let mut stop = link.stop.clone();
                let mut pings = link.pings.latest.subscribe();
                link.pings.awaiters.fetch_add(1, Ordering::SeqCst);
                let _guard = AwaiterGuard(&link.pings);
                let termination = signal::termination();
                tokio::pin!(termination);
                loop {
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => break,
                        _ = &mut termination => break,
                        changed = pings.changed() => {
                            if changed.is_err() {
                                // The IPC thread is gone; `stop` fires next.
                                std::future::pending::<()>().await;
                            }
                            let seq = *pings.borrow_and_update();
                            let _ = link.tx.send(Outgoing::Message(ToWatcher::Pong { seq }));
                        }
                    }
                }
            }
            None => {
                signal::termination().await;
            }
        }
    }
}

/// Hands out listening sockets; get one with [`Cluster::server_socket_factory`].
#[derive(Debug, Clone, Copy)]
pub struct ServerSocketFactory {
    _private: (),
}

impl ServerSocketFactory {
    /// Returns a listener for `addr`: `host:port`, `tcp://host:port`,
    /// `:port` (all interfaces) or `unix:///path`.
    ///
    /// In a worker, the watcher binds the address once and every worker that
    /// asks gets the same socket (one shared accept queue); port 0 gives every
    /// worker the same ephemeral port. Standalone, the address is bound here,
    /// with the same options (`SO_REUSEADDR`, a backlog of
    /// [`DEFAULT_BACKLOG`](crate::DEFAULT_BACKLOG)).
    ///
    /// Must be called within a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::is_invalid_address`] for an unparsable address,
    /// [`Error::is_bind`] when the address cannot be bound (in use, not
    /// permitted), [`Error::is_ipc`] when the watcher cannot be reached.
    pub async fn listen(&self, addr: &str) -> Result<Listener> {
        let parsed = Address::parse(addr)?;
        let fd = match link() {
            None => parsed.bind(DEFAULT_BACKLOG)?,
            Some(link) => link.request_socket(addr).await?,
        };
        parsed.listener_from_fd(fd).map_err(|e| {
            Error::with_io(Kind::Io, format!("cannot use the listener for {parsed}"), e)
        })
    }
}

enum Outgoing {
    Message(ToWatcher),
    Socket {
        addr: String,
        reply: oneshot::Sender<Result<OwnedFd>>,
    },
}

struct WorkerLink {
    context_id: u64,
    slot: u32,
    tx: mpsc::UnboundedSender<Outgoing>,
    stop: watch::Receiver<bool>,
    ready_sent: AtomicBool,
    pings: Arc<Pings>,
}

/// Heartbeat routing: while some task awaits `Cluster::await_termination()`
/// on the user's runtime, that future answers the watcher's pings, so a
/// blocked event loop stops answering. Otherwise the IPC thread answers.
struct Pings {
    awaiters: AtomicUsize,
    latest: watch::Sender<u64>,
}

/// Decrements the awaiter count when `await_termination` ends or is dropped.
struct AwaiterGuard<'a>(&'a Pings);

impl Drop for AwaiterGuard<'_> {
    fn drop(&mut self) {
        self.0.awaiters.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WorkerLink {
    async fn request_socket(&self, addr: &str) -> Result<OwnedFd> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Outgoing::Socket {
                addr: addr.to_string(),
                reply,
            })
            .map_err(|_| Error::new(Kind::Ipc, "the connection to the watcher is closed"))?;
        rx.await
            .map_err(|_| Error::new(Kind::Ipc, "the connection to the watcher is closed"))?
    }
}

static LINK: OnceLock<Option<Arc<WorkerLink>>> = OnceLock::new();

fn link() -> Option<&'static Arc<WorkerLink>> {
    LINK.get_or_init(connect).as_ref()
}

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.parse().ok()
}

/// Connects to the watcher if the environment names a valid IPC socket
/// whose creator is the watcher; otherwise this process is standalone.
fn connect() -> Option<Arc<WorkerLink>> {
    let raw: i32 = env_num(env::IPC_FD)?;
    let watcher_pid: i32 = env_num(env::WATCHER_PID)?;
    let context_id: u64 = env_num(env::CONTEXT_ID)?;
    let slot: u32 = env_num(env::SLOT)?;
    // The variables are inherited by our own children too; only a process
    // that really holds the watcher's socket is a worker.
    match sys::inherited_socket_peer_pid(raw) {
        Ok(pid) if pid == watcher_pid => {}
        Ok(_) | Err(_) => {
            tracing::debug!(
                "{} is set but is not the watcher's socket; running standalone",
                env::IPC_FD
            );
            return None;
        }
    }
    let fd = match sys::take_inherited_fd(raw) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("cannot take the watcher's socket: {e}; running standalone");
            return None;
        }
    };
    let grace = Duration::from_millis(env_num(env::SHUTDOWN_TIMEOUT_MS).unwrap_or(10_000));
    let (tx, rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let pings = Arc::new(Pings {
        awaiters: AtomicUsize::new(0),
        latest: watch::channel(0).0,
    });
    let thread_pings = pings.clone();
    let spawned = std::thread::Builder::new()
        .name("cluster-ipc".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cluster: cannot start the IPC runtime: {e}");
                    std::process::exit(70);
                }
            };
            rt.block_on(ipc_main(fd, rx, stop_tx, thread_pings, grace));
        });
    if let Err(e) = spawned {
        eprintln!("cluster: cannot start the IPC thread: {e}");
        std::process::exit(70);
    }
    Some(Arc::new(WorkerLink {
        context_id,
        slot,
        tx,
        stop: stop_rx,
        ready_sent: AtomicBool::new(false),
        pings,
    }))
}

/// The IPC thread: owns the channel, forwards requests, dispatches replies.
async fn ipc_main(
    fd: OwnedFd,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    stop: watch::Sender<bool>,
    pings: Arc<Pings>,
    grace: Duration,
) {
    let channel = match Channel::new(fd) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("cluster: cannot use the watcher's socket: {e}");
            std::process::exit(70);
        }
    };
    let next_id = AtomicU64::new(1);
    let mut pending: HashMap<u64, oneshot::Sender<Result<OwnedFd>>> = HashMap::new();
    let hello = ToWatcher::Hello {
        version: VERSION,
        pid: std::process::id(),
    };
    let mut buf = Vec::new();
    let reason = if let Err(e) = channel.send(&hello, &[]).await {
        format!("cannot greet the watcher: {e}")
    } else {
        loop {
            tokio::select! {
                out = rx.recv() => {
                    let Some(out) = out else { break "the worker API was dropped".to_string() };
                    let result = match out {
                        Outgoing::Message(m) => channel.send(&m, &[]).await,
                        Outgoing::Socket { addr, reply } => {
                            let id = next_id.fetch_add(1, Ordering::Relaxed);
                            pending.insert(id, reply);
                            channel.send(&ToWatcher::SocketRequest { id, addr }, &[]).await
                        }
                    };
                    if let Err(e) = result {
                        break format!("cannot write to the watcher: {e}");
                    }
                }
                msg = channel.recv::<ToWorker>(&mut buf) => match msg {
                    Ok((msg, fds)) => {
                        if let Err(why) = handle(&channel, msg, fds, &mut pending, &stop, &pings).await {
                            break why;
                        }
                    }
                    Err(RecvError::Closed) => break "the watcher is gone".to_string(),
                    Err(e) => break format!("bad message from the watcher: {e}"),
                },
            }
        }
    };
    // The watcher is gone or broken: fail what waits, ask the program to
    // stop, and make sure this process does not outlive its grace period.
    for (_, reply) in pending.drain() {
        let _ = reply.send(Err(Error::new(
            Kind::Ipc,
            format!("no answer from the watcher: {reason}"),
        )));
    }
    tracing::warn!("cluster worker: {reason}; stopping");
    let _ = stop.send(true);
    tokio::time::sleep(grace).await;
    eprintln!("cluster worker: still running {grace:?} after the watcher left; exiting");
    std::process::exit(1);
}

async fn handle(
    channel: &Channel,
    msg: ToWorker,
    mut fds: Vec<OwnedFd>,
    pending: &mut HashMap<u64, oneshot::Sender<Result<OwnedFd>>>,
    stop: &watch::Sender<bool>,
    pings: &Pings,
) -> std::result::Result<(), String> {
    match msg {
        ToWorker::Hello { version, .. } if version != VERSION => {
            return Err(format!(
                "the watcher speaks protocol version {version}, this worker {VERSION}"
            ));
        }
        ToWorker::Hello { .. } => {}
        ToWorker::SocketReply { id, result } => {
            let Some(reply) = pending.remove(&id) else {
                return Err(format!("a reply to unknown request {id}"));
            };
            let answer = match result {
                Ok(()) if fds.len() == 1 => Ok(fds.remove(0)),
                Ok(()) => return Err(format!("a socket reply with {} descriptors", fds.len())),
                Err(why) => Err(Error::new(Kind::Bind, why)),
            };
            let _ = reply.send(answer);
        }
        ToWorker::Stop { .. } => {
            let _ = stop.send(true);
        }
        ToWorker::Ping { seq } if pings.awaiters.load(Ordering::SeqCst) > 0 => {
            pings.latest.send_replace(seq);
        }
        ToWorker::Ping { seq } => {
            channel
                .send(&ToWatcher::Pong { seq }, &[])
                .await
                .map_err(|e| format!("cannot write to the watcher: {e}"))?;
        }
        ToWorker::Data(_) => {}
    }
    // Descriptors that no message asked for are closed as `fds` drops.
    Ok(())
}
