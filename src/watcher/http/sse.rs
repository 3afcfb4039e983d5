//! `/api/events`: a server-sent event stream. Once a second it sends a
//! `status` event (what `/api/status` answers: each worker's state, CPU
//! use and memory, and the jobs' counters); the dashboard loads the history
//! once from `/api/samples` and extends it from these. The stream ends when
//! the client goes away or the watcher stops.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::{Response, StatusCode};
use tokio::sync::mpsc;

use super::{api, Body, State};
use crate::watcher::sampler::EVERY;

/// Events buffered for a slow client before the stream waits for it.
const BUFFER: usize = 4;

/// A body that yields what a channel receives.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// One event in the text/event-stream format (`data` is one JSON line).
fn event(name: &str, data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

pub(super) fn events(state: &std::sync::Arc<State>) -> Response<Body> {
    let (tx, rx) = mpsc::channel(BUFFER);
    let state = state.clone();
    tokio::spawn(async move {
        // A comment first, so the client sees the stream open at once.
        if tx.send(Bytes::from_static(b": cluster\n\n")).await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(status) = api::status_value(&state).await else {
                return;
            };
            if tx.send(event("status", &status)).await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(ChannelBody(rx).boxed());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}
