//! Stopping one worker (`cluster stop --slot N | --name X`), as Clusterfy
//! does: a worker whose status is `idle` is stopped at once (stop message
//! and SIGTERM now, SIGKILL a second later); any other is asked to stop
//! (its status becomes `stopping`) and killed after the timeout. Whether
//! its slot gets a new worker is `--revive`'s call (`on_exit`).

use std::time::Duration;

use super::Supervisor;
use crate::error::{Error, Kind, Result};
use crate::watcher::event::{StoppedWorker, WorkerSelector};
use crate::watcher::status::WorkerState;

impl Supervisor {
    pub(super) fn stop_one(
        &mut self,
        which: WorkerSelector,
        timeout: Option<Duration>,
    ) -> Result<StoppedWorker> {
        if self.stopping {
            return Err(Error::closed("the watcher is stopping"));
        }
        let slot = match &which {
            WorkerSelector::Slot(n) => *n,
            WorkerSelector::Name(name) => (1..=self.pool.slots.len() as u32)
                .find(|&s| self.ctx.config.worker_name(s).as_deref() == Some(name.as_str()))
                .ok_or_else(|| {
                    Error::new(Kind::UnknownTarget, format!("no worker is named {name:?}"))
                })?,
        };
        let id = self
            .pool
            .slot(slot)
            .and_then(|s| s.current)
            .ok_or_else(|| {
                Error::new(
                    Kind::UnknownTarget,
                    format!("no worker runs in slot {slot}"),
                )
            })?;
        let w = self.pool.workers.get(&id).ok_or_else(|| {
            Error::new(
                Kind::UnknownTarget,
                format!("no worker runs in slot {slot}"),
            )
        })?;
        if w.state == WorkerState::Stopping {
            return Err(Error::new(
                Kind::Config,
                format!("worker {slot} (pid {}) is already stopping", w.pid),
            ));
        }
        let idle = w.status.as_deref() == Some("idle");
        let pid = w.pid;
        let timeout = timeout.unwrap_or(self.ctx.config.shutdown_timeout);
        if idle {
            tracing::info!("stopping worker {slot} (pid {pid}) at once: it is idle");
        } else {
            tracing::info!(
                "asking worker {slot} (pid {pid}) to stop; it is killed after {timeout:?}"
            );
        }
        self.pool.stop_alone(&self.ctx, id, timeout, idle);
        Ok(StoppedWorker {
            slot,
            pid,
            context_id: id,
            at_once: idle,
        })
    }
}
