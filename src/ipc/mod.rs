//! The IPC channel: one `SOCK_SEQPACKET` socketpair per worker.
//!
//! Each datagram is exactly one postcard-encoded message plus the file
//! descriptors that belong to it, so message boundaries and descriptor
//! attachment are atomic. Descriptors arrive with `MSG_CMSG_CLOEXEC` and as
//! `OwnedFd`, so none leaks into a child and none is lost on an error path.
//! Truncated datagrams, cut control data, oversized messages and too many
//! descriptors are errors, never silently accepted.

pub(crate) mod codec;
pub(crate) mod env;
pub(crate) mod message;
pub(crate) mod parts;

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::unix::AsyncFd;

use crate::sys;
use codec::{DecodeError, EncodeError};
use message::{MAX_FDS, MAX_MESSAGE};

/// Creates a connected `SOCK_SEQPACKET` pair, both ends `O_CLOEXEC`.
pub(crate) fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

/// Why receiving a message failed.
#[derive(Debug)]
pub(crate) enum RecvError {
    /// The peer closed its end (EOF).
    Closed,
    /// The socket failed.
    Io(io::Error),
    /// The datagram was longer than [`MAX_MESSAGE`].
    TooLarge,
    /// More descriptors arrived than the protocol allows, or the control data was cut.
    TooManyFds(usize),
    /// The bytes were not a valid message.
    Decode(DecodeError),
    /// An empty datagram: no message of the protocol is empty.
    Empty,
}

impl std::fmt::Display for RecvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecvError::Closed => f.write_str("channel closed"),
            RecvError::Io(e) => write!(f, "channel error: {e}"),
            RecvError::TooLarge => write!(f, "message exceeds {MAX_MESSAGE} bytes"),
            RecvError::TooManyFds(n) => {
                write!(f, "message carries {n} descriptors (limit {MAX_FDS})")
            }
            RecvError::Decode(e) => e.fmt(f),
            RecvError::Empty => f.write_str("empty datagram"),
        }
    }
}

/// Why sending a message failed.
#[derive(Debug)]
pub(crate) enum SendError {
    Io(io::Error),
    Encode(EncodeError),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Io(e) => write!(f, "channel error: {e}"),
            SendError::Encode(e) => e.fmt(f),
        }
    }
}

/// One end of a socketpair, registered with the tokio reactor.
///
/// `send` and `recv` take `&self`, so one reader task and one writer task
/// may share a channel through an `Arc`.
#[derive(Debug)]
pub(crate) struct Channel {
    fd: AsyncFd<OwnedFd>,
}

impl Channel {
    /// Wraps `fd`, making it non-blocking. Must be called within a tokio runtime.
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Channel> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok(Channel {
            fd: sys::register_async(fd)?,
        })
    }

    /// Sends raw bytes with descriptors as one datagram, waiting while the
    /// peer's buffer is full.
    pub(crate) async fn send_bytes(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|inner| sys::send_with_fds(inner.get_ref().as_fd(), bytes, fds)) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends raw bytes as one datagram only if the socket has room now
    /// (`WouldBlock` otherwise); for a caller that falls back to a queue.
    pub(crate) fn try_send_bytes(&self, bytes: &[u8]) -> io::Result<()> {
        loop {
            match sys::send_with_fds(self.fd.get_ref().as_fd(), bytes, &[]) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Encodes and sends one message.
    pub(crate) async fn send<T: Serialize>(
        &self,
        msg: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), SendError> {
        let bytes = codec::encode(msg).map_err(SendError::Encode)?;
        self.send_bytes(&bytes, fds).await.map_err(SendError::Io)
    }

    /// Receives one datagram into `buf` (resized to hold the largest
    /// message) and returns its length and descriptors.
    pub(crate) async fn recv_bytes(
        &self,
        buf: &mut Vec<u8>,
    ) -> Result<(usize, Vec<OwnedFd>), RecvError> {
        // One byte more than the limit: a datagram that fills it is too large.
        buf.resize(MAX_MESSAGE + 1, 0);
        let mut resets = 0;
        loop {
            let mut guard = self.fd.readable().await.map_err(RecvError::Io)?;
            let received = match guard
                .try_io(|inner| sys::recv_with_fds(inner.get_ref().as_fd(), buf.as_mut_slice()))
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                    // The peer closed with unread data in its own queue.
                    // Linux reports that error before the datagrams still
                    // queued for us (and clears it): read those first.
                    resets += 1;
                    if resets > 1 {
                        return Err(RecvError::Closed);
                    }
                    continue;
                }
                Ok(Err(e)) => return Err(RecvError::Io(e)),
                Err(_would_block) => continue,
            };
            // Descriptors in `received.fds` are owned: every early return
            // below closes them.
            if received.ctrunc || received.fds.len() > MAX_FDS {
                return Err(RecvError::TooManyFds(received.fds.len()));
            }
            if received.truncated || received.len > MAX_MESSAGE {
                return Err(RecvError::TooLarge);
            }
            if received.len == 0 && received.fds.is_empty() {
                // SOCK_SEQPACKET reports EOF as a zero-length read, and an
                // empty datagram reads the same. A peek tells them apart:
                // at EOF it reads 0 again, after an empty datagram from a
                // live peer it would block (or finds the next message).
                let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
                return match socket2::SockRef::from(self.fd.get_ref()).peek(&mut probe) {
                    Ok(0) => Err(RecvError::Closed),
                    Ok(_) => Err(RecvError::Empty),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(RecvError::Empty),
                    Err(_) => Err(RecvError::Closed),
                };
            }
            return Ok((received.len, received.fds));
        }
    }

    /// Receives and decodes one message.
    pub(crate) async fn recv<T: DeserializeOwned>(
        &self,
        buf: &mut Vec<u8>,
    ) -> Result<(T, Vec<OwnedFd>), RecvError> {
        let (len, fds) = self.recv_bytes(buf).await?;
        let msg = codec::decode(&buf[..len]).map_err(RecvError::Decode)?;
        Ok((msg, fds))
    }
}

