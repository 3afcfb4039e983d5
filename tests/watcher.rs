//! End-to-end behaviour of the `cluster` watcher with real worker processes.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

const START: Duration = Duration::from_secs(15);

/// Requests on new connections until `want` distinct worker ids answered.
fn distinct_worker_ids(port: u16, want: usize, timeout: Duration) -> HashSet<String> {
    let mut ids = HashSet::new();
    wait_for(timeout, || {
        // A few concurrent connections, so that idle workers get a turn.
        let handles: Vec<_> = (0..8)
            .map(|_| std::thread::spawn(move || http_get(port)))
            .collect();
        for h in handles {
            if let Ok(Ok(r)) = h.join() {
                if let Some(id) = r.header("x-worker-id") {
                    ids.insert(id.to_string());
                }
            }
        }
        (ids.len() >= want).then_some(())
    });
    ids
}

#[test]
fn all_workers_serve_one_port() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let hello = example("hello_http");
    let mut c = watcher().workers(4).start(&hello, &[&addr]);
    c.wait_workers(4, START);
    let ids = distinct_worker_ids(port, 4, Duration::from_secs(20));
    assert_eq!(
        ids.len(),
        4,
        "distinct x-worker-id values: {ids:?}\n{}",
        c.stderr()
    );
    assert!(!ids.contains("standalone"));
    // The watcher owns the listening socket: its own descriptor table has it.
    let r = http_get(port).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "Hello, World!");
}

#[test]
fn killed_worker_is_replaced_while_others_serve() {
    let (mut c, port) = watcher().serve_hello(3);
    let before = c.wait_workers(3, START);
    let victim = before[0];
    signal(victim, Signal::SIGKILL);
    // While the replacement starts, every request is still answered.
    for _ in 0..20 {
        let r = http_get(port).expect("request during replacement");
        assert_eq!(r.status, 200);
    }
    let after = wait_for(START, || {
        let w = c.workers();
        (w.len() == 3 && !w.contains(&victim)).then_some(w)
    })
    .unwrap_or_else(|| panic!("no replacement for {victim}; stderr:\n{}", c.stderr()));
    let kept: Vec<_> = before.iter().filter(|p| **p != victim).collect();
    for p in kept {
        assert!(after.contains(p), "worker {p} should have kept running");
    }
    assert!(
        c.stderr().contains("was killed by SIGKILL"),
        "{}",
        c.stderr()
    );
}

#[test]
fn sigterm_stops_everything_and_removes_the_pid_file() {
    let (mut c, port) = watcher().pid_file().serve_hello(2);
    let workers = c.wait_workers(2, START);
    let recorded: u32 = std::fs::read_to_string(c.pid_file())
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(recorded, c.pid);
    c.signal(Signal::SIGTERM);
    let status = c.wait_exit(Duration::from_secs(15)).expect("watcher exits");
    assert_eq!(status.code(), Some(0), "{}", c.stderr());
    assert!(!c.pid_file().exists(), "pid file removed");
    for w in workers {
        assert!(!alive(w), "worker {w} still alive");
    }
    assert!(http_get(port).is_err(), "port closed after stop");
}

#[test]
fn killed_watcher_leaves_no_worker_behind() {
    let (mut c, _) = watcher().serve_hello(3);
    let workers = c.wait_workers(3, START);
    c.signal(Signal::SIGKILL);
    c.wait_exit(Duration::from_secs(5)).expect("watcher dies");
    std::thread::sleep(Duration::from_secs(2));
    let survivors: Vec<_> = workers.iter().filter(|&&w| alive(w)).collect();
    assert!(
        survivors.is_empty(),
        "workers alive 2 s after the watcher died: {survivors:?}"
    );
}

