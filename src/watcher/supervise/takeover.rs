//! Upgrading the watcher, the new watcher's side (the old one's is
//! `upgrade.rs`).
//!
//! A watcher started with `CLUSTER_UPGRADE` naming its parent adopts the
//! listeners it inherited (the workers' requests find them as if it had
//! bound them), runs as many workers as the old watcher did, and defers
//! everything the old watcher still serves: no pid file, control socket,
//! metrics, dashboard, job dispatcher or systemd notifications yet.
//!
//! 1. Once every worker is ready: `ready` on the link.
//! 2. `commit`: take over the pid file (rewritten with this pid through the
//!    inherited locked descriptor: nothing counts as stale, nothing of the
//!    old watcher is killed), the control socket, the metrics and dashboard
//!    listeners; systemd's notifier and watchdog from now on; `serving`.
//!    From then on, the connections the old watcher's balancers still
//!    held arrive on the connection link and join this watcher's
//!    balancer for their address.
//! 3. `released` (or the link's EOF: the old watcher exited): start the job
//!    dispatcher, which now owns the store, and tell it about the workers
//!    that registered as job workers meanwhile.
//!
//! A failure before `serving` is reported on the link (`failed`) and stops
//! this watcher; the old one keeps serving. If the old watcher dies before
//! it commits, this one takes over at once.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use tokio::time::Instant;

use super::services::HandedServices;
use super::Supervisor;
use crate::error::{Error, Kind, Result};
use crate::jobs::dispatch::JobsEvent;
use crate::watcher::event::Event;
use crate::watcher::hub::Hub;
use crate::watcher::systemd::Notifier;
use crate::watcher::upgrade::{
    self, HandedListener, Inherited, LinkTx, ToNew, ToOld, UpgradeEvent,
};

/// Replaces the store with the old watcher's snapshot in `file` (`when`:
/// for the log and errors).
fn load_snapshot(hub: &Hub, file: Option<&File>, when: &str) -> Result<()> {
    let Some(file) = file else { return Ok(()) };
    let what = format!("the old watcher's storage ({when})");
    let text = upgrade::read_snapshot(file)
        .map_err(|e| Error::with_io(Kind::Storage, format!("cannot read {what}"), e))?;
    hub.load_text(&text, &what)?;
    let keys = hub.stats();
    tracing::debug!("upgrade: loaded {what}: {keys:?}");
    Ok(())
}

/// How soon a job dispatcher that could not start is tried again.
const JOBS_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Starting workers; the old watcher serves.
    Waiting,
    /// Took over; the old watcher drains.
    Serving,
    /// The old watcher released the job store (or is gone).
    Released,
}

/// The new watcher's state of the take-over.
pub(crate) struct Takeover {
    parent: u32,
    /// The link, until [`Supervisor::start_takeover`] splits it.
    link: Option<OwnedFd>,
    /// The connection link, until [`Supervisor::start_takeover`] reads it.
    conns: Option<OwnedFd>,
    /// The storage snapshot the old watcher wrote (at the start, and again
    /// at the commit).
    snapshot: Option<File>,
    tx: Option<LinkTx>,
    handed: Option<HandedServices>,
    /// systemd's notifier, used once this watcher took over.
    notifier: Option<Notifier>,
    phase: Phase,
    ready_sent: bool,
    jobs_retry_at: Option<Instant>,
}

impl Takeover {
    /// The take-over of what `inherited` holds; its listeners go to the
    /// listener registry.
    pub(crate) fn new(
        inherited: Inherited,
        notifier: Option<Notifier>,
    ) -> (Takeover, Vec<HandedListener>) {
        let takeover = Takeover {
            parent: inherited.parent,
            link: Some(inherited.link),
            conns: inherited.conns,
            snapshot: inherited.storage,
            tx: None,
            handed: Some(HandedServices {
                pid_file: inherited.pid_file,
                control: inherited.control,
                control_path: inherited.control_path,
                metrics: inherited.metrics,
                http: inherited.http,
            }),
            notifier,
            phase: Phase::Waiting,
            ready_sent: false,
            jobs_retry_at: None,
        };
        (takeover, inherited.listeners)
    }

    /// This watcher took over (it serves the control socket).
    pub(crate) fn serving(&self) -> bool {
        self.phase != Phase::Waiting
    }

    /// When starting the job dispatcher is tried again.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.jobs_retry_at
    }

    fn send(&mut self, msg: &ToOld) {
        if let Some(tx) = &mut self.tx {
            if let Err(e) = tx.send(msg) {
                tracing::debug!(
                    "cannot tell the old watcher (pid {}) {msg:?}: {e}",
                    self.parent
                );
            }
        }
    }
}

