//! The two links between the watchers of an upgrade, and the storage
//! snapshot file they share. A leaf.
//!
//! * The *link*: one end of a stream socketpair each; JSON lines both
//!   ways (unknown lines are logged and skipped, so versions can add
//!   messages; an over-long line ends the reading).
//! * The *connection link*: a `SOCK_SEQPACKET` pair; the old watcher sends
//!   each connection its balancers still hold, one per datagram with its
//!   address, to the new watcher's balancer for that address.
//! * The snapshot file: an anonymous file both watchers have open; the old
//!   one writes its store into it, the new one reads it.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::ipc::{self, codec, Channel};
use crate::socket::Address;

/// Longest line either side sends on the link.
const MAX_LINE: u64 = 4096;

/// How long forwarding one connection may wait for room in the
/// connection link before the connection is closed.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// The writing end of a link: one JSON line per message.
pub(crate) struct LinkTx(Box<dyn Write + Send>);

impl LinkTx {
    pub(crate) fn new(w: impl Write + Send + 'static) -> LinkTx {
        LinkTx(Box::new(w))
    }

    /// Writes `msg` (never blocks for long: the messages are a few bytes
    /// and the peer reads them at once).
    pub(crate) fn send<T: Serialize>(&mut self, msg: &T) -> io::Result<()> {
        let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
        line.push(b'\n');
        self.0.write_all(&line)?;
        self.0.flush()
    }
}

impl std::fmt::Debug for LinkTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkTx")
    }
}

/// One connection on the connection link (its descriptor rides along).
#[derive(Debug, Serialize, Deserialize)]
struct Forwarded {
    /// The address the workers asked for, as the balancers know it.
    addr: String,
    /// The client's address, as the balancer printed it.
    peer: String,
}

/// The old watcher's end of the connection link.
#[derive(Debug)]
pub(crate) struct ConnForward {
    fd: OwnedFd,
}

impl ConnForward {
    pub(crate) fn new(fd: OwnedFd) -> ConnForward {
        ConnForward { fd }
    }

    /// Sends connection `fd` from `peer`, accepted on `addr`, to the new
    /// watcher. Waits at most [`FORWARD_TIMEOUT`] for room (the new
    /// watcher reads at once; a datagram is a few dozen bytes); the caller
    /// closes `fd` either way.
    ///
    /// # Errors
    ///
    /// The socket's error: the new watcher is gone or does not read.
    pub(crate) fn send(&self, addr: &Address, fd: &OwnedFd, peer: &str) -> io::Result<()> {
        let msg = Forwarded {
            addr: addr.to_string(),
            peer: peer.to_string(),
        };
        let bytes = codec::encode(&msg).map_err(|e| io::Error::other(e.to_string()))?;
        let deadline = Instant::now() + FORWARD_TIMEOUT;
        loop {
            match crate::sys::send_with_fds(self.fd.as_fd(), &bytes, &[fd.as_fd()]) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::from(io::ErrorKind::TimedOut));
                    }
                    let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
                    let mut poll = [nix::poll::PollFd::new(
                        self.fd.as_fd(),
                        nix::poll::PollFlags::POLLOUT,
                    )];
                    match nix::poll::poll(&mut poll, nix::poll::PollTimeout::from(ms)) {
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A pair for a connection link (`SOCK_SEQPACKET`, both ends close-on-exec).
pub(crate) fn conns_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    ipc::pair()
}

/// Reads connections from the old watcher until the connection link
/// closes, handing each to `on`. A datagram that is not one connection
/// with one descriptor is logged and dropped (its descriptors closed).
/// Must be called within a tokio runtime.
pub(crate) async fn read_conns(fd: OwnedFd, mut on: impl FnMut(Address, String, OwnedFd)) {
    let channel = match Channel::new(fd) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("upgrade: cannot read the connection link: {e}");
            return;
        }
    };
    let mut buf = Vec::new();
    loop {
        match channel.recv::<Forwarded>(&mut buf).await {
            Ok((msg, fds)) => {
                let addr = Address::parse(&msg.addr);
                match (addr, <[OwnedFd; 1]>::try_from(fds)) {
                    (Ok(addr), Ok([fd])) => on(addr, msg.peer, fd),
                    _ => tracing::warn!(
                        "upgrade: a malformed connection from the old watcher ({:?}); closed",
                        msg.addr
                    ),
                }
            }
            Err(ipc::RecvError::Closed) => return,
            Err(e) => {
                tracing::warn!("upgrade: connection link: {e}");
                if matches!(e, ipc::RecvError::Io(_)) {
                    return;
                }
            }
        }
    }
}

/// A socketpair for a link (both ends close-on-exec).
pub(crate) fn link_pair() -> io::Result<(UnixStream, UnixStream)> {
    UnixStream::pair()
}

