//! The supervisor: one task that owns every listener and every worker.
//!
//! All state changes happen here, in response to one thing at a time: a
//! [`Command`] (from the handle, a signal, the control socket, the metrics
//! responder or a reload trigger), an [`Event`] from a worker's tasks (a
//! message, a broken channel, an exit), or a timer (a respawn that is due,
//! a stop, ready or heartbeat deadline).
//!
//! The state lives in parts with their own files: [`slots`] (slots,
//! workers, backoff, heartbeat), [`reload`] (rolling restart),
//! [`listeners`] (the listener registry), [`services`] (pid file,
//! control socket, metrics, watchdog), [`upgrade`] (the old watcher's side
//! of a watcher upgrade), [`takeover`] (the new watcher's side) and
//! [`counters`]; [`dispatch`] handles each worker message. Processes are
//! started through the [`Launcher`] in [`Ctx`], so the unit tests in
//! `tests/` run all of this with fake processes under paused time.

mod counters;
mod dispatch;
mod health;
mod listeners;
mod notify;
mod reload;
mod report;
mod services;
mod slots;
mod stop_one;
mod takeover;
#[cfg(test)]
mod tests;
mod upgrade;

use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::error::{Error, Kind, Result};
use crate::ipc::RecvError;
use crate::jobs::dispatch::JobsEvent;
use crate::watcher::config::Config;
use crate::watcher::event::{Command, CommandSender, Event, Incoming, Outcome, Scale};
use crate::watcher::hooks::{event_fields, HOOK_TIMEOUT};
use crate::watcher::hub::Hub;
use crate::watcher::process::{signal_name, Launcher};
use crate::watcher::status::WorkerState;
use crate::watcher::systemd::Notifier;
use crate::watcher::upgrade::Inherited;
use counters::Counters;
use listeners::Listeners;
use reload::Reloads;
use services::Services;
use slots::{Ctx, Exit, Pool, Respawn};
use takeover::Takeover;
use upgrade::Upgrades;

/// The most workers a watcher runs.
pub(crate) const MAX_WORKERS: usize = 4096;

/// The channels the supervisor is built with.
pub(crate) struct Channels {
    /// Requests to the supervisor.
    pub commands: mpsc::UnboundedReceiver<Command>,
    /// A sender for the same, for the services that make requests.
    pub commands_tx: CommandSender,
    /// User messages from workers, for `ClusterWatcher::messages`.
    pub messages: mpsc::Sender<Incoming>,
    /// Becomes true once every initial worker has been ready.
    pub ready: watch::Sender<bool>,
    /// What the old watcher handed over, when this one is the new watcher
    /// of an upgrade.
    pub inherited: Option<Inherited>,
}

pub(crate) struct Supervisor {
    ctx: Ctx,
    channels: Channels,
    events: mpsc::UnboundedReceiver<Event>,
    pool: Pool,
    reloads: Reloads,
    services: Services,
    counters: Counters,
    /// Upgrades of this watcher (the old watcher's side).
    upgrades: Upgrades,
    /// Taking over from an old watcher (the new watcher's side).
    takeover: Option<Takeover>,
    /// When this watcher started.
    started_at: SystemTime,
    started: std::time::Instant,
    /// Some worker has been ready at least once: past start-up.
    ever_ready: bool,
    stopping: bool,
    failure: Option<Error>,
}

impl Supervisor {
    pub(crate) fn new(
        mut config: Config,
        launcher: Box<dyn Launcher>,
        mut channels: Channels,
        hub: Arc<Hub>,
    ) -> Supervisor {
        let (events_tx, events) = mpsc::unbounded_channel();
        let inherited = channels.inherited.take();
        let (activated, mut notifier) = match (config.systemd, &inherited) {
            // The old watcher adopted systemd's sockets: they come with
            // the rest of its listeners.
            (true, Some(_)) => (&[][..], Notifier::from_env()),
            (true, None) => (crate::activation::inherited(), Notifier::from_env()),
            (false, _) => (&[][..], None),
        };
        let mut listeners = Listeners::new(
            config.balance,
            config.backlog,
            activated,
            config.bind_policy.clone(),
        );
        let takeover = inherited.map(|i| {
            // As many workers as the old watcher ran (after `cluster scale`).
            config.workers = i.workers;
            let (takeover, handed) = Takeover::new(i, notifier.take());
            listeners.adopt(handed);
            takeover
        });
        let pool = Pool::new(config.workers, listeners);
        Supervisor {
            ctx: Ctx {
                config,
                launcher,
                events: events_tx,
                notifier,
                hub,
            },
            channels,
            events,
            pool,
            reloads: Reloads::default(),
            services: Services::default(),
            counters: Counters::default(),
            upgrades: Upgrades::default(),
            takeover,
            started_at: SystemTime::now(),
            started: std::time::Instant::now(),
            ever_ready: false,
            stopping: false,
            failure: None,
        }
    }

