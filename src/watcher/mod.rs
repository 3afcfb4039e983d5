//! The watcher: [`ClusterWatcher`], built from code or by the `cluster` CLI.
//!
//! The watcher owns every listening socket, spawns the workers by fork+exec,
//! supervises them (respawn with backoff), and stops them gracefully. One
//! supervisor task owns all state (`supervise/`); the handle here, the
//! signals, the control socket, the metrics responder and the reload
//! triggers all talk to it with the same [`Command`]s on one channel.

mod balance;
mod bind_policy;
pub(crate) mod capture;
pub(crate) mod config;
mod control;
mod control_hub;
pub(crate) mod event;
mod exec;
mod hooks;
pub(crate) mod http;
pub(crate) mod hub;
pub(crate) mod listen;
mod log_format;
mod metrics;
mod names;
pub(crate) mod notify;
pub(crate) mod output;
pub(crate) mod process;
pub(crate) mod procfs;
pub(crate) mod recycle;
mod reload_triggers;
mod revive;
mod sampler;
pub(crate) mod status;
mod supervise;
pub(crate) mod systemd;
pub(crate) mod upgrade;

pub use balance::Balance;
pub use config::{ClusterWatcherBuilder, DEFAULT_MAX_RESTARTS, DEFAULT_RESTART_WINDOW};
pub use output::{LogFormat, LogOutput, WatcherLogLayer};
pub use revive::Revive;
pub use status::{Traffic, WorkerInfo, WorkerState};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Kind, Result};
use crate::ipc::codec::{decode_user, encode_user};
use crate::signal::WatcherSignal;
use config::Config;
use event::{Command, CommandSender, Incoming, Outcome, Scale, MESSAGE_QUEUE};
use hub::Hub;
use supervise::{Channels, Supervisor};

/// The stream of [`WorkerMessage`]s; see [`ClusterWatcher::messages`].
///
/// ```no_run
/// # async fn run(watcher: cluster::ClusterWatcher) -> Result<(), cluster::Error> {
/// let mut messages: cluster::Messages = watcher.messages();
/// while let Some(m) = messages.next().await {
///     let text: String = m.decode()?;
///     m.worker().send(&format!("echo {text}"))?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Messages<'a> {
    watcher: &'a ClusterWatcher,
}

impl Messages<'_> {
    /// The next message, or `None` once the watcher has stopped (or before
    /// it started).
    pub async fn next(&mut self) -> Option<WorkerMessage> {
        let mut guard = self.watcher.messages.lock().await;
        let incoming = guard.as_mut()?.recv().await?;
        let commands = self.watcher.commands.lock().ok()?.clone()?;
        Some(WorkerMessage {
            worker: WorkerRef {
                slot: incoming.slot,
                context_id: incoming.context_id,
                pid: incoming.pid,
                commands,
            },
            bytes: incoming.bytes,
        })
    }
}

/// A message from a worker.
///
/// ```no_run
/// # async fn run(watcher: cluster::ClusterWatcher) -> Result<(), cluster::Error> {
/// if let Some(m) = watcher.messages().next().await {
///     println!("{} bytes from slot {}", m.bytes().len(), m.worker().slot());
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct WorkerMessage {
    worker: WorkerRef,
    bytes: Vec<u8>,
}

impl WorkerMessage {
    /// The worker that sent it, to reply to.
    pub fn worker(&self) -> &WorkerRef {
        &self.worker
    }

    /// Decodes the message as `T` (postcard, as the worker encoded it).
    ///
    /// # Errors
    ///
    /// [`Error::is_ipc`] when the bytes are not a `T`.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        decode_user(&self.bytes)
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// A worker as seen from the watcher, to send messages to.
///
/// ```no_run
/// # async fn run(watcher: cluster::ClusterWatcher) -> Result<(), cluster::Error> {
/// if let Some(m) = watcher.messages().next().await {
///     let w: &cluster::WorkerRef = m.worker();
///     w.send(&format!("hello, pid {}", w.pid()))?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct WorkerRef {
    slot: u32,
    context_id: u64,
    pid: u32,
    commands: CommandSender,
}

impl WorkerRef {
    /// The worker's slot.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The worker's context id.
    pub fn context_id(&self) -> u64 {
        self.context_id
    }

