//! What the supervisor sets up before the first worker starts and tears
//! down after the last one exits: the pid file, the control socket, the
//! metrics endpoint and the systemd watchdog. Each one failing at start-up
//! stops the watcher with that error, before any worker ran.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::Result;
use crate::jobs::dispatch::{self, JobsEvent, JobsHandle};
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

impl Services {
    /// Starts what `config` asks for. `commands` is where the control
    /// socket and the metrics responder send their requests.
    pub(crate) async fn start(
        config: &Config,
        hub: &Arc<Hub>,
        commands: &CommandSender,
        notifier: Option<&Notifier>,
        ready: watch::Receiver<bool>,
    ) -> Result<Services> {
        let mut services = Services {
            hooks: Hooks::start(config.on_event.as_deref()),
            ..Services::default()
        };
        if let Some(path) = &config.pid_file {
            let pid_file = PidFile::acquire(path)?;
            if let Some(old) = pid_file.previous() {
                // A previous watcher died without stopping its workers (it
                // was SIGKILLed): what they left running goes now.
                let killed = process::kill_left_behind(old);
                if killed > 0 {
                    tracing::warn!(
                        "killed {killed} process(es) left running by a previous watcher (pid {old})"
                    );
                }
            }
            services.pid_file = Some(pid_file);
        }
        // After the pid file: a second watcher on it never reads the
        // storage file the first one writes.
        hub.load()?;
        services.hub = Some(HubGuard {
            hub: hub.clone(),
            timers: timers::start(hub.clone()),
        });
        let sampler = Sampler::start(commands.clone(), config.max_memory);
        if let Some(path) = config.control_path() {
            services.control = Some(control::Server::bind(
                &path,
                commands.clone(),
                Some(sampler.clone()),
                hub.clone(),
            )?);
        }
        if let Some(addr) = config.metrics {
            let state = http::State {
                commands: commands.clone(),
                sampler: sampler.clone(),
                store: None,
                token: None,
                metrics_only: true,
            };
            services.metrics = Some(http::Server::bind(addr, state).await?);
        }
        if let Some(jobs) = &config.jobs {
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
                services.job_server =
                    Some(JobServer::start(server, config.backlog, &handle).await?);
            }
            services.jobs = Some(handle);
        }
        if let Some(addr) = config.http {
            let state = http::State {
                commands: commands.clone(),
                sampler: sampler.clone(),
                store: services.jobs.as_ref().and_then(JobsHandle::store),
                token: config.http_token.as_ref().map(|t| t.0.clone()),
                metrics_only: false,
            };
            services.http = Some(http::Server::bind(addr, state).await?);
        }
        services.sampler = Some(sampler);
        if let Some(every) = notifier.and_then(|n| n.watchdog) {
            tracing::debug!("systemd watchdog: WATCHDOG=1 every {every:?}");
            services.watchdog_at = Some(Instant::now());
        }
        Ok(services)
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
