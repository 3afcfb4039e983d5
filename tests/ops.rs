//! Operations with real processes: status details, the metrics endpoint,
//! systemd socket activation and notification, privilege drop, and daemon
//! mode.

mod common;

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

const START: Duration = Duration::from_secs(15);

/// `cluster status --json` without `-q`: CPU is measured for workers the
/// sampler has not seen yet (common's `status_json` asks quickly).
fn status_json(c: &Running) -> Option<serde_json::Value> {
    let out = c.control(&["status", "--json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

#[test]
fn status_shows_memory_cpu_and_the_last_exit() {
    let mut c = watcher()
        .workers(2)
        .pid_file()
        .start(example("test_worker"), &["serve", "127.0.0.1:0"]);
    c.wait_workers(2, START);
    let ready = wait_for(START, || {
        status_json(&c).filter(|v| {
            let w = workers_of(v);
            w.len() == 2 && w.iter().all(|w| w["state"] == "ready")
        })
    })
    .unwrap_or_else(|| panic!("never 2 ready workers:\n{}", c.stderr()));
    let victim = workers_of(&ready)
        .into_iter()
        .find(|w| w["slot"] == 1)
        .expect("slot 1");
    let victim_pid = victim["pid"].as_u64().unwrap() as u32;
    assert!(victim["last_exit"].is_null(), "{victim}");
    signal(victim_pid, Signal::SIGKILL);

    let after = wait_for(START, || {
        status_json(&c).filter(|v| {
            let w = workers_of(v);
            w.len() == 2
                && w.iter().all(|w| w["state"] == "ready")
                && w.iter().any(|w| w["slot"] == 1 && w["pid"] != victim_pid)
        })
    })
    .unwrap_or_else(|| panic!("slot 1 not replaced:\n{}", c.stderr()));
    for w in workers_of(&after) {
        assert!(w["rss_bytes"].as_u64().unwrap() > 0, "{w}");
        assert!(w["cpu_seconds"].as_f64().unwrap() >= 0.0, "{w}");
        let cpu = w["cpu_percent"].as_f64().unwrap();
        assert!((0.0..=200.0).contains(&cpu), "{w}");
        if w["slot"] == 1 {
            assert_eq!(w["last_exit"], "killed by SIGKILL", "{w}");
            assert_eq!(w["restarts"], 1, "{w}");
        } else {
            assert!(w["last_exit"].is_null(), "{w}");
        }
    }
    // The typed client parses it too, and answers without the new fields
    // (an older watcher) still parse.
    let out = c.control(&["status", "--json"]);
    let typed: cluster::control::Response = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(typed.workers.len(), 2);
    assert!(typed.workers.iter().all(|w| w.rss_bytes.is_some()));
    let old: cluster::control::Response = serde_json::from_str(
        r#"{"ok":true,"pid":1,"workers":[{"slot":1,"context_id":1,"pid":2,"state":"ready","uptime_secs":1.0,"restarts":0}]}"#,
    )
    .unwrap();
    assert_eq!(old.workers[0].last_exit, None);

    let out = c.control(&["status"]);
    let table = String::from_utf8_lossy(&out.stdout);
    let header = table
        .lines()
        .find(|l| l.starts_with("SLOT"))
        .unwrap_or_default();
    for column in ["RSS", "CPU%", "LAST EXIT"] {
        assert!(header.contains(column), "{table}");
    }
    assert!(table.contains("killed by SIGKILL"), "{table}");
    // Summary, program and addresses, header, two slots.
    assert_eq!(table.lines().count(), 5, "{table}");
}

/// The value of the sample `series` (name and labels, exactly) in `body`.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn scrape(port: u16) -> Option<String> {
    let r = http_get_path(port, "/metrics").ok()?;
    (r.status == 200).then_some(r.body)
}

#[test]
fn metrics_endpoint_serves_the_series_and_counts_a_crash() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut c = watcher()
        .workers(2)
        .arg("--metrics")
        .arg(&addr)
        .start(example("test_worker"), &["serve", "127.0.0.1:0"]);
    c.wait_workers(2, START);
    let body = wait_for(START, || {
        scrape(port).filter(|b| sample(b, "cluster_workers{state=\"ready\"}") == Some(2.0))
    })
    .unwrap_or_else(|| panic!("no metrics with 2 ready workers:\n{}", c.stderr()));
    let r = http_get_path(port, "/metrics").unwrap();
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        r.headers
    );
    for series in [
        "cluster_workers{state=\"starting\"}",
        "cluster_workers{state=\"stopping\"}",
        "cluster_worker_restarts_total{slot=\"1\"}",
        "cluster_worker_restarts_total{slot=\"2\"}",
        "cluster_worker_crashes_total{slot=\"1\"}",
        "cluster_reloads_total{result=\"ok\"}",
        "cluster_reloads_total{result=\"failed\"}",
        "cluster_log_records_total",
        "cluster_log_records_dropped_total",
        "cluster_messages_total{direction=\"in\"}",
        "cluster_messages_total{direction=\"out\"}",
    ] {
        assert!(sample(&body, series).is_some(), "{series} missing:\n{body}");
    }
    for family in [
        "cluster_workers",
        "cluster_worker_restarts_total",
        "cluster_worker_rss_bytes",
        "cluster_worker_cpu_seconds_total",
    ] {
        assert!(body.contains(&format!("# TYPE {family} ")), "{body}");
    }
    // Memory and CPU of every worker, labelled with slot and pid.
    let mut slot_of = HashMap::new();
    for pid in c.workers() {
        let line = body
            .lines()
            .find(|l| {
                l.starts_with("cluster_worker_rss_bytes{") && l.contains(&format!("pid=\"{pid}\""))
            })
            .unwrap_or_else(|| panic!("no rss for {pid}:\n{body}"));
        let slot: u32 = line
            .split("slot=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .and_then(|s| s.parse().ok())
            .unwrap();
        assert!(
            sample(
                &body,
                &format!("cluster_worker_rss_bytes{{slot=\"{slot}\",pid=\"{pid}\"}}")
            )
            .unwrap()
                > 0.0
        );
        assert!(sample(
            &body,
            &format!("cluster_worker_cpu_seconds_total{{slot=\"{slot}\",pid=\"{pid}\"}}")
        )
        .is_some());
        slot_of.insert(pid, slot);
    }
    assert_eq!(
        sample(&body, "cluster_worker_crashes_total{slot=\"1\"}"),
        Some(0.0)
    );

    // A crash moves the slot's counters.
    let (&victim, &slot) = slot_of.iter().next().unwrap();
    signal(victim, Signal::SIGKILL);
    let restarts = format!("cluster_worker_restarts_total{{slot=\"{slot}\"}}");
    let crashes = format!("cluster_worker_crashes_total{{slot=\"{slot}\"}}");
    let after = wait_for(START, || {
        scrape(port).filter(|b| {
            sample(b, &restarts) == Some(1.0)
                && sample(b, "cluster_workers{state=\"ready\"}") == Some(2.0)
        })
    })
    .unwrap_or_else(|| panic!("restart not counted:\n{}", c.stderr()));
    assert_eq!(sample(&after, &crashes), Some(1.0), "{after}");
    assert!(!after.contains(&format!("pid=\"{victim}\"")), "{after}");

    // Only /metrics is served.
    assert_eq!(http_get_path(port, "/").unwrap().status, 404);
}

#[test]
fn metrics_address_in_use_is_a_start_up_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (status, _, stderr) = watcher()
        .inherit_rust_log()
        .arg("--metrics")
        .arg(&addr)
        .start(example("test_worker"), &["serve", "127.0.0.1:0"])
        .output(START);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.trim().lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with(&format!("cluster: error: cannot serve metrics on {addr}: ")),
        "{stderr}"
    );
}

