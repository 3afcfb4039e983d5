//! Client socket handoff: one process accepts a connection and passes the
//! client socket, with serde data attached, to another process.
//!
//! A pipe is a connected `SOCK_SEQPACKET` Unix socket. Each handoff is one
//! datagram carrying exactly one descriptor (`SCM_RIGHTS`) and a private,
//! versioned postcard envelope around the user's postcard-encoded data, so
//! the socket and its data arrive together or not at all, in the order they
//! were sent. The transport is [`crate::ipc::Channel`]: descriptors arrive
//! close-on-exec and owned, truncated datagrams and surplus descriptors are
//! refused, and sends never raise `SIGPIPE`.
//!
//! Wire format of one datagram (private, may change between versions of
//! this crate; both ends must use the same version):
//!
//! ```text
//! postcard(Envelope { version: u8 = 1, data: bytes = postcard(T) })  + 1 fd
//! ```

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpStream, UnixStream};

use crate::error::{Error, Kind, Result};
use crate::ipc::codec::{self, encode_error, encode_limited};
use crate::ipc::message::MAX_MESSAGE;
use crate::ipc::{Channel, RecvError};
use crate::socket::{stream_from_fd, Stream};
use crate::sys;

/// Version of the private envelope; a receiver refuses any other.
const ENVELOPE_VERSION: u8 = 1;

/// Bytes the envelope adds around the user's data: the version byte and a
/// varint length (at most 3 bytes below 2^21), rounded up.
const ENVELOPE_OVERHEAD: usize = 16;

/// The largest postcard encoding of the data attached to one handoff, in
/// bytes (65,520). [`ClientSocketSendPipe::send`] refuses larger data with an
/// error for which [`Error::is_too_large`] is true.
pub const MAX_HANDOFF_DATA: usize = MAX_MESSAGE - ENVELOPE_OVERHEAD;

/// The envelope around the user's bytes. `data` is serialized as a sequence
/// of `u8`, which postcard encodes exactly like a byte string (varint length,
/// then the bytes), so it can be decoded borrowed, without a copy.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope<'a> {
    version: u8,
    #[serde(borrow)]
    data: &'a [u8],
}

/// Encodes `data` into one datagram, refusing anything over [`MAX_HANDOFF_DATA`].
fn encode<T: Serialize + ?Sized>(data: &T) -> Result<Vec<u8>> {
    let user = encode_limited(data, MAX_HANDOFF_DATA)
        .map_err(|e| encode_error("client socket handoff data", e))?;
    let envelope = Envelope {
        version: ENVELOPE_VERSION,
        data: &user,
    };
    encode_limited(&envelope, MAX_MESSAGE).map_err(|e| encode_error("client socket handoff", e))
}

/// Decodes one datagram's bytes. Never panics, whatever the bytes.
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let malformed =
        |why: String| Error::new(Kind::Ipc, format!("malformed client socket handoff: {why}"));
    let (envelope, rest) = postcard::take_from_bytes::<Envelope<'_>>(bytes)
        .map_err(|e| malformed(format!("bad envelope: {e}")))?;
    if !rest.is_empty() {
        return Err(malformed(format!("{} trailing bytes", rest.len())));
    }
    if envelope.version != ENVELOPE_VERSION {
        return Err(malformed(format!(
            "envelope version {} (expected {ENVELOPE_VERSION})",
            envelope.version
        )));
    }
    codec::decode(envelope.data).map_err(|e| malformed(format!("data: {e}")))
}

/// Wraps a checked pipe descriptor in a [`Channel`] on the current runtime.
fn channel(fd: OwnedFd) -> Result<Channel> {
    crate::pipe_end::channel(fd, "a client socket pipe")
}

/// A client socket that can be handed off with [`ClientSocketSendPipe::send`].
///
/// Made with `From` from tokio's or std's `TcpStream` and `UnixStream`, a
/// [`Stream`] accepted from a [`crate::Listener`], or an [`OwnedFd`] that
/// holds a connected stream socket. Anything else (a listening socket, a
/// datagram socket, a file) is refused by the receiver, not by the sender.
/// An unconnected stream socket is not detected; reads on it fail.
///
/// Dropping it closes the socket (a tokio stream is deregistered first).
///
/// ```no_run
/// # async fn send(pipe: cluster::ClientSocketSendPipe) -> Result<(), Box<dyn std::error::Error>> {
/// // A tokio TcpStream (or UnixStream, or an OwnedFd) is transferable.
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let (stream, _) = listener.accept().await?;
/// pipe.send(stream, &"some data").await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TransferableSocket {
    inner: Transferable,
}

