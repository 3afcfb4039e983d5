//! Logs and messages between real workers and the watcher.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use cluster::ClusterWatcher;
use common::*;

const START: Duration = Duration::from_secs(15);

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

fn records<'a>(lines: &'a [serde_json::Value], message: &str) -> Vec<&'a serde_json::Value> {
    lines
        .iter()
        .filter(|v| v["source"] == "worker" && v["message"] == message)
        .collect()
}

/// `cluster --workers N --log-format F --log-level L test_worker log ARGS...`.
fn log_workers(workers: usize, format: &str, level: &str, args: &[&str]) -> Running {
    let mut worker_args = vec!["log"];
    worker_args.extend_from_slice(args);
    watcher()
        .workers(workers)
        .log_format(format)
        .log_level(level)
        .start(example("test_worker"), &worker_args)
}

#[test]
fn log_level_filters_forwarded_records() {
    let c = log_workers(2, "json", "warn,test_worker=warn", &["3"]);
    wait_for(START, || {
        (c.stderr().matches("\"message\":\"done\"").count() == 2).then_some(())
    })
    .unwrap_or_else(|| panic!("the WARN records did not arrive:\n{}", c.stderr()));
    let text = c.stderr();
    let lines = json_lines(&text);
    // The workers' INFO records and the watcher's own INFO lines are filtered.
    assert!(records(&lines, "record").is_empty(), "{text}");
    assert!(lines.iter().all(|v| v["level"] != "INFO"), "{text}");
}

