//! What the supervisor sets up before the first worker starts and tears
//! down after the last one exits: the pid file, the control socket, the
//! metrics endpoint, the job dispatcher, the dashboard and the systemd
//! watchdog. Each one failing at start-up stops the watcher with that
//! error, before any worker ran.
//!
//! A watcher upgrade moves them between watchers: the old one hands out
//! duplicates of their descriptors ([`Services::handover_fds`]), pauses
//! them when it commits (and resumes them on a rollback), and at the end
//! leaves the files that are the new watcher's now. The new one starts
//! with them deferred and takes them over ([`Services::take_over`]) once
//! the old one commits; its job dispatcher starts when the old one
//! released the store ([`Services::start_jobs`]).

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use socket2::SockRef;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{Error, Kind, Result};
use crate::jobs::dispatch::{self, JobsEvent, JobsHandle};
use crate::jobs::store::{self, Store, StoreOptions};
use crate::jobserver::JobServer;
use crate::pidfile::PidFile;
use crate::watcher::config::Config;
use crate::watcher::control;
use crate::watcher::event::CommandSender;
use crate::watcher::hooks::Hooks;
use crate::watcher::http;
use crate::watcher::hub::{timers, Hub};
use crate::watcher::process;
use crate::watcher::sampler::Sampler;
use crate::watcher::systemd::Notifier;

/// The services' descriptors an old watcher hands to the new one.
#[derive(Debug, Default)]
pub(crate) struct HandedServices {
    pub pid_file: Option<OwnedFd>,
    pub control: Option<OwnedFd>,
    pub control_path: Option<std::path::PathBuf>,
    pub metrics: Option<OwnedFd>,
    pub http: Option<OwnedFd>,
}

/// The running services; dropping them removes the control socket and the
/// pid file and stops the metrics responder.
#[derive(Default)]
pub(crate) struct Services {
    /// The job server (`--job-server`), stopped first.
    job_server: Option<JobServer>,
    /// The job dispatcher (`--jobs`, `--job-server`), stopped next.
    pub jobs: Option<JobsHandle>,
    /// CPU and memory samples of the workers, for status and the dashboard.
    sampler: Option<Sampler>,
    /// The dashboard (`--http`).
    http: Option<http::Server>,
    /// The shared storage's timers; dropping it writes the last snapshot.
    hub: Option<HubGuard>,
    // Field order is drop order: the pid file goes last, so a client that
    // finds it can still reach the control socket while the watcher runs.
    metrics: Option<http::Server>,
    control: Option<control::Server>,
    pid_file: Option<PidFile>,
    /// When `WATCHDOG=1` is due next.
    pub watchdog_at: Option<Instant>,
    /// `--on-event`.
    pub hooks: Hooks,
}

/// Takes the pid file at `path`, killing what a previous watcher that died
/// without stopping its workers left running.
fn acquire_pid_file(path: &Path) -> Result<PidFile> {
    let pid_file = PidFile::acquire(path)?;
    if let Some(old) = pid_file.previous() {
        // A previous watcher died without stopping its workers (it was
        // SIGKILLed): what they left running goes now.
        let killed = process::kill_left_behind(old);
        if killed > 0 {
            tracing::warn!(
                "killed {killed} process(es) left running by a previous watcher (pid {old})"
            );
        }
    }
    Ok(pid_file)
}

fn metrics_state(commands: &CommandSender, sampler: &Sampler) -> http::State {
    http::State {
        commands: commands.clone(),
        sampler: sampler.clone(),
        store: None,
        token: None,
        metrics_only: true,
    }
}

fn http_state(
    config: &Config,
    commands: &CommandSender,
    sampler: &Sampler,
    store: Option<Arc<dyn Store>>,
) -> http::State {
    http::State {
        commands: commands.clone(),
        sampler: sampler.clone(),
        store,
        token: config.http_token.as_ref().map(|t| t.0.clone()),
        metrics_only: false,
    }
}

/// Whether `fd` listens on `addr` (a handed-over listener of a
/// configuration that did not change).
fn listens_on(fd: &OwnedFd, addr: std::net::SocketAddr) -> bool {
    SockRef::from(fd)
        .local_addr()
        .is_ok_and(|a| a.as_socket() == Some(addr) || addr.port() == 0)
}

