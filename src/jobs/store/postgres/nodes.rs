//! Nodes on the PostgreSQL store: join (one row per watcher, a takeover of
//! a dead one of the same name), heartbeats, the rescue round (one node at
//! a time, by an advisory lock), leave and the node list.
//!
//! Every age is measured on the database's clock (`now()`), so the
//! hosts' clocks need not agree.

use std::time::SystemTime;

use async_trait::async_trait;

use crate::error::{Error, Kind, Result};
use crate::jobs::model::{Node, NodePool, NodeState};
use crate::jobs::store::api::{Heartbeat, NodeInfo, Nodes, RecoverReport, RescueReport};

use super::conn::Fail;
use super::db::{execute, query, PgStore, Retry};
use super::rows::get;

/// How long rows of nodes that are gone or dead are kept for the list.
const FORGET_AFTER: &str = "1 day";

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Whether process `pid` of this host exists.
fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

impl PgStore {
    async fn join_once(&self, node: &NodeInfo) -> std::result::Result<RecoverReport, Fail> {
        let s = &self.s;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        execute(
            &tx,
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            &[&format!("cluster:node:{}:{}", self.schema, node.name)],
        )
        .await?;
        let old = query(
            &tx,
            &format!(
                "SELECT instance, host, pid, state, \
                 heartbeat_at > now() - timeout_ms * interval '1 millisecond', \
                 extract(epoch FROM now() - heartbeat_at)::float8 \
                 FROM {s}.nodes WHERE name = $1 FOR UPDATE"
            ),
            &[&node.name],
        )
        .await?;
        let existed = !old.is_empty();
        if let Some(r) = old.first() {
            let (instance, host, pid, state, fresh, age): (String, String, i32, String, bool, f64) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
            let ours = host == node.host && (pid == node.pid as i32 || !pid_alive(pid));
            if state == "alive" && fresh && instance != node.instance && !ours {
                return Err(Fail::Ours(Error::new(
                    Kind::Config,
                    format!(
                        "node {} is alive on host {host} (pid {pid}, last heartbeat {age:.1}s ago): \
                         give this watcher another --node name, or stop that one",
                        node.name
                    ),
                )));
            }
        }
        let pools = serde_json::to_string(&node.pools).unwrap_or_else(|_| "[]".into());
        execute(
            &tx,
            &format!(
                "INSERT INTO {s}.nodes (name, instance, host, pid, state, queues, pools, capacity, \
                 timeout_ms, started_at, heartbeat_at) \
                 VALUES ($1, $2, $3, $4, 'alive', $5, $6::text::jsonb, $7, $8, now(), now()) \
                 ON CONFLICT (name) DO UPDATE SET instance = EXCLUDED.instance, \
                 host = EXCLUDED.host, pid = EXCLUDED.pid, state = 'alive', \
                 queues = EXCLUDED.queues, pools = EXCLUDED.pools, capacity = EXCLUDED.capacity, \
                 timeout_ms = EXCLUDED.timeout_ms, started_at = now(), heartbeat_at = now(), \
                 stopped_at = NULL"
            ),
            &[
                &node.name,
                &node.instance,
                &node.host,
                &(node.pid as i32),
                &node.queues,
                &pools,
                &(i32::try_from(node.capacity).unwrap_or(i32::MAX)),
                &millis(node.timeout),
            ],
        )
        .await?;
        let report = if existed {
            // A previous watcher of this name left these running.
            let rows = query(
                &tx,
                &format!(
                    "SELECT id, attempt FROM {s}.jobs WHERE state = 'running' AND node = $1 \
                     ORDER BY id FOR UPDATE SKIP LOCKED"
                ),
                &[&node.name],
            )
            .await?;
            let lost: Vec<(i64, i32, String)> = rows
                .iter()
                .map(|r| {
                    let attempt: i32 = r.get(1);
                    let msg = format!("the watcher stopped while it ran (attempt {attempt})");
                    (r.get(0), attempt, msg)
                })
                .collect();
            self.lose(&tx, &lost).await?
        } else {
            RecoverReport::default()
        };
        tx.commit().await?;
        Ok(report)
    }

    async fn heartbeat_once(&self, node: &NodeInfo) -> std::result::Result<Heartbeat, Fail> {
        let s = &self.s;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rows = query(
            &tx,
            &format!(
                "UPDATE {s}.nodes n SET heartbeat_at = now(), state = 'alive', stopped_at = NULL \
                 FROM (SELECT name, state FROM {s}.nodes WHERE name = $1 AND instance = $2 \
                       FOR UPDATE) o \
                 WHERE n.name = o.name RETURNING o.state"
            ),
            &[&node.name, &node.instance],
        )
        .await?;
        let beat = match rows.first().map(|r| r.get::<_, String>(0)) {
            Some(old) if old == "dead" => {
                // Declared dead while it was silent: what it still has
                // running is void (most of it was queued again by the
                // rescue; a claim that committed after it is queued now).
                let rows = query(
                    &tx,
                    &format!(
                        "SELECT id, attempt FROM {s}.jobs WHERE state = 'running' AND node = $1 \
                         ORDER BY id FOR UPDATE SKIP LOCKED"
                    ),
                    &[&node.name],
                )
                .await?;
                let lost: Vec<(i64, i32, String)> = rows
                    .iter()
                    .map(|r| (r.get(0), r.get(1), format!("node {} lost", node.name)))
                    .collect();
                self.lose(&tx, &lost).await?;
                Heartbeat::WasDead
            }
            Some(_) => Heartbeat::Alive,
            None => {
                let other = query(
                    &tx,
                    &format!("SELECT 1 FROM {s}.nodes WHERE name = $1"),
                    &[&node.name],
                )
                .await?;
                if other.is_empty() {
                    // Forgotten (it was gone or dead for a day): join again.
                    tx.commit().await?;
                    self.join_once(node).await?;
                    return Ok(Heartbeat::Alive);
                }
                Heartbeat::Replaced
            }
        };
        tx.commit().await?;
        Ok(beat)
    }

