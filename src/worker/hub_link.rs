//! A worker's side of shared storage and commands.
//!
//! [`WorkerLink`] is the [`Transport`] the API uses in a worker: a request
//! is queued for the IPC thread (one channel push, never blocking). The
//! IPC thread keeps [`HubState`]: it numbers the requests, packs those
//! queued at once into one `Requests` message, feeds each `Reply` to its
//! waiter, routes `Changes` to their watch streams, and runs the watcher's
//! `Calls` on this worker's handlers (built-in `ping` and `status` when
//! none is registered). Calls that arrive before the worker is ready wait
//! until it is (its handlers are registered by then).

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::Arc;

use super::shared::{Outgoing, Shared};
use crate::commands::handlers::Ran;
use crate::ipc::codec::{encode, EncodeError};
use crate::ipc::message::{
    Call, CallResult, Change, HubErrorKind, Reply, Request, RequestBody, StorageOp, ToWatcher,
    MAX_MESSAGE, MAX_VALUE, REQUEST_BATCH,
};
use crate::ipc::{Channel, SendError};
use crate::transport::{hub_error, Replier, Transport, WatchSink};

/// The API's way to the watcher in a worker.
pub(crate) struct WorkerLink(pub &'static Shared);

impl Transport for WorkerLink {
    fn submit(&self, body: RequestBody, reply: Replier) {
        let shared = self.0;
        let (id, alone) = shared.waiters.add(reply);
        if alone {
            if let Some(fd) = &shared.direct {
                // Nothing else is in flight, so nothing is queued either:
                // sending from this thread cannot overtake anything.
                let msg = ToWatcher::Requests(vec![Request { id, body }]);
                match encode(&msg) {
                    Ok(bytes) => match crate::sys::send_with_fds(fd.as_fd(), &bytes, &[]) {
                        Ok(_) => return,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            let why = format!("the connection to the watcher is closed ({e})");
                            shared
                                .waiters
                                .fail(id, hub_error(HubErrorKind::Closed, why));
                            return;
                        }
                    },
                    Err(e) => {
                        shared
                            .waiters
                            .fail(id, hub_error(HubErrorKind::TooLarge, e.to_string()));
                        return;
                    }
                }
                // The socket is full: the IPC thread waits for room.
                let ToWatcher::Requests(mut v) = msg else {
                    return;
                };
                if let Some(r) = v.pop() {
                    self.queue(r.id, r.body);
                }
                return;
            }
        }
        self.queue(id, body);
    }

    fn unwatch(&self, watch: u64) {
        let _ = self.0.tx.send(Outgoing::Unwatch(watch));
    }

    fn value_limit(&self) -> Option<usize> {
        Some(MAX_VALUE)
    }
}

impl WorkerLink {
    /// Queues a request for the IPC thread, which packs what is queued
    /// at once into one message.
    fn queue(&self, id: u64, body: RequestBody) {
        if self.0.tx.send(Outgoing::Request(id, body)).is_err() {
            let why = hub_error(
                HubErrorKind::Closed,
                "the connection to the watcher is closed",
            );
            self.0.waiters.fail(id, why);
        }
    }
}

/// Bytes of requests (or results) packed into one message at most, by
/// their estimated size; the encoder has the last word.
const BATCH_BYTES: usize = MAX_MESSAGE / 2;

/// Calls held until the worker is ready, at most.
const MAX_HELD: usize = 1024;

fn request_weight(body: &RequestBody) -> usize {
    16 + match body {
        RequestBody::Storage(op) => match op {
            StorageOp::Get { path }
            | StorageOp::GetVersioned { path }
            | StorageOp::Delete { path }
            | StorageOp::Increment { path, .. } => path.len(),
            StorageOp::Set { path, value, .. } | StorageOp::Update { path, value, .. } => {
                path.len() + value.len()
            }
            StorageOp::CompareAndSwap {
                path,
                expected,
                new,
            } => path.len() + new.len() + expected.as_ref().map_or(0, |e| e.len()),
        },
        RequestBody::Watch { prefix } => prefix.len(),
        RequestBody::Unwatch { .. } => 8,
        RequestBody::Call {
            target, name, args, ..
        } => {
            name.len()
                + args.len()
                + match target {
                    crate::ipc::message::TargetSpec::Name(n) => n.len(),
                    _ => 4,
                }
        }
    }
}