impl Services {
    /// Starts what `config` asks for. `commands` is where the control
    /// socket and the metrics responder send their requests. With
    /// `deferred` (the new watcher of an upgrade) only the sampler starts:
    /// the rest belongs to the old watcher until it commits.
    pub(crate) async fn start(
        config: &Config,
        hub: &Arc<Hub>,
        commands: &CommandSender,
        notifier: Option<&Notifier>,
        ready: watch::Receiver<bool>,
        deferred: bool,
    ) -> Result<Services> {
        // Both watchers of an upgrade sample (and recycle, `--max-memory`)
        // their own workers.
        let sampler = Sampler::start(commands.clone(), config.max_memory);
        let mut services = Services {
            sampler: Some(sampler.clone()),
            hooks: Hooks::start(config.on_event.as_deref()),
            ..Services::default()
        };
        if deferred {
            // The storage came with the hand-over (see `takeover.rs`); its
            // timers run from the start, for this watcher's workers.
            hub.open();
            services.hub = Some(HubGuard {
                hub: hub.clone(),
                timers: timers::start(hub.clone()),
            });
            return Ok(services);
        }
        if let Some(path) = &config.pid_file {
            services.pid_file = Some(acquire_pid_file(path)?);
        }
        // After the pid file: a second watcher on it never reads the
        // storage file the first one writes.
        hub.load()?;
        services.hub = Some(HubGuard {
            hub: hub.clone(),
            timers: timers::start(hub.clone()),
        });
        if let Some(path) = config.control_path() {
            services.control = Some(control::Server::bind(
                &path,
                commands.clone(),
                Some(sampler.clone()),
                hub.clone(),
            )?);
        }
        if let Some(addr) = config.metrics {
            let state = metrics_state(commands, &sampler);
            services.metrics = Some(http::Server::bind(addr, state).await?);
        }
        services.start_jobs(config, commands, ready).await?;
        if let Some(addr) = config.http {
            let store = services.jobs.as_ref().and_then(JobsHandle::store);
            let state = http_state(config, commands, &sampler, store);
            services.http = Some(http::Server::bind(addr, state).await?);
        }
        services.start_watchdog(notifier);
        Ok(services)
    }

    /// Starts the job dispatcher, when `config` runs jobs.
    pub(crate) async fn start_jobs(
        &mut self,
        config: &Config,
        commands: &CommandSender,
        ready: watch::Receiver<bool>,
    ) -> Result<()> {
        let Some(jobs) = &config.jobs else {
            return Ok(());
        };
        for w in &jobs.warnings {
            tracing::warn!("{w}");
        }
        let handle = dispatch::start(
            jobs.clone(),
            Arc::new(config.clone()),
            commands.clone(),
            ready,
        )
        .await?;
        if jobs.has_store() {
            tracing::info!("running jobs from {}", jobs.url);
        }
        if let Some(server) = &config.job_server {
            // In the new watcher of an upgrade, once the old one stopped
            // its own (it released the store after that).
            self.job_server = Some(JobServer::start(server, config.backlog, &handle).await?);
        }
        self.jobs = Some(handle);
        Ok(())
    }

    /// Feeds systemd's watchdog from now on, when it asks for it.
    pub(crate) fn start_watchdog(&mut self, notifier: Option<&Notifier>) {
        if let Some(every) = notifier.and_then(|n| n.watchdog) {
            tracing::debug!("systemd watchdog: WATCHDOG=1 every {every:?}");
            self.watchdog_at = Some(Instant::now());
        }
    }

    /// The new watcher of an upgrade takes over what the old one handed
    /// over: the pid file (rewritten with this pid), the control socket,
    /// the metrics and dashboard listeners. What the old watcher did not
    /// have is set up as at a start. The dashboard gets a store handle of
    /// its own: the dispatcher starts only once the old one released it.
    ///
    /// # Errors
    ///
    /// What taking over or setting up one of them returns; those taken
    /// over before are given back when `self` drops.
    pub(crate) async fn take_over(
        &mut self,
        config: &Config,
        hub: &Arc<Hub>,
        commands: &CommandSender,
        handed: HandedServices,
    ) -> Result<()> {
        let sampler = self
            .sampler
            .clone()
            .ok_or_else(|| Error::new(Kind::Upgrade, "no sampler"))?;
        if let Some(path) = &config.pid_file {
            self.pid_file = Some(match handed.pid_file {
                Some(fd) => PidFile::take_over(path, fd)?,
                None => acquire_pid_file(path)?,
            });
        }
        if let Some(path) = config.control_path() {
            let (c, s) = (commands.clone(), Some(sampler.clone()));
            // A socket at another path (a changed configuration) is closed.
            let handed = handed
                .control
                .filter(|_| handed.control_path.as_deref() == Some(path.as_path()));
            self.control = Some(match handed {
                Some(fd) => control::Server::adopt(&path, fd, c, s, hub.clone())?,
                None => control::Server::bind(&path, c, s, hub.clone())?,
            });
        }
        if let Some(addr) = config.metrics {
            let state = metrics_state(commands, &sampler);
            self.metrics = Some(match handed.metrics.filter(|fd| listens_on(fd, addr)) {
                Some(fd) => http::Server::adopt(addr, fd, state)?,
                None => http::Server::bind(addr, state).await?,
            });
        }
        if let Some(addr) = config.http {
            let store = match config.jobs.as_ref().filter(|j| j.has_store()) {
                Some(jobs) => {
                    let options = StoreOptions {
                        retry_base: jobs.retry_delay,
                        ..StoreOptions::default()
                    };
                    Some(store::open(&jobs.url, options).await?)
                }
                None => None,
            };
            let state = http_state(config, commands, &sampler, store);
            self.http = Some(match handed.http.filter(|fd| listens_on(fd, addr)) {
                Some(fd) => http::Server::adopt(addr, fd, state)?,
                None => http::Server::bind(addr, state).await?,
            });
        }
        Ok(())
    }