    /// Runs until every worker has exited after a stop (or a fatal error).
    /// `started` gets the result of start-up: the services, then the first
    /// worker's spawn.
    pub(crate) async fn run(mut self, started: oneshot::Sender<Result<()>>) -> Outcome {
        if let Err(e) = self.start_takeover() {
            self.takeover_failed(&e);
            let _ = started.send(Err(e.clone()));
            return Outcome::Failed(e);
        }
        let services = Services::start(
            &self.ctx.config,
            &self.ctx.hub,
            &self.channels.commands_tx,
            self.ctx.notifier.as_ref(),
            self.channels.ready.subscribe(),
            self.takeover.is_some(),
        )
        .await;
        match services {
            Ok(s) => self.services = s,
            Err(e) => {
                self.takeover_failed(&e);
                let _ = started.send(Err(e.clone()));
                return Outcome::Failed(e);
            }
        }
        // `--listen` sockets are bound before the first worker starts: an
        // address that cannot be bound is a start-up error.
        for slot in 1..=self.pool.slots.len() as u32 {
            let listen = &self.ctx.config.listen;
            if let Err(e) = self.pool.listeners.inherited(listen, slot) {
                let _ = started.send(Err(e.clone()));
                self.pool.listeners.shutdown();
                return Outcome::Failed(e);
            }
        }
        for slot in 1..=self.pool.slots.len() as u32 {
            if let Err(e) = self.pool.spawn(&self.ctx, slot, false) {
                if slot == 1 {
                    // Nothing runs yet: report and stop.
                    self.takeover_failed(&e);
                    let _ = started.send(Err(e.clone()));
                    return Outcome::Failed(e);
                }
                let why = format!("could not be started ({e})");
                self.pool
                    .schedule_respawn(&self.ctx, slot, &why, Respawn::Failed);
            }
        }
        let _ = started.send(Ok(()));
        if self.pool.slots.is_empty() {
            // Nothing to wait for (per-job processes only).
            self.all_ready();
        }
        self.services.hooks.emit(
            "watcher_started",
            event_fields!("workers" => self.pool.slots.len(), "program" => std::path::Path::new(&self.ctx.config.program).display().to_string()),
        );
        tracing::debug!(
            "started {} worker(s) of {}",
            self.pool.slots.len(),
            std::path::Path::new(&self.ctx.config.program).display()
        );

        let mut commands_open = true;
        loop {
            if self.stopping && self.pool.workers.is_empty() {
                break;
            }
            let deadline = self.next_deadline();
            tokio::select! {
                Some(event) = self.events.recv() => match event {
                    Event::Upgrade(u) => self.on_upgrade(u).await,
                    event => self.on_event(event),
                },
                cmd = self.channels.commands.recv(), if commands_open => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => {
                        // Every handle was dropped: stop gracefully.
                        commands_open = false;
                        self.begin_stop(None);
                    }
                },
                _ = sleep_until(deadline) => {
                    self.on_timer();
                    self.takeover_timer().await;
                }
            }
            self.report_reload_failures();
        }
        self.counters.report_drops();
        if let Some(jobs) = &mut self.services.jobs {
            jobs.shutdown(self.ctx.config.shutdown_timeout + Duration::from_secs(2))
                .await;
        }
        self.services.stop_job_server().await;
        let upgraded = self.upgrades.handed_to();
        if upgraded.is_some() {
            // The new watcher holds the listeners and their files now.
            self.pool.listeners.hand_over();
        } else {
            self.pool.listeners.shutdown();
        }
        let mut hooks = std::mem::take(&mut self.services.hooks);
        drop(std::mem::take(&mut self.services));
        // The job store and every file are free: the new watcher may run
        // jobs before this one's last hooks are done.
        self.upgrades.released();
        hooks.finish(HOOK_TIMEOUT).await;
        match (self.failure.take(), upgraded) {
            (Some(e), _) => Outcome::Failed(e),
            (None, Some(pid)) => {
                tracing::info!("all workers stopped; the new watcher (pid {pid}) runs on");
                Outcome::Upgraded(pid)
            }
            (None, None) => {
                tracing::info!("all workers stopped");
                Outcome::Stopped
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.pool
            .next_deadline(&self.ctx.config)
            .into_iter()
            .chain(self.services.watchdog_at)
            .chain(self.counters.drop_report_at)
            .chain(self.upgrades.next_deadline())
            .chain(self.takeover.as_ref().and_then(Takeover::next_deadline))
            .chain(self.listener_sweep())
            .min()
    }

    /// When unused listeners are due to close: only while every slot's
    /// worker is ready (a worker that starts may still ask for them).
    fn listener_sweep(&self) -> Option<Instant> {
        let settled = !self.stopping && self.pool.ready_slots() == self.pool.slots.len();
        settled.then(|| self.pool.listeners.next_sweep()).flatten()
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Stop { timeout } => self.begin_stop(timeout),
            Command::Kill => {
                self.begin_stop(None);
                self.pool.kill_all(&self.ctx, "forced stop");
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status_report());
            }
            Command::Recycle { context_id, why } => self.recycle(context_id, &why),
            Command::ReopenLogs(reply) => {
                let _ = reply.send(self.reopen_logs());
            }
            Command::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Command::Restart { reason, done } => {
                if self.stopping {
                    if let Some(done) = done {
                        let _ = done.send(Err(Error::closed("the watcher is stopping")));
                    }
                    return;
                }
                self.reloads
                    .request(&mut self.pool, &self.ctx, reason, done);
            }
            Command::Upgrade { done } => self.request_upgrade(done),
            Command::Scale { to, done } => {
                let result = self.scale(to);
                if let Some(done) = done {
                    let _ = done.send(result);
                }
            }
            Command::Send { to, bytes } => self.send(to, bytes),
            Command::KillWorker { context_id, why } => {
                if let Some(w) = self.pool.workers.get_mut(&context_id) {
                    tracing::error!("killing worker {} (pid {}): {why}", w.slot, w.pid);
                    w.kill(&self.ctx, why);
                }
            }
            Command::JobsStatus { reply, counts } => {
                self.services.jobs(JobsEvent::Status { reply, counts })
            }
            Command::StopWorker {
                which,
                timeout,
                done,
            } => {
                let _ = done.send(self.stop_one(which, timeout));
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Message {
                context_id,
                msg,
                fds,
            } => self.on_message(context_id, msg, fds),
            Event::Logs { context_id, batch } => self.on_logs(context_id, batch),
            Event::ChannelClosed { context_id, error } => {
                // Its calls end now: "target died" needs no exit to wait for.
                self.ctx.hub.detach(context_id, "closed its channel");
                let Some(w) = self.pool.workers.get_mut(&context_id) else {
                    return;
                };
                match error {
                    // EOF: the worker closed its end, most likely exiting;
                    // everything it sent was handled, so what it was handed
                    // and never accepted can go to another worker now.
                    RecvError::Closed => {
                        self.pool.listeners.worker_gone(context_id);
                        // Its exit follows; one that lives on without its
                        // channel cannot be supervised and is killed.
                        w.channel_closed_at = Some(Instant::now());
                    }
                    error => {
                        tracing::error!(
                            "worker {} (pid {}) broke the protocol ({error}); replacing it",
                            w.slot,
                            w.pid
                        );
                        w.kill(&self.ctx, "protocol error");
                    }
                }
            }
            Event::Exited { context_id, status } => self.on_exit(context_id, status),
            Event::Notify { context_id } => self.on_notify(context_id),
            // Handled (asynchronously) by the loop.
            Event::Upgrade(_) => {}
        }
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        self.services.tick(self.ctx.notifier.as_ref(), now);
        if self.counters.drop_report_at.is_some_and(|t| t <= now) {
            self.counters.report_drops();
        }
        if !self.stopping {
            self.pool.spawn_due(&self.ctx, now);
        }
        self.upgrade_timer(now);
        if self.listener_sweep().is_some_and(|t| t <= now) {
            self.pool.listeners.sweep(now);
        }
        let due = self.pool.tick(&self.ctx, now);
        for id in due.assumed_ready {
            self.on_ready(id);
        }
        let ready_timeout = self.ctx.config.ready_timeout;
        for id in due.not_ready {
            let Some(w) = self.pool.workers.get(&id) else {
                continue;
            };
            let why = format!(
                "the replacement for worker {} (pid {}) was not ready within {ready_timeout:?}",
                w.slot, w.pid
            );
            self.pool.abandon(&self.ctx, id, "not ready in time");
            self.reloads
                .replacement_failed(&mut self.pool, &self.ctx, id, why);
        }
    }

