//! `--http ADDR`: the watcher's web dashboard and its API, on hyper.
//!
//! * `/` the dashboard (plain files embedded in the binary, no build step);
//! * `/metrics` Prometheus text, as `--metrics` serves it;
//! * `/api/status` the JSON of `cluster status --json`, `/api/samples` the
//!   CPU and memory history, `/api/events` a server-sent event stream of
//!   the status, once a second;
//! * `/api/jobs`, `/api/jobs/stats`, `/api/jobs/{id}` the job queries, and
//!   `POST /api/jobs/{id}/retry|cancel`;
//! * `POST /api/reload` and `POST /api/scale` (`{"workers": N}`), through the
//!   same commands as the CLI.
//!
//! Loopback only, unless a token file is given: then every request needs
//! the token (`Authorization: Bearer TOKEN`, or `?token=TOKEN` for the
//! browser's event stream), compared in constant time.
//!
//! `--metrics ADDR` runs the same server with only `/metrics`.

mod api;
mod reply;
mod sse;

pub(crate) use reply::{error, full, Body, State};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::error::{Error, Kind, Result};

/// Connections served at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 256;

/// Time a client has to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The running server; stops when dropped.
pub(crate) struct Server {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    /// Binds `addr` for the dashboard (`--http`); the address must be
    /// loopback unless there is a token.
    ///
    /// # Errors
    ///
    /// [`Error::is_config`] for a non-loopback address without a token,
    /// [`Error::is_bind`] when the address cannot be bound.
    pub(crate) async fn bind(addr: SocketAddr, state: State) -> Result<Server> {
        if !addr.ip().is_loopback() && state.token.is_none() && !state.metrics_only {
            return Err(Error::new(
                Kind::Config,
                format!("--http on {addr} is not loopback: it needs --http-token-file"),
            ));
        }
        let what = if state.metrics_only {
            "metrics"
        } else {
            "the dashboard"
        };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::with_io(Kind::Bind, format!("cannot serve {what} on {addr}"), e))?;
        Ok(Server::start(listener, state))
    }

    /// Serves on `listener`.
    fn start(listener: TcpListener, state: State) -> Server {
        let addr = listener.local_addr();
        if let Ok(addr) = addr {
            match state.metrics_only {
                true => tracing::info!("serving metrics on http://{addr}/metrics"),
                false => tracing::info!("dashboard on http://{addr}/"),
            }
        }
        let state = Arc::new(state);
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    return;
                };
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(route(req, &state).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    drop(permit);
                });
            }
        });
        Server { task }
    }
}

/// Whether `req` carries the token (when one is set).
fn authorized(req: &Request<Incoming>, token: Option<&str>) -> bool {
    use subtle::ConstantTimeEq;
    let Some(token) = token else { return true };
    let header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let query = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    header
        .or(query)
        .is_some_and(|given| bool::from(given.as_bytes().ct_eq(token.as_bytes())))
}

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

async fn route(req: Request<Incoming>, state: &Arc<State>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if state.metrics_only && path != "/metrics" {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "metrics are at /metrics",
        );
    }
    // The page itself carries no data: it asks for the token to call the API.
    let public = method == Method::GET && matches!(path.as_str(), "/" | "/app.js" | "/app.css");
    if !public && !authorized(&req, state.token.as_deref()) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a token is needed",
        );
    }
    match (&method, path.as_str()) {
        (&Method::GET, "/") => full(StatusCode::OK, "text/html; charset=utf-8", INDEX),
        (&Method::GET, "/app.js") => full(StatusCode::OK, "text/javascript; charset=utf-8", APP_JS),
        (&Method::GET, "/app.css") => full(StatusCode::OK, "text/css; charset=utf-8", APP_CSS),
        (&Method::GET, "/api/events") => sse::events(state),
        _ => api::handle(req, state.as_ref()).await,
    }
}