#[test]
fn killed_watcher_takes_down_workers_that_do_not_use_the_library() {
    // `sleep` knows nothing of the cluster and never reads the socketpair:
    // only PR_SET_PDEATHSIG (SIGTERM) can end it when the watcher dies.
    let mut c = watcher()
        .workers(2)
        .arg("--")
        .start("/bin/sleep", &["1000"]);
    let workers = c.wait_workers(2, START);
    c.signal(Signal::SIGKILL);
    c.wait_exit(Duration::from_secs(5)).expect("watcher dies");
    let gone = wait_for(Duration::from_secs(2), || {
        workers.iter().all(|&w| !alive(w)).then_some(())
    });
    assert!(gone.is_some(), "workers outlived the watcher: {workers:?}");
}

#[test]
fn second_watcher_on_the_same_pid_file_refuses() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let hello = example("hello_http");
    let mut first = watcher().workers(1).pid_file().start(&hello, &[&addr]);
    first.wait_workers(1, START);
    let other_port = format!("127.0.0.1:{}", free_port());
    let (status, stderr) = watcher()
        .workers(1)
        .arg("--pid-file")
        .arg(first.pid_file())
        .start(&hello, &[&other_port])
        .run_to_end(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "another watcher (pid {}) is running with pid file",
            first.pid
        )),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    // The first watcher is untouched and its pid file intact.
    assert_eq!(
        std::fs::read_to_string(first.pid_file()).unwrap().trim(),
        first.pid.to_string()
    );
    assert_eq!(first.workers().len(), 1);
}

#[test]
fn stale_pid_file_is_replaced() {
    let w = watcher().workers(1).pid_file();
    std::fs::write(w.pid_path(), "999999\n").unwrap();
    let port = format!("127.0.0.1:{}", free_port());
    let mut c = w.start(example("hello_http"), &[&port]);
    c.wait_workers(1, START);
    let pid = wait_for(START, || {
        std::fs::read_to_string(c.pid_file())
            .ok()
            .filter(|s| s.trim() != "999999")
    });
    assert_eq!(pid.unwrap().trim(), c.pid.to_string());
}

#[test]
fn address_in_use_fails_cleanly() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let spawn_log = tempfile::NamedTempFile::new().unwrap();
    let mut c = watcher()
        .workers(3)
        .env("TEST_SPAWN_LOG", spawn_log.path())
        .start(example("test_worker"), &["serve", &addr]);
    let status = c.wait_exit(Duration::from_secs(15)).expect("watcher exits");
    let stderr = c.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let last = stderr.trim().lines().last().unwrap_or("");
    assert!(
        last.starts_with("cluster: error: cannot listen on ") && last.contains("in use"),
        "last line: {last}\n{stderr}"
    );
    // No worker is left behind.
    for pid in c.seen_workers() {
        assert!(!alive(pid), "worker {pid} left running");
    }
    drop(taken);
}

#[test]
fn crashing_worker_is_respawned_with_growing_delay() {
    let w = watcher().workers(1);
    let log = w.dir().join("spawns");
    let mut c = w
        .env("TEST_SPAWN_LOG", &log)
        .start(example("test_worker"), &["exit"]);
    std::thread::sleep(Duration::from_millis(3500));
    let spawns = spawn_log(&log);
    drop(c.child.take().map(|mut ch| {
        let _ = ch.kill();
        ch.wait()
    }));
    // 100 ms doubling: starts at ~0, 0.1, 0.3, 0.7, 1.5, 3.1 s -> 6 in 3.5 s.
    // Without a backoff there would be hundreds.
    assert!(
        (4..=8).contains(&spawns.len()),
        "{} spawns in 3.5 s: {spawns:?}",
        spawns.len()
    );
    let times: Vec<u64> = spawns.iter().map(|l| l[4].parse().unwrap()).collect();
    let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for pair in gaps.windows(2) {
        assert!(pair[1] > pair[0], "delays must grow: {gaps:?}");
    }
    // Every respawn has a new context id in the same slot.
    let contexts: HashSet<&str> = spawns.iter().map(|l| l[1].as_str()).collect();
    assert_eq!(contexts.len(), spawns.len());
    assert!(spawns.iter().all(|l| l[2] == "1"));
}

