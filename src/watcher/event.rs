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
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::status::{Snapshot, StatusReport};
use crate::error::{Error, Result};
use crate::ipc::message::{ToWatcher, ToWorker};
use crate::ipc::RecvError;

/// Something a worker's tasks report.
pub(crate) enum Event {
    Message {
        context_id: u64,
        msg: ToWatcher,
        fds: Vec<OwnedFd>,
    },
    ChannelClosed {
        context_id: u64,
        error: RecvError,
    },
    Exited {
        context_id: u64,
        status: Option<ExitStatus>,
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
    /// A user message to one worker (by context id), or to all.
    Send { to: Option<u64>, bytes: Vec<u8> },
}

/// Where requests to the supervisor go.
pub(crate) type CommandSender = mpsc::UnboundedSender<Command>;

/// A message to a worker, with descriptors to attach.
pub(crate) struct Outbound {
    pub msg: ToWorker,
    pub fds: Vec<OwnedFd>,
}

impl Outbound {
    /// A message without descriptors.
    pub(crate) fn msg(msg: ToWorker) -> Outbound {
        Outbound {
            msg,
            fds: Vec::new(),
        }
    }
}

/// A worker's writer queue.
pub(crate) type OutboundSender = mpsc::UnboundedSender<Outbound>;

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
    Failed(Error),
}