impl Supervisor {
    /// Loads the old watcher's storage and starts reading the links to it,
    /// if this watcher is the new one of an upgrade. Until it takes over,
    /// the storage file is the old watcher's to write.
    ///
    /// # Errors
    ///
    /// `is_storage` when the snapshot is not usable (this build cannot
    /// read the old one's store): the upgrade fails.
    pub(super) fn start_takeover(&mut self) -> Result<()> {
        let Some(t) = &mut self.takeover else {
            return Ok(());
        };
        let Some(fd) = t.link.take() else {
            return Ok(());
        };
        self.ctx.hub.set_persisting(false);
        load_snapshot(&self.ctx.hub, t.snapshot.as_ref(), "at the start")?;
        tracing::info!(
            "upgrade: taking over from the old watcher (pid {}) with {} worker(s)",
            t.parent,
            self.pool.slots.len()
        );
        match upgrade::split(UnixStream::from(fd)) {
            Ok((tx, rx)) => {
                t.tx = Some(tx);
                let events = self.ctx.events.clone();
                tokio::spawn(async move {
                    upgrade::read_link::<ToNew>(rx, |m| {
                        let _ = events.send(Event::Upgrade(UpgradeEvent::FromOld(m)));
                    })
                    .await;
                    let _ = events.send(Event::Upgrade(UpgradeEvent::OldGone));
                });
            }
            // The old watcher rolls back when it hears nothing in time.
            Err(e) => tracing::error!("upgrade: cannot use the link to the old watcher: {e}"),
        }
        if let Some(fd) = t.conns.take() {
            let events = self.ctx.events.clone();
            tokio::spawn(upgrade::read_conns(fd, move |addr, peer, fd| {
                let _ = events.send(Event::Upgrade(UpgradeEvent::Connection { addr, peer, fd }));
            }));
        }
        Ok(())
    }

    /// Every worker is ready: the old watcher may commit.
    pub(super) fn takeover_ready(&mut self) {
        let Some(t) = &mut self.takeover else { return };
        if t.phase == Phase::Waiting && !t.ready_sent {
            t.ready_sent = true;
            tracing::info!(
                "upgrade: every worker is ready; telling the old watcher (pid {})",
                t.parent
            );
            t.send(&ToOld::Ready);
        }
    }

    /// This watcher fails before it took over: the old one hears why.
    pub(super) fn takeover_failed(&mut self, e: &Error) {
        if let Some(t) = self.takeover.as_mut().filter(|t| t.phase == Phase::Waiting) {
            t.send(&ToOld::Failed { why: e.to_string() });
        }
    }

    pub(super) async fn on_old_says(&mut self, msg: ToNew) {
        match msg {
            ToNew::Commit => self.take_over().await,
            ToNew::Released => self.start_late_jobs().await,
        }
    }

    /// The old watcher exited: everything it held is free.
    pub(super) async fn old_gone(&mut self) {
        let Some(t) = &self.takeover else { return };
        if self.stopping {
            return;
        }
        if t.phase == Phase::Waiting {
            tracing::warn!(
                "upgrade: the old watcher (pid {}) exited before it handed over; taking over now",
                t.parent
            );
            self.take_over().await;
        }
        self.start_late_jobs().await;
    }

    /// Takes the pid file, control socket, metrics and dashboard.
    async fn take_over(&mut self) {
        let Some(t) = self.takeover.as_mut().filter(|t| t.phase == Phase::Waiting) else {
            return;
        };
        if self.stopping {
            t.send(&ToOld::Failed {
                why: "it is stopping".into(),
            });
            return;
        }
        // The store as the old watcher left it when it committed.
        if let Err(e) = load_snapshot(&self.ctx.hub, t.snapshot.as_ref(), "at the commit") {
            tracing::error!("upgrade: cannot take over: {e}");
            self.fail(e);
            return;
        }
        let handed = t.handed.take().unwrap_or_default();
        let result = self
            .services
            .take_over(
                &self.ctx.config,
                &self.ctx.hub,
                &self.channels.commands_tx,
                handed,
            )
            .await;
        if let Err(e) = result {
            tracing::error!("upgrade: cannot take over: {e}");
            self.fail(e);
            return;
        }
        let Some(t) = &mut self.takeover else { return };
        t.phase = Phase::Serving;
        t.snapshot = None;
        self.ctx.hub.set_persisting(true);
        t.send(&ToOld::Serving);
        self.ctx.notifier = t.notifier.take();
        self.services.start_watchdog(self.ctx.notifier.as_ref());
        tracing::info!(
            "upgrade: took over from the old watcher (pid {}); this watcher (pid {}, cluster {}) serves",
            t.parent,
            std::process::id(),
            env!("CARGO_PKG_VERSION")
        );
    }

    /// Starts the job dispatcher once the old watcher released the store,
    /// and tells it about the job workers that are ready.
    async fn start_late_jobs(&mut self) {
        let Some(t) = self.takeover.as_mut().filter(|t| t.phase == Phase::Serving) else {
            return;
        };
        if self.stopping || self.ctx.config.jobs.is_none() {
            t.phase = Phase::Released;
            return;
        }
        t.jobs_retry_at = None;
        let ready = self.channels.ready.subscribe();
        let started = self
            .services
            .start_jobs(&self.ctx.config, &self.channels.commands_tx, ready)
            .await;
        let Some(t) = &mut self.takeover else { return };
        if let Err(e) = started {
            tracing::error!("upgrade: cannot run jobs yet: {e}; trying again in {JOBS_RETRY:?}");
            t.jobs_retry_at = Some(Instant::now() + JOBS_RETRY);
            return;
        }
        t.phase = Phase::Released;
        for (&context_id, w) in &self.pool.workers {
            if let Some((handlers, concurrency)) = &w.jobs {
                self.services.jobs(JobsEvent::WorkerJoined {
                    context_id,
                    slot: w.slot,
                    pid: w.pid,
                    outbound: w.outbound.clone(),
                    accepting: w.accepting.clone(),
                    handlers: handlers.clone(),
                    concurrency: *concurrency,
                });
            }
        }
    }

    /// Tries to start the job dispatcher again when that is due.
    pub(super) async fn takeover_timer(&mut self) {
        let due = self
            .takeover
            .as_ref()
            .and_then(|t| t.jobs_retry_at)
            .is_some_and(|t| t <= Instant::now());
        if due {
            self.start_late_jobs().await;
        }
    }
}
