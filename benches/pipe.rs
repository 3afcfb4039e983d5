//! Client socket handoff throughput over a real `SOCK_SEQPACKET` socketpair.
//!
//! `pipe/handoff_64b`: the sender (this thread, a current-thread runtime)
//! hands off a duplicate of one connected TCP socket per iteration with a
//! 64-byte payload; the receiver (its own thread and runtime) receives each
//! one as a tokio `TcpStream` (type checks, non-blocking, registered with
//! its reactor) and drops it. Time runs until the receiver has the last
//! one, so the figure is end-to-end handoffs per second, both ends busy.
//!
//! Run with `cargo bench --bench pipe`.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde::{Deserialize, Serialize};

use cluster::{pipe_pair, ClientSocketReceivePipe, ClientSocketSendPipe};

/// 64 bytes once postcard-encoded (1 + 32 + 31), no heap allocation.
#[derive(Serialize, Deserialize)]
struct Payload {
    /// The last handoff of a batch: the receiver reports back.
    last: bool,
    a: [u8; 32],
    b: [u8; 31],
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn pipe(c: &mut Criterion) {
    let (a, b) = pipe_pair().unwrap();
    let (batch_done_tx, batch_done_rx) = mpsc::channel::<()>();
    let receiver = std::thread::spawn(move || {
        let rt = runtime();
        rt.block_on(async move {
            let rx = ClientSocketReceivePipe::new(b).unwrap();
            while let Some(handoff) = rx.receive::<Payload>().await.unwrap() {
                if handoff.data().last {
                    batch_done_tx.send(()).unwrap();
                }
            }
        });
    });

    let rt = runtime();
    let tx = {
        let _in_runtime = rt.enter();
        ClientSocketSendPipe::new(a).unwrap()
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    let data = Payload {
        last: false,
        a: [7; 32],
        b: [7; 31],
    };
    let last = Payload { last: true, ..data };
    assert_eq!(postcard::to_stdvec(&data).unwrap().len(), 64);

    let mut group = c.benchmark_group("pipe");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("handoff_64b", |bench| {
        bench.iter_custom(|iters| {
            let start = Instant::now();
            rt.block_on(async {
                for i in 0..iters {
                    let payload = if i + 1 == iters { &last } else { &data };
                    tx.send(server.try_clone().unwrap(), payload).await.unwrap();
                }
            });
            batch_done_rx
                .recv_timeout(Duration::from_secs(60))
                .expect("receiver got the batch");
            start.elapsed()
        });
    });
    group.finish();
    drop(tx);
    receiver.join().unwrap();
}

criterion_group!(benches, pipe);
criterion_main!(benches);
