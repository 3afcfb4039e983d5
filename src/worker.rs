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

use serde::{de::DeserializeOwned, Serialize};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Kind, Result};
use crate::ipc::message::{ToWatcher, ToWorker, MAX_MESSAGE, VERSION};
use crate::ipc::{Channel, RecvError};
use crate::log::{ClusterLogLayer, LogRecord, WorkerLogQueue, WORKER_QUEUE};
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

    /// A `tracing_subscriber` layer that forwards every event (level,
    /// target, message, fields, span names, timestamp) to the watcher, which
    /// writes it to its log stream tagged with this worker's slot and pid.
    /// Standalone, it writes the same lines to stderr.
    ///
    /// Forwarding never blocks: events go through a bounded queue (16,384
    /// records); when it is full they are dropped and counted, and the
    /// watcher logs how many.
    ///
    /// ```no_run
    /// use tracing_subscriber::prelude::*;
    /// tracing_subscriber::registry().with(cluster::Cluster::log_layer()).init();
    /// tracing::info!(user = "ann", "logged in");
    /// ```
    pub fn log_layer() -> ClusterLogLayer {
        ClusterLogLayer::new(link().map(|l| &l.logs))
    }

    /// A `slog::Drain` that forwards records (level, module or tag, message,
    /// key-value pairs) to the watcher like [`log_layer`](Cluster::log_layer)
    /// does; standalone it writes to stderr. Requires the `slog` feature.
    ///
    /// ```no_run
    /// # #[cfg(feature = "slog")] {
    /// let log = slog::Logger::root(cluster::Cluster::slog_drain(), slog::o!("app" => "demo"));
    /// slog::info!(log, "logged in"; "user" => "ann");
    /// # }
    /// ```
    #[cfg(feature = "slog")]
    pub fn slog_drain() -> crate::log::ClusterSlogDrain {
        crate::log::ClusterSlogDrain::new(link().map(|l| &l.logs))
    }

    /// A typed channel to the watcher: [`send`](MessageChannel::send)
    /// messages to it and [`recv`](MessageChannel::recv) what it sends
    /// (`ClusterWatcher::send`, `broadcast`, or a reply). Every channel of
    /// one process shares one inbox: call it once and keep it.
    ///
    /// # Errors
    ///
    /// [`Error::is_ipc`] when the process is not a worker (standalone).
    pub fn channel<T: Serialize + DeserializeOwned>() -> Result<MessageChannel<T>> {
        match link() {
            Some(link) => Ok(MessageChannel {
                link,
                _type: std::marker::PhantomData,
            }),
            None => Err(Error::new(
                Kind::Ipc,
                "not running under a cluster watcher: there is no one to send messages to",
            )),
        }
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

/// Largest user message, encoded, that [`MessageChannel::send`] and the
/// watcher's `send`/`broadcast` accept.
pub const MAX_MESSAGE_SIZE: usize = MAX_MESSAGE - 16;

pub(crate) fn encode_user_message<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    let bytes = postcard::to_stdvec(msg)
        .map_err(|e| Error::new(Kind::Ipc, format!("cannot encode the message: {e}")))?;
    if bytes.len() > MAX_MESSAGE_SIZE {
        return Err(Error::new(
            Kind::TooLarge,
            format!(
                "message of {} bytes exceeds the limit of {MAX_MESSAGE_SIZE} bytes",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

pub(crate) fn decode_user_message<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes)
        .map_err(|e| Error::new(Kind::Ipc, format!("cannot decode the message: {e}")))
}

/// A typed channel between a worker and its watcher; see [`Cluster::channel`].
pub struct MessageChannel<T> {
    link: &'static WorkerLink,
    _type: std::marker::PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for MessageChannel<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageChannel")
            .field("context_id", &self.link.context_id)
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned> MessageChannel<T> {
    /// Sends `msg` to the watcher. Never blocks; messages keep their order.
    ///
    /// # Errors
    ///
    /// [`Error::is_too_large`] when the encoded message exceeds
    /// [`MAX_MESSAGE_SIZE`] (nothing is sent); [`Error::is_ipc`] when the
    /// watcher is gone.
    pub fn send(&self, msg: &T) -> Result<()> {
        let bytes = encode_user_message(msg)?;
        self.link
            .tx
            .send(Outgoing::Message(ToWatcher::Data(bytes)))
            .map_err(|_| Error::new(Kind::Ipc, "the connection to the watcher is closed"))
    }

    /// Waits for the next message from the watcher.
    ///
    /// # Errors
    ///
    /// [`Error::is_ipc`] when the watcher is gone, or when a message is not
    /// a `T` (that message is consumed).
    pub async fn recv(&self) -> Result<T> {
        let bytes = self
            .link
            .inbox
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| Error::new(Kind::Ipc, "the connection to the watcher is closed"))?;
        decode_user_message(&bytes)
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
            Some(link) => match link.request_socket(addr).await? {
                Granted::Fd(fd) => fd,
                Granted::Handoff(h, rx) => {
                    return Ok(Listener::Handoff(HandoffListener {
                        id: h.listener,
                        address: parsed,
                        local: h.local,
                        rx: tokio::sync::Mutex::new(rx),
                    }))
                }
            },
        };
        parsed.listener_from_fd(fd).map_err(|e| {
            Error::with_io(Kind::Io, format!("cannot use the listener for {parsed}"), e)
        })
    }
}

/// What the watcher granted for a `listen` request.
enum Granted {
    /// The listening socket itself (shared and reuseport modes).
    Fd(OwnedFd),
    /// Connections will be handed off (round-robin, least-connections, ip-hash).
    /// Its connections arrive on the receiver, registered by the IPC thread
    /// before it reads the next message (connections may follow at once).
    Handoff(
        crate::ipc::message::Handoff,
        mpsc::UnboundedReceiver<Handed>,
    ),
}

/// A connection handed off by the watcher, not yet accepted.
type Handed = (OwnedFd, String);

/// A handed-off connection accepted by user code, watched for closing.
struct Tracked {
    listener: u64,
    raw: std::os::fd::RawFd,
    inode: (u64, u64),
}

/// The listener behind [`Listener::Handoff`](crate::Listener::Handoff): in
/// the watcher's `round-robin`, `least-connections` and `ip-hash` modes the
/// watcher accepts and hands each connection to a worker; `accept` yields
/// them. The watcher counts a connection closed once its socket is closed
/// here (dropped).
#[derive(Debug)]
pub struct HandoffListener {
    id: u64,
    address: Address,
    local: String,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Handed>>,
}

impl HandoffListener {
    /// The watcher's listening address.
    pub fn local_addr(&self) -> &str {
        &self.local
    }

    /// Waits for the next connection the watcher hands to this worker.
    ///
    /// # Errors
    ///
    /// An error of kind `ConnectionAborted` once the watcher is gone.
    pub async fn accept(&self) -> std::io::Result<(crate::Stream, crate::PeerAddr)> {
        let (fd, peer) = self.rx.lock().await.recv().await.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the watcher is gone")
        })?;
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let inode = sys::inode_of(raw);
        let accepted = match self.address {
            Address::Tcp(_) => {
                let std = std::net::TcpStream::from(fd);
                std.set_nonblocking(true)?;
                let peer = peer
                    .parse()
                    .or_else(|_| std.peer_addr())
                    .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
                let stream = tokio::net::TcpStream::from_std(std)?;
                (crate::Stream::Tcp(stream), crate::PeerAddr::Tcp(peer))
            }
            Address::Unix(_) => {
                let std = std::os::unix::net::UnixStream::from(fd);
                std.set_nonblocking(true)?;
                let stream = tokio::net::UnixStream::from_std(std)?;
                let peer = stream.peer_addr()?;
                (crate::Stream::Unix(stream), crate::PeerAddr::Unix(peer))
            }
        };
        if let (Some(link), Some(inode)) = (link(), inode) {
            if let Ok(mut tracked) = link.tracked.lock() {
                tracked.push(Tracked {
                    listener: self.id,
                    raw,
                    inode,
                });
            }
        }
        Ok(accepted)
    }
}

