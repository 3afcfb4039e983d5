//! Many watchers as nodes of one PostgreSQL job store, with the real
//! binary, real workers (`examples/jobs`) and a real server (see
//! `common/pg.rs`): jobs spread over the nodes and run once; a node killed
//! mid-run has its jobs finished by the others; a node that stops and
//! comes back cannot overwrite the newer attempt; safe mode holds across
//! nodes; a node that joins takes a share; the database restarts under
//! the nodes; bad stores at start are one line.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cluster::{Job, JobId, JobQueue, JobState, ListFilter, NewJob, NodeState};
use common::*;
use nix::sys::signal::Signal;
use serde_json::json;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A watcher as node `name` on `url`: `workers` persistent workers of
/// `examples/jobs`, tracing into `<dir>/trace`, a 2 s node timeout.
fn node(url: &str, name: &str, workers: usize, extra: &[&str]) -> (Running, PathBuf) {
    let w = watcher().workers(workers);
    let trace = w.dir().join("trace");
    let timeout: &[&str] = if extra.contains(&"--node-timeout") {
        &[]
    } else {
        &["--node-timeout", "2"]
    };
    let c = w
        .args(["--jobs", url, "--node", name])
        .args(timeout)
        .args(extra)
        .env("JOBS_TRACE", &trace)
        .start(example("jobs"), &[]);
    (c, trace)
}

/// Waits until `n` nodes are alive (so their queues are registered).
fn wait_alive(url: &str, n: usize, nodes: &[&Running]) {
    let ok = wait_for(Duration::from_secs(20), || {
        let alive = rt().block_on(async {
            let q = JobQueue::open(url).await.ok()?;
            let nodes = q.nodes().await.ok()?;
            Some(nodes.iter().filter(|n| n.state == NodeState::Alive).count())
        });
        (alive == Some(n)).then_some(())
    });
    if ok.is_none() {
        for r in nodes {
            eprintln!("stderr of a node:\n{}", r.stderr());
        }
        panic!("{n} nodes did not come up");
    }
}

fn sleep_jobs(n: usize, ms: u64) -> Vec<NewJob> {
    (0..n)
        .map(|i| NewJob::new(json!({"ms": ms, "i": i})).name("sleep"))
        .collect()
}

fn submit(url: &str, jobs: Vec<NewJob>) -> Vec<JobId> {
    rt().block_on(async {
        JobQueue::open(url)
            .await
            .unwrap()
            .submit_many(jobs)
            .await
            .unwrap()
    })
}