    /// The worker's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `msg` to this worker (dropped if it has exited meanwhile).
    ///
    /// # Errors
    ///
    /// [`Error::is_too_large`] when the encoded message exceeds
    /// [`MAX_MESSAGE_SIZE`](crate::MAX_MESSAGE_SIZE); [`Error::is_closed`]
    /// when the watcher has stopped.
    pub fn send<T: serde::Serialize>(&self, msg: &T) -> Result<()> {
        let bytes = encode_user(msg)?;
        self.commands
            .send(Command::Send {
                to: Some(self.context_id),
                bytes,
            })
            .map_err(|_| Error::closed("the watcher has stopped"))
    }
}

/// How [`ClusterWatcher::run`] ended.
///
/// ```no_run
/// # async fn run(watcher: cluster::ClusterWatcher) -> Result<(), cluster::Error> {
/// match watcher.run().await? {
///     cluster::Stopped::Graceful => println!("stopped"),
///     _ => println!("workers were killed"),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stopped {
    /// Every worker exited after being asked to stop.
    Graceful,
    /// A second stop signal killed the workers.
    Forced,
    /// The watcher handed over to a new watcher (an upgrade) and stopped
    /// its own workers; the new one, with this pid, runs on.
    Upgraded {
        /// The new watcher's pid.
        pid: u32,
    },
}

impl ClusterWatcherBuilder {
    /// Validates the settings and returns the watcher (not yet started).
    ///
    /// # Errors
    ///
    /// [`Error::is_config`] for zero workers, or a user or group that does
    /// not exist or that the watcher cannot switch to (not root);
    /// [`Error::is_spawn`] when the program does not exist or is not
    /// executable.
    pub fn build(self) -> Result<ClusterWatcher> {
        let config = self.validate()?;
        let (state_tx, state_rx) = watch::channel(None);
        let (ready_tx, ready_rx) = watch::channel(false);
        Ok(ClusterWatcher {
            hub: Hub::new(config.storage.clone()),
            config,
            commands: Mutex::new(None),
            messages: tokio::sync::Mutex::new(None),
            state_tx: Mutex::new(Some((state_tx, ready_tx))),
            state: state_rx,
            ready: ready_rx,
        })
    }
}

/// A watcher built from code: the same supervisor the `cluster` CLI runs.
///
/// ```no_run
/// # async fn run() -> Result<(), cluster::Error> {
/// use std::time::Duration;
/// use cluster::ClusterWatcher;
///
/// let mut cmd = std::process::Command::new("./my-server");
/// cmd.arg("127.0.0.1:8080");
/// let watcher = ClusterWatcher::builder(cmd).workers(4).build()?;
/// watcher.start().await?;
/// // ... later
/// watcher.stop(Duration::from_secs(10)).await?;
/// # Ok(()) }
/// ```
///
/// The runtime that calls [`start`](ClusterWatcher::start) spawns the workers
/// from its worker threads; Linux delivers `PR_SET_PDEATHSIG` when the
/// *thread* that forked exits, so that runtime must outlive the workers
/// (a current-thread runtime, or tokio's multi-thread workers, both do).
pub struct ClusterWatcher {
    config: Config,
    /// Shared storage and commands.
    hub: Arc<Hub>,
    commands: Mutex<Option<CommandSender>>,
    messages: tokio::sync::Mutex<Option<mpsc::Receiver<Incoming>>>,
    #[allow(clippy::type_complexity)]
    state_tx: Mutex<Option<(watch::Sender<Option<Outcome>>, watch::Sender<bool>)>>,
    state: watch::Receiver<Option<Outcome>>,
    /// Every initial worker has been ready.
    ready: watch::Receiver<bool>,
}

