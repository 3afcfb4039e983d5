//! The watcher's settings: [`Config`], shared by the supervisor and the
//! process spawner, and the [`ClusterWatcherBuilder`] that fills it in.

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::balance::Balance;
use super::bind_policy::BindPolicy;
use super::hub::StorageSettings;
use super::listen::ListenSpec;
use super::names::Naming;
use super::output::{LogFormat, LogOutput};
use super::revive::Revive;
use crate::error::{Error, Kind, Result};
use crate::jobs::dispatch::config::JobsConfig;
use crate::jobserver::JobServerConfig;
use crate::socket::DEFAULT_BACKLOG;

mod jobs;
mod validate;

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
    /// `--http`: the dashboard and its API.
    pub http: Option<SocketAddr>,
    pub http_token_file: Option<PathBuf>,
    /// The token file's contents, read by `validate`.
    pub http_token: Option<Token>,
    /// Socket activation and `sd_notify` when systemd's variables are set.
    pub systemd: bool,
    /// Become the child subreaper and kill what workers leave behind.
    pub subreaper: bool,
    /// `--jobs` and its options: the job dispatcher runs when set.
    pub jobs: Option<JobsConfig>,
    /// `--job-server` and its options: the job server runs when set (and
    /// with it the dispatcher, with or without a store).
    pub job_server: Option<JobServerConfig>,
    /// `--pool` as given, parsed by `validate` into `jobs.specs`.
    pub pool_args: Vec<String>,
    /// `--allow-bind` patterns, parsed by `validate` into `bind_policy`.
    pub allow_bind: Vec<String>,
    pub bind_policy: BindPolicy,
    pub user: Option<String>,
    pub group: Option<String>,
    /// `user` and `group` resolved by `build`.
    pub credentials: Option<crate::sys::Credentials>,
    /// What an upgrade starts: the program and its arguments.
    pub upgrade_exec: (PathBuf, Vec<OsString>),
    /// A slot whose workers fail more than this often within
    /// `restart_window` is not restarted any more (`None`: never gives up).
    pub max_restarts: Option<u32>,
    pub restart_window: Duration,
    /// Recycling: a library worker asks to be replaced after this many
    /// requests, plus up to `max_requests_jitter` more.
    pub max_requests: Option<u64>,
    pub max_requests_jitter: u64,
    /// Recycling: a worker whose RSS passes this is replaced.
    pub max_memory: Option<u64>,
    /// `--on-event`: a shell command run for each lifecycle event.
    pub on_event: Option<String>,
    /// `--log-file`: where the daemon's stream goes, reopened on request.
    pub log_file: Option<PathBuf>,
    /// `--listen` as given, parsed by `validate` into `listen`.
    pub listen_args: Vec<String>,
    /// Sockets every worker inherits as descriptors 3, 4, ...
    pub listen: Vec<ListenSpec>,
    /// Give each worker its own `NOTIFY_SOCKET` (and no assumed readiness).
    pub notify: bool,
    /// What a worker that does not use the library gets to stop.
    pub stop_signal: nix::sys::signal::Signal,
    /// `--stop-signal` as given, parsed by `validate` into `stop_signal`.
    pub stop_signal_arg: Option<String>,
    /// `--name`, `--names`.
    pub naming: Naming,
    /// `--revive`.
    pub revive: Revive,
    /// `--storage-max-bytes`, `--storage-init`, `--storage-file`.
    pub storage: StorageSettings,
}

/// The dashboard's token: never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Token(pub String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// Reads the dashboard's token file: at least 16 characters once trimmed.
fn read_token(path: &Path) -> Result<Token> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::with_io(
            Kind::Config,
            format!("cannot read the token file {}", path.display()),
            e,
        )
    })?;
    let token = text.trim();
    if token.len() < 16 {
        return Err(Error::new(
            Kind::Config,
            format!(
                "the token in {} is too short: it needs at least 16 characters",
                path.display()
            ),
        ));
    }
    Ok(Token(token.to_string()))
}
/// Default of [`ClusterWatcherBuilder::max_restarts`]: failures a slot
/// may have within [`DEFAULT_RESTART_WINDOW`] before it gives up.
pub const DEFAULT_MAX_RESTARTS: u32 = 10;

