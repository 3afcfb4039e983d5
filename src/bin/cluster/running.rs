//! The subcommands that talk to a running watcher through its control
//! socket: status, reload, stop, scale.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use cluster::control::{request, Request, Response};

use crate::cli::Control;
use crate::client::{ask, denied, error, refused, running, DENIED};

/// Exit status of `status` when no watcher runs (LSB: "program is not running").
const NOT_RUNNING: u8 = 3;

/// Exit status of `status` when fewer workers are ready than wanted, or a
/// slot gave up after `--max-restarts`.
const DEGRADED: u8 = 5;
pub fn run(cmd: Control) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cluster: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(dispatch(cmd))
}

async fn dispatch(cmd: Control) -> ExitCode {
    match cmd {
        Control::Status {
            target,
            json,
            stats,
            quiet,
        } => {
            let socket = match target.socket() {
                Ok(s) => s,
                Err(e) => return error(e),
            };
            match request(&socket, &Request::Status { quick: quiet }).await {
                Ok(r) if r.ok => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                    } else if !quiet {
                        print_table(&r, stats);
                    }
                    if r.degraded {
                        ExitCode::from(DEGRADED)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Ok(r) => refused(r),
                Err(e) => {
                    if !quiet {
                        eprintln!("cluster: {e}");
                    }
                    ExitCode::from(if denied(&e) { DENIED } else { NOT_RUNNING })
                }
            }
        }
        Control::ReopenLogs { target } => match ask(&target, Request::ReopenLogs).await {
            Ok(_) => {
                println!("reopened");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Control::Reload { target } => match ask(&target, Request::Reload).await {
            Ok(_) => {
                println!("reloaded");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Control::Scale { target, workers } => {
            match ask(&target, Request::Scale { workers }).await {
                Ok(r) => {
                    println!("{} worker(s)", r.workers_wanted.unwrap_or(workers));
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        Control::Stop {
            target,
            slot,
            name,
            timeout,
        } if slot.is_some() || name.is_some() => {
            crate::shared_state::stop_worker(&target, slot, name, timeout).await
        }
        Control::Storage { op } => crate::shared_state::storage(op).await,
        Control::Command {
            target,
            to,
            timeout,
            name,
            args,
        } => crate::shared_state::command(&target, to, name, args, timeout).await,
        Control::Stop {
            target, timeout, ..
        } => {
            let timeout = timeout.unwrap_or(Duration::from_secs(60));
            let response = match ask(&target, Request::Stop).await {
                Ok(r) => r,
                Err(code) => return code,
            };
            // Wait until the watcher process is gone.
            let pid = nix::unistd::Pid::from_raw(response.pid as i32);
            let deadline = Instant::now() + timeout;
            while running(pid) {
                if Instant::now() >= deadline {
                    return error(format!(
                        "the watcher (pid {}) is still running after {timeout:?}",
                        response.pid
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            println!("stopped");
            ExitCode::SUCCESS
        }
    }
}

fn print_table(r: &Response, stats: bool) {
    let running = r.workers.iter().filter(|w| w.pid != 0).count();
    let health = if r.degraded { "DEGRADED" } else { "ok" };
    println!(
        "watcher pid {}: {running} worker(s) running, {} ready, {} wanted: {health}",
        r.pid,
        r.workers_ready.unwrap_or(0),
        r.workers_wanted.unwrap_or(0)
    );
    if let Some(program) = &r.program {
        let listening = if r.addresses.is_empty() {
            String::new()
        } else {
            format!(", listening on {}", r.addresses.join(", "))
        };
        println!("program {program}{listening}");
    }
    let extra = if stats {
        format!(
            "  {:>7} {:>7} {:>7} {:>7}",
            "CMD-OUT", "CMD-IN", "MSG-OUT", "MSG-IN"
        )
    } else {
        String::new()
    };
    println!(
        "{:>4}  {:<12} {:>8}  {:>8}  {:<9} {:<12} {:>10}  {:>8}  {:>8}  {:>6}{extra}  LAST EXIT",
        "SLOT", "NAME", "CONTEXT", "PID", "STATE", "STATUS", "UPTIME", "RESTARTS", "RSS", "CPU%"
    );
    for w in &r.workers {
        let extra = if stats {
            let t = &w.stats;
            format!(
                "  {:>7} {:>7} {:>7} {:>7}",
                t.commands_sent, t.commands_received, t.messages_sent, t.messages_received
            )
        } else {
            String::new()
        };
        let dash = |n: u64| {
            if n == 0 {
                "-".to_string()
            } else {
                n.to_string()
            }
        };
        let uptime = match (w.pid, w.next_start_secs) {
            (0, Some(next)) => format!("in {}", human(next)),
            (0, None) => "-".into(),
            _ => human(w.uptime_secs),
        };
        let state = if w.reloading && w.state == "ready" {
            "reloading"
        } else {
            w.state.as_str()
        };
        println!(
            "{:>4}  {:<12} {:>8}  {:>8}  {:<9} {:<12} {:>10}  {:>8}  {:>8}  {:>6}{extra}  {}",
            w.slot,
            w.name.as_deref().unwrap_or("-"),
            dash(w.context_id),
            dash(w.pid.into()),
            state,
            w.status.as_deref().unwrap_or("-"),
            uptime,
            w.restarts,
            w.rss_bytes.map(bytes).unwrap_or_else(|| "-".into()),
            w.cpu_percent
                .map(|p| format!("{p:.1}"))
                .unwrap_or_else(|| "-".into()),
            w.last_exit.as_deref().unwrap_or("-")
        );
    }
    if let (true, Some(s)) = (stats, &r.storage) {
        println!();
        println!(
            "storage: {} key(s), {} of {} ({:.1}%), {:.0} operations/s, {} since start",
            s.keys,
            bytes(s.bytes as u64),
            bytes(s.max_bytes as u64),
            100.0 * s.bytes as f64 / s.max_bytes.max(1) as f64,
            s.operations_per_sec,
            s.operations
        );
    }
    if let Some(jobs) = &r.jobs {
        print_jobs(jobs);
    }
}

/// The job section of `cluster status`.
fn print_jobs(j: &serde_json::Value) {
    let n = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    println!();
    println!(
        "jobs from {}: {} claimed, {} done, {} failed, {} retried, {} cancelled, {} lost since start",
        j.get("store").and_then(|s| s.as_str()).unwrap_or("?"),
        n(j, "claimed"),
        n(j, "done"),
        n(j, "failed"),
        n(j, "retried"),
        n(j, "cancelled"),
        n(j, "lost")
    );
    if let Some(c) = j.get("store_counts") {
        println!(
            "store: {} queued, {} running, {} done, {} failed, {} cancelled",
            n(c, "queued"),
            n(c, "running"),
            n(c, "done"),
            n(c, "failed"),
            n(c, "cancelled")
        );
    }
    println!(
        "{:<16} {:>5} {:>7} {:>7} {:>5}  QUEUES",
        "POOL", "SLOTS", "WORKERS", "RUNNING", "FREE"
    );
    for p in j
        .get("pools")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
    {
        let queues: Vec<&str> = p
            .get("queues")
            .and_then(|q| q.as_array())
            .into_iter()
            .flatten()
            .filter_map(|q| q.as_str())
            .collect();
        println!(
            "{:<16} {:>5} {:>7} {:>7} {:>5}  {}",
            p.get("name").and_then(|x| x.as_str()).unwrap_or("?"),
            n(p, "slots"),
            n(p, "workers"),
            n(p, "running"),
            n(p, "capacity"),
            queues.join(", ")
        );
    }
}

/// `12.3M`-style sizes (binary units).
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

fn human(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=59 => format!("{secs:.1}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}
