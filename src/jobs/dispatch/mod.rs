//! The watcher's job dispatcher: one task beside the supervisor that owns
//! the job store. It claims jobs for its pools in batches, keeps them in a
//! small buffer per queue, hands them to free workers (persistent workers
//! over their socketpair, or one process per job), records outcomes in
//! batches, and retries what failed.
//!
//! The supervisor tells it about workers ([`JobsEvent`]): a worker that
//! says `JobsReady` joins its slot's pool; one that exits or whose channel
//! closes leaves it, and every job it ran fails at once (no lease to wait
//! out); a worker asked to stop (its `accepting` flag is cleared) is handed
//! nothing more and finishes what it runs.
//!
//! Claimed jobs are `running` in the store from the claim on (a crash of
//! the watcher re-queues them at the next start on SQLite, or when its
//! node is declared dead on PostgreSQL, attempt counted); on a clean stop
//! the ones never started are released without counting. On a shared
//! store the node side (heartbeats, rescue, notifications) runs beside
//! the loop (`nodes.rs`).
//!
//! The job server's in-memory calls ([`Call`], `calls.rs`) run on the same
//! workers, with the same tickets and capacity; without a store (a job
//! server without `--jobs`) the dispatcher runs calls only.

mod calls;
pub(crate) mod config;
mod event;
mod nodes;
pub(crate) mod pools;
mod runner;
mod sources;
mod state;
mod workers;

pub(crate) use calls::{Call, CallOutcome};
pub(crate) use config::JobsConfig;
pub(crate) use event::{HandlersReport, JobsEvent};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::{Error, Kind, Result};
use crate::jobs::store::sqlite::WakeListener;
use crate::jobs::store::{self, Store, StoreOptions};
use crate::watcher::config::Config;
use crate::watcher::event::CommandSender;
use nodes::{NodeTasks, Wake};
use state::Dispatcher;

/// The running dispatcher: a sender for its events and its task.
pub(crate) struct JobsHandle {
    tx: mpsc::UnboundedSender<JobsEvent>,
    task: JoinHandle<()>,
    sources: Option<JoinHandle<()>>,
    url_file: Option<PathBuf>,
    store: Option<Arc<dyn Store>>,
    written: watch::Receiver<u64>,
    /// The node side (`None` without a store).
    nodes: Option<NodeTasks>,
}

impl JobsHandle {
    /// Sends an event (dropped when the dispatcher is gone).
    pub(crate) fn send(&self, event: JobsEvent) {
        let _ = self.tx.send(event);
    }

    /// Where the job server sends its events.
    pub(crate) fn sender(&self) -> mpsc::UnboundedSender<JobsEvent> {
        self.tx.clone()
    }

    /// The store, when the watcher runs one (`--jobs`; the job server's
    /// durable jobs and the dashboard's job queries use it).
    pub(crate) fn store(&self) -> Option<Arc<dyn Store>> {
        self.store.clone()
    }

    /// Changes each time a batch of job outcomes has been written.
    pub(crate) fn outcomes_written(&self) -> watch::Receiver<u64> {
        self.written.clone()
    }

    /// Records what is left and releases the jobs never started; waits at
    /// most `timeout`, then (briefly) for the dispatcher's task to end, so
    /// its wake socket is closed when this returns: the new watcher of an
    /// upgrade binds it next.
    pub(crate) async fn shutdown(&mut self, timeout: Duration) {
        if let Some(s) = &self.sources {
            s.abort();
        }
        let (tx, rx) = oneshot::channel();
        self.send(JobsEvent::Shutdown(tx));
        if tokio::time::timeout(timeout, rx).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.task).await;
        }
        if let Some(nodes) = &self.nodes {
            let _ = tokio::time::timeout(timeout, nodes.leave()).await;
        }
    }
}

