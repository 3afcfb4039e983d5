//! Health that tells the truth, crash-loop limits and recycling, with the
//! real binary: `cluster status` lists every slot (backoff and failed
//! ones too) and exits 5 when degraded; `--max-restarts` gives up on a
//! crash loop; `--max-requests` and `--max-memory` replace workers
//! through the rolling path without failing a request.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

/// `cluster status --json` (whatever its exit status) and the exit code.
fn status(c: &Running) -> Option<(serde_json::Value, i32)> {
    let out = c.control(&["status", "--json"]);
    let v = serde_json::from_slice(&out.stdout).ok()?;
    Some((v, out.status.code().unwrap_or(-1)))
}

#[test]
fn a_crash_loop_gives_up_after_max_restarts_and_status_says_so() {
    let mut c = watcher()
        .workers(1)
        .pid_file()
        .args(["--max-restarts", "3", "--restart-window", "60"])
        .start("/bin/true", &[]);
    let (v, code) = wait_for(T, || {
        status(&c).filter(|(v, _)| v["workers"][0]["state"] == "failed")
    })
    .unwrap_or_else(|| panic!("no failed slot; stderr:\n{}", c.stderr()));
    assert_eq!(code, 5, "degraded: {v}");
    assert_eq!(v["degraded"], true);
    assert_eq!(v["workers_ready"], 0);
    assert_eq!(v["workers"][0]["last_exit_code"], 0, "{v}");
    assert_eq!(v["workers"][0]["pid"], 0);
    assert_eq!(v["program"], "/bin/true");
    let quiet = c.control(&["status", "-q"]);
    assert_eq!(quiet.status.code(), Some(5));
    assert!(quiet.stdout.is_empty());
    assert!(c.stderr().contains("giving up on slot 1"), "{}", c.stderr());
    // It stays given up: no more spawns.
    std::thread::sleep(Duration::from_millis(500));
    assert!(c.workers().is_empty());
    let table = String::from_utf8_lossy(&c.control(&["status"]).stdout).into_owned();
    assert!(
        table.contains("DEGRADED") && table.contains("failed"),
        "{table}"
    );
}

#[test]
fn status_lists_backoff_slots_exit_codes_signals_program_and_addresses() {
    let script = "if [ \"$CLUSTER_SLOT\" = 1 ]; then exit 7; fi; exec sleep 1000";
    let c = watcher()
        .workers(2)
        .pid_file()
        .args(["--max-restarts", "0"])
        .start("/bin/sh", &["-c", script]);
    let (v, code) = wait_for(T, || {
        status(&c).filter(|(v, _)| {
            v["workers"].as_array().is_some_and(|w| {
                w.len() == 2 && w[0]["state"] == "backoff" && w[1]["state"] == "ready"
            })
        })
    })
    .unwrap_or_else(|| panic!("no backoff row; stderr:\n{}", c.stderr()));
    assert_eq!(code, 5, "1 of 2 ready is degraded: {v}");
    let row = &v["workers"][0];
    assert_eq!(row["slot"], 1, "{v}");
    assert_eq!(row["state"], "backoff");
    assert_eq!(row["last_exit_code"], 7);
    assert!(row["next_start_secs"].as_f64().is_some(), "{v}");
    assert_eq!(v["workers"][1]["state"], "ready", "{v}");
    let table = String::from_utf8_lossy(&c.control(&["status"]).stdout).into_owned();
    assert!(table.contains("backoff"), "{table}");
    // A worker killed from outside: its signal is reported.
    let pid = v["workers"][1]["pid"].as_u64().unwrap() as u32;
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let (v, _) = wait_for(T, || {
        status(&c).filter(|(v, _)| v["workers"][1]["last_exit_signal"] == "SIGKILL")
    })
    .unwrap_or_else(|| panic!("no SIGKILL reported; stderr:\n{}", c.stderr()));
    assert!(v["workers"][1]["last_exit_code"].is_null(), "{v}");
    drop(c);

    // A healthy cluster: exit 0, program and addresses shown.
    let (c, _) = watcher().pid_file().serve_hello(2);
    let (v, code) = wait_for(T, || status(&c).filter(|(_, code)| *code == 0)).expect("healthy");
    assert_eq!(code, 0);
    assert_eq!(v["degraded"], false);
    assert_eq!(v["workers_ready"], 2);
    assert!(
        v["program"].as_str().unwrap().ends_with("hello_http"),
        "{v}"
    );
    assert_eq!(v["addresses"].as_array().unwrap().len(), 1, "{v}");
}

#[test]
fn status_of_a_cluster_without_workers_has_an_empty_workers_list_and_is_degraded() {
    let c = watcher()
        .workers(1)
        .pid_file()
        .args(["--max-restarts", "0"])
        .start("/bin/false", &[]);
    let (v, code) = wait_for(T, || {
        status(&c).filter(|(v, _)| v["workers"][0]["state"] == "backoff")
    })
    .unwrap_or_else(|| panic!("stderr:\n{}", c.stderr()));
    assert!(v["workers"].is_array());
    assert_eq!(code, 5, "0 of 1 ready: {v}");
}

#[test]
fn max_requests_recycles_workers_through_the_rolling_path_without_failing_a_request() {
    let (mut c, port) = watcher()
        .pid_file()
        .args(["--max-requests", "40", "--max-requests-jitter", "10"])
        .serve_hello(2);
    let first = c.workers();
    let mut failures = Vec::new();
    // Requests until four recycles happened and neither first worker is
    // left (a worker that is draining still answers, and in the shared
    // mode one worker may take most connections for a while, so how many
    // requests that takes depends on timing), at most 3,000; none may
    // fail on the way.
    let mut sent = 0;
    let done = |c: &mut Running| {
        c.stderr().matches("recycling worker").count() >= 4
            && !c.workers().iter().any(|p| first.contains(p))
    };
    while sent < 3000 && !done(&mut c) {
        for _ in 0..50 {
            match http_get(port) {
                Ok(r) if r.status == 200 => {}
                Ok(r) => failures.push(format!("request {sent}: status {}", r.status)),
                Err(e) => failures.push(format!("request {sent}: {e}")),
            }
            sent += 1;
        }
    }
    assert!(failures.is_empty(), "{failures:?}\n{}", c.stderr());
    let recycled = c.stderr().matches("recycling worker").count();
    assert!(
        recycled >= 4,
        "{sent} requests over 2 workers of at most 50 each: {recycled} recycles\n{}",
        c.stderr()
    );
    assert!(c.stderr().contains("(--max-requests)"));
    let now = c.wait_workers(2, T);
    assert!(now.iter().all(|p| !first.contains(p)), "both replaced");
    let (v, _) = status(&c).unwrap();
    assert!(v["workers"][0]["restarts"].as_u64().unwrap() >= 1, "{v}");
}

#[test]
fn max_memory_recycles_a_worker_past_its_rss_limit() {
    let port = free_port();
    let c = watcher()
        .workers(1)
        .pid_file()
        .args(["--max-memory", "32M"])
        .start(
            example("test_worker"),
            &["grow", &format!("127.0.0.1:{port}")],
        );
    c.wait_serving(port, T);
    wait_for(T, || {
        c.stderr().contains("more than --max-memory").then_some(())
    })
    .unwrap_or_else(|| panic!("never recycled:\n{}", c.stderr()));
    assert!(c.stderr().contains("recycling worker 1"), "{}", c.stderr());
    assert_eq!(c.wait_serving(port, T).status, 200, "still serving");
}
