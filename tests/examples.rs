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
