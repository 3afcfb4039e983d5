//! A hostile or broken worker, a hostile local user, and chaos: what they
//! must not be able to do to the watcher, with the real binary and real
//! processes (a raw-protocol worker in Python, shell scripts, hello_http).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

const START: Duration = Duration::from_secs(15);

/// The raw-protocol worker.
fn evil() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/workers/evil_worker.py")
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Processes whose command line is `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.trim_end() == marker && alive(pid) {
            out.push(pid);
        }
    }
    out
}

/// Kills the processes of `marker` when dropped (what a test may leave
/// outside the watcher's tree, re-parented to init).
struct KillOnDrop(String);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for p in processes_with(&self.0) {
            signal(p, Signal::SIGKILL);
        }
    }
}

#[test]
fn a_worker_that_never_reads_its_replies_cannot_exhaust_the_watchers_descriptors() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut c = watcher().workers(2).pid_file().start(
        "python3",
        &[evil().to_str().unwrap(), "flood-requests", "5000", &addr],
    );
    let first = c.wait_workers(2, START);
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        most = most.max(open_fds(c.pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        most < 200,
        "the watcher held {most} descriptors; stderr:\n{}",
        c.stderr()
    );
    let stderr = c.stderr();
    assert!(
        stderr.contains("asked for more than 1024 sockets")
            || stderr.contains("too many socket replies wait to be read"),
        "{stderr}"
    );
    // The watcher still works: it answers and replaces a killed worker.
    // (5: degraded, the flooding worker is being replaced; still an answer.)
    let status = c.control(&["status", "--json"]);
    assert!(matches!(status.status.code(), Some(0 | 5)), "{status:?}");
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    signal(first[1], Signal::SIGKILL);
    wait_for(START, || {
        let now = c.workers();
        (now.len() == 2 && !now.contains(&first[1])).then_some(())
    })
    .unwrap_or_else(|| panic!("slot 2 was not replaced:\n{}", c.stderr()));
}

#[test]
fn a_workers_children_do_not_outlive_a_reload_or_a_stop() {
    let marker = format!("sleep 1000{}", free_port());
    let _cleanup = KillOnDrop(marker.clone());
    // sh forks the sleep (it has a command after it), so the worker is sh
    // and the sleep its child, in the worker's process group; the second
    // sleep escapes into its own session.
    let script = format!("setsid {marker} & {marker}; true");
    let c = watcher()
        .workers(1)
        .pid_file()
        .start("sh", &["-c", &script]);
    let before = wait_for(START, || {
        let p = processes_with(&marker);
        (p.len() == 2).then_some(p)
    })
    .expect("both sleeps run");
    let reload = c.control(&["reload"]);
    assert!(reload.status.success(), "{reload:?}\n{}", c.stderr());
    let gone = wait_for(Duration::from_secs(5), || {
        let now = processes_with(&marker);
        before.iter().all(|p| !now.contains(p)).then_some(())
    });
    assert!(
        gone.is_some(),
        "left behind after reload: {:?}\n{}",
        processes_with(&marker),
        c.stderr()
    );
    let stop = c.control(&["stop"]);
    assert!(stop.status.success(), "{stop:?}");
    let none = wait_for(Duration::from_secs(5), || {
        processes_with(&marker).is_empty().then_some(())
    });
    assert!(
        none.is_some(),
        "left behind after stop: {:?}",
        processes_with(&marker)
    );
}

#[test]
fn what_a_sigkilled_watchers_workers_left_is_killed_at_the_next_start() {
    let marker = format!("sleep 1001{}", free_port());
    let _cleanup = KillOnDrop(marker.clone());
    let script = format!("{marker}; true");
    let w = watcher().workers(2).pid_file();
    let pid_file = w.pid_path();
    let mut c = w.start("sh", &["-c", &script]);
    wait_for(START, || (processes_with(&marker).len() == 2).then_some(())).expect("sleeps run");
    c.signal(Signal::SIGKILL);
    c.wait_exit(START).expect("watcher gone");
    // The workers (sh) die with the watcher; their sleeps are orphans.
    let orphans = wait_for(START, || {
        let p = processes_with(&marker);
        (p.len() == 2).then_some(p)
    })
    .expect("orphaned sleeps");
    let mut again = watcher()
        .workers(1)
        .arg("--pid-file")
        .arg(&pid_file)
        .start("/bin/sleep", &["300"]);
    again.wait_workers(1, START);
    let killed = wait_for(START, || {
        let now = processes_with(&marker);
        orphans.iter().all(|p| !now.contains(p)).then_some(())
    });
    assert!(killed.is_some(), "orphans still run:\n{}", again.stderr());
    assert!(
        again
            .stderr()
            .contains("left running by a previous watcher"),
        "{}",
        again.stderr()
    );
}

#[test]
fn a_stalled_log_reader_cannot_keep_the_watcher_from_exiting() {
    // stderr is a pipe nobody reads: it fills, and the log writer blocks.
    let (read, write) = nix::unistd::pipe().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let child = std::process::Command::new(cluster_bin())
        .args([
            "--workers",
            "2",
            "--shutdown-timeout",
            "2",
            "yes",
            "a log line",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(std::fs::File::from(write)))
        .spawn()
        .unwrap();
    let mut c = Running::adopt(child, dir);
    c.wait_workers(2, START);
    std::thread::sleep(Duration::from_millis(1500));
    let asked = Instant::now();
    c.signal(Signal::SIGTERM);
    let exited = c.wait_exit(Duration::from_secs(15));
    drop(read);
    assert!(
        exited.is_some(),
        "still running {:?} after SIGTERM with a stalled log reader",
        asked.elapsed()
    );
}

#[test]
fn a_pid_file_path_that_is_a_symlink_is_refused_and_its_target_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("precious");
    std::fs::write(&target, "keep me").unwrap();
    let link = dir.path().join("x.pid");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let (status, stderr) = run_to_end(
        &["--pid-file", link.to_str().unwrap(), "/bin/sleep", "100"],
        START,
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("symbolic link"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
}

#[test]
fn the_control_socket_is_private_from_its_first_moment_and_not_stolen() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    // Started with umask 000: the socket must still never be reachable by others.
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000; exec {} --workers 1 --control-socket {} /bin/sleep 300",
            cluster_bin().display(),
            sock.display()
        ))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut c = Running::adopt(child, tempfile::tempdir().unwrap());
    let mode = wait_for(START, || {
        std::fs::symlink_metadata(&sock).ok().map(|m| m.mode())
    })
    .expect("control socket");
    assert_eq!(mode & 0o077, 0, "mode {mode:o}");
    c.wait_workers(1, START);
    // A second watcher on the same socket refuses instead of taking it.
    let (status, stderr) = run_to_end(
        &[
            "--control-socket",
            sock.to_str().unwrap(),
            "/bin/sleep",
            "100",
        ],
        START,
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("another watcher is serving"), "{stderr}");
    let status = cli(["status", "--control-socket", sock.to_str().unwrap()]);
    // 0 healthy, or 5 while its worker is not ready yet: it answers (3 would be no watcher).
    assert!(
        matches!(status.status.code(), Some(0 | 5)),
        "the first watcher still answers: {status:?}"
    );
}

#[test]
fn another_user_gets_permission_denied_from_the_control_socket() {
    if !is_root() {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    if std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: setpriv (util-linux) is not installed");
        return;
    }
    let mut c = watcher()
        .workers(1)
        .pid_file()
        .start("/bin/sleep", &["300"]);
    c.wait_workers(1, START);
    let sock = c.control_socket();
    let as_nobody = |sock: &std::path::Path| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(cluster_bin())
            .args(["status", "--control-socket"])
            .arg(sock)
            .output()
            .unwrap()
    };
    // The file itself refuses (mode 0600) ...
    let out = as_nobody(&sock);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("permission denied"));
    // ... and so does the watcher when the file is opened up: it checks the
    // caller's uid on every connection.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = as_nobody(&sock);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("permission denied: only uid 0"), "{stderr}");
}

#[test]
fn workers_of_another_user_get_only_the_addresses_the_operator_allowed() {
    if !is_root() {
        eprintln!("skipped: needs root for --user");
        return;
    }
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path().join("probe.sock");
    let free = format!("127.0.0.1:{port}");
    let unix = format!("unix://{}", sock.display());
    let c = watcher().workers(1).args(["--user", "nobody"]).start(
        "python3",
        &[
            evil().to_str().unwrap(),
            "distinct",
            "0.0.0.0:23",
            &unix,
            &free,
        ],
    );
    let out = wait_for(START, || {
        let s = c.stderr();
        s.contains("evil: done").then_some(s)
    })
    .unwrap_or_else(|| panic!("no answers:\n{}", c.stderr()));
    assert!(out.contains("evil: refused 0.0.0.0:23"), "{out}");
    assert!(out.contains(&format!("evil: refused {unix}")), "{out}");
    assert!(out.contains(&format!("evil: granted {free}")), "{out}");
    assert!(!sock.exists(), "the socket file was not created");
    drop(c);
    // With --allow-bind, exactly what it names.
    let c = watcher()
        .workers(1)
        .args(["--user", "nobody", "--allow-bind", &unix])
        .start(
            "python3",
            &[evil().to_str().unwrap(), "distinct", &free, &unix],
        );
    let out = wait_for(START, || {
        let s = c.stderr();
        s.contains("evil: done").then_some(s)
    })
    .unwrap_or_else(|| panic!("no answers:\n{}", c.stderr()));
    assert!(out.contains(&format!("evil: refused {free}")), "{out}");
    assert!(out.contains(&format!("evil: granted {unix}")), "{out}");
}

#[test]
fn a_worker_gets_at_most_64_addresses_and_listeners_nobody_uses_are_closed() {
    // 70 distinct ports (free_port can hand out the same one twice).
    let mut ports: Vec<String> = Vec::new();
    while ports.len() < 70 {
        let p = format!("127.0.0.1:{}", free_port());
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("asked");
    let evil_path = evil();
    let mut args: Vec<&str> = vec![
        evil_path.to_str().unwrap(),
        "distinct-once",
        mark.to_str().unwrap(),
    ];
    args.extend(ports.iter().map(String::as_str));
    let mut c = watcher().workers(1).start("python3", &args);
    let out = wait_for(START, || {
        let s = c.stderr();
        s.contains("evil: done").then_some(s)
    })
    .unwrap_or_else(|| panic!("no answers:\n{}", c.stderr()));
    // A port another test took meanwhile is refused as in use and does
    // not count; the rest stop at 64.
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("evil: ")).collect();
    let granted = lines.iter().filter(|l| l.contains("evil: granted")).count();
    let refused = lines.iter().filter(|l| l.contains("evil: refused")).count();
    let capped = lines
        .iter()
        .filter(|l| l.contains("evil: refused") && l.contains("at most 64 addresses"))
        .count();
    let in_use = refused - capped;
    assert_eq!(
        granted,
        64.min(70 - in_use),
        "{granted} granted, {capped} capped, {in_use} in use:\n{out}"
    );
    assert_eq!(granted + capped + in_use, 70, "{out}");
    assert!(capped >= 1, "{out}");
    let with_listeners = open_fds(c.pid);
    // Its replacement asks for the first address only: the other 63
    // listeners are closed once nobody has used them for a while.
    let w = c.wait_workers(1, START)[0];
    signal(w, Signal::SIGKILL);
    let closed = wait_for(Duration::from_secs(20), || {
        let n = open_fds(c.pid);
        (n + 60 <= with_listeners).then_some(n)
    });
    assert!(
        closed.is_some(),
        "descriptors {with_listeners} -> {}:\n{}",
        open_fds(c.pid),
        c.stderr()
    );
    assert!(
        c.stderr().contains("no worker has used it"),
        "{}",
        c.stderr()
    );
    // The one still used keeps working.
    let first = ports[0]
        .strip_prefix("127.0.0.1:")
        .unwrap()
        .parse::<u16>()
        .unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", first)).is_ok());
}

#[test]
fn an_invalid_listen_address_is_a_clean_start_up_error_not_a_crash_loop() {
    let hello = example("hello_http");
    for bad in [":99999", "999.1.1.1:80", "not-an-address"] {
        let started = Instant::now();
        let (status, stderr) = watcher()
            .workers(2)
            .inherit_rust_log()
            .start(&hello, &[bad])
            .run_to_end(START);
        assert_eq!(status.code(), Some(1), "{bad}: {stderr}");
        assert!(
            stderr
                .lines()
                .last()
                .unwrap_or("")
                .starts_with("cluster: error: "),
            "{bad}: {stderr}"
        );
        assert!(
            !stderr.contains("restarting in"),
            "{bad}: crash loop:\n{stderr}"
        );
        assert!(started.elapsed() < Duration::from_secs(10), "{bad}");
    }
}

#[test]
fn an_empty_datagram_is_a_protocol_error_not_silence() {
    let mut c = watcher()
        .workers(1)
        .start("python3", &[evil().to_str().unwrap(), "empty-datagram"]);
    let first = c.wait_workers(1, START)[0];
    let replaced = wait_for(Duration::from_secs(5), || {
        let s = c.stderr();
        s.contains("broke the protocol (empty datagram)")
            .then_some(())
    });
    assert!(replaced.is_some(), "{}", c.stderr());
    assert!(!c.stderr().contains("missed heartbeats"), "{}", c.stderr());
    wait_for(START, || {
        let now = c.workers();
        (now.len() == 1 && now[0] != first).then_some(())
    })
    .expect("replaced");
}

#[test]
fn a_malformed_log_batch_is_a_protocol_error_and_good_ones_arrive() {
    let mut c = watcher()
        .workers(1)
        .start("python3", &[evil().to_str().unwrap(), "bad-logs"]);
    let first = c.wait_workers(1, START)[0];
    let replaced = wait_for(Duration::from_secs(5), || {
        let s = c.stderr();
        s.contains("broke the protocol (malformed message")
            .then_some(())
    });
    assert!(replaced.is_some(), "{}", c.stderr());
    assert!(c.stderr().contains("evil: a good record"), "{}", c.stderr());
    wait_for(START, || {
        let now = c.workers();
        (now.len() == 1 && now[0] != first).then_some(())
    })
    .expect("replaced");
}

#[test]
fn balanced_modes_release_a_replaced_workers_descriptors_without_traffic() {
    let (c, _port) = watcher()
        .pid_file()
        .arg("--balance")
        .arg("round-robin")
        .serve_hello(2);
    let before = open_fds(c.pid);
    for _ in 0..30 {
        let out = c.control(&["reload"]);
        assert!(out.status.success(), "{out:?}");
    }
    let after = wait_for(Duration::from_secs(5), || {
        let n = open_fds(c.pid);
        (n <= before + 2).then_some(n)
    });
    assert!(
        after.is_some(),
        "descriptors {before} -> {} after 30 reloads",
        open_fds(c.pid)
    );
}

/// TCP sockets `pid` holds (its socket descriptors that are not Unix
/// sockets): its connections, plus its listener when it has one.
fn tcp_sockets(pid: u32) -> usize {
    let unix: std::collections::HashSet<String> = std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(6).map(str::to_string))
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|t| {
                    let t = t.to_string_lossy().to_string();
                    Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .filter(|inode| !unix.contains(inode))
                .count()
        })
        .unwrap_or(0)
}

/// Kills a random worker every 200 ms for `secs` under load; returns
/// (requests served, failed, connections the killed workers held, kills,
/// fewest workers seen).
fn chaos(balance: &str, secs: u64) -> (u64, u64, usize, usize, usize) {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    let (mut c, port) = watcher()
        .log_level("warn")
        .arg("--balance")
        .arg(balance)
        .serve_hello(4);
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
    let (mut held, mut kills, mut fewest) = (0, 0, usize::MAX);
    let mut seed = 0x9e3779b97f4a7c15u64 ^ u64::from(port);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut next_kill = Instant::now();
    while Instant::now() < end {
        let workers = c.workers();
        fewest = fewest.min(workers.len());
        if Instant::now() >= next_kill && !workers.is_empty() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let victim = workers[(seed >> 33) as usize % workers.len()];
            // Frozen first, so it takes no connection between the count
            // and the kill. In shared mode one of its TCP sockets is the
            // listener.
            signal(victim, Signal::SIGSTOP);
            let listener = usize::from(balance == "shared");
            held += tcp_sockets(victim).saturating_sub(listener);
            signal(victim, Signal::SIGKILL);
            kills += 1;
            next_kill += Duration::from_millis(200);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (ok, failed, errors) = load.finish(threads);
    if failed > held as u64 {
        eprintln!("{balance}: first errors: {errors:?}");
    }
    (ok, failed, held, kills, fewest)
}

#[test]
fn chaos_kills_cost_no_more_than_the_connections_the_victims_held() {
    for balance in ["shared", "round-robin", "ip-hash"] {
        let (ok, failed, held, kills, fewest) = chaos(balance, 3);
        eprintln!("{balance}: {ok} ok, {failed} failed, {held} held by {kills} victims, fewest workers {fewest}");
        assert!(kills >= 10, "{balance}: {kills} kills");
        assert!(ok > 100, "{balance}: {ok} served");
        assert!(
            failed <= held as u64,
            "{balance}: {failed} failed requests, the victims held {held} connections"
        );
        assert!(fewest >= 1, "{balance}: no worker at some point");
    }
}
