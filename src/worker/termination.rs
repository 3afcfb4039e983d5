//! Readiness and the wait for a stop, shared by [`Cluster`](crate::Cluster)
//! and the job handlers (`jobs.rs`): a leaf, so neither imports the other.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::shared::{AwaiterGuard, Shared};
use crate::ipc::message::ToWatcher;
use crate::signal;

/// Tells the watcher the worker is ready (once).
pub(crate) fn ready(link: &Shared) {
    if !link.ready_sent.swap(true, Ordering::SeqCst) {
        let _ = link.send(ToWatcher::Ready);
    }
}

/// Waits for the stop request, the watcher's departure or a termination
/// signal, answering the watcher's pings meanwhile. Holds nothing that is
/// not `Send` across an await, so `await_termination()` can be given to
/// `axum::serve(..).with_graceful_shutdown(..)` or spawned.
pub(crate) async fn serve_until_stopped(link: Arc<Shared>) {
    let mut stop = link.stop.clone();
    let mut pings = link.pings.latest.subscribe();
    link.pings.awaiters.fetch_add(1, Ordering::SeqCst);
    let _guard = AwaiterGuard(link.clone());
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let termination = signal::termination();
    tokio::pin!(stopped, termination);
    loop {
        tokio::select! {
            () = &mut stopped => break,
            _ = &mut termination => break,
            changed = pings.changed() => {
                if changed.is_err() {
                    // The IPC thread is gone; `stop` fires next.
                    (&mut stopped).await;
                    break;
                }
                let seq = *pings.borrow_and_update();
                let _ = link.send(ToWatcher::Pong { seq });
            }
        }
    }
}
