//! The job server's settings (`--job-server` and the options around it),
//! checked before anything starts.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Kind, Result};
use crate::socket::Address;

/// Largest request body unless configured otherwise: 1 MiB.
pub(crate) const DEFAULT_MAX_BODY: usize = 1024 * 1024;

/// How long a client has to send a request head (and then its body)
/// unless configured otherwise.
pub(crate) const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once, at most (fewer when the descriptor limit
/// is lower); past it new connections wait in the kernel's backlog.
pub(crate) const MAX_CONNECTIONS: usize = 10_000;

/// Everything the job server is configured with.
#[derive(Debug, Clone)]
pub(crate) struct JobServerConfig {
    /// `--job-server` as given, parsed by [`validate`](Self::validate).
    pub addr_args: Vec<String>,
    pub addrs: Vec<Address>,
    /// `--job-server-token-file`, read by `validate` into `token`.
    pub token_file: Option<PathBuf>,
    pub token: Option<String>,
    /// `--job-max-body`: larger request bodies get 413.
    pub max_body: usize,
    /// `--job-header-timeout`: for the request head, and again for the body.
    pub header_timeout: Duration,
    pub max_connections: usize,
}

impl Default for JobServerConfig {
    fn default() -> Self {
        JobServerConfig {
            addr_args: Vec::new(),
            addrs: Vec::new(),
            token_file: None,
            token: None,
            max_body: DEFAULT_MAX_BODY,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// Whether `addr` is reachable from this host only.
pub(crate) fn is_local(addr: &Address) -> bool {
    match addr {
        Address::Unix(_) => true,
        Address::Tcp(a) => match a.ip() {
            IpAddr::V4(ip) => ip.is_loopback(),
            IpAddr::V6(ip) => {
                ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        },
    }
}

impl JobServerConfig {
    /// Parses the addresses, reads the token file, and refuses an address
    /// off this host without a token.
    pub(crate) fn validate(&mut self) -> Result<()> {
        self.addrs = self
            .addr_args
            .iter()
            .map(|a| Address::parse(a))
            .collect::<Result<Vec<_>>>()?;
        if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::with_io(
                    Kind::Config,
                    format!("cannot read the job server token file {}", path.display()),
                    e,
                )
            })?;
            self.token = Some(text.trim().to_string());
        }
        if let Some(token) = &self.token {
            let printable = token.bytes().all(|b| b.is_ascii_graphic());
            if token.is_empty() || !printable {
                return Err(Error::new(
                    Kind::Config,
                    "the job server token must be one line of printable characters without spaces",
                ));
            }
        }
        if self.token.is_none() {
            if let Some(open) = self.addrs.iter().find(|a| !is_local(a)) {
                return Err(Error::new(
                    Kind::Config,
                    format!(
                        "--job-server {open} is reachable from other hosts: it needs --job-server-token-file (or use a loopback address such as 127.0.0.1:PORT)"
                    ),
                ));
            }
        }
        if self.max_body == 0 {
            return Err(Error::new(
                Kind::Config,
                "--job-max-body must be at least 1",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(addrs: &[&str]) -> JobServerConfig {
        JobServerConfig {
            addr_args: addrs.iter().map(|s| s.to_string()).collect(),
            ..JobServerConfig::default()
        }
    }

    #[test]
    fn loopback_and_unix_need_no_token_other_addresses_do() {
        for ok in [
            "127.0.0.1:1337",
            "[::1]:1337",
            "unix:///tmp/x.sock",
            "localhost:1",
        ] {
            assert!(config(&[ok]).validate().is_ok(), "{ok}");
        }
        for open in ["0.0.0.0:1337", "[::]:1337", ":1337", "192.168.1.2:80"] {
            let e = config(&["127.0.0.1:1", open]).validate().unwrap_err();
            assert!(
                e.is_config() && e.to_string().contains("token"),
                "{open}: {e}"
            );
        }
        let mut c = config(&["[::]:1337"]);
        c.token = Some("s3cret".into());
        assert!(c.validate().is_ok());
        c.token = Some("two words".into());
        assert!(c.validate().is_err());
        assert!(config(&["nope"])
            .validate()
            .unwrap_err()
            .is_invalid_address());
    }
}
