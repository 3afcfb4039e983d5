//! The watcher: [`ClusterWatcher`], built from code or by the `cluster` CLI.
//!
//! The watcher owns every listening socket, spawns the workers by fork+exec,
//! supervises them (respawn with backoff), and stops them gracefully. One
//! supervisor task owns all state (`supervise.rs`); the handle here talks to
//! it over a channel.

mod balance;
mod metrics;
mod output;
mod poll;
mod process;
pub(crate) mod procfs;
mod supervise;
mod systemd;

pub use balance::Balance;
pub use output::{LogFormat, LogOutput, WatcherLogLayer};

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Kind, Result};
use crate::signal::WatcherSignal;
use crate::socket::DEFAULT_BACKLOG;
use supervise::{Command, Outcome, Scale, Supervisor};

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
    /// Workers started for this slot after the first (respawns and reloads).
    pub restarts: u32,
    /// How long this worker has been running.
    pub uptime: Duration,
    /// Resident memory in bytes (`VmRSS` of `/proc/PID/status`), when it
    /// could be read.
    pub rss_bytes: Option<u64>,
    /// CPU time used so far, user plus system (`/proc/PID/stat`), when it
    /// could be read.
    pub cpu_time: Option<Duration>,
    /// How the previous worker of this slot ended, if one did: for example
    /// `exited with status 1` or `killed by SIGKILL (missed heartbeats)`.
    pub last_exit: Option<String>,
}

impl WorkerInfo {
    /// Reads the worker's memory and CPU time from `/proc`.
    fn read_proc(mut self) -> WorkerInfo {
        self.rss_bytes = procfs::rss_bytes(self.pid);
        self.cpu_time = procfs::cpu_time(self.pid);
        self
    }
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

/// The stream of [`WorkerMessage`]s; see [`ClusterWatcher::messages`].
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
        crate::worker::decode_user_message(&self.bytes)
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// A worker as seen from the watcher, to send messages to.
#[derive(Debug, Clone)]
pub struct WorkerRef {
    slot: u32,
    context_id: u64,
    pid: u32,
    commands: mpsc::UnboundedSender<Command>,
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
    /// [`MAX_MESSAGE_SIZE`](crate::MAX_MESSAGE_SIZE); [`Error::is_config`]
    /// when the watcher has stopped.
    pub fn send<T: serde::Serialize>(&self, msg: &T) -> Result<()> {
        let bytes = crate::worker::encode_user_message(msg)?;
        self.commands
            .send(Command::Send {
                to: Some(self.context_id),
                bytes,
            })
            .map_err(|_| Error::new(Kind::Config, "the watcher has stopped"))
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
    pub ready_timeout: Duration,
    pub reload_batch: usize,
    pub heartbeat_timeout: Option<Duration>,
    pub assume_ready_after: Duration,
    pub watch: Vec<PathBuf>,
    pub watch_debounce: Duration,
    pub reload_on_deploy: bool,
    pub control_socket: Option<PathBuf>,
    pub output: LogOutput,
    pub balance: Balance,
    pub metrics: Option<SocketAddr>,
    /// Socket activation and `sd_notify` when systemd's variables are set.
    pub systemd: bool,
    pub user: Option<String>,
    pub group: Option<String>,
    /// `user` and `group` resolved by `build`.
    pub credentials: Option<crate::sys::Credentials>,
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

    /// Write, lock and (on exit) remove a pid file at `path`. Unless
    /// [`control_socket`](ClusterWatcherBuilder::control_socket) says
    /// otherwise, the control socket goes beside it (`x.pid` → `x.sock`).
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.pid_file = Some(path.into());
        self
    }

    /// Serve the control socket (for `cluster status`, `reload`, `stop`,
    /// `scale`) at `path`, mode 0600.
    pub fn control_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.control_socket = Some(path.into());
        self
    }

