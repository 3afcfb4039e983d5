//! One job as a line of JSON: what `cluster jobs submit --stdin` reads and
//! what a job source prints. A line is either a bare JSON value (the
//! arguments) or an object with `args` and any of `queue`, `name`, `key`,
//! `max_attempts`, `priority`, `run_at` (RFC 3339), `delay` (seconds),
//! `dedupe`; unknown fields are refused. An explicit key always
//! deduplicates.

use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::Value;

use super::model::NewJob;
use super::time::parse_rfc3339;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    args: Value,
    queue: Option<String>,
    name: Option<String>,
    key: Option<String>,
    max_attempts: Option<u32>,
    priority: Option<i32>,
    run_at: Option<String>,
    delay: Option<f64>,
    dedupe: Option<bool>,
}

/// What a line does not say: the defaults of every job.
#[derive(Debug, Clone, Default)]
pub struct LineDefaults {
    /// Queue (else `default`).
    pub queue: Option<String>,
    /// Handler name.
    pub name: Option<String>,
    /// Attempts.
    pub max_attempts: Option<u32>,
    /// Priority (lower first).
    pub priority: Option<i32>,
    /// Not before.
    pub run_at: Option<SystemTime>,
    /// Deduplicate by the derived key.
    pub dedupe: bool,
}

impl LineDefaults {
    /// A job with `args` and these defaults.
    pub fn job(&self, args: Value) -> NewJob {
        let mut job = NewJob::new(args).dedupe(self.dedupe);
        if let Some(q) = &self.queue {
            job = job.queue(q.clone());
        }
        if let Some(n) = &self.name {
            job = job.name(n.clone());
        }
        if let Some(n) = self.max_attempts {
            job = job.max_attempts(n);
        }
        if let Some(p) = self.priority {
            job = job.priority(p);
        }
        if let Some(t) = self.run_at {
            job = job.run_at(t);
        }
        job
    }
}

/// A delay in seconds, from 0 to a year.
pub fn parse_delay(secs: f64) -> Result<Duration, String> {
    if !secs.is_finite() || !(0.0..=31_622_400.0).contains(&secs) {
        return Err("the delay must be between 0 and 31622400 seconds (a year)".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses one line into a job; the error says why in one line.
pub fn job_from_line(line: &str, d: &LineDefaults) -> Result<NewJob, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e})"))?;
    let is_spec = value.as_object().is_some_and(|o| o.contains_key("args"));
    if !is_spec {
        return Ok(d.job(value));
    }
    let spec: Spec = serde_json::from_value(value).map_err(|e| e.to_string())?;
    let mut job = d.job(spec.args);
    if let Some(q) = spec.queue {
        if q.is_empty() {
            return Err("the queue name is empty".into());
        }
        job = job.queue(q);
    }
    if let Some(n) = spec.name {
        job = job.name(n);
    }
    if let Some(n) = spec.max_attempts {
        if n == 0 {
            return Err("max_attempts must be at least 1".into());
        }
        job = job.max_attempts(n);
    }
    if let Some(p) = spec.priority {
        job = job.priority(p);
    }
    match (spec.run_at, spec.delay) {
        (Some(_), Some(_)) => return Err("give run_at or delay, not both".into()),
        (Some(t), None) => job = job.run_at(parse_rfc3339(&t)?),
        (None, Some(secs)) => job = job.delay(parse_delay(secs)?),
        (None, None) => {}
    }
    if let Some(on) = spec.dedupe {
        job = job.dedupe(on);
    }
    if let Some(k) = spec.key {
        if k.is_empty() {
            return Err("the key is empty".into());
        }
        job = job.key(k).dedupe(true);
    }
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_values_and_specs() {
        let d = LineDefaults {
            queue: Some("q".into()),
            ..LineDefaults::default()
        };
        let j = job_from_line("[1, 2]", &d).unwrap();
        assert_eq!(
            j.effective_key(),
            NewJob::new(serde_json::json!([1, 2]))
                .queue("q")
                .effective_key()
        );
        let j = job_from_line(r#"{"args": {"x": 1}, "key": "k", "queue": "other"}"#, &d).unwrap();
        assert_eq!(j.effective_key(), "k");
        for bad in [
            "{",
            r#"{"args": 1, "nope": 2}"#,
            r#"{"args": 1, "max_attempts": 0}"#,
            r#"{"args": 1, "key": ""}"#,
        ] {
            assert!(job_from_line(bad, &d).is_err(), "{bad}");
        }
    }
}
