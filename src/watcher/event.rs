//! What reaches the supervisor, and what it sends: a leaf module shared by
//! the supervisor and everything that talks to it.
//!
//! * [`Command`]: every request from outside the supervisor — the
//!   [`ClusterWatcher`](super::ClusterWatcher) methods, signals (mapped in
//!   `ClusterWatcher::run`), the control socket, the metrics responder and
//!   the reload triggers — on one channel, handled in one place.
//! * [`Event`]: what a worker's tasks report (a message, a broken channel,
//!   an exit).
//! * [`Outbound`]: a message for one worker, queued to its writer task.

use std::os::fd::OwnedFd;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::status::{JobsStatus, Snapshot, StatusReport};
use super::upgrade::UpgradeEvent;
use crate::error::{Error, Result};
use crate::ipc::message::{ToWatcher, ToWorker};
use crate::ipc::{Channel, RecvError};
use crate::log::LogBatch;

/// Something a worker's tasks report.
pub(crate) enum Event {
    Message {
        context_id: u64,
        msg: ToWatcher,
        fds: Vec<OwnedFd>,
    },
    /// A `Logs` message, checked and kept as it came (see `log::batch`).
    Logs {
        context_id: u64,
        batch: LogBatch,
    },
    ChannelClosed {
        context_id: u64,
        error: RecvError,
    },
    Exited {
        context_id: u64,
        status: Option<ExitStatus>,
    },
    /// The other watcher of an upgrade said something, or exited.
    Upgrade(UpgradeEvent),
    /// The worker said something new on its notify socket (`--notify`):
    /// read its `NotifyState`.
    Notify {
        context_id: u64,
    },
}

/// Where worker tasks send their events.
pub(crate) type EventSender = mpsc::UnboundedSender<Event>;

/// A change in the number of workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scale {
    Up,
    Down,
    To(usize),
}

/// A request to the supervisor.
pub(crate) enum Command {
    /// Stop gracefully: stop message, SIGTERM, SIGKILL after `timeout`
    /// (`None`: the configured shutdown timeout).
    Stop { timeout: Option<Duration> },
    /// Kill every worker at once and stop.
    Kill,
    /// The workers, for `cluster status` and `ClusterWatcher::workers`.
    Status(oneshot::Sender<StatusReport>),
    /// The counters, for one metrics scrape.
    Snapshot(oneshot::Sender<Snapshot>),
    /// A rolling restart (`reason` is logged); `done` gets its result.
    Restart {
        reason: String,
        done: Option<oneshot::Sender<Result<()>>>,
    },
    Scale {
        to: Scale,
        done: Option<oneshot::Sender<Result<usize>>>,
    },
    /// Upgrade the watcher itself (SIGUSR2, `cluster upgrade`): `done`
    /// gets the new watcher's pid once it serves, or why it was rolled back.
    Upgrade {
        done: Option<oneshot::Sender<Result<u32>>>,
    },
    /// A user message to one worker (by context id), or to all.
    Send { to: Option<u64>, bytes: Vec<u8> },
    /// Kill one worker now (a job it does not let go of).
    KillWorker { context_id: u64, why: String },
    /// The job dispatcher's counters (the reply is dropped when the
    /// watcher runs no jobs); with the store's counts when `counts`.
    JobsStatus {
        reply: oneshot::Sender<JobsStatus>,
        counts: bool,
    },
    /// Replace one ready worker through the rolling-restart path
    /// (`--max-memory`, `--max-requests`); `why` is logged.
    Recycle { context_id: u64, why: String },
    /// Reopen the log file (`--log-file`) after logrotate moved it.
    ReopenLogs(oneshot::Sender<Result<()>>),
    /// Stop one worker (`cluster stop --slot/--name`): at once when its
    /// status is `idle`, else asked to and killed after `timeout`.
    StopWorker {
        which: WorkerSelector,
        timeout: Option<Duration>,
        done: oneshot::Sender<Result<StoppedWorker>>,
    },
}

/// Which worker: by slot or by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WorkerSelector {
    Slot(u32),
    Name(String),
}

/// The worker a `StopWorker` stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StoppedWorker {
    pub slot: u32,
    pub pid: u32,
    pub context_id: u64,
    /// It was idle: stopped at once.
    pub at_once: bool,
}

/// Where requests to the supervisor go.
pub(crate) type CommandSender = mpsc::UnboundedSender<Command>;

/// A message to a worker, with descriptors to attach.
pub(crate) struct Outbound {
    pub msg: ToWorker,
    pub fds: Vec<OwnedFd>,
    /// About how many bytes it takes (counted for the messages that can be
    /// large: replies, commands, changes; 0 for the rest).
    pub weight: usize,
}

impl Outbound {
    /// A message without descriptors.
    pub(crate) fn msg(msg: ToWorker) -> Outbound {
        Outbound {
            msg,
            fds: Vec::new(),
            weight: 0,
        }
    }

    /// A message of about `weight` bytes.
    pub(crate) fn weighed(msg: ToWorker, weight: usize) -> Outbound {
        Outbound {
            msg,
            fds: Vec::new(),
            weight,
        }
    }
}

/// How many messages, descriptors and (weighed) bytes wait in one
/// worker's writer queue.
#[derive(Debug, Default)]
struct Queued {
    messages: AtomicUsize,
    fds: AtomicUsize,
    bytes: AtomicUsize,
}

