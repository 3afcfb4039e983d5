//! The job server's routes: one request in, one response out.
//!
//! | route | answers |
//! |---|---|
//! | `POST /v1/call/{name}?timeout=SECS` | the handler's result (in memory, no store write) |
//! | `POST /v1/jobs` | a durable job's id (a key already queued or running answers that job) |
//! | `GET /v1/jobs/{id}?wait=SECS` | the job; with `wait`, once it ended or the wait ran out |
//! | `GET /v1/handlers` | handler names and how many workers serve each |
//! | `GET /v1/health` | 200 while workers serve, 503 while none does or the watcher stops |
//! | `GET /v1/openapi.json` | the OpenAPI document of all this |

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};

use super::auth::Token;
use super::reply::{error, json, json_text, Body, ErrorKind, Refusal};
use crate::ipc::message::{JobFailure, MAX_MESSAGE};
use crate::jobs::dispatch::{Call, CallOutcome, HandlersReport, JobsEvent};
use crate::jobs::store::Store;
use crate::jobs::{JobId, NewJob, Submitted};

/// The OpenAPI 3 document of this API.
pub(crate) const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// How long a call waits for a worker unless `?timeout=` says otherwise.
const DEFAULT_CALL_WAIT: Duration = Duration::from_secs(30);

/// The longest `?timeout=` and `?wait=`.
const MAX_WAIT_SECS: f64 = 3600.0;

/// How often a long-poll looks at the store when no outcome was written
/// meanwhile (a job another process cancelled, another node's job).
const POLL: Duration = Duration::from_millis(250);

/// What every request handler shares.
pub(crate) struct Api {
    pub jobs: mpsc::UnboundedSender<JobsEvent>,
    pub store: Option<Arc<dyn Store>>,
    pub written: watch::Receiver<u64>,
    pub token: Option<Token>,
    pub max_body: usize,
    pub body_timeout: Duration,
}

type Answer = Response<Body>;

impl Api {
    /// The service function: never fails, every error is a response.
    pub(crate) async fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Answer, Infallible> {
        Ok(self.route(req).await)
    }

    async fn route(&self, req: Request<Incoming>) -> Answer {
        if let Some(token) = &self.token {
            if !token.admits(req.headers().get(AUTHORIZATION)) {
                return error(
                    ErrorKind::Unauthorized,
                    "this job server needs an Authorization: Bearer <token> header with its token",
                );
            }
        }
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        let method = req.method().clone();
        match (segments.as_slice(), &method) {
            (["v1", "call", name], &Method::POST) => {
                let name = decode_segment(name);
                self.call(&name, &query, req).await
            }
            (["v1", "jobs"], &Method::POST) => self.submit(req).await,
            (["v1", "jobs", id], &Method::GET) => self.job(id, &query).await,
            (["v1", "handlers"], &Method::GET) => self.handlers().await,
            (["v1", "health"], &Method::GET) => self.health().await,
            (["v1", "openapi.json"], &Method::GET) => json_text(StatusCode::OK, OPENAPI),
            (["v1", "call", _], _) | (["v1", "jobs"], _) => not_allowed("POST"),
            (["v1", "jobs", _], _)
            | (["v1", "handlers"], _)
            | (["v1", "health"], _)
            | (["v1", "openapi.json"], _) => not_allowed("GET"),
            _ => error(
                ErrorKind::NotFound,
                format!("no route {method} {path} (see GET /v1/openapi.json)"),
            ),
        }
    }

