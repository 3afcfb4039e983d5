//! Commands with replies, names, statuses and stopping one worker, with
//! real processes: every target kind and every error kind, a target that
//! dies before it answers, names and statuses in `cluster status --json`
//! and `--metrics`, `--revive never` with `cluster stop --slot`.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const START: Duration = Duration::from_secs(20);

fn command(c: &Running, to: &str, name: &str, args: Option<&str>) -> Output {
    let mut a = vec!["command", "--to", to, name];
    a.extend(args);
    c.control(&a)
}

fn reply(c: &Running, to: &str, name: &str, args: Option<&str>) -> Value {
    let out = command(c, to, name, args);
    assert!(
        out.status.success(),
        "command {to} {name}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.stderr()
    );
    serde_json::from_slice(&out.stdout).expect("JSON reply")
}

fn start(extra: &[&str], n: usize) -> Running {
    let mut c = watcher()
        .pid_file()
        .args(extra)
        .start(example("state_worker"), &[]);
    c.wait_workers(n, START);
    wait_ready(&c, n);
    c
}

/// What worker `from` gets when it sends `name` to `to` itself.
fn call_from(c: &Running, from: &str, to: &str, name: &str, args: Value, timeout_ms: u64) -> Value {
    let a = json!({ "to": to, "name": name, "args": args, "timeout_ms": timeout_ms });
    reply(c, from, "call", Some(&a.to_string()))
}

