//! Which addresses a worker may have the watcher bind for it.
//!
//! The watcher binds on a worker's request, with the watcher's privileges.
//! When the workers run with fewer (`--user`/`--group`), that would let a
//! worker get a privileged port or a socket file anywhere the watcher may
//! write, so the operator says what is allowed (`--allow-bind`, repeatable):
//!
//! * `HOST:PORT`, `:PORT` (any host), `HOST:LOW-HIGH`, `:LOW-HIGH`;
//! * `unix:///path/to/sock` (that file) or `unix:///path/to/dir/` (any
//!   socket directly in that directory).
//!
//! Without `--allow-bind`, workers that run as another user may have TCP
//! ports from 1024 up and no Unix socket path; workers that run with the
//! watcher's own privileges may have anything (they could bind it
//! themselves).

use std::net::IpAddr;
use std::path::PathBuf;

use crate::error::{Error, Kind, Result};
use crate::socket::Address;

/// One `--allow-bind` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Allowed {
    Tcp {
        host: Option<IpAddr>,
        ports: (u16, u16),
    },
    UnixFile(PathBuf),
    UnixDir(PathBuf),
}

impl std::str::FromStr for Allowed {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = |why: &str| format!("'{s}' is not an address pattern: {why}");
        if let Some(path) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            if !path.starts_with('/') {
                return Err(bad("a Unix socket pattern needs an absolute path"));
            }
            return Ok(if path.ends_with('/') {
                Allowed::UnixDir(PathBuf::from(path))
            } else {
                Allowed::UnixFile(PathBuf::from(path))
            });
        }
        let hostport = s.strip_prefix("tcp://").unwrap_or(s);
        let (host, ports) = hostport
            .rsplit_once(':')
            .ok_or_else(|| bad("expected HOST:PORT, :PORT or HOST:LOW-HIGH"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = if host.is_empty() || host == "*" {
            None
        } else {
            Some(
                host.parse::<IpAddr>()
                    .map_err(|_| bad("the host must be an IP address"))?,
            )
        };
        let port = |p: &str| p.parse::<u16>().map_err(|_| bad("bad port"));
        let ports = match ports.split_once('-') {
            Some((lo, hi)) => (port(lo)?, port(hi)?),
            None => {
                let p = port(ports)?;
                (p, p)
            }
        };
        if ports.0 > ports.1 {
            return Err(bad("the port range is empty"));
        }
        Ok(Allowed::Tcp { host, ports })
    }
}

impl Allowed {
    fn permits(&self, addr: &Address) -> bool {
        match (self, addr) {
            (Allowed::Tcp { host, ports }, Address::Tcp(a)) => {
                host.is_none_or(|h| h == a.ip()) && (ports.0..=ports.1).contains(&a.port())
            }
            (Allowed::UnixFile(p), Address::Unix(a)) => p == a,
            (Allowed::UnixDir(d), Address::Unix(a)) => a.parent() == Some(d.as_path()),
            _ => false,
        }
    }
}

/// The rule the listener registry applies to every request.
#[derive(Debug, Clone, Default)]
pub(crate) struct BindPolicy {
    /// Patterns from `--allow-bind`; when empty, the defaults apply.
    pub allowed: Vec<Allowed>,
    /// Workers run with fewer privileges than the watcher.
    pub restricted: bool,
}

impl BindPolicy {
    /// Whether a worker may have `addr`; the error says why not.
    pub(crate) fn check(&self, addr: &Address) -> Result<()> {
        let ok = if !self.allowed.is_empty() {
            self.allowed.iter().any(|a| a.permits(addr))
        } else if self.restricted {
            matches!(addr, Address::Tcp(a) if a.port() == 0 || a.port() >= 1024)
        } else {
            true
        };
        if ok {
            return Ok(());
        }
        let why = if self.allowed.is_empty() {
            "workers that run as another user may have TCP ports from 1024 up; allow more with --allow-bind"
        } else {
            "not allowed by --allow-bind"
        };
        Err(Error::new(
            Kind::Bind,
            format!("cannot listen on {addr}: {why}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Address {
        Address::parse(s).unwrap()
    }

    #[test]
    fn patterns_parse_and_match() {
        let p = |s: &str| s.parse::<Allowed>().unwrap();
        assert!(p(":8080").permits(&addr("0.0.0.0:8080")));
        assert!(p(":8080").permits(&addr("127.0.0.1:8080")));
        assert!(!p(":8080").permits(&addr("127.0.0.1:8081")));
        assert!(p("127.0.0.1:8000-8100").permits(&addr("127.0.0.1:8050")));
        assert!(!p("127.0.0.1:8000-8100").permits(&addr("10.0.0.1:8050")));
        assert!(p("[::1]:80").permits(&addr("[::1]:80")));
        assert!(p("unix:///run/app/").permits(&addr("unix:///run/app/a.sock")));
        assert!(!p("unix:///run/app/").permits(&addr("unix:///run/app/sub/a.sock")));
        assert!(p("unix:///run/a.sock").permits(&addr("unix:///run/a.sock")));
        for bad in ["nope", ":99999", "host.example:80", "unix://rel", ":90-80"] {
            assert!(bad.parse::<Allowed>().is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_restrict_workers_of_another_user_only() {
        let open = BindPolicy::default();
        assert!(open.check(&addr("0.0.0.0:23")).is_ok());
        let restricted = BindPolicy {
            restricted: true,
            ..BindPolicy::default()
        };
        let err = restricted.check(&addr("0.0.0.0:23")).unwrap_err();
        assert!(
            err.is_bind() && err.to_string().contains("--allow-bind"),
            "{err}"
        );
        assert!(restricted.check(&addr("127.0.0.1:8080")).is_ok());
        assert!(restricted.check(&addr("127.0.0.1:0")).is_ok());
        assert!(restricted.check(&addr("unix:///etc/x.sock")).is_err());
        let allowed = BindPolicy {
            restricted: true,
            allowed: vec![":80".parse().unwrap()],
        };
        assert!(allowed.check(&addr("0.0.0.0:80")).is_ok());
        assert!(allowed.check(&addr("0.0.0.0:8080")).is_err());
    }
}
