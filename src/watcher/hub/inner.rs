//! What the hub's lock guards: the store, the watches, the routing table
//! and the counters; applying one storage operation and fanning its
//! change out to the watches, in order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::commands::router::Router;
use crate::ipc::message::{
    Change, HubError, HubErrorKind, ReplyBody, StorageOp, ToWorker, MAX_MESSAGE, MAX_VALUE,
};
use crate::storage::path;
use crate::storage::persist;
use crate::storage::store::{Changed, Store, StoreError};
use crate::storage::watch::Watches;
use crate::transport::{hub_error, WatchSink};
use crate::watcher::event::{Outbound, OutboundSender};

use crate::watcher::status::HubStats;

/// Watches one process may have.
pub(crate) const MAX_WATCHES: usize = 256;

/// Weighed bytes of changes that may wait for one worker before its
/// watches end as lagged.
const MAX_CHANGE_BACKLOG: usize = 4 * 1024 * 1024;

/// Where a watch's changes go.
pub(crate) enum Sink {
    /// A worker's channel (the watch id is the worker's request id).
    Worker(OutboundSender),
    /// A stream in the watcher's own code.
    Local(WatchSink),
}

/// Changes staged for one worker during a batch, sent as few messages.
struct Staged {
    outbound: OutboundSender,
    changes: Vec<Change>,
    weight: usize,
}

pub(crate) struct Inner {
    pub store: Store,
    pub watches: Watches<Sink>,
    pub router: Router,
    pub closed: bool,
    /// Changed since the last snapshot.
    pub dirty: bool,
    pub next_local: u64,
    ops: u64,
    /// The current one-second window: when it began, operations then.
    window: (Instant, u64),
    /// Operations per second over the last complete window.
    rate: f64,
    staged: HashMap<u64, Staged>,
}

fn store_error(e: StoreError) -> HubError {
    match e {
        StoreError::Invalid(m) => hub_error(HubErrorKind::Storage, m),
        StoreError::Full(m) => hub_error(HubErrorKind::StorageFull, m),
    }
}

fn too_large(len: usize, limit: usize) -> HubError {
    hub_error(
        HubErrorKind::TooLarge,
        format!("the value is {len} bytes as JSON, more than one message carries ({limit} bytes): get a path below it"),
    )
}

impl Inner {
    pub(crate) fn new(max_bytes: usize) -> Inner {
        Inner {
            store: Store::new(max_bytes),
            watches: Watches::default(),
            router: Router::default(),
            // Open once the watcher started and loaded the storage.
            closed: true,
            dirty: false,
            next_local: 0,
            ops: 0,
            window: (Instant::now(), 0),
            rate: 0.0,
            staged: HashMap::new(),
        }
    }

    /// Applies one storage operation; `limit` bounds a value in the reply.
    pub(crate) fn storage(
        &mut self,
        op: StorageOp,
        now: Instant,
        limit: Option<usize>,
    ) -> Result<ReplyBody, HubError> {
        self.ops += 1;
        self.roll_window(now);
        let fits = |t: &str| match limit {
            Some(l) if t.len() > l => Err(too_large(t.len(), l)),
            _ => Ok(()),
        };
        match op {
            StorageOp::Get { path } => {
                let v = self.store.get(&path).map_err(store_error)?;
                if let Some((t, _)) = &v {
                    fits(t)?;
                }
                Ok(ReplyBody::Value(v.map(|(t, _)| t)))
            }
            StorageOp::GetVersioned { path } => {
                let v = self.store.get(&path).map_err(store_error)?;
                if let Some((t, _)) = &v {
                    fits(t)?;
                }
                Ok(ReplyBody::Versioned(v))
            }
            StorageOp::Set {
                path,
                value,
                ttl_ms,
            } => {
                let ttl = ttl_ms.map(Duration::from_millis);
                let c = self
                    .store
                    .set(&path, &value, ttl, now)
                    .map_err(store_error)?;
                let version = c.revision;
                self.changed(c);
                Ok(ReplyBody::Version(version))
            }
            StorageOp::Delete { path } => {
                let c = self.store.delete(&path).map_err(store_error)?;
                let existed = c.is_some();
                if let Some(c) = c {
                    self.changed(c);
                }
                Ok(ReplyBody::Done(existed))
            }
            StorageOp::Increment { path, by } => {
                let (n, c) = self.store.increment(&path, by, now).map_err(store_error)?;
                self.changed(c);
                Ok(ReplyBody::Int(n))
            }
            StorageOp::CompareAndSwap {
                path,
                expected,
                new,
            } => {
                let c = self
                    .store
                    .compare_and_swap(&path, expected.as_deref(), &new, now)
                    .map_err(store_error)?;
                let swapped = c.is_some();
                if let Some(c) = c {
                    self.changed(c);
                }
                Ok(ReplyBody::Done(swapped))
            }
            StorageOp::Update {
                path,
                version,
                value,
            } => {
                let c = self
                    .store
                    .update(&path, version, &value, now)
                    .map_err(store_error)?;
                let v = c.as_ref().map(|c| c.revision);
                if let Some(c) = c {
                    self.changed(c);
                }
                Ok(ReplyBody::Updated(v))
            }
        }
    }

