//! Out of the hot table: outcomes (at most two statements per batch, fenced
//! on `(id, attempt, state = 'running')`), assign, release of unstarted
//! jobs, and the requeue of jobs whose watcher or node was lost.
//!
//! Two statements do all of it:
//!
//! * **requeue** (`UPDATE`): a failed or lost attempt with attempts left
//!   and no cancel request goes back to `queued`, its error appended, due
//!   after its backoff;
//! * **move** (`DELETE … RETURNING` into `INSERT INTO jobs_done`): every
//!   other outcome leaves the hot table as done, cancelled or failed.
//!
//! The requeue runs first; the rows it changed are no longer running, so
//! the move passes over them.

use std::collections::{BTreeSet, HashSet};

use deadpool_postgres::GenericClient;

use crate::jobs::model::{retry_delay, JobId};
use crate::jobs::store::api::{FinishReport, Finished, Outcome, RecoverReport};

use super::conn::{clean_text, Fail};
use super::db::{execute, query, PgStore};
use super::rows::{append_error, DONE_INSERT};

/// One row for the move statement.
struct Move {
    id: i64,
    attempt: i32,
    result: Option<String>,
    worker: Option<String>,
    /// `done` or `cancelled`; `None` for a failure (failed, or cancelled
    /// when a cancel was requested).
    state: Option<&'static str>,
    error: Option<String>,
}

/// One row for the requeue statement.
struct Requeue {
    id: i64,
    attempt: i32,
    error: String,
    worker: Option<String>,
    delay_us: i64,
}

fn attempt_i32(a: u32) -> i32 {
    i32::try_from(a).unwrap_or(i32::MAX)
}

impl PgStore {
    fn requeue_sql(&self) -> String {
        let s = &self.s;
        let errors = append_error("j.errors", "f.attempt", "f.error");
        format!(
            "WITH f AS (SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[], \
             $5::bigint[]) AS f(id, attempt, error, worker, delay_us)) \
             UPDATE {s}.jobs j SET state = 'queued', errors = {errors}, \
             worker = COALESCE(f.worker, j.worker), exclusive = false, \
             run_at = now() + f.delay_us * interval '1 microsecond' \
             FROM f WHERE j.id = f.id AND j.attempt = f.attempt AND j.state = 'running' \
             AND NOT j.cancel_requested AND j.attempt < j.max_attempts \
             RETURNING j.id, j.attempt, j.queue, f.delay_us"
        )
    }

    fn move_sql(&self) -> String {
        let s = &self.s;
        let errors = append_error("errors", "attempt", "f_error");
        format!(
            "WITH f AS (SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[], \
             $5::text[], $6::text[]) AS f(id, attempt, result, worker, state, error)), \
             d AS (DELETE FROM {s}.jobs j USING f \
                 WHERE j.id = f.id AND j.attempt = f.attempt AND j.state = 'running' \
                 RETURNING j.id, j.queue, j.name, j.args, j.key, j.key_explicit, j.attempt, \
                 j.max_attempts, j.run_at, j.priority, j.pool, j.node, j.worker, j.errors, \
                 j.created_at, j.started_at, j.cancel_requested, f.result AS f_result, \
                 f.worker AS f_worker, f.state AS f_state, f.error AS f_error) \
             INSERT INTO {s}.jobs_done ({DONE_INSERT}) \
             SELECT id, queue, name, args, key, key_explicit, \
                 CASE WHEN f_error IS NULL THEN f_state \
                      WHEN cancel_requested THEN 'cancelled' ELSE 'failed' END, \
                 attempt, max_attempts, run_at, priority, pool, node, \
                 COALESCE(f_worker, worker), \
                 CASE WHEN f_error IS NULL THEN f_result::json END, \
                 CASE WHEN f_error IS NULL THEN errors ELSE {errors} END, \
                 created_at, started_at, now() \
             FROM d RETURNING id, attempt, state"
        )
    }

