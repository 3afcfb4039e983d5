//! `--notify`: each worker's own `NOTIFY_SOCKET`, with real programs that
//! do not use the library (`tests/workers/notify_worker.py`, the Node
//! example): `READY=1` gates rolling restarts, `WATCHDOG=1` answers the
//! heartbeat, `STATUS=` shows in `cluster status`, messages from other
//! processes and garbage are ignored, and `--stop-signal` is what they get.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

use common::*;

const START: Duration = Duration::from_secs(15);

fn python() -> Option<&'static str> {
    installed("python3").then_some("python3")
}

fn notify_worker() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/workers/notify_worker.py")
        .to_string_lossy()
        .into_owned()
}

/// The workers of `cluster status --json`: (pid, state, status).
fn status(c: &Running) -> Vec<(u32, String, Option<String>)> {
    let out = c.control(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    json["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .map(|w| {
                    (
                        w["pid"].as_u64().unwrap_or(0) as u32,
                        w["state"].as_str().unwrap_or("").to_string(),
                        w["status"].as_str().map(str::to_string),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The `NOTIFY_SOCKET` worker `pid` was started with.
fn notify_socket(pid: u32) -> PathBuf {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    environ
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"NOTIFY_SOCKET="))
        .map(|v| PathBuf::from(String::from_utf8_lossy(v).into_owned()))
        .expect("NOTIFY_SOCKET set")
}

/// `cluster` with `--notify` and a pid file, running `notify_worker.py MODE`.
fn start(workers: usize, mode: &str, options: &[&str]) -> (Running, PathBuf, u16) {
    let port = free_port();
    let w = watcher()
        .workers(workers)
        .pid_file()
        .args(["--notify", "--listen", &format!("127.0.0.1:{port}")])
        .args(options);
    let mark = w.dir().join("mark");
    let c = w
        .env("TEST_MARK", &mark)
        .start("python3", &[&notify_worker(), mode]);
    (c, mark, port)
}

fn wait_state(c: &Running, pid: u32, state: &str) {
    let reached = wait_for(START, || {
        status(c)
            .iter()
            .any(|w| w.0 == pid && w.1 == state)
            .then_some(())
    });
    assert!(
        reached.is_some(),
        "worker {pid} not {state}: {:?}\n{}",
        status(c),
        c.stderr()
    );
}

#[test]
fn a_replacement_that_never_sends_ready_is_killed_after_the_ready_timeout_while_the_old_one_serves()
{
    if python().is_none() {
        return;
    }
    let (mut c, mark, port) = start(1, "ready-unless-mark", &["--ready-timeout", "1"]);
    let old = c.wait_workers(1, START)[0];
    wait_state(&c, old, "ready");
    std::fs::write(&mark, "").unwrap(); // the replacement never says READY=1
    let out = c.control(&["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("was not ready within 1s"), "{stderr}");
    assert_eq!(c.wait_workers(1, START), [old]);
    for _ in 0..5 {
        let r = http_get(port).unwrap();
        assert_eq!(r.body, old.to_string(), "the old worker serves");
    }
}

#[test]
fn a_worker_that_stops_sending_watchdog_is_replaced() {
    if python().is_none() {
        return;
    }
    let (mut c, mark, _) = start(1, "watchdog-until-mark", &["--heartbeat-timeout", "1"]);
    let first = c.wait_workers(1, START)[0];
    wait_state(&c, first, "ready");
    // Pinging, it lives past several timeouts.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(c.workers(), [first], "{}", c.stderr());
    std::fs::write(&mark, "").unwrap();
    let replaced = wait_for(Duration::from_secs(10), || {
        let w = c.workers();
        (w.len() == 1 && w[0] != first).then_some(())
    });
    assert!(replaced.is_some(), "{}", c.stderr());
    assert!(
        c.stderr().contains("did not send WATCHDOG=1 for 1s"),
        "{}",
        c.stderr()
    );
}

#[test]
fn a_notify_message_from_an_unrelated_process_is_ignored() {
    if python().is_none() {
        return;
    }
    let (mut c, mark, _) = start(1, "child-after-mark", &[]);
    let pid = c.wait_workers(1, START)[0];
    wait_state(&c, pid, "starting");
    let sock = UnixDatagram::unbound().unwrap();
    sock.send_to(b"READY=1\nSTATUS=forged", notify_socket(pid))
        .unwrap();
    let warned = wait_for(START, || {
        c.stderr()
            .contains(&format!(
                "pid {} is neither the worker nor in its process group",
                std::process::id()
            ))
            .then_some(())
    });
    assert!(warned.is_some(), "{}", c.stderr());
    assert_eq!(status(&c), [(pid, "starting".to_string(), None)]);
    // A process of the worker's own group is listened to.
    std::fs::write(&mark, "").unwrap();
    wait_state(&c, pid, "ready");
}

#[test]
fn garbage_on_the_notify_socket_is_ignored() {
    if python().is_none() {
        return;
    }
    let (mut c, mark, port) = start(1, "garbage", &[]);
    let pid = c.wait_workers(1, START)[0];
    wait_for(START, || mark.exists().then_some(())).expect("garbage sent");
    std::thread::sleep(Duration::from_millis(300));
    let now = status(&c);
    assert_eq!(now.len(), 1, "{now:?}\n{}", c.stderr());
    assert_eq!(now[0].1, "starting", "no garbage made it ready: {now:?}");
    wait_state(&c, pid, "ready");
    assert_eq!(
        status(&c)[0].2.as_deref(),
        Some("garbage survived"),
        "{}",
        c.stderr()
    );
    assert_eq!(c.workers(), [pid], "the worker was not replaced");
    assert_eq!(http_get(port).unwrap().status, 200);
    assert!(
        c.stderr().contains("longer than 4096 bytes"),
        "{}",
        c.stderr()
    );
    let table = String::from_utf8_lossy(&c.control(&["status"]).stdout).into_owned();
    assert!(
        table.contains("STATUS") && table.contains("garbage survived"),
        "{table}"
    );
}

#[test]
fn workers_get_the_stop_signal() {
    if python().is_none() {
        return;
    }
    let (mut c, _, _) = start(1, "signal", &["--stop-signal", "SIGINT"]);
    let pid = c.wait_workers(1, START)[0];
    wait_state(&c, pid, "ready");
    c.signal(nix::sys::signal::Signal::SIGTERM);
    let status = c.wait_exit(START).expect("the watcher stops");
    assert!(status.success(), "{}", c.stderr());
    assert!(c.stderr().contains("stopped by SIGINT"), "{}", c.stderr());
}

#[test]
fn node_says_ready_through_systemd_notify() {
    if !installed("node") || !installed("systemd-notify") {
        return;
    }
    let port = free_port();
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/node/server.js");
    let c = watcher()
        .workers(1)
        .pid_file()
        .args(["--notify", "--listen", &format!("127.0.0.1:{port}")])
        .start("node", &[example.to_str().unwrap()]);
    c.wait_serving(port, START);
    // With --notify nothing is assumed: ready means READY=1 arrived.
    let ready = wait_for(START, || {
        status(&c).iter().any(|w| w.1 == "ready").then_some(())
    });
    assert!(ready.is_some(), "{:?}\n{}", status(&c), c.stderr());
}