/// A worker's writer queue. It counts what waits in it, so that a worker
/// that stops reading its channel cannot make the watcher hold descriptors
/// (or memory) without bound: the callers check [`queued_fds`](Self::queued_fds)
/// before attaching more, and the supervisor kills a worker whose queue
/// passes [`MAX_QUEUED_MESSAGES`].
#[derive(Debug, Clone)]
pub(crate) struct OutboundSender {
    tx: mpsc::UnboundedSender<Outbound>,
    queued: Arc<Queued>,
    /// The worker's channel, for [`send_now`](Self::send_now).
    direct: Option<Arc<Channel>>,
}

/// The writer task's end of an [`OutboundSender`].
pub(crate) struct OutboundReceiver {
    rx: mpsc::UnboundedReceiver<Outbound>,
    queued: Arc<Queued>,
}

/// Descriptors that may wait for one worker (listener duplicates and
/// handed-off connections) before the watcher stops adding more.
pub(crate) const MAX_QUEUED_FDS: usize = 256;

/// Messages that may wait for one worker before it counts as not reading
/// its channel (and is replaced).
pub(crate) const MAX_QUEUED_MESSAGES: usize = 65_536;

/// A new writer queue.
pub(crate) fn outbound() -> (OutboundSender, OutboundReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(Queued::default());
    (
        OutboundSender {
            tx,
            queued: queued.clone(),
            direct: None,
        },
        OutboundReceiver { rx, queued },
    )
}

/// A new writer queue for `channel`, whose messages without descriptors
/// may also be written at once ([`OutboundSender::send_now`]).
pub(crate) fn outbound_for(channel: Arc<Channel>) -> (OutboundSender, OutboundReceiver) {
    let (mut tx, rx) = outbound();
    tx.direct = Some(channel);
    (tx, rx)
}

impl OutboundSender {
    /// Queues `out`; gives it back when the writer is gone (the worker is
    /// exiting).
    pub(crate) fn send(&self, out: Outbound) -> Result<(), Outbound> {
        let (fds, weight) = (out.fds.len(), out.weight);
        self.queued.messages.fetch_add(1, Ordering::Relaxed);
        self.queued.fds.fetch_add(fds, Ordering::Relaxed);
        self.queued.bytes.fetch_add(weight, Ordering::Relaxed);
        self.tx.send(out).map_err(|mpsc::error::SendError(back)| {
            self.queued.messages.fetch_sub(1, Ordering::Relaxed);
            self.queued.fds.fetch_sub(fds, Ordering::Relaxed);
            self.queued.bytes.fetch_sub(weight, Ordering::Relaxed);
            back
        })
    }

    /// Writes `msg` to the worker's socket right now when nothing waits in
    /// the queue (so it overtakes nothing) and the socket has room; else
    /// queues it like [`send`](Self::send). Saves the writer task's hop on
    /// the paths where latency matters (replies, commands).
    pub(crate) fn send_now(&self, msg: ToWorker, weight: usize) {
        if let Some(channel) = &self.direct {
            // An encoding error is left to the writer, as for any message.
            if self.queued.messages.load(Ordering::Acquire) == 0 {
                if let Ok(bytes) = crate::ipc::codec::encode(&msg) {
                    match channel.try_send_bytes(&bytes) {
                        Ok(()) => return,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        // The worker is gone or going; its exit follows.
                        Err(_) => return,
                    }
                }
            }
        }
        let _ = self.send(Outbound::weighed(msg, weight));
    }

    /// Weighed bytes queued and not yet written.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued.bytes.load(Ordering::Relaxed)
    }

    /// Descriptors queued and not yet written to the worker's socket.
    pub(crate) fn queued_fds(&self) -> usize {
        self.queued.fds.load(Ordering::Relaxed)
    }

    /// Messages queued and not yet written.
    pub(crate) fn queued_messages(&self) -> usize {
        self.queued.messages.load(Ordering::Relaxed)
    }
}

impl OutboundReceiver {
    /// The next message to write; the caller calls [`written`](Self::written) after.
    pub(crate) async fn recv(&mut self) -> Option<Outbound> {
        self.rx.recv().await
    }

    /// The next message if one is queued.
    #[cfg(test)]
    pub(crate) fn try_recv(&mut self) -> Option<Outbound> {
        self.rx.try_recv().ok()
    }

    /// One message with `fds` descriptors and `weight` left the queue.
    pub(crate) fn written(&self, fds: usize, weight: usize) {
        self.queued.messages.fetch_sub(1, Ordering::Relaxed);
        self.queued.fds.fetch_sub(fds, Ordering::Relaxed);
        self.queued.bytes.fetch_sub(weight, Ordering::Relaxed);
    }
}

/// A user message from a worker, before the handle attaches a reply path.
pub(crate) struct Incoming {
    pub slot: u32,
    pub context_id: u64,
    pub pid: u32,
    pub bytes: Vec<u8>,
}

/// Messages from workers that may wait for `ClusterWatcher::messages`.
pub(crate) const MESSAGE_QUEUE: usize = 4096;

/// How the supervisor ended.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Stopped,
    /// Stopped after handing over to the new watcher (its pid).
    Upgraded(u32),
    Failed(Error),
}
