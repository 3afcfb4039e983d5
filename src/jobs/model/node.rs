//! Nodes: the watchers that share one PostgreSQL job store, as
//! `cluster jobs nodes` and [`JobQueue::nodes`](crate::JobQueue::nodes)
//! list them.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::jobs::time::{rfc3339, rfc3339_opt};

/// Where a node is in its life.
///
/// Lowercase in the database, in JSON and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Its heartbeat is fresh.
    Alive,
    /// Its heartbeat is older than its node timeout: its running jobs are
    /// (or are about to be) queued again by another node.
    Dead,
    /// It stopped cleanly and handed back the jobs it had not started.
    Gone,
}

impl NodeState {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Alive => "alive",
            NodeState::Dead => "dead",
            NodeState::Gone => "gone",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One pool of a node, as it registered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NodePool {
    /// The pool's name.
    pub name: String,
    /// Its worker slots.
    pub slots: u32,
    /// The queues it takes.
    pub queues: Vec<String>,
}

/// A watcher that runs jobs from a shared store.
///
/// ```no_run
/// # async fn f(q: cluster::JobQueue) -> cluster::Result<()> {
/// for n in q.nodes().await? {
///     println!("{} {} ({} running)", n.name, n.state, n.running);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Node {
    /// Its name (`--node`, or the host name plus a per-start id).
    pub name: String,
    /// The host it runs on.
    pub host: String,
    /// The watcher's pid on that host.
    pub pid: u32,
    /// Alive, dead or gone.
    pub state: NodeState,
    /// When it joined.
    #[serde(with = "rfc3339")]
    pub started_at: SystemTime,
    /// Its last heartbeat.
    #[serde(with = "rfc3339")]
    pub heartbeat_at: SystemTime,
    /// When it stopped or was declared dead.
    #[serde(with = "rfc3339_opt")]
    pub stopped_at: Option<SystemTime>,
    /// How long it may miss heartbeats before it is declared dead, in
    /// milliseconds.
    pub timeout_ms: u64,
    /// Its pools.
    pub pools: Vec<NodePool>,
    /// How many jobs it can run at once (slots × concurrency).
    pub capacity: u32,
    /// The jobs the store has running on it now.
    pub running: u64,
}

impl NodePool {
    pub(crate) fn new(name: String, slots: u32, queues: Vec<String>) -> NodePool {
        NodePool {
            name,
            slots,
            queues,
        }
    }
}
