//! [`JobClient`]: the Rust client of the job server (`cluster
//! --job-server`), over hyper's pooled HTTP/1.1 client: many calls in
//! flight at once, each on a keep-alive connection of the pool (more are
//! opened while all are busy).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::call_error::CallError;
use super::{Job, JobId, Submitted};

/// How long the client keeps an idle connection: less than the server's
/// header timeout (10 s by default), so it never sends on a connection
/// the server is closing.
const POOL_IDLE: Duration = Duration::from_secs(5);

/// A durable job to submit with [`JobClient::submit_job`].
#[derive(Debug, Clone, Serialize)]
pub struct RemoteJob {
    name: String,
    args: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delay: Option<f64>,
}

impl RemoteJob {
    /// A job for handler `name` with these arguments.
    ///
    /// # Errors
    ///
    /// The arguments do not serialize to JSON: `CallError::kind` is `"encode"`.
    pub fn new(name: &str, args: &impl Serialize) -> Result<RemoteJob, CallError> {
        Ok(RemoteJob {
            name: name.to_string(),
            args: serde_json::to_value(args)
                .map_err(|e| CallError::new("encode", None, e.to_string()))?,
            queue: None,
            key: None,
            max_attempts: None,
            priority: None,
            delay: None,
        })
    }

    /// The queue (default `default`).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// A key: while a job with it is queued or running, submitting again
    /// answers that job.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// How many times it may run (default 3).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// Lower runs first within the queue (default 0).
    pub fn priority(mut self, p: i32) -> Self {
        self.priority = Some(p);
        self
    }

    /// Not before this long from now.
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = Some(d.as_secs_f64());
        self
    }
}

/// A client of the job server.
///
/// ```no_run
/// # async fn f() -> Result<(), cluster::CallError> {
/// use cluster::JobClient;
/// use serde_json::{json, Value};
///
/// let client = JobClient::connect("http://127.0.0.1:1337").await?;
/// let second = json!({"ms": 1000});
/// let (a, b) = tokio::join!(
///     client.call::<_, Value>("sleep", &second),
///     client.call::<_, Value>("sleep", &second),
/// ); // about 1 s: two workers run them at once
/// let id = client.submit("echo", &json!({"hello": 1})).await?;
/// let job = client.wait(id, std::time::Duration::from_secs(10)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct JobClient {
    base: String,
    token: Option<HeaderValue>,
    http: Client<HttpConnector, Full<Bytes>>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorFields,
}

#[derive(Deserialize)]
struct ErrorFields {
    kind: String,
    message: String,
}

#[derive(Deserialize)]
struct SubmittedBody {
    id: i64,
    existing: bool,
}

#[derive(Deserialize)]
struct HandlersBody {
    handlers: Vec<HandlerBody>,
}

#[derive(Deserialize)]
struct HandlerBody {
    name: String,
    workers: usize,
}

