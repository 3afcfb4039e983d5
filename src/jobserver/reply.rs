//! The job server's responses: JSON bodies, and the one error shape
//! `{"error": {"kind": …, "message": …}}` with the status each kind has.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};

pub(crate) type Body = Full<Bytes>;

/// Every kind of error the API answers, with its status. The names are
/// the `kind` strings of the OpenAPI document (`docs/openapi.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// 400: malformed JSON, a bad query or a bad field.
    BadRequest,
    /// 400: the handler's arguments do not deserialize.
    BadArgs,
    /// 401: no or a wrong bearer token.
    Unauthorized,
    /// 404: no such handler, job or path.
    NotFound,
    /// 405.
    MethodNotAllowed,
    /// 408: the body did not arrive in time.
    RequestTimeout,
    /// 413.
    TooLarge,
    /// 422: the handler returned an error.
    HandlerError,
    /// 500: the handler panicked.
    HandlerPanicked,
    /// 500: the store failed.
    Store,
    /// 501: the watcher runs no job store.
    NoStore,
    /// 502: the worker died during the call.
    WorkerLost,
    /// 503: no worker took the call in time.
    Timeout,
    /// 503: the call queue is full.
    QueueFull,
    /// 503: the watcher is stopping.
    Stopping,
    /// 504: the call ran past the job timeout and was cancelled.
    RunTimeout,
}

impl ErrorKind {
    pub(crate) fn status(self) -> StatusCode {
        match self {
            ErrorKind::BadRequest | ErrorKind::BadArgs => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::HandlerError => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::HandlerPanicked | ErrorKind::Store => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::NoStore => StatusCode::NOT_IMPLEMENTED,
            ErrorKind::WorkerLost => StatusCode::BAD_GATEWAY,
            ErrorKind::Timeout | ErrorKind::QueueFull | ErrorKind::Stopping => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorKind::RunTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::BadArgs => "bad_args",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::HandlerError => "handler_error",
            ErrorKind::HandlerPanicked => "handler_panicked",
            ErrorKind::Store => "store",
            ErrorKind::NoStore => "no_store",
            ErrorKind::WorkerLost => "worker_lost",
            ErrorKind::Timeout => "timeout",
            ErrorKind::QueueFull => "queue_full",
            ErrorKind::Stopping => "stopping",
            ErrorKind::RunTimeout => "run_timeout",
        }
    }
}

/// A JSON response with `status` and the JSON text `body`.
pub(crate) fn json_text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A JSON response with `status` and `value` serialized.
pub(crate) fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => json_text(status, bytes),
        Err(e) => error(ErrorKind::Store, format!("cannot encode the answer: {e}")),
    }
}

/// An error answer not yet made into a response (small, for `Result`s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub kind: ErrorKind,
    pub message: String,
}

impl Refusal {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            message: message.into(),
        }
    }
}

impl From<Refusal> for Response<Body> {
    fn from(r: Refusal) -> Self {
        error(r.kind, r.message)
    }
}

/// The error response of `kind`.
pub(crate) fn error(kind: ErrorKind, message: impl Into<String>) -> Response<Body> {
    let body = serde_json::json!({
        "error": { "kind": kind.name(), "message": message.into() }
    });
    let mut r = json(kind.status(), &body);
    if kind == ErrorKind::Unauthorized {
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
    }
    r
}
