//! `--listen`: workers in any language serve from the watcher's sockets,
//! inherited as descriptor 3 with `LISTEN_FDS`, `LISTEN_FDNAMES` and
//! their own pid in `LISTEN_PID`; rolling restarts under load with the
//! README's Python and Node examples lose no request.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

const START: Duration = Duration::from_secs(15);

/// `program` when it is installed (else the test says it is skipped).
fn interpreter(program: &str) -> Option<&str> {
    installed(program).then_some(program)
}

fn example_file(path: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(path)
        .to_string_lossy()
        .into_owned()
}

/// The environment `pid` was started with.
fn environment(pid: u32) -> HashMap<String, String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// What descriptor `fd` of `pid` is (`socket:[inode]`, ...).
fn fd_target(pid: u32, fd: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The pids that answer `GET /` (their `X-Pid`), with two concurrent
/// clients on new connections, until both `expected` answered.
fn answering_pids(port: u16, expected: &[u32]) -> HashSet<u32> {
    let seen = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let want: HashSet<u32> = expected.iter().copied().collect();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let seen = seen.clone();
            let want = want.clone();
            std::thread::spawn(move || {
                for _ in 0..2000 {
                    if want.is_subset(&seen.lock().unwrap()) {
                        return;
                    }
                    let pid = http_get(port)
                        .ok()
                        .and_then(|r| r.header("x-pid").and_then(|p| p.parse().ok()));
                    if let Some(pid) = pid {
                        seen.lock().unwrap().insert(pid);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    seen
}

/// Two workers of `program args` behind `--listen SPEC`; both answer on
/// the one port and each sees its own pid in `LISTEN_PID`.
fn two_workers_share_the_port(program: &str, args: &[&str], name: Option<&str>) {
    let port = free_port();
    let spec = match name {
        Some(n) => format!("{n}=127.0.0.1:{port}"),
        None => format!("127.0.0.1:{port}"),
    };
    let mut c = watcher()
        .workers(2)
        .args(["--listen", &spec])
        .start(program, args);
    let pids = c.wait_workers(2, START);
    c.wait_serving(port, START);
    let seen = answering_pids(port, &pids);
    assert_eq!(
        seen,
        pids.iter().copied().collect(),
        "both workers answer on port {port}"
    );
    let mut sockets = HashSet::new();
    for &pid in &pids {
        let env = environment(pid);
        assert_eq!(env.get("LISTEN_PID"), Some(&pid.to_string()), "{env:?}");
        assert_eq!(env.get("LISTEN_FDS").map(String::as_str), Some("1"));
        assert_eq!(
            env.get("LISTEN_FDNAMES").map(String::as_str),
            Some(name.unwrap_or("unknown"))
        );
        assert!(!env.contains_key("NOTIFY_SOCKET"), "no --notify: {env:?}");
        sockets.insert(fd_target(pid, 3));
    }
    assert_eq!(sockets.len(), 1, "one shared socket: {sockets:?}");
    assert!(sockets.iter().all(|s| s.starts_with("socket:")));
}

#[test]
fn python_workers_serve_from_one_listen_port_and_see_their_own_listen_pid() {
    let Some(python) = interpreter("python3") else {
        return;
    };
    two_workers_share_the_port(python, &[&example_file("python/server.py")], None);
}

#[test]
fn node_workers_serve_from_one_listen_port_and_see_their_own_listen_pid() {
    let Some(node) = interpreter("node") else {
        return;
    };
    two_workers_share_the_port(node, &[&example_file("node/server.js")], Some("web"));
}

/// Rolling restarts of `program args` under load (new connections and
/// keep-alive clients) fail no request.
fn rolling_restarts_under_load_fail_no_request(program: &str, args: &[&str], options: &[&str]) {
    let port = free_port();
    let mut c = watcher()
        .workers(2)
        .log_level("info")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(options)
        .start(program, args);
    let mut workers: HashSet<u32> = c.wait_workers(2, START).into_iter().collect();
    c.wait_serving(port, START);
    wait_for(START, || {
        (c.stderr().matches(") is ready").count() >= 2).then_some(())
    })
    .expect("both workers ready");
    let load = Arc::new(Load::default());
    let threads = vec![
        new_connection_client(port, load.clone()),
        new_connection_client(port, load.clone()),
        keep_alive_client(port, load.clone()),
        keep_alive_client(port, load.clone()),
    ];
    wait_for(START, || {
        (load.ok.load(Ordering::Relaxed) > 100).then_some(())
    })
    .expect("load running");
    for round in 1..=2 {
        c.signal(Signal::SIGUSR1);
        let done = wait_for(Duration::from_secs(30), || {
            let n = c.stderr().matches("rolling restart (SIGUSR1) done").count();
            (n >= round).then_some(())
        });
        assert!(done.is_some(), "reload {round}:\n{}", c.stderr());
        let now: HashSet<u32> = c.wait_workers(2, START).into_iter().collect();
        assert!(now.is_disjoint(&workers), "{workers:?} -> {now:?}");
        workers = now;
    }
    let before = load.ok.load(Ordering::Relaxed);
    wait_for(START, || {
        (load.ok.load(Ordering::Relaxed) > before + 100).then_some(())
    })
    .expect("still serving");
    let (ok, failed, errors) = load.finish(threads);
    assert_eq!(
        failed,
        0,
        "{failed} of {ok} failed: {errors:?}\n{}",
        c.stderr()
    );
}

#[test]
fn python_rolling_restart_under_load_with_ready_1_loses_no_request() {
    let Some(python) = interpreter("python3") else {
        return;
    };
    rolling_restarts_under_load_fail_no_request(
        python,
        &[&example_file("python/server.py")],
        &["--notify"],
    );
}

#[test]
fn node_rolling_restart_under_load_loses_no_request() {
    let Some(node) = interpreter("node") else {
        return;
    };
    rolling_restarts_under_load_fail_no_request(
        node,
        &[&example_file("node/server.js")],
        &["--ready-delay", "0.5"],
    );
}

#[test]
fn reuseport_gives_each_slot_its_own_inherited_socket() {
    let Some(python) = interpreter("python3") else {
        return;
    };
    let port = free_port();
    let mut c = watcher()
        .workers(2)
        .args([
            "--balance",
            "reuseport",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .start(python, &[&example_file("python/server.py")]);
    let pids = c.wait_workers(2, START);
    c.wait_serving(port, START);
    let sockets: HashSet<String> = pids.iter().map(|&p| fd_target(p, 3)).collect();
    assert_eq!(sockets.len(), 2, "one socket per slot: {sockets:?}");
    assert_eq!(answering_pids(port, &pids), pids.iter().copied().collect());
}

#[test]
fn library_workers_take_the_inherited_socket_for_a_matching_address() {
    // The bind policy refuses every address but port 1: the worker's
    // listen() can only work through the inherited socket.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut c = watcher()
        .workers(2)
        .args(["--listen", &addr, "--allow-bind", "127.0.0.1:1"])
        .start(example("test_worker"), &["serve", &addr]);
    c.wait_workers(2, START);
    let r = c.wait_serving(port, START);
    assert_eq!(r.status, 200);
    assert!(!c.stderr().contains("not allowed"), "{}", c.stderr());
}

#[test]
fn a_listen_address_in_use_is_a_start_up_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut c = watcher()
        .inherit_rust_log()
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .start("sleep", &["60"]);
    let (status, stderr) = c.run_to_end(START);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("cluster: error: "), "{stderr}");
    assert!(c.workers().is_empty());
}

#[test]
fn listen_with_a_balanced_mode_is_refused() {
    let (status, stderr) = run_to_end(
        &["--listen", ":1", "--balance", "round-robin", "sleep", "1"],
        START,
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--listen needs --balance shared or reuseport"),
        "{stderr}"
    );
}

#[test]
fn uvicorn_serves_with_fd_3() {
    let importable = std::process::Command::new("python3")
        .args(["-c", "import uvicorn"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !importable {
        eprintln!("skipped: uvicorn is not installed (pip install uvicorn)");
        return;
    }
    let port = free_port();
    let mut c = watcher()
        .workers(2)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .start(
            "python3",
            &[
                "-m",
                "uvicorn",
                "--fd",
                "3",
                "--app-dir",
                &example_file("python"),
                "asgi:app",
            ],
        );
    let pids = c.wait_workers(2, START);
    c.wait_serving(port, START);
    assert_eq!(answering_pids(port, &pids), pids.iter().copied().collect());
}
