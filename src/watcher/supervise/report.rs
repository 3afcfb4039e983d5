//! What the supervisor reports about its workers: the status report for
//! `cluster status` and `ClusterWatcher::workers` (with the idle and
//! given-up slots, the program and its addresses), and the counters of a
//! metrics scrape. Names, statuses and traffic come from the workers'
//! records; command counts and the storage's figures from the hub.

use super::Supervisor;
use crate::watcher::status::{Snapshot, StatusReport, Traffic, WorkerInfo, WorkerState};

impl Supervisor {
    /// Every worker, by slot, without `/proc` figures.
    pub(super) fn status_report(&self) -> StatusReport {
        let mut workers: Vec<WorkerInfo> = self
            .pool
            .workers
            .iter()
            .map(|(&context_id, w)| {
                let slot = self.pool.slot(w.slot);
                WorkerInfo {
                    slot: w.slot,
                    context_id,
                    pid: w.pid,
                    state: w.state,
                    restarts: slot.map(|s| s.restarts).unwrap_or(0),
                    uptime: w.started.elapsed(),
                    rss_bytes: None,
                    cpu_time: None,
                    last_exit: slot.and_then(|s| s.last_exit.clone()),
                    last_exit_code: slot.and_then(|s| s.last_exit_code),
                    last_exit_signal: slot.and_then(|s| s.last_exit_signal),
                    name: self.ctx.config.worker_name(w.slot),
                    // Said with `Cluster::set_status`, else with `STATUS=`.
                    status: w
                        .status
                        .clone()
                        .or_else(|| w.notify.as_ref().and_then(|n| n.state.status())),
                    reloading: w.reloading,
                    traffic: self.traffic(context_id),
                }
            })
            .collect();
        workers.sort_by_key(|w| (w.slot, w.context_id));
        let mut idle = self.pool.idle_slots();
        for s in &mut idle {
            s.name = self.ctx.config.worker_name(s.slot);
        }
        StatusReport {
            workers,
            wanted: self.pool.slots.len(),
            ready: self.pool.ready_slots(),
            idle,
            program: std::path::Path::new(&self.ctx.config.program)
                .display()
                .to_string(),
            addresses: self.pool.listeners.addresses(),
            log_file: self.ctx.config.log_file.clone(),
            storage: self.ctx.hub.stats(),
        }
    }

    /// Commands and messages worker `context_id` sent and received.
    fn traffic(&self, context_id: u64) -> Traffic {
        let calls = self.ctx.hub.call_counts(context_id);
        let w = self.pool.workers.get(&context_id);
        Traffic {
            commands_sent: calls.sent,
            commands_received: calls.received,
            messages_sent: w.map_or(0, |w| w.messages_in),
            messages_received: w.map_or(0, |w| w.messages_out),
        }
    }

    /// The counters and workers for one metrics scrape.
    pub(super) fn snapshot(&self) -> Snapshot {
        let mut workers: Vec<(u32, u32, WorkerState)> = self
            .pool
            .workers
            .values()
            .map(|w| (w.slot, w.pid, w.state))
            .collect();
        workers.sort_by_key(|w| (w.0, w.1));
        let mut info: Vec<_> = self
            .pool
            .workers
            .iter()
            .map(|(&id, w)| {
                let name = self.ctx.config.worker_name(w.slot);
                (w.slot, w.pid, name, w.status.clone(), self.traffic(id))
            })
            .collect();
        info.sort_by_key(|w| (w.0, w.1));
        let (log_records, output_drops) = self.ctx.config.output.counts();
        Snapshot {
            workers,
            info,
            storage: self.ctx.hub.stats(),
            slots: (1..=self.pool.slots.len() as u32)
                .zip(&self.pool.slots)
                .map(|(n, s)| (n, u64::from(s.restarts), u64::from(s.crashes)))
                .collect(),
            reloads_ok: self.reloads.ok,
            reloads_failed: self.reloads.failed,
            log_records,
            log_dropped: output_drops + self.counters.worker_log_drops,
            messages_in: self.counters.messages_in,
            messages_out: self.counters.messages_out,
            gave_up: (1..=self.pool.slots.len() as u32)
                .filter(|&n| self.pool.slot(n).is_some_and(|s| s.gave_up))
                .collect(),
            recycled: self.counters.recycled,
        }
    }
}
