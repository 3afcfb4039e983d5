//! Command-line parsing in two stages: raw flags (clap), then a validated
//! configuration.

use std::ffi::OsString;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Run N copies of a server program behind listening sockets that this
/// watcher owns; respawn them when they crash, restart them without
/// dropping a connection, stop them gracefully.
///
/// Signals: TERM, INT and QUIT stop gracefully (a second one kills the
/// workers); USR1 and HUP restart the workers one by one; TTIN adds a
/// worker, TTOU removes one; USR2 upgrades the watcher itself.
#[derive(Debug, Parser)]
#[command(
    name = "cluster",
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Put `--` before program arguments that look like cluster options:\n  cluster --workers 4 -- ./my-server --port 8080\nA program named like a subcommand runs as ./status or after --."
)]
pub struct Args {
    /// Talk to a running watcher, or to a job store, instead of starting one
    #[command(subcommand)]
    pub control: Option<Command>,

    /// Number of workers [default: the number of CPUs available]
    #[arg(short = 'w', long, value_name = "N", value_parser = parse_workers)]
    pub workers: Option<usize>,

    /// Write the watcher's pid to FILE (locked while running, removed on exit)
    #[arg(short = 'p', long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,

    /// Seconds a worker has to exit when asked to stop before it is killed
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_seconds)]
    pub shutdown_timeout: Duration,

    /// listen(2) backlog of the sockets the watcher binds
    #[arg(long, value_name = "N", default_value_t = cluster::DEFAULT_BACKLOG, value_parser = parse_backlog)]
    pub backlog: u32,

    /// Log level or filter for the watcher's log (error, warn, info, debug,
    /// trace, or RUST_LOG-style directives) [default: $RUST_LOG, else info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Format of the log stream (the watcher's records, the workers'
    /// forwarded records and their stdout/stderr lines)
    #[arg(long, value_name = "FORMAT", value_enum, default_value = "text")]
    pub log_format: Format,

    /// Seconds a replacement started by a rolling restart has to become
    /// ready before it is killed (the old worker keeps serving)
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_seconds)]
    pub ready_timeout: Duration,

    /// How many workers a rolling restart replaces at once
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_workers)]
    pub reload_batch: usize,

    /// Seconds a ready worker may leave the watcher's pings unanswered
    /// before it is killed and replaced (0 disables)
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_seconds)]
    pub heartbeat_timeout: Duration,

    /// Rolling-restart when a file under PATH changes (repeatable; files or
    /// directories, debounced)
    #[arg(long, value_name = "PATH")]
    pub watch: Vec<PathBuf>,

    /// Rolling-restart when the program's path resolves to a new target
    /// (a deploy switched a `current -> releases/vN` symlink)
    #[arg(long)]
    pub reload_on_deploy: bool,

    /// How connections reach the workers: shared (one accept queue),
    /// reuseport (one SO_REUSEPORT listener per slot), round-robin,
    /// least-connections or ip-hash (the watcher accepts and hands off)
    #[arg(long, value_name = "MODE", default_value = "shared")]
    pub balance: cluster::Balance,

    /// Bind ADDR at start-up (host:port, :port, unix:///path; NAME=ADDR
    /// names it) and start every worker with it as descriptor 3, 4, ...
    /// and LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID, as systemd's socket
    /// activation does: any program can serve from it (repeatable)
    #[arg(long, value_name = "[NAME=]ADDR")]
    pub listen: Vec<String>,

    /// Give each worker its own NOTIFY_SOCKET (sd_notify): READY=1 marks it
    /// ready, WATCHDOG=1 answers the heartbeat (WATCHDOG_USEC), STATUS=
    /// shows in `cluster status`, STOPPING=1 drains it, RELOADING=1 shows
    #[arg(long, conflicts_with = "ready_delay")]
    pub notify: bool,

    /// Seconds after its start at which a worker that does not use the
    /// library counts as ready (without --notify)
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_seconds)]
    pub ready_delay: Duration,

    /// The signal that asks a worker that does not use the library to stop
    /// (it has --shutdown-timeout to finish before SIGKILL)
    #[arg(long, value_name = "SIGNAL", default_value = "SIGTERM")]
    pub stop_signal: String,

    /// Control socket path [default: beside the pid file, x.pid -> x.sock]
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Serve Prometheus metrics on http://ADDR/metrics (host:port or :port)
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_addr)]
    pub metrics: Option<SocketAddr>,

    /// Serve the web dashboard and its JSON API on http://ADDR/ (host:port,
    /// or :port for 127.0.0.1:port); an address that is not loopback needs
    /// --http-token-file
    #[arg(long, value_name = "ADDR", value_parser = parse_http_addr)]
    pub http: Option<SocketAddr>,

    /// File holding the dashboard's token (16 characters or more); every
    /// request must carry it
    #[arg(long, value_name = "FILE", requires = "http")]
    pub http_token_file: Option<PathBuf>,

    /// Run the workers as this user (the watcher must run as root; it
    /// keeps root to bind the listeners)
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,

    /// Run the workers with this group [default: the user's primary group]
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,

    /// Run jobs from this job store (a SQLite file: jobs.db, sqlite://PATH;
    /// or postgres://USER@HOST/DB, shared by many watchers as nodes): the
    /// watcher claims the jobs of its pools' queues for its workers
    #[arg(long, value_name = "URL", help_heading = "Jobs")]
    pub jobs: Option<String>,

    /// A pool of workers for queue NAME: NAME=RATIO or NAME=RATIO:shared
    /// (repeatable; ceil(workers x RATIO) slots; a shared pool also takes
    /// the other pools' excess) [default: one pool "default"]
    #[arg(
        long,
        value_name = "NAME=RATIO",
        help_heading = "Jobs",
        requires = "jobs"
    )]
    pub pool: Vec<String>,

    /// Run PROGRAM once per job (PROGRAM ARGS... JOBARGS...) instead of
    /// persistent workers
    #[arg(long, help_heading = "Jobs", requires = "jobs")]
    pub per_job: bool,

    /// Jobs a persistent worker runs at once
    #[arg(long, value_name = "K", default_value = "1", value_parser = parse_count, help_heading = "Jobs")]
    pub job_concurrency: u32,

    /// Jobs claimed ahead per queue, beyond what its pools can start now
    #[arg(long, value_name = "N", default_value = "0", help_heading = "Jobs")]
    pub job_prefetch: usize,

    /// Allow two running jobs with the same key (safe mode is on by default)
    #[arg(long, help_heading = "Jobs", requires = "jobs")]
    pub no_safe_mode: bool,

    /// Attempts of the jobs a job source queues
    #[arg(long, value_name = "N", default_value = "3", value_parser = parse_count, help_heading = "Jobs")]
    pub max_attempts: u32,

    /// Stop a job attempt that runs longer than SECS (0: no limit)
    #[arg(long, value_name = "SECS", default_value = "0", value_parser = parse_seconds, help_heading = "Jobs")]
    pub job_timeout: Duration,

    /// First delay before a failed job runs again (doubling per attempt,
    /// jitter, at most 10 minutes)
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_seconds, help_heading = "Jobs")]
    pub retry_delay: Duration,

    /// A command that lists jobs, run once per pool every interval with
    /// CLUSTER_POOL and CLUSTER_LIMIT set (repeatable); each JSON line it
    /// prints is a job, queued unless its key is queued or running
    #[arg(long, value_name = "CMD", help_heading = "Jobs", requires = "jobs")]
    pub job_source: Vec<String>,

    /// How often job sources run
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_seconds, help_heading = "Jobs")]
    pub job_source_interval: Duration,

    /// How long finished jobs are kept, in seconds
    #[arg(long, value_name = "SECS", default_value = "604800", value_parser = parse_retention, help_heading = "Jobs")]
    pub jobs_retention: Duration,

    /// Serve the job server's HTTP/1.1 JSON API on ADDR (repeatable;
    /// host:port, [::]:port, unix:///path): calls to the workers' job
    /// handlers by name, and durable jobs with --jobs
    #[arg(long, value_name = "ADDR", help_heading = "Job server")]
    pub job_server: Vec<String>,

    /// Every job server request needs `Authorization: Bearer <token>` with
    /// the token in FILE (required for an address other hosts can reach)
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "Job server",
        requires = "job_server"
    )]
    pub job_server_token_file: Option<PathBuf>,

    /// Largest job server request body in bytes (larger ones get 413)
    #[arg(long, value_name = "BYTES", default_value = "1048576", value_parser = parse_bytes, help_heading = "Job server")]
    pub job_max_body: usize,

    /// Calls that may wait for a busy worker (past it, 503 at once)
    #[arg(
        long,
        value_name = "N",
        default_value = "10000",
        help_heading = "Job server"
    )]
    pub job_queue_limit: usize,

    /// Seconds a job server client has to send a request head, and then
    /// its body
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_seconds, help_heading = "Job server")]
    pub job_header_timeout: Duration,

    /// The PostgreSQL schema of the job tables [default: cluster]
    #[arg(long, value_name = "NAME", help_heading = "Jobs", requires = "jobs")]
    pub jobs_schema: Option<String>,

    /// This watcher's node name on a PostgreSQL job store [default: the
    /// host name plus a per-start id]
    #[arg(long, value_name = "NAME", value_parser = parse_node, help_heading = "Jobs", requires = "jobs")]
    pub node: Option<String>,

    /// Seconds a node may miss heartbeats before the others declare it
    /// dead and run its jobs again (PostgreSQL job stores)
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_node_timeout, help_heading = "Jobs")]
    pub node_timeout: Duration,

    /// Let workers listen on addresses matching PATTERN (repeatable):
    /// HOST:PORT, :PORT, HOST:LOW-HIGH, unix:///path/file.sock or
    /// unix:///path/dir/. Once given, workers get only matching addresses;
    /// without it, workers run with --user may have TCP ports from 1024 up
    #[arg(long, value_name = "PATTERN")]
    pub allow_bind: Vec<String>,

    /// Detach and run in the background (needs --pid-file); returns once
    /// the workers are ready, exit 1 with the error otherwise
    #[arg(long)]
    pub daemon: bool,

    /// With --daemon: append the log stream to FILE [default: /dev/null]
    #[arg(long, value_name = "FILE", requires = "daemon")]
    pub log_file: Option<PathBuf>,

    /// Read options from a TOML file (keys are the long option names,
    /// `program = ["./srv", "arg"]`); the command line and CLUSTER_*
    /// variables override it
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Give up on a slot whose workers fail more than N times within
    /// --restart-window (0: restart forever)
    #[arg(long, value_name = "N", default_value_t = cluster::DEFAULT_MAX_RESTARTS, help_heading = "Health")]
    pub max_restarts: u32,

    /// The window of --max-restarts, in seconds
    #[arg(long, value_name = "SECS", default_value = "300", value_parser = parse_seconds, help_heading = "Health")]
    pub restart_window: Duration,

    /// Replace a worker (rolling) after it served N requests (connections
    /// accepted through the library's listener; 0: never)
    #[arg(long, value_name = "N", default_value = "0", help_heading = "Health")]
    pub max_requests: u64,

    /// Add a random 0..=N to each worker's --max-requests
    #[arg(long, value_name = "N", default_value = "0", help_heading = "Health")]
    pub max_requests_jitter: u64,

    /// Replace a worker (rolling) whose resident memory passes SIZE
    /// (bytes, or 512M, 2G)
    #[arg(long, value_name = "SIZE", value_parser = cluster::__parse_bytes, help_heading = "Health")]
    pub max_memory: Option<u64>,

    /// Run CMD (sh -c) on each event: worker_crashed, slot_gave_up,
    /// worker_recycled, reload_failed, watcher_started, watcher_stopping
    /// (JSON on stdin and in CLUSTER_EVENT_JSON, the name in CLUSTER_EVENT)
    #[arg(long, value_name = "CMD", help_heading = "Health")]
    pub on_event: Option<String>,

    /// Level of the lines workers print on stderr (stdout lines are info)
    #[arg(long, value_name = "LEVEL", default_value = "warn", value_parser = parse_level)]
    pub stderr_level: tracing::Level,
    /// Name the workers PREFIX-1 ... PREFIX-N (by slot)
    #[arg(
        long,
        value_name = "PREFIX",
        conflicts_with = "names",
        help_heading = "Workers"
    )]
    pub name: Option<String>,

    /// Name each worker (one name per slot; sets the number of workers)
    #[arg(
        long,
        value_name = "A,B,...",
        value_delimiter = ',',
        help_heading = "Workers"
    )]
    pub names: Vec<String>,

    /// When a worker that ended is replaced: always, on-failure (it exited
    /// non-zero or was killed), never
    #[arg(
        long,
        value_name = "WHEN",
        default_value = "always",
        help_heading = "Workers"
    )]
    pub revive: cluster::Revive,

    /// Most bytes the shared storage holds (K, M, G suffixes); a write past
    /// it is refused
    #[arg(long, value_name = "N", default_value = "64M", value_parser = parse_bytes, help_heading = "Shared storage")]
    pub storage_max_bytes: usize,

    /// Start the shared storage with the JSON object in FILE (unless
    /// --storage-file has a snapshot)
    #[arg(long, value_name = "FILE", help_heading = "Shared storage")]
    pub storage_init: Option<PathBuf>,

    /// Keep the shared storage in FILE: loaded at start, written atomically
    /// once a second when it changed and at exit
    #[arg(long, value_name = "FILE", help_heading = "Shared storage")]
    pub storage_file: Option<PathBuf>,

    /// The program to run as each worker, and its arguments
    #[arg(value_name = "PROGRAM", required = true, num_args = 1.., trailing_var_arg = true)]
    pub command: Vec<OsString>,
}

