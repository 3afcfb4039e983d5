//! The one seam between the shared-state APIs ([`Storage`](crate::Storage),
//! commands) and where their requests go: in a worker, over its socketpair
//! to the watcher (`worker/hub_link.rs`); in the watcher, straight into
//! the hub (`watcher/hub/`). A leaf: both sides and both APIs use it,
//! so the public types are written once for workers and watcher alike.
//!
//! A request is submitted with a [`Replier`] that gets its answer; nothing
//! here awaits, so submitting never blocks and costs one queue push.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Kind};
use crate::ipc::message::{Answer, Change, HubError, HubErrorKind, ReplyBody, RequestBody};

/// Where requests go.
pub(crate) trait Transport: Send + Sync {
    /// Sends `body`; `reply` gets the answer (dropped unanswered when the
    /// other side is gone).
    fn submit(&self, body: RequestBody, reply: Replier);

    /// Ends watch `watch` (a [`Replier::Watch`] answered with that id).
    fn unwatch(&self, watch: u64);

    /// The largest value (JSON text) one request may carry, if there is a
    /// limit (a worker's requests travel in one message each).
    fn value_limit(&self) -> Option<usize>;
}

/// Who waits for a request's answer.
pub(crate) enum Replier {
    /// One reply.
    One(oneshot::Sender<Result<ReplyBody, HubError>>),
    /// Every answer to a command (one per worker for all workers).
    Answers(oneshot::Sender<Result<Vec<Answer>, HubError>>),
    /// A watch: its id once it runs, then its changes into `sink`.
    Watch {
        reply: oneshot::Sender<Result<u64, HubError>>,
        sink: WatchSink,
    },
}

/// A request whose answers are still coming.
pub(crate) struct Waiting {
    replier: Replier,
    answers: Vec<Answer>,
}

impl Waiting {
    pub(crate) fn new(replier: Replier) -> Waiting {
        Waiting {
            replier,
            answers: Vec::new(),
        }
    }

    /// Feeds one reply to the waiter. `Some` when more replies are due (a
    /// command to every worker); a `Watch` is answered with `id` and its
    /// sink given back, to be registered under it.
    pub(crate) fn feed(mut self, id: u64, result: Result<ReplyBody, HubError>) -> Fed {
        match self.replier {
            Replier::One(tx) => {
                let _ = tx.send(result);
                Fed::Done
            }
            Replier::Answers(tx) => match result {
                Ok(ReplyBody::Answer { answer, remaining }) => {
                    self.answers.push(answer);
                    if remaining == 0 {
                        let _ = tx.send(Ok(self.answers));
                        Fed::Done
                    } else {
                        self.replier = Replier::Answers(tx);
                        Fed::More(self)
                    }
                }
                Ok(other) => {
                    let _ = tx.send(Err(unexpected(&other)));
                    Fed::Done
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    Fed::Done
                }
            },
            Replier::Watch { reply, sink } => match result {
                Ok(ReplyBody::Done(true)) => {
                    if reply.send(Ok(id)).is_ok() {
                        Fed::Watching(sink)
                    } else {
                        Fed::Done // nobody wants it any more
                    }
                }
                Ok(other) => {
                    let _ = reply.send(Err(unexpected(&other)));
                    Fed::Done
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                    Fed::Done
                }
            },
        }
    }

    /// The other side is gone: fails the waiter.
    pub(crate) fn fail(self, why: HubError) {
        match self.replier {
            Replier::One(tx) => {
                let _ = tx.send(Err(why));
            }
            Replier::Answers(tx) => {
                let _ = tx.send(Err(why));
            }
            Replier::Watch { reply, .. } => {
                let _ = reply.send(Err(why));
            }
        }
    }
}

/// What feeding a reply did.
pub(crate) enum Fed {
    Done,
    More(Waiting),
    Watching(WatchSink),
}

fn unexpected(body: &ReplyBody) -> HubError {
    HubError {
        kind: HubErrorKind::Closed,
        message: format!("unexpected answer from the watcher: {body:?}"),
    }
}

/// Changes a watch may hold unread before it ends as lagged.
pub(crate) const WATCH_BACKLOG: usize = 4096;

/// What a watch's stream yields: a change, or why it ended.
pub(crate) type WatchItem = Result<Change, HubError>;

/// The sending end of a watch's stream: never blocks; a reader that falls
/// [`WATCH_BACKLOG`] changes behind gets a last "lagged" item and the
/// watch ends.
#[derive(Clone)]
pub(crate) struct WatchSink {
    tx: mpsc::UnboundedSender<WatchItem>,
    queued: Arc<AtomicUsize>,
}

/// The reading end.
pub(crate) struct WatchSource {
    rx: mpsc::UnboundedReceiver<WatchItem>,
    queued: Arc<AtomicUsize>,
}