    async fn rescue_once(&self) -> std::result::Result<Option<RescueReport>, Fail> {
        let s = &self.s;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let leader: bool = query(
            &tx,
            "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))",
            &[&format!("cluster:rescue:{}", self.schema)],
        )
        .await?
        .first()
        .map(|r| r.get(0))
        .unwrap_or(false);
        if !leader {
            return Ok(None);
        }
        let dead = query(
            &tx,
            &format!(
                "UPDATE {s}.nodes SET state = 'dead', stopped_at = now(), queues = '{{}}' \
                 WHERE state = 'alive' \
                 AND heartbeat_at < now() - timeout_ms * interval '1 millisecond' RETURNING name"
            ),
            &[],
        )
        .await?;
        let dead: Vec<String> = dead.iter().map(|r| r.get(0)).collect();
        let orphans = query(
            &tx,
            &format!(
                "SELECT j.id, j.attempt, j.node FROM {s}.jobs j WHERE j.state = 'running' \
                 AND NOT EXISTS (SELECT 1 FROM {s}.nodes n \
                     WHERE n.name = j.node AND n.state = 'alive') \
                 ORDER BY j.id FOR UPDATE OF j SKIP LOCKED"
            ),
            &[],
        )
        .await?;
        let lost: Vec<(i64, i32, String)> = orphans
            .iter()
            .map(|r| {
                let node: Option<String> = r.get(2);
                let node = node.unwrap_or_else(|| "?".into());
                (r.get(0), r.get(1), format!("node {node} lost"))
            })
            .collect();
        let jobs = self.lose(&tx, &lost).await?;
        execute(
            &tx,
            &format!(
                "DELETE FROM {s}.nodes WHERE state <> 'alive' \
                 AND stopped_at < now() - interval '{FORGET_AFTER}'"
            ),
            &[],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(RescueReport { dead, jobs }))
    }

    async fn leave_once(&self, node: &NodeInfo) -> std::result::Result<(), Fail> {
        let s = &self.s;
        let client = self.client().await?;
        execute(
            &client,
            &format!(
                "UPDATE {s}.nodes SET state = 'gone', stopped_at = now(), queues = '{{}}' \
                 WHERE name = $1 AND instance = $2"
            ),
            &[&node.name, &node.instance],
        )
        .await?;
        Ok(())
    }

    async fn list_nodes_once(&self) -> std::result::Result<Vec<Node>, Fail> {
        let s = &self.s;
        let client = self.client().await?;
        let rows = query(
            &client,
            &format!(
                "SELECT n.name, n.host, n.pid, \
                 CASE WHEN n.state = 'alive' \
                      AND n.heartbeat_at < now() - n.timeout_ms * interval '1 millisecond' \
                      THEN 'dead' ELSE n.state END, \
                 n.started_at, n.heartbeat_at, n.stopped_at, n.timeout_ms, n.pools::text, \
                 n.capacity, (SELECT count(*) FROM {s}.jobs j \
                              WHERE j.state = 'running' AND j.node = n.name) \
                 FROM {s}.nodes n ORDER BY n.name"
            ),
            &[],
        )
        .await?;
        let label = &self.label;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let state: String = get(r, 3, label)?;
            let state = match state.as_str() {
                "alive" => NodeState::Alive,
                "dead" => NodeState::Dead,
                _ => NodeState::Gone,
            };
            let pools: String = get(r, 8, label)?;
            let pools: Vec<NodePool> = serde_json::from_str(&pools).unwrap_or_default();
            let pid: i32 = get(r, 2, label)?;
            let timeout: i64 = get(r, 7, label)?;
            let capacity: i32 = get(r, 9, label)?;
            let running: i64 = get(r, 10, label)?;
            out.push(Node {
                name: get(r, 0, label)?,
                host: get(r, 1, label)?,
                pid: u32::try_from(pid).unwrap_or(0),
                state,
                started_at: get::<SystemTime>(r, 4, label)?,
                heartbeat_at: get::<SystemTime>(r, 5, label)?,
                stopped_at: get(r, 6, label)?,
                timeout_ms: u64::try_from(timeout).unwrap_or(0),
                pools,
                capacity: u32::try_from(capacity).unwrap_or(0),
                running: u64::try_from(running).unwrap_or(0),
            });
        }
        Ok(out)
    }
}

#[async_trait]
impl Nodes for PgStore {
    async fn join(&self, node: &NodeInfo) -> Result<RecoverReport> {
        self.run("join", Retry::Briefly, || self.join_once(node))
            .await
    }

    async fn heartbeat(&self, node: &NodeInfo) -> Result<Heartbeat> {
        self.run("heartbeat", Retry::Never, || self.heartbeat_once(node))
            .await
    }

    async fn rescue(&self) -> Result<Option<RescueReport>> {
        self.run("rescue", Retry::Never, || self.rescue_once())
            .await
    }

    async fn leave(&self, node: &NodeInfo) -> Result<()> {
        self.run("leave", Retry::Briefly, || self.leave_once(node))
            .await
    }

    async fn list(&self) -> Result<Vec<Node>> {
        self.run("nodes", Retry::Briefly, || self.list_nodes_once())
            .await
    }

    async fn listen(&self, wake: Box<dyn Fn() + Send + Sync>) {
        super::notify::listen(self.config.clone(), &self.channel(), &self.label, wake).await
    }
}