/// The subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    #[command(flatten)]
    Control(Control),
    /// Submit, list, inspect, cancel and retry durable jobs in a job store
    Jobs {
        #[command(subcommand)]
        cmd: crate::jobs::JobsCommand,
    },
    /// Print a daemon's log (its --log-file), optionally following it
    Logs(crate::logs::LogsArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions {
        /// The shell
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): cluster man > /usr/local/share/man/man1/cluster.1
    Man,
}

/// Subcommands that talk to a running watcher through its control socket.
#[derive(Debug, clap::Subcommand)]
pub enum Control {
    /// Show every slot (exit 0 when all workers are ready, 5 when fewer
    /// are or a slot gave up, 3 when no watcher runs)
    Status {
        #[command(flatten)]
        target: Target,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
        /// Add commands and messages per worker and the shared storage's
        /// size and operations per second to the table
        #[arg(long)]
        stats: bool,
        /// Print nothing; only the exit status tells
        #[arg(short, long)]
        quiet: bool,
    },
    /// Restart the workers one by one; fails if a replacement is not ready
    Reload {
        #[command(flatten)]
        target: Target,
    },
    /// Stop the watcher gracefully and wait until it has exited; with
    /// --slot or --name, stop that worker alone (at once when its status is
    /// idle, else asked to stop and killed after --timeout)
    Stop {
        #[command(flatten)]
        target: Target,
        /// Stop the worker of this slot alone
        #[arg(long, value_name = "N", conflicts_with = "name")]
        slot: Option<u32>,
        /// Stop the worker with this name alone
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Seconds to wait for the watcher to exit [default: 60]; with
        /// --slot/--name, seconds a busy worker has before it is killed
        /// [default: the watcher's --shutdown-timeout]
        #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
        timeout: Option<Duration>,
    },
    /// Read and write the watcher's shared storage
    Storage {
        #[command(subcommand)]
        op: StorageOp,
    },
    /// Send a command to the watcher or its workers and print the reply
    /// (one JSON line per worker for --to all)
    Command {
        #[command(flatten)]
        target: Target,
        /// Where: watcher, a slot number, a worker name, or all
        #[arg(long, value_name = "TARGET")]
        to: String,
        /// Seconds to wait for the reply
        #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_seconds)]
        timeout: Duration,
        /// The command's name
        #[arg(value_name = "NAME")]
        name: String,
        /// Its arguments, as JSON [default: null]
        #[arg(value_name = "JSON")]
        args: Option<String>,
    },
    /// Reopen the daemon's --log-file (after logrotate moved it)
    ReopenLogs {
        #[command(flatten)]
        target: Target,
    },
    /// Set the number of workers
    Scale {
        #[command(flatten)]
        target: Target,
        /// The new number of workers
        #[arg(value_name = "N", value_parser = parse_workers)]
        workers: usize,
    },
    /// Upgrade the watcher itself: start its binary again as a new watcher
    /// that inherits the listeners; once its workers are ready the old one
    /// drains and exits (exit 0), else the old one keeps serving (exit 1)
    Upgrade {
        #[command(flatten)]
        target: Target,
    },
}