    /// How long a replacement started by a rolling restart has to become
    /// ready before it is killed and the restart fails (default 30 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.config.ready_timeout = timeout;
        self
    }

    /// How connections reach the workers (default [`Balance::Shared`]).
    pub fn balance(mut self, balance: Balance) -> Self {
        self.config.balance = balance;
        self
    }

    /// How many slots a rolling restart replaces at once (default 1).
    pub fn reload_batch(mut self, n: usize) -> Self {
        self.config.reload_batch = n.max(1);
        self
    }

    /// Kill and replace a ready worker that does not answer the watcher's
    /// pings for this long (default 30 s); `None` disables the heartbeat.
    /// Pings are answered by the worker's `Cluster::await_termination()`
    /// future, so a blocked event loop stops answering.
    pub fn heartbeat_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.heartbeat_timeout = timeout.filter(|t| !t.is_zero());
        self
    }

    /// A worker that never contacts the watcher (a program that does not
    /// use the library) counts as ready once it has run this long
    /// (default 1 s).
    pub fn assume_ready_after(mut self, after: Duration) -> Self {
        self.config.assume_ready_after = after;
        self
    }

    /// Rolling-restart when something under `path` (a file or a directory,
    /// recursively) changes; changes are debounced. May be called repeatedly.
    pub fn watch(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.watch.push(path.into());
        self
    }

    /// How long the watched paths must stay unchanged before a reload
    /// starts (default 300 ms).
    pub fn watch_debounce(mut self, quiet: Duration) -> Self {
        self.config.watch_debounce = quiet;
        self
    }

    /// Rolling-restart when the program's path resolves to a new target,
    /// as when a deploy switches `/srv/app/current` to a new release.
    pub fn reload_on_deploy(mut self, enabled: bool) -> Self {
        self.config.reload_on_deploy = enabled;
        self
    }

    /// Where the watcher writes its log stream: worker records, worker
    /// stdout/stderr lines and (through [`LogOutput::layer`]) its own
    /// events (default: text on stderr at `info`).
    pub fn log_output(mut self, output: LogOutput) -> Self {
        self.config.output = output;
        self
    }

    /// Serve Prometheus metrics on `GET http://ADDR/metrics` (see the
    /// README for the series). An address that cannot be bound makes
    /// [`start`](ClusterWatcher::start) fail.
    pub fn metrics(mut self, addr: SocketAddr) -> Self {
        self.config.metrics = Some(addr);
        self
    }

    /// Whether to honour systemd's environment (default `true`): adopt the
    /// listening sockets of socket activation (`LISTEN_PID`, `LISTEN_FDS`)
    /// and send `sd_notify` messages (`NOTIFY_SOCKET`, `WATCHDOG_USEC`).
    /// Workers never see these variables either way.
    pub fn systemd(mut self, enabled: bool) -> Self {
        self.config.systemd = enabled;
        self
    }

    /// Run the workers as the user `name` (and, unless
    /// [`group`](ClusterWatcherBuilder::group) says otherwise, its primary
    /// group), with no supplementary groups. The watcher keeps its own
    /// privileges to bind the listeners; it must run as root.
    pub fn user(mut self, name: impl Into<String>) -> Self {
        self.config.user = Some(name.into());
        self
    }

    /// Run the workers with the group `name`, with no supplementary groups.
    /// The watcher must run as root.
    pub fn group(mut self, name: impl Into<String>) -> Self {
        self.config.group = Some(name.into());
        self
    }

    /// Validates the settings and returns the watcher (not yet started).
    ///
    /// # Errors
    ///
    /// [`Error::is_config`] for zero workers, or a user or group that does
    /// not exist or that the watcher cannot switch to (not root);
    /// [`Error::is_spawn`] when the program does not exist or is not
    /// executable.
    pub fn build(mut self) -> Result<ClusterWatcher> {
        self.config.credentials =
            resolve_credentials(self.config.user.as_deref(), self.config.group.as_deref())?;
        if self.config.workers == 0 {
            return Err(Error::new(
                Kind::Config,
                "the number of workers must be at least 1",
            ));
        }
        process::check_program(&self.config.program, self.config.current_dir.as_deref())?;
        for path in &self.config.watch {
            if let Err(e) = std::fs::metadata(path) {
                return Err(Error::with_io(
                    Kind::Config,
                    format!("cannot watch {}", path.display()),
                    e,
                ));
            }
        }
        let (state_tx, state_rx) = watch::channel(None);
        let (ready_tx, ready_rx) = watch::channel(false);
        Ok(ClusterWatcher {
            config: self.config,
            commands: Mutex::new(None),
            messages: tokio::sync::Mutex::new(None),
            state_tx: Mutex::new(Some((state_tx, ready_tx))),
            state: state_rx,
            ready: ready_rx,
        })
    }
}

