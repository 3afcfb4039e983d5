//! What [`ServerSocketFactory::listen`](crate::ServerSocketFactory::listen)
//! returns: a [`Listener`] over a TCP or Unix listening socket (shared and
//! reuseport modes, standalone), or a [`BalancedListener`] over the
//! connections the watcher accepts and hands to this worker (round-robin,
//! least-connections and ip-hash modes).
//!
//! The balanced side has two halves. The worker's IPC thread puts each
//! handed-off connection into the queue of its listener ([`Balanced::deliver`]);
//! `BalancedListener::accept` takes it out. A queue is closed under the same
//! lock that delivery takes, so a connection is either queued before the
//! listener closed (and given back to the watcher by the listener's drop)
//! or refused by `deliver` (and given back by the IPC thread): never lost,
//! never waited for.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Notify;

use crate::socket::{stream_from_fd, Address, PeerAddr, Stream, StreamKind};
use crate::sys;

/// A listening socket handed out by [`ServerSocketFactory::listen`](crate::ServerSocketFactory::listen).
///
/// Serve from it directly: `accept` yields a [`Stream`] that implements
/// tokio's `AsyncRead` and `AsyncWrite`, so `hyper_util::rt::TokioIo::new`
/// wraps it; with the `axum` feature, `Listener` implements
/// `axum::serve::Listener`, so `axum::serve(listener, app)` works in every
/// balance mode. [`into_tcp`](Listener::into_tcp) /
/// [`into_unix`](Listener::into_unix) take the tokio listener out where
/// there is one (not in the balanced modes, where the watcher accepts).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let listener = cluster::Cluster::server_socket_factory().listen("127.0.0.1:8080").await?;
/// loop {
///     let (stream, peer) = listener.accept().await?;
///     // serve `stream`, for example with hyper_util::rt::TokioIo::new(stream)
/// #   drop((stream, peer));
/// }
/// # }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Listener {
    /// A TCP listener (`host:port`, `tcp://host:port`).
    Tcp(TcpListener),
    /// A Unix stream listener (`unix:///path`).
    Unix(UnixListener),
    /// Connections the watcher accepts and hands to this worker (the
    /// `round-robin`, `least-connections` and `ip-hash` balancing modes).
    Balanced(BalancedListener),
}

impl Listener {
    /// Turns a listening descriptor for `address` into a listener on the
    /// current tokio runtime.
    pub(crate) fn from_fd(address: &Address, fd: OwnedFd) -> io::Result<Listener> {
        match address {
            Address::Tcp(_) => {
                let std = std::net::TcpListener::from(fd);
                // tokio requires non-blocking descriptors (a debug build panics otherwise).
                std.set_nonblocking(true)?;
                Ok(Listener::Tcp(TcpListener::from_std(std)?))
            }
            Address::Unix(_) => {
                let std = std::os::unix::net::UnixListener::from(fd);
                std.set_nonblocking(true)?;
                Ok(Listener::Unix(UnixListener::from_std(std)?))
            }
        }
    }

    /// Accepts one connection. Under a watcher run with `--max-requests`,
    /// each accepted connection counts as a request served.
    pub async fn accept(&self) -> io::Result<(Stream, PeerAddr)> {
        match self {
            Listener::Tcp(l) => {
                let (s, a) = l.accept().await?;
                REQUESTS.served();
                Ok((Stream::Tcp(s), PeerAddr::Tcp(a)))
            }
            Listener::Unix(l) => {
                let (s, a) = l.accept().await?;
                REQUESTS.served();
                Ok((Stream::Unix(s), PeerAddr::Unix(a)))
            }
            Listener::Balanced(l) => l.accept().await,
        }
    }

    /// The local TCP address, if this is a TCP listener (for a balanced
    /// listener, the watcher's).
    pub fn local_tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(_) => None,
            Listener::Balanced(l) => l.local_addr().parse().ok(),
        }
    }

    /// The tokio `TcpListener`, or `Err(self)` if this is not TCP (or the
    /// watcher hands off connections: serve with [`accept`](Listener::accept)).
    pub fn into_tcp(self) -> std::result::Result<TcpListener, Listener> {
        match self {
            Listener::Tcp(l) => Ok(l),
            other => Err(other),
        }
    }

    /// The tokio `UnixListener`, or `Err(self)` if this is not a Unix socket.
    pub fn into_unix(self) -> std::result::Result<UnixListener, Listener> {
        match self {
            Listener::Unix(l) => Ok(l),
            other => Err(other),
        }
    }
}