#[test]
fn commands_reach_the_watcher_a_slot_a_name_and_all_workers() {
    let c = start(&["--names", "red,green,blue"], 3);
    // From the CLI (through the watcher's control socket).
    assert_eq!(reply(&c, "watcher", "ping", None), "pong");
    let by_slot = reply(&c, "2", "whoami", None);
    assert_eq!(
        (&by_slot["slot"], &by_slot["name"]),
        (&json!(2), &json!("green"))
    );
    let by_name = reply(&c, "blue", "whoami", None);
    assert_eq!(by_name["slot"], 3);
    let status = reply(&c, "1", "status", None);
    assert_eq!(
        (&status["name"], &status["slot"]),
        (&json!("red"), &json!(1))
    );
    let all = command(&c, "all", "whoami", None);
    assert!(all.status.success());
    let lines: Vec<Value> = String::from_utf8_lossy(&all.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let slots: Vec<&Value> = lines.iter().map(|l| &l["result"]["slot"]).collect();
    assert_eq!(slots, [&json!(1), &json!(2), &json!(3)]);
    assert!(lines
        .iter()
        .all(|l| l["ok"] == true && l["pid"].as_u64().is_some()));
    // Worker to worker and worker to watcher, routed by the watcher.
    let w2w = call_from(&c, "red", "blue", "whoami", Value::Null, 2000);
    assert_eq!(w2w["ok"]["name"], "blue", "{w2w}");
    let w2s = call_from(&c, "1", "2", "ping", Value::Null, 2000);
    assert_eq!(w2s["ok"], "pong", "{w2s}");
    let w2watcher = call_from(&c, "3", "watcher", "status", Value::Null, 2000);
    assert_eq!(
        w2watcher["ok"]["workers"].as_array().map(|w| w.len()),
        Some(3),
        "{w2watcher}"
    );
    let w2all = call_from(&c, "2", "all", "ping", Value::Null, 2000);
    assert!(w2all.get("ok").is_some(), "{w2all}");
}

#[test]
fn each_command_error_has_its_own_kind() {
    let c = start(&["--workers", "3"], 3);
    let kind = |to: &str, name: &str, args: Value, timeout_ms: u64| {
        let r = call_from(&c, "1", to, name, args, timeout_ms);
        (r["error"].as_str().unwrap_or("none").to_string(), r)
    };
    let (k, r) = kind("nobody", "ping", Value::Null, 2000);
    assert_eq!(k, "unknown target", "{r}");
    let (k, r) = kind("7", "ping", Value::Null, 2000);
    assert_eq!(k, "unknown target", "{r}");
    let (k, r) = kind("2", "no-such-command", Value::Null, 2000);
    assert_eq!(k, "unknown command", "{r}");
    let (k, r) = kind("watcher", "no-such-command", Value::Null, 2000);
    assert_eq!(k, "unknown command", "{r}");
    let (k, r) = kind("2", "fail", Value::Null, 2000);
    assert_eq!(k, "handler error", "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("deliberate failure"),
        "{r}"
    );
    let (k, r) = kind("2", "panic", Value::Null, 2000);
    assert_eq!(k, "handler error", "{r}");
    assert!(
        r["message"].as_str().unwrap().contains("deliberate panic"),
        "{r}"
    );
    let (k, r) = kind("2", "sleep", json!("not a number"), 2000);
    assert_eq!(k, "handler error", "bad arguments: {r}");
    let (k, r) = kind("2", "sleep", json!(3000), 300);
    assert_eq!(k, "timeout", "{r}");
    assert!(
        r["ms"].as_u64().unwrap() < 2000,
        "the timeout came on time: {r}"
    );
    // A target that dies before it answers: "target died" at once, not
    // after the 10 s timeout.
    let (k, r) = kind("3", "die", Value::Null, 10_000);
    assert_eq!(k, "target died", "{r}");
    assert!(r["ms"].as_u64().unwrap() < 2000, "promptly: {r}");
    // From the CLI: one line on stderr and exit 1.
    let out = command(&c, "2", "fail", None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("deliberate failure"));
    let out = command(&c, "9", "ping", None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no worker runs in slot 9"));
    // Slot 3 was replaced and answers again.
    wait_ready(&c, 3);
    assert_eq!(reply(&c, "3", "ping", None), "pong");
}

#[test]
fn names_statuses_and_traffic_show_in_status_json_and_metrics() {
    let port = free_port();
    let c = start(
        &[
            "--workers",
            "2",
            "--name",
            "web",
            "--metrics",
            &format!("127.0.0.1:{port}"),
        ],
        2,
    );
    assert_eq!(
        reply(&c, "web-1", "set_status", Some("\"processing\"")),
        Value::Null
    );
    assert_eq!(
        reply(&c, "2", "set_status", Some("\"warming the cache\"")),
        Value::Null
    );
    let status = wait_for(START, || {
        status_json(&c).filter(|v| workers_of(v).iter().all(|w| !w["status"].is_null()))
    })
    .expect("statuses shown");
    let w = workers_of(&status);
    assert_eq!(
        (&w[0]["name"], &w[0]["status"]),
        (&json!("web-1"), &json!("processing"))
    );
    assert_eq!(
        (&w[1]["name"], &w[1]["status"]),
        (&json!("web-2"), &json!("warming the cache"))
    );
    assert!(
        w[0]["stats"]["commands_received"].as_u64().unwrap() >= 1,
        "{status}"
    );
    assert!(
        status["storage"]["max_bytes"].as_u64().unwrap() == 64 << 20,
        "{status}"
    );
    let table = c.control(&["status", "--stats"]);
    let table = String::from_utf8_lossy(&table.stdout);
    for needle in [
        "NAME",
        "STATUS",
        "CMD-IN",
        "web-2",
        "warming the cache",
        "storage:",
    ] {
        assert!(table.contains(needle), "{needle} missing:\n{table}");
    }
    let metrics = http_get_path(port, "/metrics").unwrap().body;
    assert!(
        metrics.contains("name=\"web-1\",status=\"processing\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("cluster_storage_keys "), "{metrics}");
    // A status that is not a short line is refused by the API.
    let out = command(
        &c,
        "1",
        "set_status",
        Some(&format!("\"{}\"", "x".repeat(65))),
    );
    assert!(!out.status.success());
}

#[test]
fn revive_never_and_stopping_one_worker_busy_or_idle() {
    let c = start(&["--workers", "2", "--revive", "never"], 2);
    let before = wait_ready(&c, 2);
    let pid = |slot: usize| before["workers"][slot]["pid"].as_u64().unwrap() as u32;
    let (busy, idle) = (pid(0), pid(1));
    assert_eq!(
        reply(&c, "1", "set_status", Some("\"processing\"")),
        Value::Null
    );
    assert_eq!(reply(&c, "2", "set_status", Some("\"idle\"")), Value::Null);
    // Busy: told to stop, its status is `stopping`, killed after 1 s.
    let t = Instant::now();
    let stop = std::thread::spawn({
        let pid_file = c.pid_file().to_path_buf();
        move || control(&pid_file, &["stop", "--slot", "1", "--timeout", "1"])
    });
    let stopping = wait_for(Duration::from_secs(3), || {
        status_json(&c).filter(|v| {
            workers_of(v)
                .iter()
                .any(|w| w["slot"] == 1 && w["status"] == "stopping" && w["state"] == "stopping")
        })
    });
    assert!(
        stopping.is_some(),
        "slot 1 was never shown stopping:\n{}",
        c.stderr()
    );
    let out = stop.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "killed only after the timeout: {took:?}"
    );
    assert!(!alive(busy));
    // The watcher logs the exit once it has reaped it, which can come
    // just after the CLI saw the process gone.
    assert!(
        wait_for(START, || c
            .stderr()
            .contains("not replaced (--revive never)")
            .then_some(()))
        .is_some(),
        "{}",
        c.stderr()
    );
    // Idle: stopped at once.
    let t = Instant::now();
    let out = c.control(&["stop", "--slot", "2", "--timeout", "30"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("idle, stopped at once"));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(!alive(idle));
    std::thread::sleep(Duration::from_millis(300));
    let after = status_json(&c).expect("the watcher keeps running");
    let rows = workers_of(&after);
    assert!(
        rows.iter()
            .all(|w| w["pid"] == 0 && w["state"] == "stopped"),
        "nothing replaced, both slots shown stopped: {after}"
    );
    assert_eq!(rows.len(), 2, "{after}");
    assert_eq!(after["workers_wanted"], 2);
    let out = c.control(&["stop", "--slot", "1"]);
    assert_eq!(out.status.code(), Some(1), "no worker left in slot 1");
}

#[test]
fn stopping_one_worker_with_revive_always_replaces_it() {
    let mut c = start(&["--workers", "2", "--name", "job"], 2);
    let before = wait_ready(&c, 2);
    let old = before["workers"][0]["pid"].as_u64().unwrap() as u32;
    let out = c.control(&["stop", "--name", "job-1", "--timeout", "5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replaced = wait_for(START, || {
        status_json(&c).filter(|v| {
            let w = workers_of(v);
            w.len() == 2 && w.iter().all(|w| w["state"] == "ready") && w[0]["pid"] != old
        })
    });
    assert!(
        replaced.is_some(),
        "slot 1 was not replaced:\n{}",
        c.stderr()
    );
    assert!(!alive(old));
    c.wait_workers(2, START);
    // Said once, as news: an asked-for stop is not a warning. (The log
    // writer is a thread of its own: wait for the line.)
    wait_for(START, || c.stderr().contains("replacing it").then_some(()));
    let err = c.stderr();
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("replacing it")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("INFO") && lines[0].contains("(--revive always)"),
        "{err}"
    );
}
