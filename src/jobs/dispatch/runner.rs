//! One process per job (`--per-job`), the component-server way: the
//! program runs as `PROGRAM ARGS... JOBARGS...` once per job, in any
//! language.
//!
//! * A job's arguments that are a JSON array of strings are appended to
//!   the command line; any other JSON is written to the process's stdin.
//! * The environment says which job it is: `CLUSTER_JOB_ID`,
//!   `CLUSTER_JOB_ATTEMPT`, `CLUSTER_QUEUE`, `CLUSTER_POOL`, `CLUSTER_NODE`.
//! * Exit 0 is done (the last stdout line, when it is JSON, is the
//!   result); anything else is a failed attempt whose error is the tail of
//!   its stderr.
//! * Like a worker, it runs in its own process group, dies with the
//!   watcher (`PR_SET_PDEATHSIG`) and runs as `--user`, and its lines go to
//!   the log stream tagged `[job ID PID stdout|stderr]`.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Kind, Result};
use crate::ipc::env;
use crate::jobs::Job;
use crate::sys;
use crate::watcher::capture::{capture, Tail};
use crate::watcher::config::Config;
use crate::watcher::output::Source;
use crate::watcher::process::{describe_exit, spawn_registered, unregister};

/// How a job process ended.
pub(crate) struct ProcessDone {
    pub ticket: u64,
    pub status: Option<ExitStatus>,
    pub stdout: Tail,
    pub stderr: Tail,
}

/// What the job's outcome is, from how its process ended.
pub(crate) fn outcome(done: &ProcessDone) -> std::result::Result<Option<Value>, String> {
    let success = done.status.is_some_and(|s| s.success());
    if success {
        let last = done.stdout.last_line.trim();
        return Ok(serde_json::from_str(last).ok());
    }
    let how = describe_exit(done.status);
    let how = how.strip_prefix("was ").unwrap_or(&how);
    let tail = done.stderr.text.trim();
    Err(if tail.is_empty() {
        format!("the job process {how}")
    } else {
        format!("the job process {how}: {tail}")
    })
}

/// Whether the process was killed by `sig`.
pub(crate) fn killed_by(done: &ProcessDone, sig: i32) -> bool {
    done.status.and_then(|s| s.signal()) == Some(sig)
}

/// How long lines may still arrive after the process exited.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

/// Starts the process for `job` (run by `pool` on `node`, as `ticket`);
/// `done` is called once it has exited and its output was read. Returns
/// its pid.
pub(crate) fn spawn(
    config: &Config,
    job: &Job,
    pool: &str,
    node: &str,
    ticket: u64,
    done: impl FnOnce(ProcessDone) + Send + 'static,
) -> Result<u32> {
    let spawn_err = |e: std::io::Error| {
        Error::with_io(
            Kind::Spawn,
            format!(
                "cannot start {} for job {}",
                Path::new(&config.program).display(),
                job.id
            ),
            e,
        )
    };
    let mut cmd = tokio::process::Command::new(&config.program);
    cmd.args(&config.args);
    let argv: Option<Vec<String>> = match &job.args {
        Value::Array(items) => items.iter().map(|v| v.as_str().map(String::from)).collect(),
        _ => None,
    };
    let stdin_json = match &argv {
        Some(extra) => {
            cmd.args(extra);
            None
        }
        None => Some(job.args.to_string()),
    };
    for (k, v) in &config.envs {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    if let Some(dir) = &config.current_dir {
        cmd.current_dir(dir);
    }
    for var in crate::watcher::systemd::ENV_VARS {
        cmd.env_remove(var);
    }
    cmd.env_remove(crate::watcher::upgrade::ENV);
    cmd.env(env::JOB_ID, job.id.to_string())
        .env(env::JOB_ATTEMPT, job.attempt.to_string())
        .env(env::QUEUE, &job.queue)
        .env(env::POOL, pool)
        .env(env::NODE, node)
        .env(env::WATCHER_PID, std::process::id().to_string())
        .stdin(if stdin_json.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    sys::prepare_child_exec(&mut cmd, None, config.credentials, None);
    let (mut child, pid) = spawn_registered(&mut cmd).map_err(spawn_err)?;
    if let (Some(json), Some(mut stdin)) = (stdin_json, child.stdin.take()) {
        tokio::spawn(async move {
            // A process that does not read its stdin is not our problem:
            // the write fails (EPIPE) and is dropped.
            let _ = stdin.write_all(json.as_bytes()).await;
            let _ = stdin.shutdown().await;
        });
    }
    let id = job.id.get();
    let out_tail = Arc::new(Mutex::new(Tail::default()));
    let err_tail = Arc::new(Mutex::new(Tail::default()));
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        let source = Source::Job {
            job: id,
            pid,
            stderr: false,
        };
        readers.push(capture(
            out,
            config.output.clone(),
            source,
            Some(out_tail.clone()),
        ));
    }
    if let Some(err) = child.stderr.take() {
        let source = Source::Job {
            job: id,
            pid,
            stderr: true,
        };
        readers.push(capture(
            err,
            config.output.clone(),
            source,
            Some(err_tail.clone()),
        ));
    }
    tokio::spawn(async move {
        let status = child.wait().await.ok();
        unregister(pid);
        // What it left in its group goes with it.
        if pid > 0 && pid <= i32::MAX as u32 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = tokio::time::timeout(DRAIN_AFTER_EXIT, async {
            for r in readers {
                let _ = r.await;
            }
        })
        .await;
        let take = |t: &Arc<Mutex<Tail>>| {
            t.lock()
                .map(|mut t| std::mem::take(&mut *t))
                .unwrap_or_default()
        };
        done(ProcessDone {
            ticket,
            status,
            stdout: take(&out_tail),
            stderr: take(&err_tail),
        });
    });
    Ok(pid)
}

/// Sends `sig` to the job process group led by `pid`.
pub(crate) fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    if pid > 0 && pid <= i32::MAX as u32 {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}
