//! Jobs on one host with real processes: pools with ratios (the worked
//! examples), safe mode, sources, retries, crashes of job processes,
//! workers and the watcher, timeouts, cancels, restarts, bad input.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cluster::{Job, JobId, JobQueue, JobState, NewJob};
use common::*;
use nix::sys::signal::Signal;
use serde_json::json;

const START: Duration = Duration::from_secs(15);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn job_sh() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/workers/job.sh")
}

/// Opens the store and submits `jobs` in one transaction.
fn submit(db: &Path, jobs: Vec<NewJob>) -> Vec<JobId> {
    rt().block_on(async {
        let q = JobQueue::open(db.to_str().unwrap()).await.unwrap();
        q.submit_many(jobs).await.unwrap()
    })
}

/// Waits until every job in `ids` is finished; returns them.
fn wait_all(db: &Path, ids: &[JobId], timeout: Duration) -> Vec<Job> {
    rt().block_on(async {
        let q = JobQueue::open(db.to_str().unwrap()).await.unwrap();
        let mut out = Vec::new();
        for &id in ids {
            out.push(q.wait(id, timeout).await.unwrap_or_else(|e| {
                panic!("job {id}: {e}");
            }));
        }
        out
    })
}

fn get(db: &Path, id: JobId) -> Job {
    rt().block_on(async {
        let q = JobQueue::open(db.to_str().unwrap()).await.unwrap();
        q.get(id).await.unwrap().unwrap()
    })
}

/// One line of a trace file.
#[derive(Debug, Clone)]
struct Event {
    what: String,
    job: String,
    attempt: u32,
    pool: String,
    queue: String,
    pid: u32,
    ms: u128,
}

fn trace(path: &Path) -> Vec<Event> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 7).then(|| Event {
                what: f[0].into(),
                job: f[1].into(),
                attempt: f[2].parse().unwrap_or(0),
                pool: f[3].into(),
                queue: f[4].into(),
                pid: f[5].parse().unwrap_or(0),
                ms: f[6].parse().unwrap_or(0),
            })
        })
        .collect()
}

fn starts(path: &Path) -> Vec<Event> {
    trace(path)
        .into_iter()
        .filter(|e| e.what == "start")
        .collect()
}

/// (pool, queue) -> count among the first `n` starts.
fn first_wave(path: &Path, n: usize) -> HashMap<(String, String), usize> {
    let mut wave = HashMap::new();
    for e in starts(path).into_iter().take(n) {
        *wave.entry((e.pool, e.queue)).or_insert(0) += 1;
    }
    wave
}

fn wave(rows: &[(&str, &str, usize)]) -> HashMap<(String, String), usize> {
    rows.iter()
        .map(|&(p, q, n)| ((p.to_string(), q.to_string()), n))
        .collect()
}

/// A watcher of per-job processes (`job.sh`) on `db`, tracing into the
/// returned file.
fn per_job(w: Watcher, db: &Path) -> (Running, PathBuf) {
    let tr = w.dir().join("trace");
    let c = w
        .arg("--jobs")
        .arg(db)
        .arg("--per-job")
        .env("JOBS_TRACE", &tr)
        .start("sh", &[job_sh().to_str().unwrap()]);
    (c, tr)
}

fn pools(w: Watcher) -> Watcher {
    w.workers(10).args([
        "--pool",
        "short=0.3",
        "--pool",
        "long=0.3",
        "--pool",
        "shared=0.4:shared",
    ])
}

fn queued(short: usize, long: usize) -> Vec<NewJob> {
    let mut jobs = Vec::new();
    for i in 0..short {
        jobs.push(NewJob::new(json!(["sleep", "1.5", format!("s{i}")])).queue("short"));
    }
    for i in 0..long {
        jobs.push(NewJob::new(json!(["sleep", "1.5", format!("l{i}")])).queue("long"));
    }
    jobs
}

fn worked_example(short: usize, long: usize, expected: &[(&str, &str, usize)]) {
    let w = pools(watcher());
    let db = w.dir().join("jobs.db");
    let ids = submit(&db, queued(short, long));
    let (c, tr) = per_job(w, &db);
    let running = wait_for(START, || (starts(&tr).len() >= 10).then_some(()));
    assert!(running.is_some(), "{}", c.stderr());
    assert_eq!(
        first_wave(&tr, 10),
        wave(expected),
        "{short} short + {long} long"
    );
    let done = wait_all(&db, &ids, Duration::from_secs(60));
    assert!(done.iter().all(|j| j.state == JobState::Done), "{done:?}");
}