#[derive(Debug)]
enum Transferable {
    Fd(OwnedFd),
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl TransferableSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.inner {
            Transferable::Fd(fd) => fd.as_fd(),
            Transferable::Tcp(s) => s.as_fd(),
            Transferable::Unix(s) => s.as_fd(),
        }
    }
}

impl From<OwnedFd> for TransferableSocket {
    fn from(fd: OwnedFd) -> Self {
        TransferableSocket {
            inner: Transferable::Fd(fd),
        }
    }
}

impl From<TcpStream> for TransferableSocket {
    fn from(s: TcpStream) -> Self {
        TransferableSocket {
            inner: Transferable::Tcp(s),
        }
    }
}

impl From<UnixStream> for TransferableSocket {
    fn from(s: UnixStream) -> Self {
        TransferableSocket {
            inner: Transferable::Unix(s),
        }
    }
}

impl From<std::net::TcpStream> for TransferableSocket {
    fn from(s: std::net::TcpStream) -> Self {
        OwnedFd::from(s).into()
    }
}

impl From<std::os::unix::net::UnixStream> for TransferableSocket {
    fn from(s: std::os::unix::net::UnixStream) -> Self {
        OwnedFd::from(s).into()
    }
}

impl From<Stream> for TransferableSocket {
    fn from(s: Stream) -> Self {
        match s {
            Stream::Tcp(s) => s.into(),
            Stream::Unix(s) => s.into(),
        }
    }
}

/// The sending end of a client socket pipe: hands accepted connections,
/// with data attached, to the process at the other end.
///
/// `send` takes `&self`, so several tasks may share one pipe (for example
/// through an `Arc`); each handoff is one atomic datagram.
///
/// # Examples
///
/// An acceptor hands every connection to a handler process, which serves
/// it (here both ends live in one process for brevity):
///
/// ```no_run
/// use cluster::{pipe_pair, ClientSocketReceivePipe, ClientSocketSendPipe};
/// use tokio::io::AsyncWriteExt;
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Meta {
///     number: u64,
///     peer: String,
/// }
///
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let (a, b) = pipe_pair()?;
///     let sender = ClientSocketSendPipe::new(a)?;
///     let receiver = ClientSocketReceivePipe::new(b)?;
///
///     tokio::spawn(async move {
///         // In the handler process: None once the sender closed its end.
///         while let Ok(Some(handoff)) = receiver.receive::<Meta>().await {
///             let (mut stream, meta) = handoff.into_parts();
///             let reply = format!("connection {} from {}\n", meta.number, meta.peer);
///             let _ = stream.write_all(reply.as_bytes()).await;
///         }
///     });
///
///     let listener = tokio::net::TcpListener::bind("127.0.0.1:8081").await?;
///     for number in 0.. {
///         let (stream, peer) = listener.accept().await?;
///         let meta = Meta { number, peer: peer.to_string() };
///         // Our copy of `stream` is closed once it was sent.
///         sender.send(stream, &meta).await?;
///     }
///     Ok(())
/// }
/// ```
#[derive(Debug)]
pub struct ClientSocketSendPipe {
    channel: Channel,
}

impl ClientSocketSendPipe {
    /// Wraps one end of a connected Unix `SOCK_SEQPACKET` socket (from
    /// [`pipe_pair`](crate::pipe_pair), [`ClientSocketPipeListener::accept`], or your own),
    /// making it non-blocking. Must be called within a tokio runtime; the
    /// pipe then belongs to that runtime's reactor.
    ///
    /// # Errors
    ///
    /// An error for which [`Error::is_ipc`] is true when no tokio runtime is
    /// running, when `fd` is not a Unix `SOCK_SEQPACKET` socket, or when it
    /// cannot be registered with the reactor. `fd` is closed in every case.
    pub fn new(fd: OwnedFd) -> Result<Self> {
        Ok(ClientSocketSendPipe {
            channel: channel(fd)?,
        })
    }

    /// Hands `socket` to the receiving process with `data` attached.
    ///
    /// Our copy of `socket` is closed when `send` returns, whether the
    /// handoff succeeded or not (and when the future is dropped before it
    /// completes): a socket is never leaked, and never half-sent. When the
    /// receiver is slow and the pipe's buffer is full, `send` waits (without
    /// spinning) until there is room.
    ///
    /// # Errors
    ///
    /// In every error case `socket` is closed and nothing was sent:
    ///
    /// * [`Error::is_too_large`]: `data` encodes to more than
    ///   [`MAX_HANDOFF_DATA`] bytes;
    /// * [`Error::is_ipc`]: `data` cannot be serialized, or the pipe failed,
    ///   for example because the receiver is gone (`EPIPE` or `ECONNRESET`
    ///   in [`Error::io_error`]; never `SIGPIPE`), or, for a non-root user,
    ///   too many descriptors are in flight in unread handoffs
    ///   (`ETOOMANYREFS`, bounded by `RLIMIT_NOFILE`).
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        socket: impl Into<TransferableSocket>,
        data: &T,
    ) -> Result<()> {
        let socket = socket.into();
        let bytes = encode(data)?;
        let sent = self.channel.send_bytes(&bytes, &[socket.as_fd()]).await;
        drop(socket);
        sent.map_err(|e| Error::with_io(Kind::Ipc, "cannot hand off the client socket", e))
    }
}

