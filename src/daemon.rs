//! Detaching from the terminal, as `cluster --daemon` does.
//!
//! [`daemonize`] must run while the process has a single thread: before a
//! tokio runtime, a log writer or any other thread exists (it refuses
//! otherwise). It forks; the child starts a new session (`setsid`) and
//! forks again, so the daemon is not a session leader and can never
//! acquire a controlling terminal; the daemon's stdin reads `/dev/null`,
//! its stdout and stderr append to the log file (or go to `/dev/null`).
//! The working directory is kept, so relative paths keep their meaning.
//!
//! The launching process does not return from [`daemonize`]: it waits until
//! the daemon calls [`Daemon::report_ready`] or [`Daemon::report_error`]
//! (over a pipe), prints what the daemon reported on its own stderr, and
//! exits 0 (ready) or 1 (error, or the daemon exited without a report).
//! So a script that starts a daemon learns about a bad address or a pid
//! file held by another watcher from the exit status.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Mutex;

use nix::unistd::ForkResult;

use crate::sys;

/// The daemon's end of the report pipe; see [`daemonize`].
///
/// ```no_run
/// // In main, before any thread or runtime exists:
/// let daemon = cluster::daemon::daemonize(Some(std::path::Path::new("app.log")))?;
/// // ... start the watcher, then, once it serves:
/// daemon.report_ready(None);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct Daemon {
    report: Mutex<Option<File>>,
}

impl Daemon {
    /// Tells the launching process that the daemon is up: it prints
    /// `note` (one or more lines, if any) on its stderr and exits 0. Only
    /// the first report counts.
    pub fn report_ready(&self, note: Option<&str>) {
        self.send("ok", note);
    }

    /// Tells the launching process that the daemon failed: it prints
    /// `message` (for example `cluster: error: ...`) on its stderr and
    /// exits 1. Only the first report counts.
    pub fn report_error(&self, message: &str) {
        self.send("error", Some(message));
    }

    fn send(&self, status: &str, text: Option<&str>) {
        let Ok(mut guard) = self.report.lock() else {
            return;
        };
        if let Some(mut pipe) = guard.take() {
            let mut msg = format!("{status}\n");
            if let Some(text) = text {
                msg.push_str(text.trim_end());
                msg.push('\n');
            }
            // The launcher may be gone (killed): nothing to do then.
            let _ = pipe.write_all(msg.as_bytes());
        }
    }
}

/// Opens `path` again (creating it, appending) and points stdout and
/// stderr at it: after logrotate moved the daemon's `--log-file` away,
/// the stream goes to a new file at the old name (`cluster reopen-logs`).
///
/// ```no_run
/// cluster::daemon::reopen_log_file(std::path::Path::new("/var/log/app.log"))?;
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
///
/// When the file cannot be opened or the descriptors not replaced; stdout
/// and stderr are unchanged then.
pub fn reopen_log_file(path: &Path) -> io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    nix::unistd::dup2_stdout(&file)?;
    nix::unistd::dup2_stderr(&file)?;
    Ok(())
}

/// Detaches the process (see the module docs). Returns in the daemon only.
///
/// `log_file`, when given, is opened for appending (created if missing)
/// before the fork, so an unwritable path is reported by the caller in the
/// foreground.
///
/// # Errors
///
/// When the log file or `/dev/null` cannot be opened, the process already
/// runs more than one thread, or `fork`/`setsid` fail; nothing was forked
/// then (or the launcher reports the failure of the child).
pub fn daemonize(log_file: Option<&Path>) -> io::Result<Daemon> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let log: Option<File> = match log_file {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot open log file {}: {e}", path.display()),
                    )
                })?,
        ),
        None => None,
    };
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    match sys::fork_single_threaded()? {
        ForkResult::Parent { child } => {
            drop(write);
            drop((null, log));
            launcher(read, child)
        }
        ForkResult::Child => {}
    }
    drop(read);
    // A failure from here on can only be reported through the pipe.
    let fail = |write: OwnedFd, what: &str, e: io::Error| -> ! {
        let mut pipe = File::from(write);
        let _ = writeln!(pipe, "error\ncannot start the daemon: {what}: {e}");
        std::process::exit(1)
    };
    if let Err(e) = nix::unistd::setsid() {
        fail(write, "setsid", e.into());
    }
    match sys::fork_single_threaded() {
        // The session leader leaves; the daemon is its orphaned child.
        Ok(ForkResult::Parent { .. }) => std::process::exit(0),
        Ok(ForkResult::Child) => {}
        Err(e) => fail(write, "fork", e),
    }
    let out = log.as_ref().unwrap_or(&null);
    let redirected = nix::unistd::dup2_stdin(&null)
        .and_then(|()| nix::unistd::dup2_stdout(out))
        .and_then(|()| nix::unistd::dup2_stderr(out));
    if let Err(e) = redirected {
        fail(write, "redirecting stdin/stdout/stderr", e.into());
    }
    Ok(Daemon {
        report: Mutex::new(Some(File::from(write))),
    })
}

/// The launching process: relays the daemon's report and exits.
fn launcher(read: OwnedFd, child: nix::unistd::Pid) -> ! {
    // The first child exits as soon as it has forked the daemon.
    let _ = nix::sys::wait::waitpid(child, None);
    let mut report = String::new();
    let _ = File::from(read).read_to_string(&mut report);
    let (status, text) = report.split_once('\n').unwrap_or((report.as_str(), ""));
    let text = text.trim_end();
    if !text.is_empty() {
        eprintln!("{text}");
    }
    match status {
        "ok" => std::process::exit(0),
        "error" => std::process::exit(1),
        _ => {
            let name = std::env::args_os()
                .next()
                .map(|a| {
                    Path::new(&a)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                })
                .unwrap_or_default();
            eprintln!("{name}: error: the daemon exited before it was ready (see its log file)");
            std::process::exit(1)
        }
    }
}