    /// Reads the whole body, within the size bound and the body timeout.
    async fn body(&self, req: Request<Incoming>) -> Result<Bytes, Refusal> {
        let too_large = |n: Option<u64>| {
            let size = n.map(|n| format!(" ({n} bytes)")).unwrap_or_default();
            Refusal::new(
                ErrorKind::TooLarge,
                format!(
                    "the request body{size} is larger than this job server takes ({} bytes, --job-max-body)",
                    self.max_body
                ),
            )
        };
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body as u64) {
            return Err(too_large(declared));
        }
        let limited = Limited::new(req.into_body(), self.max_body);
        match tokio::time::timeout(self.body_timeout, limited.collect()).await {
            Err(_) => Err(Refusal::new(
                ErrorKind::RequestTimeout,
                format!(
                    "the request body did not arrive within {:?}",
                    self.body_timeout
                ),
            )),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(None)),
            Ok(Err(e)) => Err(Refusal::new(
                ErrorKind::BadRequest,
                format!("cannot read the request body: {e}"),
            )),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
        }
    }

    async fn call(&self, name: &str, query: &str, req: Request<Incoming>) -> Answer {
        let wait = match seconds(query, "timeout") {
            Ok(w) => w.unwrap_or(DEFAULT_CALL_WAIT),
            Err(e) => return e.into(),
        };
        let body = match self.body(req).await {
            Ok(b) => b,
            Err(e) => return e.into(),
        };
        let args = match json_text_of(&body) {
            Ok(a) => a,
            Err(e) => return e.into(),
        };
        let (reply, rx) = oneshot::channel();
        let call = Call {
            name: name.to_string(),
            args,
            wait,
            reply,
        };
        if self.jobs.send(JobsEvent::Call(call)).is_err() {
            return stopping();
        }
        let Ok(outcome) = rx.await else {
            return stopping();
        };
        call_answer(name, wait, outcome)
    }

    async fn submit(&self, req: Request<Incoming>) -> Answer {
        let Some(store) = &self.store else {
            return no_store();
        };
        let body = match self.body(req).await {
            Ok(b) => b,
            Err(e) => return e.into(),
        };
        let spec: SubmitJob = match serde_json::from_slice(&body) {
            Ok(s) => s,
            Err(e) => {
                return error(
                    ErrorKind::BadRequest,
                    format!(
                        "the body is not a job ({{\"name\", \"args\", \"queue\", \"key\"}}): {e}"
                    ),
                )
            }
        };
        let job = match spec.into_new_job() {
            Ok(j) => j,
            Err(e) => return e.into(),
        };
        match store.submit(vec![job]).await {
            Ok(mut out) => match out.pop() {
                Some(Submitted::New(id)) => json(
                    StatusCode::CREATED,
                    &json!({"id": id.get(), "existing": false}),
                ),
                Some(Submitted::Existing(id)) => {
                    json(StatusCode::OK, &json!({"id": id.get(), "existing": true}))
                }
                None => error(ErrorKind::Store, "the job store returned no id"),
            },
            Err(e) if e.is_config() => error(ErrorKind::BadRequest, e.to_string()),
            Err(e) => error(ErrorKind::Store, e.to_string()),
        }
    }

    async fn job(&self, id: &str, query: &str) -> Answer {
        let Some(store) = &self.store else {
            return no_store();
        };
        let wait = match seconds(query, "wait") {
            Ok(w) => w.unwrap_or(Duration::ZERO),
            Err(e) => return e.into(),
        };
        let Some(id) = id.parse::<i64>().ok().filter(|&n| n > 0).map(JobId::new) else {
            return error(
                ErrorKind::BadRequest,
                format!("{id:?} is not a job id (a positive number)"),
            );
        };
        let deadline = tokio::time::Instant::now() + wait;
        let mut written = self.written.clone();
        loop {
            // Marks what has been seen, so `changed` waits for a new batch.
            written.borrow_and_update();
            let job = match store.get(id).await {
                Ok(Some(job)) => job,
                Ok(None) => return error(ErrorKind::NotFound, format!("no job {id}")),
                Err(e) => return error(ErrorKind::Store, e.to_string()),
            };
            let now = tokio::time::Instant::now();
            if job.state.is_finished() || now >= deadline {
                return json(StatusCode::OK, &job);
            }
            let pause = tokio::time::sleep((deadline - now).min(POLL));
            tokio::pin!(pause);
            tokio::select! {
                changed = written.changed() => {
                    if changed.is_err() {
                        pause.await;
                    }
                }
                () = &mut pause => {}
            }
        }
    }

    async fn report(&self) -> Option<HandlersReport> {
        let (tx, rx) = oneshot::channel();
        self.jobs.send(JobsEvent::Handlers(tx)).ok()?;
        rx.await.ok()
    }

    async fn handlers(&self) -> Answer {
        let Some(r) = self.report().await else {
            return stopping();
        };
        let handlers: Vec<Value> = r
            .handlers
            .iter()
            .map(|(name, n)| json!({"name": name, "workers": n}))
            .collect();
        json(
            StatusCode::OK,
            &json!({"handlers": handlers, "workers": r.workers}),
        )
    }

    async fn health(&self) -> Answer {
        let r = self.report().await.unwrap_or(HandlersReport {
            stopping: true,
            ..HandlersReport::default()
        });
        let (status, code) = if r.stopping {
            ("stopping", StatusCode::SERVICE_UNAVAILABLE)
        } else if r.workers == 0 {
            ("starting", StatusCode::SERVICE_UNAVAILABLE)
        } else {
            ("ok", StatusCode::OK)
        };
        let c = r.calls;
        json(
            code,
            &json!({
                "status": status,
                "workers": r.workers,
                "capacity": r.capacity,
                "store": self.store.is_some(),
                "calls": {
                    "queued": c.queued, "running": c.running, "started": c.started,
                    "done": c.done, "failed": c.failed, "lost": c.lost, "refused": c.refused,
                },
            }),
        )
    }
}