#[test]
fn pools_10_short_10_long_run_3_short_3_long_and_4_short_in_shared() {
    worked_example(
        10,
        10,
        &[
            ("short", "short", 3),
            ("long", "long", 3),
            ("shared", "short", 4),
        ],
    );
}

#[test]
fn pools_2_short_10_long_run_2_short_3_long_and_4_long_in_shared() {
    let w = pools(watcher());
    let db = w.dir().join("jobs.db");
    let ids = submit(&db, queued(2, 10));
    let (c, tr) = per_job(w, &db);
    let running = wait_for(START, || (starts(&tr).len() >= 9).then_some(()));
    assert!(running.is_some(), "{}", c.stderr());
    assert_eq!(
        first_wave(&tr, 9),
        wave(&[
            ("short", "short", 2),
            ("long", "long", 3),
            ("shared", "long", 4)
        ])
    );
    wait_all(&db, &ids, Duration::from_secs(60));
}

#[test]
fn pools_6_short_10_long_run_3_3_and_3_short_1_long_in_shared() {
    worked_example(
        6,
        10,
        &[
            ("short", "short", 3),
            ("long", "long", 3),
            ("shared", "short", 3),
            ("shared", "long", 1),
        ],
    );
}

#[test]
fn persistent_workers_follow_the_pool_rule_too() {
    let w = pools(watcher());
    let db = w.dir().join("jobs.db");
    let jobs: Vec<NewJob> = (0..10)
        .map(|i| {
            NewJob::new(json!({"ms": 1500, "i": i}))
                .queue("short")
                .name("sleep")
        })
        .chain((0..10).map(|i| {
            NewJob::new(json!({"ms": 1500, "i": i}))
                .queue("long")
                .name("sleep")
        }))
        .collect();
    let ids = submit(&db, jobs);
    let tr = w.dir().join("trace");
    let c = w
        .arg("--jobs")
        .arg(&db)
        .env("JOBS_TRACE", &tr)
        .start(example("jobs"), &[]);
    let running = wait_for(START, || (starts(&tr).len() >= 10).then_some(()));
    assert!(running.is_some(), "{}", c.stderr());
    assert_eq!(
        first_wave(&tr, 10),
        wave(&[
            ("short", "short", 3),
            ("long", "long", 3),
            ("shared", "short", 4)
        ])
    );
    wait_all(&db, &ids, Duration::from_secs(60));
}

/// Whether two jobs' [start, end] intervals overlap in the trace.
fn overlaps(tr: &Path) -> bool {
    let events = trace(tr);
    let mut spans = Vec::new();
    for s in events.iter().filter(|e| e.what == "start") {
        if let Some(e) = events
            .iter()
            .find(|e| e.what == "end" && e.job == s.job && e.attempt == s.attempt)
        {
            spans.push((s.ms, e.ms));
        }
    }
    spans.sort();
    spans.windows(2).any(|w| w[1].0 < w[0].1)
}

#[test]
fn safe_mode_never_runs_two_jobs_with_the_same_arguments_at_once() {
    for safe in [true, false] {
        let mut w = watcher().workers(4);
        if !safe {
            w = w.arg("--no-safe-mode");
        }
        let db = w.dir().join("jobs.db");
        let ids = submit(
            &db,
            (0..4)
                .map(|_| NewJob::new(json!(["sleep", "0.4"])))
                .collect(),
        );
        let (c, tr) = per_job(w, &db);
        let done = wait_all(&db, &ids, Duration::from_secs(30));
        assert!(
            done.iter().all(|j| j.state == JobState::Done),
            "{}",
            c.stderr()
        );
        assert_eq!(starts(&tr).len(), 4);
        assert_eq!(overlaps(&tr), !safe, "safe mode {safe}: {:?}", trace(&tr));
    }
}

