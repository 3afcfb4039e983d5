//! Listening addresses, binding with socket2, and the connected [`Stream`]
//! that listeners yield; [`stream_from_fd`] is the one place a descriptor
//! becomes a tokio stream.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::error::{Error, Kind, Result};

/// Default `listen(2)` backlog. std and mio hard-code 128, which overflows
/// under a burst of connections while every worker is busy or restarting.
pub const DEFAULT_BACKLOG: u32 = 2048;

/// A parsed listening address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Address {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "{a}"),
            Address::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

impl Address {
    /// Parses `host:port`, `tcp://host:port`, `:port` (all interfaces) or
    /// `unix:///absolute/path` (also `unix:relative/path`).
    pub(crate) fn parse(s: &str) -> Result<Address> {
        let invalid = |why: &str| {
            Error::new(
                Kind::InvalidAddress,
                format!("invalid address {s:?}: {why}"),
            )
        };
        if let Some(path) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            if path.is_empty() {
                return Err(invalid("empty socket path"));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        let hostport = s.strip_prefix("tcp://").unwrap_or(s);
        if hostport.contains("://") {
            return Err(invalid("unknown scheme (expected tcp:// or unix://)"));
        }
        if let Ok(addr) = hostport.parse::<SocketAddr>() {
            return Ok(Address::Tcp(addr));
        }
        let hostport = if hostport.starts_with(':') {
            format!("0.0.0.0{hostport}")
        } else {
            hostport.to_string()
        };
        let (_, port) = hostport
            .rsplit_once(':')
            .ok_or_else(|| invalid("expected host:port"))?;
        port.parse::<u16>().map_err(|_| invalid("bad port"))?;
        let mut addrs = hostport.to_socket_addrs().map_err(|e| {
            Error::with_io(Kind::InvalidAddress, format!("cannot resolve {s:?}"), e)
        })?;
        addrs
            .next()
            .map(Address::Tcp)
            .ok_or_else(|| invalid("host resolves to no address"))
    }

    /// Binds and listens, non-blocking and close-on-exec.
    pub(crate) fn bind(&self, backlog: u32) -> Result<OwnedFd> {
        let backlog = backlog.min(i32::MAX as u32) as i32;
        let bind_err =
            |e: io::Error| Error::with_io(Kind::Bind, format!("cannot listen on {self}"), e);
        match self {
            Address::Tcp(addr) => {
                let socket = Socket::new(Domain::for_address(*addr), Type::STREAM, None)
                    .map_err(bind_err)?;
                socket.set_reuse_address(true).map_err(bind_err)?;
                socket.set_nonblocking(true).map_err(bind_err)?;
                socket.bind(&SockAddr::from(*addr)).map_err(bind_err)?;
                socket.listen(backlog).map_err(bind_err)?;
                Ok(socket.into())
            }
            Address::Unix(path) => bind_unix(path, backlog as u32, None),
        }
    }

    /// Binds a TCP listener with `SO_REUSEPORT` (and `SO_REUSEADDR`), for the
    /// `reuseport` balancing mode: one per slot on the same address. `port`
    /// replaces the address's port (so every slot of a port-0 address gets
    /// the port the first one drew).
    pub(crate) fn bind_reuseport(&self, backlog: u32, port: Option<u16>) -> Result<OwnedFd> {
        let Address::Tcp(addr) = self else {
            return self.bind(backlog);
        };
        let mut addr = *addr;
        if let Some(port) = port {
            addr.set_port(port);
        }
        let backlog = backlog.min(i32::MAX as u32) as i32;
        let bind_err =
            |e: io::Error| Error::with_io(Kind::Bind, format!("cannot listen on {self}"), e);
        let socket =
            Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(bind_err)?;
        socket.set_reuse_address(true).map_err(bind_err)?;
        socket.set_reuse_port(true).map_err(bind_err)?;
        socket.set_nonblocking(true).map_err(bind_err)?;
        socket.bind(&SockAddr::from(addr)).map_err(bind_err)?;
        socket.listen(backlog).map_err(bind_err)?;
        Ok(socket.into())
    }

    /// The kind of connection this address accepts.
    pub(crate) fn stream_kind(&self) -> StreamKind {
        match self {
            Address::Tcp(_) => StreamKind::Tcp,
            Address::Unix(_) => StreamKind::Unix,
        }
    }
}

/// Binds and listens on a Unix socket at `path` that only this user (and
/// root) may connect to: the file is mode 0600 before `listen`, so nobody
/// can connect in between. A stale socket file is replaced.
pub(crate) fn bind_private_unix(path: &Path, backlog: u32) -> Result<OwnedFd> {
    bind_unix(path, backlog, Some(0o600))
}

/// Binds and listens on a Unix socket at `path` (replacing a stale socket
/// file), with the file's mode set to `mode` before `listen` when given.
fn bind_unix(path: &Path, backlog: u32, mode: Option<u32>) -> Result<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    let backlog = backlog.min(i32::MAX as u32) as i32;
    let bind_err = |e: io::Error| {
        Error::with_io(
            Kind::Bind,
            format!("cannot listen on unix://{}", path.display()),
            e,
        )
    };
    remove_stale_unix_socket(path).map_err(bind_err)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(bind_err)?;
    socket.set_nonblocking(true).map_err(bind_err)?;
    socket
        .bind(&SockAddr::unix(path).map_err(bind_err)?)
        .map_err(bind_err)?;
    if let Some(mode) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_err)?;
    }
    socket.listen(backlog).map_err(bind_err)?;
    Ok(socket.into())
}

