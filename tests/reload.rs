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
    let (mut c, port) = watcher().log_level("info").serve_hello(2);
    let mut workers: HashSet<u32> = c.wait_workers(2, START).into_iter().collect();

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
    let w = watcher()
        .workers(2)
        .args(["--ready-timeout", "1"])
        .pid_file();
    let mark = w.dir().join("hang");
    let mut c = w
        .env("TEST_HANG_MARK", &mark)
        .start(example("test_worker"), &["hang", &addr]);
    let before = c.wait_workers(2, START);
    c.wait_serving(port, START);
    std::fs::write(&mark, "").unwrap();
    let out = c.control(&["reload"]);
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
    let w = watcher().workers(2).log_level("info");
    let log = w.dir().join("spawns");
    let mut c = w.env("TEST_SPAWN_LOG", &log).start(
        example("test_worker"),
        &["serve", &format!("127.0.0.1:{port}")],
    );
    c.wait_workers(2, START);
    c.wait_serving(port, START);
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
    let w = watcher().workers(1).args(["--heartbeat-timeout", "1"]);
    let mark = w.dir().join("blocked");
    let mut c = w.env("TEST_BLOCK_MARK", &mark).start(
        example("test_worker"),
        &["block", &format!("127.0.0.1:{port}")],
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
    c.wait_serving(port, START); // the replacement
}

#[test]
fn ttin_and_ttou_change_the_worker_count() {
    let mut c = watcher()
        .workers(2)
        .start(example("test_worker"), &["serve", "127.0.0.1:0"]);
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
    let w = watcher().workers(2);
    let watched = w.dir().join("src");
    std::fs::create_dir(&watched).unwrap();
    std::fs::write(watched.join("main.rs"), "fn main() {}").unwrap();
    let mut c = w
        .arg("--watch")
        .arg(&watched)
        .start(example("test_worker"), &["serve", "127.0.0.1:0"]);
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
    let w = watcher().workers(2).arg("--reload-on-deploy");
    let releases = w.dir().join("releases");
    for v in ["v1", "v2"] {
        std::fs::create_dir_all(releases.join(v)).unwrap();
        std::fs::copy(example("test_worker"), releases.join(v).join("worker")).unwrap();
    }
    let current = w.dir().join("current");
    std::os::unix::fs::symlink(releases.join("v1"), &current).unwrap();
    let mut c = w.start(current.join("worker"), &["serve", "127.0.0.1:0"]);
    let exe = |pid: u32| std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    for pid in c.wait_workers(2, START) {
        assert!(exe(pid).starts_with(releases.join("v1")), "{:?}", exe(pid));
    }
    // Atomic switch, as deploy tools do it.
    let tmp = c.path("current.new");
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
    let w = watcher().workers(2).pid_file();
    let pid_file = w.pid_path();

    // No watcher yet: status says so, exit 3.
    let out = control(&pid_file, &["status"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no watcher is running"));

    let mut c = w.start(example("test_worker"), &["serve", "127.0.0.1:0"]);
    let workers = c.wait_workers(2, START);
    let socket = c.control_socket();
    wait_for(START, || socket.exists().then_some(())).expect("control socket");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Started is not ready: status exits 5 (degraded) until both are.
    let out = wait_for(START, || {
        let out = c.control(&["status", "--json"]);
        (out.status.code() == Some(0)).then_some(out)
    })
    .unwrap_or_else(|| panic!("status never exited 0:\n{}", c.stderr()));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pid"], c.pid);
    let pids: HashSet<u64> = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids, workers.iter().map(|&p| p as u64).collect());
    let out = c.control(&["status", "-q"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "-q prints nothing"
    );
    let out = c.control(&["status"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        // Summary, program and addresses, header, two slots.
        table.contains("SLOT") && table.lines().count() == 5,
        "{table}"
    );

    let out = c.control(&["reload"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let now: HashSet<u32> = c.wait_workers(2, START).into_iter().collect();
    assert!(now.is_disjoint(&workers.iter().copied().collect()));

    let out = c.control(&["scale", "3"]);
    assert_eq!(out.status.code(), Some(0));
    c.wait_workers(3, START);

    let out = c.control(&["stop"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.wait_exit(Duration::from_secs(5)).unwrap().code(), Some(0));
    assert!(!pid_file.exists() && !socket.exists());
    assert_eq!(c.control(&["status", "-q"]).status.code(), Some(3));
}