/// A new watch stream.
pub(crate) fn watch_stream() -> (WatchSink, WatchSource) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        WatchSink {
            tx,
            queued: queued.clone(),
        },
        WatchSource { rx, queued },
    )
}

impl WatchSink {
    /// Delivers `change`; `false` when the watch is over (its reader is
    /// gone, or lagged: it got a last error item).
    pub(crate) fn deliver(&self, change: Change) -> bool {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= WATCH_BACKLOG {
            self.end(HubError {
                kind: HubErrorKind::Busy,
                message: format!(
                    "the watch fell {WATCH_BACKLOG} changes behind and was ended (lagged)"
                ),
            });
            return false;
        }
        self.tx.send(Ok(change)).is_ok()
    }

    /// Ends the stream with `why`.
    pub(crate) fn end(&self, why: HubError) {
        let _ = self.tx.send(Err(why));
    }
}

impl WatchSource {
    /// The next item; `None` once the watch is over.
    pub(crate) async fn recv(&mut self) -> Option<WatchItem> {
        let item = self.rx.recv().await?;
        self.queued.fetch_sub(1, Ordering::Relaxed);
        Some(item)
    }
}

/// The error a caller sees for `e`.
pub(crate) fn to_error(e: HubError) -> Error {
    let kind = match e.kind {
        HubErrorKind::Storage => Kind::Storage,
        HubErrorKind::StorageFull => Kind::StorageFull,
        HubErrorKind::TooLarge => Kind::TooLarge,
        HubErrorKind::UnknownTarget => Kind::UnknownTarget,
        HubErrorKind::UnknownCommand => Kind::UnknownCommand,
        HubErrorKind::Timeout => Kind::Timeout,
        HubErrorKind::TargetDied => Kind::TargetDied,
        HubErrorKind::Handler => Kind::Handler,
        HubErrorKind::Busy => Kind::Busy,
        HubErrorKind::Closed => Kind::Closed,
    };
    Error::new(kind, e.message)
}

/// A [`HubError`] of `kind`.
pub(crate) fn hub_error(kind: HubErrorKind, message: impl Into<String>) -> HubError {
    HubError {
        kind,
        message: message.into(),
    }
}

/// Waits for a oneshot answer; a dropped sender means the other side went
/// away before answering.
pub(crate) async fn answer<T>(
    rx: oneshot::Receiver<Result<T, HubError>>,
) -> crate::error::Result<T> {
    match rx.await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_error(e)),
        Err(_) => Err(Error::closed(
            "no answer: the connection to the watcher is closed",
        )),
    }
}

/// Requests waiting for their answers, shared by the threads that send
/// them and the one that reads the answers; with the count of those in
/// flight (a caller that finds none may send its request straight away,
/// nothing can overtake or be overtaken).
#[derive(Default)]
pub(crate) struct Waiters {
    next: std::sync::atomic::AtomicU64,
    in_flight: AtomicUsize,
    map: std::sync::Mutex<std::collections::HashMap<u64, Waiting>>,
}

impl Waiters {
    /// Registers `reply` under a new id; returns it and whether nothing
    /// else was in flight.
    pub(crate) fn add(&self, reply: Replier) -> (u64, bool) {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        if let Ok(mut m) = self.map.lock() {
            m.insert(id, Waiting::new(reply));
        }
        let alone = self.in_flight.fetch_add(1, Ordering::AcqRel) == 0;
        (id, alone)
    }

    /// A new id for a request nobody waits for.
    pub(crate) fn id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Feeds a reply to the waiter of `id`; returns what a `Watch` needs
    /// registered. Unknown ids (nobody waits) are ignored.
    pub(crate) fn feed(&self, id: u64, result: Result<ReplyBody, HubError>) -> Option<WatchSink> {
        let waiting = self.map.lock().ok()?.remove(&id)?;
        match waiting.feed(id, result) {
            Fed::More(w) => {
                if let Ok(mut m) = self.map.lock() {
                    m.insert(id, w);
                }
                None
            }
            Fed::Done => {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                None
            }
            Fed::Watching(sink) => {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                Some(sink)
            }
        }
    }

    /// Fails the waiter of `id` (its request could not be sent).
    pub(crate) fn fail(&self, id: u64, why: HubError) {
        let waiting = self.map.lock().ok().and_then(|mut m| m.remove(&id));
        if let Some(w) = waiting {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            w.fail(why);
        }
    }

    /// Fails every waiter (the other side is gone).
    pub(crate) fn fail_all(&self, why: &HubError) {
        let all: Vec<Waiting> = match self.map.lock() {
            Ok(mut m) => m.drain().map(|(_, w)| w).collect(),
            Err(_) => return,
        };
        for w in all {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            w.fail(why.clone());
        }
    }
}
