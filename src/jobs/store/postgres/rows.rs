//! Decoding a row of `jobs` or `jobs_done` into a [`Job`]: the column
//! lists every read selects (the same twenty columns from either table),
//! and the checks of its JSON, counts and state.

use std::time::SystemTime;

use serde_json::Value;
use tokio_postgres::Row;

use crate::error::{Error, Kind, Result};
use crate::jobs::model::{AttemptError, Job, JobId, JobState};
use crate::jobs::time::from_micros;

/// The columns of a hot-table row, `a` being the table's alias (or name).
pub(super) fn hot_columns(a: &str) -> String {
    format!(
        "{a}.id, {a}.queue, {a}.name, {a}.args::text, {a}.key, {a}.key_explicit, {a}.attempt, \
         {a}.max_attempts, {a}.state, {a}.run_at, {a}.priority, {a}.pool, {a}.node, {a}.worker, \
         NULL::text, {a}.errors::text, {a}.created_at, {a}.started_at, NULL::timestamptz, \
         {a}.cancel_requested"
    )
}

/// The same columns from `jobs_done`.
pub(super) fn done_columns(a: &str) -> String {
    format!(
        "{a}.id, {a}.queue, {a}.name, {a}.args::text, {a}.key, {a}.key_explicit, {a}.attempt, \
         {a}.max_attempts, {a}.state, {a}.run_at, {a}.priority, {a}.pool, {a}.node, {a}.worker, \
         {a}.result::text, {a}.errors::text, {a}.created_at, {a}.started_at, {a}.finished_at, \
         false"
    )
}

/// The columns `jobs_done` is written with, in order.
pub(super) const DONE_INSERT: &str = "id, queue, name, args, key, key_explicit, state, attempt, \
     max_attempts, run_at, priority, pool, node, worker, result, errors, created_at, started_at, \
     finished_at";

/// `{attempt, error, at}` appended to `errors` (a corrupt value is
/// replaced rather than failing every later write to the row); `att` and
/// `err` are SQL expressions.
pub(super) fn append_error(errors: &str, att: &str, err: &str) -> String {
    format!(
        "(CASE WHEN jsonb_typeof({errors}) = 'array' THEN {errors} ELSE '[]'::jsonb END) || \
         jsonb_build_array(jsonb_build_object('attempt', {att}, 'error', {err}, \
         'at', (extract(epoch FROM now()) * 1000000)::bigint))"
    )
}

#[derive(serde::Deserialize)]
struct StoredError {
    attempt: i64,
    error: String,
    at: i64,
}

pub(super) fn corrupt(label: &str, what: String) -> Error {
    Error::new(
        Kind::Store,
        format!("job store {label}: corrupt row: {what}"),
    )
}

/// Decodes a row selected with [`hot_columns`] or [`done_columns`].
pub(super) fn job_from_row(r: &Row, label: &str) -> Result<Job> {
    let id: i64 = get(r, 0, label)?;
    let bad = |what: String| corrupt(label, format!("job {id}: {what}"));
    let json = |what: &str, text: &str| -> Result<Value> {
        serde_json::from_str(text).map_err(|e| bad(format!("{what} is not JSON ({e})")))
    };
    let count = |what: &str, n: i64| -> Result<u32> {
        u32::try_from(n).map_err(|_| bad(format!("{what} is {n}")))
    };
    let state: String = get(r, 8, label)?;
    let state = state
        .parse::<JobState>()
        .map_err(|_| bad(format!("unknown state '{state}'")))?;
    let errors_text: String = get(r, 15, label)?;
    let stored: Vec<StoredError> = serde_json::from_str(&errors_text)
        .map_err(|e| bad(format!("errors are not a JSON list ({e})")))?;
    let mut errors = Vec::with_capacity(stored.len());
    for s in stored {
        errors.push(AttemptError::new(
            count("an error's attempt", s.attempt)?,
            s.error,
            from_micros(s.at),
        ));
    }
    let args: String = get(r, 3, label)?;
    let result: Option<String> = get(r, 14, label)?;
    let attempt: i32 = get(r, 6, label)?;
    let max_attempts: i32 = get(r, 7, label)?;
    Ok(Job {
        id: JobId::new(id),
        queue: get(r, 1, label)?,
        name: get(r, 2, label)?,
        args: json("args", &args)?,
        key: get(r, 4, label)?,
        key_explicit: get(r, 5, label)?,
        attempt: count("attempt", i64::from(attempt))?,
        max_attempts: count("max_attempts", i64::from(max_attempts))?,
        state,
        run_at: get::<SystemTime>(r, 9, label)?,
        priority: get(r, 10, label)?,
        pool: get(r, 11, label)?,
        node: get(r, 12, label)?,
        worker: get(r, 13, label)?,
        result: result.as_deref().map(|t| json("result", t)).transpose()?,
        errors,
        created_at: get(r, 16, label)?,
        started_at: get(r, 17, label)?,
        finished_at: get(r, 18, label)?,
        cancel_requested: get(r, 19, label)?,
    })
}

/// Column `i` of `r`, or a corrupt-row error.
pub(super) fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    r: &'a Row,
    i: usize,
    label: &str,
) -> Result<T> {
    r.try_get(i)
        .map_err(|e| corrupt(label, format!("column {i}: {e}")))
}
