//! `axum::serve` on a [`Listener`] (feature `axum`): the same code serves
//! in every balance mode, standalone or under the watcher.
//!
//! `axum::serve::Listener::accept` cannot fail, so errors are handled
//! here as axum handles them for its own `TcpListener`: a connection that
//! failed before it was accepted (reset, aborted) is skipped at once;
//! anything else (out of descriptors) is logged and retried after a
//! second. In the balanced modes, a watcher that is gone ends nothing
//! here: the worker is being stopped (its `await_termination` returns),
//! so `accept` waits for that instead of spinning.

use std::io;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;

use crate::listener::Listener;
use crate::socket::{PeerAddr, Stream};

/// Whether `e` concerns one connection only (retry at once).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

impl axum::serve::Listener for Listener {
    type Io = Stream;
    type Addr = PeerAddr;

    async fn accept(&mut self) -> (Stream, PeerAddr) {
        loop {
            match Listener::accept(self).await {
                Ok(accepted) => return accepted,
                Err(e)
                    if matches!(self, Listener::Balanced(_))
                        && e.kind() == io::ErrorKind::ConnectionAborted =>
                {
                    // The watcher is gone: no connection will come.
                    std::future::pending::<()>().await;
                }
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    tracing::error!("accept failed: {e}; retrying in 1 s");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<PeerAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(PeerAddr::Tcp),
            Listener::Unix(l) => l.local_addr().map(PeerAddr::Unix),
            Listener::Balanced(l) => match l.local_addr().parse() {
                Ok(addr) => Ok(PeerAddr::Tcp(addr)),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("{} is not a TCP address", l.local_addr()),
                )),
            },
        }
    }
}

/// `ConnectInfo<PeerAddr>`: the client's address in a handler, with
/// `app.into_make_service_with_connect_info::<PeerAddr>()`.
impl Connected<IncomingStream<'_, Listener>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, Listener>) -> Self {
        stream.remote_addr().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn axum_serves_on_a_standalone_listener() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std.set_nonblocking(true).unwrap();
        let port = std.local_addr().unwrap().port();
        let listener = Listener::Tcp(tokio::net::TcpListener::from_std(std).unwrap());
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(
                |axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<PeerAddr>| async move {
                    format!("hi {}", peer.tcp().unwrap().ip())
                },
            ),
        );
        let server = tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<PeerAddr>(),
            )
            .await
            .unwrap();
        });
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("hi 127.0.0.1"), "{out}");
        server.abort();
    }
}
