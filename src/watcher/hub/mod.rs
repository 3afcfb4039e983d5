//! The hub: shared storage and the command router, held by the watcher.
//!
//! One lock guards the store, the watches and the routing table, so every
//! storage operation is atomic against every other and every watch sees
//! the changes in the store's order. Workers' requests do not go through
//! the supervisor: each worker's reader task hands its `Requests` and
//! `CallResults` to [`Hub::handle`] as they arrive and the replies go
//! straight to that worker's writer queue (one task hop fewer per round
//! trip, and a worker that floods requests is slowed down by its own
//! socket instead of growing a queue in the watcher). The watcher's own
//! code ([`ClusterWatcher::storage`](crate::ClusterWatcher::storage)) and
//! the control socket use the same hub through the [`Transport`] trait.
//!
//! The supervisor attaches a worker when it starts and detaches it when
//! its channel closes or it exits ("target died" for its calls). A timer
//! task ([`timers`]) expires keys and calls, samples the operation rate
//! and writes `--storage-file` snapshots.

mod inner;
pub(crate) mod timers;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::commands::handlers::{Handlers, Ran};
use crate::commands::router::{watcher_responder, Caller, Peer, RunLocal};
use crate::commands::MAX_COMMAND_TIMEOUT;
use crate::error::Result;
use crate::ipc::message::{
    CallResult, HubError, HubErrorKind, Reply, RequestBody, TargetSpec, ToWatcher, ToWorker,
    MAX_MESSAGE, MAX_REQUESTS, MAX_VALUE,
};
use crate::storage::persist;
use crate::transport::{hub_error, Fed, Replier, Transport, Waiting};
use crate::watcher::event::OutboundSender;
use crate::watcher::status::HubStats;
use inner::{Inner, Sink};

/// Default `--storage-max-bytes`.
pub(crate) const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;

/// Longest command or target name.
const MAX_NAME: usize = 256;

/// Longest error text a worker's handler may send.
const MAX_ERROR: usize = 4096;

/// Weighed bytes waiting in a worker's queue past which its reader stops
/// reading its requests (it does not read its replies).
pub(crate) const MAX_BACKLOG: usize = 16 * 1024 * 1024;

/// The storage settings.
#[derive(Debug, Clone)]
pub(crate) struct StorageSettings {
    pub max_bytes: usize,
    pub init: Option<PathBuf>,
    pub file: Option<PathBuf>,
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            max_bytes: DEFAULT_MAX_BYTES,
            init: None,
            file: None,
        }
    }
}

/// The watcher's shared state and command router.
pub(crate) struct Hub {
    inner: Mutex<Inner>,
    handlers: Arc<Handlers>,
    settings: StorageSettings,
    /// Wakes the timer task when a deadline may have moved earlier.
    wake: Notify,
    me: Weak<Hub>,
}

/// The worker a message came from.
#[derive(Clone, Copy)]
pub(crate) struct Origin<'a> {
    pub context_id: u64,
    pub outbound: &'a OutboundSender,
}

