//! End-to-end job figures on PostgreSQL with the real `cluster` binary:
//!
//! * throughput with 1, 2 and 4 nodes (watchers) on one database: N no-op
//!   (`echo`) jobs submitted at once to idle nodes; time until the store
//!   says all are done (the submit included);
//! * pickup latency: one job at a time on an idle queue, from the submit
//!   call to the handler's start (its `JOBS_TRACE` line), p50 and p99.
//!
//! ```text
//! cargo build --release --bin cluster --examples
//! CLUSTER_BENCH_PG=postgres://… cargo bench --bench jobs_pg [-- JOBS] [throughput|pickup]
//! ```
//!
//! `benches/jobs_pg_compare.sh` runs it beside pgbench, graphile-worker
//! and pg-boss on one durable server. Prints one line per figure.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cluster::{JobQueue, NewJob, NodeState};
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

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

fn start(url: &str, name: &str, extra: &[&str], trace: Option<&std::path::Path>) -> Node {
    let mut cmd = Command::new(release("cluster"));
    cmd.args(["--log-level", "error", "--jobs", url, "--node", name])
        .args(extra)
        .arg(release("jobs"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(t) = trace {
        cmd.env("JOBS_TRACE", t);
    }
    Node(cmd.spawn().expect("start cluster"))
}

async fn wait_alive(q: &JobQueue, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(nodes) = q.nodes().await {
            if nodes.iter().filter(|x| x.state == NodeState::Alive).count() == n {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the nodes did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn schema_url(base: &str, schema: &str) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}schema={schema}")
}

async fn throughput(base: &str, nodes: usize, n: usize) {
    let url = schema_url(base, &format!("bench_{nodes}n_{}", std::process::id()));
    let q = JobQueue::open(&url).await.unwrap();
    // Two cores: one worker per node, many jobs at once in it.
    let extra = [
        "--workers",
        "1",
        "--job-concurrency",
        "512",
        "--job-prefetch",
        "1000",
        "--no-safe-mode",
    ];
    let running: Vec<Node> = (0..nodes)
        .map(|i| start(&url, &format!("n{i}"), &extra, None))
        .collect();
    wait_alive(&q, nodes).await;
    let jobs: Vec<NewJob> = (0..n)
        .map(|i| NewJob::new(json!(["x", i])).name("echo"))
        .collect();
    let t0 = Instant::now();
    q.submit_many(jobs).await.unwrap();
    let submitted = t0.elapsed();
    loop {
        let s = q.stats().await.unwrap();
        if s.done as usize >= n {
            break;
        }
        // `stats` counts both tables: poll it rarely, so that the probe
        // does not compete with the nodes for the two cores.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(t0.elapsed() < Duration::from_secs(600), "too slow");
    }
    let took = t0.elapsed();
    println!(
        "cluster, {nodes} node(s): {n} jobs in {took:.2?} (submit {submitted:.0?}): {:.0} jobs/s end to end, {:.0} jobs/s after the submit",
        n as f64 / took.as_secs_f64(),
        n as f64 / (took - submitted).as_secs_f64()
    );
    drop(running);
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

async fn pickup(base: &str, samples: usize) {
    let url = schema_url(base, &format!("bench_pickup_{}", std::process::id()));
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace");
    let q = JobQueue::open(&url).await.unwrap();
    let _n = start(&url, "p", &["--workers", "2"], Some(&trace));
    wait_alive(&q, 1).await;
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
        "cluster pickup latency, idle queue, {} samples: p50 {:.3} ms, p99 {:.3} ms (submit call to handler start)",
        lat.len(),
        p(0.5),
        p(0.99)
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo test --benches asks for the list
    }
    let Ok(base) = std::env::var("CLUSTER_BENCH_PG") else {
        eprintln!("set CLUSTER_BENCH_PG=postgres://… (benches/jobs_pg_compare.sh does)");
        return;
    };
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(50_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let only = |what: &str| std::env::args().any(|a| a == what);
    let all = !only("pickup") && !only("throughput");
    rt.block_on(async {
        if all || only("throughput") {
            for nodes in [1, 2, 4] {
                throughput(&base, nodes, n).await;
            }
        }
        if all || only("pickup") {
            pickup(&base, 200).await;
        }
    });
}