    /// Runs the requeue statement; returns the `(id, attempt)` applied and
    /// the queues that have jobs due now.
    async fn requeue(
        &self,
        c: &impl GenericClient,
        rows: &[Requeue],
    ) -> std::result::Result<(HashSet<(i64, i32)>, BTreeSet<String>), tokio_postgres::Error> {
        let mut applied = HashSet::new();
        let mut due = BTreeSet::new();
        if rows.is_empty() {
            return Ok((applied, due));
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let attempts: Vec<i32> = rows.iter().map(|r| r.attempt).collect();
        let errors: Vec<&str> = rows.iter().map(|r| r.error.as_str()).collect();
        let workers: Vec<Option<&str>> = rows.iter().map(|r| r.worker.as_deref()).collect();
        let delays: Vec<i64> = rows.iter().map(|r| r.delay_us).collect();
        let out = query(
            c,
            &self.requeue_sql(),
            &[&ids, &attempts, &errors, &workers, &delays],
        )
        .await?;
        for r in out {
            applied.insert((r.get(0), r.get(1)));
            if r.get::<_, i64>(3) == 0 {
                due.insert(r.get(2));
            }
        }
        Ok((applied, due))
    }

    /// Runs the move statement; returns the `(id, attempt, state)` moved.
    async fn move_done(
        &self,
        c: &impl GenericClient,
        rows: &[Move],
    ) -> std::result::Result<Vec<(i64, i32, String)>, tokio_postgres::Error> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let attempts: Vec<i32> = rows.iter().map(|r| r.attempt).collect();
        let results: Vec<Option<&str>> = rows.iter().map(|r| r.result.as_deref()).collect();
        let workers: Vec<Option<&str>> = rows.iter().map(|r| r.worker.as_deref()).collect();
        let states: Vec<Option<&str>> = rows.iter().map(|r| r.state).collect();
        let errors: Vec<Option<&str>> = rows.iter().map(|r| r.error.as_deref()).collect();
        let out = query(
            c,
            &self.move_sql(),
            &[&ids, &attempts, &results, &workers, &states, &errors],
        )
        .await?;
        Ok(out.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
    }

    pub(super) async fn finish_once(
        &self,
        done: &[Finished],
    ) -> std::result::Result<FinishReport, Fail> {
        let (base, cap) = (self.options.retry_base, self.options.retry_cap);
        let mut requeue = Vec::new();
        let mut moves = Vec::with_capacity(done.len());
        for f in done {
            let worker = f.worker.as_deref().map(clean_text);
            let (id, attempt) = (f.id.get(), attempt_i32(f.attempt));
            let (state, result, error) = match &f.outcome {
                Outcome::Done(v) => (Some("done"), v.as_ref().map(|v| v.to_string()), None),
                Outcome::Cancelled => (Some("cancelled"), None, None),
                Outcome::Failed(e) | Outcome::Lost(e) => {
                    let e = clean_text(e);
                    let delay = retry_delay(base, cap, f.attempt);
                    requeue.push(Requeue {
                        id,
                        attempt,
                        error: e.clone(),
                        worker: worker.clone(),
                        delay_us: i64::try_from(delay.as_micros()).unwrap_or(i64::MAX).max(1),
                    });
                    (None, None, Some(e))
                }
            };
            moves.push(Move {
                id,
                attempt,
                result,
                worker,
                state,
                error,
            });
        }
        let mut client = self.client().await?;
        let (requeued, moved) = if requeue.is_empty() {
            (HashSet::new(), self.move_done(&client, &moves).await?)
        } else {
            let tx = client.transaction().await?;
            let (requeued, _) = self.requeue(&tx, &requeue).await?;
            let moved = self.move_done(&tx, &moves).await?;
            tx.commit().await?;
            (requeued, moved)
        };
        let mut applied: HashSet<(i64, i32)> = requeued;
        applied.extend(moved.into_iter().map(|(id, a, _)| (id, a)));
        let mut report = FinishReport::default();
        for f in done {
            if applied.contains(&(f.id.get(), attempt_i32(f.attempt))) {
                report.applied += 1;
            } else {
                report.stale.push((f.id, f.attempt));
            }
        }
        Ok(report)
    }

    pub(super) async fn assign_once(
        &self,
        id: JobId,
        attempt: u32,
        worker: &str,
    ) -> std::result::Result<bool, Fail> {
        let s = &self.s;
        let client = self.client().await?;
        let n = execute(
            &client,
            &format!(
                "UPDATE {s}.jobs SET worker = $3 WHERE id = $1 AND attempt = $2 \
                 AND state = 'running'"
            ),
            &[&id.get(), &attempt_i32(attempt), &clean_text(worker)],
        )
        .await?;
        Ok(n == 1)
    }

    pub(super) async fn release_once(
        &self,
        jobs: &[(JobId, u32)],
    ) -> std::result::Result<u64, Fail> {
        let s = &self.s;
        let ids: Vec<i64> = jobs.iter().map(|(id, _)| id.get()).collect();
        let attempts: Vec<i32> = jobs.iter().map(|&(_, a)| attempt_i32(a)).collect();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let back = query(
            &tx,
            &format!(
                "WITH f AS (SELECT * FROM unnest($1::bigint[], $2::int[]) AS f(id, attempt)) \
                 UPDATE {s}.jobs j SET state = 'queued', attempt = j.attempt - 1, \
                 run_at = now(), started_at = NULL, exclusive = false \
                 FROM f WHERE j.id = f.id AND j.attempt = f.attempt AND j.state = 'running' \
                 AND NOT j.cancel_requested RETURNING j.queue"
            ),
            &[&ids, &attempts],
        )
        .await?;
        let queues: BTreeSet<String> = back.iter().map(|r| r.get(0)).collect();
        // What is still running of them had a cancel request.
        let cancelled: Vec<Move> = jobs
            .iter()
            .map(|&(id, a)| Move {
                id: id.get(),
                attempt: attempt_i32(a),
                result: None,
                worker: None,
                state: Some("cancelled"),
                error: None,
            })
            .collect();
        let moved = self.move_done(&tx, &cancelled).await?;
        self.notify(&tx, &queues).await?;
        tx.commit().await?;
        Ok((back.len() + moved.len()) as u64)
    }

    /// Fails attempts whose watcher or node is gone, each with its error:
    /// queued again (due now) while attempts are left, else failed (or
    /// cancelled, when a cancel was requested). Runs on `c`, in its
    /// transaction.
    pub(super) async fn lose(
        &self,
        c: &impl GenericClient,
        lost: &[(i64, i32, String)],
    ) -> std::result::Result<RecoverReport, tokio_postgres::Error> {
        let mut report = RecoverReport::default();
        if lost.is_empty() {
            return Ok(report);
        }
        let requeue: Vec<Requeue> = lost
            .iter()
            .map(|(id, attempt, e)| Requeue {
                id: *id,
                attempt: *attempt,
                error: clean_text(e),
                worker: None,
                delay_us: 0,
            })
            .collect();
        let (requeued, due) = self.requeue(c, &requeue).await?;
        report.requeued = requeued.len() as u64;
        let moves: Vec<Move> = lost
            .iter()
            .map(|(id, attempt, e)| Move {
                id: *id,
                attempt: *attempt,
                result: None,
                worker: None,
                state: None,
                error: Some(clean_text(e)),
            })
            .collect();
        for (_, _, state) in self.move_done(c, &moves).await? {
            if state == "cancelled" {
                report.cancelled += 1;
            } else {
                report.failed += 1;
            }
        }
        self.notify(c, &due).await?;
        Ok(report)
    }

    pub(super) async fn recover_once(
        &self,
        node: Option<&str>,
    ) -> std::result::Result<RecoverReport, Fail> {
        let s = &self.s;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rows = query(
            &tx,
            &format!(
                "SELECT id, attempt FROM {s}.jobs WHERE state = 'running' \
                 AND ($1::text IS NULL OR node = $1) ORDER BY id FOR UPDATE SKIP LOCKED"
            ),
            &[&node],
        )
        .await?;
        let lost: Vec<(i64, i32, String)> = rows
            .iter()
            .map(|r| {
                let attempt: i32 = r.get(1);
                (
                    r.get(0),
                    attempt,
                    format!("the watcher stopped while it ran (attempt {attempt})"),
                )
            })
            .collect();
        let report = self.lose(&tx, &lost).await?;
        tx.commit().await?;
        Ok(report)
    }
}
