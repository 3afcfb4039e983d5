//! The supervisor: one task that owns every listener and every worker.
//!
//! All state changes happen here, in response to one event at a time:
//! a message or failure on a worker's channel, a worker's exit, a command
//! from the [`ClusterWatcher`](super::ClusterWatcher) handle, a reload asked
//! for by a file watcher, or a timer (a respawn that is due, a stop, ready
//! or heartbeat deadline).
//!
//! Rolling restart: for each slot in turn (`reload_batch` at a time) a
//! replacement is spawned beside the serving worker; once it is ready it
//! takes the slot and the old worker is asked to drain. A replacement that
//! exits or is not ready within `ready_timeout` is killed, the old worker
//! keeps serving, and the reload stops there with an error. A reload asked
//! for while one runs is queued (several queued requests merge into one).

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::balance::{Balance, Balancer};
use super::metrics::{self, Snapshot};
use super::output::Source;
use super::process::{self, Outbound};
use super::systemd::{self, Notifier};
use super::{Config, WorkerInfo, WorkerState};
use crate::control::{self, Action};
use crate::error::{Error, Kind, Result};
use crate::ipc::message::{ToWatcher, ToWorker, VERSION};
use crate::ipc::RecvError;
use crate::pidfile::PidFile;
use crate::socket::Address;

/// Something that happened, reported by a worker's tasks or a poller.
pub(crate) enum Event {
    Message {
        context_id: u64,
        msg: ToWatcher,
        fds: Vec<OwnedFd>,
    },
    ChannelClosed {
        context_id: u64,
        error: RecvError,
    },
    Exited {
        context_id: u64,
        status: Option<ExitStatus>,
    },
    /// A file watcher or the deploy-link poller asks for a rolling restart.
    ReloadRequested(String),
    /// A request that arrived on the control socket.
    Control(Action),
    /// The metrics responder wants the counters.
    Metrics(oneshot::Sender<Snapshot>),
}

/// A change in the number of workers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scale {
    Up,
    Down,
    To(usize),
}

/// A request from the handle.
pub(crate) enum Command {
    Stop {
        timeout: Duration,
    },
    Kill,
    Status(oneshot::Sender<Vec<WorkerInfo>>),
    Restart {
        reason: String,
        done: Option<oneshot::Sender<Result<()>>>,
    },
    Scale {
        to: Scale,
        done: Option<oneshot::Sender<Result<usize>>>,
    },
    /// A user message to one worker, or to all.
    Send {
        to: Option<u64>,
        bytes: Vec<u8>,
    },
}

/// Longest wait between the stop message and SIGTERM for a library worker.
const TERM_REMINDER: Duration = Duration::from_secs(1);

/// Messages from workers that may wait for `ClusterWatcher::messages`.
pub(crate) const MESSAGE_QUEUE: usize = 4096;

/// A user message from a worker, before the handle attaches a reply path.
pub(crate) struct Incoming {
    pub slot: u32,
    pub context_id: u64,
    pub pid: u32,
    pub bytes: Vec<u8>,
}

/// What a worker's `listen` request gets.
enum Grant {
    Fd(OwnedFd),
    Handoff(crate::ipc::message::Handoff),
}

/// How the supervisor ended.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Stopped,
    Failed(Kind, String),
}

struct Worker {
    slot: u32,
    pid: u32,
    state: WorkerState,
    started: Instant,
    outbound: mpsc::UnboundedSender<Outbound>,
    /// Said `Hello`: uses the library, so it reports readiness and answers pings.
    hello: bool,
    /// When to send SIGKILL if the worker is still alive (stopping).
    kill_at: Option<Instant>,
    /// When to send SIGTERM to a library worker asked to stop in-band.
    term_at: Option<Instant>,
    /// A replacement must be ready by then.
    ready_by: Option<Instant>,
    /// Heartbeat: when to check and ping next, and the last answer.
    next_ping_at: Option<Instant>,
    last_pong: Instant,
    ping_seq: u64,
    /// Why the watcher killed it, for the exit log.
    killed_for: Option<String>,
    /// Whether balancers may hand it connections (cleared on stop and kill).
    accepting: Arc<AtomicBool>,
}

impl Worker {
    fn stop(&mut self, deadline_ms: u64, kill_at: Instant) {
        if self.state == WorkerState::Stopping {
            return;
        }
        self.state = WorkerState::Stopping;
        self.accepting.store(false, Ordering::Relaxed);
        self.next_ping_at = None;
        self.ready_by = None;
        let _ = self.outbound.send(Outbound {
            msg: ToWorker::Stop { deadline_ms },
            fds: Vec::new(),
        });
        if self.hello {
            // A library worker reads the stop message in order, after every
            // message sent before it (handed-off connections among them): a
            // SIGTERM now could overtake those. It comes as a reminder.
            let now = Instant::now();
            let reminder = (kill_at.saturating_duration_since(now) / 2).min(TERM_REMINDER);
            self.term_at = Some(now + reminder);
        } else {
            signal(self.pid, Signal::SIGTERM);
        }
        self.kill_at = Some(kill_at);
    }

    fn kill(&mut self, why: impl Into<String>) {
        self.killed_for.get_or_insert_with(|| why.into());
        self.accepting.store(false, Ordering::Relaxed);
        self.next_ping_at = None;
        self.ready_by = None;
        signal(self.pid, Signal::SIGKILL);
    }
}

