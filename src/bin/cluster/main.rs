//! The `cluster` command: parses the command line, sets up logging, and
//! runs a [`cluster::ClusterWatcher`] until it stops.
//!
//! Exit status: 0 after a graceful stop, 1 when the watcher fails (or a
//! second stop signal forced it), 2 for a usage error; `cluster status`
//! exits 3 when no watcher runs, 4 when it may not ask, 5 when the
//! cluster is degraded. `cluster jobs ...` exits 0 or 1.

mod cli;
mod client;
mod completions;
mod config_file;
mod jobs;
mod logs;
mod running;
mod shared_state;

use std::process::ExitCode;

use std::time::Duration;

use tracing_subscriber::prelude::*;

use cluster::daemon::{daemonize, Daemon};
use cluster::{ClusterWatcher, LogFilter, LogOutput, Stopped};

fn main() -> ExitCode {
    let args = match config_file::parse(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(config_file::Failure::Config(line)) => {
            eprintln!("cluster: error: {line}");
            return ExitCode::from(2);
        }
        Err(config_file::Failure::Usage(e)) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let rendered = e.render().to_string();
            let mut lines = rendered.lines().map(str::trim).filter(|l| !l.is_empty());
            let mut line = lines.next().unwrap_or("invalid arguments").to_string();
            if line.ends_with(':') {
                // "the following required arguments were not provided:" + the list
                if let Some(next) = lines.next() {
                    line = format!("{line} {next}");
                }
            }
            let line = line.strip_prefix("error: ").unwrap_or(&line);
            eprintln!("cluster: error: {line} (see 'cluster --help')");
            return ExitCode::from(2);
        }
    };
    match args.control {
        Some(cli::Command::Control(cmd)) => return running::run(cmd),
        Some(cli::Command::Jobs { cmd }) => return jobs::run(cmd),
        Some(cli::Command::Logs(a)) => return logs::run(a),
        Some(cli::Command::Completions { shell }) => return completions::completions(shell),
        Some(cli::Command::Man) => return completions::man(),
        None => {}
    }
    if args.daemon && args.pid_file.is_none() {
        eprintln!(
            "cluster: error: --daemon needs --pid-file (cluster status and cluster stop find the daemon through it)"
        );
        return ExitCode::from(2);
    }
    let spec = match &args.log_level {
        Some(level) => level.clone(),
        None => std::env::var("RUST_LOG")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "info".into()),
    };
    let filter = match LogFilter::parse(&spec) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cluster: error: invalid --log-level: {e}");
            return ExitCode::from(2);
        }
    };
    // Detach now, while this process has a single thread (no runtime and
    // no log writer yet). Past this point errors also go to the launcher.
    // Absolute, so `cluster logs` finds it from any directory.
    let log_file = args
        .log_file
        .as_deref()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()));
    let daemon = if args.daemon {
        match daemonize(log_file.as_deref()) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("cluster: error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let daemon = daemon.as_ref();
    let output =
        LogOutput::stderr(args.log_format.into(), filter).with_stderr_level(args.stderr_level);
    tracing_subscriber::registry().with(output.layer()).init();

    let mut command = std::process::Command::new(&args.command[0]);
    command.args(&args.command[1..]);
    let heartbeat = (!args.heartbeat_timeout.is_zero()).then_some(args.heartbeat_timeout);
    let mut builder = ClusterWatcher::builder(command)
        .log_output(output.clone())
        .shutdown_timeout(args.shutdown_timeout)
        .backlog(args.backlog)
        .ready_timeout(args.ready_timeout)
        .reload_batch(args.reload_batch)
        .heartbeat_timeout(heartbeat)
        .reload_on_deploy(args.reload_on_deploy)
        .subreaper(true)
        .balance(args.balance)
        .max_restarts(
            Some(args.max_restarts).filter(|&n| n > 0),
            args.restart_window,
        )
        .max_requests(args.max_requests, args.max_requests_jitter)
        .notify(args.notify)
        .assume_ready_after(args.ready_delay)
        .stop_signal(&args.stop_signal)
        .revive(args.revive)
        .storage_max_bytes(args.storage_max_bytes);
    for spec in &args.listen {
        builder = builder.listen(spec);
    }
    if let Some(bytes) = args.max_memory {
        builder = builder.max_memory(bytes);
    }
    if let Some(cmd) = &args.on_event {
        builder = builder.on_event(cmd);
    }
    if let Some(path) = &log_file {
        builder = builder.log_file(path);
    }
    if let Some(prefix) = &args.name {
        builder = builder.name(prefix);
    }
    if !args.names.is_empty() {
        builder = builder.names(args.names.iter().cloned());
    }
    if let Some(path) = &args.storage_init {
        builder = builder.storage_init(path);
    }
    if let Some(path) = &args.storage_file {
        builder = builder.storage_file(path);
    }
    for path in &args.watch {
        builder = builder.watch(path);
    }
    if let Some(path) = &args.control_socket {
        builder = builder.control_socket(path);
    }
    if let Some(n) = args.workers {
        builder = builder.workers(n);
    }
    if let Some(path) = &args.pid_file {
        builder = builder.pid_file(path);
    }
    if let Some(addr) = args.metrics {
        builder = builder.metrics(addr);
    }
    if let Some(addr) = args.http {
        builder = builder.http(addr);
    }
    if let Some(path) = &args.http_token_file {
        builder = builder.http_token_file(path);
    }
    if let Some(user) = &args.user {
        builder = builder.user(user);
    }
    if let Some(group) = &args.group {
        builder = builder.group(group);
    }
    for pattern in &args.allow_bind {
        builder = builder.allow_bind(pattern);
    }
    for addr in &args.job_server {
        builder = builder.job_server(addr);
    }
    if !args.job_server.is_empty() {
        builder = builder
            .job_max_body(args.job_max_body)
            .job_header_timeout(args.job_header_timeout);
        if let Some(path) = &args.job_server_token_file {
            builder = builder.job_server_token_file(path);
        }
    }
    if let Some(url) = &args.jobs {
        builder = builder.jobs(url);
    }
    if args.jobs.is_some() || !args.job_server.is_empty() {
        builder = builder
            .job_queue_limit(args.job_queue_limit)
            .per_job(args.per_job)
            .job_concurrency(args.job_concurrency)
            .job_prefetch(args.job_prefetch)
            .safe_mode(!args.no_safe_mode)
            .max_attempts(args.max_attempts)
            .job_timeout(args.job_timeout)
            .retry_delay(args.retry_delay)
            .job_source_interval(args.job_source_interval)
            .jobs_retention(args.jobs_retention)
            .node_timeout(args.node_timeout);
        if let Some(schema) = &args.jobs_schema {
            builder = builder.jobs_schema(schema);
        }
        if let Some(node) = &args.node {
            builder = builder.node(node);
        }
        for pool in &args.pool {
            builder = builder.pool(pool);
        }
        for cmd in &args.job_source {
            builder = builder.job_source_command(cmd);
        }
    }
    let watcher = match builder.build() {
        Ok(w) => w,
        Err(e) => return fail(&output, &e, daemon),
    };
    // A current-thread runtime: the workers are forked from this thread,
    // which lives as long as they do (PR_SET_PDEATHSIG follows the thread).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let line = format!("cluster: error: cannot start the runtime: {e}");
            eprintln!("{line}");
            if let Some(d) = daemon {
                d.report_error(&line);
            }
            return ExitCode::FAILURE;
        }
    };
    let patience = args.ready_timeout;
    let result = runtime.block_on(async {
        // The CLI logs the messages workers send it.
        let log_messages = async {
            let mut messages = watcher.messages();
            while let Some(m) = messages.next().await {
                let w = m.worker();
                tracing::info!(
                    "message from worker {} (pid {}): {} bytes",
                    w.slot(),
                    w.pid(),
                    m.bytes().len()
                );
            }
            std::future::pending::<std::convert::Infallible>().await
        };
        tokio::select! {
            result = watcher.run() => result,
            never = log_messages => match never {},
            never = report_when_ready(&watcher, daemon, patience) => match never {},
        }
    });
    match result {
        Ok(Stopped::Graceful | Stopped::Upgraded { .. }) => {
            output.flush(Duration::from_secs(2));
            ExitCode::SUCCESS
        }
        Ok(_) => {
            output.flush(Duration::from_secs(2));
            last_words("cluster: workers were killed (forced stop)");
            ExitCode::FAILURE
        }
        Err(e) => fail(&output, &e, daemon),
    }
}

