//! A hyper 1.x "Hello, World!" server that runs under `cluster` or alone.
//!
//! Run with:
//!
//! ```text
//! cargo build --release --examples
//! cluster --workers 4 target/release/examples/hello_http 127.0.0.1:8080   # 4 workers
//! target/release/examples/hello_http 127.0.0.1:8080                       # standalone
//! curl -i http://127.0.0.1:8080/
//! ```
//!
//! Every response is `200 Hello, World!` with an `x-worker-id` header: the
//! worker's context id, or `standalone`.
//!
//! Draining without failing a request (the rolling restart depends on it):
//! on termination the server stops accepting (the watcher's shared socket
//! keeps queueing new connections for the other workers), then for up to
//! `CLOSE_WINDOW` answers every request with `Connection: close`, so each
//! busy keep-alive client gets its response and reconnects to a live worker.
//! Only then does hyper's graceful shutdown close what is left (idle
//! connections) and wait for in-flight requests. Closing an idle keep-alive
//! connection outright would race with a request the client is sending.
//!
//! Threads: one runtime thread per worker under `cluster` (one process per
//! core), all available cores standalone; `HELLO_THREADS=N` overrides both.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;

use cluster::Cluster;

/// How long busy keep-alive connections get a `Connection: close` answer
/// before the remaining (idle) connections are closed.
const CLOSE_WINDOW: Duration = Duration::from_secs(2);
/// How long in-flight requests get to finish after that.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".to_string());
    let threads = std::env::var("HELLO_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            if Cluster::is_worker() {
                1
            } else {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            }
        });
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hello_http: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(serve(&addr)) {
        eprintln!("hello_http: {e}");
        std::process::exit(1);
    }
}

async fn serve(addr: &str) -> Result<(), cluster::Error> {
    let listener = Cluster::server_socket_factory().listen(addr).await?;
    let worker_id = match Cluster::context_id() {
        Some(id) => HeaderValue::from(id),
        None => HeaderValue::from_static("standalone"),
    };
    if !Cluster::is_worker() {
        eprintln!("hello_http: listening on {addr} (standalone)");
    }
    let graceful = GracefulShutdown::new();
    let draining = Arc::new(AtomicBool::new(false));
    let open = Arc::new(AtomicUsize::new(0));
    let termination = Cluster::await_termination();
    tokio::pin!(termination);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        eprintln!("hello_http: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let cluster::Stream::Tcp(tcp) = &stream {
                    let _ = tcp.set_nodelay(true);
                }
                let worker_id = worker_id.clone();
                let draining_now = draining.clone();
                let service = service_fn(move |_req: Request<Incoming>| {
                    let worker_id = worker_id.clone();
                    let close = draining_now.load(Ordering::Relaxed);
                    async move {
                        let mut response = Response::new(Full::new(Bytes::from_static(b"Hello, World!")));
                        let headers = response.headers_mut();
                        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                        headers.insert("x-worker-id", worker_id);
                        if close {
                            // hyper closes the connection after this response.
                            headers.insert(CONNECTION, HeaderValue::from_static("close"));
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                let conn = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                open.fetch_add(1, Ordering::Relaxed);
                let open = open.clone();
                tokio::spawn(async move {
                    let _ = conn.await;
                    open.fetch_sub(1, Ordering::Relaxed);
                });
            }
            _ = &mut termination => break,
        }
    }
    // Stop accepting: the listener closes here (the watcher keeps its own
    // copy, so queued connections go to the other workers).
    drop(listener);
    draining.store(true, Ordering::Relaxed);
    let window = tokio::time::Instant::now() + CLOSE_WINDOW;
    while open.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < window {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => {
            eprintln!("hello_http: connections still open after {DRAIN_TIMEOUT:?}; exiting");
        }
    }
    Ok(())
}
