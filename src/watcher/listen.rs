//! `--listen [NAME=]ADDR`: sockets the watcher binds once at start-up and
//! every worker inherits as descriptors 3, 4, ... with the variables of
//! systemd's socket activation (`LISTEN_FDS`, `LISTEN_FDNAMES`,
//! `LISTEN_PID`), so a program that does not use the library (Python's
//! `socket.socket(fileno=3)`, Node's `listen({fd: 3})`, gunicorn, uvicorn
//! `--fd 3`, Go's `activation.Listeners()`) serves from the watcher's
//! sockets the way it would under systemd.
//!
//! The sockets live in the listener registry (`supervise/listeners.rs`)
//! like those library workers ask for, pinned there for the watcher's
//! lifetime; `process.rs` puts them at their numbers in each worker.

use crate::error::{Error, Kind, Result};
use crate::socket::Address;
use crate::watcher::balance::Balance;

/// The most `--listen` sockets (each worker inherits every one).
pub(crate) const MAX_LISTEN: usize = 64;

/// The descriptor number of the first inherited socket (`SD_LISTEN_FDS_START`).
pub(crate) const FIRST_FD: i32 = 3;

/// The name of a socket given without one (what `sd_listen_fds_with_names`
/// reports when there is none).
const UNNAMED: &str = "unknown";

/// One `--listen`: an address, and the name workers see in `LISTEN_FDNAMES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListenSpec {
    pub name: Option<String>,
    pub addr: Address,
}

impl ListenSpec {
    /// Parses `ADDR` or `NAME=ADDR`. What comes before the first `=` is a
    /// name when it has no `:` and no `/` (so `unix:///run/a=b.sock` is an
    /// address); a name is 1 to 255 printable ASCII characters without `:`
    /// (the rule of systemd's `FileDescriptorName=`).
    ///
    /// # Errors
    ///
    /// `is_invalid_address` for a bad address, `is_config` for a bad name.
    pub(crate) fn parse(spec: &str) -> Result<ListenSpec> {
        let (name, addr) = match spec.split_once('=') {
            Some((head, rest)) if !head.contains([':', '/']) => (Some(head), rest),
            _ => (None, spec),
        };
        if let Some(name) = name {
            let printable = name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
            if name.is_empty() || name.len() > 255 || !printable {
                return Err(Error::new(
                    Kind::Config,
                    format!("--listen {spec}: a name is 1 to 255 printable ASCII characters without ':'"),
                ));
            }
        }
        Ok(ListenSpec {
            name: name.map(str::to_string),
            addr: Address::parse(addr)?,
        })
    }
}

/// Parses every `--listen` and checks them together: at most
/// [`MAX_LISTEN`], no address twice, and a balancing mode in which the
/// workers themselves accept.
///
/// # Errors
///
/// `is_config` (or `is_invalid_address`) with the reason.
pub(crate) fn parse_all(args: &[String], balance: Balance) -> Result<Vec<ListenSpec>> {
    if args.is_empty() {
        return Ok(Vec::new());
    }
    if balance.hands_off() {
        return Err(Error::new(
            Kind::Config,
            "--listen needs --balance shared or reuseport: in the balanced modes the watcher accepts and hands connections only to workers that use the library",
        ));
    }
    if args.len() > MAX_LISTEN {
        return Err(Error::new(
            Kind::Config,
            format!("at most {MAX_LISTEN} --listen addresses"),
        ));
    }
    let specs = args
        .iter()
        .map(|a| ListenSpec::parse(a))
        .collect::<Result<Vec<_>>>()?;
    for (i, spec) in specs.iter().enumerate() {
        if specs[..i].iter().any(|s| s.addr == spec.addr) {
            return Err(Error::new(
                Kind::Config,
                format!("--listen {} is given twice", spec.addr),
            ));
        }
    }
    Ok(specs)
}

/// The value of `LISTEN_FDNAMES`: the names in order, `:`-separated.
pub(crate) fn fd_names(specs: &[ListenSpec]) -> String {
    specs
        .iter()
        .map(|s| s.name.as_deref().unwrap_or(UNNAMED))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        let s = ListenSpec::parse("web=127.0.0.1:8080").unwrap();
        assert_eq!(s.name.as_deref(), Some("web"));
        assert_eq!(s.addr, Address::parse("127.0.0.1:8080").unwrap());
        let s = ListenSpec::parse(":8080").unwrap();
        assert_eq!(s.name, None);
        let s = ListenSpec::parse("unix:///tmp/a=b.sock").unwrap();
        assert_eq!(s.name, None);
        assert_eq!(s.addr, Address::parse("unix:///tmp/a=b.sock").unwrap());
        let s = ListenSpec::parse("admin=unix:///tmp/admin.sock").unwrap();
        assert_eq!(s.name.as_deref(), Some("admin"));
        assert!(ListenSpec::parse("=127.0.0.1:1").unwrap_err().is_config());
        assert!(ListenSpec::parse("we b=127.0.0.1:1")
            .unwrap_err()
            .is_config());
        assert!(ListenSpec::parse("web=nope")
            .unwrap_err()
            .is_invalid_address());
    }

    #[test]
    fn checked_together() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let specs = parse_all(&args(&["web=:80", "127.0.0.1:81"]), Balance::Shared).unwrap();
        assert_eq!(fd_names(&specs), "web:unknown");
        assert!(parse_all(&args(&[":80", "0.0.0.0:80"]), Balance::Shared).is_err());
        assert!(parse_all(&args(&[":80"]), Balance::RoundRobin).is_err());
        assert!(parse_all(&args(&[":80"]), Balance::Reuseport).is_ok());
        let many: Vec<String> = (0..65).map(|p| format!(":{}", 1000 + p)).collect();
        assert!(parse_all(&many, Balance::Shared).is_err());
    }
}