    /// Expires what is due, telling the watches.
    pub(crate) fn expire(&mut self, now: Instant) {
        if self.store.next_expiry().is_some_and(|t| t <= now) {
            for c in self.store.expire(now) {
                self.changed(c);
            }
        }
    }

    /// Adds a watch on `prefix` for `owner` (0: the watcher's code).
    pub(crate) fn watch(
        &mut self,
        owner: u64,
        id: u64,
        prefix: &str,
        sink: Sink,
    ) -> Result<ReplyBody, HubError> {
        let keys = path::parse(prefix).map_err(|m| hub_error(HubErrorKind::Storage, m))?;
        if owner != 0 && self.watches.count(owner) >= MAX_WATCHES {
            return Err(hub_error(
                HubErrorKind::Busy,
                format!("at most {MAX_WATCHES} watches per worker"),
            ));
        }
        self.watches.add(owner, id, &keys, sink);
        Ok(ReplyBody::Done(true))
    }

    /// Records a change and hands it to the watches it concerns: a local
    /// stream at once, a worker's staged until [`flush_changes`](Inner::flush_changes).
    fn changed(&mut self, c: Changed) {
        self.dirty = true;
        if self.watches.is_empty() {
            return;
        }
        let keys: Vec<&str> = if c.path.is_empty() {
            Vec::new()
        } else {
            c.path.split('.').collect()
        };
        let value = c.value.filter(|v| v.len() <= MAX_VALUE);
        let weight = 64 + c.path.len() + value.as_ref().map_or(0, |v| v.len());
        let mut ended = Vec::new();
        for ((owner, id), w) in self.watches.matching(&keys) {
            let change = Change {
                watch: id,
                revision: c.revision,
                kind: c.kind,
                path: c.path.clone(),
                value: value.clone(),
            };
            match &w.sink {
                Sink::Local(sink) => {
                    if !sink.deliver(change) {
                        ended.push((owner, id));
                    }
                }
                Sink::Worker(outbound) => {
                    let staged = self.staged.entry(owner).or_insert_with(|| Staged {
                        outbound: outbound.clone(),
                        changes: Vec::new(),
                        weight: 0,
                    });
                    if staged.weight + outbound.queued_bytes() > MAX_CHANGE_BACKLOG {
                        let reason = format!(
                            "more than {MAX_CHANGE_BACKLOG} bytes of changes wait for this worker: the watch was ended (lagged)"
                        );
                        let _ = outbound
                            .send(Outbound::msg(ToWorker::WatchEnded { watch: id, reason }));
                        ended.push((owner, id));
                        continue;
                    }
                    staged.weight += weight;
                    staged.changes.push(change);
                }
            }
        }
        for (owner, id) in ended {
            self.watches.remove(owner, id);
        }
    }

    /// Sends the staged changes, in order, in as few messages as fit.
    pub(crate) fn flush_changes(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        let budget = MAX_MESSAGE - 2048;
        for (_, s) in self.staged.drain() {
            let mut chunk = Vec::new();
            let mut weight = 0;
            for change in s.changes {
                let w = 64 + change.path.len() + change.value.as_ref().map_or(0, |v| v.len());
                if !chunk.is_empty() && weight + w > budget {
                    let msg = ToWorker::Changes(std::mem::take(&mut chunk));
                    s.outbound.send_now(msg, weight);
                    weight = 0;
                }
                weight += w;
                chunk.push(change);
            }
            if !chunk.is_empty() {
                s.outbound.send_now(ToWorker::Changes(chunk), weight);
            }
        }
    }

    /// Ends the watcher's own watches (it stops).
    pub(crate) fn end_local_watches(&mut self) {
        for ((owner, id), w) in self.watches.matching(&[]) {
            if let Sink::Local(sink) = &w.sink {
                sink.end(hub_error(HubErrorKind::Closed, "the watcher stopped"));
            }
            let _ = (owner, id);
        }
        self.watches.remove_owner(0);
    }

    /// A snapshot's text when something changed since the last one.
    pub(crate) fn take_snapshot(&mut self, now: Instant) -> Option<String> {
        if !self.dirty {
            return None;
        }
        match persist::snapshot(&self.store, now) {
            Ok(text) => {
                self.dirty = false;
                Some(text)
            }
            Err(e) => {
                tracing::error!("storage: {e}");
                None
            }
        }
    }

    /// Closes the rate window once a second has passed (called with each
    /// batch of operations and when asked).
    fn roll_window(&mut self, now: Instant) {
        let (at, ops) = self.window;
        let secs = now.duration_since(at).as_secs_f64();
        if secs >= 1.0 {
            self.rate = (self.ops - ops) as f64 / secs;
            self.window = (now, self.ops);
        }
    }

    /// Operations per second over the last complete window (0 once no
    /// window closed for two seconds: nothing happened).
    fn rate(&self, now: Instant) -> f64 {
        if now.duration_since(self.window.0).as_secs_f64() >= 2.0 {
            0.0
        } else {
            self.rate
        }
    }

    pub(crate) fn stats(&self) -> HubStats {
        let c = self.store.counts();
        HubStats {
            keys: c.keys,
            bytes: c.bytes,
            max_bytes: c.max_bytes,
            ops_total: self.ops,
            ops_per_sec: self.rate(Instant::now()),
        }
    }
}