impl std::fmt::Debug for ClusterWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterWatcher")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ClusterWatcher {
    /// Starts building a watcher that runs `command` (program, arguments,
    /// environment and working directory are taken from it) as its workers.
    pub fn builder(command: std::process::Command) -> ClusterWatcherBuilder {
        ClusterWatcherBuilder {
            config: Config::new(&command),
        }
    }

    /// Writes the pid file (if any) and spawns the workers. Returns once
    /// every worker process has been started (not necessarily ready).
    /// Must be called within a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::is_pid_file_locked`] when another watcher holds the pid file,
    /// [`Error::is_pid_file`] when it cannot be written, [`Error::is_spawn`]
    /// when the first worker cannot be started; in each case nothing is left
    /// running. Calling `start` twice is a [`Error::is_config`] error.
    pub async fn start(&self) -> Result<()> {
        let (state_tx, ready_tx) = self
            .state_tx
            .lock()
            .map_err(|_| Error::new(Kind::Io, "watcher state poisoned"))?
            .take()
            .ok_or_else(|| Error::new(Kind::AlreadyStarted, "the watcher was already started"))?;
        // The new watcher of an upgrade: what the old one handed over.
        let inherited = upgrade::take()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (started_tx, started_rx) = oneshot::channel();
        let (messages_tx, messages_rx) = mpsc::channel(MESSAGE_QUEUE);
        *self.messages.lock().await = Some(messages_rx);
        let channels = Channels {
            commands: rx,
            commands_tx: tx.clone(),
            messages: messages_tx,
            ready: ready_tx,
            inherited,
        };
        let supervisor = Supervisor::new(
            self.config.clone(),
            Box::new(process::Processes::new(
                self.config.subreaper,
                self.hub.clone(),
            )),
            channels,
            self.hub.clone(),
        );
        let triggers = reload_triggers::start(&self.config, tx.clone());
        tokio::spawn(async move {
            let _triggers = triggers; // aborted when the supervisor ends
            let outcome = supervisor.run(started_tx).await;
            let _ = state_tx.send(Some(outcome));
        });
        *self
            .commands
            .lock()
            .map_err(|_| Error::new(Kind::Io, "watcher state poisoned"))? = Some(tx);
        match started_rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                Err(self.outcome().await.err().unwrap_or_else(|| {
                    Error::new(Kind::Spawn, "the watcher stopped while starting")
                }))
            }
        }
    }

    /// Waits until every worker started by [`start`](ClusterWatcher::start)
    /// has been ready (the moment a systemd `Type=notify` service reports
    /// `READY=1`).
    ///
    /// # Errors
    ///
    /// The error that stopped the watcher (for example an address that
    /// cannot be bound), or [`Error::is_closed`] when it stopped, or was
    /// never started, before that.
    pub async fn wait_ready(&self) -> Result<()> {
        let mut ready = self.ready.clone();
        if ready.wait_for(|r| *r).await.is_ok() {
            return Ok(());
        }
        // The supervisor is gone without being ready.
        self.outcome().await?;
        Err(Error::closed(
            "the watcher stopped before its workers were ready",
        ))
    }

    /// Sends `cmd` to the supervisor; [`Error::is_closed`] when it is not
    /// running.
    fn send_command(&self, cmd: Command) -> Result<()> {
        let sent = match self.commands.lock() {
            Ok(guard) => guard.as_ref().is_some_and(|tx| tx.send(cmd).is_ok()),
            Err(_) => false,
        };
        if sent {
            Ok(())
        } else {
            Err(Error::closed("the watcher is not running"))
        }
    }

    /// Sends the command `make` builds around a reply channel and waits for
    /// the answer.
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.send_command(make(tx))?;
        rx.await
            .unwrap_or_else(|_| Err(Error::closed("the watcher stopped")))
    }

    /// Asks every worker to stop (a stop message, then SIGTERM), and kills
    /// those still running after `timeout`. Returns at once; see
    /// [`stop`](ClusterWatcher::stop) to wait for the end.
    pub fn request_stop(&self, timeout: Duration) {
        let _ = self.send_command(Command::Stop {
            timeout: Some(timeout),
        });
    }

    /// Stops gracefully (as [`request_stop`](ClusterWatcher::request_stop))
    /// and waits until every worker has exited.
    ///
    /// # Errors
    ///
    /// The error that stopped the watcher on its own before, if any.
    pub async fn stop(&self, timeout: Duration) -> Result<()> {
        self.request_stop(timeout);
        self.wait().await
    }

    /// Rolling restart: replaces every worker, one slot at a time (see
    /// [`reload_batch`](ClusterWatcherBuilder::reload_batch)), starting each
    /// replacement and waiting until it is ready before the old worker is
    /// asked to drain. A restart asked for while one runs is queued.
    ///
    /// # Errors
    ///
    /// [`Error::is_reload`] when a replacement exits or is not ready within
    /// the ready timeout (it is killed; the old workers keep serving);
    /// [`Error::is_closed`] when the watcher is stopping or not started.
    pub async fn restart(&self) -> Result<()> {
        self.ask(|done| Command::Restart {
            reason: "restart requested".into(),
            done: Some(done),
        })
        .await
    }

    /// Changes the number of workers to `n` (at least 1): new slots start at
    /// once, removed slots (the highest) stop gracefully. Returns the new count.
    ///
    /// # Errors
    ///
    /// [`Error::is_config`] for 0 workers or more than 4096;
    /// [`Error::is_closed`] when the watcher is stopping or not started.
    pub async fn scale(&self, n: usize) -> Result<usize> {
        self.ask(|done| Command::Scale {
            to: Scale::To(n),
            done: Some(done),
        })
        .await
    }

    /// Sends `msg` to every running worker (see [`Cluster::channel`](crate::Cluster::channel)).
    ///
    /// # Errors
    ///
    /// [`Error::is_too_large`] when the encoded message exceeds
    /// [`MAX_MESSAGE_SIZE`](crate::MAX_MESSAGE_SIZE) (nothing is sent);
    /// [`Error::is_closed`] when the watcher is not running.
    pub fn broadcast<T: serde::Serialize>(&self, msg: &T) -> Result<()> {
        let bytes = encode_user(msg)?;
        self.send_command(Command::Send { to: None, bytes })
    }

    /// Sends `msg` to the worker with `context_id`. A message to a worker
    /// that has exited is dropped (and logged at debug level).
    ///
    /// # Errors
    ///
    /// As [`broadcast`](ClusterWatcher::broadcast).
    pub fn send<T: serde::Serialize>(&self, context_id: u64, msg: &T) -> Result<()> {
        let bytes = encode_user(msg)?;
        self.send_command(Command::Send {
            to: Some(context_id),
            bytes,
        })
    }

    /// The messages workers send, in arrival order (each worker's in the
    /// order it sent them), with a handle to reply to the sender. Messages
    /// queue (up to 4096) until read; beyond that they are dropped and logged.
    pub fn messages(&self) -> Messages<'_> {
        Messages { watcher: self }
    }

    /// Kills every worker with SIGKILL at once and stops.
    pub fn kill(&self) {
        let _ = self.send_command(Command::Kill);
    }

    /// Waits until the watcher has stopped: after [`stop`](ClusterWatcher::stop),
    /// or on its own after a fatal error (a listening address that could not
    /// be bound before any worker was ready), which is returned.
    pub async fn wait(&self) -> Result<()> {
        self.outcome().await
    }

    async fn outcome(&self) -> Result<()> {
        let mut state = self.state.clone();
        let outcome = match state.wait_for(|s| s.is_some()).await {
            Ok(s) => s.clone(),
            Err(_) => return Err(Error::closed("the watcher was never started")),
        };
        match outcome {
            Some(Outcome::Stopped | Outcome::Upgraded(_)) | None => Ok(()),
            Some(Outcome::Failed(e)) => Err(e),
        }
    }

    /// The new watcher's pid when this one stopped after an upgrade.
    fn upgraded_to(&self) -> Option<u32> {
        match &*self.state.borrow() {
            Some(Outcome::Upgraded(pid)) => Some(*pid),
            _ => None,
        }
    }

    /// Upgrades the watcher itself without downtime: starts the program
    /// of [`upgrade_exec`](ClusterWatcherBuilder::upgrade_exec) (this
    /// process again, by default) as a new watcher that inherits every
    /// listening socket, waits until its workers are ready, then hands it
    /// the pid file, the control socket and the job store, and drains this
    /// watcher's workers; this watcher then stops ([`wait`](Self::wait)
    /// returns, [`run`](Self::run) returns [`Stopped::Upgraded`]). Returns
    /// the new watcher's pid once it serves.
    ///
    /// # Errors
    ///
    /// [`Error::is_upgrade`] when the new watcher cannot be started, exits,
    /// or its workers are not ready within the ready timeout: it is stopped
    /// and this watcher keeps serving (rollback). [`Error::is_closed`] when
    /// the watcher is stopping or not started.
    pub async fn upgrade(&self) -> Result<u32> {
        self.ask(|done| Command::Upgrade { done: Some(done) }).await
    }

    /// Starts the watcher and runs it as the `cluster` CLI does, until it
    /// stops: SIGTERM, SIGINT or SIGQUIT stop it gracefully (a second one
    /// kills the workers at once), SIGUSR1 and SIGHUP start a rolling
    /// restart, SIGTTIN adds a worker and SIGTTOU removes one, SIGUSR2
    /// [upgrades](Self::upgrade) the watcher. Signal
    /// handlers are installed before the first worker starts.
    ///
    /// # Errors
    ///
    /// What [`start`](ClusterWatcher::start) and [`wait`](ClusterWatcher::wait) return.
    pub async fn run(&self) -> Result<Stopped> {
        let mut signals = crate::signal::WatcherSignals::install()
            .map_err(|e| Error::with_io(Kind::Io, "cannot install signal handlers", e))?;
        self.start().await?;
        let mut stopping = false;
        let mut forced = false;
        loop {
            tokio::select! {
                result = self.wait() => {
                    result?;
                    return Ok(match self.upgraded_to() {
                        Some(pid) => Stopped::Upgraded { pid },
                        None if forced => Stopped::Forced,
                        None => Stopped::Graceful,
                    });
                }
                sig = signals.recv() => match sig {
                    WatcherSignal::Stop(name) if !stopping => {
                        tracing::info!("{name}: stopping gracefully (send it again to force)");
                        stopping = true;
                        self.request_stop(self.config.shutdown_timeout);
                    }
                    WatcherSignal::Stop(name) => {
                        tracing::warn!("{name} again: killing the workers");
                        forced = true;
                        self.kill();
                    }
                    WatcherSignal::Reload(name) => {
                        let _ = self.send_command(Command::Restart { reason: name.to_string(), done: None });
                    }
                    WatcherSignal::Upgrade => {
                        tracing::info!("SIGUSR2: upgrading the watcher");
                        let _ = self.send_command(Command::Upgrade { done: None });
                    }
                    WatcherSignal::ScaleUp => {
                        let _ = self.send_command(Command::Scale { to: Scale::Up, done: None });
                    }
                    WatcherSignal::ScaleDown => {
                        let (tx, rx) = oneshot::channel();
                        let _ = self.send_command(Command::Scale { to: Scale::Down, done: Some(tx) });
                        tokio::spawn(async move {
                            if let Ok(Err(e)) = rx.await {
                                tracing::warn!("SIGTTOU: {e}");
                            }
                        });
                    }
                },
            }
        }
    }

    /// The shared storage (the same API as
    /// [`Cluster::storage`](crate::Cluster::storage) in a worker, without the
    /// message size limit). Usable once [`start`](ClusterWatcher::start)
    /// returned; [`Error::is_closed`] before and after.
    pub fn storage(&self) -> crate::Storage {
        crate::Storage::new(self.hub.clone())
    }

    /// The watcher's own command handlers (target
    /// [`Target::Watcher`](crate::Target::Watcher)); they run on the
    /// runtime that registers them.
    pub fn commands(&self) -> crate::Commands {
        crate::Commands::new(self.hub.handlers())
    }

    /// Sends command `name` with `args` to `target` (a worker by slot or
    /// name, every worker, or the watcher's own handlers) and waits for
    /// the reply; see [`Cluster::command`](crate::Cluster::command).
    pub fn command<A: serde::Serialize + ?Sized>(
        &self,
        target: impl Into<crate::Target>,
        name: &str,
        args: &A,
    ) -> crate::CommandCall {
        crate::CommandCall::new(self.hub.clone(), target.into(), name, args)
    }

    /// Stops the worker of `slot` alone (as `cluster stop --slot`): at once
    /// when its status is `idle`, else asked to stop and killed after
    /// `timeout` (`None`: the shutdown timeout). Whether its slot gets a
    /// new worker follows [`revive`](ClusterWatcherBuilder::revive).
    /// Returns the pid of the worker it stopped.
    ///
    /// # Errors
    ///
    /// [`Error::is_unknown_target`] when no worker runs in `slot`;
    /// [`Error::is_config`] when that worker is already stopping;
    /// [`Error::is_closed`] when the watcher is stopping or not started.
    pub async fn stop_worker(&self, slot: u32, timeout: Option<Duration>) -> Result<u32> {
        self.ask(|done| Command::StopWorker {
            which: event::WorkerSelector::Slot(slot),
            timeout,
            done,
        })
        .await
        .map(|s| s.pid)
    }

    /// The workers running now, by slot, with their memory and CPU time
    /// read from `/proc`.
    pub async fn workers(&self) -> Vec<WorkerInfo> {
        let (tx, rx) = oneshot::channel();
        if self.send_command(Command::Status(tx)).is_err() {
            return Vec::new();
        }
        rx.await
            .map(|report| report.workers)
            .unwrap_or_default()
            .into_iter()
            .map(WorkerInfo::read_proc)
            .collect()
    }
}
