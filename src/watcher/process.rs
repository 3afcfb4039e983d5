//! Spawning one worker process and the tasks that serve its channel.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::supervise::Event;
use super::Config;
use crate::error::{Error, Kind, Result};
use crate::ipc::message::ToWorker;
use crate::ipc::{self, Channel};
use crate::sys;
use crate::worker::env;

/// A message to a worker, with descriptors to attach.
pub(crate) struct Outbound {
    pub msg: ToWorker,
    pub fds: Vec<OwnedFd>,
}

/// The watcher's handle on a spawned worker process.
pub(crate) struct Spawned {
    pub pid: u32,
    pub outbound: mpsc::UnboundedSender<Outbound>,
}

/// Checks that `program` names an executable file, searching `PATH` when it
/// has no slash, as exec would.
pub(crate) fn check_program(program: &OsStr, cwd: Option<&Path>) -> Result<PathBuf> {
    let shown = Path::new(program).display().to_string();
    let candidates: Vec<PathBuf> = if program.as_encoded_bytes().contains(&b'/') {
        let p = PathBuf::from(program);
        vec![match cwd {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p,
        }]
    } else {
        std::env::var_os("PATH")
            .map(|path| {
                std::env::split_paths(&path)
                    .map(|d| d.join(program))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut found_not_executable = None;
    for candidate in candidates {
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => return Ok(candidate),
            Ok(m) if m.is_dir() => found_not_executable = Some(format!("{shown} is a directory")),
            Ok(_) => found_not_executable = Some(format!("{shown} is not executable")),
            Err(_) => {}
        }
    }
    Err(Error::new(
        Kind::Spawn,
        found_not_executable.unwrap_or_else(|| format!("program not found: {shown}")),
    ))
}

/// Forks and execs one worker for `slot` with `context_id`, and starts the
/// tasks that read its channel, write to it, and wait for its exit.
pub(crate) fn spawn(
    config: &Config,
    slot: u32,
    context_id: u64,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<Spawned> {
    let spawn_err = |e: std::io::Error| {
        Error::with_io(
            Kind::Spawn,
            format!("cannot start {}", Path::new(&config.program).display()),
            e,
        )
    };
    let (ours, theirs) = ipc::pair().map_err(spawn_err)?;
    let mut cmd = tokio::process::Command::new(&config.program);
    cmd.args(&config.args);
    for (k, v) in &config.envs {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    if let Some(dir) = &config.current_dir {
        cmd.current_dir(dir);
    }
    cmd.env(env::IPC_FD, theirs.as_raw_fd().to_string())
        .env(env::WATCHER_PID, std::process::id().to_string())
        .env(env::CONTEXT_ID, context_id.to_string())
        .env(env::SLOT, slot.to_string())
        .env(
            env::SHUTDOWN_TIMEOUT_MS,
            config.shutdown_timeout.as_millis().to_string(),
        )
        .stdin(Stdio::null())
        .kill_on_drop(false);
    sys::prepare_worker_exec(&mut cmd, theirs.as_raw_fd());
    let mut child = cmd.spawn().map_err(spawn_err)?;
    drop(theirs);
    let pid = child.id().unwrap_or(0);
    let channel = match Channel::new(ours) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            let _ = child.start_kill();
            return Err(spawn_err(e));
        }
    };

    // Exit watcher.
    let tx = events.clone();
    tokio::spawn(async move {
        let status = child.wait().await;
        let _ = tx.send(Event::Exited {
            context_id,
            status: status.ok(),
        });
    });

    // Reader: every message or failure becomes an event.
    let tx = events.clone();
    let reader = channel.clone();
    tokio::spawn(async move {
        let mut buf = Vec::new();
        loop {
            match reader.recv(&mut buf).await {
                Ok((msg, fds)) => {
                    if tx
                        .send(Event::Message {
                            context_id,
                            msg,
                            fds,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
                Err(error) => {
                    let _ = tx.send(Event::ChannelClosed { context_id, error });
                    return;
                }
            }
        }
    });

    // Writer: ends when the supervisor drops the sender. A write error means
    // the worker is gone or going (EPIPE); its exit event follows, so the
    // writer just stops.
    let (outbound, mut rx) = mpsc::unbounded_channel::<Outbound>();
    tokio::spawn(async move {
        while let Some(Outbound { msg, fds }) = rx.recv().await {
            let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
            if let Err(e) = channel.send(&msg, &borrowed).await {
                tracing::debug!("worker {slot} (context {context_id}): {e}");
                return;
            }
        }
    });

    Ok(Spawned { pid, outbound })
}

/// Describes how a worker ended, for logs.
pub(crate) fn describe_exit(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        None => "ended (status unknown)".to_string(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => {
                let name = nix::sys::signal::Signal::try_from(sig)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| format!("signal {sig}"));
                format!("was killed by {name}")
            }
            _ => format!("ended ({s})"),
        },
    }
}
