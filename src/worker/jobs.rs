//! Persistent job handlers in a worker: [`Cluster::jobs`](crate::Cluster::jobs).
//!
//! A worker registers handlers by name and runs [`Jobs::run`]; it tells the
//! watcher which handlers it has and how many jobs it runs at once, and the
//! watcher hands it jobs over its socketpair (never more than that many).
//! Each job runs as its own task on the caller's runtime: a handler that
//! returns an error or panics fails that attempt, not the worker. The
//! worker keeps its state between jobs (database connections, caches).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

use super::link::link;
use super::shared::{Shared, ToJobs};
use crate::error::{Error, Kind, Result};
use crate::ipc::env;
use crate::ipc::message::{JobFailure, JobOrder, ToWatcher, MAX_MESSAGE};
use crate::ipc::parts::{split, PART};
use crate::jobs::JobId;

type Outcome = std::result::Result<String, JobFailure>;
type BoxFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;
type Handler = Arc<dyn Fn(String, JobContext) -> BoxFuture + Send + Sync>;

/// Why a job handler failed. Any error type converts into it with `?`;
/// its text is what `cluster jobs show` lists for the attempt.
///
/// ```
/// use cluster::JobError;
/// fn check(n: u64) -> Result<u64, JobError> {
///     if n == 0 {
///         return Err(JobError::new("n must not be 0"));
///     }
///     let parsed: u64 = "42".parse()?; // a ParseIntError becomes a JobError
///     Ok(parsed / n)
/// }
/// assert!(check(0).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    message: String,
}

impl JobError {
    /// An error with `message`.
    pub fn new(message: impl fmt::Display) -> JobError {
        JobError {
            message: message.to_string(),
        }
    }

    /// The error's text.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error> From<E> for JobError {
    fn from(e: E) -> JobError {
        JobError::new(e)
    }
}

/// What a handler knows about the job it runs.
///
/// ```no_run
/// # async fn run() -> Result<(), cluster::Error> {
/// cluster::Cluster::jobs()
///     .handle_with_context("resize", |args: serde_json::Value, ctx: cluster::JobContext| async move {
///         println!("job {:?} attempt {}", ctx.id(), ctx.attempt());
///         Ok::<_, cluster::JobError>(args)
///     })
///     .run()
///     .await
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobContext {
    id: Option<JobId>,
    attempt: u32,
    name: String,
    queue: String,
    pool: String,
    node: String,
}

impl JobContext {
    /// The stored job's id (`None` for a call that is not stored).
    pub fn id(&self) -> Option<JobId> {
        self.id
    }

    /// Which attempt this is, from 1 (0 for a call that is not stored).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The handler's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The job's queue.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The pool that runs it.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// The watcher (node) that runs it.
    pub fn node(&self) -> &str {
        &self.node
    }
}

/// A worker's job handlers; see [`Cluster::jobs`](crate::Cluster::jobs).
///
/// ```no_run
/// use cluster::{Cluster, JobError};
///
/// #[derive(serde::Deserialize)]
/// struct Resize { path: String, width: u32 }
///
/// # async fn run() -> Result<(), cluster::Error> {
/// Cluster::jobs()
///     .handle("resize", |args: Resize| async move {
///         // ... resize args.path to args.width ...
///         Ok::<_, JobError>(serde_json::json!({ "path": args.path, "width": args.width }))
///     })
///     .handle("echo", |args: serde_json::Value| async move { Ok::<_, JobError>(args) })
///     .run()
///     .await
/// # }
/// ```
pub struct Jobs {
    handlers: HashMap<String, Handler>,
    concurrency: Option<u32>,
}

impl fmt::Debug for Jobs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.handlers.keys().collect();
        names.sort();
        f.debug_struct("Jobs")
            .field("handlers", &names)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into()),
        Err(e) => e.to_string(),
    }
}

impl Jobs {
    pub(crate) fn new() -> Jobs {
        Jobs {
            handlers: HashMap::new(),
            concurrency: None,
        }
    }

    /// Registers `f` for jobs named `name`: it gets the job's arguments
    /// deserialized as `A` (JSON), and its `Ok` value is the job's result
    /// (serialized as JSON).
    pub fn handle<A, R, F, Fut>(self, name: &str, f: F) -> Self
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, JobError>> + Send + 'static,
    {
        self.handle_with_context(name, move |args: A, _ctx: JobContext| f(args))
    }

