//! An axum 0.8 app that runs under `cluster` in every balance mode, or
//! alone (feature `axum`).
//!
//! Run with:
//!
//! ```text
//! cargo build --release --features axum --example axum --bin cluster
//! target/release/cluster -w 4 target/release/examples/axum 127.0.0.1:3000
//! target/release/cluster -w 4 --balance round-robin target/release/examples/axum 127.0.0.1:3000
//! target/release/examples/axum 127.0.0.1:3000                                   # standalone
//! curl -i http://127.0.0.1:3000/
//! ```
//!
//! * `axum::serve` takes the `cluster::Listener` as it is: in the shared
//!   and reuseport modes it wraps the watcher's listening socket, in the
//!   round-robin, least-connections and ip-hash modes the connections the
//!   watcher accepts and hands to this worker.
//! * `with_graceful_shutdown(Cluster::await_termination())`: the worker is
//!   ready once it serves, answers the watcher's heartbeats, and drains
//!   when the watcher (or SIGTERM standalone) says stop.
//! * Logs go through `Cluster::log_layer()`: one line per request with
//!   typed fields (`status` and `micros` stay numbers in
//!   `--log-format json`), filtered by the watcher's `--log-level`.
//!
//! Routes: `/` (text, with `x-worker-id`), `/json` (who served it and
//! who asked, from `ConnectInfo<PeerAddr>`), `/health`.

use std::time::Instant;

use axum::extract::{ConnectInfo, Request};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cluster::{Cluster, PeerAddr};
use tracing_subscriber::prelude::*;

fn worker_id() -> String {
    Cluster::context_id()
        .map(|id| id.to_string())
        .unwrap_or_else(|| "standalone".into())
}

async fn hello() -> impl IntoResponse {
    ([("x-worker-id", worker_id())], "Hello from axum!\n")
}

async fn who(ConnectInfo(peer): ConnectInfo<PeerAddr>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "worker": worker_id(),
        "slot": Cluster::slot(),
        "pid": std::process::id(),
        "client": peer.to_string(),
    }))
}

/// One log record per request, with typed fields.
async fn log_requests(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let path = request.uri().path().to_string();
    let mut response = next.run(request).await;
    if let Ok(id) = HeaderValue::from_str(&worker_id()) {
        response.headers_mut().insert("x-worker-id", id);
    }
    tracing::info!(
        path,
        status = response.status().as_u16(),
        micros = started.elapsed().as_micros() as u64,
        "served"
    );
    response
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::registry()
        .with(Cluster::log_layer())
        .init();
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".into());
    let listener = Cluster::server_socket_factory().listen(&addr).await?;
    let app = Router::new()
        .route("/", get(hello))
        .route("/json", get(who))
        .route("/health", get(|| async { "ok\n" }))
        .layer(middleware::from_fn(log_requests));
    tracing::info!(addr, worker = worker_id(), "listening");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<PeerAddr>(),
    )
    .with_graceful_shutdown(Cluster::await_termination())
    .await?;
    tracing::info!("drained; exiting");
    Ok(())
}
