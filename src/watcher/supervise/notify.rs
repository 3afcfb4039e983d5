//! What the supervisor does when a worker said something new on its notify
//! socket (`--notify`; the reader is `watcher/notify.rs`):
//!
//! * `READY=1`: the worker is ready (the rolling-restart gate);
//! * `WATCHDOG=1` (the first): the heartbeat holds it to sending it again
//!   within the heartbeat timeout (later pings are counted by the reader
//!   and read by the heartbeat check);
//! * `WATCHDOG=trigger`: it asks to be treated as hung: killed, replaced;
//! * `RELOADING=1`: shown as reloading until the next `READY=1`;
//! * `STOPPING=1`: it drains on its own. If the watcher did not ask, its
//!   slot gets a new worker at once (a ready worker's) or after the backoff
//!   (one that never got ready), and it is killed if it is still alive
//!   after the shutdown timeout. A replacement that says it before it was
//!   ready fails the rolling restart.

use super::slots::Respawn;
use super::Supervisor;
use crate::watcher::status::WorkerState;

impl Supervisor {
    pub(super) fn on_notify(&mut self, context_id: u64) {
        let Some(w) = self.pool.workers.get_mut(&context_id) else {
            return;
        };
        let Some(notified) = w.notify.as_mut() else {
            return;
        };
        let said = notified.state.take();
        let before = notified.seen;
        notified.seen = said;
        notified.seen.watchdogs = before.watchdogs; // the heartbeat check counts pings
        let (slot, pid) = (w.slot, w.pid);
        if said.trigger && !before.trigger {
            tracing::error!("worker {slot} (pid {pid}) said WATCHDOG=trigger; killing it");
            w.kill(&self.ctx, "WATCHDOG=trigger");
            return;
        }
        if said.watchdogs > 0 && !notified.armed {
            notified.armed = true;
            tracing::debug!("worker {slot} (pid {pid}) sends WATCHDOG=1: it is held to it");
            if w.state == WorkerState::Ready {
                w.start_heartbeat(&self.ctx);
            }
        }
        if said.ready && !before.ready {
            self.on_ready(context_id);
        }
        let Some(w) = self.pool.workers.get_mut(&context_id) else {
            return;
        };
        if said.reloading != w.reloading {
            w.reloading = said.reloading;
            if said.reloading {
                tracing::info!("worker {slot} (pid {pid}) is reloading (RELOADING=1)");
            } else {
                tracing::info!("worker {slot} (pid {pid}) finished reloading (READY=1)");
            }
        }
        if said.stopping && !before.stopping {
            self.stopping_on_its_own(context_id);
        }
    }

    /// A worker said `STOPPING=1`.
    fn stopping_on_its_own(&mut self, context_id: u64) {
        let Some(w) = self.pool.workers.get_mut(&context_id) else {
            return;
        };
        let (slot, pid, state, started) = (w.slot, w.pid, w.state, w.started);
        if state == WorkerState::Stopping {
            tracing::debug!("worker {slot} (pid {pid}) is draining (STOPPING=1)");
            return;
        }
        if self.reloads.replacement(slot) == Some(context_id) {
            let why = format!(
                "the replacement for worker {slot} (pid {pid}) said STOPPING=1 before it was ready"
            );
            self.pool
                .abandon(&self.ctx, context_id, "stopped before it was ready");
            self.reloads
                .replacement_failed(&mut self.pool, &self.ctx, context_id, why);
            return;
        }
        w.stopping_on_its_own(&self.ctx);
        let current = self
            .pool
            .slot(slot)
            .is_some_and(|s| s.current == Some(context_id));
        if self.stopping || !current {
            return;
        }
        if self.reloads.replacement(slot).is_some() {
            tracing::info!(
                "worker {slot} (pid {pid}) said STOPPING=1; its replacement is starting"
            );
            return;
        }
        let kind = if state == WorkerState::Ready {
            Respawn::Killed
        } else if started.elapsed() >= self.ctx.config.backoff_reset {
            Respawn::Ended
        } else {
            Respawn::Failed
        };
        let why = format!("(pid {pid}) said STOPPING=1");
        self.pool.schedule_respawn(&self.ctx, slot, &why, kind);
    }
}