#[derive(Default)]
struct Slot {
    /// Context id of the worker serving this slot, if any.
    current: Option<u64>,
    /// Consecutive short-lived workers (for the backoff).
    failures: u32,
    /// When the next spawn is due, if one is scheduled.
    respawn_at: Option<Instant>,
    /// Workers started for this slot after the first one.
    restarts: u32,
    /// Serving workers that exited without being asked to.
    crashes: u32,
    /// How the slot's last worker ended.
    last_exit: Option<String>,
}

struct Reload {
    reason: String,
    started: Instant,
    pending: VecDeque<u32>,
    /// slot -> context id of its replacement, not yet ready.
    in_flight: HashMap<u32, u64>,
    failure: Option<String>,
    done: Vec<oneshot::Sender<Result<()>>>,
    replaced: usize,
}

pub(crate) struct Supervisor {
    config: Config,
    commands: mpsc::UnboundedReceiver<Command>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    listeners: HashMap<Address, OwnedFd>,
    slots: Vec<Slot>,
    workers: HashMap<u64, Worker>,
    next_context_id: u64,
    /// Some worker has been ready at least once: past start-up.
    ever_ready: bool,
    stopping: bool,
    failure: Option<(Kind, String)>,
    pid_file: Option<PidFile>,
    control: Option<control::Server>,
    reload: Option<Reload>,
    /// A reload asked for while one runs: its reasons and waiters.
    queued: Option<(String, Vec<oneshot::Sender<Result<()>>>)>,
    messages: mpsc::Sender<Incoming>,
    messages_dropped: u64,
    /// Handoff modes: the watcher's accept loop per address.
    balancers: HashMap<Address, Balancer>,
    /// Reuseport mode: one listener per address and slot.
    reuseport: HashMap<(Address, u32), OwnedFd>,
    next_listener_id: u64,
    /// Sockets passed by systemd's socket activation, handed out for
    /// matching addresses instead of binding.
    activated: Vec<systemd::Activated>,
    notifier: Option<Notifier>,
    /// When `WATCHDOG=1` is due next.
    watchdog_at: Option<Instant>,
    metrics: Option<metrics::Server>,
    counters: Counters,
    /// Every initial worker has been ready (`READY=1` was sent).
    ready: watch::Sender<bool>,
}

/// Counters for `--metrics` that have no other home.
#[derive(Default)]
struct Counters {
    reloads_ok: u64,
    reloads_failed: u64,
    messages_in: u64,
    messages_out: u64,
    /// Records workers reported dropping from their own queues.
    worker_log_drops: u64,
}

impl Supervisor {
    pub(crate) fn new(
        config: Config,
        commands: mpsc::UnboundedReceiver<Command>,
        messages: mpsc::Sender<Incoming>,
        ready: watch::Sender<bool>,
    ) -> Supervisor {
        let (events_tx, events) = mpsc::unbounded_channel();
        let slots = (0..config.workers).map(|_| Slot::default()).collect();
        Supervisor {
            config,
            commands,
            events_tx,
            events,
            listeners: HashMap::new(),
            slots,
            workers: HashMap::new(),
            next_context_id: 1,
            ever_ready: false,
            stopping: false,
            failure: None,
            pid_file: None,
            control: None,
            reload: None,
            queued: None,
            messages,
            messages_dropped: 0,
            balancers: HashMap::new(),
            reuseport: HashMap::new(),
            next_listener_id: 1,
            activated: Vec::new(),
            notifier: None,
            watchdog_at: None,
            metrics: None,
            counters: Counters::default(),
            ready,
        }
    }

    /// A sender for events, for pollers that ask for reloads.
    pub(crate) fn events(&self) -> mpsc::UnboundedSender<Event> {
        self.events_tx.clone()
    }

    /// Runs until every worker has exited after a stop (or a fatal error).
    pub(crate) async fn run(mut self, started: oneshot::Sender<Result<()>>) -> Outcome {
        if let Some(path) = self.config.pid_file.clone() {
            match PidFile::acquire(&path) {
                Ok(p) => self.pid_file = Some(p),
                Err(e) => {
                    let outcome = Outcome::Failed(e.kind(), e.to_string());
                    let _ = started.send(Err(e));
                    return outcome;
                }
            }
        }
        let control_path = self.config.control_socket.clone().or_else(|| {
            self.config
                .pid_file
                .as_deref()
                .map(control::socket_for_pid_file)
        });
        if let Some(path) = control_path {
            let (tx, mut rx) = mpsc::unbounded_channel();
            match control::Server::bind(&path, tx) {
                Ok(server) => self.control = Some(server),
                Err(e) => {
                    let outcome = Outcome::Failed(e.kind(), e.to_string());
                    let _ = started.send(Err(e));
                    return outcome;
                }
            }
            let events = self.events_tx.clone();
            tokio::spawn(async move {
                while let Some(action) = rx.recv().await {
                    if events.send(Event::Control(action)).is_err() {
                        return;
                    }
                }
            });
        }
        if let Some(addr) = self.config.metrics {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => {
                    tracing::info!("serving metrics on http://{addr}/metrics");
                    self.metrics = Some(metrics::Server::start(listener, self.events_tx.clone()));
                }
                Err(e) => {
                    let e =
                        Error::with_io(Kind::Bind, format!("cannot serve metrics on {addr}"), e);
                    let outcome = Outcome::Failed(e.kind(), e.to_string());
                    let _ = started.send(Err(e));
                    return outcome;
                }
            }
        }
        if self.config.systemd {
            self.activated = systemd::listen_fds();
            self.notifier = Notifier::from_env();
            if let Some(every) = self.notifier.as_ref().and_then(|n| n.watchdog) {
                tracing::debug!("systemd watchdog: WATCHDOG=1 every {every:?}");
                self.watchdog_at = Some(Instant::now());
            }
        }
        for slot in 1..=self.slots.len() as u32 {
            if let Err(e) = self.spawn(slot, false) {
                if slot == 1 {
                    // Nothing runs yet: report and stop.
                    let outcome = Outcome::Failed(e.kind(), e.to_string());
                    let _ = started.send(Err(e));
                    return outcome;
                }
                self.schedule_respawn(slot, &format!("could not be started ({e})"));
            }
        }
        let _ = started.send(Ok(()));
        tracing::debug!(
            "started {} worker(s) of {}",
            self.slots.len(),
            std::path::Path::new(&self.config.program).display()
        );

