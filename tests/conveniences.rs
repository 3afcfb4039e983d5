//! Operator conveniences with the real binary: `--config` files and
//! `CLUSTER_*` variables, shell completions and the man page, `cluster
//! logs` and `cluster reopen-logs` for a daemon's log file across a
//! logrotate-style move, and `--on-event` hooks.

mod common;

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(20);

#[test]
fn a_config_file_gives_options_and_the_program_and_cluster_variables_override_it() {
    let w = watcher().pid_file();
    let port = free_port();
    let files = tempfile::tempdir().unwrap();
    let config = files.path().join("cluster.toml");
    std::fs::write(
        &config,
        format!(
            "workers = 2\nshutdown-timeout = 5\nlog_format = \"json\"\nprogram = [\"{}\", \"127.0.0.1:{port}\"]\n",
            example("hello_http").display()
        ),
    )
    .unwrap();
    let mut c = w
        .env("CLUSTER_WORKERS", "3")
        .arg("--config")
        .arg(&config)
        .spawn();
    c.wait_workers(3, T);
    c.wait_serving(port, T);
    assert!(
        c.stderr().lines().any(|l| l.starts_with('{')),
        "log_format from the file: {}",
        c.stderr()
    );
    drop(c);

    // A bad key is a one-line usage error.
    std::fs::write(&config, "wrokers = 2\n").unwrap();
    let (status, _, stderr) = cluster_output(&["--config", config.to_str().unwrap()], T);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("unknown option 'wrokers'"), "{stderr}");
}

#[test]
fn completions_and_man_page_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let out = cli(["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("--max-restarts"), "{shell}: {text}");
    }
    let out = cli(["man"]);
    assert!(out.status.success());
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(man.contains(".TH cluster"), "{man}");
    assert!(man.contains("max\\-restarts"), "options are listed");
    assert_eq!(cli(["completions", "tcsh"]).status.code(), Some(2));
}

/// Kills a daemon and its workers on drop.
struct Daemon(u32);

impl Drop for Daemon {
    fn drop(&mut self) {
        let kids = descendants(self.0);
        signal(self.0, Signal::SIGKILL);
        for k in kids {
            signal(k, Signal::SIGKILL);
        }
    }
}

#[test]
fn cluster_logs_tails_and_follows_a_daemons_log_across_reopen_logs() {
    let port = free_port();
    let w = watcher().inherit_rust_log().arg("--daemon").pid_file();
    let log = w.dir().join("d.log");
    let mut launcher = w.arg("--log-file").arg(&log).workers(1).start(
        example("test_worker"),
        &["serve", &format!("127.0.0.1:{port}")],
    );
    let (status, _, stderr) = launcher.output(T);
    let pid_file = launcher.pid_file().to_path_buf();
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .expect("a pid file");
    let _daemon = Daemon(pid);
    assert!(status.success(), "{stderr}");
    let p = pid_file.to_str().unwrap();
    wait_for(T, || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("is ready"))
    })
    .expect("the daemon logs");

    let out = cli(["logs", "-p", p, "-n", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);

    let mut follow = std::process::Command::new(cluster_bin())
        .args(["logs", "-p", p, "-f", "-n", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut followed = follow.stdout.take().unwrap();
    std::thread::sleep(Duration::from_millis(300));

    // logrotate: move the file, then tell the daemon.
    let moved = log.with_extension("log.1");
    std::fs::rename(&log, &moved).unwrap();
    let out = cli(["reopen-logs", "-p", p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = std::fs::read_to_string(&moved).unwrap();
    assert!(control(&pid_file, &["reload"]).status.success());
    let new = wait_for(T, || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("rolling restart"))
    })
    .expect("new lines go to the new file");
    assert!(new.contains("reopened log file") || new.contains("rolling restart"));
    let after = std::fs::read_to_string(&moved).unwrap();
    assert_eq!(before, after, "nothing more goes to the moved file");
    assert!(!after.contains("rolling restart"));

    // The follower went on with the new file.
    std::thread::sleep(Duration::from_millis(600));
    signal(follow.id(), Signal::SIGKILL);
    let _ = follow.wait();
    let mut text = String::new();
    let _ = followed.read_to_string(&mut text);
    assert!(text.contains("rolling restart"), "followed: {text}");

    // Without --log-file there is nothing to reopen.
    let c = watcher().pid_file().start("/bin/sleep", &["100"]);
    wait_for(T, || c.control(&["status"]).status.success().then_some(())).expect("up");
    let out = c.control(&["reopen-logs"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("writes no log file"));
}

#[test]
fn on_event_runs_a_hook_for_crashes_give_ups_start_and_stop() {
    let w = watcher().pid_file();
    let events = w.dir().join("events.jsonl");
    let names = w.dir().join("names");
    let hook = format!(
        "echo \"$CLUSTER_EVENT\" >> {}; cat >> {}",
        names.display(),
        events.display()
    );
    let mut c = w
        .workers(1)
        .args(["--max-restarts", "1", "--on-event", &hook])
        .start("/bin/false", &[]);
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    wait_for(T, || read(&names).contains("slot_gave_up").then_some(()))
        .unwrap_or_else(|| panic!("no give-up event: {}\n{}", read(&names), c.stderr()));
    c.signal(Signal::SIGTERM);
    let (status, stderr) = c.run_to_end(T);
    assert!(status.success(), "{stderr}");
    let all: Vec<serde_json::Value> = read(&events)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per event"))
        .collect();
    let kinds: Vec<&str> = all.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"watcher_started"), "{kinds:?}");
    assert!(kinds.contains(&"worker_crashed"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"watcher_stopping"), "{kinds:?}");
    let crash = all.iter().find(|e| e["event"] == "worker_crashed").unwrap();
    assert_eq!(crash["slot"], 1);
    assert_eq!(crash["code"], 1, "{crash}");
    let gave_up = all.iter().find(|e| e["event"] == "slot_gave_up").unwrap();
    assert_eq!(gave_up["max_restarts"], 1);
    assert_eq!(
        read(&names).lines().collect::<Vec<_>>(),
        kinds,
        "CLUSTER_EVENT names it"
    );
}