#[test]
fn worker_that_writes_garbage_is_replaced_and_others_keep_serving() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let w = watcher().workers(3);
    let log = w.dir().join("spawns");
    let mark = w.dir().join("garbage-sent");
    let mut c = w
        .env("TEST_SPAWN_LOG", &log)
        .env("TEST_GARBAGE_MARK", &mark)
        .env("TEST_GARBAGE_SLOT", "2")
        .start(example("test_worker"), &["garbage", &addr]);
    // Slot 2 is spawned, misbehaves, is killed and respawned: 4 spawns.
    wait_for(START, || (spawn_log(&log).len() >= 4).then_some(()))
        .unwrap_or_else(|| panic!("no respawn: {:?}\n{}", spawn_log(&log), c.stderr()));
    let spawns = spawn_log(&log);
    let slot2: Vec<_> = spawns.iter().filter(|l| l[2] == "2").collect();
    assert_eq!(slot2.len(), 2, "{spawns:?}");
    let bad_pid: u32 = slot2[0][3].parse().unwrap();
    wait_for(START, || (!alive(bad_pid)).then_some(())).expect("garbage writer killed");
    c.wait_workers(3, START);
    for _ in 0..20 {
        assert_eq!(http_get(port).expect("serving").status, 200);
    }
    let stderr = c.stderr();
    assert!(stderr.contains("broke the protocol"), "{stderr}");
    // Slots 1 and 3 were never restarted.
    assert_eq!(spawns.iter().filter(|l| l[2] != "2").count(), 2);
}

#[test]
fn port_zero_gives_every_worker_the_same_port() {
    let w = watcher().workers(3);
    let log = w.dir().join("spawns");
    let _c = w
        .env("TEST_SPAWN_LOG", &log)
        .start(example("test_worker"), &["serve", "127.0.0.1:0"]);
    let spawns = wait_for(START, || {
        let s = spawn_log(&log);
        (s.len() == 3).then_some(s)
    })
    .expect("3 workers");
    let ports: HashSet<&str> = spawns.iter().map(|l| l[5].as_str()).collect();
    assert_eq!(ports.len(), 1, "{spawns:?}");
    let port: u16 = ports.into_iter().next().unwrap().parse().unwrap();
    assert_ne!(port, 0);
    assert_eq!(http_get(port).unwrap().status, 200);
}

#[test]
fn unix_socket_address_is_shared_and_removed_on_exit() {
    use std::io::{Read, Write};
    let w = watcher().workers(2);
    let sock = w.dir().join("hello.sock");
    let addr = format!("unix://{}", sock.display());
    let mut c = w.start(example("hello_http"), &[&addr]);
    c.wait_workers(2, START);
    let mut s = wait_for(START, || {
        std::os::unix::net::UnixStream::connect(&sock).ok()
    })
    .expect("socket");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let r = parse_response(&raw).unwrap();
    assert_eq!(r.status, 200);
    c.signal(Signal::SIGTERM);
    assert_eq!(
        c.wait_exit(Duration::from_secs(15)).unwrap().code(),
        Some(0)
    );
    assert!(!sock.exists(), "socket file removed on exit");
}

#[test]
fn second_sigint_forces_the_stop() {
    // Workers that ignore the stop request and SIGTERM. `exec` keeps each
    // worker one process (an ignored signal stays ignored across exec): a
    // `sleep` child per worker would make the count of descendants that
    // `wait_workers` waits for flicker between 2 and 4.
    let mut c = watcher()
        .workers(2)
        .args(["--shutdown-timeout", "60", "--"])
        .start("/bin/sh", &["-c", "trap '' TERM; exec sleep 3600"]);
    let workers = c.wait_workers(2, START);
    c.signal(Signal::SIGINT);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        c.wait_exit(Duration::from_millis(10)).is_none(),
        "waits for the workers"
    );
    c.signal(Signal::SIGINT);
    let status = c
        .wait_exit(Duration::from_secs(5))
        .expect("forced stop exits");
    assert_eq!(status.code(), Some(1));
    for w in workers {
        assert!(!alive(w));
    }
}
