//! Reads and operator commands on the PostgreSQL store: get, list and
//! stats over both tables; retry (back from `jobs_done`), cancel, the
//! running jobs' cancel requests; purge (retention, in batches); the queue
//! registry and the next due time.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use crate::error::{Error, Kind};
use crate::jobs::model::{CancelOutcome, Job, JobId, JobState, JobStats, ListFilter};

use super::conn::Fail;
use super::db::{execute, query, PgStore};
use super::rows::{corrupt, done_columns, hot_columns, job_from_row, DONE_INSERT};

/// Rows one purge statement deletes at most (short locks, small WAL bursts).
const PURGE_BATCH: i64 = 10_000;

fn parse_state(label: &str, id: i64, s: &str) -> Result<JobState, Fail> {
    s.parse::<JobState>()
        .map_err(|_| Fail::Ours(corrupt(label, format!("job {id} has unknown state '{s}'"))))
}

impl PgStore {
    pub(super) async fn get_once(&self, id: JobId) -> Result<Option<Job>, Fail> {
        let s = &self.s;
        let client = self.client().await?;
        let rows = query(
            &client,
            &format!(
                "SELECT {} FROM {s}.jobs j WHERE j.id = $1 UNION ALL \
                 SELECT {} FROM {s}.jobs_done d WHERE d.id = $1",
                hot_columns("j"),
                done_columns("d")
            ),
            &[&id.get()],
        )
        .await?;
        match rows.first() {
            Some(r) => Ok(Some(job_from_row(r, &self.label)?)),
            None => Ok(None),
        }
    }

