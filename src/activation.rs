//! Sockets this process inherited through socket activation: when
//! `LISTEN_PID` is this process, the descriptors `3..3+LISTEN_FDS` are
//! listening sockets its parent bound (systemd for a watcher, a watcher
//! started with `--listen` for a worker). They are adopted once per
//! process (marked close-on-exec) and matched by address: the watcher
//! hands a duplicate to a worker that asks for a matching address instead
//! of binding it, and a worker's `listen` uses a matching one directly.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::OnceLock;

use socket2::{SockRef, Type};

use crate::socket::Address;

/// First descriptor of socket activation (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// The most inherited sockets taken (a larger `LISTEN_FDS` is cut).
const MAX_INHERITED: i32 = 1024;

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

/// The sockets passed by socket activation, if `LISTEN_PID` names this
/// process: taken on the first call, kept for the process's lifetime.
/// Descriptors that are not listening stream sockets with a TCP or Unix
/// path address are closed with a warning.
pub(crate) fn inherited() -> &'static [Activated] {
    static ADOPTED: OnceLock<Vec<Activated>> = OnceLock::new();
    ADOPTED.get_or_init(adopt)
}

fn adopt() -> Vec<Activated> {
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
    if count > MAX_INHERITED {
        tracing::warn!("LISTEN_FDS={count}: taking only the first {MAX_INHERITED}");
    }
    let count = count.min(MAX_INHERITED);
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
        let fd = match crate::sys::take_listen_fd(number) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("socket activation: cannot take {shown}: {e}");
                continue;
            }
        };
        match activated_address(&fd) {
            Ok(addr) => {
                tracing::info!("socket activation: adopted {shown} listening on {addr}");
                out.push(Activated { addr, fd });
            }
            Err(why) => tracing::warn!("socket activation: ignoring {shown}: {why}"),
        }
    }
    out
}

fn activated_address(fd: &OwnedFd) -> Result<Address, String> {
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
}
