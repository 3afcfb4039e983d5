//! Rolling restart: for each slot in turn (`reload_batch` at a time) a
//! replacement is spawned beside the serving worker; once it is ready it
//! takes the slot and the old worker is asked to drain. A replacement that
//! exits or is not ready within `ready_timeout` is killed, the old worker
//! keeps serving, and the reload stops there with an error. A reload asked
//! for while one runs is queued (several queued requests merge into one).

use std::collections::{HashMap, VecDeque};

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::slots::{Ctx, Pool, Respawn};
use crate::error::{Error, Kind, Result};
use crate::watcher::systemd;

/// Who waits for a reload's result.
type Waiter = oneshot::Sender<Result<()>>;

struct Reload {
    reason: String,
    started: Instant,
    pending: VecDeque<u32>,
    /// slot -> context id of its replacement, not yet ready.
    in_flight: HashMap<u32, u64>,
    failure: Option<String>,
    done: Vec<Waiter>,
    replaced: usize,
    /// A recycle of single workers (`--max-requests`, `--max-memory`):
    /// not counted as a reload, not told to systemd.
    recycle: bool,
}

/// The running reload, the one queued behind it, and their counts.
#[derive(Default)]
pub(crate) struct Reloads {
    current: Option<Reload>,
    /// A reload asked for while one runs: its reasons and waiters.
    queued: Option<(String, Vec<Waiter>)>,
    pub ok: u64,
    pub failed: u64,
}

impl Reloads {
    /// The replacement starting for `slot`, if any.
    pub(crate) fn replacement(&self, slot: u32) -> Option<u64> {
        self.current.as_ref()?.in_flight.get(&slot).copied()
    }

    /// Starts a rolling restart of every slot, or queues it behind the one
    /// that runs. The caller refuses requests while stopping.
    pub(crate) fn request(
        &mut self,
        pool: &mut Pool,
        ctx: &Ctx,
        reason: String,
        done: Option<Waiter>,
    ) {
        if self.current.is_some() {
            tracing::info!("{reason}: a rolling restart is running; queued");
            let queued = self
                .queued
                .get_or_insert_with(|| (String::new(), Vec::new()));
            if queued.0.is_empty() {
                queued.0 = reason;
            } else if !queued.0.contains(&reason) {
                queued.0 = format!("{}, {reason}", queued.0);
            }
            queued.1.extend(done);
            return;
        }
        tracing::info!(
            "{reason}: rolling restart of {} worker(s)",
            pool.slots.len()
        );
        ctx.notify(&[
            "RELOADING=1".into(),
            format!("MONOTONIC_USEC={}", systemd::monotonic_usec()),
            format!("STATUS=rolling restart ({reason})"),
        ]);
        self.current = Some(Reload {
            reason,
            started: Instant::now(),
            pending: (1..=pool.slots.len() as u32).collect(),
            in_flight: HashMap::new(),
            failure: None,
            done: done.into_iter().collect(),
            replaced: 0,
            recycle: false,
        });
        self.step(pool, ctx);
    }

    /// Starts replacements up to the batch size; finishes the reload when
    /// nothing is pending or in flight (and starts a queued one).
    fn step(&mut self, pool: &mut Pool, ctx: &Ctx) {
        let batch = ctx.config.reload_batch.max(1);
        loop {
            let Some(reload) = self.current.as_mut() else {
                return;
            };
            if reload.failure.is_some() {
                reload.pending.clear();
                // Kill replacements that are still starting; old workers stay.
                for (_, id) in reload.in_flight.drain() {
                    pool.abandon(ctx, id, "rolling restart aborted");
                }
            }
            if reload.in_flight.len() >= batch || reload.pending.is_empty() {
                if reload.pending.is_empty() && reload.in_flight.is_empty() {
                    self.finish(pool, ctx);
                }
                return;
            }
            let slot = reload.pending.pop_front().expect("not empty");
            if slot as usize > pool.slots.len() {
                continue; // scaled down meanwhile
            }
            match pool.spawn(ctx, slot, true) {
                Ok(id) => {
                    if let Some(s) = pool.slot_mut(slot) {
                        s.restarts += 1;
                    }
                    reload.in_flight.insert(slot, id);
                }
                Err(e) => {
                    reload.failure =
                        Some(format!("cannot start a replacement for worker {slot}: {e}"));
                }
            }
        }
    }

    /// Replaces the worker of `slot` through the rolling path (its
    /// replacement is ready before it drains): joins the running reload,
    /// or starts one for that slot alone. `false` when the slot is being
    /// replaced already.
    pub(crate) fn recycle(&mut self, pool: &mut Pool, ctx: &Ctx, slot: u32, why: &str) -> bool {
        if let Some(reload) = self.current.as_mut() {
            if reload.in_flight.contains_key(&slot) || reload.pending.contains(&slot) {
                return false;
            }
            tracing::info!("recycling worker {slot}: it {why}");
            reload.pending.push_back(slot);
            self.step(pool, ctx);
            return true;
        }
        tracing::info!("recycling worker {slot}: it {why}");
        self.current = Some(Reload {
            reason: format!("recycling worker {slot}"),
            started: Instant::now(),
            pending: VecDeque::from([slot]),
            in_flight: HashMap::new(),
            failure: None,
            done: Vec::new(),
            replaced: 0,
            recycle: true,
        });
        self.step(pool, ctx);
        true
    }

