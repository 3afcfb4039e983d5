//! Zero-downtime operations with real processes: rolling restart under load,
//! readiness gate, queued reloads, heartbeat, scaling, file-watch and deploy
//! reloads, and the control subcommands.

mod common;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

const START: Duration = Duration::from_secs(15);

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn rolling_restart_under_load_fails_no_request() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let hello = example("hello_http");
    let mut c = Running::start(
        &[
            "--workers",
            "2",
            "--log-level",
            "info",
            hello.to_str().unwrap(),
            &addr,
        ],
        &[],
    );
    let mut workers: HashSet<u32> = c.wait_workers(2, START).into_iter().collect();
    wait_for(START, || http_get(port).ok()).expect("serving");

    let load = Arc::new(Load::default());
    let mut threads = Vec::new();
    for _ in 0..2 {
        threads.push(new_connection_client(port, load.clone()));
        threads.push(keep_alive_client(port, load.clone()));
    }
    wait_for(START, || {
        (load.ok.load(Ordering::Relaxed) > 100).then_some(())
    })
    .expect("load running");

    const RELOADS: usize = 3;
    for round in 1..=RELOADS {
        c.signal(Signal::SIGUSR1);
        let done = wait_for(Duration::from_secs(30), || {
            (count(&c.stderr(), "rolling restart (SIGUSR1) done") >= round).then_some(())
        });
        assert!(
            done.is_some(),
            "reload {round} did not finish:\n{}",
            c.stderr()
        );
        // Every worker pid was replaced.
        let now: HashSet<u32> = c.wait_workers(2, START).into_iter().collect();
        assert!(
            now.is_disjoint(&workers),
            "round {round}: {workers:?} -> {now:?}"
        );
        workers = now;
    }
    let before = load.ok.load(Ordering::Relaxed);
    wait_for(START, || {
        (load.ok.load(Ordering::Relaxed) > before + 100).then_some(())
    })
    .expect("still serving");
    load.stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let failed = load.failed.load(Ordering::Relaxed);
    assert_eq!(
        failed,
        0,
        "{failed} failed of {} requests: {:?}\n{}",
        load.ok.load(Ordering::Relaxed),
        load.errors.lock().unwrap(),
        c.stderr()
    );
}

#[test]
fn replacement_that_never_gets_ready_leaves_the_old_workers_serving() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("hang");
    let pid_file = dir.path().join("w.pid");
    let worker = example("test_worker");
    let mut c = Running::start(
        &[
            "--workers",
            "2",
            "--ready-timeout",
            "1",
            "--pid-file",
            pid_file.to_str().unwrap(),
            worker.to_str().unwrap(),
            "hang",
            &addr,
        ],
        &[("TEST_HANG_MARK", mark.to_str().unwrap())],
    );
    let before = c.wait_workers(2, START);
    wait_for(START, || http_get(port).ok()).expect("serving");
    std::fs::write(&mark, "").unwrap();
    let out = std::process::Command::new(cluster_bin())
        .args(["reload", "--pid-file", pid_file.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("was not ready within 1s"), "{stderr}");
    // The replacement is gone and the old workers still serve.
    let after = c.wait_workers(2, START);
    assert_eq!(before, after);
    for _ in 0..10 {
        assert_eq!(http_get(port).unwrap().status, 200);
    }
}

#[test]
fn reload_requested_during_a_reload_is_queued() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("spawns");
    let worker = example("test_worker");
    let mut c = Running::start(
        &[
            "--workers",
            "2",
            "--log-level",
            "info",
            worker.to_str().unwrap(),
            "serve",
            &format!("127.0.0.1:{port}"),
        ],
        &[("TEST_SPAWN_LOG", log.to_str().unwrap())],
    );
    c.wait_workers(2, START);
    wait_for(START, || http_get(port).ok()).expect("serving");
    c.signal(Signal::SIGUSR1);
    c.signal(Signal::SIGHUP);
    c.signal(Signal::SIGUSR1); // merges with the queued SIGHUP
    let done = wait_for(Duration::from_secs(30), || {
        (count(&c.stderr(), " done: ") >= 2).then_some(())
    });
    assert!(done.is_some(), "{}", c.stderr());
    std::thread::sleep(Duration::from_millis(500));
    let stderr = c.stderr();
    assert_eq!(count(&stderr, " done: "), 2, "{stderr}");
    assert!(stderr.contains("queued"), "{stderr}");
    // 2 initial + 2 per reload.
    assert_eq!(spawn_log(&log).len(), 6, "{:?}", spawn_log(&log));
}

#[test]
fn worker_with_a_blocked_event_loop_is_replaced_after_the_heartbeat_timeout() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("blocked");
    let worker = example("test_worker");
    let mut c = Running::start(
        &[
            "--workers",
            "1",
            "--heartbeat-timeout",
            "1",
            worker.to_str().unwrap(),
            "block",
            &format!("127.0.0.1:{port}"),
        ],
        &[("TEST_BLOCK_MARK", mark.to_str().unwrap())],
    );
    let first = c.wait_workers(1, START)[0];
    let replaced = wait_for(Duration::from_secs(10), || {
        let w = c.workers();
        (w.len() == 1 && w[0] != first).then(|| w[0])
    });
    assert!(
        replaced.is_some(),
        "blocked worker not replaced:\n{}",
        c.stderr()
    );
    assert!(
        c.stderr().contains("did not answer heartbeats"),
        "{}",
        c.stderr()
    );
    wait_for(START, || http_get(port).ok()).expect("the replacement serves");
}