    /// Like [`handle`](Self::handle), with the job's [`JobContext`] (id,
    /// attempt, queue, pool, node).
    pub fn handle_with_context<A, R, F, Fut>(mut self, name: &str, f: F) -> Self
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + 'static,
        F: Fn(A, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, JobError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let handler: Handler = Arc::new(move |args: String, ctx: JobContext| {
            let f = f.clone();
            Box::pin(async move {
                let args: A = serde_json::from_str(&args)
                    .map_err(|e| JobFailure::BadArgs(format!("bad arguments: {e}")))?;
                let out = f(args, ctx)
                    .await
                    .map_err(|e| JobFailure::Failed(e.message))?;
                serde_json::to_string(&out)
                    .map_err(|e| JobFailure::Failed(format!("cannot encode the result: {e}")))
            })
        });
        self.handlers.insert(name.to_string(), handler);
        self
    }

    /// How many jobs this worker runs at once (default: the watcher's
    /// `--job-concurrency`, else 1).
    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = Some(n.max(1));
        self
    }

    /// Tells the watcher which jobs this worker runs, marks it ready, and
    /// runs the jobs the watcher hands it until it is asked to stop; then
    /// lets running jobs finish (up to the watcher's shutdown timeout) and
    /// returns. Standalone (no watcher) it just waits for a termination
    /// signal: no job can arrive.
    ///
    /// # Errors
    ///
    /// [`Error::is_config`] when another `run` is already serving jobs in
    /// this process; [`Error::is_ipc`] when the watcher cannot be told.
    pub async fn run(self) -> Result<()> {
        let Some(link) = link() else {
            tracing::warn!("not running under a cluster watcher: no job will arrive");
            crate::signal::termination().await;
            return Ok(());
        };
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut slot = link
                .jobs
                .lock()
                .map_err(|_| Error::new(Kind::Ipc, "worker state poisoned"))?;
            if slot.is_some() {
                return Err(Error::new(
                    Kind::Config,
                    "Cluster::jobs().run() is already serving jobs in this process",
                ));
            }
            *slot = Some(tx);
        }
        let concurrency = self.concurrency.unwrap_or_else(|| {
            std::env::var(env::JOB_CONCURRENCY)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1)
                .max(1)
        });
        let mut handlers: Vec<String> = self.handlers.keys().cloned().collect();
        handlers.sort();
        link.send(ToWatcher::JobsReady {
            handlers,
            concurrency,
        })?;
        super::termination::ready(link);
        let served = serve(link.clone(), self.handlers, rx).await;
        if let Ok(mut slot) = link.jobs.lock() {
            *slot = None;
        }
        served
    }
}

/// Runs jobs until the worker is asked to stop, then drains.
async fn serve(
    link: Arc<Shared>,
    handlers: HashMap<String, Handler>,
    mut rx: mpsc::UnboundedReceiver<ToJobs>,
) -> Result<()> {
    let stopped = super::termination::serve_until_stopped(link.clone());
    tokio::pin!(stopped);
    let report = |ticket: u64, result: Outcome| {
        // A large result goes in parts, the last one in the `JobDone`.
        let result = match fit(result) {
            Ok(json) if json.len() > PART => {
                let parts = split(&json);
                let (last, head) = parts.split_last().expect("one part at least");
                for part in head {
                    let part = part.to_string();
                    let _ = link.send(ToWatcher::JobDonePart { ticket, part });
                }
                Ok(last.to_string())
            }
            other => other,
        };
        let _ = link.send(ToWatcher::JobDone { ticket, result });
    };
    let mut jobs = Running {
        handlers: &handlers,
        tasks: JoinSet::new(),
        running: HashMap::new(),
        aborts: HashMap::new(),
    };
    loop {
        tokio::select! {
            () = &mut stopped => break,
            msg = rx.recv() => match msg {
                Some(msg) => jobs.take(msg, &report),
                None => break,
            },
            Some(done) = jobs.tasks.join_next_with_id(), if !jobs.tasks.is_empty() => {
                let (ticket, result) = finished(done, &mut jobs.running);
                jobs.aborts.remove(&ticket);
                report(ticket, result);
            }
        }
    }
    // Asked to stop: the watcher hands us nothing more, but what it sent
    // before it saw the stop may still be on its way: those run too, with
    // what runs, within the shutdown timeout (the watcher kills us after
    // it). An order the watcher sent is never dropped unanswered while
    // this worker lives.
    let grace = std::env::var(env::SHUTDOWN_TIMEOUT_MS)
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(10));
    let drain = async {
        loop {
            while let Ok(msg) = rx.try_recv() {
                jobs.take(msg, &report);
            }
            if jobs.tasks.is_empty() {
                // A last look for orders still in flight from the watcher.
                match tokio::time::timeout(LATE_ORDERS, rx.recv()).await {
                    Ok(Some(msg)) => {
                        jobs.take(msg, &report);
                        continue;
                    }
                    _ => break,
                }
            }
            tokio::select! {
                msg = rx.recv() => if let Some(msg) = msg { jobs.take(msg, &report) },
                Some(done) = jobs.tasks.join_next_with_id() => {
                    let (ticket, result) = finished(done, &mut jobs.running);
                    jobs.aborts.remove(&ticket);
                    report(ticket, result);
                }
            }
        }
    };
    if tokio::time::timeout(grace, drain).await.is_err() {
        jobs.tasks.abort_all();
    }
    Ok(())
}