/// Requests served through this process's listeners, for `--max-requests`
/// (recycling): the worker link sets the limit and what to do once it is
/// reached (ask the watcher for a replacement, once).
pub(crate) struct RequestCounter {
    served: AtomicU64,
    /// 0: no limit.
    limit: AtomicU64,
    on_limit: OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
}

/// This process's request counter.
pub(crate) static REQUESTS: RequestCounter = RequestCounter {
    served: AtomicU64::new(0),
    limit: AtomicU64::new(0),
    on_limit: OnceLock::new(),
};

impl RequestCounter {
    /// Sets the limit and what happens when it is reached (the first call wins).
    pub(crate) fn set_limit(&self, limit: u64, on_limit: Box<dyn Fn(u64) + Send + Sync>) {
        if self.on_limit.set(on_limit).is_ok() {
            self.limit.store(limit, Ordering::Relaxed);
        }
    }

    /// Counts one request; calls the hook when the limit is reached.
    pub(crate) fn served(&self) {
        let n = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        let limit = self.limit.load(Ordering::Relaxed);
        if limit > 0 && n == limit {
            if let Some(f) = self.on_limit.get() {
                f(n);
            }
        }
    }
}

/// A connection handed off by the watcher, not yet accepted: the socket,
/// the client's address as the watcher saw it, and the watcher's id for it.
#[derive(Debug)]
pub(crate) struct Handed {
    pub fd: OwnedFd,
    pub peer: String,
    pub conn: u64,
}

/// What the balanced listeners ask of the IPC thread.
#[derive(Debug)]
pub(crate) enum ToIpc {
    /// Give a connection back to the watcher (it goes to another worker).
    GiveBack(u64, Handed),
    /// Connections were accepted: tell the watcher ([`Balanced::take_accepted`]).
    AcksDue,
}

/// The connections waiting for one balanced listener.
#[derive(Debug, Default)]
struct Queue {
    state: Mutex<QueueState>,
    ready: Notify,
}

#[derive(Debug, Default)]
struct QueueState {
    conns: VecDeque<Handed>,
    /// The listener was dropped: deliveries are refused.
    closed: bool,
    /// The watcher is gone: `accept` fails once the queue is empty.
    gone: bool,
}

/// A handed-off connection accepted by user code, watched for closing.
#[derive(Debug)]
struct Tracked {
    listener: u64,
    raw: RawFd,
    inode: (u64, u64),
}

/// How the balanced listeners reach the IPC thread.
pub(crate) type ToIpcFn = Box<dyn Fn(ToIpc) + Send + Sync>;

/// A worker's balanced listeners: their queues, the connections they
/// accepted (to acknowledge them, and to report closes), and the way to
/// the IPC thread.
pub(crate) struct Balanced {
    queues: Mutex<HashMap<u64, Arc<Queue>>>,
    tracked: Mutex<Vec<Tracked>>,
    /// Accepted and not yet acknowledged: (listener, connection id).
    accepted: Mutex<Vec<(u64, u64)>>,
    /// Set once the watcher grants a balanced listener: only then are
    /// accepted connections polled for closing.
    active: AtomicBool,
    to_ipc: ToIpcFn,
}

impl std::fmt::Debug for Balanced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balanced")
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

impl Balanced {
    pub(crate) fn new(to_ipc: ToIpcFn) -> Balanced {
        Balanced {
            queues: Mutex::new(HashMap::new()),
            tracked: Mutex::new(Vec::new()),
            accepted: Mutex::new(Vec::new()),
            active: AtomicBool::new(false),
            to_ipc,
        }
    }