    pub(super) async fn list_once(&self, filter: &ListFilter) -> Result<Vec<Job>, Fail> {
        let s = &self.s;
        let (hot, done) = match filter.state {
            None => (true, true),
            Some(JobState::Queued | JobState::Running) => (true, false),
            Some(_) => (false, true),
        };
        let mut conds = Vec::new();
        if filter.state.is_some() {
            conds.push("state = $2");
        }
        if filter.queue.is_some() {
            conds.push("queue = $3");
        }
        let cond = if conds.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conds.join(" AND "))
        };
        let part = |cols: String, table: &str| {
            format!("(SELECT {cols} FROM {s}.{table} t {cond} ORDER BY id DESC LIMIT $1)")
        };
        let mut parts = Vec::new();
        if hot {
            parts.push(part(hot_columns("t"), "jobs"));
        }
        if done {
            parts.push(part(done_columns("t"), "jobs_done"));
        }
        // Every numbered parameter must be used: the unused ones are
        // compared with themselves.
        let sql = format!(
            "SELECT * FROM ({}) x WHERE ($2::text IS NULL OR true) AND ($3::text IS NULL OR true) \
             ORDER BY 1 DESC LIMIT $1",
            parts.join(" UNION ALL ")
        );
        let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
        let state = filter.state.map(JobState::as_str);
        let client = self.client().await?;
        let rows = query(&client, &sql, &[&limit, &state, &filter.queue]).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(job_from_row(r, &self.label)?);
        }
        Ok(out)
    }

    pub(super) async fn stats_once(&self) -> Result<JobStats, Fail> {
        let s = &self.s;
        let client = self.client().await?;
        let rows = query(
            &client,
            &format!(
                "SELECT queue, state, count(*) FROM {s}.jobs GROUP BY 1, 2 UNION ALL \
                 SELECT queue, state, count(*) FROM {s}.jobs_done GROUP BY 1, 2"
            ),
            &[],
        )
        .await?;
        let mut parsed = Vec::with_capacity(rows.len());
        for r in rows {
            let state: String = r.get(1);
            let state = parse_state(&self.label, 0, &state)?;
            let n: i64 = r.get(2);
            parsed.push((r.get::<_, String>(0), state, u64::try_from(n).unwrap_or(0)));
        }
        Ok(JobStats::from_rows(parsed))
    }

    /// The state of job `id` in the hot table (locked) or else in
    /// `jobs_done` (locked), or not found.
    async fn locked_state(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        id: JobId,
    ) -> Result<(JobState, bool), Fail> {
        let s = &self.s;
        for (table, hot) in [("jobs", true), ("jobs_done", false)] {
            let rows = query(
                tx,
                &format!("SELECT state FROM {s}.{table} WHERE id = $1 FOR UPDATE"),
                &[&id.get()],
            )
            .await?;
            if let Some(r) = rows.first() {
                let state: String = r.get(0);
                return Ok((parse_state(&self.label, id.get(), &state)?, hot));
            }
        }
        Err(Fail::Ours(Error::new(
            Kind::NotFound,
            format!("no job {id}"),
        )))
    }

    pub(super) async fn retry_once(&self, id: JobId) -> Result<(), Fail> {
        let s = &self.s;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let (state, _) = self.locked_state(&tx, id).await?;
        if !matches!(state, JobState::Failed | JobState::Cancelled) {
            return Err(Fail::Ours(Error::new(
                Kind::Config,
                format!("job {id} is {state}: only failed or cancelled jobs can be retried"),
            )));
        }
        let rows = query(
            &tx,
            &format!(
                "WITH d AS (DELETE FROM {s}.jobs_done WHERE id = $1 RETURNING *) \
                 INSERT INTO {s}.jobs (id, queue, name, args, key, key_explicit, state, attempt, \
                 max_attempts, run_at, priority, pool, node, worker, errors, created_at, \
                 started_at) \
                 SELECT id, queue, name, args, key, key_explicit, 'queued', attempt, \
                 GREATEST(max_attempts, attempt + 1), now(), priority, pool, node, worker, \
                 errors, created_at, started_at FROM d RETURNING queue"
            ),
            &[&id.get()],
        )
        .await?;
        let queues: BTreeSet<String> = rows.iter().map(|r| r.get(0)).collect();
        self.notify(&tx, &queues).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn cancel_once(&self, id: JobId) -> Result<CancelOutcome, Fail> {
        let s = &self.s;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let (state, _) = self.locked_state(&tx, id).await?;
        let outcome = match state {
            JobState::Queued => {
                execute(
                    &tx,
                    &format!(
                        "WITH d AS (DELETE FROM {s}.jobs WHERE id = $1 RETURNING *) \
                         INSERT INTO {s}.jobs_done ({DONE_INSERT}) \
                         SELECT id, queue, name, args, key, key_explicit, 'cancelled', attempt, \
                         max_attempts, run_at, priority, pool, node, worker, NULL, errors, \
                         created_at, started_at, now() FROM d"
                    ),
                    &[&id.get()],
                )
                .await?;
                CancelOutcome::Cancelled
            }
            JobState::Running => {
                execute(
                    &tx,
                    &format!("UPDATE {s}.jobs SET cancel_requested = true WHERE id = $1"),
                    &[&id.get()],
                )
                .await?;
                CancelOutcome::Requested
            }
            finished => CancelOutcome::AlreadyFinished(finished),
        };
        tx.commit().await?;
        Ok(outcome)
    }

    pub(super) async fn cancel_requests_once(&self, node: &str) -> Result<Vec<(JobId, u32)>, Fail> {
        let s = &self.s;
        let client = self.client().await?;
        let rows = query(
            &client,
            &format!(
                "SELECT id, attempt FROM {s}.jobs WHERE state = 'running' AND node = $1 \
                 AND cancel_requested ORDER BY id"
            ),
            &[&node],
        )
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let attempt: i32 = r.get(1);
                (JobId::new(r.get(0)), u32::try_from(attempt).unwrap_or(0))
            })
            .collect())
    }

    pub(super) async fn purge_once(&self, older_than: Duration) -> Result<u64, Fail> {
        let s = &self.s;
        let cutoff = SystemTime::now()
            .checked_sub(older_than)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let client = self.client().await?;
        let sql = format!(
            "DELETE FROM {s}.jobs_done WHERE id IN (SELECT id FROM {s}.jobs_done \
             WHERE finished_at < $1 LIMIT $2)"
        );
        let mut total = 0;
        loop {
            let n = execute(&client, &sql, &[&cutoff, &PURGE_BATCH]).await?;
            total += n;
            if n < PURGE_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    pub(super) async fn register_queues_once(
        &self,
        node: &str,
        queues: &[String],
    ) -> Result<(), Fail> {
        let s = &self.s;
        let client = self.client().await?;
        execute(
            &client,
            &format!(
                "INSERT INTO {s}.nodes (name, instance, host, pid, state, queues, timeout_ms, \
                 started_at, heartbeat_at) VALUES ($1, '', '', 0, 'alive', $2, 30000, now(), now()) \
                 ON CONFLICT (name) DO UPDATE SET queues = EXCLUDED.queues"
            ),
            &[&node, &queues],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn next_due_once(
        &self,
        queues: &[String],
    ) -> Result<Option<SystemTime>, Fail> {
        let s = &self.s;
        let client = self.client().await?;
        let rows = query(
            &client,
            &format!("SELECT min(run_at) FROM {s}.jobs WHERE state = 'queued' AND queue = ANY($1)"),
            &[&queues],
        )
        .await?;
        Ok(rows.first().and_then(|r| r.get(0)))
    }
}