/// The IPC thread's shared-state bookkeeping (the waiters themselves are
/// in `Shared::waiters`, registered by the callers).
#[derive(Default)]
pub(crate) struct HubState {
    /// Running watches, by id.
    watches: HashMap<u64, WatchSink>,
    /// Calls that arrived before the worker was ready.
    held: Vec<Call>,
    ready: bool,
    requests: Vec<Request>,
    requests_bytes: usize,
    results: Vec<CallResult>,
    results_bytes: usize,
}

impl HubState {
    /// Queues a request for the next `Requests` message; `true` when that
    /// message is full and should go now.
    pub(crate) fn queue(&mut self, id: u64, body: RequestBody) -> bool {
        self.requests_bytes += request_weight(&body);
        self.requests.push(Request { id, body });
        self.requests.len() >= REQUEST_BATCH || self.requests_bytes >= BATCH_BYTES
    }

    /// Ends a watch here and in the watcher (nobody waits for the reply).
    pub(crate) fn unwatch(&mut self, watch: u64, shared: &Shared) -> bool {
        if self.watches.remove(&watch).is_some() {
            return self.queue(shared.waiters.id(), RequestBody::Unwatch { watch });
        }
        false
    }

    /// Queues a handler's result; `true` when the message is full.
    pub(crate) fn result(&mut self, r: CallResult) -> bool {
        self.results_bytes += 16
            + r.result
                .as_ref()
                .map_or_else(|e| e.message.len(), |t| t.len());
        self.results.push(r);
        self.results.len() >= REQUEST_BATCH || self.results_bytes >= BATCH_BYTES
    }

    /// The queued requests as one message, if any.
    pub(crate) fn take_requests(&mut self) -> Option<ToWatcher> {
        self.requests_bytes = 0;
        (!self.requests.is_empty()).then(|| ToWatcher::Requests(std::mem::take(&mut self.requests)))
    }

    /// The queued results as one message, if any.
    pub(crate) fn take_results(&mut self) -> Option<ToWatcher> {
        self.results_bytes = 0;
        (!self.results.is_empty())
            .then(|| ToWatcher::CallResults(std::mem::take(&mut self.results)))
    }

    /// Replies from the watcher: each to its waiter (replies nobody
    /// waits for, to an unwatch, are dropped).
    pub(crate) fn on_replies(&mut self, replies: Vec<Reply>, shared: &Shared) {
        for r in replies {
            if let Some(sink) = shared.waiters.feed(r.id, r.result) {
                self.watches.insert(r.id, sink);
            }
        }
    }

    /// Changes for this worker's watches; a watch whose reader is gone or
    /// fell behind ends (here and in the watcher).
    pub(crate) fn on_changes(&mut self, changes: Vec<Change>, shared: &Shared) {
        let mut ended = Vec::new();
        for c in changes {
            let watch = c.watch;
            if let Some(sink) = self.watches.get(&watch) {
                if !sink.deliver(c) {
                    ended.push(watch);
                }
            }
        }
        for watch in ended {
            self.unwatch(watch, shared);
        }
    }

    /// The watcher ended a watch (this worker did not keep up).
    pub(crate) fn on_watch_ended(&mut self, watch: u64, reason: String) {
        if let Some(sink) = self.watches.remove(&watch) {
            sink.end(hub_error(HubErrorKind::Busy, reason));
        }
    }

    /// Commands for this worker's handlers.
    pub(crate) fn on_calls(&mut self, calls: Vec<Call>, shared: &Arc<Shared>) {
        for call in calls {
            if !self.ready && !shared.handlers.has(&call.name) && self.held.len() < MAX_HELD {
                self.held.push(call);
                continue;
            }
            if let Some(r) = run_call(call, shared) {
                self.result(r);
            }
        }
    }