/// Removes a Unix socket file left behind by a dead process. Refuses to
/// touch a socket someone still listens on, or a file that is not a socket.
fn remove_stale_unix_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "path exists and is not a socket",
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::from(io::ErrorKind::AddrInUse)),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

/// The peer address of an accepted [`Stream`]: what
/// [`Listener::accept`](crate::Listener::accept) returns beside it, and
/// what axum's `ConnectInfo<PeerAddr>` extracts (feature `axum`).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let listener = cluster::Cluster::server_socket_factory().listen("127.0.0.1:8080").await?;
/// let (_stream, peer) = listener.accept().await?;
/// if let Some(ip) = peer.tcp().map(|a| a.ip()) {
///     println!("a client from {ip} ({peer})");
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PeerAddr {
    /// A TCP peer.
    Tcp(SocketAddr),
    /// A Unix peer (usually unnamed).
    Unix(tokio::net::unix::SocketAddr),
}

impl PeerAddr {
    /// The TCP address, if this is a TCP peer.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            PeerAddr::Tcp(a) => Some(*a),
            PeerAddr::Unix(_) => None,
        }
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Tcp(a) => write!(f, "{a}"),
            PeerAddr::Unix(a) => match a.as_pathname() {
                Some(p) => write!(f, "unix://{}", p.display()),
                None => f.write_str("unix:(unnamed)"),
            },
        }
    }
}

/// A connection accepted from a [`Listener`](crate::Listener): tokio's
/// `AsyncRead + AsyncWrite`, so hyper serves it through
/// `hyper_util::rt::TokioIo` and axum through `axum::serve`.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tokio::io::AsyncWriteExt;
/// let listener = cluster::Cluster::server_socket_factory().listen("127.0.0.1:8080").await?;
/// let (mut stream, _peer) = listener.accept().await?;
/// stream.write_all(b"hello\n").await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix stream connection.
    Unix(UnixStream),
}

/// Which kind of stream socket a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamKind {
    Tcp,
    Unix,
}