/// Waits until every job of the store is finished; returns them all.
fn wait_finished(url: &str, total: usize, timeout: Duration, nodes: &[&Running]) -> Vec<Job> {
    let deadline = Instant::now() + timeout;
    loop {
        let jobs = rt().block_on(async {
            let q = JobQueue::open(url).await.unwrap();
            q.list(ListFilter::new().limit(100_000)).await.unwrap()
        });
        if jobs.len() == total && jobs.iter().all(|j| j.state.is_finished()) {
            return jobs;
        }
        if Instant::now() > deadline {
            let left = jobs.iter().filter(|j| !j.state.is_finished()).count();
            for r in nodes {
                eprintln!("stderr of a node (tail):\n{}", tail(&r.stderr(), 30));
            }
            panic!("{left} of {total} jobs not finished after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `start` lines of a trace: (job id, attempt, micros).
fn starts(trace: &Path) -> Vec<(i64, u32, u128)> {
    lines(trace, "start")
}

fn lines(trace: &Path, what: &str) -> Vec<(i64, u32, u128)> {
    std::fs::read_to_string(trace)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 7 && f[0] == what).then(|| {
                (
                    f[1].parse().unwrap_or(0),
                    f[2].parse().unwrap_or(0),
                    f[6].parse().unwrap_or(0),
                )
            })
        })
        .collect()
}

#[test]
fn two_nodes_share_1000_jobs_and_run_each_exactly_once() {
    let Some(url) = pg::fresh_url() else { return };
    // Both start at once on a fresh schema: the migration is serialized.
    let (a, ta) = node(&url, "a", 2, &["--job-concurrency", "8"]);
    let (b, tb) = node(&url, "b", 2, &["--job-concurrency", "8"]);
    wait_alive(&url, 2, &[&a, &b]);
    submit(&url, sleep_jobs(1000, 5));
    let jobs = wait_finished(&url, 1000, Duration::from_secs(60), &[&a, &b]);
    assert!(jobs
        .iter()
        .all(|j| j.state == JobState::Done && j.attempt == 1));
    let (sa, sb) = (starts(&ta), starts(&tb));
    let mut count: HashMap<i64, usize> = HashMap::new();
    for (id, _, _) in sa.iter().chain(&sb) {
        *count.entry(*id).or_default() += 1;
    }
    assert_eq!(count.len(), 1000, "every job started");
    assert!(count.values().all(|&n| n == 1), "no job started twice");
    assert!(
        sa.len() >= 100 && sb.len() >= 100,
        "both took a share: {} {}",
        sa.len(),
        sb.len()
    );
    // The store, the trace and the handler agree on who ran each job.
    let on_a: HashSet<i64> = sa.iter().map(|s| s.0).collect();
    for j in &jobs {
        let expect = if on_a.contains(&j.id.get()) { "a" } else { "b" };
        assert_eq!(j.node.as_deref(), Some(expect));
        assert_eq!(j.result.as_ref().unwrap()["node"], json!(expect));
    }
}

#[test]
fn a_killed_node_s_jobs_are_finished_by_the_others() {
    let Some(url) = pg::fresh_url() else { return };
    let (a, ta) = node(&url, "a", 2, &[]);
    let (b, tb) = node(&url, "b", 2, &[]);
    let (c, tc) = node(&url, "c", 2, &[]);
    wait_alive(&url, 3, &[&a, &b, &c]);
    submit(&url, sleep_jobs(60, 400));
    // Kill c once it runs jobs.
    wait_for(Duration::from_secs(20), || {
        (starts(&tc).len() >= 2).then_some(())
    })
    .expect("node c started jobs");
    c.signal(Signal::SIGKILL);
    let killed = Instant::now();
    let jobs = wait_finished(&url, 60, Duration::from_secs(40), &[&a, &b]);
    let took = killed.elapsed();
    assert!(jobs.iter().all(|j| j.state == JobState::Done), "none lost");
    // Duplicates only of jobs that were running on c: their first attempt
    // failed with "node c lost" and the second ran elsewhere.
    let ran_on_c: HashSet<i64> = starts(&tc).iter().map(|s| s.0).collect();
    let mut count: HashMap<i64, usize> = HashMap::new();
    for (id, _, _) in starts(&ta).iter().chain(&starts(&tb)).chain(&starts(&tc)) {
        *count.entry(*id).or_default() += 1;
    }
    let mut rescued = 0;
    for j in &jobs {
        if j.attempt > 1 {
            rescued += 1;
            assert!(ran_on_c.contains(&j.id.get()), "job {} ran twice", j.id);
            assert_eq!(j.errors[0].error, "node c lost");
            assert_ne!(j.node.as_deref(), Some("c"));
        } else {
            assert_eq!(count[&j.id.get()], 1, "job {} ran twice", j.id);
        }
    }
    assert!(rescued >= 1, "c's running jobs were rescued");
    // 2 s node timeout, a heartbeat period, and the jobs' own run time.
    assert!(
        took < Duration::from_secs(25),
        "finished {took:?} after the kill"
    );
    let nodes = rt().block_on(async { JobQueue::open(&url).await.unwrap().nodes().await.unwrap() });
    let c_row = nodes.iter().find(|n| n.name == "c").unwrap();
    assert_eq!(c_row.state, NodeState::Dead);
    assert_eq!(c_row.running, 0);
}

#[test]
fn a_stopped_node_that_comes_back_cannot_overwrite_the_newer_attempt() {
    let Some(url) = pg::fresh_url() else { return };
    let (a, ta) = node(&url, "a", 1, &[]);
    wait_alive(&url, 1, &[&a]);
    let ids = submit(&url, sleep_jobs(1, 3000));
    wait_for(Duration::from_secs(20), || {
        (!starts(&ta).is_empty()).then_some(())
    })
    .expect("a started the job");
    a.signal(Signal::SIGSTOP);
    let (b, tb) = node(&url, "b", 1, &[]);
    // b declares a dead (2 s) and runs attempt 2.
    let started_b = wait_for(Duration::from_secs(20), || {
        starts(&tb).iter().find(|s| s.1 == 2).copied()
    });
    a.signal(Signal::SIGCONT);
    assert!(
        started_b.is_some(),
        "b ran attempt 2; b's log:\n{}",
        b.stderr()
    );
    // a's worker finishes attempt 1 first (it started 2 s earlier).
    let job = rt().block_on(async {
        let q = JobQueue::open(&url).await.unwrap();
        q.wait(ids[0], Duration::from_secs(20)).await.unwrap()
    });
    assert!(
        lines(&ta, "end").iter().any(|e| e.1 == 1),
        "a finished its stale attempt"
    );
    assert_eq!(job.state, JobState::Done);
    assert_eq!(job.attempt, 2);
    assert_eq!(job.node.as_deref(), Some("b"), "attempt 2's outcome stands");
    assert_eq!(job.result.as_ref().unwrap()["node"], json!("b"));
    assert_eq!(job.errors.len(), 1);
    assert_eq!(job.errors[0].error, "node a lost");
    // a learns it was declared dead and runs on as a live node.
    let back = wait_for(Duration::from_secs(10), || {
        a.stderr()
            .contains("node a was declared dead")
            .then_some(())
    });
    assert!(back.is_some(), "a's log:\n{}", a.stderr());
    wait_alive(&url, 2, &[&a, &b]);
}

#[test]
fn safe_mode_holds_across_nodes() {
    let Some(url) = pg::fresh_url() else { return };
    let (a, ta) = node(&url, "a", 3, &[]);
    let (b, tb) = node(&url, "b", 3, &[]);
    wait_alive(&url, 2, &[&a, &b]);
    let jobs = (0..40)
        .map(|i| {
            NewJob::new(json!({"ms": 60, "i": i}))
                .name("sleep")
                .key(format!("k{}", i % 4))
        })
        .collect();
    let ids = submit(&url, jobs);
    let done = wait_finished(&url, 40, Duration::from_secs(60), &[&a, &b]);
    assert!(done.iter().all(|j| j.state == JobState::Done));
    let key: HashMap<i64, String> = done.iter().map(|j| (j.id.get(), j.key.clone())).collect();
    // Intervals per key, from both nodes' traces, never overlap.
    let mut by_key: HashMap<String, Vec<(u128, u128)>> = HashMap::new();
    for t in [&ta, &tb] {
        let ends: HashMap<i64, u128> = lines(t, "end").iter().map(|e| (e.0, e.2)).collect();
        for (id, _, start) in starts(t) {
            by_key
                .entry(key[&id].clone())
                .or_default()
                .push((start, ends[&id]));
        }
    }
    for (k, mut spans) in by_key {
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "two jobs with key {k} ran at once: {w:?}");
        }
    }
    assert_eq!(ids.len(), 40);
    let both = starts(&ta).len().min(starts(&tb).len());
    assert!(both > 0, "both nodes ran some");
}

