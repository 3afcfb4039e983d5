//! The supervisor: one task that owns every listener and every worker.
//!
//! All state changes happen here, in response to one event at a time:
//! a message or failure on a worker's channel, a worker's exit, a command
//! from the [`ClusterWatcher`](super::ClusterWatcher) handle, or a timer
//! (a respawn that is due, a stop deadline that passed).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::process::{self, Outbound};
use super::{Config, WorkerInfo, WorkerState};
use crate::error::{Error, Kind, Result};
use crate::ipc::message::{ToWatcher, ToWorker, VERSION};
use crate::ipc::RecvError;
use crate::pidfile::PidFile;
use crate::socket::Address;

/// Something that happened to a worker, reported by its tasks.
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
}

/// A request from the handle.
pub(crate) enum Command {
    Stop { timeout: Duration },
    Kill,
    Status(oneshot::Sender<Vec<WorkerInfo>>),
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
    /// When to send SIGKILL if the worker is still alive.
    kill_at: Option<Instant>,
}

#[derive(Default)]
struct Slot {
    /// Context id of the worker serving this slot, if any.
    current: Option<u64>,
    /// Consecutive short-lived workers (for the backoff).
    failures: u32,
    /// When the next spawn is due, if one is scheduled.
    respawn_at: Option<Instant>,
    restarts: u32,
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
}

impl Supervisor {
    pub(crate) fn new(
        config: Config,
        commands: mpsc::UnboundedReceiver<Command>,
    ) -> Result<Supervisor> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let slots = (0..config.workers).map(|_| Slot::default()).collect();
        Ok(Supervisor {
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
        })
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
        for index in 0..self.slots.len() {
            if let Err(e) = self.spawn(index as u32 + 1) {
                if index == 0 {
                    // Nothing runs yet: report and stop.
                    let outcome = Outcome::Failed(e.kind(), e.to_string());
                    let _ = started.send(Err(e));
                    return outcome;
                }
                self.schedule_respawn(index as u32 + 1, &e.to_string());
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
        let kills = self.workers.values().filter_map(|w| w.kill_at);
        respawns.chain(kills).min()
    }

    fn spawn(&mut self, slot: u32) -> Result<()> {
        let context_id = self.next_context_id;
        self.next_context_id += 1;
        let spawned = process::spawn(&self.config, slot, context_id, &self.events_tx)?;
        tracing::debug!(
            "worker {slot} started: pid {}, context {context_id}",
            spawned.pid
        );
        self.workers.insert(
            context_id,
            Worker {
                slot,
                pid: spawned.pid,
                state: WorkerState::Starting,
                started: Instant::now(),
                outbound: spawned.outbound,
                kill_at: None,
            },
        );
        let s = &mut self.slots[slot as usize - 1];
        s.current = Some(context_id);
        s.respawn_at = None;
        Ok(())
    }

    fn schedule_respawn(&mut self, slot: u32, why: &str) {
        let config = &self.config;
        let s = &mut self.slots[slot as usize - 1];
        let factor = 2u32.saturating_pow(s.failures.min(30));
        let delay = config
            .respawn_delay
            .saturating_mul(factor)
            .min(config.respawn_delay_max);
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
        if !self.stopping {
            let due: Vec<u32> = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.respawn_at.is_some_and(|t| t <= now))
                .map(|(i, _)| i as u32 + 1)
                .collect();
            for slot in due {
                self.slots[slot as usize - 1].restarts += 1;
                if let Err(e) = self.spawn(slot) {
                    self.schedule_respawn(slot, &format!("could not be started ({e})"));
                }
            }
        }
        for w in self.workers.values_mut() {
            if w.kill_at.is_some_and(|t| t <= now) {
                tracing::warn!(
                    "worker {} (pid {}) did not stop within {:?}; killing it",
                    w.slot,
                    w.pid,
                    self.config.shutdown_timeout
                );
                signal(w.pid, Signal::SIGKILL);
                w.kill_at = None;
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Stop { timeout } => self.begin_stop(timeout),
            Command::Kill => {
                self.stopping = true;
                for s in &mut self.slots {
                    s.respawn_at = None;
                }
                for w in self.workers.values_mut() {
                    signal(w.pid, Signal::SIGKILL);
                    w.state = WorkerState::Stopping;
                    w.kill_at = None;
                }
            }
            Command::Status(reply) => {
                let mut list: Vec<WorkerInfo> = self
                    .workers
                    .iter()
                    .map(|(&context_id, w)| WorkerInfo {
                        slot: w.slot,
                        context_id,
                        pid: w.pid,
                        state: w.state,
                        restarts: self.slots[w.slot as usize - 1].restarts,
                    })
                    .collect();
                list.sort_by_key(|w| (w.slot, w.context_id));
                let _ = reply.send(list);
            }
        }
    }

    fn begin_stop(&mut self, timeout: Duration) {
        if !self.stopping && self.failure.is_none() {
            tracing::info!("stopping {} worker(s)", self.workers.len());
        }
        self.stopping = true;
        for s in &mut self.slots {
            s.respawn_at = None;
        }
        let deadline_ms = timeout.as_millis().min(u64::MAX as u128) as u64;
        let kill_at = Instant::now() + timeout;
        for w in self.workers.values_mut() {
            if w.state == WorkerState::Stopping {
                continue;
            }
            w.state = WorkerState::Stopping;
            let _ = w.outbound.send(Outbound {
                msg: ToWorker::Stop { deadline_ms },
                fds: Vec::new(),
            });
            signal(w.pid, Signal::SIGTERM);
            w.kill_at = Some(kill_at);
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

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Message {
                context_id,
                msg,
                fds,
            } => self.on_message(context_id, msg, fds),
            Event::ChannelClosed { context_id, error } => {
                let Some(w) = self.workers.get(&context_id) else {
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
                        signal(w.pid, Signal::SIGKILL);
                    }
                }
            }
            Event::Exited { context_id, status } => {
                let Some(w) = self.workers.remove(&context_id) else {
                    return;
                };
                let how = process::describe_exit(status);
                let slot = w.slot;
                let s = &mut self.slots[slot as usize - 1];
                if s.current == Some(context_id) {
                    s.current = None;
                }
                if self.stopping || w.state == WorkerState::Stopping {
                    tracing::debug!("worker {slot} (pid {}) {how}", w.pid);
                    return;
                }
                if w.started.elapsed() >= self.config.backoff_reset {
                    s.failures = 0;
                }
                self.schedule_respawn(slot, &format!("(pid {}) {how}", w.pid));
            }
        }
    }

