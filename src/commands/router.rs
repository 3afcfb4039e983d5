//! The watcher's command routing table: which workers can be called
//! (attached while their channel is open), which calls are outstanding,
//! and who waits for their answers.
//!
//! A request to a target becomes one call per process (one per worker for
//! `all`), each with its own id; every call ends exactly once: with the
//! process's answer, "target died" when the process's channel closes
//! first, or "timeout" at the request's deadline. The caller gets one
//! answer per call (`remaining` tells it how many more follow). Bounded:
//! at most [`MAX_IN_FLIGHT`] requests per calling worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ipc::message::{
    Answer, Call, HubError, HubErrorKind, Reply, ReplyBody, Responder, TargetSpec, ToWorker,
};
use crate::transport::{hub_error, Fed, Waiting};
use crate::watcher::event::OutboundSender;

/// Requests one worker may have waiting for answers.
pub(crate) const MAX_IN_FLIGHT: usize = 1024;

/// A worker that can be called.
pub(crate) struct Peer {
    pub slot: u32,
    pub pid: u32,
    pub name: Option<String>,
    pub outbound: OutboundSender,
    /// Cleared when it is asked to stop: it is then called only when its
    /// slot has no other worker.
    pub accepting: Arc<AtomicBool>,
}

impl Peer {
    fn responder(&self, context_id: u64) -> Responder {
        Responder {
            slot: self.slot,
            name: self.name.clone(),
            pid: self.pid,
            context_id,
        }
    }
}

/// Who waits for a request's answers.
pub(crate) enum Caller {
    /// A worker: answers go back over its channel as `Replies` to `id`.
    Worker {
        context_id: u64,
        outbound: OutboundSender,
        id: u64,
    },
    /// The watcher's own code or the control socket.
    Local(Waiting),
}

struct Pending {
    caller: Option<Caller>,
    calls: Vec<u64>,
    remaining: u32,
    deadline: Instant,
    name: String,
}

struct Outstanding {
    request: u64,
    /// The called worker's context id; 0 for the watcher.
    target: u64,
    responder: Responder,
}

/// Something the hub does once its lock is released.
pub(crate) struct RunLocal {
    pub call: u64,
    pub name: String,
    pub args: String,
}

/// Commands sent and received by one worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CallCounts {
    pub sent: u64,
    pub received: u64,
}

/// The routing table.
#[derive(Default)]
pub(crate) struct Router {
    peers: HashMap<u64, Peer>,
    pending: HashMap<u64, Pending>,
    calls: HashMap<u64, Outstanding>,
    in_flight: HashMap<u64, usize>,
    counts: HashMap<u64, CallCounts>,
    next: u64,
}

/// The watcher as a responder.
pub(crate) fn watcher_responder() -> Responder {
    Responder {
        slot: 0,
        name: Some("watcher".into()),
        pid: std::process::id(),
        context_id: 0,
    }
}

impl Router {
    /// A worker whose channel is open can be called.
    pub(crate) fn attach(&mut self, context_id: u64, peer: Peer) {
        self.peers.insert(context_id, peer);
    }

    /// A worker's channel closed: every call waiting for it ends with
    /// "target died"; answers to its own requests are dropped.
    pub(crate) fn detach(&mut self, context_id: u64, why: &str) {
        let Some(peer) = self.peers.remove(&context_id) else {
            return;
        };
        self.counts.remove(&context_id);
        self.in_flight.remove(&context_id);
        let dead: Vec<u64> = self
            .calls
            .iter()
            .filter(|(_, c)| c.target == context_id)
            .map(|(&id, _)| id)
            .collect();
        let message = format!(
            "worker {} (pid {}) {why} before it answered",
            peer.slot, peer.pid
        );
        for call in dead {
            self.finish(call, Err(hub_error(HubErrorKind::TargetDied, &message)));
        }
        for p in self.pending.values_mut() {
            if matches!(p.caller, Some(Caller::Worker { context_id: c, .. }) if c == context_id) {
                p.caller = None;
            }
        }
    }

