//! In-memory calls (the job server's `POST /v1/call/{name}`): held by the
//! dispatcher only, never written to the store, run on the same workers
//! and with the same capacity and ticket space as stored jobs.
//!
//! A call goes to the least-loaded worker that has its handler and room
//! for it; when none has, it waits in one bounded queue (oldest first)
//! until one has, or until its own wait runs out. A call whose worker dies
//! fails alone (`WorkerLost`); the worker's other calls fail the same way,
//! nobody else's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::workers::{known, least_loaded, SendFailure, Worker};
use crate::ipc::message::{JobFailure, JobOrder};

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CallOutcome {
    /// The handler's result, as JSON text.
    Done(String),
    /// The handler (or the worker) said why there is no result.
    Failed(JobFailure),
    /// No worker has a handler by that name.
    NotFound,
    /// No worker could take it before its wait ran out.
    Timeout,
    /// The call queue is full.
    QueueFull,
    /// The worker running it died (how).
    WorkerLost(String),
    /// It ran longer than the job timeout and was cancelled.
    RunTimeout(Duration),
    /// The call does not fit in one message to a worker (its size).
    TooLarge(usize),
    /// The watcher is stopping.
    Stopping,
}

/// A call for the dispatcher.
#[derive(Debug)]
pub(crate) struct Call {
    pub name: String,
    /// The arguments, as JSON text.
    pub args: String,
    /// How long it may wait for a worker.
    pub wait: Duration,
    pub reply: oneshot::Sender<CallOutcome>,
}

/// Counters for the job server's health answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CallCounts {
    pub queued: usize,
    pub running: usize,
    pub started: u64,
    pub done: u64,
    pub failed: u64,
    pub lost: u64,
    pub refused: u64,
}

struct Waiting {
    call: Call,
    deadline: Instant,
}

struct InFlight {
    context_id: u64,
    /// `None` once answered (a call cancelled after the job timeout holds
    /// its ticket until the worker lets go of it).
    reply: Option<oneshot::Sender<CallOutcome>>,
    deadline: Option<Instant>,
}

impl InFlight {
    fn answer(&mut self, outcome: CallOutcome) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(outcome);
        }
    }
}

/// The calls waiting for a worker and the calls running.
pub(super) struct Calls {
    limit: usize,
    /// By arrival.
    queue: BTreeMap<u64, Waiting>,
    /// (deadline, arrival) of every queued call.
    deadlines: BTreeSet<(Instant, u64)>,
    next_seq: u64,
    running: HashMap<u64, InFlight>,
    /// `--job-timeout`: a running call is cancelled after it.
    run_timeout: Option<Duration>,
    counts: CallCounts,
}

impl Calls {
    pub fn new(limit: usize, run_timeout: Option<Duration>) -> Calls {
        Calls {
            limit,
            queue: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            next_seq: 0,
            running: HashMap::new(),
            run_timeout,
            counts: CallCounts::default(),
        }
    }

    /// Takes a call: starts it at once when a worker has room and no older
    /// call waits, else queues it, else refuses it.
    pub fn submit(
        &mut self,
        call: Call,
        workers: &mut HashMap<u64, Worker>,
        next_ticket: &mut u64,
        now: Instant,
    ) {
        if !workers.is_empty() && !known(workers, &call.name) {
            self.counts.refused += 1;
            let _ = call.reply.send(CallOutcome::NotFound);
            return;
        }
        if self.queue.is_empty() {
            if let Some(ctx) = least_loaded(workers, &call.name) {
                if let Err(call) = self.start(call, ctx, workers, next_ticket, now) {
                    self.enqueue(call, now);
                }
                return;
            }
        }
        self.enqueue(call, now);
    }

