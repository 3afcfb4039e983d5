//! The state a worker process shares between the [`Cluster`](crate::Cluster)
//! API (user code, on any runtime) and the `cluster-ipc` thread that owns
//! the channel to the watcher: one `Arc<Shared>` given to both.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use crate::commands::handlers::Handlers;
use crate::error::{Error, Kind, Result};
use crate::ipc::message::{CallResult, JobOrder, RequestBody, ToWatcher};
use crate::listener::{Balanced, ToIpc};
use crate::log::{LogFilter, WorkerLogQueue};
use crate::transport::Waiters;

/// What user code asks the IPC thread to send.
pub(crate) enum Outgoing {
    Message(ToWatcher),
    Socket {
        addr: String,
        reply: oneshot::Sender<Result<Granted>>,
    },
    /// Send every queued log record, then acknowledge (at process exit).
    Flush(std::sync::mpsc::SyncSender<()>),
    /// A balanced listener's request: give a connection back, or
    /// acknowledge accepted ones.
    Balanced(ToIpc),
    /// A storage operation, watch or command for the watcher's hub; its
    /// waiter is registered in `Shared::waiters` under the id.
    Request(u64, RequestBody),
    /// End a watch.
    Unwatch(u64),
    /// A handler's answer to a command.
    CallResult(CallResult),
}

/// What the watcher granted for a `listen` request.
pub(crate) enum Granted {
    /// The listening socket itself (shared and reuseport modes).
    Fd(OwnedFd),
    /// Connections will be handed off (round-robin, least-connections,
    /// ip-hash); the listener was registered by the IPC thread before it
    /// read the next message.
    Balanced(crate::listener::BalancedListener),
}

/// What the IPC thread hands to `Cluster::jobs().run()`.
pub(crate) enum ToJobs {
    Run(JobOrder),
    Cancel(u64),
}

/// Heartbeat routing: while some task awaits `Cluster::await_termination()`
/// on the user's runtime, that future answers the watcher's pings, so a
/// blocked event loop stops answering. Otherwise the IPC thread answers.
pub(crate) struct Pings {
    pub awaiters: AtomicUsize,
    pub latest: watch::Sender<u64>,
}

/// Decrements the awaiter count when `await_termination` ends or is dropped.
pub(crate) struct AwaiterGuard(pub Arc<Shared>);

impl Drop for AwaiterGuard {
    fn drop(&mut self) {
        self.0.pings.awaiters.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A worker's connection to its watcher.
pub(crate) struct Shared {
    pub context_id: u64,
    pub slot: u32,
    /// To the IPC thread.
    pub tx: mpsc::UnboundedSender<Outgoing>,
    /// Becomes true when the watcher asks us to stop (or is gone).
    pub stop: watch::Receiver<bool>,
    pub ready_sent: AtomicBool,
    pub pings: Pings,
    pub logs: WorkerLogQueue,
    /// The watcher's log filter (`CLUSTER_LOG_FILTER`).
    pub log_filter: LogFilter,
    /// User messages from the watcher.
    pub inbox: tokio::sync::Mutex<mpsc::UnboundedReceiver<Vec<u8>>>,
    /// Balanced listeners (round-robin, least-connections, ip-hash).
    pub balanced: Arc<Balanced>,
    /// Where jobs go while `Cluster::jobs().run()` serves them.
    pub jobs: std::sync::Mutex<Option<mpsc::UnboundedSender<ToJobs>>>,
    /// `--name`/`--names`, from the environment.
    pub name: Option<String>,
    /// What `Cluster::set_status` set last.
    pub status: std::sync::Mutex<Option<String>>,
    /// This worker's command handlers.
    pub handlers: Arc<Handlers>,
    /// Storage, watch and command requests waiting for their replies.
    pub waiters: Waiters,
    /// A second descriptor of the channel: a request made while no other
    /// is in flight is sent from the caller's thread at once (one thread
    /// hop less on the way to the watcher).
    pub direct: Option<OwnedFd>,
}

impl Shared {
    /// Asks the watcher for the listener of `addr`.
    pub(crate) async fn request_socket(&self, addr: &str) -> Result<Granted> {
        let closed = || Error::new(Kind::Ipc, "the connection to the watcher is closed");
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Outgoing::Socket {
                addr: addr.to_string(),
                reply,
            })
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Sends a message to the watcher (queued for the IPC thread).
    pub(crate) fn send(&self, msg: ToWatcher) -> Result<()> {
        self.tx
            .send(Outgoing::Message(msg))
            .map_err(|_| Error::new(Kind::Ipc, "the connection to the watcher is closed"))
    }
}