#[test]
fn a_source_listing_the_same_rows_every_pass_runs_each_once() {
    let w = watcher().workers(2);
    let db = w.dir().join("jobs.db");
    // The pending rows are files; processing a row removes its file. The
    // source lists every pending row on every pass (and one bad line).
    let pending = w.dir().join("pending");
    std::fs::create_dir(&pending).unwrap();
    for i in 1..=5 {
        std::fs::write(pending.join(format!("row{i}")), "").unwrap();
    }
    let source = format!(
        "for f in {}/*; do [ -e \"$f\" ] && echo \"{{\\\"args\\\": [\\\"done-row\\\", \\\"$f\\\"], \\\"key\\\": \\\"$(basename $f)\\\"}}\"; done; echo this is not json",
        pending.display()
    );
    let w = w.args(["--job-source", &source, "--job-source-interval", "0.1"]);
    let (c, tr) = per_job(w, &db);
    wait_for(START, || {
        (trace(&tr).iter().filter(|e| e.what == "end").count() >= 5).then_some(())
    })
    .unwrap_or_else(|| panic!("{}", c.stderr()));
    // More passes run: nothing runs again.
    std::thread::sleep(Duration::from_millis(1000));
    let mut rows: Vec<String> = starts(&tr).iter().map(|e| e.job.clone()).collect();
    rows.sort();
    assert_eq!(rows.len(), 5, "{:?}\n{}", trace(&tr), c.stderr());
    rows.dedup();
    assert_eq!(rows.len(), 5);
    assert!(c.stderr().contains("line 6: not JSON"), "{}", c.stderr());
}

#[test]
fn a_failed_attempt_is_retried_and_every_error_is_kept() {
    let w = watcher().workers(2).args(["--retry-delay", "0.05"]);
    let db = w.dir().join("jobs.db");
    let ids = submit(
        &db,
        vec![
            NewJob::new(json!(["fail-once"])),
            NewJob::new(json!(["fail"])).max_attempts(3),
        ],
    );
    let (c, _tr) = per_job(w, &db);
    let done = wait_all(&db, &ids, Duration::from_secs(30));
    assert_eq!(done[0].state, JobState::Done, "{}", c.stderr());
    assert_eq!(done[0].attempt, 2);
    assert_eq!(done[0].errors.len(), 1);
    assert!(done[0].errors[0].error.contains("boom on attempt 1"));
    assert_eq!(
        done[0].result,
        Some(json!({"mode": "fail-once", "attempt": 2}))
    );
    assert_eq!(done[1].state, JobState::Failed);
    let texts: Vec<&str> = done[1].errors.iter().map(|e| e.error.as_str()).collect();
    assert_eq!(texts.len(), 3, "{texts:?}");
    for (i, t) in texts.iter().enumerate() {
        assert!(
            t.contains(&format!("always fails (attempt {})", i + 1)),
            "{t}"
        );
    }
}

#[test]
fn a_killed_job_process_is_retried_at_once() {
    let w = watcher().workers(1).args(["--retry-delay", "0.05"]);
    let db = w.dir().join("jobs.db");
    let ids = submit(&db, vec![NewJob::new(json!(["slow-first"]))]);
    let (c, tr) = per_job(w, &db);
    let first = wait_for(START, || starts(&tr).first().cloned()).expect("started");
    let killed = Instant::now();
    signal(first.pid, Signal::SIGKILL);
    let done = wait_all(&db, &ids, Duration::from_secs(20));
    assert_eq!(done[0].state, JobState::Done, "{}", c.stderr());
    assert_eq!(done[0].attempt, 2);
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "{:?}",
        killed.elapsed()
    );
    assert!(
        done[0].errors[0].error.contains("SIGKILL"),
        "{:?}",
        done[0].errors
    );
}

#[test]
fn a_killed_persistent_worker_fails_its_job_at_once_and_it_is_retried() {
    let w = watcher().workers(2).args(["--retry-delay", "0.05"]);
    let db = w.dir().join("jobs.db");
    let tr = w.dir().join("trace");
    let ids = submit(&db, vec![NewJob::new(json!({"ms": 3000})).name("sleep")]);
    let c = w
        .arg("--jobs")
        .arg(&db)
        .env("JOBS_TRACE", &tr)
        .start(example("jobs"), &[]);
    let first = wait_for(START, || starts(&tr).first().cloned())
        .unwrap_or_else(|| panic!("{}", c.stderr()));
    let killed = Instant::now();
    signal(first.pid, Signal::SIGKILL);
    let second = wait_for(START, || starts(&tr).get(1).cloned()).expect("retried");
    assert!(
        killed.elapsed() < Duration::from_secs(2),
        "retried after {:?}",
        killed.elapsed()
    );
    assert_eq!(second.attempt, 2);
    assert_ne!(second.pid, first.pid);
    let done = wait_all(&db, &ids, Duration::from_secs(20));
    assert_eq!(done[0].state, JobState::Done);
    assert!(
        done[0].errors[0].error.contains("SIGKILL"),
        "{:?}",
        done[0].errors
    );
}