impl Drop for JobsHandle {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(s) = &self.sources {
            s.abort();
        }
        if let Some(f) = &self.url_file {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// The database file of a SQLite store URL.
fn sqlite_path(url: &str) -> Option<PathBuf> {
    match store::StoreUrl::parse(url) {
        Ok(store::StoreUrl::Sqlite(p)) => Some(p),
        _ => None,
    }
}

/// This watcher's node name: the host name and a per-start id, so a
/// restarted watcher is never mistaken for its old self.
fn node_name() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    let id = {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish() as u32
    };
    format!("{host}-{id:08x}")
}

/// Opens the store; on SQLite takes it over (a second watcher on one
/// store is refused) and re-queues what a dead watcher left running, on
/// PostgreSQL joins as a node; registers the queues, writes the store's
/// URL beside the pid file, and starts the dispatcher, its node tasks and
/// the job sources. Without a store URL it starts the dispatcher for
/// in-memory calls only.
///
/// # Errors
///
/// [`Error::is_store`] when the store cannot be opened or is corrupt;
/// [`Error::is_config`] when another watcher runs it (SQLite) or an alive
/// node has this `--node` name (PostgreSQL).
pub(crate) async fn start(
    jobs: JobsConfig,
    watcher: Arc<Config>,
    commands: CommandSender,
    ready: watch::Receiver<bool>,
) -> Result<JobsHandle> {
    let (written_tx, written) = watch::channel(0);
    if !jobs.has_store() {
        let (tx, rx) = mpsc::unbounded_channel();
        let node = jobs.node.clone().unwrap_or_else(node_name);
        let dispatcher =
            Dispatcher::new(jobs, watcher, None, node, commands, tx.clone(), written_tx);
        let task = tokio::spawn(dispatcher.run(rx, None, ready));
        return Ok(JobsHandle {
            tx,
            task,
            sources: None,
            url_file: None,
            store: None,
            written,
            nodes: None,
        });
    }
    let options = StoreOptions {
        retry_base: jobs.retry_delay,
        schema: jobs.schema.clone(),
        ..StoreOptions::default()
    };
    let store = store::open(&jobs.url, options).await?;
    let shared = store.nodes().is_some();
    let wake = match sqlite_path(&jobs.url).filter(|_| !shared) {
        Some(path) => Some(WakeListener::bind(&path).map_err(|e| {
            Error::new(
                Kind::Config,
                format!("cannot run the job store {}: {e}", jobs.url),
            )
        })?),
        None => None,
    };
    let node = jobs.node.clone().unwrap_or_else(node_name);
    let info = nodes::node_info(&jobs, node.clone());
    let joined = nodes::join(&store, &info).await?;
    // One watcher per SQLite store: whatever is running was left by a
    // dead one. (A shared store recovers per node: `join`, and the rescue
    // of dead nodes.)
    let report = if joined {
        Default::default()
    } else {
        store.recover(None).await?
    };
    if report.requeued + report.failed + report.cancelled > 0 {
        tracing::warn!(
            "jobs left running by a watcher that died: {} queued again, {} failed (last attempt), {} cancelled",
            report.requeued,
            report.failed,
            report.cancelled
        );
    }
    store.register_queues(&node, &jobs.queues()).await?;
    let url_file = match &watcher.pid_file {
        Some(pid_file) => {
            // `cluster jobs --pid-file` must find the same schema.
            let url = match (&jobs.schema, shared) {
                (Some(s), true) => {
                    let sep = if jobs.url.contains('?') { '&' } else { '?' };
                    format!("{}{sep}schema={s}", jobs.url)
                }
                _ => jobs.url.clone(),
            };
            Some(write_url_file(pid_file, &url)?)
        }
        None => None,
    };
    let ended = (!jobs.sources.is_empty()).then(|| Arc::new(sources::EndedKeys::new(&jobs)));
    let sources = ended
        .as_ref()
        .and_then(|ended| sources::start(&jobs, store.clone(), ended.clone()));
    let (tx, rx) = mpsc::unbounded_channel();
    let lost = tx.clone();
    let (node_tasks, notify) = nodes::start(
        store.clone(),
        joined.then_some(info),
        jobs.retention,
        move || {
            let _ = lost.send(JobsEvent::NodeLost);
        },
    );
    let wake = match (wake, notify) {
        (Some(w), _) => Some(Wake::Socket(w)),
        (None, Some(n)) => Some(Wake::Notify(n)),
        (None, None) => None,
    };
    let dispatcher = Dispatcher::new(
        jobs,
        watcher,
        Some(store.clone()),
        node,
        commands,
        tx.clone(),
        written_tx,
    )
    .with_ended_keys(ended);
    let task = tokio::spawn(dispatcher.run(rx, wake, ready));
    Ok(JobsHandle {
        tx,
        task,
        sources,
        url_file,
        store: Some(store),
        written,
        nodes: Some(node_tasks),
    })
}

/// Writes the store URL (an absolute path for a file) beside the pid file.
fn write_url_file(pid_file: &Path, url: &str) -> Result<PathBuf> {
    let file = crate::jobs::jobs_url_file_for_pid_file(pid_file);
    let absolute = match sqlite_path(url) {
        Some(p) if p.is_relative() => std::env::current_dir()
            .map(|d| d.join(&p).display().to_string())
            .unwrap_or_else(|_| url.to_string()),
        Some(p) => p.display().to_string(),
        None => url.to_string(),
    };
    // A PostgreSQL URL may hold a password: only the owner reads it.
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&file)?;
        f.write_all(format!("{absolute}\n").as_bytes())
    };
    write().map_err(|e| {
        Error::with_io(
            Kind::Config,
            format!("cannot write the job store URL to {}", file.display()),
            e,
        )
    })?;
    Ok(file)
}