    /// The worker said it is ready: the held calls run now.
    pub(crate) fn ready(&mut self, shared: &Arc<Shared>) {
        self.ready = true;
        for call in std::mem::take(&mut self.held) {
            if let Some(r) = run_call(call, shared) {
                self.result(r);
            }
        }
    }

    /// The watcher is gone: every waiter hears it, every watch ends.
    pub(crate) fn fail_all(&mut self, reason: &str, shared: &Shared) {
        let why = hub_error(
            HubErrorKind::Closed,
            format!("no answer from the watcher: {reason}"),
        );
        shared.waiters.fail_all(&why);
        self.watches.clear();
    }
}

/// Runs `call` on this worker's handler, or a built-in: its result when
/// it is there at once (sent with the next flush, from this thread); a
/// handler that waits sends its result through the IPC queue later.
fn run_call(call: Call, shared: &Arc<Shared>) -> Option<CallResult> {
    let tx = shared.tx.clone();
    let id = call.call;
    let done = move |result| {
        let _ = tx.send(Outgoing::CallResult(CallResult { call: id, result }));
    };
    let result = match shared.handlers.run(&call.name, call.args, done) {
        Ran::Now(result) => result,
        Ran::Later => return None,
        Ran::Missing(_) => match call.name.as_str() {
            "ping" => Ok("\"pong\"".to_string()),
            "status" => Ok(status_json(shared)),
            other => Err(hub_error(
                HubErrorKind::UnknownCommand,
                format!(
                    "worker {} has no handler for {other:?}",
                    shared
                        .name
                        .as_deref()
                        .map_or_else(|| shared.slot.to_string(), str::to_string)
                ),
            )),
        },
    };
    Some(CallResult { call: id, result })
}

/// This worker's answer to the built-in `status` command.
fn status_json(shared: &Shared) -> String {
    let status = shared.status.lock().ok().and_then(|s| s.clone());
    serde_json::json!({
        "slot": shared.slot,
        "name": shared.name,
        "pid": std::process::id(),
        "context_id": shared.context_id,
        "status": status,
    })
    .to_string()
}

/// Sends what is queued: results first (someone waits for them), then
/// requests. A message the encoder finds too large is split; a single
/// request too large even alone is refused to its waiter.
pub(crate) async fn flush(
    channel: &Channel,
    hub: &mut HubState,
    shared: &Shared,
) -> Result<(), SendError> {
    let mut stack: Vec<ToWatcher> = hub
        .take_requests()
        .into_iter()
        .chain(hub.take_results())
        .collect();
    while let Some(msg) = stack.pop() {
        match encode(&msg) {
            Ok(bytes) => channel
                .send_bytes(&bytes, &[])
                .await
                .map_err(SendError::Io)?,
            Err(EncodeError::TooLarge { len, limit }) => match msg {
                ToWatcher::Requests(mut v) if v.len() > 1 => {
                    let second = v.split_off(v.len() / 2);
                    stack.push(ToWatcher::Requests(second));
                    stack.push(ToWatcher::Requests(v));
                }
                ToWatcher::Requests(v) => {
                    for r in v {
                        let why = format!(
                            "a request of {len} bytes exceeds the message limit of {limit} bytes"
                        );
                        shared
                            .waiters
                            .fail(r.id, hub_error(HubErrorKind::TooLarge, why));
                    }
                }
                ToWatcher::CallResults(mut v) if v.len() > 1 => {
                    let second = v.split_off(v.len() / 2);
                    stack.push(ToWatcher::CallResults(second));
                    stack.push(ToWatcher::CallResults(v));
                }
                ToWatcher::CallResults(v) => {
                    let refused = v
                        .into_iter()
                        .map(|r| CallResult {
                            call: r.call,
                            result: Err(hub_error(
                                HubErrorKind::TooLarge,
                                format!("the reply of {len} bytes exceeds the message limit"),
                            )),
                        })
                        .collect();
                    stack.push(ToWatcher::CallResults(refused));
                }
                _ => {}
            },
            Err(e) => return Err(SendError::Encode(e)),
        }
    }
    Ok(())
}
