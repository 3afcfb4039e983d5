//! Leaf: what the supervisor, the job server and the dispatcher's own
//! tasks tell the dispatcher ([`JobsEvent`]), and what it answers about
//! handlers ([`HandlersReport`]).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::calls::{Call, CallCounts};
use super::runner::ProcessDone;
use crate::error::Result;
use crate::ipc::message::JobFailure;
use crate::watcher::event::OutboundSender;
use crate::watcher::status::JobsStatus;

/// What the supervisor (and the dispatcher's own tasks) tell the dispatcher.
pub(crate) enum JobsEvent {
    /// A worker said `JobsReady`.
    WorkerJoined {
        context_id: u64,
        slot: u32,
        pid: u32,
        outbound: OutboundSender,
        accepting: Arc<AtomicBool>,
        handlers: Vec<String>,
        concurrency: u32,
    },
    /// A worker exited, or its channel closed (everything it sent was
    /// handled before).
    WorkerGone { context_id: u64, how: String },
    /// A worker finished a job.
    JobDone {
        context_id: u64,
        ticket: u64,
        result: std::result::Result<String, JobFailure>,
    },
    /// A part of the result of a job or call a worker runs (its `JobDone`
    /// follows with the last part).
    JobDonePart {
        context_id: u64,
        ticket: u64,
        part: String,
    },
    /// A per-job process ended.
    ProcessDone(ProcessDone),
    /// The counters, for `cluster status` and metrics: the dispatcher's report; with the store's counts per state when
    /// `counts` (a query over every job, run beside the loop).
    Status {
        reply: oneshot::Sender<JobsStatus>,
        counts: bool,
    },
    /// The watcher is stopping: claim nothing more, stop job processes
    /// (SIGTERM, SIGKILL after `timeout`).
    Stopping { timeout: Duration },
    /// Every worker has exited: record what is left, release the jobs
    /// never started, and answer.
    Shutdown(oneshot::Sender<()>),
    /// A claim the dispatcher started came back.
    Claimed {
        queue: String,
        limit: usize,
        result: Result<Vec<crate::jobs::Job>>,
    },
    /// A batch of outcomes the dispatcher started writing is written.
    Flushed(Result<crate::jobs::store::FinishReport>),
    /// This node had been declared dead (it missed its heartbeats): the
    /// store queued again the jobs it holds, so the buffered ones go.
    NodeLost,
    /// An in-memory call from the job server.
    Call(Call),
    /// The handlers the workers serve, for the job server.
    Handlers(oneshot::Sender<HandlersReport>),
}

/// What workers serve, for `GET /v1/handlers` and `GET /v1/health`.
#[derive(Debug, Clone, Default)]
pub(crate) struct HandlersReport {
    /// Each handler name with how many serving workers have it.
    pub handlers: Vec<(String, usize)>,
    /// Workers that said `JobsReady` (serving or stopping).
    pub workers: usize,
    /// Free tickets over every serving worker.
    pub capacity: usize,
    pub calls: CallCounts,
    pub stopping: bool,
}
