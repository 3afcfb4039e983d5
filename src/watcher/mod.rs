//! The watcher: [`ClusterWatcher`], built from code or by the `cluster` CLI.
//!
//! The watcher owns every listening socket, spawns the workers by fork+exec,
//! supervises them (respawn with backoff), and stops them gracefully. One
//! supervisor task owns all state (`supervise.rs`); the handle here talks to
//! it over a channel.

mod process;
mod supervise;

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Kind, Result};
use crate::signal::WatcherSignal;
use crate::socket::DEFAULT_BACKLOG;
use supervise::{Command, Outcome, Supervisor};

/// What the watcher knows about one running worker.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// The worker's slot, `1..=N`.
    pub slot: u32,
    /// The context id of this spawn.
    pub context_id: u64,
    /// The worker's process id.
    pub pid: u32,
    /// Where the worker is in its life.
    pub state: WorkerState,
    /// How many times this slot has been respawned.
    pub restarts: u32,
}

/// The life of a worker: starting → ready → stopping → gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WorkerState {
    /// Spawned, not yet ready.
    Starting,
    /// Called `Cluster::ready()` or `Cluster::await_termination()`.
    Ready,
    /// Asked to stop; waiting for it to exit.
    Stopping,
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Stopping => "stopping",
        })
    }
}

/// How [`ClusterWatcher::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stopped {
    /// Every worker exited after being asked to stop.
    Graceful,
    /// A second stop signal killed the workers.
    Forced,
}

/// Settings shared by the supervisor and the process spawner.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub program: OsString,
    pub args: Vec<OsString>,
    pub envs: Vec<(OsString, Option<OsString>)>,
    pub current_dir: Option<PathBuf>,
    pub workers: usize,
    pub backlog: u32,
    pub shutdown_timeout: Duration,
    pub respawn_delay: Duration,
    pub respawn_delay_max: Duration,
    pub backoff_reset: Duration,
    pub pid_file: Option<PathBuf>,
}

/// Builds a [`ClusterWatcher`]; get one with [`ClusterWatcher::builder`].
#[derive(Debug, Clone)]
pub struct ClusterWatcherBuilder {
    config: Config,
}

impl ClusterWatcherBuilder {
    /// Number of workers (default: the available parallelism).
    pub fn workers(mut self, n: usize) -> Self {
        self.config.workers = n;
        self
    }

    /// The `listen(2)` backlog of the sockets the watcher binds (default
    /// [`DEFAULT_BACKLOG`](crate::DEFAULT_BACKLOG)).
    pub fn backlog(mut self, backlog: u32) -> Self {
        self.config.backlog = backlog;
        self
    }

    /// How long a worker has to exit after it is asked to stop before it is
    /// killed with SIGKILL (default 10 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// Respawn backoff: the first delay, doubled after each failure up to
    /// `max`, and reset once a worker stays up for `reset_after`
    /// (defaults 100 ms, 30 s, 30 s).
    pub fn respawn_backoff(
        mut self,
        first: Duration,
        max: Duration,
        reset_after: Duration,
    ) -> Self {
        self.config.respawn_delay = first;
        self.config.respawn_delay_max = max.max(first);
        self.config.backoff_reset = reset_after;
        self
    }

    /// Write, lock and (on exit) remove a pid file at `path`.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.pid_file = Some(path.into());
        self
    }

    /// Validates the settings and returns the watcher (not yet started).
    ///
    /// # Errors
    ///
    /// [`Error::is_config`] for zero workers; [`Error::is_spawn`] when the
    /// program does not exist or is not executable.
    pub fn build(self) -> Result<ClusterWatcher> {
        if self.config.workers == 0 {
            return Err(Error::new(
                Kind::Config,
                "the number of workers must be at least 1",
            ));
        }
        process::check_program(&self.config.program, self.config.current_dir.as_deref())?;
        let (state_tx, state_rx) = watch::channel(None);
        Ok(ClusterWatcher {
            config: self.config,
            commands: Mutex::new(None),
            state_tx: Mutex::new(Some(state_tx)),
            state: state_rx,
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
#[derive(Debug)]
pub struct ClusterWatcher {
    config: Config,
    commands: Mutex<Option<mpsc::UnboundedSender<Command>>>,
    state_tx: Mutex<Option<watch::Sender<Option<Outcome>>>>,
    state: watch::Receiver<Option<Outcome>>,
}

impl ClusterWatcher {
    /// Starts building a watcher that runs `command` (program, arguments,
    /// environment and working directory are taken from it) as its workers.
    pub fn builder(command: std::process::Command) -> ClusterWatcherBuilder {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        ClusterWatcherBuilder {
            config: Config {
                program: command.get_program().to_owned(),
                args: command.get_args().map(|a| a.to_owned()).collect(),
                envs: command
                    .get_envs()
                    .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
                    .collect(),
                current_dir: command.get_current_dir().map(|d| d.to_owned()),
                workers,
                backlog: DEFAULT_BACKLOG,
                shutdown_timeout: Duration::from_secs(10),
                respawn_delay: Duration::from_millis(100),
                respawn_delay_max: Duration::from_secs(30),
                backoff_reset: Duration::from_secs(30),
                pid_file: None,
            },
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
        let state_tx = self
            .state_tx
            .lock()
            .map_err(|_| Error::new(Kind::Config, "watcher state poisoned"))?
            .take()
            .ok_or_else(|| Error::new(Kind::Config, "the watcher was already started"))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (started_tx, started_rx) = oneshot::channel();
        let supervisor = Supervisor::new(self.config.clone(), rx)?;
        tokio::spawn(async move {
            let outcome = supervisor.run(started_tx).await;
            let _ = state_tx.send(Some(outcome));
        });
        *self
            .commands
            .lock()
            .map_err(|_| Error::new(Kind::Config, "watcher state poisoned"))? = Some(tx);
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

    fn send(&self, cmd: Command) -> bool {
        match self.commands.lock() {
            Ok(guard) => guard
                .as_ref()
                .map(|tx| tx.send(cmd).is_ok())
                .unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Asks every worker to stop (a stop message, then SIGTERM), and kills
    /// those still running after `timeout`. Returns at once; see
    /// [`stop`](ClusterWatcher::stop) to wait for the end.
    pub fn request_stop(&self, timeout: Duration) {
        self.send(Command::Stop { timeout });
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

    /// Kills every worker with SIGKILL at once and stops.
    pub fn kill(&self) {
        self.send(Command::Kill);
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
            Err(_) => return Err(Error::new(Kind::Config, "the watcher was never started")),
        };
        match outcome {
            Some(Outcome::Stopped) | None => Ok(()),
            Some(Outcome::Failed(kind, message)) => Err(Error::new(kind, message)),
        }
    }

    /// Starts the watcher and runs it as the `cluster` CLI does, until it
    /// stops: SIGTERM, SIGINT or SIGQUIT stop it gracefully (a second one
    /// kills the workers at once), SIGUSR1 and SIGHUP are logged (rolling
    /// restart is not implemented yet). Signal handlers are installed before
    /// the first worker starts.
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
                    return Ok(if forced { Stopped::Forced } else { Stopped::Graceful });
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
                        tracing::warn!("{name}: rolling restart is not implemented yet; ignored");
                    }
                },
            }
        }
    }

    /// The workers running now, by slot.
    pub async fn workers(&self) -> Vec<WorkerInfo> {
        let (tx, rx) = oneshot::channel();
        if !self.send(Command::Status(tx)) {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}