#[test]
fn a_handler_that_panics_fails_the_attempt_not_the_worker() {
    let w = watcher().workers(1).args(["--retry-delay", "0.05"]);
    let db = w.dir().join("jobs.db");
    let ids = submit(
        &db,
        vec![
            NewJob::new(json!(null)).name("panic").max_attempts(2),
            NewJob::new(json!({"x": 1})).name("echo"),
        ],
    );
    let mut c = w.arg("--jobs").arg(&db).start(example("jobs"), &[]);
    let pid = c.wait_workers(1, START)[0];
    let done = wait_all(&db, &ids, Duration::from_secs(20));
    assert_eq!(done[0].state, JobState::Failed);
    assert!(
        done[0].errors[0].error.contains("panicked"),
        "{:?}",
        done[0].errors
    );
    assert_eq!(done[1].result, Some(json!({"x": 1})));
    assert_eq!(c.workers(), [pid], "the worker lives on");
}

#[test]
fn the_watcher_sigkilled_mid_run_and_restarted_finishes_every_job() {
    let w = watcher().workers(2).pid_file();
    let db = w.dir().join("jobs.db");
    let pid_file = w.pid_path();
    let ids = submit(
        &db,
        (0..20)
            .map(|i| NewJob::new(json!(["sleep", "0.2", i.to_string()])))
            .collect(),
    );
    let (mut c, tr) = per_job(w, &db);
    wait_for(START, || (starts(&tr).len() >= 4).then_some(())).expect("running");
    c.signal(Signal::SIGKILL);
    c.wait_exit(START).expect("gone");
    let again = watcher()
        .workers(2)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg("--jobs")
        .arg(&db)
        .arg("--per-job")
        .env("JOBS_TRACE", &tr)
        .start("sh", &[job_sh().to_str().unwrap()]);
    let done = wait_all(&db, &ids, Duration::from_secs(60));
    assert!(
        done.iter().all(|j| j.state == JobState::Done),
        "{:?}\n{}",
        done.iter().map(|j| (j.id, j.state)).collect::<Vec<_>>(),
        again.stderr()
    );
    // The jobs that ran when the watcher died ran again: their first
    // attempt has the error that says so.
    assert!(done.iter().any(|j| j
        .errors
        .iter()
        .any(|e| e.error.contains("watcher stopped while it ran"))));
}

