//! systemd integration, without libsystemd: socket activation
//! (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`) and the `sd_notify`
//! protocol (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`).
//!
//! * Activation: when `LISTEN_PID` is this process, the descriptors
//!   `3..3+LISTEN_FDS` are listening sockets the service manager bound. The
//!   watcher adopts them (marking them close-on-exec) and hands a duplicate
//!   to a worker that asks for a matching address instead of binding it.
//! * Notification: one datagram per state change to the `AF_UNIX` socket
//!   named by `NOTIFY_SOCKET` (a path, or `@name` for the abstract
//!   namespace), as newline-separated `KEY=VALUE` assignments.
//!
//! Workers never see these variables: `process::spawn` removes them.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use socket2::{SockRef, Type};

use crate::socket::Address;

/// The variables this module reads; removed from every worker's environment.
pub(crate) const ENV_VARS: [&str; 6] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// First descriptor of socket activation (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// A listening socket passed by the service manager (its
/// `LISTEN_FDNAMES` name is only logged).
#[derive(Debug)]
pub(crate) struct Activated {
    /// Its local address (`getsockname`).
    pub addr: Address,
    pub fd: OwnedFd,
}

/// Whether `requested` (what a worker asked for) is served by a socket
/// bound to `adopted`: the same address, a wildcard of either family on the
/// same port (`:8080` and systemd's `[::]:8080`), or the same Unix socket.
pub(crate) fn matches(requested: &Address, adopted: &Address) -> bool {
    match (requested, adopted) {
        (Address::Tcp(a), Address::Tcp(b)) => {
            a == b || (a.port() == b.port() && a.ip().is_unspecified() && b.ip().is_unspecified())
        }
        (Address::Unix(a), Address::Unix(b)) => {
            a == b
                || match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
                    (Ok(a), Ok(b)) => a == b,
                    _ => false,
                }
        }
        _ => false,
    }
}

/// Takes the sockets passed by socket activation, if `LISTEN_PID` names
/// this process. Runs once per process; later calls return nothing.
/// Descriptors that are not listening stream sockets with a TCP or Unix
/// path address are closed with a warning.
pub(crate) fn listen_fds() -> Vec<Activated> {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let pid_matches = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        == Some(std::process::id());
    if !pid_matches {
        return Vec::new();
    }
    let Some(count) = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.trim().parse::<i32>().ok())
        .filter(|&n| n > 0)
    else {
        return Vec::new();
    };
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Vec::new();
    }
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for (i, number) in (LISTEN_FDS_START..LISTEN_FDS_START.saturating_add(count)).enumerate() {
        let name = names.get(i).filter(|n| !n.is_empty()).cloned();
        let shown = match &name {
            Some(n) => format!("fd {number} ({n})"),
            None => format!("fd {number}"),
        };
        let fd = match crate::sys::take_exec_fd(number) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("socket activation: cannot take {shown}: {e}");
                continue;
            }
        };
        match listening_address(&fd) {
            Ok(addr) => {
                tracing::info!("socket activation: adopted {shown} listening on {addr}");
                out.push(Activated { addr, fd });
            }
            Err(why) => tracing::warn!("socket activation: ignoring {shown}: {why}"),
        }
    }
    out
}

/// The local address of `fd` when it is a listening stream socket with a
/// TCP or Unix path address (what socket activation and a watcher upgrade
/// pass); why not otherwise.
pub(crate) fn listening_address(fd: &OwnedFd) -> Result<Address, String> {
    let sock = SockRef::from(fd);
    if sock.r#type().map_err(|e| e.to_string())? != Type::STREAM {
        return Err("not a stream socket".into());
    }
    if !sock.is_listener().map_err(|e| e.to_string())? {
        return Err("not listening".into());
    }
    let local = sock.local_addr().map_err(|e| e.to_string())?;
    if let Some(addr) = local.as_socket() {
        return Ok(Address::Tcp(addr));
    }
    if let Some(path) = local.as_pathname() {
        return Ok(Address::Unix(PathBuf::from(path)));
    }
    Err("neither a TCP nor a Unix path socket".into())
}

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
    fn wildcards_of_either_family_match_on_the_port() {
        let p = |s: &str| Address::parse(s).unwrap();
        assert!(matches(&p("127.0.0.1:80"), &p("127.0.0.1:80")));
        assert!(matches(&p(":80"), &p("[::]:80")));
        assert!(matches(&p("[::]:80"), &p("0.0.0.0:80")));
        assert!(!matches(&p(":80"), &p("[::]:81")));
        assert!(!matches(&p("127.0.0.1:80"), &p("0.0.0.0:80")));
        assert!(matches(&p("unix:///run/a.sock"), &p("unix:///run/a.sock")));
        assert!(!matches(&p("unix:///run/a.sock"), &p("127.0.0.1:80")));
    }

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
