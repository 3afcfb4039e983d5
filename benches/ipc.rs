//! IPC micro-benchmarks over a real `SOCK_SEQPACKET` socketpair:
//!
//! * `ipc/round_trip`: watcher sends a message, worker answers (Ping/Pong),
//!   both ends on one current-thread runtime;
//! * `ipc/pass_fd`: the watcher passes one descriptor with a small payload
//!   (a `SocketReply`), the worker receives it as an `OwnedFd` (closed at
//!   once, so the descriptor count stays flat).
//!
//! Run with `cargo bench --bench ipc`.

use criterion::{criterion_group, criterion_main, Criterion};
use std::os::fd::AsFd;

fn ipc(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("ipc");
    let mut pair = rt.block_on(async { cluster::__bench::Pair::new().unwrap() });
    group.bench_function("round_trip", |b| {
        b.iter(|| rt.block_on(pair.round_trip()));
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    group.bench_function("pass_fd", |b| {
        b.iter(|| {
            let fd = rt.block_on(pair.pass_fd(listener.as_fd()));
            drop(fd);
        });
    });
    group.finish();
}

criterion_group!(benches, ipc);
criterion_main!(benches);