/// The receiving end of a client socket pipe.
///
/// `receive` takes `&self`; concurrent calls each get a different handoff.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let pipe = cluster::ClientSocketReceivePipe::connect("/tmp/handoff.sock")?;
/// while let Some(t) = pipe.receive::<String>().await? {
///     let (stream, data) = t.into_parts();
///     println!("got a connection with {data}");
/// #   drop(stream);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ClientSocketReceivePipe {
    channel: Channel,
    /// A receive buffer kept between calls (taken while a call runs).
    buf: Mutex<Vec<u8>>,
}

/// Puts the receive buffer back when a `receive` call ends or is dropped.
struct BufGuard<'a> {
    home: &'a Mutex<Vec<u8>>,
    buf: Vec<u8>,
}

impl Drop for BufGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut home) = self.home.lock() {
            if home.capacity() < self.buf.capacity() {
                *home = std::mem::take(&mut self.buf);
            }
        }
    }
}

impl ClientSocketReceivePipe {
    /// Wraps one end of a connected Unix `SOCK_SEQPACKET` socket (from
    /// [`pipe_pair`](crate::pipe_pair) or your own), making it non-blocking. Must be called
    /// within a tokio runtime; the pipe then belongs to that runtime's reactor.
    ///
    /// # Errors
    ///
    /// An error for which [`Error::is_ipc`] is true when no tokio runtime is
    /// running, when `fd` is not a Unix `SOCK_SEQPACKET` socket, or when it
    /// cannot be registered with the reactor. `fd` is closed in every case.
    pub fn new(fd: OwnedFd) -> Result<Self> {
        Ok(ClientSocketReceivePipe {
            channel: channel(fd)?,
            buf: Mutex::new(Vec::new()),
        })
    }

    /// Connects to the [`ClientSocketPipeListener`] bound at `path`; the
    /// listener's `accept` returns the matching [`ClientSocketSendPipe`].
    /// Must be called within a tokio runtime. The connect itself does not
    /// wait for the listener to accept, but blocks while its backlog is full.
    ///
    /// # Errors
    ///
    /// An error for which [`Error::is_ipc`] is true when nothing listens at
    /// `path` (`ECONNREFUSED`, `ENOENT`), the socket cannot be created, or
    /// no tokio runtime is running.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let err = |e| {
            Error::with_io(
                Kind::Ipc,
                format!(
                    "cannot connect to the client socket pipe {}",
                    path.display()
                ),
                e,
            )
        };
        let addr = SockAddr::unix(path).map_err(err)?;
        let sock = Socket::new(Domain::UNIX, Type::SEQPACKET, None).map_err(err)?;
        sock.connect(&addr).map_err(err)?;
        Self::new(sock.into())
    }

    /// Receives the next handoff: the client socket, ready to use as a tokio
    /// stream, and its data. Returns `Ok(None)` once the sender closed its
    /// end and every handoff before that was received.
    ///
    /// A handoff that fails to arrive intact is an error for this call
    /// only: its descriptors are closed (so that client's connection is
    /// dropped), and the next call receives the next handoff.
    ///
    /// # Errors
    ///
    /// An error for which [`Error::is_ipc`] is true when the pipe fails, or
    /// when a datagram is malformed: larger than the protocol allows, with
    /// no descriptor or more than one, with undecodable or trailing bytes,
    /// with data that is not a valid `T`, or with a descriptor that is not
    /// a TCP or Unix stream socket (or is a listening one).
    pub async fn receive<T: DeserializeOwned>(&self) -> Result<Option<TransferredSocket<T>>> {
        let mut guard = BufGuard {
            home: &self.buf,
            buf: self
                .buf
                .lock()
                .map(|mut b| std::mem::take(&mut *b))
                .unwrap_or_default(),
        };
        let (len, mut fds) = match self.channel.recv_bytes(&mut guard.buf).await {
            Ok(r) => r,
            Err(RecvError::Closed) => return Ok(None),
            Err(RecvError::Io(e)) => {
                return Err(Error::with_io(
                    Kind::Ipc,
                    "cannot receive a client socket",
                    e,
                ))
            }
            Err(e) => {
                return Err(Error::new(
                    Kind::Ipc,
                    format!("malformed client socket handoff: {e}"),
                ))
            }
        };
        if fds.len() != 1 {
            return Err(Error::new(
                Kind::Ipc,
                format!(
                    "malformed client socket handoff: {} descriptors attached (expected 1)",
                    fds.len()
                ),
            ));
        }
        let data: T = decode(&guard.buf[..len])?;
        let socket = stream_from_fd(fds.pop().expect("one descriptor"), None).map_err(|e| {
            Error::with_io(
                Kind::Ipc,
                "the handed-off descriptor is not a usable stream socket",
                e,
            )
        })?;
        Ok(Some(TransferredSocket { socket, data }))
    }
}