#[cfg(test)]
mod tests {
    use super::message::{ToWatcher, ToWorker};
    use super::*;

    #[tokio::test]
    async fn message_and_fd_round_trip() {
        let (a, b) = pair().unwrap();
        let (a, b) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        let (r, w) = nix::unistd::pipe().unwrap();
        a.send(
            &ToWorker::SocketReply {
                id: 1,
                result: Ok(()),
            },
            &[r.as_fd()],
        )
        .await
        .unwrap();
        drop(r);
        let mut buf = Vec::new();
        let (msg, fds): (ToWorker, _) = b.recv(&mut buf).await.unwrap();
        assert_eq!(
            msg,
            ToWorker::SocketReply {
                id: 1,
                result: Ok(())
            }
        );
        assert_eq!(fds.len(), 1);
        // The received descriptor is close-on-exec and refers to the pipe.
        let flags = nix::fcntl::fcntl(&fds[0], nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        nix::unistd::write(&w, b"x").unwrap();
        let mut one = [0u8; 1];
        assert_eq!(nix::unistd::read(&fds[0], &mut one).unwrap(), 1);
    }

    #[tokio::test]
    async fn messages_queued_before_a_reset_are_still_delivered() {
        let (a, b) = pair().unwrap();
        let (a, b) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        // b leaves a message unread in its queue, then a sends and b closes:
        // a's next read reports ECONNRESET before the queued message.
        b.send(&ToWatcher::Ready, &[]).await.unwrap();
        a.send(&ToWorker::Ping { seq: 1 }, &[]).await.unwrap();
        drop(b);
        let mut buf = Vec::new();
        let (msg, _): (ToWatcher, _) = a.recv(&mut buf).await.unwrap();
        assert_eq!(msg, ToWatcher::Ready);
        assert!(matches!(
            a.recv::<ToWatcher>(&mut buf).await,
            Err(RecvError::Closed)
        ));
    }

    #[tokio::test]
    async fn an_empty_datagram_is_an_error_not_eof() {
        let (a, b) = pair().unwrap();
        let (a, b) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        a.send_bytes(&[], &[]).await.unwrap();
        let mut buf = Vec::new();
        assert!(matches!(
            b.recv::<ToWatcher>(&mut buf).await,
            Err(RecvError::Empty)
        ));
        // The channel still works.
        a.send(&ToWatcher::Ready, &[]).await.unwrap();
        let (msg, _): (ToWatcher, _) = b.recv(&mut buf).await.unwrap();
        assert_eq!(msg, ToWatcher::Ready);
    }

    #[tokio::test]
    async fn eof_is_closed() {
        let (a, b) = pair().unwrap();
        let b = Channel::new(b).unwrap();
        drop(a);
        let mut buf = Vec::new();
        assert!(matches!(
            b.recv::<ToWatcher>(&mut buf).await,
            Err(RecvError::Closed)
        ));
    }

    #[tokio::test]
    async fn oversize_datagram_is_an_error() {
        let (a, b) = pair().unwrap();
        let (a, b) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        a.send_bytes(&vec![7u8; MAX_MESSAGE + 10], &[])
            .await
            .unwrap();
        let mut buf = Vec::new();
        assert!(matches!(
            b.recv::<ToWatcher>(&mut buf).await,
            Err(RecvError::TooLarge)
        ));
    }

    #[tokio::test]
    async fn too_many_fds_are_closed_and_refused() {
        let (a, b) = pair().unwrap();
        let (a, b) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        let pipes: Vec<_> = (0..MAX_FDS + 1)
            .map(|_| nix::unistd::pipe().unwrap())
            .collect();
        let fds: Vec<_> = pipes.iter().map(|(r, _)| r.as_fd()).collect();
        a.send(&ToWatcher::Ready, &fds).await.unwrap();
        let mut buf = Vec::new();
        assert!(matches!(
            b.recv::<ToWatcher>(&mut buf).await,
            Err(RecvError::TooManyFds(n)) if n == MAX_FDS + 1
        ));
    }

    #[tokio::test]
    async fn garbage_is_a_decode_error() {
        let (a, b) = pair().unwrap();
        let (a, b) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        a.send_bytes(b"\xff\xff\xff\xff\xff\xff", &[])
            .await
            .unwrap();
        let mut buf = Vec::new();
        assert!(matches!(
            b.recv::<ToWatcher>(&mut buf).await,
            Err(RecvError::Decode(_))
        ));
    }
}
