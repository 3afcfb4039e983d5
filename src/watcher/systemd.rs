//! The watcher under systemd, without libsystemd: the `sd_notify` client
//! (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`) that reports the
//! watcher's own state; socket activation of the watcher (`LISTEN_FDS`)
//! is adopted by [`crate::activation`].
//!
//! * Notification: one datagram per state change to the `AF_UNIX` socket
//!   named by `NOTIFY_SOCKET` (a path, or `@name` for the abstract
//!   namespace), as newline-separated `KEY=VALUE` assignments.
//!
//! Workers never see the watcher's own values of these variables:
//! `process::spawn` removes them (and with `--listen` or `--notify` sets
//! the worker's own, see `watcher/notify.rs` and `watcher/listen.rs`).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// The variables this module reads; removed from every worker's environment.
pub(crate) const ENV_VARS: [&str; 6] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// A client of the `sd_notify` protocol.
#[derive(Debug)]
pub(crate) struct Notifier {
    sock: UnixDatagram,
    addr: std::os::unix::net::SocketAddr,
    /// `WATCHDOG=1` is due this often (half of `WATCHDOG_USEC`).
    pub watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier for `NOTIFY_SOCKET`, or `None` when it is unset or
    /// unusable (logged).
    pub(crate) fn from_env() -> Option<Notifier> {
        let target = std::env::var_os("NOTIFY_SOCKET")?;
        let target = target.to_string_lossy().into_owned();
        match Self::connect(&target) {
            Ok((sock, addr)) => Some(Notifier {
                sock,
                addr,
                watchdog: watchdog_interval(),
            }),
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET={target}: {e}; not notifying systemd");
                None
            }
        }
    }

    fn connect(target: &str) -> std::io::Result<(UnixDatagram, std::os::unix::net::SocketAddr)> {
        let addr = if let Some(name) = target.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?
        } else if target.starts_with('/') {
            std::os::unix::net::SocketAddr::from_pathname(target)?
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not an absolute path or @abstract name (vsock is not supported)",
            ));
        };
        let sock = UnixDatagram::unbound()?;
        // Never stall the supervisor: a full queue loses the message.
        sock.set_nonblocking(true)?;
        Ok((sock, addr))
    }

    /// Sends `lines` (`KEY=VALUE`, one per line) in one datagram.
    pub(crate) fn notify(&self, lines: &[String]) {
        let mut msg = lines.join("\n");
        msg.push('\n');
        if let Err(e) = self.sock.send_to_addr(msg.as_bytes(), &self.addr) {
            tracing::debug!("sd_notify {:?}: {e}", msg.trim_end());
        }
    }
}

/// Half of `WATCHDOG_USEC` when the watchdog is meant for this process
/// (`WATCHDOG_PID` unset or ours).
fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// `CLOCK_MONOTONIC` in microseconds, for `MONOTONIC_USEC=`.
pub(crate) fn monotonic_usec() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64) * 1_000_000 + (ts.tv_nsec() as u64) / 1_000,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifies_a_datagram_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let (sock, addr) = Notifier::connect(path.to_str().unwrap()).unwrap();
        let n = Notifier {
            sock,
            addr,
            watchdog: None,
        };
        n.notify(&["READY=1".into(), "STATUS=ok".into()]);
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=ok\n");
        assert!(Notifier::connect("relative").is_err());
    }

    #[test]
    fn abstract_addresses() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("cluster-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let (sock, addr) = Notifier::connect(&format!("@{name}")).unwrap();
        sock.send_to_addr(b"WATCHDOG=1\n", &addr).unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1\n");
    }
}