#[test]
fn socket_activation_serves_from_the_adopted_socket() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;

    // The "service manager": binds, then passes the socket as fd 3.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let raw = listener.as_raw_fd();
    let dir = tempfile::tempdir().unwrap();
    let worker = example("test_worker");
    let mut cmd = Command::new("/bin/sh");
    // LISTEN_PID must be the pid of the process that reads it: sh execs
    // cluster, which keeps the pid.
    cmd.arg("-c")
        .arg("export LISTEN_PID=$$; exec \"$0\" \"$@\"")
        .arg(cluster_bin())
        .args([
            "--workers",
            "2",
            worker.to_str().unwrap(),
            "serve",
            &format!("127.0.0.1:{port}"),
        ])
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "web")
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap());
    // SAFETY: runs in the forked child before exec and only makes the
    // async-signal-safe calls dup2 and fcntl on descriptor numbers (the
    // listener stays open in the parent for the whole test).
    unsafe {
        cmd.pre_exec(move || {
            if raw == 3 {
                let flags = libc::fcntl(3, libc::F_GETFD);
                if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    let mut c = Running::adopt(child, dir);
    let workers = c.wait_workers(2, START);
    // The test still holds the port bound and listening: nothing could bind
    // it again, so workers answering means they got the adopted socket.
    let r = wait_for(START, || http_get(port).ok())
        .unwrap_or_else(|| panic!("not serving:\n{}", c.stderr()));
    assert_eq!(r.status, 200);
    // The log stream is written by its own thread: wait for the line.
    let adopted = format!("socket activation: adopted fd 3 (web) listening on 127.0.0.1:{port}");
    wait_for(START, || c.stderr().contains(&adopted).then_some(()))
        .unwrap_or_else(|| panic!("no {adopted:?} in:\n{}", c.stderr()));
    // The watcher marked it close-on-exec; workers do not see LISTEN_*.
    let fdinfo = std::fs::read_to_string(format!("/proc/{}/fdinfo/3", c.pid)).unwrap();
    let flags = fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .unwrap();
    assert_ne!(flags & libc::O_CLOEXEC as u32, 0, "{fdinfo}");
    for pid in workers {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let environ = String::from_utf8_lossy(&environ);
        for var in ["LISTEN_PID=", "LISTEN_FDS=", "LISTEN_FDNAMES="] {
            assert!(
                !environ.split('\0').any(|e| e.starts_with(var)),
                "worker {pid} has {var}"
            );
        }
    }
}

/// Collects every datagram sent to a notify socket, in a thread.
struct NotifyListener {
    messages: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NotifyListener {
    fn bind(path: &Path) -> NotifyListener {
        let sock = UnixDatagram::bind(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (messages.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while !s.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    m.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
        });
        NotifyListener {
            messages,
            stop,
            thread: Some(thread),
        }
    }

    fn all(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }

    /// The state changes so far (READY, RELOADING, STOPPING), in order.
    fn states(&self) -> Vec<String> {
        self.all()
            .iter()
            .flat_map(|m| m.lines().map(str::to_string).collect::<Vec<_>>())
            .filter(|l| ["READY=1", "RELOADING=1", "STOPPING=1"].contains(&l.as_str()))
            .collect()
    }
}

impl Drop for NotifyListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn sd_notify_reports_ready_reloading_and_stopping() {
    let notify_dir = tempfile::tempdir().unwrap();
    let notify_path = notify_dir.path().join("notify");
    let notify = NotifyListener::bind(&notify_path);
    let mut c = watcher()
        .workers(2)
        .pid_file()
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "400000")
        .start(example("test_worker"), &["serve", "127.0.0.1:0"]);
    wait_for(START, || (notify.states() == ["READY=1"]).then_some(()))
        .unwrap_or_else(|| panic!("no READY=1: {:?}\n{}", notify.all(), c.stderr()));
    // READY=1 came once both workers were ready, from the watcher itself.
    let v = status_json(&c).expect("status");
    let w = workers_of(&v);
    assert!(
        w.len() == 2 && w.iter().all(|w| w["state"] == "ready"),
        "{v}"
    );
    let ready = notify
        .all()
        .into_iter()
        .find(|m| m.contains("READY=1"))
        .unwrap();
    assert!(ready.contains(&format!("MAINPID={}\n", c.pid)), "{ready}");
    assert!(ready.contains("STATUS=2 worker(s) ready"), "{ready}");

    let out = c.control(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    wait_for(START, || {
        (notify.states() == ["READY=1", "RELOADING=1", "READY=1"]).then_some(())
    })
    .unwrap_or_else(|| panic!("reload not notified: {:?}", notify.all()));
    let reloading = notify
        .all()
        .into_iter()
        .find(|m| m.contains("RELOADING=1"))
        .unwrap();
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC: {reloading:?}"));
    assert!(usec > 0);

    c.signal(Signal::SIGTERM);
    assert_eq!(c.wait_exit(START).and_then(|s| s.code()), Some(0));
    wait_for(START, || {
        (notify.states() == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]).then_some(())
    })
    .unwrap_or_else(|| panic!("stop not notified: {:?}", notify.all()));
    // The watchdog was kept fed (every 200 ms here).
    assert!(
        notify.all().iter().any(|m| m == "WATCHDOG=1\n"),
        "{:?}",
        notify.all()
    );
}

#[test]
fn workers_run_as_the_given_user_without_supplementary_groups() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: privilege drop needs the tests to run as root");
        return;
    }
    let Some(nobody) = nix::unistd::User::from_name("nobody").ok().flatten() else {
        eprintln!("skipped: no user 'nobody' on this machine");
        return;
    };
    // A copy of the worker program that 'nobody' can reach and run.
    use std::os::unix::fs::PermissionsExt;
    let bin_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let program = bin_dir.path().join("test_worker");
    std::fs::copy(example("test_worker"), &program).unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();

    let port = free_port();
    let mut c = watcher()
        .workers(2)
        .args(["--user", "nobody"])
        .start(&program, &["serve", &format!("127.0.0.1:{port}")]);
    let workers = c.wait_workers(2, START);
    let r = c.wait_serving(port, START);
    assert_eq!(r.status, 200);
    let field = |pid: u32, name: &str| -> Vec<String> {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.to_string()))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let (uid, gid) = (nobody.uid.to_string(), nobody.gid.to_string());
    for pid in workers {
        assert_eq!(field(pid, "Uid:"), [uid.as_str(); 4], "worker {pid}");
        assert_eq!(field(pid, "Gid:"), [gid.as_str(); 4], "worker {pid}");
        assert!(field(pid, "Groups:").is_empty(), "worker {pid}");
    }
    // The watcher keeps root (to bind, and for the control socket).
    assert_eq!(field(c.pid, "Uid:")[0], "0");

    let (status, _, stderr) = watcher()
        .inherit_rust_log()
        .args(["--user", "no-such-user-for-cluster-tests"])
        .start(&program, &["serve"])
        .output(START);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "cluster: error: no such user: no-such-user-for-cluster-tests"
    );
}