    /// Accepted connections not acknowledged yet, by listener.
    pub(crate) fn take_accepted(&self) -> HashMap<u64, Vec<u64>> {
        let mut by_listener: HashMap<u64, Vec<u64>> = HashMap::new();
        if let Ok(mut accepted) = self.accepted.lock() {
            for (listener, conn) in accepted.drain(..) {
                by_listener.entry(listener).or_default().push(conn);
            }
        }
        by_listener
    }

    /// Whether any balanced listener was ever granted.
    pub(crate) fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Registers the listener `id` the watcher just granted, before the IPC
    /// thread reads the next message (connections may follow at once).
    pub(crate) fn register(
        self: &Arc<Self>,
        id: u64,
        address: &Address,
        local: String,
    ) -> BalancedListener {
        let queue = Arc::new(Queue::default());
        if let Ok(mut map) = self.queues.lock() {
            map.insert(id, queue.clone());
        }
        self.active.store(true, Ordering::Relaxed);
        BalancedListener {
            id,
            kind: address.stream_kind(),
            local,
            queue,
            set: self.clone(),
        }
    }

    /// Queues a connection for listener `id`. Returns it when nobody
    /// accepts there any more, for the caller to give back.
    pub(crate) fn deliver(&self, id: u64, handed: Handed) -> Option<Handed> {
        let queue = self.queues.lock().ok().and_then(|m| m.get(&id).cloned());
        let Some(queue) = queue else {
            return Some(handed);
        };
        {
            let Ok(mut state) = queue.state.lock() else {
                return Some(handed);
            };
            if state.closed {
                return Some(handed);
            }
            state.conns.push_back(handed);
        }
        queue.ready.notify_one();
        None
    }

    /// The watcher is gone: every `accept` fails once its queue is empty.
    pub(crate) fn watcher_gone(&self) {
        let queues: Vec<Arc<Queue>> = self
            .queues
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        for q in queues {
            if let Ok(mut state) = q.state.lock() {
                state.gone = true;
            }
            q.ready.notify_waiters();
            q.ready.notify_one();
        }
    }

    /// Accepted connections closed since the last call, per listener
    /// (a few `fstat` calls).
    pub(crate) fn closed_counts(&self) -> HashMap<u64, u32> {
        let mut closed = HashMap::new();
        if let Ok(mut tracked) = self.tracked.lock() {
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

    /// Records an accepted connection: acknowledged to the watcher at once
    /// (it stops keeping a copy), then watched for closing.
    fn track(&self, listener: u64, conn: u64, raw: RawFd) {
        let first = match self.accepted.lock() {
            Ok(mut accepted) => {
                accepted.push((listener, conn));
                accepted.len() == 1
            }
            Err(_) => false,
        };
        if first {
            (self.to_ipc)(ToIpc::AcksDue);
        }
        if let (Some(inode), Ok(mut tracked)) = (sys::inode_of(raw), self.tracked.lock()) {
            tracked.push(Tracked {
                listener,
                raw,
                inode,
            });
        }
    }
}

/// The listener behind [`Listener::Balanced`]: in the watcher's
/// `round-robin`, `least-connections` and `ip-hash` modes the watcher
/// accepts and hands each connection to a worker; `accept` yields them. The
/// watcher counts a connection closed once its socket is closed here
/// (dropped). Dropping the listener gives the connections handed to it but
/// not yet accepted back to the watcher, which hands them to another worker.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// // Under `cluster --balance round-robin`, listen returns a balanced listener.
/// let listener = cluster::Cluster::server_socket_factory().listen("127.0.0.1:8080").await?;
/// if let cluster::Listener::Balanced(balanced) = &listener {
///     println!("the watcher accepts on {}", balanced.local_addr());
/// }
/// # Ok(()) }
/// ```
pub struct BalancedListener {
    id: u64,
    kind: StreamKind,
    local: String,
    queue: Arc<Queue>,
    set: Arc<Balanced>,
}

impl std::fmt::Debug for BalancedListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalancedListener")
            .field("id", &self.id)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl BalancedListener {
    /// The watcher's listening address.
    pub fn local_addr(&self) -> &str {
        &self.local
    }

    /// Waits for the next connection the watcher hands to this worker.
    ///
    /// # Errors
    ///
    /// An error of kind `ConnectionAborted` once the watcher is gone (and
    /// every connection it handed over was accepted).
    pub async fn accept(&self) -> io::Result<(Stream, PeerAddr)> {
        let Handed { fd, peer, conn } = loop {
            let notified = self.queue.ready.notified();
            {
                let mut state = self
                    .queue
                    .state
                    .lock()
                    .map_err(|_| io::Error::other("balanced listener state poisoned"))?;
                if let Some(next) = state.conns.pop_front() {
                    if !state.conns.is_empty() {
                        // Another acceptor may be waiting for the rest.
                        self.queue.ready.notify_one();
                    }
                    break next;
                }
                if state.gone {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the watcher is gone",
                    ));
                }
            }
            notified.await;
        };
        let raw = fd.as_raw_fd();
        let stream = stream_from_fd(fd, Some(self.kind))?;
        let peer = match &stream {
            Stream::Tcp(s) => PeerAddr::Tcp(
                peer.parse()
                    .or_else(|_| s.peer_addr())
                    .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
            ),
            Stream::Unix(s) => PeerAddr::Unix(s.peer_addr()?),
        };
        self.set.track(self.id, conn, raw);
        REQUESTS.served();
        Ok((stream, peer))
    }
}

