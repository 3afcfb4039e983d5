//! Upgrading the watcher, the old watcher's side (the new one's is
//! `takeover.rs`; the hand-over itself is described in `watcher/upgrade.rs`).
//!
//! 1. `Command::Upgrade` (SIGUSR2, `cluster upgrade`): duplicate every
//!    listener and the services' descriptors, start the new watcher
//!    (through the [`Launcher`](crate::watcher::process::Launcher)), and
//!    wait, for at most the ready timeout, for `ready` on the link.
//! 2. `ready`: stop answering the control socket, metrics and dashboard,
//!    send `commit`, and wait (at most [`COMMIT_TIMEOUT`]) for `serving`.
//! 3. `serving`: the upgrade succeeded. Tell systemd the new main pid,
//!    answer the waiters with the new pid, turn the balancers (if any)
//!    into forwarders to the new watcher, and stop: the workers drain
//!    (running jobs finish, claimed ones are given back), then the
//!    listeners are forgotten without removing their files, `released` goes
//!    to the new watcher, and this one exits.
//!
//! Any other turn before `serving` (the new watcher exits, says `failed`,
//! misses a deadline, or this watcher is asked to stop) rolls back: the new
//! watcher gets SIGTERM (SIGKILL after the shutdown timeout), the paused
//! services answer again and the pid file is written anew, and the waiters
//! get an [`Error::is_upgrade`] error saying why. The old workers never
//! stopped serving.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Supervisor;
use crate::error::{Error, Kind, Result};
use crate::watcher::process::describe_exit;
use crate::watcher::upgrade::{
    self, ConnForward, LinkTx, NewWatcher, Plan, ToNew, ToOld, UpgradeEvent,
};

/// How long the new watcher has to take over once told to.
pub(crate) const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a rolled back new watcher has to stop, beyond the shutdown
/// timeout it gives its own workers, before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Who waits for an upgrade's result (the new watcher's pid).
type Waiter = oneshot::Sender<Result<u32>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The new watcher starts its workers.
    Starting,
    /// Told to take over; this watcher answers nothing meanwhile.
    Committing,
}

struct Attempt {
    pid: u32,
    link: LinkTx,
    conns: Arc<ConnForward>,
    /// The storage snapshot file the new watcher has open too.
    snapshot: File,
    phase: Phase,
    deadline: Instant,
    waiters: Vec<Waiter>,
}

/// The upgrade in flight, the watcher handed over to, and the counts.
#[derive(Default)]
pub(crate) struct Upgrades {
    current: Option<Attempt>,
    /// The new watcher that took over: this one drains and exits.
    handed_to: Option<(u32, LinkTx)>,
    /// Rolled back new watchers asked to stop, and when they get SIGKILL.
    dying: HashMap<u32, Instant>,
    pub ok: u64,
    pub failed: u64,
}

impl Upgrades {
    /// An upgrade started and has neither succeeded nor failed yet.
    pub(crate) fn in_progress(&self) -> bool {
        self.current.is_some()
    }

    /// The pid of the new watcher this one handed over to.
    pub(crate) fn handed_to(&self) -> Option<u32> {
        self.handed_to.as_ref().map(|(pid, _)| *pid)
    }

    /// When a deadline of the upgrade is due.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.current
            .as_ref()
            .map(|a| a.deadline)
            .into_iter()
            .chain(self.dying.values().copied())
            .min()
    }

    /// Tells the new watcher that the job store and everything else is
    /// free: this watcher's workers are gone and its dispatcher stopped.
    pub(crate) fn released(&mut self) {
        if let Some((pid, link)) = &mut self.handed_to {
            if let Err(e) = link.send(&ToNew::Released) {
                // It sees the link close when this process exits.
                tracing::debug!("cannot tell the new watcher (pid {pid}) it is released: {e}");
            }
        }
    }
}