    fn on_message(&mut self, context_id: u64, msg: ToWatcher, fds: Vec<OwnedFd>) {
        let Some(w) = self.workers.get_mut(&context_id) else {
            return;
        };
        if !fds.is_empty() {
            tracing::error!(
                "worker {} (pid {}) sent {} unexpected descriptor(s); replacing it",
                w.slot,
                w.pid,
                fds.len()
            );
            signal(w.pid, Signal::SIGKILL);
            return;
        }
        match msg {
            ToWatcher::Hello { version, pid } => {
                if version != VERSION {
                    tracing::error!(
                        "worker {} (pid {pid}) speaks protocol {version}, the watcher {VERSION}; replacing it",
                        w.slot
                    );
                    signal(w.pid, Signal::SIGKILL);
                    return;
                }
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
                if w.state == WorkerState::Starting {
                    w.state = WorkerState::Ready;
                    tracing::info!("worker {} (pid {}) is ready", w.slot, w.pid);
                }
                self.ever_ready = true;
            }
            ToWatcher::SocketRequest { id, addr } => self.on_socket_request(context_id, id, addr),
            ToWatcher::Pong { .. } | ToWatcher::Data(_) => {}
        }
    }

    fn on_socket_request(&mut self, context_id: u64, id: u64, addr: String) {
        let result = self.listener_for(&addr);
        let Some(w) = self.workers.get(&context_id) else {
            return;
        };
        let (result, fds) = match result {
            Ok(fd) => (Ok(()), vec![fd]),
            Err(e) => {
                let message = e.to_string();
                if !self.ever_ready && (e.is_bind() || e.is_invalid_address()) {
                    let _ = w.outbound.send(Outbound {
                        msg: ToWorker::SocketReply {
                            id,
                            result: Err(message.clone()),
                        },
                        fds: Vec::new(),
                    });
                    self.fail(e.kind(), message);
                    return;
                }
                tracing::error!("worker {} asked for {addr:?}: {message}", w.slot);
                (Err(message), Vec::new())
            }
        };
        let _ = w.outbound.send(Outbound {
            msg: ToWorker::SocketReply { id, result },
            fds,
        });
    }

    /// The listener for `addr`, bound on first request, duplicated for each caller.
    fn listener_for(&mut self, addr: &str) -> Result<OwnedFd> {
        let parsed = Address::parse(addr)?;
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
        for (addr, fd) in self.listeners.drain() {
            drop(fd);
            if let Address::Unix(path) = addr {
                let _ = std::fs::remove_file(path);
            }
        }
    }
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
