//! Shared storage throughput and worker-to-worker command latency, with a
//! library watcher and 4 worker processes (the bench binary re-executes
//! itself as the workers).
//!
//! * Storage: every worker runs `LANES` (default 64) tasks that alternate
//!   `get` and `increment` on their own counter for `SECS` (default 3)
//!   seconds; the figure is the sum of completed operations per second.
//! * Commands: worker 1 sends `echo` to worker 2 (a handler registered by
//!   the user), one at a time, `ROUNDS` (default 20,000) times after 1,000
//!   warm-up rounds; p50, p90, p99 and max (worker 1 sends back only those,
//!   so any number of rounds fits in one command result).
//!
//! Run with `cargo bench --bench shared_state`.

use std::time::{Duration, Instant};

use cluster::{Cluster, ClusterWatcher, LogFilter, LogFormat, LogOutput, Target};
use serde_json::{json, Value};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if Cluster::is_worker() {
        rt.block_on(worker());
    } else {
        rt.block_on(watcher());
    }
}

async fn worker() {
    let c = Cluster::commands();
    c.register("echo", |n: u64| async move { Ok::<_, String>(n) });
    c.register("storage", |a: Value| async move {
        let lanes = a["lanes"].as_u64().unwrap_or(64);
        let until = Instant::now() + Duration::from_millis(a["ms"].as_u64().unwrap_or(3000));
        let slot = Cluster::slot().unwrap_or(0);
        let mut tasks = tokio::task::JoinSet::new();
        for lane in 0..lanes {
            tasks.spawn(async move {
                let storage = Cluster::storage();
                let key = format!("bench.w{slot}.l{lane}");
                let mut ops = 0u64;
                while Instant::now() < until {
                    storage.increment(&key, 1).await.expect("increment");
                    storage.get::<i64>(&key).await.expect("get");
                    ops += 2;
                }
                ops
            });
        }
        let mut ops = 0;
        while let Some(n) = tasks.join_next().await {
            ops += n.expect("lane");
        }
        Ok::<_, String>(ops)
    });
    c.register("rtt", |rounds: u64| async move {
        for i in 0..1000 {
            Cluster::command(2, "echo", &i)
                .await
                .map_err(|e| e.to_string())?;
        }
        let mut samples = Vec::with_capacity(rounds as usize);
        for i in 0..rounds {
            let t = Instant::now();
            let reply = Cluster::command(2, "echo", &i)
                .await
                .map_err(|e| e.to_string())?;
            samples.push(t.elapsed().as_nanos() as u64);
            assert_eq!(reply.decode::<u64>().map_err(|e| e.to_string())?, i);
        }
        samples.sort_unstable();
        let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
        Ok::<_, String>(vec![
            samples.len() as u64,
            pct(0.50),
            pct(0.90),
            pct(0.99),
            *samples.last().unwrap_or(&0),
        ])
    });
    Cluster::await_termination().await;
}

async fn watcher() {
    let secs = env_num("SECS", 3);
    let lanes = env_num("LANES", 64);
    let rounds = env_num("ROUNDS", 20_000).max(1);
    let exe = std::env::current_exe().expect("own executable");
    let watcher = ClusterWatcher::builder(std::process::Command::new(exe))
        .workers(4)
        .log_output(LogOutput::stderr(
            LogFormat::Text,
            LogFilter::parse("warn").unwrap(),
        ))
        .build()
        .expect("watcher");
    watcher.start().await.expect("start");
    watcher.wait_ready().await.expect("ready");

    let t = Instant::now();
    let reply = watcher
        .command(
            Target::All,
            "storage",
            &json!({ "lanes": lanes, "ms": secs * 1000 }),
        )
        .timeout(Duration::from_secs(secs + 30))
        .await
        .expect("storage run");
    let elapsed = t.elapsed().as_secs_f64().min(secs as f64 + 1.0);
    let mut total = 0u64;
    for r in reply.responses() {
        total += r.decode::<u64>().expect("ops");
    }
    println!(
        "storage: {} operations (get + increment, 4 workers x {lanes} tasks) in {secs} s: {:.0} ops/s",
        total,
        total as f64 / (secs as f64).max(elapsed.min(secs as f64))
    );

    let samples: Vec<u64> = watcher
        .command(1, "rtt", &rounds)
        .timeout(Duration::from_secs(600))
        .await
        .expect("rtt run")
        .decode()
        .expect("samples");
    let ns = |i: usize| Duration::from_nanos(samples.get(i).copied().unwrap_or(0));
    println!(
        "command worker 1 -> worker 2 -> worker 1, {} rounds: p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
        samples.first().copied().unwrap_or(0),
        ns(1),
        ns(2),
        ns(3),
        ns(4)
    );
    watcher.stop(Duration::from_secs(5)).await.expect("stop");
}
