//! The parent's side: [`ServerSocketPipeProvider`].

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use super::shared::SharedSockets;
use super::wire::{self, Refusal, Reply};
use crate::error::{Error, Kind, Result};
use crate::ipc::{Channel, RecvError};
use crate::socket::{Address, DEFAULT_BACKLOG};

/// Distinct addresses one connection of a [`ServerSocketPipeProvider`] may
/// ask for (as a worker may of the watcher); a request for one more is
/// refused with an error, which the peer's `listen` returns, and the
/// connection stays usable.
pub const MAX_PIPE_ADDRESSES: usize = 64;

/// Listening sockets one provider holds at most (as the watcher).
const MAX_SOCKETS: usize = 1024;

/// The parent's side of a server socket pipe: answers the requests of
/// [`ServerSocketPipeFactory`](crate::ServerSocketPipeFactory)s for
/// listening sockets.
///
/// Each address is bound once per provider, on the first request, with the
/// watcher's options (a backlog of [`DEFAULT_BACKLOG`](crate::DEFAULT_BACKLOG)
/// unless [`with_backlog`](Self::with_backlog) says otherwise,
/// `SO_REUSEADDR`, a stale Unix socket file replaced), and every requester
/// gets a duplicate of that one socket: any number of processes listening
/// on one address share one accept queue. Port 0 is bound once too, so
/// everyone gets the same ephemeral port. The sockets stay open for as long
/// as the provider (any clone of it) lives; then they are closed and the
/// files of Unix sockets removed (processes that got a duplicate keep
/// serving on it).
///
/// The provider is a cheap handle (`Clone`): one provider serves many
/// connections at once, each with [`provide_for`](Self::provide_for) in a
/// task of its own. The watcher's own listener registry binds and
/// duplicates its shared-mode listeners with the same code.
///
/// A connection's requests are its own: a peer that sends a malformed,
/// oversized or truncated datagram, or attaches descriptors, gets its
/// connection closed (`provide_for` returns an error for which
/// [`Error::is_ipc`] is true); one that asks for more than
/// [`MAX_PIPE_ADDRESSES`] distinct addresses is refused those. Nothing a
/// peer sends disturbs the other connections.
///
/// ```no_run
/// use cluster::{pipe_pair, ServerSocketPipeFactory, ServerSocketPipeProvider};
///
/// # async fn run() -> Result<(), cluster::Error> {
/// let provider = ServerSocketPipeProvider::new();
/// let (parent_end, child_end) = pipe_pair()?;
/// // In the parent: serve the connection until the child closes it.
/// let p = provider.clone();
/// tokio::spawn(async move { p.provide_for(parent_end).await });
/// // In the child (a process that inherited `child_end`, usually):
/// let factory = ServerSocketPipeFactory::new(child_end)?;
/// let listener = factory.listen("127.0.0.1:1337").await?;
/// # drop(listener);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ServerSocketPipeProvider {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    sockets: Mutex<SharedSockets>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.sockets
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .close_all();
    }
}

impl Default for ServerSocketPipeProvider {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerSocketPipeProvider {
    /// A provider that binds with a backlog of
    /// [`DEFAULT_BACKLOG`](crate::DEFAULT_BACKLOG).
    pub fn new() -> Self {
        Self::with_backlog(DEFAULT_BACKLOG)
    }

    /// A provider that binds with a `listen(2)` backlog of `backlog`.
    pub fn with_backlog(backlog: u32) -> Self {
        ServerSocketPipeProvider {
            inner: Arc::new(Inner {
                sockets: Mutex::new(SharedSockets::new(backlog)),
            }),
        }
    }

    /// Serves the requests that arrive on `pipe` (one end of a connected
    /// Unix `SOCK_SEQPACKET` socket: from [`pipe_pair`](crate::pipe_pair),
    /// [`inherited_pipe`](crate::inherited_pipe) or your own) until the
    /// peer closes its end. Must be called within a tokio runtime.
    ///
    /// Each request is answered with a duplicate of the address's socket,
    /// or with the error that binding it gave (the peer's `listen` returns
    /// that error). Run one `provide_for` per connection, each in a task
    /// of its own, to serve many at once.
    ///
    /// # Errors
    ///
    /// `Ok(())` when the peer closed the pipe. An error for which
    /// [`Error::is_ipc`] is true when `pipe` is not a Unix
    /// `SOCK_SEQPACKET` socket, no tokio runtime is running, the pipe
    /// fails, or the peer sent a malformed request (the connection is
    /// closed then). `pipe` is closed when this returns.
    pub async fn provide_for(&self, pipe: OwnedFd) -> Result<()> {
        self.provide_for_until(pipe, std::future::pending()).await
    }