    fn on_ready(&mut self, context_id: u64) {
        let Some(slot) = self.pool.mark_ready(&self.ctx, context_id) else {
            return;
        };
        self.ever_ready = true;
        let wanted = self.pool.slots.len();
        if !*self.channels.ready.borrow() && self.pool.ready_slots() == wanted {
            tracing::debug!("every worker is ready");
            self.all_ready();
        }
        self.reloads
            .ready(&mut self.pool, &self.ctx, slot, context_id);
    }

    /// Every initial worker has been ready (or there are none to wait for).
    fn all_ready(&mut self) {
        self.channels.ready.send_replace(true);
        let wanted = self.pool.slots.len();
        // The new watcher of an upgrade has no notifier until it took
        // over: systemd learns about it from the old one (`MAINPID=`).
        self.ctx.notify(&[
            "READY=1".into(),
            format!("MAINPID={}", std::process::id()),
            format!("STATUS={wanted} worker(s) ready"),
        ]);
        self.takeover_ready();
    }

    fn on_exit(&mut self, context_id: u64, status: Option<ExitStatus>) {
        let Some(exit) = self.pool.remove(context_id, status) else {
            return;
        };
        self.ctx.hub.detach(context_id, &exit.how);
        self.pool.listeners.worker_gone(context_id);
        self.services.jobs(JobsEvent::WorkerGone {
            context_id,
            how: exit.how.clone(),
        });
        let (slot, pid, how) = (exit.slot, exit.pid, &exit.how);
        let replacement = self.reloads.replacement(slot);
        if replacement == Some(context_id) {
            let why =
                format!("the replacement for worker {slot} (pid {pid}) {how} before it was ready");
            self.reloads
                .replacement_failed(&mut self.pool, &self.ctx, context_id, why);
            return;
        }
        if !exit.slot_exists {
            tracing::debug!("worker {slot} (pid {pid}) {how} (slot retired)");
            return;
        }
        let asked = exit.state == WorkerState::Stopping && !exit.stopped_alone;
        if self.stopping || asked || !exit.was_current {
            tracing::debug!("worker {slot} (pid {pid}) {how}");
            return;
        }
        let revive = self.ctx.config.revive;
        if !revive.revives(exit.failed, exit.stopped_alone) {
            tracing::info!("worker {slot} (pid {pid}) {how}; not replaced (--revive {revive})");
            return;
        }
        if exit.stopped_alone {
            let why = format!("(pid {pid}) {how}; replacing it (--revive {revive})");
            self.pool
                .schedule_respawn(&self.ctx, slot, &why, Respawn::Stopped);
            return;
        }
        if let Some(s) = self.pool.slot_mut(slot) {
            s.crashes = s.crashes.saturating_add(1);
        }
        if replacement.is_some() {
            // Its replacement is starting and will take the slot.
            tracing::warn!("worker {slot} (pid {pid}) {how}; its replacement is starting");
            return;
        }
        let why = format!("(pid {pid}) {how}");
        let kind = respawn_kind(&exit, self.ctx.config.backoff_reset);
        let (code, signal) = self
            .pool
            .slot(slot)
            .map(|s| (s.last_exit_code, s.last_exit_signal))
            .unwrap_or_default();
        self.services.hooks.emit(
            "worker_crashed",
            event_fields!("slot" => slot, "pid" => pid, "how" => how, "code" => code, "signal" => signal.map(signal_name)),
        );
        if self.pool.schedule_respawn(&self.ctx, slot, &why, kind) {
            self.gave_up(slot, how);
        }
    }