    fn finish(&mut self, pool: &mut Pool, ctx: &Ctx) {
        let Some(reload) = self.current.take() else {
            return;
        };
        if reload.recycle {
            answer(reload);
            self.start_queued(pool, ctx);
            return;
        }
        let failed = reload.failure.is_some();
        if failed {
            self.failed += 1;
        } else {
            self.ok += 1;
        }
        answer(reload);
        let status = if failed {
            format!(
                "STATUS={} worker(s) ready; the last rolling restart failed",
                pool.ready_slots()
            )
        } else {
            format!("STATUS={} worker(s) ready", pool.ready_slots())
        };
        ctx.notify(&["READY=1".into(), status]);
        self.start_queued(pool, ctx);
    }

    /// Starts the reload queued behind the one that ended, if any.
    fn start_queued(&mut self, pool: &mut Pool, ctx: &Ctx) {
        if let Some((reason, done)) = self.queued.take() {
            self.request(pool, ctx, reason, None);
            if let Some(r) = self.current.as_mut() {
                r.done.extend(done);
            }
        }
    }

    /// A replacement exited or timed out before it was ready: the reload
    /// fails (the old worker keeps serving).
    pub(crate) fn replacement_failed(
        &mut self,
        pool: &mut Pool,
        ctx: &Ctx,
        context_id: u64,
        why: String,
    ) {
        let Some(reload) = self.current.as_mut() else {
            return;
        };
        let Some((&slot, _)) = reload.in_flight.iter().find(|(_, &id)| id == context_id) else {
            return;
        };
        reload.in_flight.remove(&slot);
        tracing::error!("{why}; the old worker keeps serving");
        reload.failure.get_or_insert(why);
        // A slot left without any worker (its old one died meanwhile) respawns.
        if pool.slot(slot).is_some_and(|s| s.current.is_none()) {
            let why = "has no worker after a failed replacement";
            pool.schedule_respawn(ctx, slot, why, Respawn::Failed);
        }
        self.step(pool, ctx);
    }

    /// A worker became ready: when it is `slot`'s replacement it takes the
    /// slot and the old worker is asked to drain.
    pub(crate) fn ready(&mut self, pool: &mut Pool, ctx: &Ctx, slot: u32, context_id: u64) {
        let Some(reload) = self.current.as_mut() else {
            return;
        };
        if reload.in_flight.get(&slot) != Some(&context_id) {
            return;
        }
        reload.in_flight.remove(&slot);
        reload.replaced += 1;
        let old = pool
            .slot_mut(slot)
            .and_then(|s| s.current.replace(context_id));
        if let Some(old) = old.filter(|&o| o != context_id) {
            pool.stop(ctx, old);
        }
        self.step(pool, ctx);
    }

    /// `slot` was scaled away: nothing of the reload happens there any more.
    pub(crate) fn slot_retired(&mut self, pool: &mut Pool, ctx: &Ctx, slot: u32) {
        let Some(reload) = self.current.as_mut() else {
            return;
        };
        reload.pending.retain(|&s| s != slot);
        if let Some(id) = reload.in_flight.remove(&slot) {
            pool.abandon(ctx, id, "scaled down");
        }
    }

    /// Continues after the slots changed (scaling).
    pub(crate) fn resume(&mut self, pool: &mut Pool, ctx: &Ctx) {
        if self.current.is_some() {
            self.step(pool, ctx);
        }
    }

    /// The watcher is stopping: the running reload fails and queued ones
    /// are refused.
    pub(crate) fn abort(&mut self) {
        if let Some(mut reload) = self.current.take() {
            reload.failure = Some("the watcher is stopping".into());
            if !reload.recycle {
                self.failed += 1;
            }
            answer(reload);
        }
        if let Some((_, waiters)) = self.queued.take() {
            for w in waiters {
                let _ = w.send(Err(Error::closed("the watcher is stopping")));
            }
        }
    }
}

/// Logs the end of `reload` and answers everyone who waits for it.
fn answer(reload: Reload) {
    let took = reload.started.elapsed();
    let result = match &reload.failure {
        None => {
            tracing::info!(
                "rolling restart ({}) done: {} worker(s) replaced in {took:.1?}",
                reload.reason,
                reload.replaced
            );
            Ok(())
        }
        Some(why) => {
            tracing::error!(
                "rolling restart ({}) failed after replacing {} worker(s): {why}",
                reload.reason,
                reload.replaced
            );
            Err(Error::new(Kind::Reload, why.clone()))
        }
    };
    for done in reload.done {
        let _ = done.send(result.clone());
    }
}
