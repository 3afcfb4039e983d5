//! Shared storage with real processes: no lost update under load (also
//! while a worker is killed), values that survive crashes, rolling
//! restarts and watcher restarts, watches in order, compare-and-swap
//! races, expiry, and a flooding writer that stays inside the byte limit
//! without stalling the others.

mod common;

use std::collections::HashSet;
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

const START: Duration = Duration::from_secs(20);

/// `cluster command --to TO NAME [ARGS]`.
fn command(c: &Running, to: &str, name: &str, args: Option<&str>) -> Output {
    let mut a = vec!["command", "--to", to, "--timeout", "30", name];
    a.extend(args);
    c.control(&a)
}

/// The reply of a command that must succeed, as JSON.
fn reply(c: &Running, to: &str, name: &str, args: Option<&str>) -> Value {
    let out = command(c, to, name, args);
    assert!(
        out.status.success(),
        "command {to} {name} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.stderr()
    );
    serde_json::from_slice(&out.stdout).expect("JSON reply")
}

/// `cluster storage OP --pid-file F ARGS...`.
fn storage(c: &Running, op: &str, args: &[&str]) -> Output {
    let pid_file = c.pid_file().to_str().unwrap().to_string();
    let mut a = vec!["storage", op, "--pid-file", &pid_file];
    a.extend(args);
    cli(a)
}

fn stored(c: &Running, path: &str) -> Option<Value> {
    let out = storage(c, "get", &[path]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("JSON value"))
}

/// `GET /hit` until `total` succeeded, from `clients` threads, each on a
/// new connection; a failed request is retried. Calls `midway` once half
/// are done. Returns the counts the successes answered and the failures.
fn hits(port: u16, clients: usize, total: u64, midway: impl FnOnce() + Send) -> (Vec<u64>, u64) {
    let left = Arc::new(AtomicU64::new(total));
    let done = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let counts = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|scope| {
        for _ in 0..clients {
            let (left, done, failures, counts) =
                (left.clone(), done.clone(), failures.clone(), counts.clone());
            scope.spawn(move || {
                while left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    loop {
                        assert!(Instant::now() < deadline, "a /hit never succeeded");
                        match http_get_path(port, "/hit") {
                            Ok(r) if r.status == 200 => {
                                let n: u64 = r.body.trim().parse().expect("a count");
                                counts.lock().unwrap().push(n);
                                done.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                            _ => {
                                failures.fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(Duration::from_millis(5));
                            }
                        }
                    }
                }
            });
        }
        let done = done.clone();
        scope.spawn(move || {
            wait_for(Duration::from_secs(60), || {
                (done.load(Ordering::SeqCst) >= total / 2).then_some(())
            });
            midway();
        });
    });
    let counts = std::mem::take(&mut *counts.lock().unwrap());
    (counts, failures.load(Ordering::SeqCst))
}

fn serve_shared_state(workers: usize) -> (Running, u16) {
    let port = free_port();
    let mut c = watcher()
        .workers(workers)
        .pid_file()
        .start(example("shared_state"), &[&format!("127.0.0.1:{port}")]);
    c.wait_workers(workers, START);
    wait_ready(&c, workers);
    c.wait_serving(port, START);
    (c, port)
}

#[test]
fn two_thousand_hits_over_four_workers_count_exactly_two_thousand() {
    let (c, port) = serve_shared_state(4);
    let (mut counts, failures) = hits(port, 16, 2000, || {});
    assert_eq!(failures, 0, "{}", c.stderr());
    counts.sort_unstable();
    assert_eq!(
        counts,
        (1..=2000).collect::<Vec<u64>>(),
        "lost or repeated updates"
    );
    assert_eq!(stored(&c, "hits"), Some(Value::from(2000)));
    let r = http_get_path(port, "/hits").unwrap();
    assert_eq!(r.body.trim(), "2000");
}