    /// A user message to one worker, or to every worker not stopping.
    fn send(&mut self, to: Option<u64>, bytes: Vec<u8>) {
        let workers = &self.pool.workers;
        let ids: Vec<u64> = match to {
            Some(id) => workers
                .get_key_value(&id)
                .map(|(&k, _)| k)
                .into_iter()
                .collect(),
            None => workers
                .iter()
                .filter(|(_, w)| w.state != WorkerState::Stopping)
                .map(|(&k, _)| k)
                .collect(),
        };
        if ids.is_empty() {
            tracing::debug!("message to {to:?} dropped: no such worker");
        }
        self.counters.messages_out += ids.len() as u64;
        for id in ids {
            if let Some(w) = self.pool.workers.get_mut(&id) {
                w.messages_out += 1;
                w.send(crate::ipc::message::ToWorker::Data(bytes.clone()));
            }
        }
    }

    fn begin_stop(&mut self, timeout: Option<Duration>) {
        if self.upgrades.in_progress() {
            self.roll_back_upgrade("the watcher is stopping".into(), true);
        }
        if !self.stopping {
            match self.upgrades.handed_to() {
                // systemd follows the new watcher (MAINPID): no STOPPING=1.
                Some(pid) => tracing::info!(
                    "handing over to the new watcher (pid {pid}): draining {} worker(s)",
                    self.pool.workers.len()
                ),
                None => {
                    if self.failure.is_none() {
                        tracing::info!("stopping {} worker(s)", self.pool.workers.len());
                    }
                    self.ctx
                        .notify(&["STOPPING=1".into(), "STATUS=stopping".into()]);
                }
            }
            let why = self.failure.as_ref().map(|e| e.to_string());
            self.services.hooks.emit(
                "watcher_stopping",
                event_fields!("error" => why, "upgraded_to" => self.upgrades.handed_to()),
            );
        }
        self.stopping = true;
        self.reloads.abort();
        let timeout = timeout.unwrap_or(self.ctx.config.shutdown_timeout);
        self.services.jobs(JobsEvent::Stopping { timeout });
        self.pool.stop_all(&self.ctx, timeout);
    }