impl Hub {
    pub(crate) fn new(settings: StorageSettings) -> Arc<Hub> {
        Arc::new_cyclic(|me| Hub {
            inner: Mutex::new(Inner::new(settings.max_bytes)),
            handlers: Arc::new(Handlers::default()),
            settings,
            wake: Notify::new(),
            me: me.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the store half
        // written (every write is checked before it changes anything).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The watcher's own command handlers.
    pub(crate) fn handlers(&self) -> Arc<Handlers> {
        self.handlers.clone()
    }

    /// Loads `--storage-file` (when it exists) or `--storage-init`.
    pub(crate) fn load(&self) -> Result<()> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.closed = false;
        if let Some(file) = &self.settings.file {
            if persist::load_snapshot(&mut inner.store, file, now)? {
                let c = inner.store.counts();
                tracing::info!(
                    "storage: loaded {} key(s), {} bytes from {}",
                    c.keys,
                    c.bytes,
                    file.display()
                );
                return Ok(());
            }
        }
        if let Some(init) = &self.settings.init {
            persist::load_init(&mut inner.store, init)?;
            // The initial data is written to the storage file at once.
            inner.dirty = self.settings.file.is_some();
        }
        Ok(())
    }

    /// Whether `msg` is the hub's to handle.
    pub(crate) fn takes(msg: &ToWatcher) -> bool {
        matches!(msg, ToWatcher::Requests(_) | ToWatcher::CallResults(_))
    }

    /// Handles a message from a worker if it is the hub's (requests and
    /// call results); gives any other message back.
    pub(crate) fn handle(&self, origin: Origin<'_>, msg: ToWatcher) -> Option<ToWatcher> {
        match msg {
            ToWatcher::Requests(requests) => {
                self.requests(origin, requests);
                None
            }
            ToWatcher::CallResults(results) => {
                let mut inner = self.lock();
                for r in results {
                    let result = checked_result(r);
                    inner.router.answer(result.0, origin.context_id, result.1);
                }
                None
            }
            other => Some(other),
        }
    }

    fn requests(&self, origin: Origin<'_>, requests: Vec<crate::ipc::message::Request>) {
        let now = Instant::now();
        let mut replies = Vec::with_capacity(requests.len());
        let mut local = Vec::new();
        let mut wake = false;
        {
            let mut inner = self.lock();
            inner.expire(now);
            for (i, req) in requests.into_iter().enumerate() {
                let id = req.id;
                let result = if i >= MAX_REQUESTS {
                    Err(hub_error(
                        HubErrorKind::Busy,
                        format!("more than {MAX_REQUESTS} requests in one message"),
                    ))
                } else if inner.closed {
                    Err(hub_error(HubErrorKind::Closed, "the watcher is stopping"))
                } else {
                    match req.body {
                        RequestBody::Storage(op) => {
                            wake |= matches!(
                                &op,
                                crate::ipc::message::StorageOp::Set {
                                    ttl_ms: Some(_),
                                    ..
                                }
                            );
                            inner.storage(op, now, Some(MAX_VALUE))
                        }
                        RequestBody::Watch { prefix } => {
                            let sink = Sink::Worker(origin.outbound.clone());
                            inner.watch(origin.context_id, id, &prefix, sink)
                        }
                        RequestBody::Unwatch { watch } => {
                            inner.watches.remove(origin.context_id, watch);
                            Ok(crate::ipc::message::ReplyBody::Done(true))
                        }
                        RequestBody::Call {
                            target,
                            name,
                            args,
                            timeout_ms,
                        } => {
                            let caller = Caller::Worker {
                                context_id: origin.context_id,
                                outbound: origin.outbound.clone(),
                                id,
                            };
                            let from = inner.router.responder(origin.context_id);
                            let timeout =
                                Duration::from_millis(timeout_ms).min(MAX_COMMAND_TIMEOUT);
                            let resolved = inner
                                .router
                                .check_room(origin.context_id)
                                .and_then(|()| resolve_call(&inner, &target, &name, &args));
                            match resolved {
                                Ok(targets) => {
                                    let runs = inner
                                        .router
                                        .start(caller, from, targets, name, args, timeout, now);
                                    local.extend(runs);
                                    wake = true;
                                    continue; // answered when the target answers
                                }
                                Err(e) => Err(e),
                            }
                        }
                    }
                };
                replies.push(Reply { id, result });
            }
            inner.flush_changes();
        }
        send_replies(origin.outbound, replies);
        self.run_local(local);
        if wake {
            self.wake.notify_one();
        }
    }

    /// Runs the calls addressed to the watcher: its own handlers, else the
    /// built-in `ping` and `status`.
    fn run_local(&self, runs: Vec<RunLocal>) {
        for run in runs {
            let call = run.call;
            let me = self.me.clone();
            let ran = self.handlers.run(&run.name, run.args, move |result| {
                if let Some(hub) = me.upgrade() {
                    hub.lock().router.answer(call, 0, result);
                }
            });
            let result = match (ran, run.name.as_str()) {
                (Ran::Now(result), _) => result,
                (Ran::Later, _) => continue,
                (Ran::Missing(_), name) => self.builtin(name),
            };
            self.lock().router.answer(call, 0, result);
        }
    }

    /// The watcher's built-in commands.
    fn builtin(&self, name: &str) -> std::result::Result<String, HubError> {
        {
            let result = match name {
                "ping" => Ok("\"pong\"".to_string()),
                "status" => Ok(self.status_json()),
                other => Err(hub_error(
                    HubErrorKind::UnknownCommand,
                    format!("the watcher has no handler for {other:?}"),
                )),
            };
            result
        }
    }

    /// The watcher's answer to the built-in `status` command.
    fn status_json(&self) -> String {
        let inner = self.lock();
        let me = watcher_responder();
        let c = inner.store.counts();
        let workers: Vec<serde_json::Value> = inner
            .router
            .peers()
            .into_iter()
            .map(|p| {
                serde_json::json!({
                    "slot": p.slot, "name": p.name, "pid": p.pid, "context_id": p.context_id,
                })
            })
            .collect();
        serde_json::json!({
            "name": me.name,
            "pid": me.pid,
            "workers": workers,
            "storage": { "keys": c.keys, "bytes": c.bytes },
        })
        .to_string()
    }

    /// A worker started: it can be called.
    pub(crate) fn attach(&self, context_id: u64, peer: Peer) {
        self.lock().router.attach(context_id, peer);
    }

    /// A worker's channel closed, or it exited: its calls end with "target
    /// died", its watches end.
    pub(crate) fn detach(&self, context_id: u64, why: &str) {
        let mut inner = self.lock();
        inner.router.detach(context_id, why);
        inner.watches.remove_owner(context_id);
    }

    /// Commands sent and received by worker `context_id`.
    pub(crate) fn call_counts(&self, context_id: u64) -> crate::commands::router::CallCounts {
        self.lock().router.counts(context_id)
    }

    /// The storage's size and operation counts.
    pub(crate) fn stats(&self) -> HubStats {
        self.lock().stats()
    }

    /// The watcher stops: waiting local callers and watches end, and the
    /// last snapshot is written.
    pub(crate) fn close(&self) {
        let snapshot = {
            let mut inner = self.lock();
            inner.closed = true;
            inner.router.close();
            inner.end_local_watches();
            inner.take_snapshot(Instant::now())
        };
        if let (Some(text), Some(file)) = (snapshot, &self.settings.file) {
            if let Err(e) = persist::write_atomic(file, text.as_bytes()) {
                tracing::error!("storage: cannot write {}: {e}", file.display());
            }
        }
    }
}

/// A worker's call result, bounded: an over-long result or error text
/// becomes an error, and a worker can only report handler failures.
fn checked_result(r: CallResult) -> (u64, std::result::Result<String, HubError>) {
    let result = match r.result {
        Ok(text) if text.len() > MAX_VALUE => Err(hub_error(
            HubErrorKind::TooLarge,
            format!(
                "the reply of {} bytes exceeds {MAX_VALUE} bytes",
                text.len()
            ),
        )),
        Ok(text) => Ok(text),
        Err(mut e) => {
            if e.message.len() > MAX_ERROR {
                let mut cut = MAX_ERROR;
                while !e.message.is_char_boundary(cut) {
                    cut -= 1;
                }
                e.message.truncate(cut);
            }
            if !matches!(
                e.kind,
                HubErrorKind::Handler | HubErrorKind::UnknownCommand | HubErrorKind::TooLarge
            ) {
                e.kind = HubErrorKind::Handler;
            }
            Err(e)
        }
    };
    (r.call, result)
}

/// Checks a call's name, target and arguments and resolves the target.
fn resolve_call(
    inner: &Inner,
    target: &TargetSpec,
    name: &str,
    args: &str,
) -> std::result::Result<Vec<u64>, HubError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(hub_error(
            HubErrorKind::UnknownCommand,
            format!("a command name has 1 to {MAX_NAME} bytes"),
        ));
    }
    if matches!(target, TargetSpec::Name(n) if n.len() > MAX_NAME) {
        return Err(hub_error(
            HubErrorKind::UnknownTarget,
            "no worker has so long a name",
        ));
    }
    if args.len() > MAX_VALUE {
        return Err(hub_error(
            HubErrorKind::TooLarge,
            format!("arguments of {} bytes exceed {MAX_VALUE} bytes", args.len()),
        ));
    }
    inner.router.resolve(target)
}