/// Finds out what a received descriptor holds: a TCP or Unix stream socket
/// that is connected, not listening. One `getsockopt(SO_PROTOCOL)`
/// classifies the common case (only TCP and MPTCP sockets say
/// `IPPROTO_TCP`); Unix sockets say 0 and need two more (domain, type).
fn classify(sock: &Socket) -> io::Result<StreamKind> {
    let refuse = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, why.to_string());
    let kind = match sock.protocol()? {
        Some(p) if p == Protocol::TCP || p == Protocol::MPTCP => StreamKind::Tcp,
        Some(_) => return Err(refuse("neither TCP nor a Unix stream socket")),
        None => {
            if sock.domain()? != Domain::UNIX || sock.r#type()? != Type::STREAM {
                return Err(refuse("neither TCP nor a Unix stream socket"));
            }
            StreamKind::Unix
        }
    };
    if sock.is_listener()? {
        return Err(refuse("a listening socket, not a connection"));
    }
    Ok(kind)
}

/// Turns a connected socket (accepted, handed off by the watcher or
/// received over a pipe) into a tokio [`Stream`] on the current runtime.
/// `kind` is what the caller knows from where the socket came from; `None`
/// classifies the descriptor first (for sockets from another process).
/// The descriptor is made non-blocking: tokio requires it (a debug build
/// panics otherwise), and the flag lives in the open file description the
/// sender shares, so it is usually set already.
pub(crate) fn stream_from_fd(fd: OwnedFd, kind: Option<StreamKind>) -> io::Result<Stream> {
    let sock = Socket::from(fd);
    let kind = match kind {
        Some(k) => k,
        None => classify(&sock)?,
    };
    sock.set_nonblocking(true)?;
    match kind {
        StreamKind::Tcp => TcpStream::from_std(std::net::TcpStream::from(sock)).map(Stream::Tcp),
        StreamKind::Unix => {
            UnixStream::from_std(std::os::unix::net::UnixStream::from(sock)).map(Stream::Unix)
        }
    }
}

impl Stream {
    /// The connection as a plain descriptor (deregistered from tokio), to
    /// hand to another process.
    pub(crate) fn into_fd(self) -> io::Result<OwnedFd> {
        match self {
            Stream::Tcp(s) => s.into_std().map(OwnedFd::from),
            Stream::Unix(s) => s.into_std().map(OwnedFd::from),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_address_forms() {
        assert_eq!(
            Address::parse("127.0.0.1:80").unwrap(),
            Address::Tcp("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            Address::parse("tcp://[::1]:8080").unwrap(),
            Address::Tcp("[::1]:8080".parse().unwrap())
        );
        assert_eq!(
            Address::parse(":9000").unwrap(),
            Address::Tcp("0.0.0.0:9000".parse().unwrap())
        );
        assert_eq!(
            Address::parse("unix:///tmp/x.sock").unwrap(),
            Address::Unix("/tmp/x.sock".into())
        );
        assert!(Address::parse("localhost:81").is_ok());
    }

    #[test]
    fn rejects_bad_addresses() {
        for bad in [
            "",
            "nohost",
            "1.2.3.4:notaport",
            "udp://1.2.3.4:5",
            "unix://",
            "127.0.0.1:70000",
        ] {
            let err = Address::parse(bad).unwrap_err();
            assert!(err.is_invalid_address(), "{bad}: {err}");
        }
    }

    #[test]
    fn bind_reports_address_in_use() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = Address::parse(&taken.local_addr().unwrap().to_string()).unwrap();
        let err = addr.bind(16).unwrap_err();
        assert!(err.is_bind(), "{err}");
        assert!(err.to_string().contains("in use"), "{err}");
    }

    #[test]
    fn unix_socket_refuses_live_and_replaces_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let addr = Address::Unix(path.clone());
        let live = addr.bind(16).unwrap();
        assert!(addr.bind(16).unwrap_err().is_bind());
        drop(live); // the file stays: now stale
        assert!(path.exists());
        addr.bind(16).unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(Address::Unix(file).bind(16).unwrap_err().is_bind());
    }
}