impl Drop for BalancedListener {
    fn drop(&mut self) {
        // Stop taking connections and give back those handed to us but not
        // accepted yet (a draining worker drops its listener): the watcher
        // hands them to another worker, so none is lost. Deliveries after
        // this see `closed` and are given back by the IPC thread.
        if let Ok(mut map) = self.set.queues.lock() {
            map.remove(&self.id);
        }
        let waiting: Vec<Handed> = match self.queue.state.lock() {
            Ok(mut state) => {
                state.closed = true;
                state.conns.drain(..).collect()
            }
            Err(_) => Vec::new(),
        };
        for handed in waiting {
            (self.set.to_ipc)(ToIpc::GiveBack(self.id, handed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn set() -> (Arc<Balanced>, mpsc::Receiver<ToIpc>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let to_ipc: ToIpcFn = Box::new(move |m| {
            let _ = tx.lock().unwrap().send(m);
        });
        (Arc::new(Balanced::new(to_ipc)), rx)
    }

    fn conn(id: u64) -> (Handed, std::os::unix::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let handed = Handed {
            fd: OwnedFd::from(a),
            peer: String::new(),
            conn: id,
        };
        (handed, b)
    }

    #[tokio::test]
    async fn delivered_connections_are_accepted_acknowledged_and_closes_counted() {
        let (set, to_ipc) = set();
        let addr = Address::Unix("/unused".into());
        let listener = set.register(7, &addr, "unix:///unused".into());
        let (handed, _peer) = conn(41);
        assert!(set.deliver(7, handed).is_none());
        let (stream, _) = listener.accept().await.unwrap();
        assert!(matches!(to_ipc.try_recv(), Ok(ToIpc::AcksDue)));
        assert_eq!(set.take_accepted().get(&7), Some(&vec![41]));
        assert!(set.closed_counts().is_empty());
        drop(stream);
        assert_eq!(set.closed_counts().get(&7), Some(&1));
    }

    #[tokio::test]
    async fn dropping_the_listener_gives_back_queued_and_later_connections() {
        let (set, back) = set();
        let addr = Address::Unix("/unused".into());
        let listener = set.register(3, &addr, String::new());
        let (first, _p1) = conn(1);
        assert!(set.deliver(3, first).is_none());
        drop(listener);
        assert!(
            matches!(
                back.try_recv(),
                Ok(ToIpc::GiveBack(3, Handed { conn: 1, .. }))
            ),
            "queued one given back"
        );
        let (second, _p2) = conn(2);
        assert!(set.deliver(3, second).is_some(), "refused after the drop");
    }

    #[tokio::test]
    async fn accept_fails_once_the_watcher_is_gone() {
        let (set, _back) = set();
        let addr = Address::Unix("/unused".into());
        let listener = set.register(1, &addr, String::new());
        let waiter = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
        tokio::task::yield_now().await;
        set.watcher_gone();
        let err = waiter.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }
}