/// Writes the watcher's last line on stderr, unless stderr stays unwritable
/// for a second (its reader stopped reading): the exit never waits on it.
fn last_words(line: &str) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::io::Write;
    use std::os::fd::AsFd;
    let stderr = std::io::stderr();
    let mut fds = [PollFd::new(stderr.as_fd(), PollFlags::POLLOUT)];
    if matches!(poll(&mut fds, PollTimeout::from(1000u16)), Ok(n) if n > 0) {
        let _ = writeln!(stderr.lock(), "{line}");
    }
}

fn fail(output: &LogOutput, e: &cluster::Error, daemon: Option<&Daemon>) -> ExitCode {
    output.flush(Duration::from_secs(2));
    let line = format!("cluster: error: {e}");
    last_words(&line);
    if let Some(d) = daemon {
        d.report_error(&line);
    }
    ExitCode::FAILURE
}

/// With `--daemon`: tells the launching process once every worker is
/// ready, so that it exits 0 (or, when they are not ready after
/// `patience`, exits 0 with a warning while the daemon goes on). Failures
/// are reported by `fail`.
async fn report_when_ready(
    watcher: &ClusterWatcher,
    daemon: Option<&Daemon>,
    patience: Duration,
) -> std::convert::Infallible {
    if let Some(daemon) = daemon {
        tokio::select! {
            ready = watcher.wait_ready() => {
                if ready.is_ok() {
                    daemon.report_ready(None);
                }
            }
            _ = tokio::time::sleep(patience) => {
                daemon.report_ready(Some(&format!(
                    "cluster: warning: the workers are not ready after {}s; the daemon (pid {}) keeps running and restarting them (see its log)",
                    patience.as_secs_f64(),
                    std::process::id()
                )));
            }
        }
    }
    std::future::pending().await
}
