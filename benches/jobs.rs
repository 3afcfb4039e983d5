//! End-to-end job figures with the real `cluster` binary, SQLite store:
//!
//! * throughput, persistent workers: 20,000 no-op (`echo`) jobs submitted
//!   in one transaction to an idle watcher; time until all are done;
//! * throughput, one process per job (`/bin/true`): 2,000 jobs;
//! * pickup latency: one job at a time on an idle queue, from the submit
//!   call to the handler's start (its `JOBS_TRACE` line), p50 and p99.
//!
//! ```text
//! cargo build --release --bin cluster --examples
//! cargo bench --bench jobs
//! ```
//!
//! Prints one line per figure. Not a criterion bench: each figure is one
//! run of real processes; run it a few times and read the spread.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cluster::{JobQueue, NewJob};
use serde_json::json;

fn release(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release");
    let p = if name == "cluster" {
        root.join("cluster")
    } else {
        root.join("examples").join(name)
    };
    assert!(
        p.exists(),
        "{} missing: cargo build --release --bin cluster --examples",
        p.display()
    );
    p
}

struct Watcher(Child);

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

fn start(db: &Path, extra: &[&str], program: &[&str], trace: Option<&Path>) -> Watcher {
    let mut cmd = Command::new(release("cluster"));
    cmd.args(["--log-level", "error", "--jobs"])
        .arg(db)
        .args(extra)
        .args(program)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(t) = trace {
        cmd.env("JOBS_TRACE", t);
    }
    Watcher(cmd.spawn().expect("start cluster"))
}

async fn wait_idle(q: &JobQueue) {
    // The watcher is up once it registered its queues (a submit to an
    // unknown queue is refused then); a probe job finishing says so.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(id) = q
            .submit(NewJob::new(json!({"probe": true})).name("echo"))
            .await
        {
            if q.wait(id, Duration::from_secs(20)).await.is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the watcher did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn done_count(q: &JobQueue) -> u64 {
    q.stats().await.map(|s| s.done).unwrap_or(0)
}

async fn throughput(
    label: &str,
    n: usize,
    extra: &[&str],
    program: &[&str],
    args: serde_json::Value,
) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("jobs.db");
    let _w = start(&db, extra, program, None);
    let q = JobQueue::open(db.to_str().unwrap()).await.unwrap();
    wait_idle(&q).await;
    let before = done_count(&q).await;
    let jobs: Vec<NewJob> = (0..n)
        .map(|i| NewJob::new(json!([args, i])).name("echo"))
        .collect();
    let t0 = Instant::now();
    q.submit_many(jobs).await.unwrap();
    let submitted = t0.elapsed();
    // Counting scans the table: poll it rarely, so the probe does not
    // compete with the watcher for the two cores.
    while done_count(&q).await < before + n as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(t0.elapsed() < Duration::from_secs(600), "{label}: too slow");
    }
    let took = t0.elapsed();
    println!(
        "{label}: {n} jobs in {took:.2?} (submit {submitted:.0?}): {:.0} jobs/s",
        n as f64 / took.as_secs_f64()
    );
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

async fn pickup(samples: usize) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("jobs.db");
    let trace = dir.path().join("trace");
    let jobs = release("jobs");
    let _w = start(
        &db,
        &["--workers", "2"],
        &[jobs.to_str().unwrap()],
        Some(&trace),
    );
    let q = JobQueue::open(db.to_str().unwrap()).await.unwrap();
    wait_idle(&q).await;
    let mut lat = Vec::new();
    for i in 0..samples {
        let sent = now_us();
        let id = q
            .submit(NewJob::new(json!({"i": i})).name("echo"))
            .await
            .unwrap();
        q.wait(id, Duration::from_secs(10)).await.unwrap();
        let text = std::fs::read_to_string(&trace).unwrap_or_default();
        let start = text.lines().rev().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 7 && f[0] == "start" && f[1] == id.to_string())
                .then(|| f[6].parse::<u128>().ok())
                .flatten()
        });
        if let Some(start) = start {
            lat.push(start.saturating_sub(sent) as f64 / 1000.0);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "pickup latency, idle queue, {} samples: p50 {:.3} ms, p99 {:.3} ms (submit call to handler start)",
        lat.len(),
        p(0.5),
        p(0.99)
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo test --benches asks for the list
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let jobs = release("jobs");
    rt.block_on(async {
        throughput(
            "persistent workers (2 workers, --job-concurrency 64, --job-prefetch 2000)",
            20_000,
            &[
                "--workers",
                "2",
                "--job-concurrency",
                "64",
                "--job-prefetch",
                "2000",
                "--no-safe-mode",
            ],
            &[jobs.to_str().unwrap()],
            json!("x"),
        )
        .await;
        throughput(
            "persistent workers, safe mode (2 workers, --job-concurrency 64, --job-prefetch 2000)",
            20_000,
            &[
                "--workers",
                "2",
                "--job-concurrency",
                "64",
                "--job-prefetch",
                "2000",
            ],
            &[jobs.to_str().unwrap()],
            json!("x"),
        )
        .await;
        throughput(
            "one process per job (/bin/true, --workers 4)",
            2_000,
            &["--workers", "4", "--per-job", "--no-safe-mode"],
            &["/bin/true"],
            json!("x"),
        )
        .await;
        pickup(200).await;
    });
}