/// How long a stopping worker with nothing left to run still waits for
/// orders the watcher sent before it saw the stop.
const LATE_ORDERS: Duration = Duration::from_millis(50);

/// The jobs a worker runs.
struct Running<'a> {
    handlers: &'a HashMap<String, Handler>,
    tasks: JoinSet<Outcome>,
    running: HashMap<tokio::task::Id, u64>,
    aborts: HashMap<u64, AbortHandle>,
}

impl Running<'_> {
    /// Starts an order, or cancels a running one.
    fn take(&mut self, msg: ToJobs, report: &impl Fn(u64, Outcome)) {
        match msg {
            ToJobs::Run(order) => {
                let ticket = order.ticket;
                let Some(handler) = self.handlers.get(&order.name).cloned() else {
                    report(
                        ticket,
                        Err(JobFailure::NoHandler(format!(
                            "no handler named {:?} in this worker",
                            order.name
                        ))),
                    );
                    return;
                };
                let JobOrder {
                    job,
                    name,
                    args,
                    queue,
                    pool,
                    node,
                    ..
                } = order;
                let ctx = JobContext {
                    id: job.map(|(id, _)| JobId::new(id)),
                    attempt: job.map(|(_, a)| a).unwrap_or(0),
                    name,
                    queue,
                    pool,
                    node,
                };
                let abort = self.tasks.spawn(handler(args, ctx));
                self.running.insert(abort.id(), ticket);
                self.aborts.insert(ticket, abort);
            }
            ToJobs::Cancel(ticket) => {
                if let Some(abort) = self.aborts.get(&ticket) {
                    abort.abort();
                }
            }
        }
    }
}

/// Room in one message for a job's outcome besides its text.
const OUTCOME_OVERHEAD: usize = 64;

/// The largest result a handler may return (the watcher takes no more).
const MAX_RESULT: usize = 16 * 1024 * 1024;

/// An outcome the watcher takes: a result too large fails the job
/// (instead of breaking the channel), an error text too long for one
/// message is cut.
fn fit(result: Outcome) -> Outcome {
    let room = MAX_MESSAGE - OUTCOME_OVERHEAD;
    match result {
        Ok(json) if json.len() > MAX_RESULT => Err(JobFailure::Failed(format!(
            "the result is {} bytes of JSON; the watcher takes at most {MAX_RESULT}",
            json.len()
        ))),
        Err(JobFailure::Failed(m)) => Err(JobFailure::Failed(cut(m, room))),
        Err(JobFailure::Panicked(m)) => Err(JobFailure::Panicked(cut(m, room))),
        Err(JobFailure::BadArgs(m)) => Err(JobFailure::BadArgs(cut(m, room))),
        Err(JobFailure::NoHandler(m)) => Err(JobFailure::NoHandler(cut(m, room))),
        other => other,
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max.saturating_sub(3);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// The ticket and outcome of a finished job task.
fn finished(
    done: std::result::Result<(tokio::task::Id, Outcome), tokio::task::JoinError>,
    running: &mut HashMap<tokio::task::Id, u64>,
) -> (u64, Outcome) {
    match done {
        Ok((id, result)) => (running.remove(&id).unwrap_or(0), result),
        Err(e) => {
            let ticket = running.remove(&e.id()).unwrap_or(0);
            let failure = if e.is_cancelled() {
                JobFailure::Cancelled
            } else {
                JobFailure::Panicked(format!("the handler panicked: {}", panic_text(e)))
            };
            (ticket, Err(failure))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_cut_to_fit_one_message() {
        assert_eq!(fit(Ok("1".into())), Ok("1".into()));
        let large = format!("\"{}\"", "x".repeat(MAX_MESSAGE));
        assert_eq!(fit(Ok(large.clone())), Ok(large), "sent in parts");
        let big = format!("\"{}\"", "x".repeat(MAX_RESULT));
        assert!(matches!(fit(Ok(big)), Err(JobFailure::Failed(m)) if m.contains("bytes of JSON")));
        let long = "é".repeat(MAX_MESSAGE);
        match fit(Err(JobFailure::Failed(long))) {
            Err(JobFailure::Failed(m)) => {
                assert!(m.len() <= MAX_MESSAGE - OUTCOME_OVERHEAD && m.ends_with("..."))
            }
            other => panic!("{other:?}"),
        }
    }
}