impl Supervisor {
    /// `Command::Upgrade`: starts an upgrade, or joins the one in flight.
    pub(super) fn request_upgrade(&mut self, done: Option<Waiter>) {
        let refuse = |done: Option<Waiter>, e: Error| {
            if let Some(d) = done {
                let _ = d.send(Err(e));
            }
        };
        if self.stopping {
            let why = match self.upgrades.handed_to() {
                Some(pid) => format!("the watcher was upgraded: the new one has pid {pid}"),
                None => "the watcher is stopping".into(),
            };
            return refuse(done, Error::closed(why));
        }
        if let Some(a) = &mut self.upgrades.current {
            tracing::info!(
                "an upgrade is running (new watcher pid {}); waiting for it",
                a.pid
            );
            a.waiters.extend(done);
            return;
        }
        if self.takeover.as_ref().is_some_and(|t| !t.serving()) {
            return refuse(
                done,
                Error::new(
                    Kind::Upgrade,
                    "this watcher is still taking over from the old one; upgrade it afterwards",
                ),
            );
        }
        let started = self.upgrade_plan().and_then(|(plan, snapshot)| {
            let new = self.ctx.launcher.spawn_watcher(plan, &self.ctx.events)?;
            Ok((new, snapshot))
        });
        match started {
            Ok((NewWatcher { pid, link, conns }, snapshot)) => {
                let timeout = self.ctx.config.ready_timeout;
                tracing::info!(
                    "upgrade: started the new watcher {} (pid {pid}); waiting up to {timeout:?} for its workers",
                    self.ctx.config.upgrade_exec.0.display()
                );
                self.upgrades.current = Some(Attempt {
                    pid,
                    link,
                    conns,
                    snapshot,
                    phase: Phase::Starting,
                    deadline: Instant::now() + timeout,
                    waiters: done.into_iter().collect(),
                });
            }
            Err(e) => {
                self.upgrades.failed += 1;
                let e = rolled_back(&e.to_string());
                tracing::error!("{e}");
                refuse(done, e);
            }
        }
    }

    /// What the new watcher gets: every listener, the services'
    /// descriptors, the number of workers, the command to run.
    fn upgrade_plan(&self) -> Result<(Plan, File)> {
        let listeners = self.pool.listeners.handover()?;
        // The storage as it is now; rewritten at the commit.
        let storage_err = |e: std::io::Error| {
            Error::with_io(Kind::Upgrade, "cannot hand over the shared storage", e)
        };
        let text = self.ctx.hub.snapshot_text()?;
        let snapshot = upgrade::snapshot_file(&text).map_err(storage_err)?;
        let storage = snapshot.try_clone().map_err(storage_err)?;
        let services = self.services.handover_fds(&self.ctx.config)?;
        let (program, args) = self.ctx.config.upgrade_exec.clone();
        // Its own listeners come from us; the watchdog is its own once it
        // is the main process (`WATCHDOG_PID` names us).
        let mut env_remove = vec!["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID"];
        if self
            .ctx
            .notifier
            .as_ref()
            .is_none_or(|n| n.watchdog.is_none())
        {
            env_remove.push("WATCHDOG_USEC");
        }
        let plan = Plan {
            program,
            args,
            workers: self.pool.slots.len(),
            listeners,
            pid_file: services.pid_file,
            control: services.control,
            control_path: services.control_path,
            metrics: services.metrics,
            http: services.http,
            storage: Some(OwnedFd::from(storage)),
            env_remove,
        };
        Ok((plan, snapshot))
    }

    /// What the other watcher of an upgrade reports.
    pub(super) async fn on_upgrade(&mut self, ev: UpgradeEvent) {
        match ev {
            UpgradeEvent::FromNew { pid, msg } => self.on_new_says(pid, msg),
            UpgradeEvent::NewExited { pid, status } => self.new_exited(pid, status),
            UpgradeEvent::FromOld(msg) => self.on_old_says(msg).await,
            UpgradeEvent::OldGone => self.old_gone().await,
            UpgradeEvent::Connection { addr, peer, fd } => {
                self.pool.listeners.inject(&addr, fd, peer)
            }
        }
    }

    fn on_new_says(&mut self, pid: u32, msg: ToOld) {
        let Some(a) = self.upgrades.current.as_mut().filter(|a| a.pid == pid) else {
            tracing::debug!("upgrade: {msg:?} from pid {pid}, which is not upgrading us");
            return;
        };
        match (msg, a.phase) {
            (ToOld::Ready, Phase::Starting) => {
                tracing::info!(
                    "upgrade: the new watcher's workers are ready; handing over to pid {pid}"
                );
                self.services.pause();
                a.phase = Phase::Committing;
                a.deadline = Instant::now() + COMMIT_TIMEOUT;
                // The store moves now: its last state for the new watcher,
                // and the storage file is the new watcher's to write.
                self.ctx.hub.set_persisting(false);
                let handed = self
                    .ctx
                    .hub
                    .snapshot_text()
                    .map_err(|e| e.to_string())
                    .and_then(|text| {
                        upgrade::rewrite_snapshot(&a.snapshot, &text).map_err(|e| e.to_string())
                    })
                    .map_err(|e| format!("cannot hand over the shared storage: {e}"))
                    .and_then(|()| {
                        a.link
                            .send(&ToNew::Commit)
                            .map_err(|e| format!("cannot reach the new watcher (pid {pid}): {e}"))
                    });
                if let Err(why) = handed {
                    self.roll_back_upgrade(why, true);
                }
            }
            (ToOld::Serving, Phase::Committing) => self.upgrade_done(),
            (ToOld::Failed { why }, _) => {
                self.roll_back_upgrade(format!("the new watcher (pid {pid}) failed: {why}"), true)
            }
            (msg, phase) => tracing::debug!("upgrade: {msg:?} from pid {pid} while {phase:?}"),
        }
    }

