//! Connecting a worker to its watcher: the first call into `Cluster` reads
//! the environment the watcher set, checks that the inherited descriptor
//! really is the watcher's socket, builds the [`Shared`] state and starts
//! the IPC thread with its own handle on it. Without a valid watcher socket
//! the process is standalone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::dispatch::Inbound;
use super::hub_link::HubState;
use super::ipc_thread::{self, Ipc};
use super::shared::{Outgoing, Pings, Shared};
use crate::ipc::env;
use crate::ipc::message::ToWatcher;
use crate::listener::{Balanced, ToIpcFn, REQUESTS};
use crate::log::{LogFilter, WorkerLogQueue, WORKER_QUEUE};
use crate::sys;

static LINK: OnceLock<Option<Arc<Shared>>> = OnceLock::new();

/// This process's connection to its watcher, made on first use; `None`
/// when standalone.
pub(crate) fn link() -> Option<&'static Arc<Shared>> {
    LINK.get_or_init(connect).as_ref()
}

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.parse().ok()
}

/// Connects to the watcher if the environment names a valid IPC socket
/// whose creator is the watcher; otherwise this process is standalone.
fn connect() -> Option<Arc<Shared>> {
    let raw: i32 = env_num(env::IPC_FD)?;
    let watcher_pid: i32 = env_num(env::WATCHER_PID)?;
    let context_id: u64 = env_num(env::CONTEXT_ID)?;
    let slot: u32 = env_num(env::SLOT)?;
    // The variables are inherited by our own children too; only a process
    // that really holds the watcher's socket is a worker.
    match sys::inherited_socket_peer_pid(raw) {
        Ok(pid) if pid == watcher_pid => {}
        Ok(_) | Err(_) => {
            tracing::debug!(
                "{} is set but is not the watcher's socket; running standalone",
                env::IPC_FD
            );
            return None;
        }
    }
    let fd = match sys::take_inherited_fd(raw) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("cannot take the watcher's socket: {e}; running standalone");
            return None;
        }
    };
    let grace = Duration::from_millis(env_num(env::SHUTDOWN_TIMEOUT_MS).unwrap_or(10_000));
    let (tx, rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (logs_tx, logs_rx) = mpsc::channel(WORKER_QUEUE);
    let (inbox_tx, inbox_rx) = mpsc::unbounded_channel();
    let to_ipc_tx = tx.clone();
    let to_ipc: ToIpcFn = Box::new(move |m| {
        let _ = to_ipc_tx.send(Outgoing::Balanced(m));
    });
    let shared = Arc::new(Shared {
        context_id,
        slot,
        tx,
        stop: stop_rx,
        ready_sent: AtomicBool::new(false),
        pings: Pings {
            awaiters: AtomicUsize::new(0),
            latest: watch::channel(0).0,
        },
        logs: WorkerLogQueue {
            tx: logs_tx,
            dropped: AtomicU64::new(0),
        },
        log_filter: std::env::var(env::LOG_FILTER)
            .ok()
            .and_then(|s| LogFilter::parse(&s).ok())
            .unwrap_or_default(),
        inbox: tokio::sync::Mutex::new(inbox_rx),
        balanced: Arc::new(Balanced::new(to_ipc)),
        jobs: std::sync::Mutex::new(None),
        name: std::env::var(env::NAME).ok().filter(|n| !n.is_empty()),
        status: std::sync::Mutex::new(None),
        handlers: Arc::default(),
        waiters: Default::default(),
        direct: fd.try_clone().ok(),
    });
    if let Some(limit) = env_num::<u64>(env::MAX_REQUESTS).filter(|&n| n > 0) {
        let tx = shared.tx.clone();
        REQUESTS.set_limit(
            limit,
            Box::new(move |requests| {
                let _ = tx.send(Outgoing::Message(ToWatcher::Recycle { requests }));
            }),
        );
    }
    sys::at_exit(flush_at_exit);
    ipc_thread::start(
        fd,
        Ipc {
            rx,
            logs: logs_rx,
            grace,
            inbound: Inbound {
                shared: shared.clone(),
                stop: stop_tx,
                inbox: inbox_tx,
                pending: HashMap::new(),
                parts: crate::ipc::parts::Assembly::new(super::dispatch::MAX_ARGS),
                hub: HubState::default(),
            },
        },
    );
    Some(shared)
}

/// How long process exit may wait for queued records and messages to reach
/// the watcher.
const EXIT_FLUSH: Duration = Duration::from_millis(500);

/// Registered with `atexit`: when the program returns from `main` or calls
/// `std::process::exit`, queued log records and messages (for example the
/// "stopping" line logged after `await_termination`) still reach the watcher.
extern "C" fn flush_at_exit() {
    let Some(Some(shared)) = LINK.get() else {
        return;
    };
    if std::thread::current().name() == Some("cluster-ipc") {
        return; // the IPC thread itself is exiting
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    if shared.tx.send(Outgoing::Flush(tx)).is_ok() {
        let _ = rx.recv_timeout(EXIT_FLUSH);
    }
}