/// Resolves `user` and `group` names to ids (before any fork: the child
/// between fork and exec may not look names up).
fn resolve_credentials(
    user: Option<&str>,
    group: Option<&str>,
) -> Result<Option<crate::sys::Credentials>> {
    use nix::unistd::{geteuid, Group, User};
    if user.is_none() && group.is_none() {
        return Ok(None);
    }
    let who = match (user, group) {
        (Some(u), Some(g)) => format!("user {u} and group {g}"),
        (Some(u), None) => format!("user {u}"),
        (None, Some(g)) => format!("group {g}"),
        (None, None) => unreachable!(),
    };
    if !geteuid().is_root() {
        return Err(Error::new(
            Kind::Config,
            format!(
                "cannot run the workers as {who}: that needs the watcher to run as root (it runs as uid {})",
                geteuid()
            ),
        ));
    }
    let lookup_err = |what: &str, name: &str, e: nix::errno::Errno| {
        Error::with_io(
            Kind::Config,
            format!("cannot look up {what} {name}"),
            e.into(),
        )
    };
    let user = match user {
        Some(name) => Some(
            User::from_name(name)
                .map_err(|e| lookup_err("user", name, e))?
                .ok_or_else(|| Error::new(Kind::Config, format!("no such user: {name}")))?,
        ),
        None => None,
    };
    let gid = match group {
        Some(name) => Some(
            Group::from_name(name)
                .map_err(|e| lookup_err("group", name, e))?
                .ok_or_else(|| Error::new(Kind::Config, format!("no such group: {name}")))?
                .gid,
        ),
        None => user.as_ref().map(|u| u.gid),
    };
    Ok(Some(crate::sys::Credentials {
        uid: user.map(|u| u.uid.as_raw()),
        gid: gid.map(|g| g.as_raw()),
    }))
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
    messages: tokio::sync::Mutex<Option<mpsc::Receiver<supervise::Incoming>>>,
    #[allow(clippy::type_complexity)]
    state_tx: Mutex<Option<(watch::Sender<Option<Outcome>>, watch::Sender<bool>)>>,
    state: watch::Receiver<Option<Outcome>>,
    /// Every initial worker has been ready.
    ready: watch::Receiver<bool>,
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
                ready_timeout: Duration::from_secs(30),
                reload_batch: 1,
                heartbeat_timeout: Some(Duration::from_secs(30)),
                assume_ready_after: Duration::from_secs(1),
                watch: Vec::new(),
                watch_debounce: Duration::from_millis(300),
                reload_on_deploy: false,
                control_socket: None,
                output: LogOutput::stderr(LogFormat::Text, crate::log::LogFilter::default()),
                balance: Balance::Shared,
                metrics: None,
                systemd: true,
                user: None,
                group: None,
                credentials: None,
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
        let (state_tx, ready_tx) = self
            .state_tx
            .lock()
            .map_err(|_| Error::new(Kind::Config, "watcher state poisoned"))?
            .take()
            .ok_or_else(|| Error::new(Kind::Config, "the watcher was already started"))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (started_tx, started_rx) = oneshot::channel();
        let (messages_tx, messages_rx) = mpsc::channel(supervise::MESSAGE_QUEUE);
        *self.messages.lock().await = Some(messages_rx);
        let supervisor = Supervisor::new(self.config.clone(), rx, messages_tx, ready_tx);
        let pollers = poll::start(&self.config, supervisor.events());
        tokio::spawn(async move {
            let _pollers = pollers; // aborted when the supervisor ends
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

    /// Waits until every worker started by [`start`](ClusterWatcher::start)
    /// has been ready (the moment a systemd `Type=notify` service reports
    /// `READY=1`).
    ///
    /// # Errors
    ///
    /// The error that stopped the watcher (for example an address that
    /// cannot be bound), or [`Error::is_config`] when it stopped, or was
    /// never started, before that.
    pub async fn wait_ready(&self) -> Result<()> {
        let mut ready = self.ready.clone();
        if ready.wait_for(|r| *r).await.is_ok() {
            return Ok(());
        }
        // The supervisor is gone without being ready.
        self.outcome().await?;
        Err(Error::new(
            Kind::Config,
            "the watcher stopped before its workers were ready",
        ))
    }

    fn command(&self, cmd: Command) -> bool {
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
        self.command(Command::Stop { timeout });
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
    /// [`Error::is_config`] when the watcher is stopping or not started.
    pub async fn restart(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        if !self.command(Command::Restart {
            reason: "restart requested".into(),
            done: Some(tx),
        }) {
            return Err(Error::new(Kind::Config, "the watcher is not running"));
        }
        rx.await
            .unwrap_or_else(|_| Err(Error::new(Kind::Config, "the watcher stopped")))
    }

    /// Changes the number of workers to `n` (at least 1): new slots start at
    /// once, removed slots (the highest) stop gracefully. Returns the new count.
    ///
    /// # Errors
    ///
    /// [`Error::is_config`] for 0 workers or when the watcher is stopping.
    pub async fn scale(&self, n: usize) -> Result<usize> {
        self.scale_with(Scale::To(n)).await
    }

    async fn scale_with(&self, to: Scale) -> Result<usize> {
        let (tx, rx) = oneshot::channel();
        if !self.command(Command::Scale { to, done: Some(tx) }) {
            return Err(Error::new(Kind::Config, "the watcher is not running"));
        }
        rx.await
            .unwrap_or_else(|_| Err(Error::new(Kind::Config, "the watcher stopped")))
    }

    /// Sends `msg` to every running worker (see [`Cluster::channel`](crate::Cluster::channel)).
    ///
    /// # Errors
    ///
    /// [`Error::is_too_large`] when the encoded message exceeds
    /// [`MAX_MESSAGE_SIZE`](crate::MAX_MESSAGE_SIZE) (nothing is sent);
    /// [`Error::is_config`] when the watcher is not running.
    pub fn broadcast<T: serde::Serialize>(&self, msg: &T) -> Result<()> {
        let bytes = crate::worker::encode_user_message(msg)?;
        self.send_command(Command::Send { to: None, bytes })
    }

    /// Sends `msg` to the worker with `context_id`. A message to a worker
    /// that has exited is dropped (and logged at debug level).
    ///
    /// # Errors
    ///
    /// As [`broadcast`](ClusterWatcher::broadcast).
    pub fn send<T: serde::Serialize>(&self, context_id: u64, msg: &T) -> Result<()> {
        let bytes = crate::worker::encode_user_message(msg)?;
        self.send_command(Command::Send {
            to: Some(context_id),
            bytes,
        })
    }

    fn send_command(&self, cmd: Command) -> Result<()> {
        if self.command(cmd) {
            Ok(())
        } else {
            Err(Error::new(Kind::Config, "the watcher is not running"))
        }
    }

    /// The messages workers send, in arrival order (each worker's in the
    /// order it sent them), with a handle to reply to the sender. Messages
    /// queue (up to 4096) until read; beyond that they are dropped and logged.
    pub fn messages(&self) -> Messages<'_> {
        Messages { watcher: self }
    }

    /// Kills every worker with SIGKILL at once and stops.
    pub fn kill(&self) {
        self.command(Command::Kill);
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
    /// kills the workers at once), SIGUSR1 and SIGHUP start a rolling
    /// restart, SIGTTIN adds a worker and SIGTTOU removes one. Signal
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
                        self.command(Command::Restart { reason: name.to_string(), done: None });
                    }
                    WatcherSignal::ScaleUp => {
                        self.command(Command::Scale { to: Scale::Up, done: None });
                    }
                    WatcherSignal::ScaleDown => {
                        let (tx, rx) = oneshot::channel();
                        self.command(Command::Scale { to: Scale::Down, done: Some(tx) });
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

    /// The workers running now, by slot, with their memory and CPU time
    /// read from `/proc`.
    pub async fn workers(&self) -> Vec<WorkerInfo> {
        let (tx, rx) = oneshot::channel();
        if !self.command(Command::Status(tx)) {
            return Vec::new();
        }
        rx.await
            .unwrap_or_default()
            .into_iter()
            .map(WorkerInfo::read_proc)
            .collect()
    }
}