#[test]
fn a_node_joining_mid_run_takes_a_share() {
    let Some(url) = pg::fresh_url() else { return };
    let (a, ta) = node(&url, "a", 2, &[]);
    wait_alive(&url, 1, &[&a]);
    submit(&url, sleep_jobs(200, 40));
    wait_for(Duration::from_secs(20), || {
        (starts(&ta).len() >= 10).then_some(())
    })
    .expect("a runs jobs");
    let (b, tb) = node(&url, "b", 2, &[]);
    let jobs = wait_finished(&url, 200, Duration::from_secs(60), &[&a, &b]);
    assert!(jobs
        .iter()
        .all(|j| j.state == JobState::Done && j.attempt == 1));
    let (na, nb) = (starts(&ta).len(), starts(&tb).len());
    assert_eq!(na + nb, 200, "each once");
    assert!(nb >= 40, "b took a share: a {na}, b {nb}");
}

#[test]
fn the_database_restarting_under_running_nodes_loses_nothing() {
    let Some(server) = pg::Server::start() else {
        eprintln!("SKIPPED: no PostgreSQL binaries for a server of this test's own");
        return;
    };
    let url = pg::with_fresh_schema(&server.url);
    // A node timeout longer than the outage: nobody is declared dead.
    let extra = ["--node-timeout", "20"];
    let (a, ta) = node(&url, "a", 2, &extra);
    let (b, tb) = node(&url, "b", 2, &extra);
    wait_alive(&url, 2, &[&a, &b]);
    submit(&url, sleep_jobs(150, 30));
    wait_for(Duration::from_secs(20), || {
        (starts(&ta).len() + starts(&tb).len() >= 20).then_some(())
    })
    .expect("jobs run");
    server.stop();
    std::thread::sleep(Duration::from_secs(2));
    server.start_again();
    // More jobs after the restart: the listeners reconnected.
    submit(&url, sleep_jobs(50, 1));
    let jobs = wait_finished(&url, 200, Duration::from_secs(60), &[&a, &b]);
    assert!(
        jobs.iter().all(|j| j.state == JobState::Done),
        "nothing lost"
    );
    let mut count: HashMap<i64, usize> = HashMap::new();
    for (id, _, _) in starts(&ta).iter().chain(&starts(&tb)) {
        *count.entry(*id).or_default() += 1;
    }
    assert_eq!(count.len(), 200);
    assert!(
        a.stderr().contains("listening for new jobs again")
            || b.stderr().contains("listening for new jobs again")
    );
    drop((a, b));
}

