//! Upgrading the watcher itself with real processes: `cluster upgrade` and
//! SIGUSR2 under wrk load (keep-alive and `Connection: close`) lose no
//! request and leave one watcher; an upgrade to a binary that exits at once,
//! or whose workers never get ready, rolls back and the old watcher keeps
//! serving; status names the watcher's version and start time.
//!
//! The new watcher of an upgrade is a child of the old one and outlives it,
//! so it is not the test's descendant once the old one exited: every
//! watcher on the run's pid file is found through /proc and killed, with
//! its workers, when a test ends (see [`Watchers`]).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

const START: Duration = Duration::from_secs(15);
/// How long one upgrade (a new watcher and two workers, debug build, two
/// wrk clients on two cores) may take before the test calls it failed.
const UPGRADE: Duration = Duration::from_secs(30);

/// Every live `cluster` watcher whose command line names `pid_file`
/// (its workers run other programs).
fn watchers_on(pid_file: &Path) -> Vec<u32> {
    let needle = pid_file.as_os_str().as_encoded_bytes();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|&b| b == 0);
        let is_cluster = args
            .next()
            .is_some_and(|a0| a0.ends_with(b"cluster") || a0.ends_with(b"cluster-link"));
        if is_cluster && args.any(|a| a == needle) && alive(pid) {
            out.push(pid);
        }
    }
    out.sort();
    out
}

