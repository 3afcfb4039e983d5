//! The hub's timer task: expires keys whose time to live ran out (their
//! watches hear of it at once), ends calls whose deadline passed with
//! "timeout", and writes a `--storage-file` snapshot once a second when
//! something changed. It sleeps until the next of these is due, or until
//! the hub says a new deadline may be earlier.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::Hub;
use crate::storage::persist;

/// How often a changed store is written to `--storage-file`.
pub(crate) const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);

/// Starts the task (within a tokio runtime); it ends when the hub closes.
pub(crate) fn start(hub: Arc<Hub>) -> JoinHandle<()> {
    tokio::spawn(run(hub))
}

async fn run(hub: Arc<Hub>) {
    let file = hub.settings.file.clone();
    let mut next_snapshot = Instant::now() + SNAPSHOT_EVERY;
    loop {
        let due = {
            let inner = hub.lock();
            if inner.closed {
                return;
            }
            [
                inner.store.next_expiry(),
                inner.router.next_deadline(),
                file.as_ref().map(|_| next_snapshot),
            ]
            .into_iter()
            .flatten()
            .min()
        };
        match due {
            Some(at) => {
                let wait = at.saturating_duration_since(Instant::now());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = hub.wake.notified() => {}
                }
            }
            None => hub.wake.notified().await,
        }
        let now = Instant::now();
        let snapshot = {
            let mut inner = hub.lock();
            if inner.closed {
                return;
            }
            inner.expire(now);
            inner.flush_changes();
            inner.router.expire(now);
            if file.is_some() && now >= next_snapshot {
                next_snapshot = now + SNAPSHOT_EVERY;
                inner.take_snapshot(now)
            } else {
                None
            }
        };
        if let (Some(text), Some(path)) = (snapshot, file.clone()) {
            let written =
                tokio::task::spawn_blocking(move || persist::write_atomic(&path, text.as_bytes()))
                    .await;
            if let Ok(Err(e)) = written {
                tracing::error!("storage: cannot write the snapshot: {e}");
                hub.lock().dirty = true;
            }
        }
    }
}
