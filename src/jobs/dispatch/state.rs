//! The dispatcher's state and loop: workers and their free capacity,
//! claimed jobs waiting per queue, running jobs with their deadlines, and
//! outcomes waiting to be written.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::calls::{CallOutcome, Calls};
use super::config::JobsConfig;
use super::event::{HandlersReport, JobsEvent};
use super::pools::{assign, pool_of};
use super::runner::{self, ProcessDone};
use super::workers::{self, SendFailure, Worker};
use crate::ipc::message::{JobFailure, JobOrder, ToWorker};
use crate::ipc::parts::{Assembly, Joined};
use crate::jobs::store::sqlite::WakeListener;
use crate::jobs::store::{ClaimRequest, Finished, Outcome, Store};
use crate::jobs::{Job, JobId};
use crate::watcher::config::Config;
use crate::watcher::event::{Command, CommandSender, Outbound};
use crate::watcher::status::{JobOutcomeInfo, JobsStatus, PoolStatus};

/// Most jobs claimed in one statement.
const MAX_CLAIM: usize = 1000;

/// How often the dispatcher looks for cancel requests and due retries
/// when nothing wakes it.
const TICK: Duration = Duration::from_secs(1);

/// Where a running job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum On {
    Worker(u64),
    Process(u32),
}

/// Why the watcher is ending a job early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    TimedOut,
    Cancelled,
    /// The watcher stops: not the job's fault, it runs again.
    Stopping,
}

struct Running {
    job: Job,
    pool: usize,
    on: On,
    deadline: Option<Instant>,
    /// When to escalate an ending (SIGKILL, or kill the worker).
    kill_at: Option<Instant>,
    ending: Option<Ending>,
}

pub(super) struct Dispatcher {
    jobs: JobsConfig,
    watcher: Arc<Config>,
    /// `None` without `--jobs`: the job server's calls only.
    store: Option<Arc<dyn Store>>,
    node: String,
    commands: CommandSender,
    events: mpsc::UnboundedSender<JobsEvent>,
    workers: HashMap<u64, Worker>,
    buffers: HashMap<String, VecDeque<Job>>,
    /// Queues whose last claim came back short: not claimed again until a
    /// wake, a retry falls due, or the tick.
    dry: HashSet<String>,
    running: HashMap<u64, Running>,
    /// Processes per pool (per-job mode).
    processes: Vec<usize>,
    next_ticket: u64,
    finished: Vec<Finished>,
    /// Set when the watcher stops: nothing more is claimed or started.
    stopping: Option<Duration>,
    /// When the earliest queued job of a dry queue is due (a retry).
    due_at: Option<Instant>,
    /// Queues with a claim in flight (claims and writes run beside the
    /// loop, so dispatching never waits for the store).
    claiming: HashSet<String>,
    /// A batch of outcomes is being written.
    flushing: bool,
    status: JobsStatus,
    /// The job server's in-memory calls.
    calls: Calls,
    /// Counts the outcome batches written (long-polls wait on it).
    written: watch::Sender<u64>,
    /// Results that arrive in parts.
    results: Assembly,
}

/// The largest result the watcher assembles from parts.
const MAX_RESULT: usize = 16 * 1024 * 1024;

impl Dispatcher {
    /// Whether worker `context_id` runs `ticket` (a job or a call).
    fn runs(&self, context_id: u64, ticket: u64) -> bool {
        self.workers
            .get(&context_id)
            .is_some_and(|w| w.running.contains(&ticket))
    }

    pub(super) fn new(
        jobs: JobsConfig,
        watcher: Arc<Config>,
        store: Option<Arc<dyn Store>>,
        node: String,
        commands: CommandSender,
        events: mpsc::UnboundedSender<JobsEvent>,
        written: watch::Sender<u64>,
    ) -> Dispatcher {
        let processes = vec![0; jobs.pools.len()];
        let status = JobsStatus {
            store: if jobs.has_store() {
                jobs.url.clone()
            } else {
                "no store (job server calls only)".into()
            },
            node: node.clone(),
            ..JobsStatus::default()
        };
        let calls = Calls::new(jobs.call_queue_limit, jobs.timeout);
        Dispatcher {
            jobs,
            watcher,
            store,
            node,
            commands,
            events,
            workers: HashMap::new(),
            buffers: HashMap::new(),
            dry: HashSet::new(),
            running: HashMap::new(),
            processes,
            next_ticket: 1,
            finished: Vec::new(),
            stopping: None,
            due_at: None,
            claiming: HashSet::new(),
            flushing: false,
            status,
            calls,
            written,
            results: Assembly::new(MAX_RESULT),
        }
    }

