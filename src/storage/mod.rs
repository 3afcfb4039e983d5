//! Shared storage held by the watcher: JSON values by dot path, atomic
//! operations, versions, expiry and watches, the same API in workers
//! ([`Cluster::storage`](crate::Cluster::storage)) and in the watcher
//! ([`ClusterWatcher::storage`](crate::ClusterWatcher::storage)).
//!
//! The data lives in the watcher (`store.rs`, run by the hub in
//! `watcher/hub/`), so it survives worker crashes and rolling restarts;
//! with `--storage-file` it is also snapshotted to disk (`persist.rs`).
//! Every operation is applied under one lock in the watcher, so each one
//! is atomic against every other: two workers that increment a counter
//! never lose an update.

pub(crate) mod path;
pub(crate) mod persist;
pub(crate) mod store;
#[cfg(test)]
mod tests;
pub(crate) mod watch;

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::oneshot;

use crate::error::{Error, Kind, Result};
use crate::ipc::message::{self, ReplyBody, RequestBody, StorageOp};
use crate::transport::{self, Replier, Transport, WatchSource};

/// The shared storage; get it with [`Cluster::storage`](crate::Cluster::storage)
/// in a worker or [`ClusterWatcher::storage`](crate::ClusterWatcher::storage).
/// Cheap to clone.
///
/// Values are any `Serialize`/`Deserialize` type, stored as JSON; paths are
/// dot paths (`users.42.name`): each key names a key of an object, created
/// on `set` when missing. Arrays are values (a path cannot index into one).
///
/// ```no_run
/// # async fn run() -> Result<(), cluster::Error> {
/// use cluster::Cluster;
///
/// let storage = Cluster::storage();
/// let hits = storage.increment("hits", 1).await?; // atomic across workers
/// storage.set("users.42.name", "ann").await?;
/// let name: Option<String> = storage.get("users.42.name").await?;
/// storage.set("session.abc", &hits).ttl(std::time::Duration::from_secs(60)).await?;
/// # Ok(()) }
/// ```
///
/// In a worker each call is a request to the watcher over the worker's
/// socketpair (requests made at once travel together); a value, like any
/// message, must fit in one message (about 64 KiB as JSON), and a `get`
/// whose answer would not is refused with [`Error::is_too_large`].
#[derive(Clone)]
pub struct Storage {
    transport: Arc<dyn Transport>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").finish_non_exhaustive()
    }
}

/// A value and its version (see [`Storage::get_versioned`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// Its version: it changes whenever anything at or under its path
    /// changes. Give it to [`Storage::update`].
    pub version: u64,
}

fn encode<T: Serialize + ?Sized>(value: &T, limit: Option<usize>) -> Result<String> {
    let text = serde_json::to_string(value)
        .map_err(|e| Error::with_cause(Kind::Storage, "cannot encode the value as JSON", e))?;
    match limit {
        Some(limit) if text.len() > limit => Err(Error::new(
            Kind::TooLarge,
            format!(
                "a value of {} bytes as JSON exceeds the limit of {limit} bytes",
                text.len()
            ),
        )),
        _ => Ok(text),
    }
}

fn decode<T: DeserializeOwned>(path: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| {
        Error::with_cause(
            Kind::Storage,
            format!(
                "the value at {path:?} is not a {}",
                std::any::type_name::<T>()
            ),
            e,
        )
    })
}

fn unexpected(body: ReplyBody) -> Error {
    Error::new(
        Kind::Ipc,
        format!("unexpected answer from the watcher: {body:?}"),
    )
}

impl Storage {
    pub(crate) fn new(transport: Arc<dyn Transport>) -> Storage {
        Storage { transport }
    }

    async fn ask(&self, op: StorageOp) -> Result<ReplyBody> {
        let (tx, rx) = oneshot::channel();
        self.transport
            .submit(RequestBody::Storage(op), Replier::One(tx));
        transport::answer(rx).await
    }