/// Sends `replies` to a worker in as few messages as fit.
fn send_replies(outbound: &OutboundSender, replies: Vec<Reply>) {
    let budget = MAX_MESSAGE - 2048;
    let mut chunk = Vec::new();
    let mut weight = 0;
    for reply in replies {
        let w = crate::commands::router::reply_weight(&reply.result);
        if !chunk.is_empty() && weight + w > budget {
            let msg = ToWorker::Replies(std::mem::take(&mut chunk));
            outbound.send_now(msg, weight);
            weight = 0;
        }
        weight += w;
        chunk.push(reply);
    }
    if !chunk.is_empty() {
        outbound.send_now(ToWorker::Replies(chunk), weight);
    }
}

impl Transport for Hub {
    fn submit(&self, body: RequestBody, reply: Replier) {
        let now = Instant::now();
        let mut inner = self.lock();
        if inner.closed {
            drop(inner);
            Waiting::new(reply).fail(hub_error(
                HubErrorKind::Closed,
                "the watcher is not running",
            ));
            return;
        }
        inner.expire(now);
        match (body, reply) {
            (RequestBody::Storage(op), reply) => {
                let result = inner.storage(op, now, None);
                inner.flush_changes();
                drop(inner);
                let _ = Waiting::new(reply).feed(0, result);
            }
            (RequestBody::Watch { prefix }, Replier::Watch { reply, sink }) => {
                inner.next_local += 1;
                let id = inner.next_local;
                let result = inner.watch(0, id, &prefix, Sink::Local(sink)).map(|_| id);
                let _ = reply.send(result);
            }
            (
                RequestBody::Call {
                    target,
                    name,
                    args,
                    timeout_ms,
                },
                reply,
            ) => {
                let waiting = Waiting::new(reply);
                let timeout = Duration::from_millis(timeout_ms).min(MAX_COMMAND_TIMEOUT);
                match resolve_call(&inner, &target, &name, &args) {
                    Err(e) => {
                        drop(inner);
                        answer_now(waiting, e);
                    }
                    Ok(targets) => {
                        let caller = Caller::Local(waiting);
                        let runs = inner
                            .router
                            .start(caller, None, targets, name, args, timeout, now);
                        drop(inner);
                        self.run_local(runs);
                        self.wake.notify_one();
                    }
                }
            }
            (body, reply) => {
                drop(inner);
                Waiting::new(reply).fail(hub_error(
                    HubErrorKind::Closed,
                    format!("not a request the watcher takes from itself: {body:?}"),
                ));
            }
        }
    }

    fn unwatch(&self, watch: u64) {
        self.lock().watches.remove(0, watch);
    }

    fn value_limit(&self) -> Option<usize> {
        None
    }
}

/// Answers a local waiter with an error at once.
fn answer_now(waiting: Waiting, e: HubError) {
    if let Fed::More(w) = waiting.feed(0, Err(e.clone())) {
        w.fail(e);
    }
}