/// Default of the window of [`ClusterWatcherBuilder::max_restarts`].
pub const DEFAULT_RESTART_WINDOW: Duration = Duration::from_secs(300);

impl Config {
    /// The defaults, running `command` (program, arguments, environment and
    /// working directory are taken from it).
    pub(crate) fn new(command: &std::process::Command) -> Config {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Config {
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
            http: None,
            http_token_file: None,
            http_token: None,
            systemd: true,
            subreaper: false,
            jobs: None,
            job_server: None,
            pool_args: Vec::new(),
            allow_bind: Vec::new(),
            bind_policy: BindPolicy::default(),
            user: None,
            group: None,
            credentials: None,
            upgrade_exec: super::upgrade::own_command(),
            max_restarts: Some(DEFAULT_MAX_RESTARTS),
            restart_window: DEFAULT_RESTART_WINDOW,
            max_requests: None,
            max_requests_jitter: 0,
            max_memory: None,
            on_event: None,
            log_file: None,
            listen_args: Vec::new(),
            listen: Vec::new(),
            notify: false,
            stop_signal: nix::sys::signal::Signal::SIGTERM,
            stop_signal_arg: None,
            naming: Naming::None,
            revive: Revive::Always,
            storage: StorageSettings::default(),
        }
    }

    /// The name of `slot`'s workers, if they have one.
    pub(crate) fn worker_name(&self, slot: u32) -> Option<String> {
        self.naming.of(slot)
    }

    /// The control socket: as configured, else beside the pid file.
    pub(crate) fn control_path(&self) -> Option<PathBuf> {
        self.control_socket.clone().or_else(|| {
            self.pid_file
                .as_deref()
                .map(crate::control::socket_for_pid_file)
        })
    }
}