    /// The peer info of a worker, for the calls it makes.
    pub(crate) fn responder(&self, context_id: u64) -> Option<Responder> {
        self.peers.get(&context_id).map(|p| p.responder(context_id))
    }

    /// The workers that can be called now, by slot.
    pub(crate) fn peers(&self) -> Vec<Responder> {
        let mut v: Vec<Responder> = self.peers.iter().map(|(&id, p)| p.responder(id)).collect();
        v.sort_by_key(|r| (r.slot, r.context_id));
        v
    }

    /// The serving worker of `slot`: one not asked to stop, else any; the
    /// oldest (during a rolling restart, the one serving).
    fn in_slot(&self, matches: impl Fn(&Peer) -> bool) -> Option<u64> {
        let mut found: Vec<(bool, u64)> = self
            .peers
            .iter()
            .filter(|(_, p)| matches(p))
            .map(|(&id, p)| (!p.accepting.load(Ordering::Relaxed), id))
            .collect();
        found.sort();
        found.first().map(|&(_, id)| id)
    }

    /// The processes `target` names: context ids, 0 for the watcher.
    pub(crate) fn resolve(&self, target: &TargetSpec) -> Result<Vec<u64>, HubError> {
        let unknown = |m: String| Err(hub_error(HubErrorKind::UnknownTarget, m));
        match target {
            TargetSpec::Watcher => Ok(vec![0]),
            TargetSpec::Slot(n) => match self.in_slot(|p| p.slot == *n) {
                Some(id) => Ok(vec![id]),
                None => unknown(format!("no worker runs in slot {n}")),
            },
            TargetSpec::Name(name) => match self.in_slot(|p| p.name.as_deref() == Some(name)) {
                Some(id) => Ok(vec![id]),
                None => unknown(format!("no worker is named {name:?}")),
            },
            TargetSpec::All => {
                let mut slots: Vec<u32> = self.peers.values().map(|p| p.slot).collect();
                slots.sort_unstable();
                slots.dedup();
                let ids: Vec<u64> = slots
                    .into_iter()
                    .filter_map(|s| self.in_slot(|p| p.slot == s))
                    .collect();
                if ids.is_empty() {
                    return unknown("no worker is running".into());
                }
                Ok(ids)
            }
        }
    }

    /// Whether worker `context_id` may start another request.
    pub(crate) fn check_room(&self, context_id: u64) -> Result<(), HubError> {
        if self.in_flight.get(&context_id).copied().unwrap_or(0) >= MAX_IN_FLIGHT {
            return Err(hub_error(
                HubErrorKind::Busy,
                format!("too many commands in flight (at most {MAX_IN_FLIGHT} per worker)"),
            ));
        }
        Ok(())
    }