    /// The value at `path`, or `None` when nothing is there (also below a
    /// value that is not an object). The empty path is the whole store.
    ///
    /// # Errors
    ///
    /// [`Error::is_storage`] for a bad path or a value that is not a `T`;
    /// [`Error::is_too_large`] (in a worker) for a value too large for one
    /// message; [`Error::is_closed`] when the watcher is gone.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>> {
        match self.ask(StorageOp::Get { path: path.into() }).await? {
            ReplyBody::Value(Some(text)) => decode(path, &text).map(Some),
            ReplyBody::Value(None) => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// The value at `path` with its version, for [`update`](Storage::update).
    ///
    /// # Errors
    ///
    /// As [`get`](Storage::get).
    pub async fn get_versioned<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Option<Versioned<T>>> {
        match self
            .ask(StorageOp::GetVersioned { path: path.into() })
            .await?
        {
            ReplyBody::Versioned(Some((text, version))) => Ok(Some(Versioned {
                value: decode(path, &text)?,
                version,
            })),
            ReplyBody::Versioned(None) => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// Sets `path` to `value`, creating the objects on the way that are
    /// missing; awaiting it returns the new version. Add
    /// [`.ttl(d)`](SetValue::ttl) to have it expire (deleted after `d`).
    /// A `set` removes an expiry the path had.
    ///
    /// # Errors
    ///
    /// [`Error::is_storage`] when a value on the way is not an object
    /// (`set("a.b", ..)` with `a` a number) or for a bad path;
    /// [`Error::is_storage_full`] when the byte limit refuses it;
    /// [`Error::is_too_large`] for a value over the message limit (in a
    /// worker).
    pub fn set<T: Serialize + ?Sized>(&self, path: &str, value: &T) -> SetValue {
        SetValue {
            storage: self.clone(),
            path: path.to_string(),
            text: encode(value, self.transport.value_limit()),
            ttl: None,
        }
    }

    /// Deletes `path` and everything under it; whether it existed.
    ///
    /// # Errors
    ///
    /// [`Error::is_storage`] for a bad path.
    pub async fn delete(&self, path: &str) -> Result<bool> {
        match self.ask(StorageOp::Delete { path: path.into() }).await? {
            ReplyBody::Done(existed) => Ok(existed),
            other => Err(unexpected(other)),
        }
    }

    /// Adds `by` to the integer at `path` (a missing one counts as 0) and
    /// returns the new value, atomically. Keeps the path's expiry.
    ///
    /// # Errors
    ///
    /// [`Error::is_storage`] when the value there is not an integer, or
    /// the sum overflows an `i64`.
    pub async fn increment(&self, path: &str, by: i64) -> Result<i64> {
        match self
            .ask(StorageOp::Increment {
                path: path.into(),
                by,
            })
            .await?
        {
            ReplyBody::Int(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    /// Sets `path` to `new` only if its value is `expected` now (`None`:
    /// only if nothing is there), atomically; whether it was swapped. Of
    /// several racing swaps from the same `expected`, exactly one wins.
    /// Values compare as JSON (`1` and `1.0` differ).
    ///
    /// # Errors
    ///
    /// As [`set`](Storage::set).
    pub async fn compare_and_swap<E: Serialize + ?Sized, N: Serialize + ?Sized>(
        &self,
        path: &str,
        expected: Option<&E>,
        new: &N,
    ) -> Result<bool> {
        let limit = self.transport.value_limit();
        let expected = expected.map(|e| encode(e, limit)).transpose()?;
        let new = encode(new, limit)?;
        let op = StorageOp::CompareAndSwap {
            path: path.into(),
            expected,
            new,
        };
        match self.ask(op).await? {
            ReplyBody::Done(swapped) => Ok(swapped),
            other => Err(unexpected(other)),
        }
    }

    /// Optimistic write: sets `path` to `value` only if its version is
    /// still `version` (from [`get_versioned`](Storage::get_versioned);
    /// 0 means "only if absent"). Returns the new version, or `None` when
    /// something changed it meanwhile (read again and retry).
    ///
    /// # Errors
    ///
    /// As [`set`](Storage::set).
    pub async fn update<T: Serialize + ?Sized>(
        &self,
        path: &str,
        version: u64,
        value: &T,
    ) -> Result<Option<u64>> {
        let value = encode(value, self.transport.value_limit())?;
        let op = StorageOp::Update {
            path: path.into(),
            version,
            value,
        };
        match self.ask(op).await? {
            ReplyBody::Updated(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    /// Watches `prefix` (a dot path; `""` watches everything): the
    /// returned [`Watch`] yields every change at, under or above it, in
    /// the order the store applied them, from now on.
    ///
    /// # Errors
    ///
    /// [`Error::is_storage`] for a bad prefix; [`Error::is_busy`] past 256
    /// watches in one process.
    pub async fn watch(&self, prefix: &str) -> Result<Watch> {
        let (sink, source) = transport::watch_stream();
        let (tx, rx) = oneshot::channel();
        self.transport.submit(
            RequestBody::Watch {
                prefix: prefix.into(),
            },
            Replier::Watch { reply: tx, sink },
        );
        let id = transport::answer(rx).await?;
        Ok(Watch {
            id,
            source,
            transport: self.transport.clone(),
            done: false,
        })
    }
}

/// A `set` not sent yet; see [`Storage::set`]. Await it for the new version.
#[must_use = "a set does nothing until awaited"]
pub struct SetValue {
    storage: Storage,
    path: String,
    text: Result<String>,
    ttl: Option<Duration>,
}

impl std::fmt::Debug for SetValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetValue")
            .field("path", &self.path)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl SetValue {
    /// Makes the path expire `ttl` from now: it is deleted then (watches
    /// see an [`Expired`](ChangeKind::Expired) change).
    pub fn ttl(mut self, ttl: Duration) -> SetValue {
        self.ttl = Some(ttl);
        self
    }
}

impl IntoFuture for SetValue {
    type Output = Result<u64>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<u64>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let op = StorageOp::Set {
                path: self.path,
                value: self.text?,
                ttl_ms: self.ttl.map(|d| d.as_millis().min(u64::MAX as u128) as u64),
            };
            match self.storage.ask(op).await? {
                ReplyBody::Version(v) => Ok(v),
                other => Err(unexpected(other)),
            }
        })
    }
}

/// What happened at a path (see [`Change`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChangeKind {
    /// Set (by `set`, `increment`, `compare_and_swap` or `update`).
    Set,
    /// Deleted.
    Deleted,
    /// Deleted because its time to live ran out.
    Expired,
}

/// One change a [`Watch`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    revision: u64,
    kind: ChangeKind,
    path: String,
    value: Option<String>,
}

impl Change {
    fn from_wire(c: message::Change) -> Change {
        Change {
            revision: c.revision,
            kind: match c.kind {
                message::ChangeKind::Set => ChangeKind::Set,
                message::ChangeKind::Deleted => ChangeKind::Deleted,
                message::ChangeKind::Expired => ChangeKind::Expired,
            },
            path: c.path,
            value: c.value,
        }
    }

    /// The store's revision after this change: strictly increasing over
    /// all changes, so a watch sees them in this order.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Set, deleted or expired.
    pub fn kind(&self) -> ChangeKind {
        self.kind
    }

    /// The path that changed (may be above the watched prefix, when a
    /// whole object was replaced or deleted).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The new value as JSON text; `None` for a deletion, and for a value
    /// too large to travel in one message (get it with `get`).
    pub fn json(&self) -> Option<&str> {
        self.value.as_deref()
    }

    /// The new value as a `T`; `None` as for [`json`](Change::json).
    ///
    /// # Errors
    ///
    /// [`Error::is_storage`] when it is not a `T`.
    pub fn value<T: DeserializeOwned>(&self) -> Result<Option<T>> {
        self.value
            .as_deref()
            .map(|t| decode(&self.path, t))
            .transpose()
    }
}

/// The changes under a prefix, from [`Storage::watch`]. Dropping it ends
/// the watch.
pub struct Watch {
    id: u64,
    source: WatchSource,
    transport: Arc<dyn Transport>,
    done: bool,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("id", &self.id).finish()
    }
}

impl Watch {
    /// The next change. `None` when the watch is over (the watcher is
    /// gone); `Some(Err)` once, last, when it ended because this process
    /// fell too far behind ([`Error::is_busy`]).
    pub async fn next(&mut self) -> Option<Result<Change>> {
        if self.done {
            return None;
        }
        match self.source.recv().await {
            Some(Ok(change)) => Some(Ok(Change::from_wire(change))),
            Some(Err(e)) => {
                self.done = true;
                Some(Err(transport::to_error(e)))
            }
            None => {
                self.done = true;
                None
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.transport.unwatch(self.id);
    }
}