    /// Duplicates of the descriptors a new watcher takes over.
    ///
    /// # Errors
    ///
    /// `is_io` when a descriptor cannot be duplicated.
    pub(crate) fn handover_fds(&self, config: &Config) -> Result<HandedServices> {
        let dup = |what: &str, fd: std::io::Result<OwnedFd>| {
            fd.map_err(|e| Error::with_io(Kind::Io, format!("cannot duplicate the {what}"), e))
        };
        Ok(HandedServices {
            pid_file: self
                .pid_file
                .as_ref()
                .map(|p| dup("pid file", p.lock_fd()))
                .transpose()?,
            control: self
                .control
                .as_ref()
                .map(|c| dup("control socket", c.fd()))
                .transpose()?,
            control_path: self.control.as_ref().and_then(|_| config.control_path()),
            metrics: self
                .metrics
                .as_ref()
                .map(|m| dup("metrics listener", m.fd()))
                .transpose()?,
            http: self
                .http
                .as_ref()
                .map(|h| dup("dashboard listener", h.fd()))
                .transpose()?,
        })
    }

    /// Stops answering the control socket, metrics and dashboard (the
    /// old watcher commits an upgrade).
    pub(crate) fn pause(&mut self) {
        for h in [&mut self.metrics, &mut self.http].into_iter().flatten() {
            h.pause();
        }
        if let Some(c) = &mut self.control {
            c.pause();
        }
    }

    /// Answers again after [`pause`](Self::pause), and takes the pid file
    /// back (the new watcher may have written its own): a rolled back
    /// upgrade.
    pub(crate) fn resume(&mut self) {
        for h in [&mut self.metrics, &mut self.http].into_iter().flatten() {
            h.resume();
        }
        if let Some(c) = &mut self.control {
            c.resume();
        }
        if let Some(p) = &mut self.pid_file {
            if let Err(e) = p.rewrite() {
                tracing::error!("upgrade rolled back, but {e}");
            }
        }
    }

    /// The new watcher serves: the control socket's file is its own now
    /// (the pid file is too: a new file, which ours leaves alone).
    pub(crate) fn hand_over(&mut self) {
        if let Some(c) = &mut self.control {
            c.hand_over();
        }
    }

    /// Stops the job server: no new connection, and the requests being
    /// served get their answers (every call was answered by the
    /// dispatcher's shutdown before).
    pub(crate) async fn stop_job_server(&mut self) {
        if let Some(server) = self.job_server.as_mut() {
            server.shutdown().await;
        }
        self.job_server = None;
    }

    /// Tells the job dispatcher, if one runs.
    pub(crate) fn jobs(&self, event: JobsEvent) {
        if let Some(j) = &self.jobs {
            j.send(event);
        }
    }

    /// Sends `WATCHDOG=1` when it is due.
    pub(crate) fn tick(&mut self, notifier: Option<&Notifier>, now: Instant) {
        if self.watchdog_at.is_some_and(|t| t <= now) {
            if let Some(n) = notifier {
                n.notify(&["WATCHDOG=1".into()]);
            }
            self.watchdog_at = notifier.and_then(|n| n.watchdog).map(|d| now + d);
        }
    }
}

/// The hub's timer task while the watcher runs; the last snapshot is
/// written when it drops (after every worker exited).
struct HubGuard {
    hub: Arc<Hub>,
    timers: tokio::task::JoinHandle<()>,
}

impl Drop for HubGuard {
    fn drop(&mut self) {
        self.timers.abort();
        self.hub.close();
    }
}
