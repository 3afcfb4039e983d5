//! Slots and the workers that fill them: spawning, respawn backoff,
//! stop/kill escalation, readiness, heartbeat, and the timers behind them.
//!
//! A slot (1..N) is a place for one serving worker; it keeps its number
//! across respawns and reloads. A worker is one process (one context id).
//! During a rolling restart a slot briefly has two: the serving one
//! (`Slot::current`) and its replacement, which takes the slot when ready.

use std::collections::{HashMap, VecDeque};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;

use super::listeners::Listeners;
use crate::commands::router::Peer;
use crate::error::Result;
use crate::ipc::message::ToWorker;
use crate::watcher::config::Config;
use crate::watcher::event::{EventSender, Outbound, OutboundSender, MAX_QUEUED_MESSAGES};
use crate::watcher::hub::Hub;
use crate::watcher::notify::Notified;
use crate::watcher::process::{describe_exit, Launcher, WorkerId};
use crate::watcher::status::{IdleSlot, WorkerState};
use crate::watcher::systemd::Notifier;

/// How long a worker whose channel closed may take to exit.
const CHANNEL_CLOSED_GRACE: Duration = Duration::from_secs(2);

/// Longest wait between the stop message and SIGTERM for a library worker.
const TERM_REMINDER: Duration = Duration::from_secs(1);

/// What every part of the supervisor needs and never changes: the
/// settings, the way to start and signal processes, where worker tasks
/// report, and systemd's notification socket.
pub(crate) struct Ctx {
    pub config: Config,
    pub launcher: Box<dyn Launcher>,
    pub events: EventSender,
    pub notifier: Option<Notifier>,
    /// Shared storage and commands: workers are attached while they run.
    pub hub: Arc<Hub>,
}

impl Ctx {
    /// Sends `lines` to systemd, if it listens.
    pub(crate) fn notify(&self, lines: &[String]) {
        if let Some(n) = &self.notifier {
            n.notify(lines);
        }
    }
}

/// One worker process.
pub(crate) struct Worker {
    pub slot: u32,
    pub pid: u32,
    pub state: WorkerState,
    pub started: Instant,
    pub outbound: OutboundSender,
    /// Said `Hello`: uses the library, so it reports readiness and answers pings.
    pub hello: bool,
    /// When to send SIGKILL if the worker is still alive (stopping).
    kill_at: Option<Instant>,
    /// When to send SIGTERM to a library worker asked to stop in-band.
    term_at: Option<Instant>,
    /// A replacement must be ready by then.
    pub ready_by: Option<Instant>,
    /// Heartbeat: when to check and ping next, and the last answer.
    next_ping_at: Option<Instant>,
    pub last_pong: Instant,
    ping_seq: u64,
    /// Why the watcher killed it, for the exit log.
    killed_for: Option<String>,
    /// Whether balancers may hand it connections (cleared on stop and kill).
    pub accepting: Arc<AtomicBool>,
    /// `SocketRequest`s it made (bounded).
    pub socket_requests: u32,
    /// When its channel reached EOF (it is exiting, or must be killed).
    pub channel_closed_at: Option<Instant>,
    /// It serves jobs (`JobsReady`): its handlers and concurrency, told
    /// again to a job dispatcher that starts later (after an upgrade).
    pub jobs: Option<(Vec<String>, u32)>,
    /// What it said on its notify socket (`--notify`).
    pub notify: Option<Notified>,
    /// It said `RELOADING=1` and not `READY=1` since.
    pub reloading: bool,
    /// What `Cluster::set_status` said last (`stopping` once asked to stop).
    pub status: Option<String>,
    /// User messages from it and to it.
    pub messages_in: u64,
    pub messages_out: u64,
    /// `cluster stop --slot` stopped it (`--revive` decides on a successor).
    pub stopped_alone: bool,
}

impl Worker {
    /// Sends `msg` (dropped if the worker's writer is gone: it is exiting).
    pub(crate) fn send(&self, msg: ToWorker) {
        let _ = self.outbound.send(Outbound::msg(msg));
    }

    /// Marks it stopping, with SIGKILL due after `timeout`; false when it
    /// already was.
    fn begin_stopping(&mut self, timeout: Duration) -> bool {
        if self.state == WorkerState::Stopping {
            return false;
        }
        self.state = WorkerState::Stopping;
        self.status = Some("stopping".into());
        self.accepting.store(false, Ordering::Relaxed);
        self.next_ping_at = None;
        self.ready_by = None;
        self.kill_at = Some(Instant::now() + timeout);
        true
    }