/// `POST /v1/jobs`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitJob {
    name: Option<String>,
    #[serde(default)]
    args: Value,
    queue: Option<String>,
    key: Option<String>,
    max_attempts: Option<u32>,
    priority: Option<i32>,
    /// Seconds from now.
    delay: Option<f64>,
}

impl SubmitJob {
    fn into_new_job(self) -> Result<NewJob, Refusal> {
        let mut job = NewJob::new(self.args);
        if let Some(q) = self.queue {
            job = job.queue(q);
        }
        if let Some(n) = self.name {
            job = job.name(n);
        }
        if let Some(k) = self.key {
            // Gearman's unique id: a key queued or running answers that job.
            job = job.key(k).dedupe(true);
        }
        if let Some(n) = self.max_attempts {
            if n == 0 {
                return Err(Refusal::new(
                    ErrorKind::BadRequest,
                    "max_attempts must be at least 1",
                ));
            }
            job = job.max_attempts(n);
        }
        if let Some(p) = self.priority {
            job = job.priority(p);
        }
        if let Some(d) = self.delay {
            if !d.is_finite() || !(0.0..=MAX_DELAY_SECS).contains(&d) {
                return Err(Refusal::new(
                    ErrorKind::BadRequest,
                    format!("delay must be between 0 and {MAX_DELAY_SECS} seconds"),
                ));
            }
            job = job.delay(Duration::from_secs_f64(d));
        }
        Ok(job)
    }
}

/// The longest `delay` of a submitted job: a year.
const MAX_DELAY_SECS: f64 = 366.0 * 86_400.0;

/// The response to a call's outcome.
fn call_answer(name: &str, wait: Duration, outcome: CallOutcome) -> Answer {
    match outcome {
        CallOutcome::Done(result) => json_text(StatusCode::OK, result),
        CallOutcome::Failed(JobFailure::Failed(m)) => error(ErrorKind::HandlerError, m),
        CallOutcome::Failed(JobFailure::Panicked(m)) => error(ErrorKind::HandlerPanicked, m),
        CallOutcome::Failed(JobFailure::NoHandler(m)) => error(ErrorKind::NotFound, m),
        CallOutcome::Failed(JobFailure::BadArgs(m)) => error(ErrorKind::BadArgs, m),
        CallOutcome::Failed(JobFailure::Cancelled) => {
            error(ErrorKind::RunTimeout, "the call was cancelled")
        }
        CallOutcome::NotFound => error(
            ErrorKind::NotFound,
            format!("no worker has a handler named {name:?} (see GET /v1/handlers)"),
        ),
        CallOutcome::Timeout => retry_later(error(
            ErrorKind::Timeout,
            format!(
                "no worker could take the call within {}s (every worker with {name:?} is busy, or none runs)",
                wait.as_secs_f64()
            ),
        )),
        CallOutcome::QueueFull => retry_later(error(
            ErrorKind::QueueFull,
            "the call queue is full (--job-queue-limit): every worker is busy",
        )),
        CallOutcome::WorkerLost(how) => error(
            ErrorKind::WorkerLost,
            format!("the worker running the call died: {how}"),
        ),
        CallOutcome::RunTimeout(t) => error(
            ErrorKind::RunTimeout,
            format!("the call ran longer than {}s (--job-timeout) and was cancelled", t.as_secs_f64()),
        ),
        CallOutcome::TooLarge(len) => error(
            ErrorKind::TooLarge,
            format!("the call's handler name makes a message of {len} bytes; one message takes at most {MAX_MESSAGE}"),
        ),
        CallOutcome::Stopping => stopping(),
    }
}