        let mut commands_open = true;
        loop {
            if self.stopping && self.workers.is_empty() {
                break;
            }
            let deadline = self.next_deadline();
            tokio::select! {
                Some(event) = self.events.recv() => self.on_event(event),
                cmd = self.commands.recv(), if commands_open => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => {
                        // The handle was dropped: stop gracefully.
                        commands_open = false;
                        self.begin_stop(self.config.shutdown_timeout);
                    }
                },
                _ = sleep_until(deadline) => self.on_timer(),
            }
        }
        self.shutdown_listeners();
        drop(self.metrics.take());
        drop(self.control.take());
        drop(self.pid_file.take());
        match self.failure.take() {
            Some((kind, message)) => Outcome::Failed(kind, message),
            None => {
                tracing::info!("all workers stopped");
                Outcome::Stopped
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let respawns = self.slots.iter().filter_map(|s| s.respawn_at);
        let assume = self.config.assume_ready_after;
        let workers = self.workers.values().flat_map(|w| {
            let assumed =
                (w.state == WorkerState::Starting && !w.hello).then(|| w.started + assume);
            [w.kill_at, w.term_at, w.ready_by, w.next_ping_at, assumed]
        });
        respawns
            .chain(workers.flatten())
            .chain(self.watchdog_at)
            .min()
    }

    /// Sends `lines` to systemd, if it listens.
    fn notify(&self, lines: &[String]) {
        if let Some(n) = &self.notifier {
            n.notify(lines);
        }
    }

    /// Number of slots whose worker is ready.
    fn ready_slots(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| {
                s.current
                    .and_then(|id| self.workers.get(&id))
                    .is_some_and(|w| w.state == WorkerState::Ready)
            })
            .count()
    }

    fn slot_mut(&mut self, slot: u32) -> Option<&mut Slot> {
        self.slots.get_mut(slot as usize - 1)
    }

    /// Spawns a worker for `slot`. A replacement (during a reload) does not
    /// take the slot until it is ready.
    fn spawn(&mut self, slot: u32, replacement: bool) -> Result<u64> {
        let context_id = self.next_context_id;
        self.next_context_id += 1;
        let spawned = process::spawn(&self.config, slot, context_id, &self.events_tx)?;
        tracing::debug!(
            "worker {slot} started: pid {}, context {context_id}",
            spawned.pid
        );
        let now = Instant::now();
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
                ready_by: replacement.then(|| now + self.config.ready_timeout),
                next_ping_at: None,
                last_pong: now,
                ping_seq: 0,
                killed_for: None,
                accepting: Arc::new(AtomicBool::new(true)),
            },
        );
        if let Some(s) = self.slot_mut(slot) {
            s.respawn_at = None;
            if !replacement {
                s.current = Some(context_id);
            }
        }
        Ok(context_id)
    }

    fn schedule_respawn(&mut self, slot: u32, why: &str) {
        let (first, max) = (self.config.respawn_delay, self.config.respawn_delay_max);
        let Some(s) = self.slot_mut(slot) else { return };
        let factor = 2u32.saturating_pow(s.failures.min(30));
        let delay = first.saturating_mul(factor).min(max);
        s.failures = s.failures.saturating_add(1);
        s.current = None;
        s.respawn_at = Some(Instant::now() + delay);
        if s.failures >= 5 {
            tracing::warn!(
                "worker {slot} {why}; it is crash-looping ({} failures in a row), next start in {delay:?}",
                s.failures
            );
        } else {
            tracing::warn!("worker {slot} {why}; restarting in {delay:?}");
        }
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if self.watchdog_at.is_some_and(|t| t <= now) {
            let every = self.notifier.as_ref().and_then(|n| n.watchdog);
            self.notify(&["WATCHDOG=1".into()]);
            self.watchdog_at = every.map(|d| now + d);
        }
        if !self.stopping {
            let due: Vec<u32> = (1..=self.slots.len() as u32)
                .filter(|&slot| {
                    self.slots[slot as usize - 1]
                        .respawn_at
                        .is_some_and(|t| t <= now)
                })
                .collect();
            for slot in due {
                self.slots[slot as usize - 1].restarts += 1;
                if let Err(e) = self.spawn(slot, false) {
                    self.schedule_respawn(slot, &format!("could not be started ({e})"));
                }
            }
        }
        let timeout = self.config.shutdown_timeout;
        let mut became_ready = Vec::new();
        let mut not_ready = Vec::new();
        for (&id, w) in self.workers.iter_mut() {
            if w.term_at.is_some_and(|t| t <= now) {
                w.term_at = None;
                signal(w.pid, Signal::SIGTERM);
            }
            if w.kill_at.is_some_and(|t| t <= now) {
                tracing::warn!(
                    "worker {} (pid {}) did not stop within {timeout:?}; killing it",
                    w.slot,
                    w.pid
                );
                w.kill_at = None;
                signal(w.pid, Signal::SIGKILL);
            }
            if w.ready_by.is_some_and(|t| t <= now) && w.state == WorkerState::Starting {
                not_ready.push(id);
            }
            if w.state == WorkerState::Starting
                && !w.hello
                && w.started + self.config.assume_ready_after <= now
            {
                became_ready.push(id);
            }
            if let (Some(at), Some(limit)) = (w.next_ping_at, self.config.heartbeat_timeout) {
                if at <= now {
                    if now.duration_since(w.last_pong) > limit {
                        tracing::error!(
                            "worker {} (pid {}) did not answer heartbeats for {limit:?} (its event loop may be blocked); killing it",
                            w.slot,
                            w.pid
                        );
                        w.kill("missed heartbeats");
                    } else {
                        w.ping_seq += 1;
                        let _ = w.outbound.send(Outbound {
                            msg: ToWorker::Ping { seq: w.ping_seq },
                            fds: Vec::new(),
                        });
                        w.next_ping_at = Some(now + heartbeat_interval(limit));
                    }
                }
            }
        }
        for id in became_ready {
            if let Some(w) = self.workers.get(&id) {
                tracing::debug!(
                    "worker {} (pid {}) has not contacted the watcher; assumed ready",
                    w.slot,
                    w.pid
                );
            }
            self.on_ready(id);
        }
        for id in not_ready {
            let ready_timeout = self.config.ready_timeout;
            if let Some(w) = self.workers.get_mut(&id) {
                let why = format!(
                    "the replacement for worker {} (pid {}) was not ready within {ready_timeout:?}",
                    w.slot, w.pid
                );
                w.state = WorkerState::Stopping;
                w.kill("not ready in time");
                self.replacement_failed(id, why);
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Stop { timeout } => self.begin_stop(timeout),
            Command::Kill => {
                self.begin_stop(self.config.shutdown_timeout);
                for w in self.workers.values_mut() {
                    w.kill_at = None;
                    w.kill("forced stop");
                }
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Restart { reason, done } => self.request_reload(reason, done),
            Command::Scale { to, done } => {
                let result = self.scale(to);
                if let Some(done) = done {
                    let _ = done.send(result);
                }
            }
            Command::Send { to, bytes } => {
                let targets: Vec<&Worker> = match to {
                    Some(id) => self.workers.get(&id).into_iter().collect(),
                    None => self
                        .workers
                        .values()
                        .filter(|w| w.state != WorkerState::Stopping)
                        .collect(),
                };
                if targets.is_empty() {
                    tracing::debug!("message to {to:?} dropped: no such worker");
                }
                self.counters.messages_out += targets.len() as u64;
                for w in targets {
                    let _ = w.outbound.send(Outbound {
                        msg: ToWorker::Data(bytes.clone()),
                        fds: Vec::new(),
                    });
                }
            }
        }
    }

    fn status(&self) -> Vec<WorkerInfo> {
        let mut list: Vec<WorkerInfo> = self
            .workers
            .iter()
            .map(|(&context_id, w)| WorkerInfo {
                slot: w.slot,
                context_id,
                pid: w.pid,
                state: w.state,
                restarts: self
                    .slots
                    .get(w.slot as usize - 1)
                    .map(|s| s.restarts)
                    .unwrap_or(0),
                uptime: w.started.elapsed(),
                rss_bytes: None,
                cpu_time: None,
                last_exit: self
                    .slots
                    .get(w.slot as usize - 1)
                    .and_then(|s| s.last_exit.clone()),
            })
            .collect();
        list.sort_by_key(|w| (w.slot, w.context_id));
        list
    }

    /// The counters and workers for one metrics scrape.
    fn snapshot(&self) -> Snapshot {
        let mut workers: Vec<(u32, u32, WorkerState)> = self
            .workers
            .values()
            .map(|w| (w.slot, w.pid, w.state))
            .collect();
        workers.sort_by_key(|w| (w.0, w.1));
        let (log_records, output_drops) = self.config.output.counts();
        Snapshot {
            workers,
            slots: (1..=self.slots.len() as u32)
                .zip(&self.slots)
                .map(|(n, s)| (n, u64::from(s.restarts), u64::from(s.crashes)))
                .collect(),
            reloads_ok: self.counters.reloads_ok,
            reloads_failed: self.counters.reloads_failed,
            log_records,
            log_dropped: output_drops + self.counters.worker_log_drops,
            messages_in: self.counters.messages_in,
            messages_out: self.counters.messages_out,
        }
    }

    fn begin_stop(&mut self, timeout: Duration) {
        if !self.stopping && self.failure.is_none() {
            tracing::info!("stopping {} worker(s)", self.workers.len());
        }
        if !self.stopping {
            self.notify(&["STOPPING=1".into(), "STATUS=stopping".into()]);
        }
        self.stopping = true;
        for s in &mut self.slots {
            s.respawn_at = None;
        }
        if let Some(mut reload) = self.reload.take() {
            reload.failure = Some("the watcher is stopping".into());
            finish_reload(reload);
            self.counters.reloads_failed += 1;
        }
        if let Some((_, waiters)) = self.queued.take() {
            for w in waiters {
                let _ = w.send(Err(Error::new(Kind::Config, "the watcher is stopping")));
            }
        }
        let deadline_ms = timeout.as_millis().min(u64::MAX as u128) as u64;
        let kill_at = Instant::now() + timeout;
        for w in self.workers.values_mut() {
            w.stop(deadline_ms, kill_at);
        }
    }

    fn stop_worker(&mut self, context_id: u64) {
        let timeout = self.config.shutdown_timeout;
        let deadline_ms = timeout.as_millis().min(u64::MAX as u128) as u64;
        if let Some(w) = self.workers.get_mut(&context_id) {
            w.stop(deadline_ms, Instant::now() + timeout);
        }
    }

    /// Stops with an error: used when start-up cannot succeed.
    fn fail(&mut self, kind: Kind, message: String) {
        if self.failure.is_none() {
            // The caller (the CLI) reports the failure once, as its last line.
            tracing::debug!("fatal: {message}");
            self.failure = Some((kind, message));
        }
        self.begin_stop(self.config.shutdown_timeout);
    }

    // ----- rolling restart -------------------------------------------------

    fn request_reload(&mut self, reason: String, done: Option<oneshot::Sender<Result<()>>>) {
        if self.stopping {
            if let Some(done) = done {
                let _ = done.send(Err(Error::new(Kind::Config, "the watcher is stopping")));
            }
            return;
        }
        if self.reload.is_some() {
            tracing::info!("{reason}: a rolling restart is running; queued");
            let queued = self
                .queued
                .get_or_insert_with(|| (String::new(), Vec::new()));
            if queued.0.is_empty() {
                queued.0 = reason;
            } else if !queued.0.contains(&reason) {
                queued.0 = format!("{}, {reason}", queued.0);
            }
            queued.1.extend(done);
            return;
        }
        tracing::info!(
            "{reason}: rolling restart of {} worker(s)",
            self.slots.len()
        );
        self.notify(&[
            "RELOADING=1".into(),
            format!("MONOTONIC_USEC={}", systemd::monotonic_usec()),
            format!("STATUS=rolling restart ({reason})"),
        ]);
        self.reload = Some(Reload {
            reason,
            started: Instant::now(),
            pending: (1..=self.slots.len() as u32).collect(),
            in_flight: HashMap::new(),
            failure: None,
            done: done.into_iter().collect(),
            replaced: 0,
        });
        self.reload_step();
    }

    fn reload_step(&mut self) {
        let batch = self.config.reload_batch.max(1);
        loop {
            let Some(reload) = self.reload.as_mut() else {
                return;
            };
            if reload.failure.is_some() {
                reload.pending.clear();
                // Kill replacements that are still starting; old workers stay.
                let in_flight: Vec<u64> = reload.in_flight.drain().map(|(_, id)| id).collect();
                for id in in_flight {
                    if let Some(w) = self.workers.get_mut(&id) {
                        w.state = WorkerState::Stopping;
                        w.kill("rolling restart aborted");
                    }
                }
            }
            let reload = self.reload.as_mut().expect("checked above");
            if reload.in_flight.len() >= batch || reload.pending.is_empty() {
                if reload.pending.is_empty() && reload.in_flight.is_empty() {
                    let reload = self.reload.take().expect("checked above");
                    let failed = reload.failure.is_some();
                    finish_reload(reload);
                    if failed {
                        self.counters.reloads_failed += 1;
                    } else {
                        self.counters.reloads_ok += 1;
                    }
                    let status = if failed {
                        format!(
                            "STATUS={} worker(s) ready; the last rolling restart failed",
                            self.ready_slots()
                        )
                    } else {
                        format!("STATUS={} worker(s) ready", self.ready_slots())
                    };
                    self.notify(&["READY=1".into(), status]);
                    if let Some((reason, done)) = self.queued.take() {
                        self.request_reload(reason, None);
                        if let Some(r) = self.reload.as_mut() {
                            r.done.extend(done);
                        }
                    }
                }
                return;
            }
            let slot = reload.pending.pop_front().expect("not empty");
            if slot as usize > self.slots.len() {
                continue; // scaled down meanwhile
            }
            match self.spawn(slot, true) {
                Ok(id) => {
                    self.slots[slot as usize - 1].restarts += 1;
                    if let Some(r) = self.reload.as_mut() {
                        r.in_flight.insert(slot, id);
                    }
                }
                Err(e) => {
                    if let Some(r) = self.reload.as_mut() {
                        r.failure =
                            Some(format!("cannot start a replacement for worker {slot}: {e}"));
                    }
                }
            }
        }
    }

    /// A replacement exited or timed out before it was ready.
    fn replacement_failed(&mut self, context_id: u64, why: String) {
        let Some(reload) = self.reload.as_mut() else {
            return;
        };
        let Some((&slot, _)) = reload.in_flight.iter().find(|(_, &id)| id == context_id) else {
            return;
        };
        reload.in_flight.remove(&slot);
        tracing::error!("{why}; the old worker keeps serving");
        reload.failure.get_or_insert(why);
        // A slot left without any worker (its old one died meanwhile) respawns.
        if self
            .slots
            .get(slot as usize - 1)
            .is_some_and(|s| s.current.is_none())
        {
            self.schedule_respawn(slot, "has no worker after a failed replacement");
        }
        self.reload_step();
    }

    fn on_ready(&mut self, context_id: u64) {
        let heartbeat = self.config.heartbeat_timeout;
        let Some(w) = self.workers.get_mut(&context_id) else {
            return;
        };
        if w.state != WorkerState::Starting {
            return;
        }
        w.state = WorkerState::Ready;
        w.ready_by = None;
        let now = Instant::now();
        if w.hello {
            tracing::info!("worker {} (pid {}) is ready", w.slot, w.pid);
            if let Some(limit) = heartbeat {
                w.last_pong = now;
                w.next_ping_at = Some(now + heartbeat_interval(limit));
            }
        }
        let slot = w.slot;
        self.ever_ready = true;
        if !*self.ready.borrow() && self.ready_slots() == self.slots.len() {
            tracing::debug!("every worker is ready");
            self.ready.send_replace(true);
            self.notify(&[
                "READY=1".into(),
                format!("MAINPID={}", std::process::id()),
                format!("STATUS={} worker(s) ready", self.slots.len()),
            ]);
        }
        let Some(reload) = self.reload.as_mut() else {
            return;
        };
        if reload.in_flight.get(&slot) != Some(&context_id) {
            return;
        }
        reload.in_flight.remove(&slot);
        reload.replaced += 1;
        let old = self.slots[slot as usize - 1].current.replace(context_id);
        if let Some(old) = old.filter(|&o| o != context_id) {
            self.stop_worker(old);
        }
        self.reload_step();
    }

    // ----- scaling ---------------------------------------------------------

    fn scale(&mut self, to: Scale) -> Result<usize> {
        if self.stopping {
            return Err(Error::new(Kind::Config, "the watcher is stopping"));
        }
        let target = match to {
            Scale::Up => self.slots.len() + 1,
            Scale::Down => self.slots.len().saturating_sub(1),
            Scale::To(n) => n,
        };
        if target == 0 {
            return Err(Error::new(
                Kind::Config,
                "a cluster keeps at least 1 worker",
            ));
        }
        if target > 4096 {
            return Err(Error::new(Kind::Config, "at most 4096 workers"));
        }
        while self.slots.len() < target {
            self.slots.push(Slot::default());
            let slot = self.slots.len() as u32;
            if let Err(e) = self.spawn(slot, false) {
                self.schedule_respawn(slot, &format!("could not be started ({e})"));
            }
        }
        while self.slots.len() > target {
            let slot = self.slots.len() as u32;
            let removed = self.slots.pop().expect("more than target");
            // A retired slot's reuseport listeners close; connections still
            // queued in them are reset (Linux does not migrate them by default).
            self.reuseport.retain(|(_, s), _| *s != slot);
            if let Some(reload) = self.reload.as_mut() {
                reload.pending.retain(|&s| s != slot);
                if let Some(id) = reload.in_flight.remove(&slot) {
                    if let Some(w) = self.workers.get_mut(&id) {
                        w.state = WorkerState::Stopping;
                        w.kill("scaled down");
                    }
                }
            }
            if let Some(id) = removed.current {
                self.stop_worker(id);
            }
        }
        tracing::info!("now running {} worker(s)", self.slots.len());
        if self.reload.is_some() {
            self.reload_step();
        }
        Ok(self.slots.len())
    }

    // ----- events ----------------------------------------------------------

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Message {
                context_id,
                msg,
                fds,
            } => self.on_message(context_id, msg, fds),
            Event::ChannelClosed { context_id, error } => {
                let Some(w) = self.workers.get_mut(&context_id) else {
                    return;
                };
                match error {
                    // EOF: the worker closed its end, most likely exiting.
                    RecvError::Closed => {}
                    error => {
                        tracing::error!(
                            "worker {} (pid {}) broke the protocol ({error}); replacing it",
                            w.slot,
                            w.pid
                        );
                        w.kill("protocol error");
                    }
                }
            }
            Event::Exited { context_id, status } => self.on_exit(context_id, status),
            Event::ReloadRequested(reason) => self.request_reload(reason, None),
            Event::Metrics(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Event::Control(action) => match action {
                Action::Status(reply) => {
                    let _ = reply.send((self.status(), self.slots.len()));
                }
                Action::Reload(done) => {
                    self.request_reload("reload requested".into(), Some(done));
                }
                Action::Stop => {
                    tracing::info!("stop requested");
                    self.begin_stop(self.config.shutdown_timeout);
                }
                Action::Scale(n, done) => {
                    let _ = done.send(self.scale(Scale::To(n)));
                }
            },
        }
    }

    fn on_exit(&mut self, context_id: u64, status: Option<ExitStatus>) {
        let Some(w) = self.workers.remove(&context_id) else {
            return;
        };
        w.accepting.store(false, Ordering::Relaxed);
        let mut how = process::describe_exit(status);
        if let Some(why) = &w.killed_for {
            how = format!("{how} ({why})");
        }
        let slot = w.slot;
        if let Some(s) = self.slots.get_mut(slot as usize - 1) {
            let mut last = how.strip_prefix("was ").unwrap_or(&how).to_string();
            if w.killed_for.is_none() && w.state == WorkerState::Stopping {
                last.push_str(" (asked to stop)");
            }
            s.last_exit = Some(last);
        }
        let in_flight = self
            .reload
            .as_ref()
            .and_then(|r| r.in_flight.get(&slot).copied());
        if in_flight == Some(context_id) {
            let why = format!(
                "the replacement for worker {slot} (pid {}) {how} before it was ready",
                w.pid
            );
            self.replacement_failed(context_id, why);
            return;
        }
        let Some(s) = self.slots.get_mut(slot as usize - 1) else {
            tracing::debug!("worker {slot} (pid {}) {how} (slot retired)", w.pid);
            return;
        };
        let was_current = s.current == Some(context_id);
        if was_current {
            s.current = None;
        }
        if self.stopping || w.state == WorkerState::Stopping || !was_current {
            tracing::debug!("worker {slot} (pid {}) {how}", w.pid);
            return;
        }
        if w.started.elapsed() >= self.config.backoff_reset {
            s.failures = 0;
        }
        s.crashes = s.crashes.saturating_add(1);
        if in_flight.is_some() {
            // Its replacement is starting and will take the slot.
            tracing::warn!(
                "worker {slot} (pid {}) {how}; its replacement is starting",
                w.pid
            );
            return;
        }
        self.schedule_respawn(slot, &format!("(pid {}) {how}", w.pid));
    }

    fn on_message(&mut self, context_id: u64, msg: ToWatcher, fds: Vec<OwnedFd>) {
        let Some(w) = self.workers.get_mut(&context_id) else {
            return;
        };
        if let ToWatcher::ConnectionReturned { listener, peer } = &msg {
            match (
                fds.len(),
                self.balancers.values().find(|b| b.id == *listener),
            ) {
                (1, Some(b)) => {
                    let fd = fds.into_iter().next().expect("one descriptor");
                    b.returned(context_id, fd, peer);
                    return;
                }
                (1, None) => return, // the listener is gone: the connection closes
                _ => {}              // malformed: handled below
            }
        }
        if !fds.is_empty() {
            tracing::error!(
                "worker {} (pid {}) sent {} unexpected descriptor(s); replacing it",
                w.slot,
                w.pid,
                fds.len()
            );
            w.kill("protocol error");
            return;
        }
        match msg {
            ToWatcher::Hello { version, pid } => {
                if version != VERSION {
                    tracing::error!(
                        "worker {} (pid {pid}) speaks protocol {version}, the watcher {VERSION}; replacing it",
                        w.slot
                    );
                    w.kill("protocol version mismatch");
                    return;
                }
                w.hello = true;
                let _ = w.outbound.send(Outbound {
                    msg: ToWorker::Hello {
                        version: VERSION,
                        context_id,
                        slot: w.slot,
                    },
                    fds: Vec::new(),
                });
            }
            ToWatcher::Ready => {
                w.hello = true;
                self.on_ready(context_id);
            }
            ToWatcher::SocketRequest { id, addr } => self.on_socket_request(context_id, id, addr),
            ToWatcher::Pong { .. } => w.last_pong = Instant::now(),
            ToWatcher::Logs(records) => {
                let source = Source::Worker {
                    slot: w.slot,
                    pid: w.pid,
                };
                for record in records {
                    self.config.output.emit(source, record);
                }
            }
            ToWatcher::LogsDropped(n) => {
                self.counters.worker_log_drops += n;
                let source = Source::Worker {
                    slot: w.slot,
                    pid: w.pid,
                };
                self.config.output.note(
                    source,
                    2,
                    "",
                    format!("{n} log record(s) dropped by the worker: its log queue was full"),
                );
            }
            ToWatcher::ConnectionReturned { .. } => {
                tracing::error!(
                    "worker {} (pid {}) returned a connection without exactly one descriptor; replacing it",
                    w.slot,
                    w.pid
                );
                w.kill("protocol error");
            }
            ToWatcher::ConnectionsClosed { listener, count } => {
                if let Some(b) = self.balancers.values().find(|b| b.id == listener) {
                    b.closed(context_id, count);
                }
            }
            ToWatcher::Data(bytes) => {
                self.counters.messages_in += 1;
                let incoming = Incoming {
                    slot: w.slot,
                    context_id,
                    pid: w.pid,
                    bytes,
                };
                if self.messages.try_send(incoming).is_err() {
                    self.messages_dropped += 1;
                    if self.messages_dropped.is_power_of_two() {
                        tracing::warn!(
                            "{} message(s) from workers dropped: nobody reads ClusterWatcher::messages() fast enough",
                            self.messages_dropped
                        );
                    }
                }
            }
        }
    }

    fn on_socket_request(&mut self, context_id: u64, id: u64, addr: String) {
        let Some(slot) = self.workers.get(&context_id).map(|w| w.slot) else {
            return;
        };
        let handoff = self.config.balance.hands_off();
        let granted = Address::parse(&addr).and_then(|parsed| match parsed {
            parsed if handoff => self.handoff_for(&parsed).map(Grant::Handoff),
            // A socket-activated address has one socket: shared by all slots.
            parsed @ Address::Tcp(_)
                if self.config.balance == Balance::Reuseport
                    && self.activated_for(&parsed).is_none() =>
            {
                self.reuseport_for(&parsed, slot).map(Grant::Fd)
            }
            parsed => self.listener_for(&parsed).map(Grant::Fd),
        });
        let Some(w) = self.workers.get(&context_id) else {
            return;
        };
        let (msg, fds) = match granted {
            Ok(Grant::Fd(fd)) => (ToWorker::SocketReply { id, result: Ok(()) }, vec![fd]),
            Ok(Grant::Handoff(h)) => (ToWorker::HandoffReply { id, result: Ok(h) }, Vec::new()),
            Err(e) => {
                let message = e.to_string();
                let reply = if handoff {
                    ToWorker::HandoffReply {
                        id,
                        result: Err(message.clone()),
                    }
                } else {
                    ToWorker::SocketReply {
                        id,
                        result: Err(message.clone()),
                    }
                };
                let _ = w.outbound.send(Outbound {
                    msg: reply,
                    fds: Vec::new(),
                });
                if !self.ever_ready && (e.is_bind() || e.is_invalid_address()) {
                    self.fail(e.kind(), message);
                } else {
                    tracing::error!("worker {} asked for {addr:?}: {message}", w.slot);
                }
                return;
            }
        };
        let joins = match &msg {
            ToWorker::HandoffReply { result: Ok(h), .. } => Some(h.listener),
            _ => None,
        };
        let _ = w.outbound.send(Outbound { msg, fds });
        if let Some(listener) = joins {
            if let Some(b) = self.balancers.values().find(|b| b.id == listener) {
                b.add(context_id, w.outbound.clone(), w.accepting.clone());
            }
        }
    }

    /// Handoff modes: the balancer for `addr` (bound and started on first
    /// request). The caller adds the worker to its pool after replying.
    fn handoff_for(&mut self, addr: &Address) -> Result<crate::ipc::message::Handoff> {
        if !self.balancers.contains_key(addr) {
            let fd = match self.activated_for(addr) {
                Some(fd) => fd?,
                None => addr.bind(self.config.backlog)?,
            };
            let id = self.next_listener_id;
            self.next_listener_id += 1;
            let balancer = Balancer::start(id, self.config.balance, addr, fd)
                .map_err(|e| Error::with_io(Kind::Bind, format!("cannot listen on {addr}"), e))?;
            tracing::info!(
                "listening on {addr} ({:?}: the watcher accepts)",
                self.config.balance
            );
            self.balancers.insert(addr.clone(), balancer);
        }
        // The worker joins the pool only after its reply is queued (see
        // `on_socket_request`), so no connection can overtake the reply.
        let b = &self.balancers[addr];
        Ok(crate::ipc::message::Handoff {
            listener: b.id,
            local: b.local.clone(),
        })
    }

    /// Reuseport mode: the listener of `slot` for `addr`, bound on first
    /// request and kept for the slot's replacements.
    fn reuseport_for(&mut self, addr: &Address, slot: u32) -> Result<OwnedFd> {
        let key = (addr.clone(), slot);
        if !self.reuseport.contains_key(&key) {
            // Every slot of a port-0 address shares the port the first drew.
            let port = self
                .reuseport
                .iter()
                .find(|((a, _), _)| a == addr)
                .and_then(|(_, fd)| socket2::SockRef::from(fd).local_addr().ok())
                .and_then(|a| a.as_socket())
                .map(|a| a.port());
            let fd = addr.bind_reuseport(self.config.backlog, port)?;
            tracing::info!("listening on {addr} (reuseport, slot {slot})");
            self.reuseport.insert(key.clone(), fd);
        }
        self.reuseport[&key].try_clone().map_err(|e| {
            Error::with_io(
                Kind::Io,
                format!("cannot duplicate the listener for {addr}"),
                e,
            )
        })
    }

    /// A duplicate of the socket-activated listener matching `addr`, if
    /// systemd passed one.
    fn activated_for(&self, addr: &Address) -> Option<Result<OwnedFd>> {
        let a = self
            .activated
            .iter()
            .find(|a| systemd::matches(addr, &a.addr))?;
        Some(a.fd.try_clone().map_err(|e| {
            Error::with_io(
                Kind::Io,
                format!("cannot duplicate the socket-activated listener for {addr}"),
                e,
            )
        }))
    }

    /// The listener for `addr`, bound on first request, duplicated for each caller.
    fn listener_for(&mut self, parsed: &Address) -> Result<OwnedFd> {
        if let Some(fd) = self.activated_for(parsed) {
            return fd;
        }
        let parsed = parsed.clone();
        if !self.listeners.contains_key(&parsed) {
            let fd = parsed.bind(self.config.backlog)?;
            tracing::info!("listening on {parsed}");
            self.listeners.insert(parsed.clone(), fd);
        }
        let fd = &self.listeners[&parsed];
        fd.try_clone().map_err(|e| {
            Error::with_io(
                Kind::Io,
                format!("cannot duplicate the listener for {parsed}"),
                e,
            )
        })
    }

    fn shutdown_listeners(&mut self) {
        self.reuseport.clear();
        let handed: Vec<Address> = self.balancers.drain().map(|(a, _)| a).collect();
        for addr in handed {
            if let Address::Unix(path) = addr {
                let _ = std::fs::remove_file(path);
            }
        }
        for (addr, fd) in self.listeners.drain() {
            drop(fd);
            if let Address::Unix(path) = addr {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

fn finish_reload(reload: Reload) {
    let took = reload.started.elapsed();
    let result = match reload.failure {
        None => {
            tracing::info!(
                "rolling restart ({}) done: {} worker(s) replaced in {took:.1?}",
                reload.reason,
                reload.replaced
            );
            Ok(())
        }
        Some(why) => {
            tracing::error!(
                "rolling restart ({}) failed after replacing {} worker(s): {why}",
                reload.reason,
                reload.replaced
            );
            Err(Error::new(Kind::Reload, why))
        }
    };
    let mut done = reload.done.into_iter();
    if let Some(last) = done.next_back() {
        for d in done {
            let _ = d.send(
                result
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| Error::new(Kind::Reload, e.to_string())),
            );
        }
        let _ = last.send(result);
    }
}

/// How often to ping: a quarter of the timeout, between 50 ms and 5 s.
fn heartbeat_interval(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn signal(pid: u32, sig: Signal) {
    if pid == 0 {
        return;
    }
    // Callers only signal workers still in the map, that is, whose exit
    // event has not been handled. The waiter task reaps before that event
    // is handled, so a pid could in theory be reused inside that short
    // window; a pidfd would close it (noted in ARCHITECTURE.md).
    let _ = kill(Pid::from_raw(pid as i32), sig);
}
