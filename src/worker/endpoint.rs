//! Where this process's storage and command requests go: over the
//! worker's channel to the watcher ([`WorkerLink`]), or, for a program
//! run without a watcher, into a hub of its own, so the same program runs
//! alone.

use std::sync::Arc;

use super::hub_link::WorkerLink;
use crate::commands::handlers::Handlers;
use crate::transport::Transport;
use crate::watcher::hub::{timers, Hub};

/// Where this process's storage and command requests go: the watcher in a
/// worker, a hub of its own standalone (so the same program runs alone).
pub(crate) fn transport() -> Arc<dyn Transport> {
    static TRANSPORT: std::sync::OnceLock<Arc<dyn Transport>> = std::sync::OnceLock::new();
    TRANSPORT
        .get_or_init(|| match super::link::link() {
            Some(shared) => Arc::new(WorkerLink(shared.as_ref())),
            None => standalone(),
        })
        .clone()
}

/// This process's command handlers.
pub(crate) fn handlers() -> Arc<Handlers> {
    match super::link::link() {
        Some(shared) => shared.handlers.clone(),
        None => {
            let _ = transport();
            STANDALONE.get().map(|h| h.handlers()).unwrap_or_default()
        }
    }
}

static STANDALONE: std::sync::OnceLock<Arc<Hub>> = std::sync::OnceLock::new();

/// A hub in this process, for a program run without a watcher.
fn standalone() -> Arc<dyn Transport> {
    let hub = STANDALONE
        .get_or_init(|| {
            let hub = Hub::new(Default::default());
            let _ = hub.load();
            if tokio::runtime::Handle::try_current().is_ok() {
                // Expiries are also applied before every operation; the
                // timers only make watches hear of them on time.
                drop(timers::start(hub.clone()));
            }
            hub
        })
        .clone();
    hub
}
