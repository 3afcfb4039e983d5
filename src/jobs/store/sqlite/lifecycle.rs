//! A job's way through the SQLite store: submit (with deduplication and
//! the queue gate), claim (with safe mode), assign, finish (with the retry
//! backoff), and the recovery of the jobs a dead watcher left running.

use std::collections::HashSet;

use rusqlite::{params, OptionalExtension};

use crate::error::{Error, Kind, Result};
use crate::jobs::model::{retry_delay, Job, JobId, NewJob, Submitted};
use crate::jobs::store::api::{ClaimRequest, FinishReport, Finished, Outcome, RecoverReport};
use crate::jobs::time::to_micros;

use super::admin::known_queues;
use super::db::{i64_of, now, sql_error, Db};
use super::rows::{RawJob, JOB_COLUMNS};

/// Appends `{attempt: ?2, error: ?3, at: ?4}` to `errors` (a corrupt value
/// is replaced rather than failing every later write to the row).
const APPEND_ERROR: &str = "errors = json_insert(CASE WHEN json_valid(errors) AND \
     json_type(errors) = 'array' THEN errors ELSE '[]' END, '$[#]', \
     json_object('attempt', ?2, 'error', ?3, 'at', ?4))";

// The statements on hot paths; `hot_paths_are_index_scans` checks their
// plans. The claim names its index: the planner, without statistics,
// would rather take `jobs_queued_due` and sort every due job.
pub(super) const CLAIM_NEXT: &str = "SELECT id, key FROM jobs INDEXED BY jobs_queued_order \
     WHERE state = 'queued' AND queue = ?1 AND run_at <= ?2 ORDER BY priority, run_at, id";
/// Without safe mode the key is not needed, and the index covers the query.
pub(super) const CLAIM_NEXT_IDS: &str = "SELECT id FROM jobs INDEXED BY jobs_queued_order \
     WHERE state = 'queued' AND queue = ?1 AND run_at <= ?2 ORDER BY priority, run_at, id \
     LIMIT ?3";
pub(super) const RUNNING_KEYS: &str = "SELECT key FROM jobs INDEXED BY jobs_running_node \
     WHERE state = 'running'";
/// Claims the batch whose ids are the JSON array `?1`. The `+` keeps the
/// planner off any index on state: each id is a primary-key lookup.
pub(super) const CLAIM_TAKE: &str =
    "UPDATE jobs SET state = 'running', attempt = attempt + 1, started_at = ?2, \
     pool = ?3, node = ?4, worker = NULL, cancel_requested = 0 \
     WHERE id IN (SELECT value FROM json_each(?1)) AND +state = 'queued'";
/// Records the successes in the JSON array `?1` (`{i, a, r, w}`: id,
/// attempt, result as JSON text, worker), fenced; returns the ids applied.
/// A primary-key lookup per element, as in `CLAIM_TAKE`.
pub(super) const FINISH_DONE: &str =
    "UPDATE jobs SET state = 'done', result = j.value ->> 'r', finished_at = ?2, \
     worker = COALESCE(j.value ->> 'w', jobs.worker) \
     FROM json_each(?1) AS j \
     WHERE jobs.id = j.value ->> 'i' AND jobs.attempt = j.value ->> 'a' \
     AND +jobs.state = 'running' RETURNING jobs.id";
pub(super) const FIND_ACTIVE_KEY: &str =
    "SELECT id FROM jobs WHERE finished_at IS NULL AND key = ?1 ORDER BY id LIMIT 1";

