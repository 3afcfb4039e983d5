//! `/api/events`: a server-sent event stream.
//!
//! * `status`: what `/api/status` answers (each worker's state, CPU use and
//!   memory, the jobs' counters), once a second and within 250 ms of a
//!   change of the workers (one started, changed state or exited, the
//!   number wanted changed);
//! * `job`: each job outcome this watcher records from the moment the
//!   stream opened (`seq`, `id`, `queue`, `name`, `attempt`,
//!   `max_attempts`, `outcome`: done, retry, failed, cancelled or lost,
//!   `error`, `at_ms`).
//!
//! The dashboard loads the history once from `/api/samples` and extends it
//! from these. The stream ends when the client goes away or the watcher
//! stops.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::{Response, StatusCode};
use tokio::sync::mpsc;

use super::api;
use super::reply::{Body, State};
use crate::watcher::control;
use crate::watcher::event::Command;
use crate::watcher::sampler::EVERY;
use crate::watcher::status::{StatusReport, WorkerState};

/// Events buffered for a slow client before the stream waits for it.
const BUFFER: usize = 4;

/// How often the stream looks for changes.
const POLL: Duration = Duration::from_millis(250);

/// What counts as a change of the workers: each one's slot, pid and state,
/// the number wanted, and the slots waiting to respawn or given up.
#[derive(PartialEq, Eq)]
struct Shape(usize, Vec<(u32, u32, WorkerState)>, Vec<(u32, bool)>);

impl Shape {
    fn of(r: &StatusReport) -> Shape {
        Shape(
            r.wanted,
            r.workers.iter().map(|w| (w.slot, w.pid, w.state)).collect(),
            r.idle.iter().map(|s| (s.slot, s.gave_up)).collect(),
        )
    }
}

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
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<(tokio::time::Instant, Shape)> = None;
        let mut seen_seq: Option<u64> = None;
        loop {
            tick.tick().await;
            // The workers alone first (cheap); the whole status when they
            // changed or a second passed.
            let Some(report) = control::ask(&state.commands, Command::Status).await else {
                return;
            };
            let shape = Shape::of(&report);
            if last
                .as_ref()
                .is_some_and(|(at, before)| *before == shape && at.elapsed() < EVERY)
            {
                continue;
            }
            let Some(status) = api::status_value(&state).await else {
                return;
            };
            let recent = status["jobs"]["recent"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let newest = recent.iter().filter_map(|e| e["seq"].as_u64()).max();
            // Outcomes newer than the last one sent (none of those before
            // the stream opened).
            if let Some(seen) = seen_seq {
                for e in recent.iter().filter(|e| e["seq"].as_u64() > Some(seen)) {
                    if tx.send(event("job", e)).await.is_err() {
                        return;
                    }
                }
            }
            seen_seq = newest.or(seen_seq).or(Some(0));
            if tx.send(event("status", &status)).await.is_err() {
                return;
            }
            last = Some((tokio::time::Instant::now(), shape));
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