#[test]
fn an_attempt_past_the_job_timeout_is_stopped() {
    for persistent in [false, true] {
        let w = watcher().workers(1).args(["--job-timeout", "0.5"]);
        let db = w.dir().join("jobs.db");
        let started = Instant::now();
        let (ids, c) = if persistent {
            let ids = submit(
                &db,
                vec![NewJob::new(json!({"ms": 20000}))
                    .name("sleep")
                    .max_attempts(1)],
            );
            (ids, w.arg("--jobs").arg(&db).start(example("jobs"), &[]))
        } else {
            let ids = submit(
                &db,
                vec![NewJob::new(json!(["sleep", "20"])).max_attempts(1)],
            );
            (ids, per_job(w, &db).0)
        };
        let done = wait_all(&db, &ids, Duration::from_secs(15));
        assert_eq!(done[0].state, JobState::Failed, "{}", c.stderr());
        assert!(
            done[0].errors[0].error.contains("timed out"),
            "{:?}",
            done[0].errors
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}

#[test]
fn cancel_stops_a_running_job_and_drops_a_queued_one() {
    let w = watcher().workers(1).pid_file();
    let db = w.dir().join("jobs.db");
    let ids = submit(
        &db,
        vec![
            NewJob::new(json!(["sleep", "30"])),
            NewJob::new(json!(["sleep", "30", "second"])),
        ],
    );
    let (c, tr) = per_job(w, &db);
    let running = wait_for(START, || starts(&tr).first().cloned()).expect("started");
    let pf = c.pid_file().to_str().unwrap().to_string();
    let out = cli(["jobs", "cancel", "--pid-file", &pf, &ids[1].to_string()]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cancelled"),
        "{out:?}"
    );
    let out = cli(["jobs", "cancel", "--pid-file", &pf, &ids[0].to_string()]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cancel requested"),
        "{out:?}"
    );
    let done = wait_all(&db, &ids, Duration::from_secs(10));
    assert_eq!(done[0].state, JobState::Cancelled);
    assert_eq!(done[1].state, JobState::Cancelled);
    assert!(wait_for(Duration::from_secs(5), || (!alive(running.pid))
        .then_some(()))
    .is_some());
    assert_eq!(starts(&tr).len(), 1, "the queued one never ran");
}

#[test]
fn a_rolling_restart_lets_running_jobs_finish_and_new_jobs_go_to_new_workers() {
    let w = watcher().workers(1).pid_file();
    let db = w.dir().join("jobs.db");
    let tr = w.dir().join("trace");
    let ids = submit(&db, vec![NewJob::new(json!({"ms": 1500})).name("sleep")]);
    let c = w
        .arg("--jobs")
        .arg(&db)
        .env("JOBS_TRACE", &tr)
        .start(example("jobs"), &[]);
    let first = wait_for(START, || starts(&tr).first().cloned()).expect("started");
    let reload = c.control(&["reload"]);
    assert!(reload.status.success(), "{reload:?}\n{}", c.stderr());
    let later = submit(&db, vec![NewJob::new(json!({"ms": 10})).name("sleep")]);
    let done = wait_all(&db, &ids, Duration::from_secs(20));
    assert_eq!(done[0].state, JobState::Done, "{}", c.stderr());
    assert_eq!(done[0].attempt, 1, "it finished on the old worker");
    wait_all(&db, &later, Duration::from_secs(20));
    let second = starts(&tr)
        .into_iter()
        .find(|e| e.job == later[0].to_string())
        .unwrap();
    assert_ne!(second.pid, first.pid, "a new job goes to the new worker");
}

#[test]
fn bad_job_input_gets_one_clear_line_and_loses_nothing() {
    // A store that cannot be opened, and a corrupt one: start-up errors.
    for (what, url) in [
        (
            "missing directory",
            "/nonexistent-dir-for-cluster/jobs.db".to_string(),
        ),
        ("corrupt file", {
            let dir = tempfile::tempdir().unwrap().keep();
            let f = dir.join("jobs.db");
            std::fs::write(&f, vec![0x5a; 8192]).unwrap();
            f.display().to_string()
        }),
    ] {
        let (status, stderr) = run_to_end(&["--jobs", &url, "--per-job", "/bin/true"], START);
        assert_eq!(status.code(), Some(1), "{what}: {stderr}");
        let last = stderr.lines().last().unwrap_or("");
        assert!(last.starts_with("cluster: error: "), "{what}: {stderr}");
    }
    // A queue no pool takes, once a watcher registered its queues.
    let w = watcher().workers(1).pid_file();
    let db = w.dir().join("jobs.db");
    let (c, _tr) = per_job(w, &db);
    wait_for(START, || {
        c.pid_file().with_extension("jobs").exists().then_some(())
    })
    .expect("store URL file");
    let pf = c.pid_file().to_str().unwrap().to_string();
    let out = cli([
        "jobs",
        "submit",
        "--pid-file",
        &pf,
        "--queue",
        "nosuch",
        "--",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no pool takes queue nosuch"), "{err}");
    // --pool without --jobs, and bad pools, are usage errors.
    let (status, stderr) = run_to_end(&["--pool", "a=0.5", "/bin/true"], START);
    assert_eq!(status.code(), Some(2), "{stderr}");
    let (status, stderr) = run_to_end(
        &[
            "--jobs",
            db.to_str().unwrap(),
            "--pool",
            "a=0.7",
            "--pool",
            "b=0.6",
            "/bin/true",
        ],
        START,
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("add up to 1.30"), "{stderr}");
}

#[test]
fn job_arguments_that_are_not_strings_go_to_stdin() {
    let w = watcher().workers(1);
    let db = w.dir().join("jobs.db");
    // ["stdin"] is argv; {"x": ...} would go to stdin: the mode comes from
    // the watcher's own arguments then.
    let ids = submit(&db, vec![NewJob::new(json!({"x": [1, 2, 3]}))]);
    let tr = w.dir().join("trace");
    let c = w
        .arg("--jobs")
        .arg(&db)
        .arg("--per-job")
        .env("JOBS_TRACE", &tr)
        .start("sh", &[job_sh().to_str().unwrap(), "stdin"]);
    let done = wait_all(&db, &ids, Duration::from_secs(15));
    assert_eq!(done[0].state, JobState::Done, "{}", c.stderr());
    assert_eq!(done[0].result, Some(json!({"mode": "stdin", "attempt": 1})));
    let _ = get(&db, ids[0]);
}
