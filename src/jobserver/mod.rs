//! The job server (`--job-server ADDR`): an HTTP/1.1 JSON API on the
//! watcher, so that any language can call the workers' job handlers by
//! name (in memory, the AMP job server's calls) and submit durable jobs
//! (the store's, Gearman-style keys). `docs/openapi.json` describes it.
//!
//! The server is a client of the job dispatcher like the supervisor is:
//! calls go to it as `JobsEvent::Call` and come back on a oneshot; it
//! reads and writes the store through the dispatcher's store handle. It
//! holds no worker state of its own.
//!
//! Files: `config.rs` (settings, the loopback rule), `http.rs` (accept
//! loops, connection bound, timeouts), `routes.rs` (the API), `reply.rs`
//! (JSON and error responses), `auth.rs` (bearer tokens).

mod auth;
mod config;
mod http;
mod reply;
mod routes;

pub(crate) use config::JobServerConfig;

use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::error::{Error, Kind, Result};
use crate::jobs::dispatch::JobsHandle;
use crate::socket::Address;
use http::Bound;
use routes::Api;

/// Descriptors kept free for everything else the watcher opens (workers'
/// socketpairs and pipes, listeners, the store) when the connection bound
/// is derived from the descriptor limit.
const FD_SPARE: u64 = 512;

/// The running job server.
pub(crate) struct JobServer {
    stop: watch::Sender<bool>,
    loops: Vec<JoinHandle<()>>,
}

impl JobServer {
    /// Binds every address and starts serving.
    ///
    /// # Errors
    ///
    /// [`Error::is_bind`] when an address cannot be bound.
    pub(crate) async fn start(
        config: &JobServerConfig,
        backlog: u32,
        jobs: &JobsHandle,
    ) -> Result<JobServer> {
        let mut bound = Vec::new();
        for addr in &config.addrs {
            bound.push((bind(addr, backlog)?, addr));
        }
        let limit = match crate::watcher::procfs::fd_headroom() {
            Some(free) => (free.saturating_sub(FD_SPARE) as usize).min(config.max_connections),
            None => config.max_connections,
        };
        if limit < 1000 {
            tracing::warn!(
                "the job server serves at most {limit} connections at once: raise the descriptor limit (ulimit -n) for more"
            );
        }
        let api = Arc::new(Api {
            jobs: jobs.sender(),
            store: jobs.store(),
            written: jobs.outcomes_written(),
            token: config.token.as_deref().map(auth::Token::new),
            max_body: config.max_body,
            body_timeout: config.header_timeout,
        });
        let permits = Arc::new(Semaphore::new(limit.max(1)));
        let (stop, stopped) = watch::channel(false);
        let mut loops = Vec::new();
        for (listener, addr) in bound {
            let shown = match (&listener, addr) {
                (Bound::Tcp(l), _) => l
                    .local_addr()
                    .map(|a| format!("http://{a}"))
                    .unwrap_or_else(|_| addr.to_string()),
                (Bound::Unix(..), _) => addr.to_string(),
            };
            tracing::info!("job server on {shown}");
            loops.push(http::serve(
                listener,
                api.clone(),
                config,
                permits.clone(),
                stopped.clone(),
            ));
        }
        Ok(JobServer { stop, loops })
    }

    /// Stops accepting, lets connections finish what they serve (briefly),
    /// and waits for that.
    pub(crate) async fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        let loops = std::mem::take(&mut self.loops);
        let _ = tokio::time::timeout(http::GRACE * 3, async {
            for l in loops {
                let _ = l.await;
            }
        })
        .await;
    }
}

impl Drop for JobServer {
    fn drop(&mut self) {
        for l in &self.loops {
            l.abort();
        }
    }
}

fn bind(addr: &Address, backlog: u32) -> Result<Bound> {
    let err =
        |e: std::io::Error| Error::with_io(Kind::Bind, format!("cannot serve jobs on {addr}"), e);
    match addr {
        Address::Tcp(_) => {
            let fd: OwnedFd = addr.bind(backlog)?;
            let std = std::net::TcpListener::from(fd);
            Ok(Bound::Tcp(
                tokio::net::TcpListener::from_std(std).map_err(err)?,
            ))
        }
        Address::Unix(path) => {
            let fd: OwnedFd = crate::socket::bind_private_unix(path, backlog)?;
            let std = std::os::unix::net::UnixListener::from(fd);
            let l = tokio::net::UnixListener::from_std(std).map_err(err)?;
            Ok(Bound::Unix(l, path.clone()))
        }
    }
}