impl Drop for HandoffListener {
    fn drop(&mut self) {
        // Stop taking connections, and give back those handed to us but not
        // accepted yet (a draining worker drops its listener): the watcher
        // hands them to another worker, so none is lost. Connections that
        // arrive later are given back by the IPC thread.
        let Some(link) = link() else { return };
        if let Ok(mut map) = link.handoffs.lock() {
            map.remove(&self.id);
        }
        let rx = self.rx.get_mut();
        rx.close();
        // Drain until every sender is gone: the IPC thread may be in the
        // middle of a send (it cloned the sender before we removed it), and
        // `try_recv` reports such a value as `Empty` until the send lands.
        let mut spins = 0u32;
        loop {
            match rx.try_recv() {
                Ok((fd, peer)) => {
                    let _ = link.tx.send(Outgoing::Return {
                        listener: self.id,
                        fd,
                        peer,
                    });
                }
                Err(mpsc::error::TryRecvError::Empty) if spins < 100_000 => {
                    spins += 1;
                    std::thread::yield_now();
                }
                Err(_) => break,
            }
        }
    }
}

/// Finds tracked connections whose socket is closed, per listener.
fn closed_connections(link: &WorkerLink) -> HashMap<u64, u32> {
    let mut closed = HashMap::new();
    if let Ok(mut tracked) = link.tracked.lock() {
        tracked.retain(|t| {
            let open = sys::inode_of(t.raw) == Some(t.inode);
            if !open {
                *closed.entry(t.listener).or_insert(0) += 1;
            }
            open
        });
    }
    closed
}

