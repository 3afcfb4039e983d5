//! The SQLite job store on a file database in a tempdir (WAL,
//! `synchronous = NORMAL`), through the store's actor thread as the
//! watcher uses it.
//!
//! * `jobs_store/submit_20000`: one `submit` of 20,000 small jobs (one
//!   transaction) into a fresh store.
//! * `jobs_store/claim_finish_256`: one claim of 256 jobs plus one `finish`
//!   of all 256 as done (two transactions), from a store holding enough
//!   queued jobs (submitted untimed before each sample).
//!
//! Run with `cargo bench --bench jobs_store`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use cluster::__jobs_bench::BenchStore;

const SUBMIT: usize = 20_000;
const BATCH: usize = 256;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn jobs_store(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("jobs_store");
    g.sample_size(10).measurement_time(Duration::from_secs(10));

    g.throughput(Throughput::Elements(SUBMIT as u64));
    g.bench_function("submit_20000", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().unwrap();
                let url = dir.path().join("jobs.db").display().to_string();
                rt.block_on(async {
                    let store = BenchStore::open(&url).await.unwrap();
                    let start = Instant::now();
                    let n = store.submit("default", SUBMIT).await.unwrap();
                    total += start.elapsed();
                    assert_eq!(n, SUBMIT);
                });
            }
            total
        })
    });

    g.throughput(Throughput::Elements(BATCH as u64));
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("jobs.db").display().to_string();
    let store = rt.block_on(BenchStore::open(&url)).unwrap();
    g.bench_function("claim_finish_256", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let need = iters as usize * BATCH;
                let mut left = need;
                while left > 0 {
                    let n = left.min(SUBMIT);
                    store.submit("default", n).await.unwrap();
                    left -= n;
                }
                let start = Instant::now();
                for _ in 0..iters {
                    let n = store.claim_finish("default", BATCH).await.unwrap();
                    assert_eq!(n, BATCH);
                }
                start.elapsed()
            })
        })
    });
    g.finish();
}

criterion_group!(benches, jobs_store);
criterion_main!(benches);