/// The pid in `pid_file`, if it holds one.
fn pid_in(pid_file: &Path) -> Option<u32> {
    std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Kills every watcher on a pid file, and their workers, when dropped:
/// the new watchers of upgrades are not the test's descendants.
struct Watchers(PathBuf);

impl Drop for Watchers {
    fn drop(&mut self) {
        for pid in watchers_on(&self.0) {
            let kids = descendants(pid);
            signal(pid, Signal::SIGKILL);
            for k in kids {
                signal(k, Signal::SIGKILL);
            }
        }
    }
}

/// `cluster status --json` of whatever watcher answers on `pid_file`.
fn status_json(pid_file: &Path) -> Option<serde_json::Value> {
    let out = control(pid_file, &["status", "--json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Waits until the watcher in `pid_file` answers status with `n` ready
/// workers; returns its status.
fn wait_ready(pid_file: &Path, n: usize, what: &str) -> serde_json::Value {
    wait_for(START, || {
        status_json(pid_file).filter(|v| {
            let w = v["workers"].as_array().cloned().unwrap_or_default();
            w.len() == n && w.iter().all(|w| w["state"] == "ready")
        })
    })
    .unwrap_or_else(|| panic!("{what}: never {n} ready workers"))
}

/// A wrk run in the background, stopped with SIGINT (wrk then prints its
/// summary); killed when dropped.
struct Wrk {
    child: Option<Child>,
    out: PathBuf,
    label: &'static str,
}

/// What a wrk run counted.
#[derive(Debug)]
struct WrkResult {
    requests: u64,
    /// connect + read + write + timeout.
    socket_errors: u64,
    non_2xx: u64,
    text: String,
}

impl Wrk {
    fn start(port: u16, dir: &Path, label: &'static str, header: Option<&str>) -> Wrk {
        let out = dir.join(format!("wrk-{label}.out"));
        let file = std::fs::File::create(&out).unwrap();
        let mut cmd = Command::new("wrk");
        cmd.args(["-t1", "-c4", "-d300s", "--timeout", "5s"]);
        if let Some(h) = header {
            cmd.args(["-H", h]);
        }
        let child = cmd
            .arg(format!("http://127.0.0.1:{port}/"))
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("wrk is needed for this test (Debian: apt-get install wrk)");
        Wrk {
            child: Some(child),
            out,
            label,
        }
    }

    /// Stops wrk and parses its summary.
    fn finish(mut self) -> WrkResult {
        let mut child = self.child.take().expect("running");
        signal(child.id(), Signal::SIGINT);
        let status = wait_for(Duration::from_secs(10), || child.try_wait().ok().flatten());
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("wrk ({}) did not stop on SIGINT", self.label);
        }
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let number_after = |key: &str| -> Option<u64> {
            let at = text.find(key)? + key.len();
            text[at..]
                .trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        let requests = text
            .lines()
            .find(|l| l.contains(" requests in "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no request count in wrk's output:\n{text}"));
        let socket_errors = ["connect", "read", "write", "timeout"]
            .iter()
            .filter_map(|k| {
                let line = text.lines().find(|l| l.contains("Socket errors:"))?;
                let at = line.find(k)? + k.len();
                line[at..]
                    .trim_start()
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        WrkResult {
            requests,
            socket_errors,
            non_2xx: number_after("Non-2xx or 3xx responses:").unwrap_or(0),
            text,
        }
    }
}

impl Drop for Wrk {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether `pid` runs the test's `cluster` build (not a stand-in).
fn runs_cluster(pid: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.canonicalize().ok())
        == cluster_bin().canonicalize().ok()
}

#[test]
fn three_upgrades_in_a_row_under_wrk_load_lose_no_request_and_leave_one_watcher() {
    three_upgrades_under_load("shared");
}

#[test]
fn three_upgrades_with_reuseport_listeners_lose_no_request() {
    three_upgrades_under_load("reuseport");
}

#[test]
fn three_upgrades_with_the_watcher_accepting_lose_no_request() {
    three_upgrades_under_load("round-robin");
}

/// Three upgrades (`cluster upgrade`, SIGUSR2, `cluster upgrade`) under
/// two wrk clients, one keep-alive and one `Connection: close`: no failed
/// request, and after each one watcher with two workers.
fn three_upgrades_under_load(balance: &str) {
    let w = watcher()
        .log_level("info")
        .args(["--balance", balance])
        .pid_file();
    let pid_file = w.pid_path();
    let _guard = Watchers(pid_file.clone());
    let (mut c, port) = w.serve_hello(2);
    let first = wait_ready(&pid_file, 2, "at start");
    assert_eq!(first["pid"], c.pid);
    let version = first["watcher_version"]
        .as_str()
        .expect("version")
        .to_string();
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    assert!(first["started_at"].as_str().is_some(), "{first}");

    let keep_alive = Wrk::start(port, c.dir.path(), "keep-alive", None);
    let close = Wrk::start(port, c.dir.path(), "close", Some("Connection: close"));
    std::thread::sleep(Duration::from_millis(500)); // load running

    let mut old = c.pid;
    let mut seen = vec![old];
    for round in 1..=3 {
        let old_workers = descendants(old);
        if round == 2 {
            // SIGUSR2 does what `cluster upgrade` does.
            signal(old, Signal::SIGUSR2);
        } else {
            let out = control(&pid_file, &["upgrade"]);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                out.status.code(),
                Some(0),
                "round {round}: {stdout}{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                c.stderr()
            );
            assert!(stdout.contains(&format!("(was pid {old})")), "{stdout}");
        }
        // The pid file names the new watcher, which answers status.
        let new = wait_for(UPGRADE, || pid_in(&pid_file).filter(|&p| p != old))
            .unwrap_or_else(|| panic!("round {round}: no new watcher:\n{}", c.stderr()));
        assert!(!seen.contains(&new), "round {round}: pid {new} again");
        seen.push(new);
        let status = wait_ready(&pid_file, 2, "after an upgrade");
        assert_eq!(status["pid"], new, "round {round}: {status}");
        assert_eq!(status["watcher_version"], version.as_str());
        assert_ne!(status["started_at"], first["started_at"]);
        // The old watcher and its workers are gone; one watcher is left.
        wait_for(UPGRADE, || (!alive(old)).then_some(()))
            .unwrap_or_else(|| panic!("round {round}: the old watcher {old} still runs"));
        wait_for(START, || {
            old_workers.iter().all(|&p| !alive(p)).then_some(())
        })
        .unwrap_or_else(|| panic!("round {round}: old workers {old_workers:?} still run"));
        assert_eq!(watchers_on(&pid_file), vec![new], "round {round}");
        assert!(runs_cluster(new));
        old = new;
    }
    // The first watcher (the test's child) exited with success.
    let status = c.wait_exit(START).expect("the first watcher exited");
    assert!(status.success(), "{status:?}\n{}", c.stderr());
    std::thread::sleep(Duration::from_millis(500)); // load on the last one
    let (ka, cl) = (keep_alive.finish(), close.finish());
    eprintln!(
        "--balance {balance}: wrk keep-alive {} requests, Connection: close {} requests",
        ka.requests, cl.requests
    );
    for r in [&ka, &cl] {
        assert!(r.requests > 100, "too little load:\n{}", r.text);
        assert_eq!(
            (r.socket_errors, r.non_2xx),
            (0, 0),
            "failed requests:\n{}\n{}",
            r.text,
            c.stderr()
        );
    }
    // The socket and the pid file are the last watcher's, and it stops.
    assert_eq!(watchers_on(&pid_file), vec![old]);
    wait_ready(&pid_file, 2, "at the end");
    let kids = descendants(old);
    assert_eq!(kids.len(), 2, "{kids:?}");
    let out = control(&pid_file, &["stop"]);
    assert!(out.status.success(), "{out:?}");
    wait_for(START, || (!alive(old)).then_some(())).expect("the last watcher stopped");
    assert!(!pid_file.exists());
    assert!(!c.control_socket().exists());
    assert!(kids.iter().all(|&k| !alive(k)));
}

/// A symbolic link to the `cluster` binary in `dir`, to start watchers by,
/// so a test can switch it (as a deploy does) before an upgrade.
fn cluster_link(dir: &Path) -> PathBuf {
    let link = dir.join("cluster-link");
    std::os::unix::fs::symlink(cluster_bin(), &link).unwrap();
    link
}

/// Points `link` at `target`, atomically (rename over it).
fn switch_link(link: &Path, target: &Path) {
    let tmp = link.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

#[test]
fn an_upgrade_to_a_binary_that_exits_at_once_leaves_the_old_watcher_serving() {
    let w = watcher().workers(2).pid_file();
    let pid_file = w.pid_path();
    let _guard = Watchers(pid_file.clone());
    let link = cluster_link(w.dir());
    let broken = w.dir().join("broken");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho 'broken build: cannot start' >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_port();
    let mut c = w
        .binary(&link)
        .start(example("hello_http"), &[&format!("127.0.0.1:{port}")]);
    c.wait_serving(port, START);
    let before = wait_ready(&pid_file, 2, "at start");
    let workers = c.wait_workers(2, START);

    switch_link(&link, &broken);
    let out = control(&pid_file, &["upgrade"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}\n{}", c.stderr());
    assert!(stderr.contains("upgrade failed"), "{stderr}");
    assert!(
        stderr.contains("exited with status 3 before its workers were ready"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("the old watcher (pid {}) keeps serving", c.pid)),
        "{stderr}"
    );
    assert!(c.stderr().contains("broken build: cannot start"));
    // Nothing changed: same watcher, same workers, same pid file.
    assert_eq!(pid_in(&pid_file), Some(c.pid));
    assert_eq!(watchers_on(&pid_file), vec![c.pid]);
    assert_eq!(c.wait_workers(2, START), workers);
    let after = wait_ready(&pid_file, 2, "after the rollback");
    assert_eq!(after["started_at"], before["started_at"]);
    for _ in 0..10 {
        assert_eq!(http_get(port).unwrap().status, 200);
    }

    // Fixed: the next upgrade goes through.
    switch_link(&link, &cluster_bin());
    let out = control(&pid_file, &["upgrade"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", c.stderr());
    let new = pid_in(&pid_file).unwrap();
    assert_ne!(new, c.pid);
    assert_eq!(c.wait_exit(UPGRADE).map(|s| s.success()), Some(true));
    assert_eq!(watchers_on(&pid_file), vec![new]);
    assert_eq!(http_get(port).unwrap().status, 200);
}

#[test]
fn an_upgrade_whose_workers_never_get_ready_rolls_back_after_the_ready_timeout() {
    let port = free_port();
    let w = watcher()
        .workers(2)
        .args(["--ready-timeout", "1", "--shutdown-timeout", "1"])
        .pid_file();
    let pid_file = w.pid_path();
    let _guard = Watchers(pid_file.clone());
    let mark = w.dir().join("hang");
    let mut c = w.env("TEST_HANG_MARK", &mark).start(
        example("test_worker"),
        &["hang", &format!("127.0.0.1:{port}")],
    );
    let workers = c.wait_workers(2, START);
    c.wait_serving(port, START);
    wait_ready(&pid_file, 2, "at start");
    // Workers started from now on listen but never get ready.
    std::fs::write(&mark, "").unwrap();

    let t0 = std::time::Instant::now();
    let out = control(&pid_file, &["upgrade"]);
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}\n{}", c.stderr());
    assert!(stderr.contains("upgrade failed"), "{stderr}");
    assert!(
        stderr.contains("workers were not ready within 1s"),
        "{stderr}"
    );
    assert!(stderr.contains("keeps serving"), "{stderr}");
    assert!(took >= Duration::from_secs(1), "{took:?}");
    // The new watcher and its workers go; the old ones serve on.
    wait_for(UPGRADE, || {
        (watchers_on(&pid_file) == vec![c.pid]).then_some(())
    })
    .unwrap_or_else(|| panic!("the new watcher still runs:\n{}", c.stderr()));
    assert_eq!(c.wait_workers(2, START), workers);
    assert_eq!(pid_in(&pid_file), Some(c.pid));
    let status = wait_ready(&pid_file, 2, "after the rollback");
    assert_eq!(status["pid"], c.pid);
    for _ in 0..10 {
        assert_eq!(http_get(port).unwrap().status, 200);
    }
    // An upgrade that rolled back can be tried again (and fails the same way).
    let out = control(&pid_file, &["upgrade"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn status_names_the_watchers_version_and_start_time() {
    let w = watcher().workers(1).pid_file();
    let pid_file = w.pid_path();
    let (c, _) = w.serve_hello(1);
    let out = control(&pid_file, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!(
            "watcher pid {} (cluster {}, up ",
            c.pid,
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    assert!(first.contains(", started 20"), "{text}");
    let v = status_json(&pid_file).unwrap();
    assert!(v["uptime_secs"].as_f64().is_some_and(|u| u >= 0.0), "{v}");
    let started = v["started_at"].as_str().unwrap();
    assert!(started.ends_with('Z') && started.contains('T'), "{started}");
}

/// `cluster jobs ARGS... --jobs DB --json` as a value.
fn jobs_json(db: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["jobs"];
    all.extend_from_slice(args);
    let db = db.to_str().unwrap();
    all.extend_from_slice(&["--jobs", db, "--json"]);
    let out = cli(&all);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn jobs_running_at_an_upgrade_finish_on_the_old_watcher_and_the_new_one_takes_the_queue() {
    let w = watcher().workers(2).log_level("info").pid_file();
    let pid_file = w.pid_path();
    let _guard = Watchers(pid_file.clone());
    let db = w.dir().join("jobs.db");
    let mut c = w.arg("--jobs").arg(&db).start(example("jobs"), &[]);
    wait_ready(&pid_file, 2, "at start");
    let old_workers = c.wait_workers(2, START);
    let db_s = db.to_str().unwrap();
    for i in 0..6 {
        // Distinct arguments: jobs with the same key never run at once.
        let args = format!(r#"{{"ms": 1000, "n": {i}}}"#);
        let out = cli([
            "jobs", "submit", "--jobs", db_s, "--name", "sleep", "--json", &args,
        ]);
        assert!(out.status.success(), "{out:?}");
    }
    // Two run (one per worker) when the upgrade starts.
    let running = wait_for(START, || {
        let r = jobs_json(&db, &["list", "--state", "running"]);
        let ids: Vec<u64> = r
            .as_array()?
            .iter()
            .filter_map(|j| j["id"].as_u64())
            .collect();
        (ids.len() == 2).then_some(ids)
    })
    .unwrap_or_else(|| {
        panic!(
            "never two jobs running: {}\n{}",
            jobs_json(&db, &["stats"]),
            c.stderr()
        )
    });
    let out = control(&pid_file, &["upgrade"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", c.stderr());
    let done = wait_for(UPGRADE, || {
        let s = jobs_json(&db, &["stats"]);
        (s["done"] == 6).then_some(s)
    })
    .unwrap_or_else(|| panic!("not all jobs done:\n{}", c.stderr()));
    assert_eq!(done["failed"], 0, "{done}");
    let jobs = jobs_json(&db, &["list"]);
    let jobs = jobs.as_array().unwrap();
    let on_old = |j: &serde_json::Value| {
        let w = j["worker"].as_str().unwrap_or("");
        old_workers.iter().any(|p| w.ends_with(&format!("pid {p}")))
    };
    // Each ran once; the two running at the upgrade finished on the old
    // workers, and the new watcher's workers took the queue.
    assert!(jobs.iter().all(|j| j["attempt"] == 1), "{jobs:?}");
    for j in jobs
        .iter()
        .filter(|j| running.contains(&j["id"].as_u64().unwrap()))
    {
        assert!(on_old(j), "{j}");
    }
    assert!(jobs.iter().any(|j| !on_old(j)), "{jobs:?}");
    assert!(c.wait_exit(UPGRADE).is_some_and(|s| s.success()));
    assert_eq!(watchers_on(&pid_file).len(), 1);
}

#[test]
fn python_workers_on_listen_sockets_serve_through_an_upgrade_under_wrk() {
    if !installed("python3") {
        eprintln!("python3 is not installed: skipped");
        return;
    }
    let port = free_port();
    let w = watcher()
        .workers(2)
        .log_level("info")
        .args(["--listen", &format!("127.0.0.1:{port}"), "--notify"])
        .pid_file();
    let pid_file = w.pid_path();
    let _guard = Watchers(pid_file.clone());
    let server = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/python/server.py");
    let mut c = w.start("python3", &[server.to_str().unwrap()]);
    c.wait_workers(2, START);
    c.wait_serving(port, START);
    wait_ready(&pid_file, 2, "at start");
    // wrk counts a read error for every `Connection: close` answer of
    // Python's http.server (it resets the connection), upgrade or not: those
    // clients are the tests' own, which count real failures only.
    let keep_alive = Wrk::start(port, c.dir.path(), "keep-alive", None);
    let load = std::sync::Arc::new(Load::default());
    let closers: Vec<_> = (0..2)
        .map(|_| new_connection_client(port, load.clone()))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let old = c.pid;
    let out = control(&pid_file, &["upgrade"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", c.stderr());
    let new = pid_in(&pid_file).unwrap();
    assert_ne!(new, old);
    assert_eq!(c.wait_exit(UPGRADE).map(|s| s.success()), Some(true));
    // The new workers inherited the same socket as descriptor 3.
    let status = wait_ready(&pid_file, 2, "after the upgrade");
    for w in status["workers"].as_array().unwrap() {
        let pid = w["pid"].as_u64().unwrap();
        let fd3 = std::fs::read_link(format!("/proc/{pid}/fd/3")).unwrap();
        assert!(fd3.to_string_lossy().starts_with("socket:"), "{fd3:?}");
    }
    std::thread::sleep(Duration::from_millis(500));
    let r = keep_alive.finish();
    assert!(r.requests > 50, "too little load:\n{}", r.text);
    assert_eq!(
        (r.socket_errors, r.non_2xx),
        (0, 0),
        "failed requests:\n{}\n{}",
        r.text,
        c.stderr()
    );
    let (ok, failed, errors) = load.finish(closers);
    assert!(ok > 50, "too little load: {ok}");
    assert_eq!(failed, 0, "{errors:?}\n{}", c.stderr());
    assert_eq!(watchers_on(&pid_file), vec![new]);
}

#[test]
fn the_shared_storage_moves_to_the_new_watcher_and_its_file_with_it() {
    let w = watcher().workers(1).pid_file();
    let pid_file = w.pid_path();
    let _guard = Watchers(pid_file.clone());
    let file = w.dir().join("storage.json");
    let (mut c, _) = w.arg("--storage-file").arg(&file).serve_hello(1);
    let storage = |args: &[&str]| {
        let mut all = vec!["storage"];
        all.extend_from_slice(&args[..1]);
        all.extend_from_slice(&["--pid-file", pid_file.to_str().unwrap()]);
        all.extend_from_slice(&args[1..]);
        cli(&all)
    };
    let out = storage(&["set", "before", r#"{"n": 1}"#]);
    assert!(out.status.success(), "{out:?}");
    let out = control(&pid_file, &["upgrade"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", c.stderr());
    assert_eq!(c.wait_exit(UPGRADE).map(|s| s.success()), Some(true));
    // The new watcher answers with the old one's data, and keeps the file.
    let out = storage(&["get", "before"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, serde_json::json!({"n": 1}));
    let out = storage(&["set", "after", "2"]);
    assert!(out.status.success(), "{out:?}");
    let new = pid_in(&pid_file).unwrap();
    let out = control(&pid_file, &["stop"]);
    assert!(out.status.success(), "{out:?}");
    wait_for(START, || (!alive(new)).then_some(())).expect("stopped");
    let snapshot: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(
        snapshot["data"]["before"],
        serde_json::json!({"n": 1}),
        "{snapshot}"
    );
    assert_eq!(snapshot["data"]["after"], 2, "{snapshot}");
}