/// Builds a [`ClusterWatcher`](super::ClusterWatcher); get one with
/// [`ClusterWatcher::builder`](super::ClusterWatcher::builder).
///
/// ```no_run
/// # fn build() -> Result<(), cluster::Error> {
/// use std::time::Duration;
/// let watcher = cluster::ClusterWatcher::builder(std::process::Command::new("./my-server"))
///     .workers(4)
///     .shutdown_timeout(Duration::from_secs(5))
///     .pid_file("/run/my-server.pid")
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClusterWatcherBuilder {
    pub(super) config: Config,
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
    /// (default 1 s; the CLI's `--ready-delay`). Not used with
    /// [`notify`](Self::notify), where such a worker is ready when it says
    /// `READY=1`.
    pub fn assume_ready_after(mut self, after: Duration) -> Self {
        self.config.assume_ready_after = after;
        self
    }

    /// Bind `spec` (`ADDR` or `NAME=ADDR`, repeatable) at start-up and start
    /// every worker with these sockets as descriptors 3, 4, ... and
    /// `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` (the worker's own
    /// pid), as systemd's socket activation passes them: any program can
    /// serve from the watcher's sockets. With [`Balance::Reuseport`] each
    /// slot has its own; the balanced modes cannot be combined with it.
    /// Workers that use the library get the matching inherited socket from
    /// [`listen`](crate::ServerSocketFactory::listen).
    ///
    /// A bad address or name, or a balanced mode, makes
    /// [`build`](Self::build) fail ([`Error::is_config`] or
    /// [`Error::is_invalid_address`]); an address that cannot be bound
    /// makes [`start`](super::ClusterWatcher::start) fail.
    pub fn listen(mut self, spec: impl Into<String>) -> Self {
        self.config.listen_args.push(spec.into());
        self
    }

    /// Give every worker its own `NOTIFY_SOCKET` (default off): `READY=1`
    /// marks it ready (the readiness gate of rolling restarts; no readiness
    /// is assumed after a delay), `WATCHDOG=1` answers the heartbeat
    /// (`WATCHDOG_USEC` is the heartbeat timeout; a worker is held to it
    /// from its first `WATCHDOG=1` on), `STATUS=` shows in `cluster status`,
    /// `STOPPING=1` marks it draining (a new worker starts for its slot),
    /// `RELOADING=1` until the next `READY=1` shows it reloading. Messages
    /// from processes other than the worker and its process group are
    /// ignored.
    pub fn notify(mut self, enabled: bool) -> Self {
        self.config.notify = enabled;
        self
    }

    /// The signal that asks a worker that does not use the library to stop
    /// (default `SIGTERM`): `"SIGQUIT"`, `"QUIT"`, `"3"`. It then has the
    /// [`shutdown_timeout`](Self::shutdown_timeout) before SIGKILL. Library
    /// workers get the stop message and SIGTERM. A name that is not a
    /// signal makes [`build`](Self::build) fail with [`Error::is_config`].
    pub fn stop_signal(mut self, name: impl Into<String>) -> Self {
        self.config.stop_signal_arg = Some(name.into());
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
    /// [`start`](super::ClusterWatcher::start) fail.
    pub fn metrics(mut self, addr: SocketAddr) -> Self {
        self.config.metrics = Some(addr);
        self
    }

    /// Serve the web dashboard and its JSON API on `http://ADDR/` (see the
    /// README's "Dashboard"). A loopback address needs nothing more; any
    /// other needs [`http_token_file`](Self::http_token_file), else
    /// [`start`](super::ClusterWatcher::start) fails with
    /// [`Error::is_config`](crate::Error::is_config).
    pub fn http(mut self, addr: SocketAddr) -> Self {
        self.config.http = Some(addr);
        self
    }

    /// The file that holds the dashboard's token (at least 16 characters;
    /// surrounding white space is ignored). Every request then needs it:
    /// `Authorization: Bearer TOKEN`, or `?token=TOKEN` once in the
    /// browser. Needs [`http`](Self::http).
    pub fn http_token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.http_token_file = Some(path.into());
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

    /// Make the watcher process the "child subreaper" of its workers'
    /// descendants (Linux `PR_SET_CHILD_SUBREAPER`; default off in the
    /// library, on in the `cluster` CLI): a process a worker started outside
    /// its process group is re-parented to the watcher when the worker dies,
    /// and the watcher kills and reaps it. Only for a process that has no
    /// children of its own besides the workers: every other orphan below it
    /// is killed too.
    pub fn subreaper(mut self, enabled: bool) -> Self {
        self.config.subreaper = enabled;
        self
    }

    /// What a watcher upgrade ([`ClusterWatcher::upgrade`](super::ClusterWatcher::upgrade),
    /// SIGUSR2 under [`run`](super::ClusterWatcher::run)) starts as the new
    /// watcher. Default: this process again, by the path it was started as
    /// (symbolic links are followed anew, so a deploy that switched one
    /// upgrades to the new binary) with its arguments. The program must
    /// build the same watcher and [`start`](super::ClusterWatcher::start)
    /// it: it finds what it inherits in `CLUSTER_UPGRADE`.
    pub fn upgrade_exec<S: AsRef<OsStr>>(
        mut self,
        program: impl Into<PathBuf>,
        args: impl IntoIterator<Item = S>,
    ) -> Self {
        self.config.upgrade_exec = (
            program.into(),
            args.into_iter().map(|a| a.as_ref().to_owned()).collect(),
        );
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

    /// Allow workers to listen on addresses matching `pattern`
    /// (repeatable): `HOST:PORT`, `:PORT`, `HOST:LOW-HIGH`,
    /// `unix:///path/file.sock` or `unix:///path/dir/`. Once one is given,
    /// workers get only matching addresses. Without any, workers that run
    /// as another user ([`user`](Self::user)) may have TCP ports from 1024
    /// up and no Unix path, and others anything. A bad pattern makes
    /// [`build`](Self::build) fail with [`Error::is_config`].
    pub fn allow_bind(mut self, pattern: impl Into<String>) -> Self {
        self.config.allow_bind.push(pattern.into());
        self
    }

    /// Crash-loop limit: a slot whose workers fail (exit or crash before
    /// they served for the backoff reset time, or cannot be started) more
    /// than `max` times within `window` is not restarted any more; it is
    /// reported as `failed` by `cluster status` (which then exits 5), in
    /// the metrics and the log, and a rolling restart starts it again.
    /// `None` restarts forever. Default: [`DEFAULT_MAX_RESTARTS`] within
    /// [`DEFAULT_RESTART_WINDOW`].
    ///
    /// ```no_run
    /// # fn build() -> Result<(), cluster::Error> {
    /// use std::time::Duration;
    /// let watcher = cluster::ClusterWatcher::builder(std::process::Command::new("./srv"))
    ///     .max_restarts(Some(5), Duration::from_secs(60))
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn max_restarts(mut self, max: Option<u32>, window: Duration) -> Self {
        self.config.max_restarts = max;
        self.config.restart_window = window;
        self
    }

    /// Recycling, like gunicorn's `--max-requests`: a worker that uses the
    /// library asks to be replaced after serving `n` requests (connections
    /// accepted through [`Listener`](crate::Listener)) plus a random
    /// `0..=jitter` more, so workers do not all recycle at once. The
    /// replacement goes through the rolling-restart path: it is started and
    /// ready before the old worker drains.
    pub fn max_requests(mut self, n: u64, jitter: u64) -> Self {
        self.config.max_requests = Some(n).filter(|&n| n > 0);
        self.config.max_requests_jitter = jitter;
        self
    }

    /// Recycling, like PM2's `max_memory_restart`: a worker whose resident
    /// memory (`VmRSS`) passes `bytes` is replaced through the
    /// rolling-restart path (checked every second).
    pub fn max_memory(mut self, bytes: u64) -> Self {
        self.config.max_memory = Some(bytes).filter(|&b| b > 0);
        self
    }

    /// Run `command` (through `sh -c`) for each lifecycle event: a worker
    /// crashed, a slot gave up after [`max_restarts`](Self::max_restarts),
    /// a worker was recycled, a rolling restart failed, the watcher
    /// started or is stopping. The event is a JSON object on the command's
    /// stdin and in `CLUSTER_EVENT_JSON`; its name is in `CLUSTER_EVENT`.
    /// Commands run one at a time, at most 30 s each; events beyond 64
    /// waiting are dropped with a warning.
    pub fn on_event(mut self, command: impl Into<String>) -> Self {
        self.config.on_event = Some(command.into());
        self
    }

    /// The file the watcher's stderr was redirected to (`cluster --daemon
    /// --log-file`): `cluster reopen-logs` reopens it (after logrotate
    /// moved it) and `cluster logs` reads it.
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.log_file = Some(path.into());
        self
    }

    /// Name the workers `prefix-1` … `prefix-N` (by slot): what
    /// [`Cluster::name`](crate::Cluster::name) returns, `cluster status`
    /// shows and commands can be sent to.
    pub fn name(mut self, prefix: impl Into<String>) -> Self {
        self.config.naming = Naming::Prefix(prefix.into());
        self
    }

    /// Name each slot's workers: the first name is slot 1's, and so on;
    /// sets the number of workers to the number of names.
    pub fn names<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        self.config.workers = names.len();
        self.config.naming = Naming::List(names);
        self
    }

    /// When a worker that ended is replaced (default [`Revive::Always`]).
    pub fn revive(mut self, revive: Revive) -> Self {
        self.config.revive = revive;
        self
    }

    /// The most the shared storage may hold, in bytes (default 64 MiB):
    /// a write past it is refused with [`Error::is_storage_full`].
    pub fn storage_max_bytes(mut self, bytes: usize) -> Self {
        self.config.storage.max_bytes = bytes;
        self
    }

    /// Start the shared storage with the JSON object in `path` (unless
    /// [`storage_file`](Self::storage_file) has a snapshot to load).
    pub fn storage_init(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.storage.init = Some(path.into());
        self
    }

    /// Keep the shared storage in `path`: loaded at start when it exists,
    /// written atomically once a second when something changed, and when
    /// the watcher stops.
    pub fn storage_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.storage.file = Some(path.into());
        self
    }

    /// Run the workers with the group `name`, with no supplementary groups.
    /// The watcher must run as root.
    pub fn group(mut self, name: impl Into<String>) -> Self {
        self.config.group = Some(name.into());
        self
    }
}