/// `cluster storage` operations.
#[derive(Debug, clap::Subcommand)]
pub enum StorageOp {
    /// Print the JSON value at PATH (exit 1 when nothing is there)
    Get {
        #[command(flatten)]
        target: Target,
        /// A dot path (users.42.name)
        #[arg(value_name = "PATH")]
        path: String,
    },
    /// Set PATH to the JSON value
    Set {
        #[command(flatten)]
        target: Target,
        /// A dot path; missing objects on the way are created
        #[arg(value_name = "PATH")]
        path: String,
        /// The value, as JSON (quote strings: '"text"')
        #[arg(value_name = "JSON")]
        value: String,
        /// Delete it after SECS
        #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
        ttl: Option<Duration>,
    },
    /// Delete PATH and everything under it (exit 1 when nothing was there)
    Delete {
        #[command(flatten)]
        target: Target,
        /// A dot path
        #[arg(value_name = "PATH")]
        path: String,
    },
    /// Print the whole storage as JSON
    Dump {
        #[command(flatten)]
        target: Target,
    },
}

/// Which watcher to talk to.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct Target {
    /// The watcher's pid file (its control socket is beside it)
    #[arg(short = 'p', long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// The watcher's control socket
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
}

impl Target {
    /// The control socket to connect to.
    pub fn socket(&self) -> Result<PathBuf, String> {
        match (&self.control_socket, &self.pid_file) {
            (Some(s), _) => Ok(s.clone()),
            (None, Some(p)) => Ok(cluster::control::socket_for_pid_file(p)),
            (None, None) => Err("give --pid-file or --control-socket".into()),
        }
    }
}

