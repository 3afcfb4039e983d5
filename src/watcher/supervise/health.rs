//! The supervisor's health duties: a slot that gave up after
//! `--max-restarts`, recycling one worker through the rolling path
//! (`--max-requests`, `--max-memory`), reopening `--log-file`, and telling
//! the `--on-event` hook about failed reloads.

use std::time::Duration;

use super::Supervisor;
use crate::error::{Error, Kind, Result};
use crate::watcher::hooks::event_fields;
use crate::watcher::status::WorkerState;

impl Supervisor {
    /// `slot` crashed too often and is not restarted any more: tell
    /// systemd and the hook.
    pub(super) fn gave_up(&mut self, slot: u32, how: &str) {
        let limit = self.ctx.config.max_restarts.unwrap_or(0);
        let window = self.ctx.config.restart_window.as_secs_f64();
        self.services.hooks.emit(
            "slot_gave_up",
            event_fields!("slot" => slot, "last_exit" => how, "max_restarts" => limit, "restart_window_secs" => window),
        );
        let failed: Vec<String> = (1..=self.pool.slots.len() as u32)
            .filter(|&n| self.pool.slot(n).is_some_and(|s| s.gave_up))
            .map(|n| n.to_string())
            .collect();
        self.ctx.notify(&[format!(
            "STATUS={} worker(s) ready; slot(s) {} gave up after --max-restarts",
            self.pool.ready_slots(),
            failed.join(", ")
        )]);
        if self.pool.all_gave_up() {
            tracing::error!(
                "every worker slot gave up: nothing serves until `cluster reload` (or a --watch/--reload-on-deploy trigger) starts them again"
            );
        }
    }

    /// Replaces the ready serving worker `context_id` through the rolling
    /// path (`--max-memory`, `--max-requests`), unless it is already
    /// being replaced or stopped.
    pub(super) fn recycle(&mut self, context_id: u64, why: &str) {
        if self.stopping {
            return;
        }
        let Some(w) = self.pool.workers.get(&context_id) else {
            return;
        };
        let (slot, pid) = (w.slot, w.pid);
        let serving = w.state == WorkerState::Ready
            && self.pool.slot(slot).and_then(|s| s.current) == Some(context_id);
        if !serving || self.reloads.replacement(slot).is_some() {
            return;
        }
        if self.reloads.recycle(&mut self.pool, &self.ctx, slot, why) {
            self.counters.recycled += 1;
            self.services.hooks.emit(
                "worker_recycled",
                event_fields!("slot" => slot, "pid" => pid, "why" => why),
            );
        }
    }

    /// Reopens `--log-file` (stdout and stderr point to it again).
    pub(super) fn reopen_logs(&self) -> Result<()> {
        let Some(path) = &self.ctx.config.log_file else {
            return Err(Error::new(
                Kind::Config,
                "this watcher writes no log file (start it with --daemon --log-file FILE)",
            ));
        };
        self.ctx.config.output.flush(Duration::from_millis(500));
        crate::daemon::reopen_log_file(path).map_err(|e| {
            Error::with_io(
                Kind::Io,
                format!("cannot reopen log file {}", path.display()),
                e,
            )
        })?;
        tracing::info!("reopened log file {}", path.display());
        Ok(())
    }

    /// Tells the hook about rolling restarts that failed since last time.
    pub(super) fn report_reload_failures(&mut self) {
        if self.reloads.failed > self.counters.reloads_failed_told {
            self.counters.reloads_failed_told = self.reloads.failed;
            self.services.hooks.emit(
                "reload_failed",
                event_fields!("failed_reloads" => self.reloads.failed),
            );
        }
    }
}
