//! The dispatcher's node side, beside its loop: on a store that many
//! watchers share (PostgreSQL) the watcher joins as a node, heartbeats,
//! takes its turn at rescuing dead nodes' jobs, listens for new jobs, and
//! leaves at a clean stop; on any store, finished jobs are purged after
//! the retention.
//!
//! Nothing here touches the dispatcher's state: a node declared dead is
//! reported through `on_lost` (the dispatcher drops the jobs it holds,
//! which the store has queued again), new jobs through [`Wake`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::config::JobsConfig;
use crate::error::Result;
use crate::jobs::model::{random_unit, NodePool};
use crate::jobs::store::sqlite::WakeListener;
use crate::jobs::store::{Heartbeat, NodeInfo, Store};

/// How often finished jobs older than the retention are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// What wakes the dispatcher when jobs are queued: a SQLite store's wake
/// socket, or a PostgreSQL store's notifications.
pub(crate) enum Wake {
    Socket(WakeListener),
    Notify(Arc<Notify>),
}

impl Wake {
    /// Returns at the next wake-up (wakes since the last call coalesce).
    pub(crate) async fn wait(&self) -> Result<()> {
        match self {
            Wake::Socket(w) => w.wait().await,
            Wake::Notify(n) => {
                n.notified().await;
                Ok(())
            }
        }
    }
}

/// `d` ±25 %, so that nodes started together do not poll together.
pub(crate) fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.75 + 0.5 * random_unit())
}

/// How often a node with `timeout` heartbeats: a quarter of it, between
/// 100 ms and 5 s.
fn heartbeat_every(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// The node row this watcher registers.
pub(super) fn node_info(jobs: &JobsConfig, name: String) -> NodeInfo {
    let per_slot = if jobs.per_job { 1 } else { jobs.concurrency };
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    NodeInfo {
        instance: format!(
            "{}-{:016x}",
            std::process::id(),
            (random_unit() * 1e19) as u64
        ),
        name,
        host,
        pid: std::process::id(),
        pools: jobs
            .pools
            .iter()
            .map(|p| NodePool::new(p.name.clone(), p.slots, p.queues.clone()))
            .collect(),
        capacity: jobs.slots() as u32 * per_slot,
        queues: jobs.queues(),
        timeout: jobs.node_timeout,
    }
}

/// Joins the store as `node` when it is shared; `None` when it is not.
///
/// # Errors
///
/// The store failed, or an alive node has this name
/// ([`Error::is_config`](crate::Error::is_config)).
pub(super) async fn join(store: &Arc<dyn Store>, node: &NodeInfo) -> Result<bool> {
    let Some(nodes) = store.nodes() else {
        return Ok(false);
    };
    let report = nodes.join(node).await?;
    if report.requeued + report.failed + report.cancelled > 0 {
        tracing::warn!(
            "jobs left running by the previous watcher of node {}: {} queued again, {} failed (last attempt), {} cancelled",
            node.name,
            report.requeued,
            report.failed,
            report.cancelled
        );
    }
    tracing::info!(
        "joined the job store {} as node {} (node timeout {:?})",
        store.url(),
        node.name,
        node.timeout
    );
    Ok(true)
}

/// The node's tasks; aborted when dropped.
pub(super) struct NodeTasks {
    store: Arc<dyn Store>,
    node: Option<NodeInfo>,
    tasks: Vec<JoinHandle<()>>,
}

/// Starts the purge and, for a joined `node`, the heartbeat with the
/// rescue rounds and the listener. Returns the tasks and, for a node, what
/// its listener wakes.
pub(super) fn start(
    store: Arc<dyn Store>,
    node: Option<NodeInfo>,
    retention: Duration,
    on_lost: impl Fn() + Send + Sync + 'static,
) -> (NodeTasks, Option<Arc<Notify>>) {
    let mut tasks = vec![tokio::spawn(purge(store.clone(), retention))];
    let mut notify = None;
    if let Some(info) = &node {
        tasks.push(tokio::spawn(heartbeat(
            store.clone(),
            info.clone(),
            on_lost,
        )));
        let wake = Arc::new(Notify::new());
        let (s, w) = (store.clone(), wake.clone());
        tasks.push(tokio::spawn(async move {
            if let Some(nodes) = s.nodes() {
                nodes.listen(Box::new(move || w.notify_one())).await;
            }
        }));
        notify = Some(wake);
    }
    (NodeTasks { store, node, tasks }, notify)
}

impl NodeTasks {
    /// A clean stop: no more heartbeats; the node is marked gone.
    pub(super) async fn leave(&self) {
        for t in &self.tasks {
            t.abort();
        }
        if let (Some(nodes), Some(node)) = (self.store.nodes(), &self.node) {
            match nodes.leave(node).await {
                Ok(()) => tracing::info!("node {} left the job store", node.name),
                Err(e) => tracing::warn!("node {} could not mark itself gone: {e}", node.name),
            }
        }
    }
}

impl Drop for NodeTasks {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Heartbeats, each followed by a try at the rescue round once this node
/// has reached the store for a whole node timeout: after an outage of the
/// database (or of this node's link to it) the other nodes get that long
/// to heartbeat again before anyone is declared dead.
async fn heartbeat(store: Arc<dyn Store>, node: NodeInfo, on_lost: impl Fn() + Send + Sync) {
    let Some(nodes) = store.nodes() else { return };
    let every = heartbeat_every(node.timeout);
    let mut failing = false;
    // Joining reached the store.
    let mut reachable_since = Some(tokio::time::Instant::now());
    loop {
        tokio::time::sleep(jittered(every)).await;
        let beat = nodes.heartbeat(&node).await;
        if beat.is_err() {
            reachable_since = None;
        } else if reachable_since.is_none() {
            reachable_since = Some(tokio::time::Instant::now());
        }
        match beat {
            Ok(Heartbeat::Alive) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("node {}: heartbeats recorded again", node.name);
                }
            }
            Ok(Heartbeat::WasDead) => {
                tracing::warn!(
                    "node {} was declared dead (no heartbeat for {:?}): the jobs it held were queued again; it runs on as a live node",
                    node.name,
                    node.timeout
                );
                on_lost();
            }
            Ok(Heartbeat::Replaced) => tracing::error!(
                "another watcher took the node name {}: give each watcher its own --node",
                node.name
            ),
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!("node {}: heartbeat failed: {e}", node.name);
                }
                continue;
            }
        }
        if reachable_since.is_none_or(|t| t.elapsed() < node.timeout) {
            continue;
        }
        match nodes.rescue().await {
            Ok(Some(r)) => {
                for dead in &r.dead {
                    tracing::warn!(
                        "node {dead} declared dead: no heartbeat within its node timeout"
                    );
                }
                let j = r.jobs;
                if j.requeued + j.failed + j.cancelled > 0 {
                    tracing::warn!(
                        "jobs of lost nodes: {} queued again, {} failed (last attempt), {} cancelled",
                        j.requeued,
                        j.failed,
                        j.cancelled
                    );
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!("node {}: rescue round failed: {e}", node.name),
        }
    }
}

/// Deletes finished jobs past the retention, now and every minute.
async fn purge(store: Arc<dyn Store>, retention: Duration) {
    loop {
        match store.purge(retention).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!("purged {n} finished job(s) older than {retention:?}"),
            Err(e) => tracing::debug!("purging finished jobs: {e}"),
        }
        tokio::time::sleep(jittered(PURGE_EVERY)).await;
    }
}