    fn new_exited(&mut self, pid: u32, status: Option<ExitStatus>) {
        let how = describe_exit(status);
        if self.upgrades.dying.remove(&pid).is_some() {
            tracing::debug!("upgrade: the rolled back new watcher (pid {pid}) {how}");
            return;
        }
        match self.upgrades.current.as_ref().filter(|a| a.pid == pid) {
            Some(a) => {
                let when = match a.phase {
                    Phase::Starting => "before its workers were ready",
                    Phase::Committing => "before it took over",
                };
                let why = format!(
                    "the new watcher (pid {pid}) {how} {when} (its output is in the watcher's log)"
                );
                self.roll_back_upgrade(why, false);
            }
            None if self.upgrades.handed_to() == Some(pid) => {
                tracing::warn!("the new watcher (pid {pid}) {how} while this one drains");
            }
            None => tracing::debug!("upgrade: pid {pid} {how}"),
        }
    }

    /// The new watcher serves: this one answers the waiters and drains.
    fn upgrade_done(&mut self) {
        let Some(a) = self.upgrades.current.take() else {
            return;
        };
        let pid = a.pid;
        self.services.hand_over();
        self.upgrades.ok += 1;
        tracing::info!("upgrade: the new watcher (pid {pid}) serves; this one (pid {}) drains its workers and exits", std::process::id());
        // systemd follows the main pid: the new watcher from now on.
        self.ctx.notify(&[
            format!("MAINPID={pid}"),
            format!("STATUS=upgraded: the new watcher has pid {pid}"),
        ]);
        for w in a.waiters {
            let _ = w.send(Ok(pid));
        }
        // Connections this watcher accepted itself (the balanced modes)
        // and has not handed to a worker go to the new one from now on.
        self.pool.listeners.forward(&a.conns);
        self.upgrades.handed_to = Some((pid, a.link));
        self.begin_stop(None);
    }

    /// Gives up the upgrade in flight: the new watcher is asked to stop
    /// (when `alive`), the services answer again, the waiters hear why.
    pub(super) fn roll_back_upgrade(&mut self, why: String, alive: bool) {
        let Some(a) = self.upgrades.current.take() else {
            return;
        };
        self.upgrades.failed += 1;
        if a.phase == Phase::Committing {
            self.services.resume();
            self.ctx.hub.set_persisting(true);
        }
        if alive {
            self.ctx.launcher.signal_watcher(a.pid, Signal::SIGTERM);
            let kill_at = Instant::now() + self.ctx.config.shutdown_timeout + STOP_GRACE;
            self.upgrades.dying.insert(a.pid, kill_at);
        }
        let e = rolled_back(&why);
        tracing::error!("{e}");
        for w in a.waiters {
            let _ = w.send(Err(e.clone()));
        }
    }

    /// Deadlines: the new watcher's readiness and take-over, and SIGKILL
    /// for rolled back ones that do not stop.
    pub(super) fn upgrade_timer(&mut self, now: Instant) {
        if let Some(a) = self.upgrades.current.as_ref().filter(|a| a.deadline <= now) {
            let why = match a.phase {
                Phase::Starting => format!(
                    "the new watcher's (pid {}) workers were not ready within {:?}",
                    a.pid, self.ctx.config.ready_timeout
                ),
                Phase::Committing => format!(
                    "the new watcher (pid {}) did not take over within {COMMIT_TIMEOUT:?}",
                    a.pid
                ),
            };
            self.roll_back_upgrade(why, true);
        }
        let due: Vec<u32> = self
            .upgrades
            .dying
            .iter()
            .filter(|(_, &t)| t <= now)
            .map(|(&p, _)| p)
            .collect();
        for pid in due {
            self.upgrades.dying.remove(&pid);
            tracing::warn!(
                "upgrade: the rolled back new watcher (pid {pid}) did not stop; killing it"
            );
            self.ctx.launcher.signal_watcher(pid, Signal::SIGKILL);
        }
    }
}

/// The error of a rolled back upgrade.
fn rolled_back(why: &str) -> Error {
    Error::new(
        Kind::Upgrade,
        format!(
            "upgrade failed: {why}; the old watcher (pid {}) keeps serving",
            std::process::id()
        ),
    )
}