#[test]
fn records_arrive_tagged_with_slot_and_pid_as_json_lines() {
    let mut c = log_workers(2, "json", "info", &["5"]);
    let text = wait_for(START, || {
        let t = c.stderr();
        (t.matches("\"done\"").count() == 2).then_some(t)
    })
    .unwrap_or_else(|| panic!("no records:\n{}", c.stderr()));
    let lines = json_lines(&text); // every line parses
    let recs = records(&lines, "record");
    assert_eq!(recs.len(), 10, "{text}");
    let mut slots = HashSet::new();
    for r in &recs {
        // The tag the watcher added matches what the worker said of itself.
        // (The fields are typed: numbers stay numbers.)
        assert_eq!(r["slot"], r["fields"]["slot"]);
        assert_eq!(r["pid"], r["fields"]["pid"]);
        assert_eq!(r["level"], "INFO");
        assert_eq!(r["target"], "test_worker");
        assert_eq!(r["spans"][0], "job");
        slots.insert(r["slot"].as_u64().unwrap());
    }
    assert_eq!(slots, HashSet::from([1, 2]));
    let workers: HashSet<u32> = c.wait_workers(2, START).into_iter().collect();
    let pids: HashSet<u32> = recs
        .iter()
        .map(|r| r["pid"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(pids, workers);
    // The watcher's own records are in the same stream.
    assert!(lines.iter().any(|v| v["source"] == "watcher"));
}

#[test]
fn records_logged_while_exiting_still_arrive() {
    let mut c = log_workers(3, "json", "info", &["1"]);
    wait_for(START, || {
        (c.stderr().matches("\"message\":\"done\"").count() == 3).then_some(())
    })
    .expect("workers logged");
    c.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(c.wait_exit(START).unwrap().code(), Some(0));
    let text = c.stderr();
    let lines = json_lines(&text);
    assert_eq!(records(&lines, "bye").len(), 3, "{text}");
}

#[test]
fn text_format_tags_records() {
    let mut c = log_workers(1, "text", "info", &["3"]);
    let pid = c.wait_workers(1, START)[0];
    let text = wait_for(START, || {
        let t = c.stderr();
        t.contains("done").then_some(t)
    })
    .unwrap();
    let line = text.lines().find(|l| l.contains("record")).unwrap();
    assert!(
        line.contains(&format!(
            " INFO [w1 {pid}] job: test_worker: record i=0 slot=1 pid={pid}"
        )),
        "{line}"
    );
}

#[test]
fn hundred_thousand_records_from_four_workers_arrive_complete() {
    let mut c = log_workers(4, "json", "info", &["25000", "40"]);
    // Read the growing output incrementally: re-reading megabytes every
    // 20 ms would dominate the test's time.
    const NEEDLE: &[u8] = b"\"message\":\"done\"";
    let path = c.path("stderr");
    const DROPPED: &[u8] = b"dropped";
    let (mut offset, mut done, mut dropped) = (0usize, 0usize, false);
    let finished = wait_for(Duration::from_secs(120), || {
        let bytes = std::fs::read(&path).unwrap_or_default();
        let end = bytes[offset..]
            .iter()
            .rposition(|&b| b == b'\n')
            .map(|i| offset + i + 1)?;
        for line in bytes[offset..end].split(|&b| b == b'\n') {
            done += line.windows(NEEDLE.len()).any(|w| w == NEEDLE) as usize;
            dropped |= line.windows(DROPPED.len()).any(|w| w == DROPPED);
        }
        offset = end;
        (done == 4 || dropped).then_some(())
    });
    // 4 workers x 2,500 records/s is well within what even a debug-build
    // watcher writes while the other tests run beside it on two cores (the
    // flood tests measure the ceiling); a drop here means records were
    // lost below capacity.
    assert!(
        !dropped,
        "records were dropped:\n{}",
        c.stderr()
            .lines()
            .filter(|l| l.contains("dropped"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        finished.is_some(),
        "workers did not finish: {done} done; output starts:\n{}",
        c.stderr().chars().take(3000).collect::<String>()
    );
    c.signal(nix::sys::signal::Signal::SIGTERM);
    c.wait_exit(START).expect("exit");
    let text = c.stderr();
    assert!(!text.contains("dropped"), "records were dropped");
    let lines = json_lines(&text);
    let recs = records(&lines, "record");
    assert_eq!(recs.len(), 100_000);
    let mut per_slot: HashMap<u64, Vec<u64>> = HashMap::new();
    for r in recs {
        per_slot
            .entry(r["slot"].as_u64().unwrap())
            .or_default()
            .push(r["fields"]["i"].as_u64().unwrap());
    }
    assert_eq!(per_slot.len(), 4);
    for (slot, seq) in per_slot {
        // Complete and in order.
        assert_eq!(seq, (0..25_000).collect::<Vec<u64>>(), "slot {slot}");
    }
}

#[test]
fn a_flood_beyond_capacity_is_counted_and_the_worker_keeps_serving() {
    let port = free_port();
    let mut c = watcher()
        .workers(1)
        .log_format("json")
        .log_level("info")
        .start(
            example("test_worker"),
            &["flood", &format!("127.0.0.1:{port}"), "400000"],
        );
    c.wait_workers(1, START);
    // Requests are answered while the flood runs.
    for _ in 0..20 {
        let r = wait_for(START, || http_get(port).ok()).expect("serving during the flood");
        assert_eq!(r.status, 200);
    }
    let text = wait_for(Duration::from_secs(60), || {
        let t = c.stderr();
        (t.contains("\"flood done\"") || t.contains("dropped by the worker")).then_some(t)
    })
    .expect("flood over");
    let text = wait_for(Duration::from_secs(60), || {
        let t = c.stderr();
        t.contains("dropped by the worker").then_some(t)
    })
    .unwrap_or(text);
    let lines = json_lines(&text);
    let dropped: u64 = lines
        .iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("dropped by the worker"))
        })
        .map(|v| {
            v["message"]
                .as_str()
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert!(
        dropped > 0,
        "a flood of 400,000 records should overflow the queue"
    );
    assert_eq!(http_get(port).unwrap().status, 200);
}

#[test]
fn stdout_and_stderr_lines_arrive_whole() {
    let mut c = watcher()
        .workers(1)
        .log_format("json")
        .start(example("test_worker"), &["print"]);
    c.wait_workers(1, START);
    let complete = |t: &str| t.contains("bad ") && t.contains("err-1999-");
    wait_for(START, || complete(&c.stderr()).then_some(())).expect("lines arrive");
    c.signal(nix::sys::signal::Signal::SIGTERM);
    c.wait_exit(START).expect("exit");
    let lines = json_lines(&c.stderr());
    let of = |source: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|v| v["source"] == source)
            .map(|v| v["message"].as_str().unwrap().to_string())
            .collect()
    };
    let out = of("stdout");
    let err = of("stderr");
    let expected: Vec<String> = (0..2000)
        .map(|i| format!("line-{i}-{}", "0".repeat(100)))
        .collect();
    assert_eq!(out[..2000], expected[..]);
    let long = &out[2000];
    assert!(
        long.starts_with(&"x".repeat(16 * 1024)) && long.ends_with("… [3616 bytes cut]"),
        "{}",
        &long[long.len() - 40..]
    );
    assert_eq!(out[2001], "bad \u{fffd}\u{fffd} utf8");
    let expected: Vec<String> = (0..2000)
        .map(|i| format!("err-{i}-{}", "1".repeat(100)))
        .collect();
    assert_eq!(err[..2000], expected[..]);
    assert_eq!(err[2000], "last line without newline");
}

async fn worker_watcher(n: usize) -> ClusterWatcher {
    let mut cmd = std::process::Command::new(example("test_worker"));
    cmd.arg("messages");
    let watcher = ClusterWatcher::builder(cmd)
        .workers(n)
        .log_output(cluster::LogOutput::stderr(
            cluster::LogFormat::Text,
            cluster::LogFilter::parse("warn").unwrap(),
        ))
        .build()
        .unwrap();
    watcher.start().await.unwrap();
    watcher
}

#[tokio::test(flavor = "current_thread")]
async fn broadcast_reaches_every_worker_and_replies_come_back() {
    let watcher = worker_watcher(3).await;
    let mut messages = watcher.messages();
    // Workers may not have subscribed yet: retry the broadcast until all answer.
    let mut from = HashSet::new();
    let deadline = tokio::time::Instant::now() + START;
    let mut round = 0u64;
    while from.len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replies from {from:?}"
        );
        round += 1;
        watcher.broadcast(&(round, "ping".to_string())).unwrap();
        let wait = tokio::time::sleep(Duration::from_millis(300));
        tokio::pin!(wait);
        loop {
            tokio::select! {
                m = messages.next() => {
                    let m = m.unwrap();
                    let (n, who): (u64, String) = m.decode().unwrap();
                    if n == round {
                        assert_eq!(who, format!("{}:{}", m.worker().slot(), m.worker().pid()));
                        from.insert(m.worker().slot());
                    }
                }
                _ = &mut wait => break,
            }
        }
    }
    // A reply to one worker reaches that worker only.
    let m = loop {
        watcher.broadcast(&(1000u64, "x".to_string())).unwrap();
        let m = messages.next().await.unwrap();
        if m.decode::<(u64, String)>().unwrap().0 == 1000 {
            break m;
        }
    };
    let target = m.worker().clone();
    target.send(&(77u64, "only you".to_string())).unwrap();
    let reply = loop {
        let r = messages.next().await.unwrap();
        if r.decode::<(u64, String)>().unwrap().0 == 77 {
            break r;
        }
    };
    assert_eq!(reply.worker().context_id(), target.context_id());
    watcher.stop(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn messages_keep_their_order_and_oversize_is_refused_on_both_sides() {
    let watcher = worker_watcher(1).await;
    let mut messages = watcher.messages();
    // Oversize on the watcher's side: refused before anything is sent.
    let err = watcher
        .broadcast(&vec![0u8; cluster::MAX_MESSAGE_SIZE + 1])
        .unwrap_err();
    assert!(err.is_too_large(), "{err}");
    // Wait until the worker answers, then ask for a burst.
    const HELLO: u64 = 5_000_000;
    loop {
        watcher.broadcast(&(HELLO, "hello".to_string())).unwrap();
        let got = tokio::time::timeout(Duration::from_millis(300), messages.next()).await;
        if let Ok(Some(m)) = got {
            if m.decode::<(u64, String)>().unwrap().0 == HELLO {
                break;
            }
        }
    }
    watcher.broadcast(&(0u64, "burst".to_string())).unwrap();
    let mut seen = Vec::new();
    while seen.len() < 1000 {
        let m = tokio::time::timeout(START, messages.next())
            .await
            .unwrap_or_else(|_| panic!("{} of 1000 messages, last {:?}", seen.len(), seen.last()))
            .unwrap();
        let (n, _): (u64, String) = m.decode().unwrap();
        if n != HELLO {
            seen.push(n);
        }
    }
    assert_eq!(seen, (1..=1000).collect::<Vec<u64>>());
    // Oversize on the worker's side: an error there, no crash anywhere.
    watcher.broadcast(&(0u64, "oversize".to_string())).unwrap();
    let m = tokio::time::timeout(START, messages.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        m.decode::<(u64, String)>().unwrap(),
        (0, "too large: true".to_string())
    );
    assert_eq!(watcher.workers().await.len(), 1);
    watcher.stop(Duration::from_secs(5)).await.unwrap();
}
