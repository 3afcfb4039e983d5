//! Shared state across workers: a counter in the watcher's storage and a
//! command between workers. Run under `cluster` (or alone, with a storage
//! of its own):
//!
//! ```text
//! cargo build --release --bin cluster --example shared_state
//! target/release/cluster --workers 4 --name web --pid-file s.pid \
//!     target/release/examples/shared_state 127.0.0.1:8080
//! curl http://127.0.0.1:8080/hit          # 1, 2, 3 ... whichever worker answers
//! curl http://127.0.0.1:8080/hits         # the count
//! curl http://127.0.0.1:8080/whoami/web-3 # {"slot":3,"name":"web-3","pid":...}
//! curl http://127.0.0.1:8080/whoami/2     # by slot
//! ```
//!
//! * `GET /hit` increments `hits` (atomic in the watcher: no update is
//!   lost, whichever worker serves it) and answers the new count.
//! * `GET /hits` answers the current count.
//! * `GET /whoami/{target}` sends the command `whoami` to the target (a
//!   slot number or a worker name) and answers its reply: its slot, name
//!   and pid as JSON. The watcher routes it; an unknown target is a 404,
//!   a target that does not answer in a second a 504.
//!
//! Each worker registers `whoami`, says it is `idle`, and serves on one
//! current-thread runtime.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;

use cluster::{Cluster, Status, Target};

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".to_string());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = runtime.block_on(serve(&addr)) {
        eprintln!("shared_state: {e}");
        std::process::exit(1);
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Whoami {
    slot: u32,
    name: Option<String>,
    pid: u32,
}

async fn serve(addr: &str) -> Result<(), cluster::Error> {
    Cluster::commands().register("whoami", |_: ()| async {
        Ok::<_, String>(Whoami {
            slot: Cluster::slot().unwrap_or(0),
            name: Cluster::name(),
            pid: std::process::id(),
        })
    });
    let listener = Cluster::server_socket_factory().listen(addr).await?;
    Cluster::ready();
    Cluster::set_status(Status::Idle)?;
    if !Cluster::is_worker() {
        eprintln!("shared_state: listening on {addr} (standalone)");
    }
    let termination = Cluster::await_termination();
    tokio::pin!(termination);
    // Connections accepted before a stop are served to the end: a request
    // is never cut off by a rolling restart.
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _peer)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let service = service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(route(req.uri().path()).await)
                });
                let conn = graceful.watch(
                    http1::Builder::new().serve_connection(TokioIo::new(stream), service),
                );
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = &mut termination => break,
        }
    }
    // Stop accepting (the watcher keeps the socket for the other workers),
    // then let open connections finish their request and close.
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    Ok(())
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body + "\n")));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

async fn route(path: &str) -> Response<Full<Bytes>> {
    let storage = Cluster::storage();
    let failed = |e: cluster::Error| text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    match path {
        "/hit" => match storage.increment("hits", 1).await {
            Ok(n) => text(StatusCode::OK, n.to_string()),
            Err(e) => failed(e),
        },
        "/hits" => match storage.get::<i64>("hits").await {
            Ok(n) => text(StatusCode::OK, n.unwrap_or(0).to_string()),
            Err(e) => failed(e),
        },
        _ => match path.strip_prefix("/whoami/") {
            Some(target) if !target.is_empty() => whoami(Target::parse(target)).await,
            _ => text(
                StatusCode::NOT_FOUND,
                "try /hit, /hits or /whoami/{target}".into(),
            ),
        },
    }
}

async fn whoami(target: Target) -> Response<Full<Bytes>> {
    let call = Cluster::command(target, "whoami", &()).timeout(Duration::from_secs(1));
    match call.await {
        Ok(reply) => match reply.decode::<Whoami>() {
            Ok(w) => {
                let mut r = text(
                    StatusCode::OK,
                    serde_json::to_string(&w).unwrap_or_default(),
                );
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                r
            }
            Err(e) => text(StatusCode::BAD_GATEWAY, e.to_string()),
        },
        Err(e) if e.is_unknown_target() || e.is_unknown_command() => {
            text(StatusCode::NOT_FOUND, e.to_string())
        }
        Err(e) if e.is_timeout() || e.is_target_died() => {
            text(StatusCode::GATEWAY_TIMEOUT, e.to_string())
        }
        Err(e) => text(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}