/// Splits one end of a link into its writer and a tokio stream to read.
/// Must be called within a tokio runtime.
pub(crate) fn split(end: UnixStream) -> io::Result<(LinkTx, tokio::net::UnixStream)> {
    let reader = end.try_clone()?;
    // Shared by both handles (one open file description): writes of a few
    // bytes to a socket the peer drains never find it full.
    reader.set_nonblocking(true)?;
    Ok((LinkTx::new(end), tokio::net::UnixStream::from_std(reader)?))
}

/// Reads `T` messages from a link until EOF, handing each to `on`; a line
/// that is not a `T` (a newer peer's message) is logged and skipped. An
/// over-long line ends the reading (as EOF does).
pub(crate) async fn read_link<T: serde::de::DeserializeOwned>(
    stream: tokio::net::UnixStream,
    mut on: impl FnMut(T),
) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_LINE);
        match limited.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) if !line.ends_with('\n') => {
                tracing::warn!("upgrade link: a line over {MAX_LINE} bytes; closing the link");
                return;
            }
            Ok(_) => match serde_json::from_str::<T>(line.trim()) {
                Ok(msg) => on(msg),
                Err(e) => tracing::warn!("upgrade link: ignoring {:?}: {e}", line.trim()),
            },
        }
    }
}

/// An anonymous file (`O_TMPFILE` in the temporary directory, else a
/// file removed at once) holding `text`: the storage snapshot handed to
/// the new watcher.
///
/// # Errors
///
/// The error of creating or writing it.
pub(crate) fn snapshot_file(text: &str) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::env::temp_dir();
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(&dir)
    {
        Ok(f) => f,
        Err(_) => {
            // No O_TMPFILE on this file system: a private name, removed
            // as soon as it is open.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let name = dir.join(format!(".cluster-upgrade-{}-{nanos:x}", std::process::id()));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&name)?;
            let _ = std::fs::remove_file(&name);
            f
        }
    };
    rewrite_snapshot(&file, text)?;
    Ok(file)
}

/// Replaces what the snapshot file holds with `text` (both watchers have
/// it open: the new one reads what the old one wrote before `commit`).
///
/// # Errors
///
/// The error of writing it.
pub(crate) fn rewrite_snapshot(file: &File, text: &str) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.set_len(0)?;
    file.write_all_at(text.as_bytes(), 0)
}

/// What the snapshot file holds now.
///
/// # Errors
///
/// The error of reading it, or `InvalidData` when it is not UTF-8.
pub(crate) fn read_snapshot(file: &File) -> io::Result<String> {
    use std::io::{Read, Seek};
    let mut f = file.try_clone()?;
    f.seek(io::SeekFrom::Start(0))?;
    let mut text = String::new();
    f.read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "msg", rename_all = "snake_case")]
    enum Msg {
        Ready,
        Failed { why: String },
    }

    #[tokio::test]
    async fn the_link_carries_lines_and_skips_unknown_ones() {
        let (a, b) = link_pair().unwrap();
        let (mut tx, _) = split(a).unwrap();
        let (_, rx) = split(b).unwrap();
        tx.send(&Msg::Ready).unwrap();
        tx.0.write_all(b"{\"msg\":\"from_the_future\"}\n").unwrap();
        tx.send(&Msg::Failed { why: "x".into() }).unwrap();
        drop(tx);
        let mut got = Vec::new();
        read_link::<Msg>(rx, |m| got.push(m)).await;
        assert_eq!(got, vec![Msg::Ready, Msg::Failed { why: "x".into() }]);
    }

    #[tokio::test]
    async fn connections_cross_the_connection_link_with_their_address() {
        let (a, b) = conns_pair().unwrap();
        let tx = ConnForward::new(a);
        let (mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let addr = Address::parse("127.0.0.1:8080").unwrap();
        tx.send(&addr, &OwnedFd::from(theirs), "10.0.0.1:5000")
            .unwrap();
        // A datagram without a descriptor is dropped, the link goes on.
        crate::sys::send_with_fds(tx.fd.as_fd(), b"\x00\x00", &[]).unwrap();
        let (a2, _keep) = std::os::unix::net::UnixStream::pair().unwrap();
        tx.send(&addr, &OwnedFd::from(a2), "10.0.0.2:5000").unwrap();
        drop(tx);
        let mut got = Vec::new();
        read_conns(b, |addr, peer, fd| got.push((addr.to_string(), peer, fd))).await;
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "127.0.0.1:8080");
        assert_eq!(got[0].1, "10.0.0.1:5000");
        // The descriptor is the same socket: what is written arrives.
        let mut s = std::os::unix::net::UnixStream::from(got.remove(0).2);
        s.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        std::io::Read::read_exact(&mut &mine, &mut buf).unwrap();
        assert_eq!(&buf, b"hi");
    }
}