    /// Stops with an error: used when start-up cannot succeed.
    fn fail(&mut self, error: Error) {
        self.takeover_failed(&error);
        if self.failure.is_none() {
            // The caller (the CLI) reports the failure once, as its last line.
            tracing::debug!("fatal: {error}");
            self.failure = Some(error);
        }
        self.begin_stop(None);
    }

    fn scale(&mut self, to: Scale) -> Result<usize> {
        if self.stopping {
            return Err(Error::closed("the watcher is stopping"));
        }
        if self.upgrades.in_progress() {
            return Err(Error::new(
                Kind::Config,
                "an upgrade is in progress: scale after it",
            ));
        }
        let target = match to {
            Scale::Up => self.pool.slots.len() + 1,
            Scale::Down => self.pool.slots.len().saturating_sub(1),
            Scale::To(n) => n,
        };
        if target == 0 {
            return Err(Error::new(
                Kind::Config,
                "a cluster keeps at least 1 worker",
            ));
        }
        let pools = self.ctx.config.jobs.as_ref().map(|j| j.specs.len());
        if pools.is_some_and(|n| n > 0) {
            return Err(Error::new(
                Kind::Config,
                "a cluster with job pools keeps their sizes: change --workers and restart",
            ));
        }
        if target > MAX_WORKERS {
            return Err(Error::new(
                Kind::Config,
                format!("at most {MAX_WORKERS} workers"),
            ));
        }
        while self.pool.slots.len() < target {
            self.pool.slots.push(Default::default());
            let slot = self.pool.slots.len() as u32;
            self.pool.spawn_or_retry(&self.ctx, slot);
        }
        while self.pool.slots.len() > target {
            let slot = self.pool.slots.len() as u32;
            let removed = self.pool.slots.pop().expect("more than target");
            self.pool.listeners.retire_slot(slot);
            self.reloads.slot_retired(&mut self.pool, &self.ctx, slot);
            if let Some(id) = removed.current {
                self.pool.stop(&self.ctx, id);
            }
        }
        tracing::info!("now running {} worker(s)", self.pool.slots.len());
        self.reloads.resume(&mut self.pool, &self.ctx);
        Ok(self.pool.slots.len())
    }
}

/// How soon a serving worker that exited on its own is replaced: a ready
/// worker that something outside killed (SIGKILL, SIGTERM, SIGINT, SIGHUP,
/// SIGQUIT: an operator, the OOM killer, a chaos test) at once; one that
/// failed to start or crashed soon after start after a backoff; one that
/// had served for `backoff_reset` after the first delay.
fn respawn_kind(exit: &Exit, backoff_reset: Duration) -> Respawn {
    const KILLS: [i32; 5] = [
        libc::SIGKILL,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGQUIT,
    ];
    let killed = exit.signal.is_some_and(|s| KILLS.contains(&s)) && !exit.killed_by_us;
    if exit.state == WorkerState::Ready && killed {
        Respawn::Killed
    } else if exit.started.elapsed() >= backoff_reset {
        Respawn::Ended
    } else {
        Respawn::Failed
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
