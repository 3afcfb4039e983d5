//! The ending side of the dispatcher: outcomes counted and queued for the
//! store in batches, per-job processes that ended, deadlines and cancels,
//! and the last writes at shutdown.

use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Dispatcher, Ending, On, Running};
use crate::ipc::message::ToWorker;
use crate::jobs::dispatch::runner::{self, ProcessDone};
use crate::jobs::dispatch::JobsEvent;
use crate::jobs::store::{Finished, Outcome};
use crate::jobs::{Job, JobId};
use crate::watcher::event::{Command, Outbound};
use crate::watcher::status::JobOutcomeInfo;

impl Dispatcher {
    pub(super) fn timed_out(&self) -> String {
        let t = self.jobs.timeout.unwrap_or_default();
        format!("timed out after {t:?}")
    }

    /// Queues an outcome for the next batch and counts it.
    pub(super) fn record(&mut self, r: &Running, worker: Option<String>, outcome: Outcome) {
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
        if let Some(ended) = &self.ended {
            ended.note(&r.job.key);
        }
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

    pub(super) fn process_done(&mut self, done: ProcessDone) {
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
    pub(super) fn timers(&mut self, now: Instant) {
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
    pub(super) fn call_timers(&mut self, now: Instant) {
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
    pub(super) async fn cancel_requested(&mut self) {
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
                        if let Some(ended) = &self.ended {
                            ended.note(&job.key);
                        }
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
    pub(super) fn start_flush(&mut self) {
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
    pub(super) async fn shutdown(
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
    pub(super) async fn flush(&mut self) {
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