    /// Starts calls to `targets` (from [`resolve`](Router::resolve)):
    /// workers get them on their channels; calls to the watcher are
    /// returned for the hub to run.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        &mut self,
        caller: Caller,
        from: Option<Responder>,
        targets: Vec<u64>,
        name: String,
        args: String,
        timeout: Duration,
        now: Instant,
    ) -> Vec<RunLocal> {
        self.next += 1;
        let request = self.next;
        if let Caller::Worker { context_id, .. } = &caller {
            *self.in_flight.entry(*context_id).or_default() += 1;
            self.counts.entry(*context_id).or_default().sent += 1;
        }
        let mut local = Vec::new();
        let mut calls = Vec::with_capacity(targets.len());
        for target in targets {
            self.next += 1;
            let call = self.next;
            let responder = if target == 0 {
                watcher_responder()
            } else if let Some(peer) = self.peers.get(&target) {
                let msg = ToWorker::Calls(vec![Call {
                    call,
                    name: name.clone(),
                    args: args.clone(),
                    from: from.clone(),
                }]);
                peer.outbound.send_now(msg, args.len() + name.len());
                self.counts.entry(target).or_default().received += 1;
                peer.responder(target)
            } else {
                continue;
            };
            if target == 0 {
                local.push(RunLocal {
                    call,
                    name: name.clone(),
                    args: args.clone(),
                });
            }
            self.calls.insert(
                call,
                Outstanding {
                    request,
                    target,
                    responder,
                },
            );
            calls.push(call);
        }
        self.pending.insert(
            request,
            Pending {
                caller: Some(caller),
                remaining: calls.len() as u32,
                calls,
                deadline: now + timeout,
                name,
            },
        );
        local
    }

    /// The answer of worker `from` (0: the watcher) to `call`. Answers to
    /// calls it was not given are ignored.
    pub(crate) fn answer(&mut self, call: u64, from: u64, result: Result<String, HubError>) {
        if self.calls.get(&call).is_some_and(|c| c.target == from) {
            self.finish(call, result);
        }
    }

    /// Ends `call` with `result` and tells its caller.
    fn finish(&mut self, call: u64, result: Result<String, HubError>) {
        let Some(c) = self.calls.remove(&call) else {
            return;
        };
        let Some(p) = self.pending.get_mut(&c.request) else {
            return;
        };
        p.remaining = p.remaining.saturating_sub(1);
        let remaining = p.remaining;
        let answer = Answer {
            from: c.responder,
            result,
        };
        let body = Ok(ReplyBody::Answer { answer, remaining });
        match p.caller.take() {
            Some(Caller::Worker {
                context_id,
                outbound,
                id,
            }) => {
                let weight = reply_weight(&body);
                let msg = ToWorker::Replies(vec![Reply { id, result: body }]);
                outbound.send_now(msg, weight);
                if remaining > 0 {
                    p.caller = Some(Caller::Worker {
                        context_id,
                        outbound,
                        id,
                    });
                } else if let Some(n) = self.in_flight.get_mut(&context_id) {
                    *n = n.saturating_sub(1);
                }
            }
            Some(Caller::Local(waiting)) => {
                if let Fed::More(w) = waiting.feed(0, body) {
                    p.caller = Some(Caller::Local(w));
                }
            }
            None => {}
        }
        if remaining == 0 {
            self.pending.remove(&c.request);
        }
    }

    /// Ends with "timeout" every call whose request's deadline passed.
    pub(crate) fn expire(&mut self, now: Instant) {
        let due: Vec<(Vec<u64>, String, Instant)> = self
            .pending
            .values()
            .filter(|p| p.deadline <= now)
            .map(|p| (p.calls.clone(), p.name.clone(), p.deadline))
            .collect();
        for (calls, name, _) in due {
            for call in calls {
                let who = self
                    .calls
                    .get(&call)
                    .map(|c| describe(&c.responder))
                    .unwrap_or_default();
                let e = hub_error(
                    HubErrorKind::Timeout,
                    format!("{who} did not answer {name:?} in time"),
                );
                self.finish(call, Err(e));
            }
        }
    }

    /// The earliest deadline of a request.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    /// Commands sent and received by worker `context_id`.
    pub(crate) fn counts(&self, context_id: u64) -> CallCounts {
        self.counts.get(&context_id).copied().unwrap_or_default()
    }

    /// The watcher stops: every waiting local caller gets an error.
    pub(crate) fn close(&mut self) {
        for (_, p) in self.pending.drain() {
            if let Some(Caller::Local(w)) = p.caller {
                w.fail(hub_error(HubErrorKind::Closed, "the watcher is stopping"));
            }
        }
        self.calls.clear();
    }
}

fn describe(r: &Responder) -> String {
    match (&r.name, r.slot) {
        (_, 0) => "the watcher".to_string(),
        (Some(n), s) => format!("worker {s} ({n}, pid {})", r.pid),
        (None, s) => format!("worker {s} (pid {})", r.pid),
    }
}

/// About how many bytes a reply takes on the wire.
pub(crate) fn reply_weight(body: &Result<ReplyBody, HubError>) -> usize {
    32 + match body {
        Ok(ReplyBody::Value(Some(t))) | Ok(ReplyBody::Versioned(Some((t, _)))) => t.len(),
        Ok(ReplyBody::Answer { answer, .. }) => {
            64 + answer.from.name.as_ref().map_or(0, |n| n.len())
                + match &answer.result {
                    Ok(t) => t.len(),
                    Err(e) => e.message.len(),
                }
        }
        Ok(_) => 0,
        Err(e) => e.message.len(),
    }
}