fn parse_workers(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of workers"))?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    if n > 4096 {
        return Err("at most 4096 workers".into());
    }
    Ok(n)
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !secs.is_finite() || !(0.0..=86_400.0).contains(&secs) {
        return Err("must be between 0 and 86400 seconds".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_metrics_addr(s: &str) -> Result<SocketAddr, String> {
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_string()
    };
    full.to_socket_addrs()
        .map_err(|e| format!("'{s}' is not a host:port address ({e})"))?
        .next()
        .ok_or_else(|| format!("'{s}' resolves to no address"))
}

/// Like `--metrics`, but `:port` is loopback: the dashboard can act.
fn parse_http_addr(s: &str) -> Result<SocketAddr, String> {
    match s.strip_prefix(':') {
        Some(port) => parse_metrics_addr(&format!("127.0.0.1:{port}")),
        None => parse_metrics_addr(s),
    }
}

fn parse_level(s: &str) -> Result<tracing::Level, String> {
    s.parse()
        .map_err(|_| format!("'{s}' is not a level (error, warn, info, debug, trace)"))
}

/// A byte count with an optional K, M or G suffix (powers of 1024), as
/// `--max-memory` takes it.
fn parse_bytes(s: &str) -> Result<usize, String> {
    let n = cluster::__parse_bytes(s)?;
    usize::try_from(n).map_err(|_| format!("'{s}' is too large"))
}

fn parse_count(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

fn parse_retention(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !secs.is_finite() || !(0.0..=3_162_240_000.0).contains(&secs) {
        return Err("must be between 0 and 100 years in seconds".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_node(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 200 || s.chars().any(char::is_control) {
        return Err("must be 1 to 200 printable characters".into());
    }
    Ok(s.to_string())
}

fn parse_node_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !secs.is_finite() || !(0.2..=86_400.0).contains(&secs) {
        return Err("must be between 0.2 and 86400 seconds".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_backlog(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable lines
    Text,
    /// One JSON object per line
    Json,
}

impl From<Format> for cluster::LogFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::Text => cluster::LogFormat::Text,
            Format::Json => cluster::LogFormat::Json,
        }
    }
}

#[cfg(test)]
mod tests;
