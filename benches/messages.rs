//! Message round-trip latency between a library watcher and one worker
//! process: the watcher sends `(n, payload)`, the worker's
//! `Cluster::channel` answers it, the watcher receives the answer. Prints
//! p50, p90, p99 and max over ROUNDS (default 20,000) after 1,000 warm-up
//! round trips.
//!
//! Run with `cargo bench --bench messages` (or `ROUNDS=100000 cargo bench
//! --bench messages`). The bench binary is both sides: it re-executes itself
//! as the worker.

use std::time::{Duration, Instant};

use cluster::{Cluster, ClusterWatcher, LogFilter, LogFormat, LogOutput};

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if Cluster::is_worker() {
        rt.block_on(worker());
        return;
    }
    rt.block_on(watcher());
}

async fn worker() {
    let chan = Cluster::channel::<(u64, Vec<u8>)>().expect("worker channel");
    Cluster::ready();
    while let Ok(msg) = chan.recv().await {
        if chan.send(&msg).is_err() {
            return;
        }
    }
}

async fn watcher() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let exe = std::env::current_exe().expect("own executable");
    let watcher = ClusterWatcher::builder(std::process::Command::new(exe))
        .workers(1)
        .log_output(LogOutput::stderr(
            LogFormat::Text,
            LogFilter::parse("warn").unwrap(),
        ))
        .build()
        .expect("watcher");
    watcher.start().await.expect("start");
    let mut messages = watcher.messages();
    let payload = vec![7u8; 64];
    // Wait until the worker answers.
    loop {
        watcher.broadcast(&(0u64, payload.clone())).unwrap();
        if tokio::time::timeout(Duration::from_millis(200), messages.next())
            .await
            .is_ok()
        {
            break;
        }
    }
    let mut samples = Vec::with_capacity(rounds);
    for n in 1..=(rounds + 1000) as u64 {
        let t0 = Instant::now();
        watcher.broadcast(&(n, payload.clone())).unwrap();
        loop {
            let m = messages.next().await.expect("reply");
            let (k, _): (u64, Vec<u8>) = m.decode().unwrap();
            if k == n {
                break;
            }
        }
        if n > 1000 {
            samples.push(t0.elapsed());
        }
    }
    watcher.stop(Duration::from_secs(5)).await.expect("stop");
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "message round trip (64-byte payload, watcher <-> 1 worker process), {} rounds: p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
        samples.len(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        samples[samples.len() - 1]
    );
}