/// Kills a daemon (and its workers) that a test started, even on failure.
struct DaemonGuard(Option<u32>);

impl DaemonGuard {
    /// Guards the daemon whose pid `pid_file` holds, if it holds one.
    fn of(pid_file: &Path) -> DaemonGuard {
        DaemonGuard(
            std::fs::read_to_string(pid_file)
                .ok()
                .and_then(|s| s.trim().parse().ok()),
        )
    }
}

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let kids = descendants(pid);
            if alive(pid) {
                signal(pid, Signal::SIGKILL);
            }
            for k in kids {
                signal(k, Signal::SIGKILL);
            }
        }
    }
}

#[test]
fn daemon_detaches_serves_and_stops() {
    let port = free_port();
    let w = watcher().inherit_rust_log().arg("--daemon").pid_file();
    let log_file = w.dir().join("d.log");
    let mut launcher = w.arg("--log-file").arg(&log_file).workers(2).start(
        example("test_worker"),
        &["serve", &format!("127.0.0.1:{port}")],
    );
    let (status, stdout, stderr) = launcher.output(Duration::from_secs(30));
    let pid_file = launcher.pid_file();
    // Before anything can fail, make sure the daemon gets killed.
    let guard = DaemonGuard::of(pid_file);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(stderr, "");
    let pid = guard
        .0
        .expect("pid file written before the launcher returned");
    assert!(alive(pid));
    // Detached: not a session leader of its own, stdin from /dev/null.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let (ppid, session): (u32, u32) = (fields[1].parse().unwrap(), fields[3].parse().unwrap());
    assert_ne!(ppid, std::process::id());
    assert_ne!(session, pid);
    assert_ne!(
        session,
        nix::unistd::getsid(None).unwrap().as_raw() as u32,
        "still in the test's session"
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap(),
        Path::new("/dev/null")
    );

    let r = wait_for(START, || http_get(port).ok()).expect("the daemon serves");
    assert_eq!(r.status, 200);
    // One worker serving is not all ready: status exits 5 until they are.
    let out = wait_for(START, || {
        let out = launcher.control(&["status"]);
        (out.status.code() == Some(0)).then_some(out)
    })
    .expect("status exits 0 once every worker is ready");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("watcher pid {pid}")));

    let out = launcher.control(&["stop"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!alive(pid));
    wait_for(START, || (!pid_file.exists()).then_some(())).expect("pid file removed");
    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(
        log.contains("is ready") && log.contains("all workers stopped"),
        "{log}"
    );
}

#[test]
fn daemon_start_up_errors_reach_the_launcher() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let worker = example("test_worker");
    let mut launcher = watcher()
        .inherit_rust_log()
        .arg("--daemon")
        .pid_file()
        .start(&worker, &["serve", &addr]);
    let (status, _, stderr) = launcher.output(Duration::from_secs(30));
    let pid_file = launcher.pid_file();
    let _guard = DaemonGuard::of(pid_file);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.trim().lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with(&format!("cluster: error: cannot listen on {addr}: ")),
        "{stderr}"
    );
    // The daemon is gone and cleaned up.
    wait_for(START, || (!pid_file.exists()).then_some(())).expect("pid file removed");

    // --daemon without a pid file is refused at once.
    let (status, _, stderr) = watcher()
        .inherit_rust_log()
        .arg("--daemon")
        .start(&worker, &["serve", &addr])
        .output(START);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--daemon needs --pid-file"), "{stderr}");
}