    /// It stops on its own (said `STOPPING=1`): it is asked nothing, and
    /// killed if it is still alive after the shutdown timeout.
    pub(crate) fn stopping_on_its_own(&mut self, ctx: &Ctx) {
        self.begin_stopping(ctx.config.shutdown_timeout);
    }

    fn stop(&mut self, ctx: &Ctx, timeout: Duration) {
        if !self.begin_stopping(timeout) {
            return;
        }
        let now = Instant::now();
        let deadline_ms = timeout.as_millis().min(u64::MAX as u128) as u64;
        self.send(ToWorker::Stop { deadline_ms });
        if self.hello {
            // A library worker reads the stop message in order, after every
            // message sent before it (handed-off connections among them): a
            // SIGTERM now could overtake those. It comes as a reminder.
            let reminder = (timeout / 2).min(TERM_REMINDER);
            self.term_at = Some(now + reminder);
        } else {
            ctx.launcher.signal(self.pid, ctx.config.stop_signal);
        }
    }

    /// Starts (or restarts) its heartbeat check, if the heartbeat is on.
    pub(crate) fn start_heartbeat(&mut self, ctx: &Ctx) {
        if let Some(limit) = ctx.config.heartbeat_timeout {
            let now = Instant::now();
            self.last_pong = now;
            self.next_ping_at = Some(now + heartbeat_interval(limit));
        }
    }

    /// Kills it now; `why` goes into its exit line.
    pub(crate) fn kill(&mut self, ctx: &Ctx, why: impl Into<String>) {
        self.killed_for.get_or_insert_with(|| why.into());
        self.accepting.store(false, Ordering::Relaxed);
        self.next_ping_at = None;
        self.ready_by = None;
        self.kill_at = None;
        ctx.launcher.signal(self.pid, Signal::SIGKILL);
    }
}

/// One place for a serving worker.
#[derive(Default)]
pub(crate) struct Slot {
    /// Context id of the worker serving this slot, if any.
    pub current: Option<u64>,
    /// Consecutive short-lived workers (for the backoff).
    pub failures: u32,
    /// When the next spawn is due, if one is scheduled.
    pub respawn_at: Option<Instant>,
    /// Workers started for this slot after the first one.
    pub restarts: u32,
    /// Serving workers that exited without being asked to.
    pub crashes: u32,
    /// How the slot's last worker ended, and its exit status or signal.
    pub last_exit: Option<String>,
    pub last_exit_code: Option<i32>,
    pub last_exit_signal: Option<i32>,
    /// When its last worker was started.
    last_spawn: Option<Instant>,
    /// When its recent failed workers ended (for `--max-restarts`).
    recent_failures: VecDeque<Instant>,
    /// It failed more than `max_restarts` times within `restart_window`:
    /// no more respawns until a reload or a scale starts it again.
    pub gave_up: bool,
}

/// Why a slot needs a new worker, which decides how soon it gets one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Respawn {
    /// Its worker failed to start or died soon after: exponential backoff.
    Failed,
    /// Its worker had served long enough: the backoff starts over.
    Ended,
    /// Its ready worker was killed from outside: replaced at once (at most
    /// one start per [`MIN_RESPAWN_INTERVAL`] for the slot).
    Killed,
    /// Its worker was stopped on request (`cluster stop --slot`) and
    /// `--revive` replaces it: as `Killed`, but said as news, not a warning.
    Stopped,
}

/// Shortest time between two starts of one slot's workers.
pub(crate) const MIN_RESPAWN_INTERVAL: Duration = Duration::from_millis(100);

/// How a worker ended, as [`Pool::remove`] reports it.
pub(crate) struct Exit {
    pub slot: u32,
    pub pid: u32,
    /// "exited with status 1 (missed heartbeats)" and the like.
    pub how: String,
    pub state: WorkerState,
    pub started: Instant,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// The watcher killed it (heartbeat, protocol error, ...).
    pub killed_by_us: bool,
    /// It was its slot's serving worker (the slot is now empty).
    pub was_current: bool,
    /// Its slot still exists (not scaled away).
    pub slot_exists: bool,
    /// It did not exit with status 0.
    pub failed: bool,
    /// `cluster stop --slot` stopped it.
    pub stopped_alone: bool,
}