/// A client socket received from a [`ClientSocketReceivePipe`], with the
/// data the sender attached.
///
/// The socket is a [`Stream`] (`Tcp` or `Unix`, detected from the socket
/// itself), registered with the receiving runtime and ready for
/// `hyper_util::rt::TokioIo` or any tokio I/O.
///
/// ```no_run
/// # async fn run(pipe: cluster::ClientSocketReceivePipe) -> Result<(), Box<dyn std::error::Error>> {
/// if let Some(t) = pipe.receive::<u32>().await? {
///     println!("data {}", t.data());
///     let (stream, _data) = t.into_parts();
/// #   drop(stream);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TransferredSocket<T> {
    socket: Stream,
    data: T,
}

impl<T> TransferredSocket<T> {
    /// The client socket.
    pub fn socket(&self) -> &Stream {
        &self.socket
    }

    /// The client socket, mutably (to read and write through it).
    pub fn socket_mut(&mut self) -> &mut Stream {
        &mut self.socket
    }

    /// The client socket; the data is dropped.
    pub fn into_socket(self) -> Stream {
        self.socket
    }

    /// The data the sender attached.
    pub fn data(&self) -> &T {
        &self.data
    }

    /// The data the sender attached; the socket is closed.
    pub fn into_data(self) -> T {
        self.data
    }

    /// The client socket and the data.
    pub fn into_parts(self) -> (Stream, T) {
        (self.socket, self.data)
    }
}

/// A listening Unix `SOCK_SEQPACKET` socket at a filesystem path, so that
/// processes which cannot inherit a [`pipe_pair`](crate::pipe_pair) end (a child started with
/// `std::process::Command`, an unrelated process) can get a pipe by
/// connecting with [`ClientSocketReceivePipe::connect`].
///
/// The socket file is removed when the listener is dropped. Anyone allowed
/// to connect to the path can receive sockets: put it in a directory only
/// the intended user can reach.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let listener = cluster::ClientSocketPipeListener::bind("/tmp/handoff.sock")?;
/// let pipe = listener.accept().await?; // a ClientSocketSendPipe to that process
/// # drop(pipe);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ClientSocketPipeListener {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
}