    pub(super) async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<JobsEvent>,
        wake: Option<WakeListener>,
        mut ready: watch::Receiver<bool>,
    ) {
        // Persistent workers register as they start; dispatching waits for
        // all of them, so the first jobs spread over the pools by the rule
        // and not by who came first.
        let mut started = self.jobs.per_job || *ready.borrow();
        let mut next_tick = Instant::now() + TICK;
        loop {
            let deadline = self
                .running
                .values()
                .flat_map(|r| [r.deadline, r.kill_at])
                .flatten()
                .chain(Some(next_tick))
                .chain(self.due_at)
                .chain(self.calls.next_deadline())
                .min();
            tokio::select! {
                ev = rx.recv() => {
                    let Some(mut ev) = ev else { return };
                    // Take what else is queued: outcomes are written together.
                    for _ in 0..4096 {
                        if let JobsEvent::Shutdown(ack) = ev {
                            self.shutdown(&mut rx, ack).await;
                            return;
                        }
                        self.handle(ev).await;
                        match rx.try_recv() {
                            Ok(next) => ev = next,
                            Err(_) => break,
                        }
                    }
                }
                _ = wait_wake(wake.as_ref()) => self.dry.clear(),
                changed = ready.changed(), if !started => {
                    started = changed.is_err() || *ready.borrow();
                }
                _ = sleep_until(deadline) => {
                    let now = Instant::now();
                    self.timers(now);
                    self.call_timers(now);
                    if self.due_at.is_some_and(|t| t <= now) {
                        self.due_at = None;
                        self.dry.clear();
                    }
                    if now >= next_tick {
                        next_tick = now + TICK;
                        self.dry.clear();
                        self.cancel_requested().await;
                    }
                }
            }
            if self.stopping.is_none() {
                // Calls first: somebody waits for each of them.
                self.calls
                    .place(&mut self.workers, &mut self.next_ticket, Instant::now());
            }
            if started && self.stopping.is_none() {
                self.dispatch();
                self.claim().await;
            }
            self.start_flush();
        }
    }

    /// Handles one event; true when the dispatcher is done.
    async fn handle(&mut self, ev: JobsEvent) -> bool {
        match ev {
            JobsEvent::WorkerJoined {
                context_id,
                slot,
                pid,
                outbound,
                accepting,
                handlers,
                concurrency,
            } => {
                // Without `--pool`, one pool has every slot, also the slots
                // `cluster scale` added after the plan was made.
                let default =
                    (self.jobs.specs.is_empty() && !self.jobs.pools.is_empty()).then_some(0);
                let Some(pool) = pool_of(&self.jobs.pools, slot).or(default) else {
                    return false;
                };
                self.workers.insert(
                    context_id,
                    Worker {
                        slot,
                        pid,
                        pool,
                        outbound,
                        accepting,
                        handlers: handlers.into_iter().collect(),
                        concurrency: concurrency.max(1) as usize,
                        running: HashSet::new(),
                    },
                );
            }
            JobsEvent::WorkerGone { context_id, how } => {
                if let Some(w) = self.workers.remove(&context_id) {
                    for &ticket in &w.running {
                        self.results.forget(ticket);
                    }
                    for ticket in w.running {
                        if self.calls.runs_on(ticket, context_id) {
                            let text = format!("worker {} (pid {}) {how}", w.slot, w.pid);
                            self.calls.lost(ticket, &text);
                        }
                        if let Some(r) = self.running.remove(&ticket) {
                            let text = format!("worker {} (pid {}) {how}", w.slot, w.pid);
                            let outcome = match r.ending {
                                Some(Ending::TimedOut) => Outcome::Failed(self.timed_out()),
                                Some(Ending::Cancelled) => Outcome::Cancelled,
                                _ => Outcome::Lost(text.clone()),
                            };
                            self.record(&r, Some(text), outcome);
                        }
                    }
                }
            }
            JobsEvent::JobDonePart {
                context_id,
                ticket,
                part,
            } => {
                if self.runs(context_id, ticket) {
                    self.results.push(ticket, &part);
                }
            }
            JobsEvent::JobDone {
                context_id,
                ticket,
                result,
            } => {
                // Only the worker running a ticket answers it (another
                // worker's word would end, or cut, someone else's result).
                if !self.runs(context_id, ticket) {
                    return false;
                }
                let result = match result {
                    Ok(last) => match self.results.finish(ticket, last) {
                        Joined::Text(json) => Ok(json),
                        Joined::TooLarge(n) => Err(JobFailure::Failed(format!(
                            "the result is {n} bytes of JSON; the watcher takes at most {MAX_RESULT}"
                        ))),
                    },
                    Err(f) => {
                        self.results.forget(ticket);
                        Err(f)
                    }
                };
                if self.calls.runs_on(ticket, context_id) {
                    if let Some(w) = self.workers.get_mut(&context_id) {
                        w.running.remove(&ticket);
                    }
                    self.calls.done(ticket, result);
                    return false;
                }
                let Some(r) = self.running.remove(&ticket) else {
                    return false;
                };
                let who = self.workers.get_mut(&context_id).map(|w| {
                    w.running.remove(&ticket);
                    format!("slot {} pid {}", w.slot, w.pid)
                });
                let outcome = match (result, r.ending) {
                    (Ok(json), _) => Outcome::Done(serde_json::from_str(&json).ok()),
                    (Err(JobFailure::Cancelled), Some(Ending::TimedOut)) => {
                        Outcome::Failed(self.timed_out())
                    }
                    (Err(JobFailure::Cancelled), _) => Outcome::Cancelled,
                    (Err(f), _) => Outcome::Failed(failure_text(f)),
                };
                self.record(&r, who, outcome);
            }
            JobsEvent::ProcessDone(done) => self.process_done(done),
            JobsEvent::Status { reply, counts } => {
                let mut status = self.status();
                match self.store.clone() {
                    Some(store) if counts => {
                        // A scan of the table: never in the dispatcher's way.
                        tokio::spawn(async move {
                            status.store_counts = store.stats().await.ok();
                            let _ = reply.send(status);
                        });
                    }
                    _ => {
                        let _ = reply.send(status);
                    }
                }
            }
            JobsEvent::Call(call) => {
                if self.stopping.is_some() {
                    let _ = call.reply.send(CallOutcome::Stopping);
                } else {
                    let now = Instant::now();
                    self.calls
                        .submit(call, &mut self.workers, &mut self.next_ticket, now);
                }
            }
            JobsEvent::Handlers(reply) => {
                let _ = reply.send(HandlersReport {
                    handlers: workers::handlers(&self.workers),
                    workers: self.workers.len(),
                    capacity: self.workers.values().map(|w| w.free()).sum(),
                    calls: self.calls.counts(),
                    stopping: self.stopping.is_some(),
                });
            }
            JobsEvent::Stopping { timeout } => {
                self.stopping = Some(timeout);
                self.calls.stop();
                let kill_at = Instant::now() + timeout;
                for r in self.running.values_mut() {
                    if let On::Process(pid) = r.on {
                        r.ending.get_or_insert(Ending::Stopping);
                        r.kill_at = Some(kill_at);
                        runner::signal(pid, Signal::SIGTERM);
                    }
                }
            }
            JobsEvent::Claimed {
                queue,
                limit,
                result,
            } => {
                self.claiming.remove(&queue);
                match result {
                    Ok(jobs) => {
                        if jobs.len() < limit {
                            self.dry.insert(queue.clone());
                        }
                        self.status.claimed += jobs.len() as u64;
                        self.buffers.entry(queue).or_default().extend(jobs);
                    }
                    Err(e) => {
                        tracing::error!("cannot claim jobs of queue {queue}: {e}");
                        self.dry.insert(queue);
                    }
                }
            }
            JobsEvent::Flushed(result) => {
                self.flushing = false;
                self.written.send_modify(|n| *n += 1);
                match result {
                    Ok(report) => {
                        for (id, attempt) in report.stale {
                            tracing::debug!(
                                "job {id} attempt {attempt}: the outcome came too late (retried, cancelled or purged meanwhile)"
                            );
                        }
                        // A retry may now be due: let the next round claim.
                        self.dry.clear();
                    }
                    Err(e) => tracing::error!("cannot record job outcomes: {e}"),
                }
            }
            JobsEvent::Shutdown(ack) => {
                // Handled by `run`, which owns the event channel.
                let _ = ack.send(());
                return true;
            }
        }
        false
    }

    fn timed_out(&self) -> String {
        let t = self.jobs.timeout.unwrap_or_default();
        format!("timed out after {t:?}")
    }

    /// Queues an outcome for the next batch and counts it.
    fn record(&mut self, r: &Running, worker: Option<String>, outcome: Outcome) {
        match &outcome {
            Outcome::Done(_) => self.status.done += 1,
            Outcome::Cancelled => self.status.cancelled += 1,
            Outcome::Lost(_) => self.status.lost += 1,
            Outcome::Failed(_) => {}
        }
        if matches!(outcome, Outcome::Failed(_) | Outcome::Lost(_)) {
            if r.job.attempt < r.job.max_attempts {
                self.status.retried += 1;
            } else {
                self.status.failed += 1;
            }
        }
        let retry = r.job.attempt < r.job.max_attempts;
        let (word, error) = match &outcome {
            Outcome::Done(_) => ("done", None),
            Outcome::Cancelled => ("cancelled", None),
            Outcome::Lost(e) => ("lost", Some(e.clone())),
            Outcome::Failed(e) if retry => ("retry", Some(e.clone())),
            Outcome::Failed(e) => ("failed", Some(e.clone())),
        };
        self.status.note(outcome_info(&r.job, word, error));
        if let Outcome::Failed(e) | Outcome::Lost(e) = &outcome {
            tracing::warn!(
                "job {} ({}) attempt {} of {} failed: {e}",
                r.job.id,
                r.job.queue,
                r.job.attempt,
                r.job.max_attempts
            );
        }
        self.finished.push(Finished {
            id: r.job.id,
            attempt: r.job.attempt,
            worker,
            outcome,
        });
    }

    fn process_done(&mut self, done: ProcessDone) {
        let Some(r) = self.running.remove(&done.ticket) else {
            return;
        };
        self.processes[r.pool] = self.processes[r.pool].saturating_sub(1);
        let pid = match r.on {
            On::Process(pid) => pid,
            On::Worker(_) => 0,
        };
        let who = Some(format!("pid {pid}"));
        let outcome = match (r.ending, runner::outcome(&done)) {
            (Some(Ending::Stopping), Err(_)) => {
                // Stopped by the watcher's own stop: it runs again,
                // without counting an attempt.
                let id = (r.job.id, r.job.attempt);
                if let Some(store) = self.store.clone() {
                    tokio::spawn(async move {
                        if let Err(e) = store.release(vec![id]).await {
                            tracing::error!("cannot give back job {}: {e}", id.0);
                        }
                    });
                }
                return;
            }
            (Some(Ending::TimedOut), Err(_)) => Outcome::Failed(self.timed_out()),
            (Some(Ending::Cancelled), Err(_)) => Outcome::Cancelled,
            (_, Ok(result)) => Outcome::Done(result),
            (_, Err(e)) if runner::killed_by(&done, libc::SIGKILL) => Outcome::Lost(e),
            (_, Err(e)) => Outcome::Failed(e),
        };
        self.record(&r, who, outcome);
    }

    /// Deadlines of running jobs: stop what ran too long, escalate what
    /// does not stop.
    fn timers(&mut self, now: Instant) {
        let grace = self.watcher.shutdown_timeout;
        let mut kill_workers = Vec::new();
        for (&ticket, r) in self.running.iter_mut() {
            if r.deadline.is_some_and(|t| t <= now) {
                r.deadline = None;
                r.ending.get_or_insert(Ending::TimedOut);
                r.kill_at = Some(now + grace);
                match r.on {
                    On::Process(pid) => runner::signal(pid, Signal::SIGTERM),
                    On::Worker(ctx) => {
                        if let Some(w) = self.workers.get(&ctx) {
                            let _ = w
                                .outbound
                                .send(Outbound::msg(ToWorker::CancelJob { ticket }));
                        }
                    }
                }
            }
            if r.kill_at.is_some_and(|t| t <= now) {
                r.kill_at = None;
                match r.on {
                    On::Process(pid) => runner::signal(pid, Signal::SIGKILL),
                    // It did not let go of the job: replace the worker.
                    On::Worker(ctx) => kill_workers.push((ctx, r.job.id)),
                }
            }
        }
        for (context_id, job) in kill_workers {
            let _ = self.commands.send(Command::KillWorker {
                context_id,
                why: format!("job {job} did not stop"),
            });
        }
    }

    /// Calls that waited too long for a worker, or ran past the job
    /// timeout (those are cancelled in their worker).
    fn call_timers(&mut self, now: Instant) {
        for (ticket, ctx) in self.calls.expire(now) {
            if let Some(w) = self.workers.get(&ctx) {
                let _ = w
                    .outbound
                    .send(Outbound::msg(ToWorker::CancelJob { ticket }));
            }
        }
    }

    /// Stops the running jobs whose cancel was requested; drops the
    /// buffered ones.
    async fn cancel_requested(&mut self) {
        let Some(store) = &self.store else {
            return;
        };
        let Ok(requests) = store.cancel_requests(&self.node).await else {
            return;
        };
        for (id, attempt) in requests {
            for q in self.buffers.values_mut() {
                if let Some(i) = q.iter().position(|j| j.id == id && j.attempt == attempt) {
                    if let Some(job) = q.remove(i) {
                        self.status.cancelled += 1;
                        self.status.note(outcome_info(&job, "cancelled", None));
                        self.finished.push(Finished {
                            id: job.id,
                            attempt: job.attempt,
                            worker: None,
                            outcome: Outcome::Cancelled,
                        });
                    }
                }
            }
            let grace = self.watcher.shutdown_timeout;
            for (&ticket, r) in self.running.iter_mut() {
                if r.job.id != id || r.job.attempt != attempt || r.ending.is_some() {
                    continue;
                }
                r.ending = Some(Ending::Cancelled);
                r.kill_at = Some(Instant::now() + grace);
                match r.on {
                    On::Process(pid) => runner::signal(pid, Signal::SIGTERM),
                    On::Worker(ctx) => {
                        if let Some(w) = self.workers.get(&ctx) {
                            let _ = w
                                .outbound
                                .send(Outbound::msg(ToWorker::CancelJob { ticket }));
                        }
                    }
                }
            }
        }
    }

    /// Starts writing the outcomes waiting, unless a write runs.
    fn start_flush(&mut self) {
        let Some(store) = self.store.clone() else {
            return;
        };
        if self.flushing || self.finished.is_empty() {
            return;
        }
        self.flushing = true;
        let batch = std::mem::take(&mut self.finished);
        let events = self.events.clone();
        tokio::spawn(async move {
            let _ = events.send(JobsEvent::Flushed(store.finish(batch).await));
        });
    }

    /// At the end: waits for the claims and writes in flight (their
    /// results come on the event channel), writes what is left, gives back
    /// the jobs never started, unregisters the queues, and answers.
    async fn shutdown(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<JobsEvent>,
        ack: tokio::sync::oneshot::Sender<()>,
    ) {
        self.calls.shutdown();
        let Some(store) = self.store.clone() else {
            let _ = ack.send(());
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.flushing || !self.claiming.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(JobsEvent::Shutdown(other))) => drop(other),
                Ok(Some(ev)) => {
                    self.handle(ev).await;
                }
                _ => break,
            }
        }
        self.flush().await;
        let unstarted: Vec<(JobId, u32)> = self
            .buffers
            .drain()
            .flat_map(|(_, q)| q.into_iter())
            .map(|j| (j.id, j.attempt))
            .collect();
        if !unstarted.is_empty() {
            if let Err(e) = store.release(unstarted).await {
                tracing::error!("cannot give back the jobs never started: {e}");
            }
        }
        if let Err(e) = store.register_queues(&self.node, &[]).await {
            tracing::debug!("unregistering the queues: {e}");
        }
        let _ = ack.send(());
    }

    /// Writes the outcomes waiting, now.
    async fn flush(&mut self) {
        let Some(store) = self.store.clone() else {
            return;
        };
        if self.finished.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.finished);
        match store.finish(batch).await {
            Ok(report) => {
                for (id, attempt) in report.stale {
                    tracing::debug!(
                        "job {id} attempt {attempt}: the outcome came too late (retried, cancelled or purged meanwhile)"
                    );
                }
                // A retry may now be due: let the next round claim.
                self.dry.clear();
            }
            Err(e) => tracing::error!("cannot record job outcomes: {e}"),
        }
    }

    /// Free capacity per pool.
    fn free(&self) -> Vec<usize> {
        let mut free = vec![0usize; self.jobs.pools.len()];
        if self.jobs.per_job {
            for (i, p) in self.jobs.pools.iter().enumerate() {
                free[i] = (p.slots as usize).saturating_sub(self.processes[i]);
            }
        } else {
            for w in self.workers.values() {
                free[w.pool] += w.free();
            }
        }
        free
    }

    /// Hands buffered jobs to free capacity, by the pool rule.
    fn dispatch(&mut self) {
        let waiting: HashMap<String, usize> = self
            .buffers
            .iter()
            .map(|(q, b)| (q.clone(), b.len()))
            .collect();
        if waiting.values().all(|&n| n == 0) {
            return;
        }
        let free = self.free();
        for (pool, queue, n) in assign(&self.jobs.pools, &free, &waiting) {
            for _ in 0..n {
                let Some(job) = self.buffers.get_mut(&queue).and_then(|b| b.pop_front()) else {
                    break;
                };
                self.start(job, pool);
            }
        }
    }

    /// Starts `job` in `pool`.
    fn start(&mut self, job: Job, pool: usize) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let deadline = self.jobs.timeout.map(|t| Instant::now() + t);
        let pool_name = self.jobs.pools[pool].name.clone();
        if self.jobs.per_job {
            let events = self.events.clone();
            let spawned = runner::spawn(
                &self.watcher,
                &job,
                &pool_name,
                &self.node,
                ticket,
                move |d| {
                    let _ = events.send(JobsEvent::ProcessDone(d));
                },
            );
            match spawned {
                Ok(pid) => {
                    self.processes[pool] += 1;
                    self.running.insert(
                        ticket,
                        Running {
                            job,
                            pool,
                            on: On::Process(pid),
                            deadline,
                            kill_at: None,
                            ending: None,
                        },
                    );
                }
                Err(e) => {
                    let r = Running {
                        job,
                        pool,
                        on: On::Process(0),
                        deadline: None,
                        kill_at: None,
                        ending: None,
                    };
                    self.record(&r, None, Outcome::Failed(e.to_string()));
                }
            }
            return;
        }
        let handler = job.name.clone().unwrap_or_else(|| job.queue.clone());
        let worker = self
            .workers
            .iter_mut()
            .filter(|(_, w)| w.pool == pool && w.free() > 0)
            .find(|(_, w)| w.handlers.contains(&handler));
        let Some((&ctx, w)) = worker else {
            let why = format!("no worker of pool {pool_name} has a handler named {handler:?}");
            self.fail_unstarted(job, pool, why);
            return;
        };
        let order = JobOrder {
            ticket,
            job: Some((job.id.get(), job.attempt)),
            name: handler,
            args: job.args.to_string(),
            queue: job.queue.clone(),
            pool: pool_name,
            node: self.node.clone(),
        };
        match w.send_order(order) {
            Ok(()) => {}
            Err(SendFailure::Gone(_)) => {
                // Its writer is gone: it is exiting. The job waits for another.
                self.buffers
                    .entry(job.queue.clone())
                    .or_default()
                    .push_front(job);
                return;
            }
            Err(SendFailure::TooLarge(len)) => {
                let why = format!(
                    "its arguments make a message of {len} bytes, more than the {} a worker takes",
                    crate::ipc::message::MAX_MESSAGE
                );
                self.fail_unstarted(job, pool, why);
                return;
            }
        }
        w.running.insert(ticket);
        self.running.insert(
            ticket,
            Running {
                job,
                pool,
                on: On::Worker(ctx),
                deadline,
                kill_at: None,
                ending: None,
            },
        );
    }

    /// Records that `job` failed without reaching a worker.
    fn fail_unstarted(&mut self, job: Job, pool: usize, why: String) {
        let r = Running {
            job,
            pool,
            on: On::Worker(u64::MAX),
            deadline: None,
            kill_at: None,
            ending: None,
        };
        self.record(&r, None, Outcome::Failed(why));
    }

    /// Starts a claim for every queue that can use more: what its pools
    /// could start now plus the prefetch, less what waits already.
    async fn claim(&mut self) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let free = self.free();
        for queue in self.jobs.queues() {
            if self.dry.contains(&queue) || self.claiming.contains(&queue) {
                continue;
            }
            let takers: Vec<usize> = (0..self.jobs.pools.len())
                .filter(|&i| self.jobs.pools[i].queues.contains(&queue))
                .collect();
            let want: usize = takers.iter().map(|&i| free[i]).sum::<usize>() + self.jobs.prefetch;
            let have = self.buffers.get(&queue).map(|b| b.len()).unwrap_or(0);
            let limit = want.saturating_sub(have).min(MAX_CLAIM);
            if limit == 0 {
                continue;
            }
            let owner = takers
                .iter()
                .find(|&&i| self.jobs.pools[i].name == queue)
                .or(takers.first())
                .map(|&i| self.jobs.pools[i].name.clone())
                .unwrap_or_else(|| queue.clone());
            let req = ClaimRequest {
                pool: owner,
                queues: vec![queue.clone()],
                limit,
                node: self.node.clone(),
                safe_mode: self.jobs.safe_mode,
            };
            self.claiming.insert(queue.clone());
            let (store, events) = (store.clone(), self.events.clone());
            tokio::spawn(async move {
                let result = store.claim(req).await;
                let _ = events.send(JobsEvent::Claimed {
                    queue,
                    limit,
                    result,
                });
            });
        }
        // Dry queues may hold retries that fall due later: wake for them.
        if self.due_at.is_none() && !self.dry.is_empty() {
            let dry: Vec<String> = self.dry.iter().cloned().collect();
            if let Ok(Some(at)) = store.next_due(&dry).await {
                let wait = at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                self.due_at = Some(Instant::now() + wait.min(TICK));
            }
        }
    }

    fn status(&self) -> JobsStatus {
        let free = self.free();
        let mut s = self.status.clone();
        s.buffered = self.buffers.values().map(|b| b.len()).sum();
        s.pools = self
            .jobs
            .pools
            .iter()
            .enumerate()
            .map(|(i, p)| PoolStatus {
                name: p.name.clone(),
                slots: p.slots,
                shared: p.shared,
                queues: p.queues.clone(),
                workers: self.workers.values().filter(|w| w.pool == i).count(),
                running: self.running.values().filter(|r| r.pool == i).count(),
                capacity: free[i],
            })
            .collect();
        s
    }
}

fn failure_text(f: JobFailure) -> String {
    match f {
        JobFailure::Failed(m)
        | JobFailure::Panicked(m)
        | JobFailure::NoHandler(m)
        | JobFailure::BadArgs(m) => m,
        JobFailure::Cancelled => "cancelled".into(),
    }
}

async fn wait_wake(wake: Option<&WakeListener>) {
    match wake {
        Some(w) => {
            if w.wait().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Characters of an error kept in [`JobsStatus::recent`].
const MAX_ERROR_SHOWN: usize = 300;

/// What the dashboard shows of one outcome of `job` (its `seq` is set by
/// [`JobsStatus::note`]).
fn outcome_info(job: &Job, outcome: &'static str, error: Option<String>) -> JobOutcomeInfo {
    JobOutcomeInfo {
        seq: 0,
        id: job.id.get(),
        queue: job.queue.clone(),
        name: job.name.clone(),
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        outcome,
        // The store keeps the whole text; a status stays small.
        error: error.map(|e| match e.char_indices().nth(MAX_ERROR_SHOWN) {
            Some((cut, _)) => format!("{}…", &e[..cut]),
            None => e,
        }),
        at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
}