enum Outgoing {
    Message(ToWatcher),
    Socket {
        addr: String,
        reply: oneshot::Sender<Result<Granted>>,
    },
    /// Send every queued log record, then acknowledge (at process exit).
    Flush(std::sync::mpsc::SyncSender<()>),
    /// Give a handed-off connection back to the watcher.
    Return {
        listener: u64,
        fd: OwnedFd,
        peer: String,
    },
}

/// How long process exit may wait for queued records and messages to reach
/// the watcher.
const EXIT_FLUSH: Duration = Duration::from_millis(500);

/// Registered with `atexit`: when the program returns from `main` or calls
/// `std::process::exit`, queued log records and messages (for example the
/// "stopping" line logged after `await_termination`) still reach the watcher.
extern "C" fn flush_at_exit() {
    let Some(Some(link)) = LINK.get() else { return };
    if std::thread::current().name() == Some("cluster-ipc") {
        return; // the IPC thread itself is exiting
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    if link.tx.send(Outgoing::Flush(tx)).is_ok() {
        let _ = rx.recv_timeout(EXIT_FLUSH);
    }
}

struct WorkerLink {
    context_id: u64,
    slot: u32,
    tx: mpsc::UnboundedSender<Outgoing>,
    stop: watch::Receiver<bool>,
    ready_sent: AtomicBool,
    pings: Arc<Pings>,
    logs: WorkerLogQueue,
    inbox: tokio::sync::Mutex<mpsc::UnboundedReceiver<Vec<u8>>>,
    handoffs: std::sync::Mutex<HashMap<u64, mpsc::UnboundedSender<Handed>>>,
    tracked: std::sync::Mutex<Vec<Tracked>>,
    /// Set once the watcher hands off connections (round-robin,
    /// least-connections, ip-hash): only then does the IPC thread poll
    /// accepted connections for closing.
    handing_off: AtomicBool,
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
    async fn request_socket(&self, addr: &str) -> Result<Granted> {
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

static LINK: OnceLock<Option<WorkerLink>> = OnceLock::new();

fn link() -> Option<&'static WorkerLink> {
    LINK.get_or_init(connect).as_ref()
}

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.parse().ok()
}

/// Connects to the watcher if the environment names a valid IPC socket
/// whose creator is the watcher; otherwise this process is standalone.
fn connect() -> Option<WorkerLink> {
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
    let (logs_tx, logs_rx) = mpsc::channel(WORKER_QUEUE);
    let (inbox_tx, inbox_rx) = mpsc::unbounded_channel();
    let ipc = Ipc {
        rx,
        stop: stop_tx,
        pings: thread_pings,
        logs: logs_rx,
        inbox: inbox_tx,
        grace,
    };
    sys::at_exit(flush_at_exit);
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
            rt.block_on(ipc_main(fd, ipc));
        });
    if let Err(e) = spawned {
        eprintln!("cluster: cannot start the IPC thread: {e}");
        std::process::exit(70);
    }
    Some(WorkerLink {
        context_id,
        slot,
        tx,
        stop: stop_rx,
        ready_sent: AtomicBool::new(false),
        pings,
        logs: WorkerLogQueue {
            tx: logs_tx,
            dropped: AtomicU64::new(0),
        },
        inbox: tokio::sync::Mutex::new(inbox_rx),
        handoffs: std::sync::Mutex::new(HashMap::new()),
        tracked: std::sync::Mutex::new(Vec::new()),
        handing_off: AtomicBool::new(false),
    })
}

