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

#[cfg(test)]
mod tests {
    use super::super::workers::test_worker;
    use super::*;
    use crate::ipc::message::ToWorker;
    use crate::watcher::event::OutboundReceiver;

    struct World {
        calls: Calls,
        workers: HashMap<u64, Worker>,
        writers: HashMap<u64, OutboundReceiver>,
        ticket: u64,
        now: Instant,
    }

    impl World {
        fn new(limit: usize, workers: &[(u64, &[&str], usize)]) -> World {
            let mut w = World {
                calls: Calls::new(limit, None),
                workers: HashMap::new(),
                writers: HashMap::new(),
                ticket: 1,
                now: Instant::now(),
            };
            for &(ctx, handlers, concurrency) in workers {
                let (worker, rx) = test_worker(ctx as u32, handlers, concurrency, &[]);
                w.workers.insert(ctx, worker);
                w.writers.insert(ctx, rx);
            }
            w
        }

        fn call(&mut self, name: &str, wait_ms: u64) -> oneshot::Receiver<CallOutcome> {
            let (reply, rx) = oneshot::channel();
            let call = Call {
                name: name.into(),
                args: "1".into(),
                wait: Duration::from_millis(wait_ms),
                reply,
            };
            self.calls
                .submit(call, &mut self.workers, &mut self.ticket, self.now);
            rx
        }

        /// The tickets worker `ctx` was sent, in order.
        fn sent(&mut self, ctx: u64) -> Vec<u64> {
            let rx = self.writers.get_mut(&ctx).unwrap();
            std::iter::from_fn(|| rx.try_recv())
                .filter_map(|o| match o.msg {
                    ToWorker::Job(order) => Some(order.ticket),
                    _ => None,
                })
                .collect()
        }

        /// Worker `ctx` answers `ticket`.
        fn answer(&mut self, ctx: u64, ticket: u64, result: Result<String, JobFailure>) {
            assert!(self.calls.runs_on(ticket, ctx));
            self.workers.get_mut(&ctx).unwrap().running.remove(&ticket);
            self.calls.done(ticket, result);
            self.calls
                .place(&mut self.workers, &mut self.ticket, self.now);
        }
    }

    fn outcome(rx: &mut oneshot::Receiver<CallOutcome>) -> Option<CallOutcome> {
        rx.try_recv().ok()
    }

    #[test]
    fn calls_go_to_the_least_loaded_worker_then_wait_in_order_then_are_refused() {
        let mut w = World::new(2, &[(1, &["a"], 1), (2, &["a", "b"], 1)]);
        let mut first = w.call("a", 1000);
        let mut second = w.call("a", 1000);
        assert_eq!((w.sent(1), w.sent(2)), (vec![1], vec![2]), "one each");
        let mut third = w.call("a", 1000);
        let mut fourth = w.call("b", 1000);
        let mut fifth = w.call("a", 1000);
        assert_eq!(outcome(&mut fifth), Some(CallOutcome::QueueFull));
        assert_eq!(w.calls.counts().queued, 2);
        // Worker 1 finishes: the oldest waiting call it can run is `a`.
        w.answer(1, 1, Ok("10".into()));
        assert_eq!(outcome(&mut first), Some(CallOutcome::Done("10".into())));
        assert_eq!(w.sent(1), vec![3]);
        assert!(outcome(&mut third).is_none());
        // Worker 2 finishes: `b` only it has.
        w.answer(2, 2, Err(JobFailure::Failed("no".into())));
        assert_eq!(
            outcome(&mut second),
            Some(CallOutcome::Failed(JobFailure::Failed("no".into())))
        );
        assert_eq!(w.sent(2), vec![4]);
        assert!(outcome(&mut fourth).is_none());
        assert_eq!(w.calls.counts().queued, 0);
    }

    #[test]
    fn unknown_handlers_are_not_found_unless_no_worker_runs_yet() {
        let mut w = World::new(10, &[]);
        let mut early = w.call("a", 100);
        assert!(outcome(&mut early).is_none(), "waits for a worker to start");
        let mut w = World::new(10, &[(1, &["a"], 1)]);
        assert_eq!(outcome(&mut w.call("zz", 100)), Some(CallOutcome::NotFound));
    }

    #[test]
    fn waits_run_out_and_a_dead_worker_fails_only_its_own_calls() {
        let mut w = World::new(10, &[(1, &["a"], 1), (2, &["a"], 1)]);
        let mut on_one = w.call("a", 1000);
        let mut on_two = w.call("a", 1000);
        let mut waiting = w.call("a", 500);
        assert_eq!(
            w.calls.next_deadline(),
            Some(w.now + Duration::from_millis(500))
        );
        assert!(w
            .calls
            .expire(w.now + Duration::from_millis(499))
            .is_empty());
        assert!(outcome(&mut waiting).is_none());
        w.calls.expire(w.now + Duration::from_millis(500));
        assert_eq!(outcome(&mut waiting), Some(CallOutcome::Timeout));
        let gone = w.workers.remove(&1).unwrap();
        for t in gone.running {
            w.calls.lost(t, "was killed by SIGKILL");
        }
        assert_eq!(
            outcome(&mut on_one),
            Some(CallOutcome::WorkerLost("was killed by SIGKILL".into()))
        );
        assert!(outcome(&mut on_two).is_none());
        assert!(!w.calls.runs_on(2, 1), "a ticket is tied to its worker");
        let mut queued = w.call("a", 1000);
        w.calls.stop();
        assert_eq!(outcome(&mut queued), Some(CallOutcome::Stopping));
        assert!(
            outcome(&mut on_two).is_none(),
            "a running call finishes while the watcher stops"
        );
        w.calls.shutdown();
        assert_eq!(outcome(&mut on_two), Some(CallOutcome::Stopping));
    }

    #[test]
    fn a_call_past_the_job_timeout_is_answered_and_cancelled_but_holds_its_ticket() {
        let mut w = World::new(10, &[(1, &["a"], 1)]);
        w.calls = Calls::new(10, Some(Duration::from_secs(1)));
        let mut slow = w.call("a", 1000);
        let later = w.now + Duration::from_secs(1);
        assert_eq!(w.calls.expire(later), vec![(1, 1)]);
        assert_eq!(
            outcome(&mut slow),
            Some(CallOutcome::RunTimeout(Duration::from_secs(1)))
        );
        assert!(w.calls.runs_on(1, 1), "until the worker lets go");
        assert_eq!(w.workers[&1].free(), 0);
        w.answer(1, 1, Err(JobFailure::Cancelled));
        assert_eq!(w.calls.counts().running, 0);
    }
}