impl JobClient {
    /// A client for the job server at `url` (`http://host:port`); no
    /// connection is made yet.
    ///
    /// # Errors
    ///
    /// `url` is not an `http://host:port` URL: `CallError::kind` is `"url"`.
    pub fn new(url: &str) -> Result<JobClient, CallError> {
        let bad = |why: &str| CallError::new("url", None, format!("{url:?} {why}"));
        let uri: Uri = url.parse().map_err(|_| bad("is not a URL"))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("is not an http:// URL"));
        }
        let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector);
        Ok(JobClient {
            base: format!("http://{authority}"),
            token: None,
            http,
        })
    }

    /// [`new`](Self::new), then checks that a job server answers.
    ///
    /// # Errors
    ///
    /// As `new`; nothing answers: [`CallError::is_connect`]; a token is
    /// needed: [`CallError::is_unauthorized`] (use
    /// [`connect_with_token`](Self::connect_with_token)).
    pub async fn connect(url: &str) -> Result<JobClient, CallError> {
        let client = JobClient::new(url)?;
        client.probe().await?;
        Ok(client)
    }

    /// [`connect`](Self::connect) to a job server that needs a token.
    ///
    /// # Errors
    ///
    /// As `connect`.
    pub async fn connect_with_token(url: &str, token: &str) -> Result<JobClient, CallError> {
        let client = JobClient::new(url)?.with_token(token)?;
        client.probe().await?;
        Ok(client)
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    ///
    /// # Errors
    ///
    /// The token cannot be a header value: `CallError::kind` is `"url"`.
    pub fn with_token(mut self, token: &str) -> Result<JobClient, CallError> {
        let value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| CallError::new("url", None, "the token is not printable text"))?;
        self.token = Some(value);
        Ok(self)
    }

    async fn probe(&self) -> Result<(), CallError> {
        match self.request(Method::GET, "/v1/health", None).await {
            Ok(_) => Ok(()),
            // Up, without a serving worker yet: calls wait for one.
            Err(e) if e.kind() == "stopping" || e.status() == Some(503) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Sends one request; the body of a 2xx answer, else the error.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, CallError> {
        let connect = |e: &dyn std::fmt::Display| {
            CallError::new("connect", None, format!("{}: {e}", self.base))
        };
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(CONTENT_TYPE, "application/json");
        if let Some(t) = &self.token {
            req = req.header(AUTHORIZATION, t.clone());
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| CallError::new("url", None, e.to_string()))?;
        let resp = self.http.request(req).await.map_err(|e| connect(&e))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| connect(&e))?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => CallError::new(&b.error.kind, Some(status.as_u16()), b.error.message),
            Err(_) => CallError::new(
                "protocol",
                Some(status.as_u16()),
                format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)),
            ),
        })
    }

    fn decode<R: DeserializeOwned>(bytes: &[u8]) -> Result<R, CallError> {
        serde_json::from_slice(bytes)
            .map_err(|e| CallError::new("decode", None, format!("cannot decode the answer: {e}")))
    }

    /// Calls handler `name` with `args` on a free worker (waiting up to 30
    /// s for one) and returns its result.
    ///
    /// # Errors
    ///
    /// [`CallError::is_not_found`], [`is_bad_args`](CallError::is_bad_args),
    /// [`is_handler_error`](CallError::is_handler_error),
    /// [`is_timeout`](CallError::is_timeout),
    /// [`is_queue_full`](CallError::is_queue_full),
    /// [`is_worker_lost`](CallError::is_worker_lost),
    /// [`is_connect`](CallError::is_connect); a result that is not an `R`:
    /// kind `"decode"`.
    pub async fn call<A: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        name: &str,
        args: &A,
    ) -> Result<R, CallError> {
        self.call_path(name, args, "").await
    }

    /// [`call`](Self::call), waiting at most `wait` for a free worker.
    ///
    /// # Errors
    ///
    /// As `call`.
    pub async fn call_with_timeout<A: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        name: &str,
        args: &A,
        wait: Duration,
    ) -> Result<R, CallError> {
        let query = format!("?timeout={}", wait.as_secs_f64());
        self.call_path(name, args, &query).await
    }

    async fn call_path<A: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        name: &str,
        args: &A,
        query: &str,
    ) -> Result<R, CallError> {
        let body =
            serde_json::to_vec(args).map_err(|e| CallError::new("encode", None, e.to_string()))?;
        let path = format!("/v1/call/{}{query}", encode_segment(name));
        let bytes = self.request(Method::POST, &path, Some(body)).await?;
        Self::decode(&bytes)
    }

    /// Submits a durable job for handler `name`; returns its id.
    ///
    /// # Errors
    ///
    /// The watcher runs no store: kind `"no_store"`; a bad job: kind
    /// `"bad_request"`; [`CallError::is_connect`].
    pub async fn submit<A: Serialize + ?Sized>(
        &self,
        name: &str,
        args: &A,
    ) -> Result<JobId, CallError> {
        let args = serde_json::to_value(args)
            .map_err(|e| CallError::new("encode", None, e.to_string()))?;
        Ok(self.submit_job(RemoteJob::new(name, &args)?).await?.id())
    }

    /// Submits `job`; tells whether it was inserted or a job with its key
    /// was queued or running already.
    ///
    /// # Errors
    ///
    /// As [`submit`](Self::submit).
    pub async fn submit_job(&self, job: RemoteJob) -> Result<Submitted, CallError> {
        let body =
            serde_json::to_vec(&job).map_err(|e| CallError::new("encode", None, e.to_string()))?;
        let bytes = self.request(Method::POST, "/v1/jobs", Some(body)).await?;
        let s: SubmittedBody = Self::decode(&bytes)?;
        let id = JobId::new(s.id);
        Ok(if s.existing {
            Submitted::Existing(id)
        } else {
            Submitted::New(id)
        })
    }

    /// The job as it is now.
    ///
    /// # Errors
    ///
    /// No such job: [`CallError::is_not_found`]; as [`submit`](Self::submit).
    pub async fn job(&self, id: JobId) -> Result<Job, CallError> {
        let bytes = self
            .request(Method::GET, &format!("/v1/jobs/{id}"), None)
            .await?;
        Self::decode(&bytes)
    }

    /// Waits until the job is done, failed or cancelled (the server
    /// long-polls), and returns it.
    ///
    /// # Errors
    ///
    /// Still not finished after `timeout`: [`CallError::is_timeout`]; as
    /// [`job`](Self::job).
    pub async fn wait(&self, id: JobId, timeout: Duration) -> Result<Job, CallError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // The server holds one poll for at most an hour.
            let wait = left.min(Duration::from_secs(3600)).as_secs_f64();
            let path = format!("/v1/jobs/{id}?wait={wait}");
            let job: Job = Self::decode(&self.request(Method::GET, &path, None).await?)?;
            if job.state.is_finished() {
                return Ok(job);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(CallError::new(
                    "timeout",
                    None,
                    format!(
                        "job {id} is still {} after {:.3}s",
                        job.state,
                        timeout.as_secs_f64()
                    ),
                ));
            }
        }
    }

    /// The handlers the workers serve, each with how many serving workers
    /// have it.
    ///
    /// # Errors
    ///
    /// [`CallError::is_connect`], [`is_unauthorized`](CallError::is_unauthorized).
    pub async fn handlers(&self) -> Result<Vec<(String, usize)>, CallError> {
        let body: HandlersBody =
            Self::decode(&self.request(Method::GET, "/v1/handlers", None).await?)?;
        Ok(body
            .handlers
            .into_iter()
            .map(|h| (h.name, h.workers))
            .collect())
    }
}

/// `name` as one path segment: unreserved characters as they are, the
/// rest percent-encoded.
fn encode_segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
