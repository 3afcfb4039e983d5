//! Checking a [`ClusterWatcherBuilder`]'s settings into a [`Config`]:
//! limits, addresses, the pool plan, the job server, and the user and group
//! names resolved to ids (before any fork).

use super::{read_token, ClusterWatcherBuilder, Config};
use crate::error::{Error, Kind, Result};
use crate::jobs::dispatch::config::JobsConfig;
use crate::jobs::dispatch::pools::plan;
use crate::watcher::bind_policy::BindPolicy;
use crate::watcher::exec::find_program;
use crate::watcher::listen;

impl ClusterWatcherBuilder {
    /// Checks the settings and resolves names (before any fork: the
    /// child between fork and exec may not look names up).
    pub(in crate::watcher) fn validate(mut self) -> Result<Config> {
        self.config.credentials =
            resolve_credentials(self.config.user.as_deref(), self.config.group.as_deref())?;
        let allowed = self
            .config
            .allow_bind
            .iter()
            .map(|p| p.parse().map_err(|e: String| Error::new(Kind::Config, e)))
            .collect::<Result<Vec<_>>>()?;
        self.config.bind_policy = BindPolicy {
            allowed,
            restricted: self.config.credentials.is_some(),
        };
        if self.config.workers == 0 {
            return Err(Error::new(
                Kind::Config,
                "the number of workers must be at least 1",
            ));
        }
        self.config.listen = listen::parse_all(&self.config.listen_args, self.config.balance)?;
        if let Some(name) = &self.config.stop_signal_arg {
            self.config.stop_signal = parse_signal(name)?;
        }
        self.config.naming.check(self.config.workers)?;
        if let Some(server) = self.config.job_server.as_mut() {
            server.validate()?;
            if server.addrs.is_empty() {
                return Err(Error::new(
                    Kind::Config,
                    "job server options need an address (--job-server ADDR)",
                ));
            }
            // The job server's calls run on the dispatcher, with or without
            // a store.
            self.config
                .jobs
                .get_or_insert_with(|| JobsConfig::new(String::new()));
        }
        let serving = self.config.job_server.is_some();
        if let Some(jobs) = self.config.jobs.as_mut() {
            if jobs.url.is_empty() && !serving {
                return Err(Error::new(
                    Kind::Config,
                    "job options need a job store (--jobs URL)",
                ));
            }
            if jobs.per_job && serving {
                return Err(Error::new(
                    Kind::Config,
                    "--job-server calls run on persistent workers: it cannot be used with --per-job",
                ));
            }
            jobs.specs = self
                .config
                .pool_args
                .iter()
                .map(|p| p.parse().map_err(|e: String| Error::new(Kind::Config, e)))
                .collect::<Result<Vec<_>>>()?;
            let (pools, warnings) = plan(&jobs.specs, self.config.workers)?;
            jobs.pools = pools;
            jobs.warnings = warnings;
            // Per-job processes are the dispatcher's; no persistent worker runs.
            self.config.workers = if jobs.per_job { 0 } else { jobs.slots() };
            if !jobs.has_store() && !jobs.specs.is_empty() {
                return Err(Error::new(Kind::Config, "--pool needs --jobs"));
            }
        } else if !self.config.pool_args.is_empty() {
            return Err(Error::new(Kind::Config, "--pool needs --jobs"));
        }
        if let Some(path) = &self.config.http_token_file {
            if self.config.http.is_none() {
                return Err(Error::new(Kind::Config, "--http-token-file needs --http"));
            }
            self.config.http_token = Some(read_token(path)?);
        }
        if let Some(addr) = self.config.http {
            if !addr.ip().is_loopback() && self.config.http_token.is_none() {
                return Err(Error::new(
                    Kind::Config,
                    format!("--http {addr} is not a loopback address: it needs --http-token-file"),
                ));
            }
        }
        let path = self
            .config
            .envs
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| std::env::var_os("PATH"));
        find_program(
            &self.config.program,
            path.as_deref(),
            self.config.current_dir.as_deref(),
        )
        .map_err(|why| Error::new(Kind::Spawn, why))?;
        for path in &self.config.watch {
            if let Err(e) = std::fs::metadata(path) {
                return Err(Error::with_io(
                    Kind::Config,
                    format!("cannot watch {}", path.display()),
                    e,
                ));
            }
        }
        Ok(self.config)
    }
}

/// A signal by name (`SIGQUIT`, `QUIT`, any case) or number.
fn parse_signal(name: &str) -> Result<nix::sys::signal::Signal> {
    use nix::sys::signal::Signal;
    let upper = name.trim().to_ascii_uppercase();
    let parsed = match upper.parse::<i32>() {
        Ok(n) => Signal::try_from(n).ok(),
        Err(_) if upper.starts_with("SIG") => upper.parse().ok(),
        Err(_) => format!("SIG{upper}").parse().ok(),
    };
    parsed.ok_or_else(|| Error::new(Kind::Config, format!("not a signal: {name}")))
}

/// Resolves `user` and `group` names to ids (before any fork: the child
/// between fork and exec may not look names up).
fn resolve_credentials(
    user: Option<&str>,
    group: Option<&str>,
) -> Result<Option<crate::sys::Credentials>> {
    use nix::unistd::{geteuid, Group, User};
    if user.is_none() && group.is_none() {
        return Ok(None);
    }
    let who = match (user, group) {
        (Some(u), Some(g)) => format!("user {u} and group {g}"),
        (Some(u), None) => format!("user {u}"),
        (None, Some(g)) => format!("group {g}"),
        (None, None) => unreachable!(),
    };
    if !geteuid().is_root() {
        return Err(Error::new(
            Kind::Config,
            format!(
                "cannot run the workers as {who}: that needs the watcher to run as root (it runs as uid {})",
                geteuid()
            ),
        ));
    }
    let lookup_err = |what: &str, name: &str, e: nix::errno::Errno| {
        Error::with_io(
            Kind::Config,
            format!("cannot look up {what} {name}"),
            e.into(),
        )
    };
    let user = match user {
        Some(name) => Some(
            User::from_name(name)
                .map_err(|e| lookup_err("user", name, e))?
                .ok_or_else(|| Error::new(Kind::Config, format!("no such user: {name}")))?,
        ),
        None => None,
    };
    let gid = match group {
        Some(name) => Some(
            Group::from_name(name)
                .map_err(|e| lookup_err("group", name, e))?
                .ok_or_else(|| Error::new(Kind::Config, format!("no such group: {name}")))?
                .gid,
        ),
        None => user.as_ref().map(|u| u.gid),
    };
    Ok(Some(crate::sys::Credentials {
        uid: user.map(|u| u.uid.as_raw()),
        gid: gid.map(|g| g.as_raw()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_or_number() {
        use nix::sys::signal::Signal;
        assert_eq!(parse_signal("SIGQUIT").unwrap(), Signal::SIGQUIT);
        assert_eq!(parse_signal("int").unwrap(), Signal::SIGINT);
        assert_eq!(parse_signal("15").unwrap(), Signal::SIGTERM);
        assert!(parse_signal("SIGNOPE").unwrap_err().is_config());
        assert!(parse_signal("99").is_err());
    }
}
