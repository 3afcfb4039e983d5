//! [`CallError`]: why a [`JobClient`](crate::JobClient) request failed,
//! told apart with `is_*` predicates (the job server's error kinds).

use std::fmt;

/// Why a job server request failed.
///
/// ```no_run
/// # async fn f(client: cluster::JobClient) {
/// match client.call::<_, serde_json::Value>("resize", &serde_json::json!({"w": 1})).await {
///     Ok(v) => println!("{v}"),
///     Err(e) if e.is_not_found() => println!("no worker has that handler"),
///     Err(e) if e.is_timeout() => println!("every worker stayed busy"),
///     Err(e) if e.is_worker_lost() => println!("the worker died; try again"),
///     Err(e) if e.is_handler_error() => println!("the handler said no: {}", e.message()),
///     Err(e) => println!("{e}"),
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    /// The job server's `kind` (`"not_found"`, ...), or `"connect"`,
    /// `"protocol"`, `"decode"` for failures on the client's side.
    kind: String,
    /// The HTTP status, when the server answered.
    status: Option<u16>,
    message: String,
}

impl CallError {
    pub(crate) fn new(kind: &str, status: Option<u16>, message: impl Into<String>) -> CallError {
        CallError {
            kind: kind.to_string(),
            status,
            message: message.into(),
        }
    }

    /// The error's kind as the job server names it (see
    /// `docs/openapi.json`), or `connect`, `protocol`, `decode`, `url`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// The error's text.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// No worker has a handler by that name (404), or no such job.
    pub fn is_not_found(&self) -> bool {
        self.kind == "not_found"
    }

    /// The handler returned an error (422) or panicked (500).
    pub fn is_handler_error(&self) -> bool {
        self.kind == "handler_error" || self.kind == "handler_panicked"
    }

    /// The handler panicked (500); the worker lives on.
    pub fn is_panic(&self) -> bool {
        self.kind == "handler_panicked"
    }

    /// The arguments do not deserialize into what the handler takes (400).
    pub fn is_bad_args(&self) -> bool {
        self.kind == "bad_args"
    }

    /// No worker could take the call in time (503), the call ran past the
    /// job timeout (504), or a [`wait`](crate::JobClient::wait) ran out.
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind.as_str(), "timeout" | "run_timeout")
    }

    /// The call queue is full (503): every worker is busy.
    pub fn is_queue_full(&self) -> bool {
        self.kind == "queue_full"
    }

    /// The worker running the call died (502); the next call goes to
    /// another worker.
    pub fn is_worker_lost(&self) -> bool {
        self.kind == "worker_lost"
    }

    /// The token is missing or wrong (401).
    pub fn is_unauthorized(&self) -> bool {
        self.kind == "unauthorized"
    }

    /// The request body is larger than the server takes (413).
    pub fn is_too_large(&self) -> bool {
        self.kind == "too_large"
    }

    /// The job server could not be reached, or the connection broke.
    pub fn is_connect(&self) -> bool {
        self.kind == "connect"
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(s) => write!(f, "{} (HTTP {s}): {}", self.kind, self.message),
            None => write!(f, "{}: {}", self.kind, self.message),
        }
    }
}

impl std::error::Error for CallError {}
