//! Leaf of the HTTP server: the response body type, what the handlers
//! share ([`State`]) and the whole, JSON and error responses, used by the
//! server (`mod.rs`), the API and the event stream.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{Response, StatusCode};

use crate::jobs::store::Store;
use crate::watcher::event::CommandSender;
use crate::watcher::sampler::Sampler;

/// A response body: whole, or a stream (the event stream).
pub(crate) type Body = BoxBody<Bytes, std::convert::Infallible>;

/// What the handlers need.
pub(crate) struct State {
    pub commands: CommandSender,
    pub sampler: Sampler,
    pub store: Option<Arc<dyn Store>>,
    pub token: Option<String>,
    /// `--metrics`: serve `/metrics` only.
    pub metrics_only: bool,
}

/// A whole response.
pub(crate) fn full(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

/// A JSON response.
pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    full(status, "application/json", value.to_string())
}

/// A JSON error object: `{"error": {"kind": ..., "message": ...}}`.
pub(crate) fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response<Body> {
    json(
        status,
        &serde_json::json!({"error": {"kind": kind, "message": message.into()}}),
    )
}
