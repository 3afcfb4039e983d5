//! The dashboard's JSON API: the same commands as the control socket and
//! the same store queries as `cluster jobs`, as HTTP.
//!
//! Errors are `{"error": {"kind", "message"}}` with a fitting status: 400
//! for a bad request, 404 for no such route or job, 405 for a wrong
//! method, 409 for a job in the wrong state, 503 when the watcher stops or
//! runs no jobs.

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use super::reply::{error, full, json as json_response, Body, State};
use crate::error::{Error, Kind};
use crate::jobs::store::Store;
use crate::jobs::{CancelOutcome, JobId, JobState, ListFilter};
use crate::watcher::control;
use crate::watcher::event::{Command, Scale};
use crate::watcher::metrics;

/// The largest request body read (`POST /api/scale`).
const MAX_BODY: usize = 16 * 1024;

/// The most jobs one listing returns.
const MAX_LIST: usize = 1000;

pub(super) async fn handle(req: Request<Incoming>, state: &State) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (Method::GET | Method::HEAD, ["metrics"]) => metrics_text(state).await,
        (Method::GET, ["api", "status"]) => status(state).await,
        (Method::GET, ["api", "samples"]) => match serde_json::to_value(state.sampler.read()) {
            Ok(v) => json_response(StatusCode::OK, &v),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        },
        (Method::GET, ["api", "jobs"]) => list(state, &query).await,
        // The nodes of a shared store (PostgreSQL); one watcher's SQLite
        // store has none.
        (Method::GET, ["api", "nodes"]) => {
            with_store(state, |s| async move {
                match s.nodes() {
                    Some(nodes) => nodes.list().await.map(|v| json!(v)),
                    None => Ok(json!([])),
                }
            })
            .await
        }
        (Method::GET, ["api", "jobs", "stats"]) => {
            with_store(state, |s| async move { s.stats().await.map(|v| json!(v)) }).await
        }
        (Method::GET, ["api", "jobs", id]) => {
            let Some(id) = job_id(id) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("not a job id: {id}"),
                );
            };
            with_store(state, |s| async move {
                match s.get(id).await? {
                    Some(job) => Ok(json!(job)),
                    None => Err(Error::new(Kind::NotFound, format!("no job {id}"))),
                }
            })
            .await
        }
        (Method::POST, ["api", "jobs", id, action @ ("retry" | "cancel")]) => {
            let Some(id) = job_id(id) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("not a job id: {id}"),
                );
            };
            let action = action.to_string();
            with_store(state, |s| async move {
                if action == "retry" {
                    s.retry(id).await?;
                    Ok(json!({"ok": true, "id": id, "state": "queued"}))
                } else {
                    let outcome = match s.cancel(id).await? {
                        CancelOutcome::Cancelled => "cancelled".to_string(),
                        CancelOutcome::Requested => "cancel_requested".to_string(),
                        CancelOutcome::AlreadyFinished(st) => format!("already_{st}"),
                    };
                    Ok(json!({"ok": true, "id": id, "outcome": outcome}))
                }
            })
            .await
        }
        (Method::POST, ["api", "reload"]) => reload(state).await,
        (Method::POST, ["api", "scale"]) => scale(req, state).await,
        (
            _,
            ["metrics"]
            | ["api", "status" | "samples" | "jobs" | "nodes" | "reload" | "scale" | "events"],
        )
        | (_, ["api", "jobs", _] | ["api", "jobs", _, "retry" | "cancel"]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} does not take this method", path),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such page: {path}"),
        ),
    }
}

fn job_id(s: &str) -> Option<JobId> {
    s.parse().ok()
}

fn gone() -> Response<Body> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "stopping",
        "the watcher is stopping",
    )
}

async fn metrics_text(state: &State) -> Response<Body> {
    match control::ask(&state.commands, Command::Snapshot).await {
        Some(snapshot) => full(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics::render(&snapshot),
        ),
        None => gone(),
    }
}

/// What `/api/status` answers (and the event stream sends): the status
/// of `cluster status --json`, CPU use from the latest sample.
pub(super) async fn status_value(state: &State) -> Option<Value> {
    let r = control::status(&state.commands, Some(&state.sampler), true).await?;
    let mut v = serde_json::to_value(&r).ok()?;
    if let Some(o) = v.as_object_mut() {
        o.insert("pid".into(), json!(std::process::id()));
    }
    Some(v)
}

async fn status(state: &State) -> Response<Body> {
    match status_value(state).await {
        Some(v) => json_response(StatusCode::OK, &v),
        None => gone(),
    }
}

async fn reload(state: &State) -> Response<Body> {
    let answer = control::ask(&state.commands, |done| Command::Restart {
        reason: "reload requested (dashboard)".into(),
        done: Some(done),
    });
    match answer.await {
        Some(Ok(())) => json_response(StatusCode::OK, &json!({"ok": true})),
        Some(Err(e)) => error(StatusCode::CONFLICT, "reload", e.to_string()),
        None => gone(),
    }
}

async fn scale(req: Request<Incoming>, state: &State) -> Response<Body> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("cannot read the body: {e}"),
            )
        }
    };
    let workers = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("workers").and_then(Value::as_u64));
    let Some(workers) = workers.and_then(|n| usize::try_from(n).ok()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            r#"the body must be {"workers": N} with N a whole number"#,
        );
    };
    let answer = control::ask(&state.commands, |done| Command::Scale {
        to: Scale::To(workers),
        done: Some(done),
    });
    match answer.await {
        Some(Ok(n)) => json_response(StatusCode::OK, &json!({"ok": true, "workers_wanted": n})),
        Some(Err(e)) => error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
        None => gone(),
    }
}

async fn list(state: &State, query: &str) -> Response<Body> {
    let mut filter = ListFilter::new();
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        let v = percent_decode(v);
        match k {
            "state" if !v.is_empty() => match v.parse::<JobState>() {
                Ok(s) => filter = filter.state(s),
                Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
            },
            "queue" if !v.is_empty() => filter = filter.queue(v),
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=MAX_LIST).contains(&n) => filter = filter.limit(n),
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        format!("limit must be 1 to {MAX_LIST}"),
                    )
                }
            },
            _ => {}
        }
    }
    with_store(
        state,
        |s| async move { s.list(filter).await.map(|v| json!(v)) },
    )
    .await
}

/// `%XX` and `+` in a query value; a `%` not followed by two hex digits
/// stays as it is.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs `f` on the store, and answers its value or its error.
async fn with_store<F, Fut>(state: &State, f: F) -> Response<Body>
where
    F: FnOnce(std::sync::Arc<dyn Store>) -> Fut,
    Fut: std::future::Future<Output = crate::error::Result<Value>>,
{
    let Some(store) = state.store.clone() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_jobs",
            "this watcher runs no jobs (start it with --jobs)",
        );
    };
    match f(store).await {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) if e.is_not_found() => error(StatusCode::NOT_FOUND, "not_found", e.to_string()),
        Err(e) if e.is_config() => error(StatusCode::CONFLICT, "conflict", e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("mail%2Fout"), "mail/out");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%4"), "%4");
    }
}
