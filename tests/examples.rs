//! The examples that the README and examples/README.md point users to, run
//! as users run them.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

#[test]
fn messages_example_collects_a_reply_from_every_worker() {
    let mut child = std::process::Command::new(example("messages"))
        .arg("3")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let status = wait_for(Duration::from_secs(30), || child.try_wait().ok().flatten());
    if status.is_none() {
        for p in descendants(pid) {
            signal(p, Signal::SIGKILL);
        }
        let _ = child.kill();
        panic!("the messages example did not finish");
    }
    assert!(status.unwrap().success());
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    let mut slots: Vec<&str> = out
        .lines()
        .filter(|l| l.ends_with("answered"))
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    slots.sort();
    assert_eq!(slots, ["1", "2", "3"], "{out}");
    // The library watcher stopped its workers before exiting.
    assert!(descendants(pid).is_empty());
}

#[test]
fn logging_example_reaches_the_watchers_stream() {
    let mut c = watcher()
        .workers(2)
        .log_format("json")
        .log_level("info")
        .start(example("logging"), &[]);
    let workers = c.wait_workers(2, Duration::from_secs(15));
    let text = wait_for(Duration::from_secs(15), || {
        let t = c.stderr();
        (t.matches("\"message\":\"tick\"").count() >= 2
            && t.matches("plain stdout line").count() == 2)
            .then_some(t)
    })
    .unwrap_or_else(|| panic!("no ticks and stdout lines:\n{}", c.stderr()));
    for line in text
        .lines()
        .filter(|l| l.contains("\"tick\"") || l.contains("plain stdout"))
    {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(
            workers.contains(&(v["pid"].as_u64().unwrap() as u32)),
            "{line}"
        );
    }
    c.signal(Signal::SIGTERM);
    assert_eq!(
        c.wait_exit(Duration::from_secs(15)).unwrap().code(),
        Some(0)
    );
    assert_eq!(
        c.stderr().matches("\"message\":\"stopping\"").count(),
        2,
        "{}",
        c.stderr()
    );
}

/// The README's avatar walkthrough (pools, a shared pool, a job source and
/// per-job processes), run as written, in a temp dir instead of /tmp/avatars.
#[test]
fn readme_avatar_walkthrough_resizes_every_avatar_once() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("### Walkthrough: avatars")
        .expect("walkthrough section");
    let block = &readme[start..];
    let code_start = block.find("```sh\n").expect("code block") + 6;
    let code_end = code_start + block[code_start..].find("\n```").expect("block end");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("avatars");
    let script = block[code_start..code_end]
        .replace("/tmp/avatars", root.to_str().unwrap())
        .replace("target/release/cluster", cluster_bin().to_str().unwrap())
        .replace("--job-source-interval 1", "--job-source-interval 0.2")
        .replace("sleep 1\n", "sleep 0.2\n");
    // The last command starts the watcher: run it in the background.
    let script = format!(
        "{script} 2> {dir}/watcher.err &\necho $! > {dir}/watcher.pid\nwait\n",
        dir = dir.path().display()
    );
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid_file = dir.path().join("watcher.pid");
    let done = root.join("done");
    let all = wait_for(Duration::from_secs(30), || {
        let n = std::fs::read_dir(&done).map(|d| d.count()).unwrap_or(0);
        (n == 12).then_some(())
    });
    let watcher: Option<u32> = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let stats = std::process::Command::new(cluster_bin())
        .args(["jobs", "stats", "--json", "--jobs"])
        .arg(root.join("jobs.db"))
        .output()
        .unwrap();
    if let Some(w) = watcher {
        for p in descendants(w) {
            signal(p, Signal::SIGKILL);
        }
        signal(w, Signal::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.path().join("watcher.err")).unwrap_or_default();
    assert!(all.is_some(), "not every avatar was resized:\n{log}");
    // The job sources are the watcher's own children: the orphan reaper
    // must neither kill them nor take their exit status.
    assert!(
        !log.contains("left behind") && !log.contains("job source"),
        "{log}"
    );
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["done"], 12, "{stats}");
    assert_eq!(stats["total"], 12, "each avatar was queued once: {stats}");
}