#[test]
fn an_alive_node_name_is_refused_and_bad_stores_are_one_line() {
    let Some(url) = pg::fresh_url() else { return };
    let (a, _) = node(&url, "a", 1, &[]);
    wait_alive(&url, 1, &[&a]);
    let (mut twin, _) = node(&url, "a", 1, &[]);
    let (status, stderr) = twin.run_to_end(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("node a is alive on host"), "{stderr}");
    let down = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    let base = pg::base_url().unwrap();
    let host = base.split('@').nth(1).unwrap_or("").to_string();
    let wrong = format!("postgres://{}:nope@{host}", pg::PASSWORD_USER);
    let cases = [
        (down.as_str(), "onnection refused"),
        ("postgres://u@h:notaport/db", "invalid PostgreSQL URL"),
        (wrong.as_str(), "password authentication failed"),
    ];
    for (bad, needle) in cases {
        let (status, stderr) = run_to_end(
            &[
                "--jobs",
                bad,
                "--workers",
                "1",
                example("jobs").to_str().unwrap(),
            ],
            Duration::from_secs(30),
        );
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
        if needle.starts_with("password") && errors.is_empty() && status.success() {
            continue; // a server that does not check passwords
        }
        assert_eq!(status.code(), Some(1), "{bad}: {stderr}");
        assert_eq!(errors.len(), 1, "one line for {bad}: {stderr}");
        assert!(errors[0].contains(needle), "{bad}: {stderr}");
        assert!(!errors[0].contains("nope"), "password shown: {stderr}");
    }
}

#[test]
fn per_job_processes_see_the_node_name() {
    let Some(url) = pg::fresh_url() else { return };
    let mut c = watcher()
        .workers(1)
        .args(["--jobs", &url, "--node", "edge-1", "--per-job", "--"])
        .start(
            "/bin/sh",
            &["-c", r#"printf '{"node": "%s"}\n' "$CLUSTER_NODE""#],
        );
    wait_alive(&url, 1, &[&c]);
    let ids = submit(&url, vec![NewJob::new(json!({"x": 1}))]);
    let refused = rt().block_on(async {
        let q = JobQueue::open(&url).await.unwrap();
        q.submit_many(vec![
            NewJob::new(json!(1)),
            NewJob::new(json!(2)).queue("nosuch"),
        ])
        .await
        .unwrap_err()
    });
    assert!(refused.is_config(), "{refused}");
    assert_eq!(
        refused.to_string(),
        "no pool takes queue nosuch (pools take: default)"
    );
    let job = rt().block_on(async {
        let q = JobQueue::open(&url).await.unwrap();
        q.wait(ids[0], Duration::from_secs(20)).await.unwrap()
    });
    assert_eq!(job.state, JobState::Done, "{}", c.stderr());
    assert_eq!(job.result, Some(json!({"node": "edge-1"})));
    c.signal(Signal::SIGTERM);
    let (status, _) = c.run_to_end(Duration::from_secs(20));
    assert!(status.success());
    let nodes = rt().block_on(async { JobQueue::open(&url).await.unwrap().nodes().await.unwrap() });
    assert_eq!(
        nodes[0].state,
        NodeState::Gone,
        "a clean stop marks the node gone"
    );
}