impl Db {
    pub(super) fn submit(&mut self, jobs: Vec<NewJob>) -> Result<Vec<Submitted>> {
        for job in &jobs {
            job.validate()?;
        }
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let label = self.label.clone();
        let e = |what: &'static str| sql_error(&label, what);
        let now_us = to_micros(now());
        let tx = self.write_tx("submit")?;
        let known = known_queues(&tx).map_err(e("submit"))?;
        if !known.is_empty() {
            if let Some(bad) = jobs.iter().find(|j| !known.contains(&j.queue)) {
                return Err(Error::new(
                    Kind::Config,
                    format!(
                        "no pool takes queue {} (pools take: {})",
                        bad.queue,
                        known.join(", ")
                    ),
                ));
            }
        }
        let mut out = Vec::with_capacity(jobs.len());
        let mut inserted = false;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO jobs (queue, name, args, key, key_explicit, state, \
                     max_attempts, run_at, priority, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6, ?7, ?8, ?9)",
                )
                .map_err(e("submit"))?;
            let mut existing = tx.prepare_cached(FIND_ACTIVE_KEY).map_err(e("submit"))?;
            for job in &jobs {
                let key = job.effective_key();
                if job.dedupe {
                    let found: Option<i64> = existing
                        .query_row([&key], |r| r.get(0))
                        .optional()
                        .map_err(e("submit"))?;
                    if let Some(id) = found {
                        out.push(Submitted::Existing(JobId::new(id)));
                        continue;
                    }
                }
                let args = job.args.to_string();
                let run_at = job.run_at.map(to_micros).unwrap_or(now_us);
                insert
                    .execute(params![
                        job.queue,
                        job.name,
                        args,
                        key,
                        job.key.is_some(),
                        job.max_attempts,
                        run_at,
                        job.priority,
                        now_us
                    ])
                    .map_err(e("submit"))?;
                out.push(Submitted::New(JobId::new(tx.last_insert_rowid())));
                inserted = true;
            }
        }
        tx.commit().map_err(e("submit"))?;
        if inserted {
            self.wake();
        }
        Ok(out)
    }

    pub(super) fn claim(&mut self, req: ClaimRequest) -> Result<Vec<Job>> {
        if req.limit == 0 || req.queues.is_empty() {
            return Ok(Vec::new());
        }
        let label = self.label.clone();
        let e = |what: &'static str| sql_error(&label, what);
        let now_us = to_micros(now());
        let mut seen_queues = HashSet::new();
        let queues: Vec<&String> = req
            .queues
            .iter()
            .filter(|q| seen_queues.insert(q.as_str()))
            .collect();
        let tx = self.write_tx("claim")?;
        let mut picked: Vec<i64> = Vec::new();
        {
            let mut keys: HashSet<String> = HashSet::new();
            if req.safe_mode {
                let mut running = tx.prepare_cached(RUNNING_KEYS).map_err(e("claim"))?;
                let rows = running
                    .query_map([], |r| r.get::<_, String>(0))
                    .map_err(e("claim"))?;
                for k in rows {
                    keys.insert(k.map_err(e("claim"))?);
                }
            }
            // Safe mode reads past jobs whose key is taken, so it cannot
            // use LIMIT; SQLite steps the index lazily, so it reads only
            // as far as it needs.
            let sql = if req.safe_mode {
                CLAIM_NEXT
            } else {
                CLAIM_NEXT_IDS
            };
            let mut next = tx.prepare_cached(sql).map_err(e("claim"))?;
            'queues: for queue in queues {
                if picked.len() >= req.limit {
                    break;
                }
                let mut rows = if req.safe_mode {
                    next.query(params![queue, now_us])
                } else {
                    next.query(params![queue, now_us, i64_of(req.limit - picked.len())])
                }
                .map_err(e("claim"))?;
                while let Some(row) = rows.next().map_err(e("claim"))? {
                    if picked.len() >= req.limit {
                        break 'queues;
                    }
                    let id: i64 = row.get(0).map_err(e("claim"))?;
                    if req.safe_mode {
                        let key: String = row.get(1).map_err(e("claim"))?;
                        if !keys.insert(key) {
                            continue;
                        }
                    }
                    picked.push(id);
                }
            }
        }
        // One statement for the batch: the ids go in as a JSON array, the
        // claimed rows come back (one temporary table per statement, not
        // per row).
        let mut jobs = Vec::with_capacity(picked.len());
        if !picked.is_empty() {
            let ids = serde_json::to_string(&picked).unwrap_or_else(|_| "[]".into());
            let mut take = tx
                .prepare_cached(&format!("{CLAIM_TAKE} RETURNING {JOB_COLUMNS}"))
                .map_err(e("claim"))?;
            let rows = take
                .query_map(params![ids, now_us, req.pool, req.node], RawJob::from_row)
                .map_err(e("claim"))?;
            for raw in rows {
                jobs.push(raw.map_err(e("claim"))?.into_job(&label)?);
            }
            // RETURNING gives no order; the claim's order is the queue's.
            let rank: std::collections::HashMap<i64, usize> =
                picked.iter().enumerate().map(|(i, &id)| (id, i)).collect();
            jobs.sort_by_key(|j| rank.get(&j.id.get()).copied().unwrap_or(usize::MAX));
        }
        tx.commit().map_err(e("claim"))?;
        Ok(jobs)
    }

    pub(super) fn finish(&mut self, done: Vec<Finished>) -> Result<FinishReport> {
        let mut report = FinishReport::default();
        if done.is_empty() {
            return Ok(report);
        }
        let label = self.label.clone();
        let e = |what: &'static str| sql_error(&label, what);
        let (base, cap) = (self.options.retry_base, self.options.retry_cap);
        let now_t = now();
        let now_us = to_micros(now_t);
        let tx = self.write_tx("finish")?;
        // Successes, the bulk, in one statement (the batch as JSON).
        let (ok_batch, rest): (Vec<Finished>, Vec<Finished>) = done
            .into_iter()
            .partition(|f| matches!(f.outcome, Outcome::Done(_)));
        if !ok_batch.is_empty() {
            let rows: Vec<serde_json::Value> = ok_batch
                .iter()
                .map(|f| {
                    let result = match &f.outcome {
                        Outcome::Done(Some(v)) => serde_json::Value::String(v.to_string()),
                        _ => serde_json::Value::Null,
                    };
                    serde_json::json!({"i": f.id.get(), "a": f.attempt, "r": result, "w": f.worker})
                })
                .collect();
            let batch = serde_json::Value::Array(rows).to_string();
            let mut ok = tx.prepare_cached(FINISH_DONE).map_err(e("finish"))?;
            let applied: HashSet<i64> = ok
                .query_map(params![batch, now_us], |r| r.get::<_, i64>(0))
                .map_err(e("finish"))?
                .collect::<rusqlite::Result<_>>()
                .map_err(e("finish"))?;
            for f in &ok_batch {
                if applied.contains(&f.id.get()) {
                    report.applied += 1;
                } else {
                    report.stale.push((f.id, f.attempt));
                }
            }
        }
        let done = rest;
        {
            let fence = "WHERE id = ?1 AND attempt = ?2 AND state = 'running'";
            let mut ok = tx
                .prepare_cached(&format!(
                    "UPDATE jobs SET state = 'done', result = ?3, finished_at = ?4, \
                     worker = COALESCE(?5, worker) {fence}"
                ))
                .map_err(e("finish"))?;
            let mut cancelled = tx
                .prepare_cached(&format!(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ?3, \
                     worker = COALESCE(?4, worker) {fence}"
                ))
                .map_err(e("finish"))?;
            let mut failed = tx
                .prepare_cached(&format!(
                    "UPDATE jobs SET {APPEND_ERROR}, worker = COALESCE(?5, worker), \
                     state = CASE WHEN cancel_requested THEN 'cancelled' \
                                  WHEN attempt < max_attempts THEN 'queued' ELSE 'failed' END, \
                     run_at = CASE WHEN NOT cancel_requested AND attempt < max_attempts \
                                   THEN ?6 ELSE run_at END, \
                     finished_at = CASE WHEN NOT cancel_requested AND attempt < max_attempts \
                                        THEN NULL ELSE ?4 END {fence}"
                ))
                .map_err(e("finish"))?;
            for f in done {
                let changed = match f.outcome {
                    Outcome::Done(result) => {
                        let result = result.map(|v| v.to_string());
                        ok.execute(params![f.id.get(), f.attempt, result, now_us, f.worker])
                    }
                    Outcome::Cancelled => {
                        cancelled.execute(params![f.id.get(), f.attempt, now_us, f.worker])
                    }
                    Outcome::Failed(error) | Outcome::Lost(error) => {
                        let retry_at = to_micros(now_t + retry_delay(base, cap, f.attempt));
                        failed.execute(params![
                            f.id.get(),
                            f.attempt,
                            error,
                            now_us,
                            f.worker,
                            retry_at
                        ])
                    }
                }
                .map_err(e("finish"))?;
                if changed == 1 {
                    report.applied += 1;
                } else {
                    report.stale.push((f.id, f.attempt));
                }
            }
        }
        tx.commit().map_err(e("finish"))?;
        Ok(report)
    }

    pub(super) fn assign(&mut self, id: JobId, attempt: u32, worker: String) -> Result<bool> {
        let n = self
            .conn
            .execute(
                "UPDATE jobs SET worker = ?3 WHERE id = ?1 AND attempt = ?2 AND state = 'running'",
                params![id.get(), attempt, worker],
            )
            .map_err(self.err("assign"))?;
        Ok(n == 1)
    }

    pub(super) fn recover(&mut self, node: Option<String>) -> Result<RecoverReport> {
        let label = self.label.clone();
        let e = |what: &'static str| sql_error(&label, what);
        let now_us = to_micros(now());
        let tx = self.write_tx("recover")?;
        let left: Vec<(i64, i64, i64, bool)> = {
            let mut s = tx
                .prepare_cached(
                    "SELECT id, attempt, max_attempts, cancel_requested FROM jobs \
                     WHERE state = 'running' AND (?1 IS NULL OR node = ?1) ORDER BY id",
                )
                .map_err(e("recover"))?;
            let rows = s
                .query_map([&node], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .map_err(e("recover"))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(e("recover"))?
        };
        let mut report = RecoverReport::default();
        {
            let mut fail = tx
                .prepare_cached(&format!(
                    "UPDATE jobs SET {APPEND_ERROR}, \
                     state = CASE WHEN cancel_requested THEN 'cancelled' \
                                  WHEN attempt < max_attempts THEN 'queued' ELSE 'failed' END, \
                     run_at = CASE WHEN NOT cancel_requested AND attempt < max_attempts \
                                   THEN ?4 ELSE run_at END, \
                     finished_at = CASE WHEN NOT cancel_requested AND attempt < max_attempts \
                                        THEN NULL ELSE ?4 END \
                     WHERE id = ?1 AND attempt = ?2 AND state = 'running'"
                ))
                .map_err(e("recover"))?;
            for (id, attempt, max, cancel) in left {
                let msg = format!("the watcher stopped while it ran (attempt {attempt})");
                fail.execute(params![id, attempt, msg, now_us])
                    .map_err(e("recover"))?;
                if cancel {
                    report.cancelled += 1;
                } else if attempt < max {
                    report.requeued += 1;
                } else {
                    report.failed += 1;
                }
            }
        }
        tx.commit().map_err(e("recover"))?;
        if report.requeued > 0 {
            self.wake();
        }
        Ok(report)
    }

    pub(super) fn release(&mut self, jobs: Vec<(JobId, u32)>) -> Result<u64> {
        let label = self.label.clone();
        let e = |what: &'static str| sql_error(&label, what);
        let now_us = to_micros(now());
        let tx = self.write_tx("release")?;
        let mut applied = 0;
        {
            let mut back = tx
                .prepare_cached(
                    "UPDATE jobs SET \
                     state = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END, \
                     attempt = CASE WHEN cancel_requested THEN attempt ELSE attempt - 1 END, \
                     run_at = CASE WHEN cancel_requested THEN run_at ELSE ?3 END, \
                     finished_at = CASE WHEN cancel_requested THEN ?3 ELSE NULL END, \
                     started_at = CASE WHEN cancel_requested THEN started_at ELSE NULL END \
                     WHERE id = ?1 AND attempt = ?2 AND state = 'running'",
                )
                .map_err(e("release"))?;
            for (id, attempt) in jobs {
                applied += back
                    .execute(params![id.get(), attempt, now_us])
                    .map_err(e("release"))? as u64;
            }
        }
        tx.commit().map_err(e("release"))?;
        if applied > 0 {
            self.wake();
        }
        Ok(applied)
    }
}