/// What the IPC thread owns besides the socket.
struct Ipc {
    rx: mpsc::UnboundedReceiver<Outgoing>,
    stop: watch::Sender<bool>,
    pings: Arc<Pings>,
    logs: mpsc::Receiver<LogRecord>,
    inbox: mpsc::UnboundedSender<Vec<u8>>,
    grace: Duration,
}

/// Most records packed into one datagram.
const LOG_BATCH: usize = 256;

/// The IPC thread: owns the channel, forwards requests and log records,
/// dispatches replies and messages.
async fn ipc_main(fd: OwnedFd, mut ipc: Ipc) {
    let channel = match Channel::new(fd) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("cluster: cannot use the watcher's socket: {e}");
            std::process::exit(70);
        }
    };
    let next_id = AtomicU64::new(1);
    let mut pending: HashMap<u64, oneshot::Sender<Result<Granted>>> = HashMap::new();
    let hello = ToWatcher::Hello {
        version: VERSION,
        pid: std::process::id(),
    };
    let mut buf = Vec::new();
    let mut batch = Vec::with_capacity(LOG_BATCH);
    // Handed-off connections are checked for closing this often (a few
    // fstat calls; cheap, and only when there are any).
    let mut close_check = tokio::time::interval(Duration::from_millis(20));
    close_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drop_check = tokio::time::interval(Duration::from_secs(1));
    drop_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reason = if let Err(e) = channel.send(&hello, &[]).await {
        format!("cannot greet the watcher: {e}")
    } else {
        loop {
            tokio::select! {
                out = ipc.rx.recv() => {
                    let Some(out) = out else { break "the worker API was dropped".to_string() };
                    let result = match out {
                        Outgoing::Message(m) => channel.send(&m, &[]).await,
                        Outgoing::Socket { addr, reply } => {
                            let id = next_id.fetch_add(1, Ordering::Relaxed);
                            pending.insert(id, reply);
                            channel.send(&ToWatcher::SocketRequest { id, addr }, &[]).await
                        }
                        Outgoing::Return { listener, fd, peer } => {
                            channel
                                .send(&ToWatcher::ConnectionReturned { listener, peer }, &[std::os::fd::AsFd::as_fd(&fd)])
                                .await
                        }
                        Outgoing::Flush(ack) => {
                            let mut rest = std::mem::take(&mut batch);
                            while let Ok(r) = ipc.logs.try_recv() {
                                rest.push(r);
                            }
                            let mut sent = if rest.is_empty() { Ok(()) } else { send_logs(&channel, rest).await };
                            if sent.is_ok() {
                                sent = report_drops(&channel).await;
                            }
                            let _ = ack.send(());
                            sent
                        }
                    };
                    if let Err(e) = result {
                        break format!("cannot write to the watcher: {e}");
                    }
                }
                n = ipc.logs.recv_many(&mut batch, LOG_BATCH) => {
                    if n == 0 {
                        continue;
                    }
                    if let Err(e) = send_logs(&channel, std::mem::take(&mut batch)).await {
                        break format!("cannot write to the watcher: {e}");
                    }
                    if let Err(e) = report_drops(&channel).await {
                        break format!("cannot write to the watcher: {e}");
                    }
                }
                _ = close_check.tick(), if link().is_some_and(|l| l.handing_off.load(Ordering::Relaxed)) => {
                    let Some(link) = link() else { continue };
                    let mut failed = None;
                    for (listener, count) in closed_connections(link) {
                        if let Err(e) = channel.send(&ToWatcher::ConnectionsClosed { listener, count }, &[]).await {
                            failed = Some(e);
                            break;
                        }
                    }
                    if let Some(e) = failed {
                        break format!("cannot write to the watcher: {e}");
                    }
                }
                _ = drop_check.tick() => {
                    // Drops that happened after the last batch (the queue
                    // filled up, then logging stopped) are reported too.
                    if let Err(e) = report_drops(&channel).await {
                        break format!("cannot write to the watcher: {e}");
                    }
                }
                msg = channel.recv::<ToWorker>(&mut buf) => match msg {
                    Ok((msg, fds)) => {
                        if let Err(why) = handle(&channel, msg, fds, &mut pending, &ipc).await {
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
    drop(ipc.inbox);
    tracing::warn!("cluster worker: {reason}; stopping");
    let _ = ipc.stop.send(true);
    // Until the grace period ends, answer exit flushes at once (nothing can
    // be delivered any more).
    let grace = tokio::time::sleep(ipc.grace);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            _ = &mut grace => break,
            out = ipc.rx.recv() => match out {
                Some(Outgoing::Flush(ack)) => { let _ = ack.send(()); }
                Some(_) => {}
                None => std::future::pending::<()>().await,
            },
        }
    }
    eprintln!(
        "cluster worker: still running {:?} after the watcher left; exiting",
        ipc.grace
    );
    std::process::exit(1);
}

/// Tells the watcher how many records the queue dropped since the last report.
async fn report_drops(channel: &Channel) -> std::result::Result<(), crate::ipc::SendError> {
    let dropped = link()
        .map(|l| l.logs.dropped.swap(0, Ordering::Relaxed))
        .unwrap_or(0);
    if dropped > 0 {
        channel.send(&ToWatcher::LogsDropped(dropped), &[]).await?;
    }
    Ok(())
}

/// Sends records in as few datagrams as fit; a single record too large
/// even alone is dropped and counted.
async fn send_logs(
    channel: &Channel,
    records: Vec<LogRecord>,
) -> std::result::Result<(), crate::ipc::SendError> {
    let mut stack = vec![records];
    while let Some(records) = stack.pop() {
        let msg = ToWatcher::Logs(records);
        match crate::ipc::message::encode(&msg) {
            Ok(bytes) => channel
                .send_bytes(&bytes, &[])
                .await
                .map_err(crate::ipc::SendError::Io)?,
            Err(crate::ipc::message::EncodeError::TooLarge(_)) => {
                let ToWatcher::Logs(mut records) = msg else {
                    unreachable_logs()
                };
                if records.len() == 1 {
                    if let Some(l) = link() {
                        l.logs.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                let second = records.split_off(records.len() / 2);
                // Pushed in reverse so the first half is sent first.
                stack.push(second);
                stack.push(records);
            }
            Err(e) => return Err(crate::ipc::SendError::Encode(e)),
        }
    }
    Ok(())
}

#[cold]
fn unreachable_logs() -> ! {
    // `msg` was built as `ToWatcher::Logs` two lines above.
    std::process::abort()
}

async fn handle(
    channel: &Channel,
    msg: ToWorker,
    mut fds: Vec<OwnedFd>,
    pending: &mut HashMap<u64, oneshot::Sender<Result<Granted>>>,
    ipc: &Ipc,
) -> std::result::Result<(), String> {
    let (stop, pings) = (&ipc.stop, &ipc.pings);
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
                Ok(()) if fds.len() == 1 => Ok(Granted::Fd(fds.remove(0))),
                Ok(()) => return Err(format!("a socket reply with {} descriptors", fds.len())),
                Err(why) => Err(Error::new(Kind::Bind, why)),
            };
            let _ = reply.send(answer);
        }
        ToWorker::HandoffReply { id, result } => {
            let Some(reply) = pending.remove(&id) else {
                return Err(format!("a reply to unknown request {id}"));
            };
            let granted = match result {
                Ok(h) => {
                    // Register now: the watcher may send a connection right
                    // after this reply, before `listen` returns to the caller.
                    let (tx, rx) = mpsc::unbounded_channel();
                    if let Some(link) = link() {
                        if let Ok(mut map) = link.handoffs.lock() {
                            map.insert(h.listener, tx);
                            link.handing_off.store(true, Ordering::Relaxed);
                        }
                    }
                    Ok(Granted::Handoff(h, rx))
                }
                Err(why) => Err(Error::new(Kind::Bind, why)),
            };
            let _ = reply.send(granted);
        }
        ToWorker::Connection {
            listener,
            conn: _,
            peer,
        } => {
            let Some(fd) = fds.pop().filter(|_| fds.is_empty()) else {
                return Err("a handed-off connection without exactly one descriptor".into());
            };
            let target = link().and_then(|l| l.handoffs.lock().ok()?.get(&listener).cloned());
            let undelivered = match target {
                Some(tx) => tx.send((fd, peer)).err().map(|e| e.0),
                None => Some((fd, peer)),
            };
            if let Some((fd, peer)) = undelivered {
                // Nobody accepts on that listener any more: give it back,
                // the watcher hands it to another worker.
                channel
                    .send(
                        &ToWatcher::ConnectionReturned { listener, peer },
                        &[std::os::fd::AsFd::as_fd(&fd)],
                    )
                    .await
                    .map_err(|e| format!("cannot write to the watcher: {e}"))?;
            }
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
        ToWorker::Data(bytes) => {
            let _ = ipc.inbox.send(bytes);
        }
    }
    // Descriptors that no message asked for are closed as `fds` drops.
    Ok(())
}