fn retry_later(mut r: Answer) -> Answer {
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn stopping() -> Answer {
    error(ErrorKind::Stopping, "the watcher is stopping")
}

fn no_store() -> Answer {
    error(
        ErrorKind::NoStore,
        "this watcher runs no job store: start it with --jobs URL for durable jobs (calls work without)",
    )
}

fn not_allowed(allow: &'static str) -> Answer {
    let mut r = error(
        ErrorKind::MethodNotAllowed,
        format!("this route takes {allow} only"),
    );
    r.headers_mut()
        .insert(hyper::header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// The body as JSON text (an empty body is `null`), or a 400 saying
/// where it is malformed.
fn json_text_of(body: &[u8]) -> Result<String, Refusal> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok("null".into());
    }
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        return Err(Refusal::new(
            ErrorKind::BadRequest,
            format!("the request body is not valid JSON: {e}"),
        ));
    }
    String::from_utf8(body.to_vec()).map_err(|_| {
        Refusal::new(
            ErrorKind::BadRequest,
            "the request body is not valid JSON: not UTF-8",
        )
    })
}

/// A path segment with its `%XX` escapes decoded (kept as it is when
/// that would not be UTF-8).
fn decode_segment(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

/// `?name=SECS` from the query, when given.
fn seconds(query: &str, name: &str) -> Result<Option<Duration>, Refusal> {
    let Some(value) = query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
    else {
        return Ok(None);
    };
    match value.parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=MAX_WAIT_SECS).contains(&s) => {
            Ok(Some(Duration::from_secs_f64(s)))
        }
        _ => Err(Refusal::new(
            ErrorKind::BadRequest,
            format!("?{name}={value} is not a number of seconds from 0 to {MAX_WAIT_SECS}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_seconds() {
        assert_eq!(seconds("", "timeout").unwrap(), None);
        assert_eq!(
            seconds("a=1&timeout=2.5", "timeout").unwrap(),
            Some(Duration::from_millis(2500))
        );
        assert!(seconds("timeout=-1", "timeout").is_err());
        assert!(seconds("timeout=x", "timeout").is_err());
        assert!(seconds("timeout=inf", "timeout").is_err());
    }

    #[test]
    fn path_segments_are_percent_decoded() {
        assert_eq!(decode_segment("echo"), "echo");
        assert_eq!(decode_segment("a%20b%2Fc"), "a b/c");
        assert_eq!(decode_segment("50%"), "50%");
        assert_eq!(decode_segment("%ff"), "%ff");
    }

    #[test]
    fn bodies_are_json_or_a_clear_400() {
        assert_eq!(json_text_of(b"").unwrap(), "null");
        assert_eq!(json_text_of(b" {\"a\": [1]} ").unwrap(), " {\"a\": [1]} ");
        for bad in [&b"{"[..], b"{\"a\":}", b"[1] [2]", b"\xff"] {
            let r = json_text_of(bad).unwrap_err();
            assert_eq!(r.kind, ErrorKind::BadRequest);
        }
    }

    #[test]
    fn the_openapi_document_is_json_and_names_every_route() {
        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        for path in [
            "/v1/call/{name}",
            "/v1/jobs",
            "/v1/jobs/{id}",
            "/v1/handlers",
            "/v1/health",
            "/v1/openapi.json",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path}");
        }
    }
}