    /// [`provide_for`](Self::provide_for) until `cancel` completes too:
    /// then it returns `Ok(())` and closes `pipe` (a request being answered
    /// is dropped; the peer sees the pipe close). The sockets stay with the
    /// provider.
    ///
    /// # Errors
    ///
    /// As for [`provide_for`](Self::provide_for).
    pub async fn provide_for_until(
        &self,
        pipe: OwnedFd,
        cancel: impl Future<Output = ()>,
    ) -> Result<()> {
        let channel = crate::pipe_end::channel(pipe, "a server socket pipe")?;
        tokio::select! {
            biased;
            () = cancel => Ok(()),
            served = self.serve(&channel) => served,
        }
    }

    async fn serve(&self, channel: &Channel) -> Result<()> {
        let malformed = |why: String| {
            Error::new(
                Kind::Ipc,
                format!("malformed server socket request: {why}; connection closed"),
            )
        };
        let mut buf = Vec::new();
        let mut asked = HashSet::new();
        loop {
            let (len, fds) = match channel.recv_bytes(&mut buf).await {
                Ok(received) => received,
                Err(RecvError::Closed) => return Ok(()),
                Err(RecvError::Io(e)) => {
                    return Err(Error::with_io(
                        Kind::Ipc,
                        "the server socket pipe failed",
                        e,
                    ))
                }
                Err(e) => return Err(malformed(e.to_string())),
            };
            if !fds.is_empty() {
                // Dropped here: every descriptor a peer attaches is closed.
                return Err(malformed(format!("{} descriptors attached", fds.len())));
            }
            let request = wire::decode_request(&buf[..len]).map_err(malformed)?;
            let granted = self.grant(&request.addr, &mut asked);
            let (reply, fd) = match granted {
                Ok(fd) => (Ok(()), Some(fd)),
                Err(e) => (Err(Refusal::from_error(&e)), None),
            };
            let bytes = wire::encode_reply(&Reply {
                id: request.id,
                result: reply,
            });
            let fds: Vec<_> = fd.iter().map(|fd| fd.as_fd()).collect();
            // Our duplicate is closed once sent (the peer has its own).
            match channel.send_bytes(&bytes, &fds).await {
                Ok(()) => {}
                Err(e) if gone(&e) => return Ok(()),
                Err(e) => {
                    return Err(Error::with_io(
                        Kind::Ipc,
                        "cannot answer on the server socket pipe",
                        e,
                    ))
                }
            }
        }
    }

    /// A duplicate of the socket for `addr`, bound on first request.
    fn grant(&self, addr: &str, asked: &mut HashSet<Address>) -> Result<OwnedFd> {
        let address = Address::parse(addr)?;
        if !asked.contains(&address) && asked.len() >= MAX_PIPE_ADDRESSES {
            return Err(Error::new(
                Kind::Io,
                format!("cannot listen on {address}: one connection may ask for at most {MAX_PIPE_ADDRESSES} addresses"),
            ));
        }
        let mut sockets = self.sockets();
        if !sockets.contains(&address) && sockets.len() >= MAX_SOCKETS {
            return Err(Error::new(
                Kind::Io,
                format!(
                    "cannot listen on {address}: the provider already holds {MAX_SOCKETS} sockets"
                ),
            ));
        }
        let (fd, bound) = sockets.grant(&address)?;
        drop(sockets);
        if bound {
            tracing::debug!("server socket pipe provider: listening on {address}");
        }
        asked.insert(address);
        Ok(fd)
    }

    fn sockets(&self) -> MutexGuard<'_, SharedSockets> {
        // Nothing panics while holding it; a poisoned lock is still sound.
        self.inner.sockets.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The peer closed its end while we answered.
fn gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}