    fn enqueue(&mut self, call: Call, now: Instant) {
        if self.queue.len() >= self.limit {
            self.counts.refused += 1;
            let _ = call.reply.send(CallOutcome::QueueFull);
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let deadline = now + call.wait;
        self.deadlines.insert((deadline, seq));
        self.queue.insert(seq, Waiting { call, deadline });
    }

    /// Sends `call` to worker `ctx`; gives it back when that worker is
    /// gone (another may take it).
    fn start(
        &mut self,
        call: Call,
        ctx: u64,
        workers: &mut HashMap<u64, Worker>,
        next_ticket: &mut u64,
        now: Instant,
    ) -> Result<(), Call> {
        let Some(w) = workers.get_mut(&ctx) else {
            return Err(call);
        };
        let ticket = *next_ticket;
        let order = JobOrder {
            ticket,
            job: None,
            name: call.name.clone(),
            args: call.args,
            queue: String::new(),
            pool: String::new(),
            node: String::new(),
        };
        match w.send_order(order) {
            Ok(()) => {}
            Err(SendFailure::TooLarge(len)) => {
                self.counts.refused += 1;
                let _ = call.reply.send(CallOutcome::TooLarge(len));
                return Ok(());
            }
            Err(SendFailure::Gone(order)) => {
                // It is exiting: another worker may take the call.
                return Err(Call {
                    args: order.args,
                    ..call
                });
            }
        }
        *next_ticket += 1;
        w.running.insert(ticket);
        self.counts.started += 1;
        self.running.insert(
            ticket,
            InFlight {
                context_id: ctx,
                reply: Some(call.reply),
                deadline: self.run_timeout.map(|t| now + t),
            },
        );
        Ok(())
    }

    /// Starts the queued calls that a worker has room for, oldest first;
    /// drops those whose caller went away.
    pub fn place(
        &mut self,
        workers: &mut HashMap<u64, Worker>,
        next_ticket: &mut u64,
        now: Instant,
    ) {
        if self.queue.is_empty() || !workers.values().any(|w| w.free() > 0) {
            return;
        }
        let seqs: Vec<u64> = self.queue.keys().copied().collect();
        for seq in seqs {
            let Some(waiting) = self.queue.get(&seq) else {
                continue;
            };
            let closed = waiting.call.reply.is_closed();
            let target = (!closed)
                .then(|| least_loaded(workers, &waiting.call.name))
                .flatten();
            if !closed && target.is_none() {
                continue;
            }
            let Some(w) = self.queue.remove(&seq) else {
                continue;
            };
            self.deadlines.remove(&(w.deadline, seq));
            if let Some(ctx) = target {
                if let Err(call) = self.start(w.call, ctx, workers, next_ticket, now) {
                    self.enqueue(call, now);
                }
            }
            if !workers.values().any(|w| w.free() > 0) {
                break;
            }
        }
    }

    /// The earliest deadline: a queued call's wait or a running call's
    /// timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        let queued = self.deadlines.first().map(|&(t, _)| t);
        let running = if self.run_timeout.is_some() {
            self.running.values().filter_map(|r| r.deadline).min()
        } else {
            None
        };
        queued.into_iter().chain(running).min()
    }

    /// Answers the queued calls whose wait ran out, and cancels the
    /// running ones past the job timeout; returns the tickets to cancel
    /// with the worker running each.
    pub fn expire(&mut self, now: Instant) -> Vec<(u64, u64)> {
        while let Some(&(deadline, seq)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(w) = self.queue.remove(&seq) {
                self.counts.refused += 1;
                let _ = w.call.reply.send(CallOutcome::Timeout);
            }
        }
        let mut cancel = Vec::new();
        let Some(timeout) = self.run_timeout else {
            return cancel;
        };
        for (&ticket, r) in self.running.iter_mut() {
            if r.deadline.is_some_and(|t| t <= now) {
                // The worker keeps the ticket until it lets go of it.
                r.deadline = None;
                r.answer(CallOutcome::RunTimeout(timeout));
                self.counts.failed += 1;
                cancel.push((ticket, r.context_id));
            }
        }
        cancel
    }

    /// Whether `ticket` is a call that worker `context_id` runs.
    pub fn runs_on(&self, ticket: u64, context_id: u64) -> bool {
        self.running
            .get(&ticket)
            .is_some_and(|r| r.context_id == context_id)
    }

    /// A worker answered call `ticket`.
    pub fn done(&mut self, ticket: u64, result: Result<String, JobFailure>) {
        let Some(mut r) = self.running.remove(&ticket) else {
            return;
        };
        if r.reply.is_none() {
            return;
        }
        let outcome = match result {
            Ok(json) => {
                self.counts.done += 1;
                CallOutcome::Done(json)
            }
            Err(f) => {
                self.counts.failed += 1;
                CallOutcome::Failed(f)
            }
        };
        r.answer(outcome);
    }

    /// The worker running call `ticket` is gone.
    pub fn lost(&mut self, ticket: u64, how: &str) {
        if let Some(mut r) = self.running.remove(&ticket) {
            if r.reply.is_some() {
                self.counts.lost += 1;
            }
            r.answer(CallOutcome::WorkerLost(how.to_string()));
        }
    }

    /// The watcher stops: the queued calls are answered `Stopping`; the
    /// running ones finish on their draining workers.
    pub fn stop(&mut self) {
        self.deadlines.clear();
        for (_, w) in std::mem::take(&mut self.queue) {
            let _ = w.call.reply.send(CallOutcome::Stopping);
        }
    }

    /// At the very end: whatever still runs is answered `Stopping`.
    pub fn shutdown(&mut self) {
        self.stop();
        for (_, mut r) in self.running.drain() {
            r.answer(CallOutcome::Stopping);
        }
    }

    pub fn counts(&self) -> CallCounts {
        CallCounts {
            queued: self.queue.len(),
            running: self.running.len(),
            ..self.counts
        }
    }
}
