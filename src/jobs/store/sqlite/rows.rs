//! Decoding a `jobs` row into a [`Job`]: the column list every read
//! selects, and the checks of its JSON, counts and state.

use rusqlite::Row;
use serde_json::Value;

use crate::error::Result;
use crate::jobs::model::{AttemptError, Job, JobId, JobState};
use crate::jobs::time::from_micros;

use super::db::corrupt;

pub(super) const JOB_COLUMNS: &str =
    "id, queue, name, args, key, key_explicit, attempt, max_attempts, \
     state, run_at, priority, pool, node, worker, result, errors, created_at, started_at, \
     finished_at, cancel_requested";

/// A row as read, before its JSON and enums are checked.
pub(super) struct RawJob {
    id: i64,
    queue: String,
    name: Option<String>,
    args: String,
    key: String,
    key_explicit: bool,
    attempt: i64,
    max_attempts: i64,
    state: String,
    run_at: i64,
    priority: i64,
    pool: Option<String>,
    node: Option<String>,
    worker: Option<String>,
    result: Option<String>,
    errors: String,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    cancel_requested: bool,
}

#[derive(serde::Deserialize)]
struct StoredError {
    attempt: i64,
    error: String,
    at: i64,
}

impl RawJob {
    pub(super) fn from_row(r: &Row<'_>) -> rusqlite::Result<RawJob> {
        Ok(RawJob {
            id: r.get(0)?,
            queue: r.get(1)?,
            name: r.get(2)?,
            args: r.get(3)?,
            key: r.get(4)?,
            key_explicit: r.get(5)?,
            attempt: r.get(6)?,
            max_attempts: r.get(7)?,
            state: r.get(8)?,
            run_at: r.get(9)?,
            priority: r.get(10)?,
            pool: r.get(11)?,
            node: r.get(12)?,
            worker: r.get(13)?,
            result: r.get(14)?,
            errors: r.get(15)?,
            created_at: r.get(16)?,
            started_at: r.get(17)?,
            finished_at: r.get(18)?,
            cancel_requested: r.get(19)?,
        })
    }

    pub(super) fn into_job(self, label: &str) -> Result<Job> {
        let id = self.id;
        let bad = |what: String| corrupt(label, format!("job {id}: {what}"));
        let json = |what: &str, text: &str| -> Result<Value> {
            serde_json::from_str(text).map_err(|e| bad(format!("{what} is not JSON ({e})")))
        };
        let count = |what: &str, n: i64| -> Result<u32> {
            u32::try_from(n).map_err(|_| bad(format!("{what} is {n}")))
        };
        let state = self
            .state
            .parse::<JobState>()
            .map_err(|_| bad(format!("unknown state '{}'", self.state)))?;
        let stored: Vec<StoredError> = serde_json::from_str(&self.errors)
            .map_err(|e| bad(format!("errors are not a JSON list ({e})")))?;
        let mut errors = Vec::with_capacity(stored.len());
        for s in stored {
            errors.push(AttemptError::new(
                count("an error's attempt", s.attempt)?,
                s.error,
                from_micros(s.at),
            ));
        }
        Ok(Job {
            id: JobId::new(id),
            queue: self.queue,
            name: self.name,
            args: json("args", &self.args)?,
            key: self.key,
            key_explicit: self.key_explicit,
            attempt: count("attempt", self.attempt)?,
            max_attempts: count("max_attempts", self.max_attempts)?,
            state,
            run_at: from_micros(self.run_at),
            priority: i32::try_from(self.priority)
                .map_err(|_| bad(format!("priority is {}", self.priority)))?,
            pool: self.pool,
            node: self.node,
            worker: self.worker,
            result: self
                .result
                .as_deref()
                .map(|r| json("result", r))
                .transpose()?,
            errors,
            created_at: from_micros(self.created_at),
            started_at: self.started_at.map(from_micros),
            finished_at: self.finished_at.map(from_micros),
            cancel_requested: self.cancel_requested,
        })
    }
}