impl ClientSocketPipeListener {
    /// Binds and listens at `path` (close-on-exec, non-blocking). Must be
    /// called within a tokio runtime. An existing file at `path` is not
    /// replaced.
    ///
    /// # Errors
    ///
    /// An error for which [`Error::is_bind`] is true when the socket cannot
    /// be bound (the path exists, its directory is missing or not writable,
    /// the path is too long), and one for which [`Error::is_ipc`] is true
    /// when no tokio runtime is running.
    pub fn bind(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::new(
                Kind::Ipc,
                "a client socket pipe listener must be created within a tokio runtime",
            ));
        }
        let err = |e| {
            Error::with_io(
                Kind::Bind,
                format!("cannot listen on the client socket pipe {}", path.display()),
                e,
            )
        };
        let addr = SockAddr::unix(path).map_err(err)?;
        let sock = Socket::new(Domain::UNIX, Type::SEQPACKET, None).map_err(err)?;
        sock.set_nonblocking(true).map_err(err)?;
        sock.bind(&addr).map_err(err)?;
        // The file is ours from here on: remove it if we fail.
        let registered = sock
            .listen(128)
            .and_then(|()| sys::register_async(OwnedFd::from(sock)));
        match registered {
            Ok(fd) => Ok(ClientSocketPipeListener {
                fd,
                path: path.to_path_buf(),
            }),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(err(e))
            }
        }
    }

    /// The path this listener is bound to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for a process to connect with [`ClientSocketReceivePipe::connect`]
    /// and returns the sending end of that pipe.
    ///
    /// # Errors
    ///
    /// An error for which [`Error::is_ipc`] is true when `accept(2)` fails
    /// (for example at the descriptor limit); the listener stays usable.
    pub async fn accept(&self) -> Result<ClientSocketSendPipe> {
        let err = |e| Error::with_io(Kind::Ipc, "cannot accept a client socket pipe", e);
        loop {
            let mut guard = self.fd.readable().await.map_err(err)?;
            match guard.try_io(|inner| SockRef::from(inner.get_ref()).accept()) {
                Ok(Ok((sock, _addr))) => return ClientSocketSendPipe::new(sock.into()),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Ok(Err(e)) => return Err(err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl Drop for ClientSocketPipeListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipe_end::pipe_pair;
    use std::os::fd::AsRawFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn envelope_round_trip_and_layout() {
        let bytes = encode(&(7u8, "hi")).unwrap();
        // version, envelope length, then postcard((7, "hi")) = 7, 2, 'h', 'i'.
        assert_eq!(bytes, [ENVELOPE_VERSION, 4, 7, 2, b'h', b'i']);
        assert_eq!(decode::<(u8, String)>(&bytes).unwrap(), (7, "hi".into()));
    }

    #[test]
    fn largest_data_fits_the_channel() {
        let data = vec![0u8; MAX_HANDOFF_DATA - 3]; // 3-byte varint length
        let bytes = encode(&data).unwrap();
        assert!(bytes.len() <= MAX_MESSAGE);
        let too_big = vec![0u8; MAX_HANDOFF_DATA];
        assert!(encode(&too_big).unwrap_err().is_too_large());
    }

    #[test]
    fn bad_envelopes_are_errors() {
        let mut wrong_version = encode(&1u32).unwrap();
        wrong_version[0] = ENVELOPE_VERSION + 1;
        let mut trailing = encode(&1u32).unwrap();
        trailing.push(0);
        for bad in [
            &[][..],
            &[ENVELOPE_VERSION][..],
            &[ENVELOPE_VERSION, 9, 1][..],
        ] {
            assert!(decode::<u32>(bad).unwrap_err().is_ipc());
        }
        assert!(decode::<u32>(&wrong_version).unwrap_err().is_ipc());
        assert!(decode::<u32>(&trailing).unwrap_err().is_ipc());
        // Valid envelope, data of the wrong type.
        assert!(decode::<String>(&encode(&[0xffu8; 4]).unwrap()).is_err());
    }

    #[tokio::test]
    async fn hands_off_a_unix_stream() {
        let (a, b) = pipe_pair().unwrap();
        let tx = ClientSocketSendPipe::new(a).unwrap();
        let rx = ClientSocketReceivePipe::new(b).unwrap();
        let (mine, mut peer) = UnixStream::pair().unwrap();
        tx.send(mine, "unix").await.unwrap();
        let got = rx.receive::<String>().await.unwrap().unwrap();
        assert_eq!(got.data(), "unix");
        let (mut stream, _) = got.into_parts();
        assert!(matches!(stream, Stream::Unix(_)));
        stream.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn refuses_a_stream_socket_as_pipe() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = ClientSocketSendPipe::new(a.into()).unwrap_err();
        assert!(err.is_ipc(), "{err}");
    }

    #[test]
    fn refuses_to_start_outside_a_runtime() {
        let (a, _b) = pipe_pair().unwrap();
        assert!(ClientSocketReceivePipe::new(a).unwrap_err().is_ipc());
    }

    #[tokio::test]
    async fn non_stream_descriptor_is_refused_and_closed() {
        let (a, b) = pipe_pair().unwrap();
        let tx = ClientSocketSendPipe::new(a).unwrap();
        let rx = ClientSocketReceivePipe::new(b).unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        tx.send(r, &1u8).await.unwrap();
        assert!(rx.receive::<u8>().await.unwrap_err().is_ipc());
        // The read end was closed on both sides: writing now fails with
        // EPIPE (the Rust runtime ignores SIGPIPE).
        let rc = nix::unistd::write(&w, b"x");
        assert_eq!(rc, Err(nix::errno::Errno::EPIPE), "fd {}", w.as_raw_fd());
    }
}
