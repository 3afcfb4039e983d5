//! The child's side: [`ServerSocketPipeFactory`].

use std::os::fd::OwnedFd;

use socket2::{Domain, SockRef, Type};

use super::wire::{self, Request, MAX_ADDR_LEN};
use crate::error::{Error, Kind, Result};
use crate::ipc::{Channel, RecvError};
use crate::listener::Listener;
use crate::socket::Address;

/// The child's side of a server socket pipe: a factory of listening
/// sockets that asks the [`ServerSocketPipeProvider`](crate::ServerSocketPipeProvider)
/// at the other end of a pipe for them, so every process asking for one
/// address shares the provider's one socket and accept queue.
///
/// [`listen`](Self::listen) takes the address forms of
/// [`ServerSocketFactory::listen`](crate::ServerSocketFactory::listen) and
/// returns the same [`Listener`]; both implement
/// [`ListenerFactory`](crate::ListenerFactory), so server code written
/// against that trait takes either. `listen` takes `&self`: several tasks
/// may ask at once (their requests are answered one after the other).
///
/// ```no_run
/// # async fn run() -> Result<(), cluster::Error> {
/// // In a child whose parent passed its pipe end as SERVER_PIPE_FD.
/// let pipe = cluster::inherited_pipe("SERVER_PIPE_FD")?;
/// let factory = cluster::ServerSocketPipeFactory::new(pipe)?;
/// let listener = factory.listen("127.0.0.1:1337").await?;
/// while let Ok((stream, _peer)) = listener.accept().await {
///     // serve `stream`
/// #   drop(stream);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ServerSocketPipeFactory {
    channel: Channel,
    /// Held while a request is answered: the next id and the receive buffer.
    state: tokio::sync::Mutex<State>,
}

#[derive(Debug)]
struct State {
    last_id: u64,
    buf: Vec<u8>,
}

impl ServerSocketPipeFactory {
    /// Wraps one end of a connected Unix `SOCK_SEQPACKET` socket (from
    /// [`pipe_pair`](crate::pipe_pair), [`inherited_pipe`](crate::inherited_pipe)
    /// or your own) whose other end a provider serves, making it
    /// non-blocking. Must be called within a tokio runtime.
    ///
    /// # Errors
    ///
    /// An error for which [`Error::is_ipc`] is true when no tokio runtime is
    /// running, when `pipe` is not a Unix `SOCK_SEQPACKET` socket, or when
    /// it cannot be registered with the reactor. `pipe` is closed in every
    /// case.
    pub fn new(pipe: OwnedFd) -> Result<Self> {
        Ok(ServerSocketPipeFactory {
            channel: crate::pipe_end::channel(pipe, "a server socket pipe")?,
            state: tokio::sync::Mutex::new(State {
                last_id: 0,
                buf: Vec::new(),
            }),
        })
    }

    /// Returns a listener for `addr` (`host:port`, `tcp://host:port`,
    /// `:port`, `unix:///path`): the provider binds it on the first request
    /// for it and sends this process a duplicate. Port 0 gives every
    /// process that asks the same ephemeral port.
    ///
    /// A `listen` future dropped before it completes leaves the pipe
    /// usable: its reply, when it comes, is discarded by the next call
    /// (its socket closed).
    ///
    /// # Errors
    ///
    /// [`Error::is_invalid_address`] for an unparsable address (nothing is
    /// asked); the provider's own error when it refuses, with its reason:
    /// [`Error::is_bind`] when the address cannot be bound there (in use,
    /// not permitted; [`Error::io_error`] gives the OS error), an error for
    /// which neither holds past the provider's bounds; [`Error::is_ipc`]
    /// when the provider closed the pipe, the pipe failed, or the reply is
    /// malformed.
    pub async fn listen(&self, addr: &str) -> Result<Listener> {
        let parsed = Address::parse(addr)?;
        if addr.len() > MAX_ADDR_LEN {
            return Err(Error::new(
                Kind::InvalidAddress,
                format!("invalid address: longer than {MAX_ADDR_LEN} bytes"),
            ));
        }
        let fd = self.request(addr).await?;
        check_kind(&fd, &parsed)?;
        Listener::from_fd(&parsed, fd).map_err(|e| {
            Error::with_io(Kind::Io, format!("cannot use the listener for {parsed}"), e)
        })
    }

    /// Asks for `addr` and waits for the answer to this request.
    async fn request(&self, addr: &str) -> Result<OwnedFd> {
        let ipc = |what: String| move |e| Error::with_io(Kind::Ipc, what, e);
        let malformed =
            |why: String| Error::new(Kind::Ipc, format!("malformed server socket reply: {why}"));
        let mut state = self.state.lock().await;
        state.last_id += 1;
        let id = state.last_id;
        let bytes = wire::encode_request(&Request {
            id,
            addr: addr.to_string(),
        });
        self.channel
            .send_bytes(&bytes, &[])
            .await
            .map_err(ipc(format!(
                "cannot ask the server socket provider for {addr}"
            )))?;
        loop {
            let (len, mut fds) = match self.channel.recv_bytes(&mut state.buf).await {
                Ok(received) => received,
                Err(RecvError::Closed) => {
                    return Err(Error::new(
                        Kind::Ipc,
                        format!(
                            "cannot listen on {addr}: the server socket provider closed the pipe"
                        ),
                    ))
                }
                Err(RecvError::Io(e)) => {
                    return Err(ipc(format!("cannot listen on {addr}: the pipe failed"))(e))
                }
                Err(e) => return Err(malformed(e.to_string())),
            };
            let reply = wire::decode_reply(&state.buf[..len]).map_err(malformed)?;
            if reply.id < id {
                // The answer to a cancelled `listen`: its socket closes here.
                continue;
            }
            if reply.id > id {
                return Err(malformed(format!(
                    "an answer to request {} (asked {id})",
                    reply.id
                )));
            }
            return match (reply.result, fds.len()) {
                (Ok(()), 1) => Ok(fds.remove(0)),
                (Ok(()), n) => Err(malformed(format!("{n} descriptors attached (expected 1)"))),
                (Err(refusal), _) => Err(refusal.into_error()),
            };
        }
    }
}

/// Refuses a descriptor that is not a stream socket of `addr`'s family.
fn check_kind(fd: &OwnedFd, addr: &Address) -> Result<()> {
    let sock = SockRef::from(fd);
    let unix = matches!(addr, Address::Unix(_));
    let ok = match (sock.r#type(), sock.domain()) {
        (Ok(ty), Ok(domain)) => ty == Type::STREAM && (domain == Domain::UNIX) == unix,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            Kind::Ipc,
            format!("malformed server socket reply: the socket for {addr} is not a stream socket of its family"),
        ))
    }
}
