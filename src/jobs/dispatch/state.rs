//! The dispatcher's state and loop: workers and their free capacity,
//! claimed jobs waiting per queue, running jobs with their deadlines, and
//! outcomes waiting to be written.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::calls::{CallOutcome, Calls};
use super::config::JobsConfig;
use super::event::{HandlersReport, JobsEvent};
use super::nodes::{jittered, Wake};
use super::pools::pool_of;
use super::runner;
use super::sources::EndedKeys;
use super::workers::{self, Worker};
use crate::ipc::message::JobFailure;
use crate::ipc::parts::{Assembly, Joined};
use crate::jobs::store::{Finished, Outcome, Store};
use crate::jobs::Job;
use crate::watcher::config::Config;
use crate::watcher::event::CommandSender;
use crate::watcher::status::{JobsStatus, PoolStatus};

mod outcomes;
mod starting;

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
    /// Where outcomes' keys go for the job sources (when there are any).
    ended: Option<Arc<EndedKeys>>,
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
            ended: None,
        }
    }

    /// Notes every outcome's key in `ended` (for the job sources).
    pub(super) fn with_ended_keys(mut self, ended: Option<Arc<EndedKeys>>) -> Dispatcher {
        self.ended = ended;
        self
    }

    pub(super) async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<JobsEvent>,
        wake: Option<Wake>,
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
                        next_tick = now + jittered(TICK);
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
            JobsEvent::NodeLost => {
                // The store queued them again: another claim runs them.
                let dropped: usize = self.buffers.drain().map(|(_, q)| q.len()).sum();
                if dropped > 0 {
                    tracing::warn!(
                        "{dropped} buffered job(s) dropped: this node was declared dead"
                    );
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

async fn wait_wake(wake: Option<&Wake>) {
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
