//! Reads and operator commands on the SQLite store: get, list and stats;
//! retry, cancel and the running jobs' cancel requests; purge; the queue
//! registry and the next due time.

use std::time::{Duration, SystemTime};

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::error::{Error, Kind, Result};
use crate::jobs::model::{CancelOutcome, Job, JobId, JobState, JobStats, ListFilter};
use crate::jobs::time::{from_micros, to_micros};

use super::db::{corrupt, i64_of, now, sql_error, Db};
use super::rows::{RawJob, JOB_COLUMNS};

// Statements on hot paths; `hot_paths_are_index_scans` checks their plans.
pub(super) const NEXT_DUE: &str =
    "SELECT min(run_at) FROM jobs WHERE state = 'queued' AND queue = ?1";
pub(super) const CANCEL_REQUESTS: &str = "SELECT id, attempt FROM jobs WHERE state = 'running' \
     AND node = ?1 AND cancel_requested ORDER BY id";
pub(super) const PURGE: &str =
    "DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?1";

impl Db {
    pub(super) fn get(&mut self, id: JobId) -> Result<Option<Job>> {
        let raw = self
            .conn
            .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))
            .and_then(|mut s| s.query_row([id.get()], RawJob::from_row).optional())
            .map_err(self.err("get"))?;
        raw.map(|r| r.into_job(&self.label)).transpose()
    }

    pub(super) fn list(&mut self, filter: ListFilter) -> Result<Vec<Job>> {
        if filter.limit == 0 {
            return Ok(Vec::new());
        }
        let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs");
        let mut conds = Vec::new();
        if filter.state.is_some() {
            conds.push("state = ?1");
        }
        if filter.queue.is_some() {
            conds.push("queue = ?2");
        }
        if !conds.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conds.join(" AND "));
        }
        sql.push_str(" ORDER BY id DESC LIMIT ?3");
        let state = filter.state.map(JobState::as_str);
        let limit = i64_of(filter.limit);
        let label = self.label.clone();
        let raws = self
            .conn
            .prepare_cached(&sql)
            .and_then(|mut s| {
                // Unused numbered parameters are fine: bind by position.
                let rows = s.query_map(params![state, filter.queue, limit], RawJob::from_row)?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(self.err("list"))?;
        raws.into_iter().map(|r| r.into_job(&label)).collect()
    }

    pub(super) fn stats(&mut self) -> Result<JobStats> {
        let rows = self
            .conn
            .prepare_cached("SELECT queue, state, count(*) FROM jobs GROUP BY queue, state")
            .and_then(|mut s| {
                let rows = s.query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(self.err("stats"))?;
        let mut parsed = Vec::with_capacity(rows.len());
        for (queue, state, n) in rows {
            let state = state
                .parse::<JobState>()
                .map_err(|_| corrupt(&self.label, format!("unknown state '{state}'")))?;
            parsed.push((queue, state, u64::try_from(n).unwrap_or(0)));
        }
        Ok(JobStats::from_rows(parsed))
    }

    /// The state, attempt and max_attempts of job `id`, or not found.
    fn state_of(tx: &Transaction<'_>, label: &str, id: JobId) -> Result<(JobState, i64, i64)> {
        let row: Option<(String, i64, i64)> = tx
            .query_row(
                "SELECT state, attempt, max_attempts FROM jobs WHERE id = ?1",
                [id.get()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(sql_error(label, "read job"))?;
        let (state, attempt, max) =
            row.ok_or_else(|| Error::new(Kind::NotFound, format!("no job {id}")))?;
        let state = state
            .parse::<JobState>()
            .map_err(|_| corrupt(label, format!("job {id} has unknown state '{state}'")))?;
        Ok((state, attempt, max))
    }

    pub(super) fn retry(&mut self, id: JobId) -> Result<()> {
        let label = self.label.clone();
        let now_us = to_micros(now());
        let tx = self.write_tx("retry")?;
        let (state, _, _) = Self::state_of(&tx, &label, id)?;
        if !matches!(state, JobState::Failed | JobState::Cancelled) {
            return Err(Error::new(
                Kind::Config,
                format!("job {id} is {state}: only failed or cancelled jobs can be retried"),
            ));
        }
        tx.execute(
            "UPDATE jobs SET state = 'queued', run_at = ?2, finished_at = NULL, \
             cancel_requested = 0, max_attempts = MAX(max_attempts, attempt + 1) WHERE id = ?1",
            params![id.get(), now_us],
        )
        .map_err(sql_error(&label, "retry"))?;
        tx.commit().map_err(sql_error(&label, "retry"))?;
        self.wake();
        Ok(())
    }

    pub(super) fn cancel(&mut self, id: JobId) -> Result<CancelOutcome> {
        let label = self.label.clone();
        let now_us = to_micros(now());
        let tx = self.write_tx("cancel")?;
        let (state, _, _) = Self::state_of(&tx, &label, id)?;
        let outcome = match state {
            JobState::Queued => {
                tx.execute(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ?2 WHERE id = ?1",
                    params![id.get(), now_us],
                )
                .map_err(sql_error(&label, "cancel"))?;
                CancelOutcome::Cancelled
            }
            JobState::Running => {
                tx.execute(
                    "UPDATE jobs SET cancel_requested = 1 WHERE id = ?1",
                    [id.get()],
                )
                .map_err(sql_error(&label, "cancel"))?;
                CancelOutcome::Requested
            }
            finished => CancelOutcome::AlreadyFinished(finished),
        };
        tx.commit().map_err(sql_error(&label, "cancel"))?;
        if !matches!(outcome, CancelOutcome::AlreadyFinished(_)) {
            self.wake();
        }
        Ok(outcome)
    }

    pub(super) fn cancel_requests(&mut self, node: String) -> Result<Vec<(JobId, u32)>> {
        let label = self.label.clone();
        let rows = self
            .conn
            .prepare_cached(CANCEL_REQUESTS)
            .and_then(|mut s| {
                let rows =
                    s.query_map([node], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(self.err("cancel requests"))?;
        rows.into_iter()
            .map(|(id, attempt)| {
                let attempt = u32::try_from(attempt)
                    .map_err(|_| corrupt(&label, format!("job {id} has attempt {attempt}")))?;
                Ok((JobId::new(id), attempt))
            })
            .collect()
    }

    pub(super) fn purge(&mut self, older_than: Duration) -> Result<u64> {
        let cutoff = to_micros(
            now()
                .checked_sub(older_than)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        );
        let n = self
            .conn
            .execute(PURGE, [cutoff])
            .map_err(self.err("purge"))?;
        Ok(n as u64)
    }

    pub(super) fn register_queues(&mut self, node: String, queues: Vec<String>) -> Result<()> {
        let label = self.label.clone();
        let e = |what: &'static str| sql_error(&label, what);
        let now_us = to_micros(now());
        let tx = self.write_tx("register queues")?;
        tx.execute("DELETE FROM queues WHERE node = ?1", [&node])
            .map_err(e("register queues"))?;
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO queues (node, queue, registered_at) VALUES (?1, ?2, ?3)",
                )
                .map_err(e("register queues"))?;
            for q in &queues {
                ins.execute(params![node, q, now_us])
                    .map_err(e("register queues"))?;
            }
        }
        tx.commit().map_err(e("register queues"))
    }

    pub(super) fn next_due(&mut self, queues: Vec<String>) -> Result<Option<SystemTime>> {
        let label = self.label.clone();
        let mut stmt = self
            .conn
            .prepare_cached(NEXT_DUE)
            .map_err(sql_error(&label, "next due"))?;
        let mut best: Option<i64> = None;
        for q in &queues {
            let t: Option<i64> = stmt
                .query_row([q], |r| r.get(0))
                .map_err(sql_error(&label, "next due"))?;
            best = match (best, t) {
                (Some(b), Some(t)) => Some(b.min(t)),
                (b, t) => b.or(t),
            };
        }
        Ok(best.map(from_micros))
    }
}

/// Every registered queue, sorted, without duplicates.
pub(super) fn known_queues(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut s = conn.prepare_cached("SELECT DISTINCT queue FROM queues ORDER BY queue")?;
    let rows = s.query_map([], |r| r.get(0))?;
    rows.collect()
}
