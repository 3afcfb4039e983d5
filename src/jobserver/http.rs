//! Accepting and serving HTTP/1.1 connections with hyper.
//!
//! * One accept loop per address. A loop holds a permit per connection
//!   (at most [`JobServerConfig::max_connections`] over all addresses):
//!   past it, new connections wait in the kernel's backlog, not in the
//!   watcher's memory.
//! * hyper's header read timeout closes a connection that does not finish
//!   a request head in time (slowloris), idle ones included; each
//!   connection is its own task, so a slow or idle client holds only its
//!   own connection.
//! * When the watcher stops, connections finish the request they serve
//!   (hyper's graceful shutdown) for up to [`GRACE`], then close.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::config::JobServerConfig;
use super::routes::Api;
use crate::socket::Stream;

/// How long connections may finish their requests once the watcher stops.
pub(crate) const GRACE: Duration = Duration::from_secs(1);

/// Longest request head (hyper's read buffer).
const MAX_HEAD: usize = 64 * 1024;

/// A bound listener of the job server.
pub(crate) enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Bound {
    async fn accept(&self) -> std::io::Result<Stream> {
        match self {
            Bound::Tcp(l) => {
                let (s, _) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            Bound::Unix(l, _) => Ok(Stream::Unix(l.accept().await?.0)),
        }
    }
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs one accept loop until `stop` turns true; then lets its
/// connections finish for [`GRACE`].
pub(crate) fn serve(
    listener: Bound,
    api: Arc<Api>,
    config: &JobServerConfig,
    permits: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true);
    tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                () = stopped(&mut stop) => break,
            };
            let stream = tokio::select! {
                s = listener.accept() => s,
                () = stopped(&mut stop) => break,
                // Reap finished connections meanwhile.
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            };
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors (EMFILE) or a connection reset
                    // before it was accepted: pause instead of spinning.
                    tracing::debug!("job server: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let api = api.clone();
            let conn = builder.serve_connection(
                TokioIo::new(stream),
                service_fn(move |req| api.clone().serve(req)),
            );
            let mut stop = stop.clone();
            conns.spawn(async move {
                let _permit = permit;
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    () = stopped(&mut stop) => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(GRACE, conn).await;
                    }
                }
            });
        }
        let _ = tokio::time::timeout(GRACE * 2, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if let Bound::Unix(_, path) = &listener {
            let _ = std::fs::remove_file(path);
        }
    })
}
