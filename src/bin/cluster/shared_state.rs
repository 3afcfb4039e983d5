//! `cluster storage ...`, `cluster command ...` and `cluster stop --slot`:
//! the shared storage, commands and single workers of a running watcher,
//! through its control socket.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use cluster::control::Request;

use crate::cli::{StorageOp, Target};
use crate::client::{ask, error, running};

fn json_arg(what: &str, text: &str) -> Result<serde_json::Value, ExitCode> {
    serde_json::from_str(text).map_err(|e| {
        error(format!(
            "{what} is not JSON ({e}); quote a string as '\"text\"'"
        ))
    })
}

pub async fn storage(op: StorageOp) -> ExitCode {
    match op {
        StorageOp::Get { target, path } => {
            match ask(&target, Request::StorageGet { path: path.clone() }).await {
                Ok(r) => match r.value {
                    Some(v) if r.found == Some(true) => {
                        println!("{v}");
                        ExitCode::SUCCESS
                    }
                    _ => error(format!("nothing is stored at {path:?}")),
                },
                Err(code) => code,
            }
        }
        StorageOp::Set {
            target,
            path,
            value,
            ttl,
        } => {
            let value = match json_arg("the value", &value) {
                Ok(v) => v,
                Err(code) => return code,
            };
            let ttl_ms = ttl.map(|d| d.as_millis() as u64);
            match ask(
                &target,
                Request::StorageSet {
                    path,
                    value,
                    ttl_ms,
                },
            )
            .await
            {
                Ok(r) => {
                    println!("version {}", r.version.unwrap_or(0));
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        StorageOp::Delete { target, path } => {
            match ask(&target, Request::StorageDelete { path: path.clone() }).await {
                Ok(r) if r.found == Some(true) => {
                    println!("deleted");
                    ExitCode::SUCCESS
                }
                Ok(_) => error(format!("nothing is stored at {path:?}")),
                Err(code) => code,
            }
        }
        StorageOp::Dump { target } => match ask(&target, Request::StorageDump).await {
            Ok(r) => {
                let v = r.value.unwrap_or_else(|| serde_json::json!({}));
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
    }
}

pub async fn command(
    target: &Target,
    to: String,
    name: String,
    args: Option<String>,
    timeout: Duration,
) -> ExitCode {
    let args = match args.as_deref().map(|a| json_arg("the argument", a)) {
        None => serde_json::Value::Null,
        Some(Ok(v)) => v,
        Some(Err(code)) => return code,
    };
    let all = to == "all";
    let request = Request::Command {
        to,
        name,
        args,
        timeout_ms: Some(timeout.as_millis() as u64),
    };
    let r = match ask(target, request).await {
        Ok(r) => r,
        Err(code) => return code,
    };
    if all {
        let mut failed = false;
        for reply in &r.replies {
            failed |= !reply.ok;
            println!("{}", serde_json::to_string(reply).unwrap_or_default());
        }
        return if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    match r.replies.first() {
        Some(reply) if reply.ok => {
            let result = reply.result.clone().unwrap_or(serde_json::Value::Null);
            println!("{result}");
            ExitCode::SUCCESS
        }
        Some(reply) => error(
            reply
                .error
                .clone()
                .unwrap_or_else(|| "the command failed".into()),
        ),
        None => error("no process answered"),
    }
}

pub async fn stop_worker(
    target: &Target,
    slot: Option<u32>,
    name: Option<String>,
    timeout: Option<Duration>,
) -> ExitCode {
    let request = Request::StopWorker {
        slot,
        name,
        timeout_ms: timeout.map(|d| d.as_millis() as u64),
    };
    let r = match ask(target, request).await {
        Ok(r) => r,
        Err(code) => return code,
    };
    let stopped = r.stopped.unwrap_or_default();
    let n = |k: &str| stopped.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let (slot, pid) = (n("slot"), n("pid"));
    let at_once = stopped.get("at_once").and_then(|v| v.as_bool()) == Some(true);
    // Wait until it is gone: it was killed by then at the latest.
    let patience = timeout.unwrap_or(Duration::from_secs(60)) + Duration::from_secs(5);
    let deadline = Instant::now() + patience;
    let p = nix::unistd::Pid::from_raw(pid as i32);
    while pid != 0 && running(p) {
        if Instant::now() >= deadline {
            return error(format!(
                "worker {slot} (pid {pid}) is still running after {patience:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let how = if at_once {
        "idle, stopped at once"
    } else {
        "stopped"
    };
    println!("worker {slot} (pid {pid}) {how}");
    ExitCode::SUCCESS
}