/// What came due on a timer, for the supervisor to act on.
#[derive(Default)]
pub(crate) struct Due {
    /// Workers that never contacted the watcher and count as ready now.
    pub assumed_ready: Vec<u64>,
    /// Replacements whose ready deadline passed.
    pub not_ready: Vec<u64>,
}

/// Every slot and every worker process, and the listeners they are given.
pub(crate) struct Pool {
    pub slots: Vec<Slot>,
    pub workers: HashMap<u64, Worker>,
    pub listeners: Listeners,
    next_context_id: u64,
    /// When a worker was last ready (the program is known to work).
    last_ready: Option<Instant>,
}

/// How often to ping: a quarter of the timeout, between 50 ms and 5 s.
fn heartbeat_interval(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

impl Pool {
    pub(crate) fn new(slots: usize, listeners: Listeners) -> Pool {
        Pool {
            slots: (0..slots).map(|_| Slot::default()).collect(),
            workers: HashMap::new(),
            listeners,
            next_context_id: 1,
            last_ready: None,
        }
    }

    pub(crate) fn slot_mut(&mut self, slot: u32) -> Option<&mut Slot> {
        self.slots.get_mut((slot as usize).checked_sub(1)?)
    }

    pub(crate) fn slot(&self, slot: u32) -> Option<&Slot> {
        self.slots.get((slot as usize).checked_sub(1)?)
    }

    /// Spawns a worker for `slot`. A replacement (during a reload) does not
    /// take the slot until it is ready, and must be ready in time.
    pub(crate) fn spawn(&mut self, ctx: &Ctx, slot: u32, replacement: bool) -> Result<u64> {
        let context_id = self.next_context_id;
        self.next_context_id += 1;
        let listen_fds = self.listeners.inherited(&ctx.config.listen, slot)?;
        let id = WorkerId { slot, context_id };
        let spawned = ctx
            .launcher
            .spawn(&ctx.config, id, listen_fds, &ctx.events)?;
        tracing::debug!(
            "worker {slot} started: pid {}, context {context_id}",
            spawned.pid
        );
        let now = Instant::now();
        let accepting = Arc::new(AtomicBool::new(true));
        ctx.hub.attach(
            context_id,
            Peer {
                slot,
                pid: spawned.pid,
                name: ctx.config.worker_name(slot),
                outbound: spawned.outbound.clone(),
                accepting: accepting.clone(),
            },
        );
        self.workers.insert(
            context_id,
            Worker {
                slot,
                pid: spawned.pid,
                state: WorkerState::Starting,
                started: now,
                outbound: spawned.outbound,
                hello: false,
                kill_at: None,
                term_at: None,
                ready_by: replacement.then(|| now + ctx.config.ready_timeout),
                next_ping_at: None,
                last_pong: now,
                ping_seq: 0,
                killed_for: None,
                accepting,
                socket_requests: 0,
                channel_closed_at: None,
                jobs: None,
                notify: spawned.notify.map(Notified::new),
                reloading: false,
                status: None,
                messages_in: 0,
                messages_out: 0,
                stopped_alone: false,
            },
        );
        if let Some(s) = self.slot_mut(slot) {
            s.respawn_at = None;
            s.last_spawn = Some(now);
            if !replacement {
                s.current = Some(context_id);
            }
        }
        Ok(context_id)
    }

    /// Spawns for `slot` now, or schedules a respawn when that fails.
    pub(crate) fn spawn_or_retry(&mut self, ctx: &Ctx, slot: u32) {
        if let Err(e) = self.spawn(ctx, slot, false) {
            let why = format!("could not be started ({e})");
            self.schedule_respawn(ctx, slot, &why, Respawn::Failed);
        }
    }

    /// Schedules the next spawn for `slot`: after its backoff for a worker
    /// that failed, at once for one that was killed while serving.
    ///
    /// The cluster never backs off into having no worker at all while the
    /// program is known to work (a worker was ready within the backoff
    /// reset window): when no other slot has a worker, this one waits only
    /// the first delay.
    ///
    /// A slot whose workers failed (`Respawn::Failed`) more than
    /// `max_restarts` times within `restart_window` gives up instead: it
    /// is not restarted, and `true` is returned.
    pub(crate) fn schedule_respawn(
        &mut self,
        ctx: &Ctx,
        slot: u32,
        why: &str,
        kind: Respawn,
    ) -> bool {
        if kind == Respawn::Failed && self.limit_reached(ctx, slot) {
            if let Some(s) = self.slot_mut(slot) {
                s.current = None;
                s.respawn_at = None;
                s.gave_up = true;
                tracing::error!(
                    "worker {slot} {why}; giving up on slot {slot}: {} failures within {:?} (--max-restarts {}); a rolling restart (`cluster reload`) starts it again",
                    s.recent_failures.len(),
                    ctx.config.restart_window,
                    ctx.config.max_restarts.unwrap_or(0)
                );
            }
            return true;
        }
        let (first, max) = (ctx.config.respawn_delay, ctx.config.respawn_delay_max);
        let now = Instant::now();
        let working = self
            .last_ready
            .is_some_and(|t| now.duration_since(t) < ctx.config.backoff_reset);
        let others = self
            .slots
            .iter()
            .enumerate()
            .any(|(i, s)| i + 1 != slot as usize && s.current.is_some());
        let Some(s) = self.slot_mut(slot) else {
            return false;
        };
        if kind == Respawn::Ended {
            s.failures = 0;
        }
        let delay = match kind {
            Respawn::Killed | Respawn::Stopped => s
                .last_spawn
                .map(|t| (t + MIN_RESPAWN_INTERVAL).saturating_duration_since(now))
                .unwrap_or_default(),
            Respawn::Failed | Respawn::Ended => {
                let factor = 2u32.saturating_pow(s.failures.min(30));
                let backoff = first.saturating_mul(factor).min(max);
                s.failures = s.failures.saturating_add(1);
                if working && !others {
                    backoff.min(first)
                } else {
                    backoff
                }
            }
        };
        s.current = None;
        s.respawn_at = Some(now + delay);
        if kind == Respawn::Stopped {
            tracing::info!("worker {slot} {why}");
        } else if kind == Respawn::Killed {
            tracing::warn!("worker {slot} {why}; replacing it");
        } else if s.failures >= 5 {
            tracing::warn!(
                "worker {slot} {why}; it is crash-looping ({} failures in a row), next start in {delay:?}",
                s.failures
            );
        } else {
            tracing::warn!("worker {slot} {why}; restarting in {delay:?}");
        }
        false
    }

    /// Records one more failure of `slot` and tells whether it now failed
    /// more than `max_restarts` times within `restart_window`.
    fn limit_reached(&mut self, ctx: &Ctx, slot: u32) -> bool {
        let Some(limit) = ctx.config.max_restarts else {
            return false;
        };
        let window = ctx.config.restart_window;
        let now = Instant::now();
        let Some(s) = self.slot_mut(slot) else {
            return false;
        };
        s.recent_failures.push_back(now);
        while s
            .recent_failures
            .front()
            .is_some_and(|&t| now.duration_since(t) > window)
        {
            s.recent_failures.pop_front();
        }
        s.recent_failures.len() > limit as usize
    }

    /// Whether every slot gave up (the cluster cannot serve).
    pub(crate) fn all_gave_up(&self) -> bool {
        !self.slots.is_empty() && self.slots.iter().all(|s| s.gave_up)
    }

    /// Spawns every slot whose respawn is due.
    pub(crate) fn spawn_due(&mut self, ctx: &Ctx, now: Instant) {
        let due: Vec<u32> = (1..=self.slots.len() as u32)
            .filter(|&slot| {
                self.slot(slot)
                    .and_then(|s| s.respawn_at)
                    .is_some_and(|t| t <= now)
            })
            .collect();
        for slot in due {
            if let Some(s) = self.slot_mut(slot) {
                s.restarts += 1;
            }
            self.spawn_or_retry(ctx, slot);
        }
    }

    /// Asks one worker to stop within the shutdown timeout.
    pub(crate) fn stop(&mut self, ctx: &Ctx, context_id: u64) {
        if let Some(w) = self.workers.get_mut(&context_id) {
            w.stop(ctx, ctx.config.shutdown_timeout);
        }
    }

    /// Stops one worker on its own (`cluster stop --slot`): asked to stop
    /// and killed after `timeout`, or, `at_once`, sent SIGTERM now too
    /// (killed after 1 s).
    pub(crate) fn stop_alone(
        &mut self,
        ctx: &Ctx,
        context_id: u64,
        timeout: Duration,
        at_once: bool,
    ) {
        let Some(w) = self.workers.get_mut(&context_id) else {
            return;
        };
        w.stopped_alone = true;
        if at_once {
            w.stop(ctx, Duration::from_secs(1));
            if w.term_at.take().is_some() {
                ctx.launcher.signal(w.pid, Signal::SIGTERM);
            }
        } else {
            w.stop(ctx, timeout);
        }
    }

    /// Asks every worker to stop within `timeout`, and cancels respawns.
    pub(crate) fn stop_all(&mut self, ctx: &Ctx, timeout: Duration) {
        for s in &mut self.slots {
            s.respawn_at = None;
        }
        for w in self.workers.values_mut() {
            w.stop(ctx, timeout);
        }
    }

    /// Kills every worker at once.
    pub(crate) fn kill_all(&mut self, ctx: &Ctx, why: &str) {
        for w in self.workers.values_mut() {
            w.kill(ctx, why);
        }
    }

    /// Kills a worker that is being given up on (a replacement that is not
    /// wanted any more); it never becomes ready.
    pub(crate) fn abandon(&mut self, ctx: &Ctx, context_id: u64, why: &str) {
        if let Some(w) = self.workers.get_mut(&context_id) {
            w.state = WorkerState::Stopping;
            w.kill(ctx, why);
        }
    }

    /// Marks a starting worker ready and starts its heartbeat. Returns its
    /// slot, or `None` when it was not starting.
    pub(crate) fn mark_ready(&mut self, ctx: &Ctx, context_id: u64) -> Option<u32> {
        let w = self.workers.get_mut(&context_id)?;
        if w.state != WorkerState::Starting {
            return None;
        }
        w.state = WorkerState::Ready;
        w.ready_by = None;
        let slot = w.slot;
        self.last_ready = Some(Instant::now());
        if let Some(s) = self.slot_mut(slot) {
            // A slot that gave up serves again (a reload started it).
            s.gave_up = false;
        }
        let w = self.workers.get_mut(&context_id)?;
        let said_ready = w.notify.as_ref().is_some_and(|n| n.seen.ready);
        if w.hello || said_ready {
            tracing::info!("worker {} (pid {}) is ready", w.slot, w.pid);
        } else {
            tracing::info!(
                "worker {} (pid {}) is ready (it ran for --ready-delay {:?})",
                w.slot,
                w.pid,
                ctx.config.assume_ready_after
            );
        }
        if w.hello || w.notify.as_ref().is_some_and(|n| n.armed) {
            w.start_heartbeat(ctx);
        }
        Some(w.slot)
    }

    /// Removes a worker that exited and records how its slot's last worker
    /// ended. `None` when it was not known (already removed).
    pub(crate) fn remove(&mut self, context_id: u64, status: Option<ExitStatus>) -> Option<Exit> {
        let w = self.workers.remove(&context_id)?;
        w.accepting.store(false, Ordering::Relaxed);
        let mut how = describe_exit(status);
        if let Some(why) = &w.killed_for {
            how = format!("{how} ({why})");
        }
        use std::os::unix::process::ExitStatusExt;
        let slot = self.slot_mut(w.slot);
        let slot_exists = slot.is_some();
        let mut was_current = false;
        if let Some(s) = slot {
            let mut last = how.strip_prefix("was ").unwrap_or(&how).to_string();
            if w.killed_for.is_none() && w.state == WorkerState::Stopping {
                last.push_str(" (asked to stop)");
            }
            s.last_exit = Some(last);
            s.last_exit_code = status.and_then(|st| st.code());
            s.last_exit_signal = status.and_then(|st| st.signal());
            if s.current == Some(context_id) {
                s.current = None;
                was_current = true;
            }
        }
        Some(Exit {
            slot: w.slot,
            pid: w.pid,
            how,
            state: w.state,
            started: w.started,
            signal: status.and_then(|s| s.signal()),
            killed_by_us: w.killed_for.is_some(),
            was_current,
            slot_exists,
            failed: status.is_none_or(|s| s.code() != Some(0)),
            stopped_alone: w.stopped_alone,
        })
    }

    /// Runs the per-worker timers due at `now`: SIGTERM reminders, SIGKILL
    /// after the shutdown timeout, heartbeat pings and kills; reports what
    /// the supervisor must decide on.
    pub(crate) fn tick(&mut self, ctx: &Ctx, now: Instant) -> Due {
        let mut due = Due::default();
        for (&id, w) in self.workers.iter_mut() {
            if w.term_at.is_some_and(|t| t <= now) {
                w.term_at = None;
                ctx.launcher.signal(w.pid, Signal::SIGTERM);
            }
            if w.kill_at.is_some_and(|t| t <= now) {
                tracing::warn!(
                    "worker {} (pid {}) did not stop in time; killing it",
                    w.slot,
                    w.pid
                );
                w.kill_at = None;
                ctx.launcher.signal(w.pid, Signal::SIGKILL);
            }
            if w.channel_closed_at
                .is_some_and(|t| now.duration_since(t) >= CHANNEL_CLOSED_GRACE)
            {
                w.channel_closed_at = None;
                tracing::error!(
                    "worker {} (pid {}) closed its channel but did not exit; killing it",
                    w.slot,
                    w.pid
                );
                w.kill(ctx, "closed its channel");
            }
            if w.outbound.queued_messages() > MAX_QUEUED_MESSAGES {
                tracing::error!(
                    "worker {} (pid {}) does not read its channel ({} messages wait for it); killing it",
                    w.slot,
                    w.pid,
                    w.outbound.queued_messages()
                );
                w.kill(ctx, "not reading its channel");
            }
            if w.ready_by.is_some_and(|t| t <= now) && w.state == WorkerState::Starting {
                due.not_ready.push(id);
            }
            if w.state == WorkerState::Starting
                && !w.hello
                && !ctx.config.notify
                && w.started + ctx.config.assume_ready_after <= now
            {
                due.assumed_ready.push(id);
            }
            if let (Some(at), Some(limit)) = (w.next_ping_at, ctx.config.heartbeat_timeout) {
                if at <= now {
                    if w.notify.as_mut().is_some_and(|n| n.pinged()) {
                        w.last_pong = now;
                    }
                    if now.duration_since(w.last_pong) > limit {
                        let what = if w.hello {
                            "did not answer heartbeats"
                        } else {
                            "did not send WATCHDOG=1"
                        };
                        tracing::error!(
                            "worker {} (pid {}) {what} for {limit:?} (its event loop may be blocked); killing it",
                            w.slot,
                            w.pid
                        );
                        w.kill(ctx, "missed heartbeats");
                    } else {
                        if w.hello {
                            w.ping_seq += 1;
                            w.send(ToWorker::Ping { seq: w.ping_seq });
                        }
                        w.next_ping_at = Some(now + heartbeat_interval(limit));
                    }
                }
            }
        }
        due
    }

    /// The earliest timer of any slot or worker.
    pub(crate) fn next_deadline(&self, config: &Config) -> Option<Instant> {
        let respawns = self.slots.iter().filter_map(|s| s.respawn_at);
        let assume = config.assume_ready_after;
        let workers = self.workers.values().flat_map(|w| {
            let assumed = (w.state == WorkerState::Starting && !w.hello && !config.notify)
                .then(|| w.started + assume);
            let closed = w.channel_closed_at.map(|t| t + CHANNEL_CLOSED_GRACE);
            [
                w.kill_at,
                w.term_at,
                w.ready_by,
                w.next_ping_at,
                assumed,
                closed,
            ]
        });
        respawns.chain(workers.flatten()).min()
    }

    /// Number of slots whose worker is ready.
    pub(crate) fn ready_slots(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| {
                s.current
                    .and_then(|id| self.workers.get(&id))
                    .is_some_and(|w| w.state == WorkerState::Ready)
            })
            .count()
    }

    /// The slots without any worker process: waiting for a respawn, or
    /// given up.
    pub(crate) fn idle_slots(&self) -> Vec<IdleSlot> {
        let now = Instant::now();
        (1..=self.slots.len() as u32)
            .zip(&self.slots)
            .filter(|(n, _)| !self.workers.values().any(|w| w.slot == *n))
            .map(|(slot, s)| IdleSlot {
                slot,
                name: None,
                restarts: s.restarts,
                next_start: s.respawn_at.map(|t| t.saturating_duration_since(now)),
                gave_up: s.gave_up,
                last_exit: s.last_exit.clone(),
                last_exit_code: s.last_exit_code,
                last_exit_signal: s.last_exit_signal,
            })
            .collect()
    }
}