#[test]
fn hits_lose_nothing_while_a_worker_is_killed_and_survive_a_rolling_restart() {
    let (c, port) = serve_shared_state(4);
    let victim = wait_ready(&c, 4)["workers"][1]["pid"].as_u64().unwrap() as u32;
    let (counts, failures) = hits(port, 16, 2000, || signal(victim, Signal::SIGKILL));
    assert_eq!(counts.len(), 2000);
    let distinct: HashSet<u64> = counts.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        2000,
        "two requests saw the same count: an update was lost"
    );
    let total = stored(&c, "hits").and_then(|v| v.as_u64()).expect("hits");
    // Every increment the watcher applied is counted: the 2,000 answered
    // ones, plus those of requests the kill cut off after the increment
    // and before the answer (each one a failure the client saw).
    assert!(
        total >= 2000 && total - 2000 <= failures,
        "hits {total}, 2000 answered, {failures} failed"
    );
    assert!(counts.iter().all(|&n| n >= 1 && n <= total));
    let after = wait_ready(&c, 4);
    assert!(after["workers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|w| w["pid"] != victim));
    let out = c.control(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = http_get_path(port, "/hits").unwrap();
    assert_eq!(
        r.body.trim(),
        total.to_string(),
        "the count survives the restart"
    );
}

fn state_workers(n: usize, extra: &[&str]) -> Running {
    let mut c = watcher()
        .workers(n)
        .pid_file()
        .args(extra)
        .start(example("state_worker"), &[]);
    c.wait_workers(n, START);
    wait_ready(&c, n);
    c
}

#[test]
fn a_watch_sees_every_change_in_order_and_ttl_expiry() {
    let c = state_workers(3, &[]);
    assert_eq!(
        reply(&c, "1", "watch_start", Some("\"w\"")),
        Value::Bool(true)
    );
    std::thread::scope(|scope| {
        for slot in ["2", "3"] {
            let c = &c;
            scope.spawn(move || reply(c, slot, "increments", Some(r#"{"key":"w.n","n":300}"#)));
        }
    });
    assert!(storage(&c, "delete", &["w.n"]).status.success());
    let out = storage(&c, "set", &["--ttl", "0.3", "w.t", "\"soon gone\""]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stored(&c, "w.t"), Some(Value::from("soon gone")));
    let gone = wait_for(Duration::from_secs(5), || {
        stored(&c, "w.t").is_none().then_some(())
    });
    assert!(gone.is_some(), "w.t did not expire");
    let seen = wait_for(Duration::from_secs(5), || {
        let v = reply(&c, "1", "watch_take", None);
        let v = v.as_array().cloned().unwrap_or_default();
        (v.len() >= 603).then_some(v)
    });
    let seen = seen.expect("the watch saw 603 changes");
    let mut last = 0;
    for (i, change) in seen.iter().enumerate() {
        let revision = change[0].as_u64().unwrap();
        assert!(revision > last, "revisions go up: {change} after {last}");
        last = revision;
        if i < 600 {
            assert_eq!(change[1], "Set", "{change}");
            assert_eq!(change[2], "w.n");
            assert_eq!(
                change[3],
                Value::from(i as u64 + 1),
                "in order, none missing"
            );
        }
    }
    assert_eq!(
        (&seen[600][1], &seen[600][2]),
        (&Value::from("Deleted"), &Value::from("w.n"))
    );
    assert_eq!(
        (&seen[601][1], &seen[601][3]),
        (&Value::from("Set"), &Value::from("soon gone"))
    );
    assert_eq!(
        (&seen[602][1], &seen[602][2]),
        (&Value::from("Expired"), &Value::from("w.t"))
    );
    assert_eq!(seen.len(), 603);
}

#[test]
fn compare_and_swap_races_between_workers_have_exactly_one_winner() {
    let c = state_workers(4, &[]);
    for round in 0..10 {
        let key = format!("race.r{round}");
        let out = command(&c, "all", "cas", Some(&format!("\"{key}\"")));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4, "{lines:?}");
        let winners: Vec<&Value> = lines.iter().filter(|l| l["result"] == true).collect();
        assert_eq!(winners.len(), 1, "round {round}: {lines:?}");
        assert_eq!(stored(&c, &key), Some(winners[0]["slot"].clone()));
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_flooding_writer_stays_inside_the_byte_limit_and_does_not_stall_the_others() {
    let limit = 1 << 20;
    let c = state_workers(2, &["--storage-max-bytes", "1M"]);
    let before = rss_kib(c.pid);
    let (flood, slowest) = std::thread::scope(|scope| {
        let flood = scope.spawn(|| reply(&c, "1", "flood", Some(r#"{"bytes":2048,"ms":3000}"#)));
        std::thread::sleep(Duration::from_millis(300));
        let slowest = reply(&c, "2", "probe", Some("100"));
        (flood.join().unwrap(), slowest)
    });
    eprintln!("flood: {flood}; the slowest read during it took {slowest} us");
    let (ok, full) = (
        flood["ok"].as_u64().unwrap(),
        flood["full"].as_u64().unwrap(),
    );
    assert_eq!(flood["other"], 0, "{flood}");
    assert!(
        ok > 100 && full > 1000,
        "the flood filled the storage: {flood}"
    );
    assert!(
        ok * 2048 <= limit,
        "{ok} writes of 2 KiB fit in 1 MiB? {flood}"
    );
    let storage = status_json(&c).unwrap()["storage"].clone();
    assert!(storage["bytes"].as_u64().unwrap() <= limit, "{storage}");
    assert_eq!(storage["max_bytes"], limit);
    let grown = rss_kib(c.pid).saturating_sub(before);
    assert!(
        grown < 24 * 1024,
        "the watcher grew by {grown} KiB for a 1 MiB store"
    );
    // The other worker's reads went on: the slowest of 100 took well
    // under a second while the flood ran (a stalled watcher takes the
    // whole flood's 3 s).
    let slowest = slowest.as_u64().unwrap();
    assert!(
        slowest < 500_000,
        "a read took {slowest} us during the flood"
    );
}

#[test]
fn storage_init_and_file_survive_a_restart_and_the_cli_reads_and_writes() {
    let first = watcher();
    let dir = first.dir().to_path_buf();
    let init = dir.join("init.json");
    let file = dir.join("state.json");
    std::fs::write(&init, r#"{"hits": 5, "cfg": {"mode": "fast"}}"#).unwrap();
    let args = [
        "--storage-init",
        init.to_str().unwrap(),
        "--storage-file",
        file.to_str().unwrap(),
    ];
    let mut c = first
        .workers(1)
        .pid_file()
        .args(args)
        .start(example("state_worker"), &[]);
    c.wait_workers(1, START);
    wait_ready(&c, 1);
    assert_eq!(stored(&c, "cfg.mode"), Some(Value::from("fast")));
    assert!(storage(&c, "set", &["users.42.name", "\"ann\""])
        .status
        .success());
    let bad = storage(&c, "set", &["hits.x", "1"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("hits is a number, not an object"));
    assert!(!c
        .control(&["storage", "set", "a", "not json"])
        .status
        .success());
    assert!(!storage(&c, "get", &["missing"]).status.success());
    assert!(storage(&c, "delete", &["cfg"]).status.success());
    assert!(!storage(&c, "delete", &["cfg"]).status.success());
    let dump = storage(&c, "dump", &[]);
    let dump: Value = serde_json::from_slice(&dump.stdout).unwrap();
    assert_eq!(
        dump,
        serde_json::json!({"hits": 5, "users": {"42": {"name": "ann"}}})
    );
    assert!(c.control(&["stop"]).status.success());
    c.wait_exit(START).expect("stopped");
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(saved["data"], dump);

    // A new watcher on the same file starts from it (the init file is
    // only for a first start).
    std::fs::write(&init, r#"{"hits": 100}"#).unwrap();
    let mut c = watcher()
        .workers(1)
        .pid_file()
        .args(args)
        .start(example("state_worker"), &[]);
    c.wait_workers(1, START);
    wait_ready(&c, 1);
    assert_eq!(stored(&c, ""), Some(dump));
}