#[test]
fn ttin_and_ttou_change_the_worker_count() {
    let worker = example("test_worker");
    let mut c = Running::start(
        &[
            "--workers",
            "2",
            worker.to_str().unwrap(),
            "serve",
            "127.0.0.1:0",
        ],
        &[],
    );
    c.wait_workers(2, START);
    c.signal(Signal::SIGTTIN);
    c.wait_workers(3, START);
    c.signal(Signal::SIGTTOU);
    c.wait_workers(2, START);
    c.signal(Signal::SIGTTOU);
    c.wait_workers(1, START);
    c.signal(Signal::SIGTTOU); // never below 1
    std::thread::sleep(Duration::from_millis(500));
    c.wait_workers(1, START);
    assert!(c.stderr().contains("at least 1 worker"), "{}", c.stderr());
}

#[test]
fn touching_a_watched_file_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let watched = dir.path().join("src");
    std::fs::create_dir(&watched).unwrap();
    std::fs::write(watched.join("main.rs"), "fn main() {}").unwrap();
    let worker = example("test_worker");
    let mut c = Running::start(
        &[
            "--workers",
            "2",
            "--watch",
            watched.to_str().unwrap(),
            worker.to_str().unwrap(),
            "serve",
            "127.0.0.1:0",
        ],
        &[],
    );
    let before: HashSet<u32> = c.wait_workers(2, START).into_iter().collect();
    // Let the poller take its first fingerprint, then change a file.
    std::thread::sleep(Duration::from_millis(600));
    std::fs::write(watched.join("main.rs"), "fn main() { println!(); }").unwrap();
    let after = wait_for(Duration::from_secs(20), || {
        let now: HashSet<u32> = c.workers().into_iter().collect();
        (now.len() == 2 && now.is_disjoint(&before)).then_some(now)
    });
    assert!(
        after.is_some(),
        "no reload after the change:\n{}",
        c.stderr()
    );
    assert!(
        c.stderr().contains("changed: rolling restart"),
        "{}",
        c.stderr()
    );
}

#[test]
fn switching_the_deploy_symlink_reloads_onto_the_new_release() {
    let dir = tempfile::tempdir().unwrap();
    let releases = dir.path().join("releases");
    for v in ["v1", "v2"] {
        std::fs::create_dir_all(releases.join(v)).unwrap();
        std::fs::copy(example("test_worker"), releases.join(v).join("worker")).unwrap();
    }
    let current = dir.path().join("current");
    std::os::unix::fs::symlink(releases.join("v1"), &current).unwrap();
    let program = current.join("worker");
    let mut c = Running::start(
        &[
            "--workers",
            "2",
            "--reload-on-deploy",
            program.to_str().unwrap(),
            "serve",
            "127.0.0.1:0",
        ],
        &[],
    );
    let exe = |pid: u32| std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    for pid in c.wait_workers(2, START) {
        assert!(exe(pid).starts_with(releases.join("v1")), "{:?}", exe(pid));
    }
    // Atomic switch, as deploy tools do it.
    let tmp = dir.path().join("current.new");
    std::os::unix::fs::symlink(releases.join("v2"), &tmp).unwrap();
    std::fs::rename(&tmp, &current).unwrap();
    let on_v2 = wait_for(Duration::from_secs(20), || {
        let w = c.workers();
        (w.len() == 2 && w.iter().all(|&p| exe(p).starts_with(releases.join("v2")))).then_some(())
    });
    assert!(on_v2.is_some(), "workers not on v2:\n{}", c.stderr());
}

#[test]
fn control_subcommands_status_reload_scale_stop() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("c.pid");
    let pf = pid_file.to_str().unwrap().to_string();
    let cli = |args: &[&str]| {
        std::process::Command::new(cluster_bin())
            .args(args)
            .output()
            .unwrap()
    };

    // No watcher yet: status says so, exit 3.
    let out = cli(&["status", "--pid-file", &pf]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no watcher is running"));

    let worker = example("test_worker");
    let mut c = Running::start_in(
        dir,
        &[
            "--workers",
            "2",
            "--pid-file",
            &pf,
            worker.to_str().unwrap(),
            "serve",
            "127.0.0.1:0",
        ],
        &[],
    );
    let workers = c.wait_workers(2, START);
    let socket = pid_file.with_extension("sock");
    wait_for(START, || socket.exists().then_some(())).expect("control socket");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let out = cli(&["status", "--pid-file", &pf, "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pid"], c.pid);
    let pids: HashSet<u64> = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids, workers.iter().map(|&p| p as u64).collect());
    let out = cli(&["status", "-q", "--pid-file", &pf]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "-q prints nothing"
    );
    let out = cli(&["status", "--pid-file", &pf]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("SLOT") && table.lines().count() == 4,
        "{table}"
    );

    let out = cli(&["reload", "--pid-file", &pf]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let now: HashSet<u32> = c.wait_workers(2, START).into_iter().collect();
    assert!(now.is_disjoint(&workers.iter().copied().collect()));

    let out = cli(&["scale", "--pid-file", &pf, "3"]);
    assert_eq!(out.status.code(), Some(0));
    c.wait_workers(3, START);

    let out = cli(&["stop", "--pid-file", &pf]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.wait_exit(Duration::from_secs(5)).unwrap().code(), Some(0));
    assert!(!pid_file.exists() && !socket.exists());
    assert_eq!(
        cli(&["status", "-q", "--pid-file", &pf]).status.code(),
        Some(3)
    );
}
