//! Commands with replies between the watcher and its workers, and between
//! workers (routed by the watcher): handlers registered by name
//! ([`Commands`]), calls to a [`Target`] ([`CommandCall`]) answered with a
//! [`Reply`], and distinct errors for an unknown target, an unknown
//! command, a timeout, a target that died and a handler that failed.
//!
//! The same types serve workers ([`Cluster::commands`](crate::Cluster::commands),
//! [`Cluster::command`](crate::Cluster::command)) and the watcher
//! ([`ClusterWatcher::commands`](crate::ClusterWatcher::commands),
//! [`ClusterWatcher::command`](crate::ClusterWatcher::command)); the
//! routing table is `router.rs`, run by the hub in the watcher.

pub(crate) mod handlers;
pub(crate) mod router;

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::oneshot;

use crate::error::{Error, Kind, Result};
use crate::ipc::message::{Answer, RequestBody, TargetSpec, MAX_VALUE};
use crate::transport::{self, Replier, Transport};
use handlers::Handlers;

/// How long a command waits for its reply unless told otherwise.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest timeout a command may have.
pub(crate) const MAX_COMMAND_TIMEOUT: Duration = Duration::from_secs(3600);

/// Where a command goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Target {
    /// The watcher's own handlers (and its built-in `ping` and `status`).
    Watcher,
    /// The worker serving slot N (`1..=N`).
    Slot(u32),
    /// The worker with this name (`--name`, `--names`).
    Name(String),
    /// Every worker: one answer each.
    All,
}

impl Target {
    /// `watcher`, `all`, a slot number, or a worker name.
    pub fn parse(s: &str) -> Target {
        match s {
            "watcher" => Target::Watcher,
            "all" => Target::All,
            _ => match s.parse::<u32>() {
                Ok(n) => Target::Slot(n),
                Err(_) => Target::Name(s.to_string()),
            },
        }
    }

    pub(crate) fn spec(&self) -> TargetSpec {
        match self {
            Target::Watcher => TargetSpec::Watcher,
            Target::Slot(n) => TargetSpec::Slot(*n),
            Target::Name(n) => TargetSpec::Name(n.clone()),
            Target::All => TargetSpec::All,
        }
    }
}

impl From<u32> for Target {
    fn from(slot: u32) -> Target {
        Target::Slot(slot)
    }
}

impl From<&str> for Target {
    fn from(s: &str) -> Target {
        Target::parse(s)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Watcher => f.write_str("watcher"),
            Target::Slot(n) => write!(f, "slot {n}"),
            Target::Name(n) => write!(f, "worker {n:?}"),
            Target::All => f.write_str("all workers"),
        }
    }
}

/// Who answered a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Responder {
    slot: u32,
    name: Option<String>,
    pid: u32,
    context_id: u64,
}

impl Responder {
    /// The worker's slot; 0 for the watcher.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The worker's name (`watcher` for the watcher), if it has one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The worker's context id; 0 for the watcher.
    pub fn context_id(&self) -> u64 {
        self.context_id
    }

    /// Whether the watcher answered.
    pub fn is_watcher(&self) -> bool {
        self.slot == 0
    }
}

/// One process's answer.
#[derive(Debug, Clone)]
pub struct Response {
    from: Responder,
    result: Result<String>,
}

impl Response {
    fn from_wire(a: Answer) -> Response {
        Response {
            from: Responder {
                slot: a.from.slot,
                name: a.from.name,
                pid: a.from.pid,
                context_id: a.from.context_id,
            },
            result: a.result.map_err(transport::to_error),
        }
    }

    /// Who answered.
    pub fn from(&self) -> &Responder {
        &self.from
    }

    /// The result as JSON text, or the error (handler error, unknown
    /// command, timeout, target died).
    pub fn json(&self) -> Result<&str> {
        self.result.as_deref().map_err(Error::clone)
    }

    /// The result as a `T`.
    ///
    /// # Errors
    ///
    /// The response's error, or [`Error::is_handler_error`] when the
    /// result is not a `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        let text = self.json()?;
        serde_json::from_str(text).map_err(|e| {
            Error::with_cause(
                Kind::Handler,
                format!("the reply is not a {}", std::any::type_name::<T>()),
                e,
            )
        })
    }
}

/// The answer to a command: one [`Response`] for a single target (then
/// always a success: errors are returned as the call's `Err`), one per
/// worker for [`Target::All`] (each with its own result or error).
#[derive(Debug, Clone)]
pub struct Reply {
    responses: Vec<Response>,
}

impl Reply {
    /// The (first) responder.
    pub fn from(&self) -> Option<&Responder> {
        self.responses.first().map(|r| &r.from)
    }

    /// The (first) response's result as a `T`.
    ///
    /// # Errors
    ///
    /// As [`Response::decode`]; [`Error::is_unknown_target`] for an empty
    /// reply.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        match self.responses.first() {
            Some(r) => r.decode(),
            None => Err(Error::new(Kind::UnknownTarget, "no process answered")),
        }
    }

    /// Every response, by slot (the watcher's first).
    pub fn responses(&self) -> &[Response] {
        &self.responses
    }

    /// Every response, by slot.
    pub fn into_responses(self) -> Vec<Response> {
        self.responses
    }
}

/// A command not sent yet: set a [`timeout`](CommandCall::timeout), then
/// await it for the [`Reply`].
#[must_use = "a command does nothing until awaited"]
pub struct CommandCall {
    transport: Arc<dyn Transport>,
    target: Target,
    name: String,
    args: Result<String>,
    timeout: Duration,
}

impl fmt::Debug for CommandCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandCall")
            .field("target", &self.target)
            .field("name", &self.name)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl CommandCall {
    pub(crate) fn new<A: Serialize + ?Sized>(
        transport: Arc<dyn Transport>,
        target: Target,
        name: &str,
        args: &A,
    ) -> CommandCall {
        let args = serde_json::to_string(args)
            .map_err(|e| Error::with_cause(Kind::Handler, "cannot encode the arguments", e))
            .and_then(|text| {
                if text.len() > MAX_VALUE {
                    Err(Error::new(
                        Kind::TooLarge,
                        format!(
                            "arguments of {} bytes exceed the limit of {MAX_VALUE} bytes",
                            text.len()
                        ),
                    ))
                } else {
                    Ok(text)
                }
            });
        CommandCall {
            transport,
            target,
            name: name.to_string(),
            args,
            timeout: DEFAULT_COMMAND_TIMEOUT,
        }
    }

    /// How long to wait for the reply (default 10 s, at most an hour).
    /// For [`Target::All`], each worker that has not answered by then
    /// gets a timeout response.
    pub fn timeout(mut self, timeout: Duration) -> CommandCall {
        self.timeout = timeout.min(MAX_COMMAND_TIMEOUT);
        self
    }
}

impl IntoFuture for CommandCall {
    type Output = Result<Reply>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Reply>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            let body = RequestBody::Call {
                target: self.target.spec(),
                name: self.name.clone(),
                args: self.args?,
                timeout_ms: self.timeout.as_millis() as u64,
            };
            self.transport.submit(body, Replier::Answers(tx));
            // The watcher answers with a timeout itself; this is the
            // backstop for a watcher that cannot.
            let backstop = self.timeout + Duration::from_secs(2);
            let answers = match tokio::time::timeout(backstop, transport::answer(rx)).await {
                Ok(answers) => answers?,
                Err(_) => {
                    return Err(Error::new(
                        Kind::Timeout,
                        format!("no reply to {:?} from {} in time", self.name, self.target),
                    ))
                }
            };
            let mut responses: Vec<Response> =
                answers.into_iter().map(Response::from_wire).collect();
            responses.sort_by_key(|r| (r.from.slot, r.from.context_id));
            if self.target != Target::All {
                if let Some(Err(e)) = responses.first().map(|r| &r.result) {
                    return Err(e.clone());
                }
            }
            Ok(Reply { responses })
        })
    }
}

/// The command handlers of this process; see
/// [`Cluster::commands`](crate::Cluster::commands).
#[derive(Clone)]
pub struct Commands {
    handlers: Arc<Handlers>,
}

impl fmt::Debug for Commands {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Commands").finish_non_exhaustive()
    }
}

impl Commands {
    pub(crate) fn new(handlers: Arc<Handlers>) -> Commands {
        Commands { handlers }
    }

    /// Registers `handler` for commands named `name` (replacing one
    /// registered before, also a built-in `ping` or `status`). It takes
    /// the arguments as an `A` and returns `Ok(R)` (the reply) or `Err(E)`
    /// (the caller gets [`Error::is_handler_error`] with its text).
    ///
    /// The handler runs as its own task on the runtime that registered it
    /// (register from within your runtime); a handler that panics fails
    /// that command only. Register before the worker is ready: commands
    /// that arrive earlier wait for it.
    ///
    /// ```no_run
    /// # fn run() {
    /// cluster::Cluster::commands().register("add", |(a, b): (i64, i64)| async move {
    ///     Ok::<_, String>(a + b)
    /// });
    /// # }
    /// ```
    pub fn register<A, R, E, F, Fut>(&self, name: &str, handler: F) -> &Commands
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize,
        E: fmt::Display,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.handlers.insert(
            name,
            Arc::new(move |args: String| {
                let parsed = serde_json::from_str::<A>(&args);
                let handler = handler.clone();
                Box::pin(async move {
                    let a = parsed.map_err(|e| format!("bad arguments: {e}"))?;
                    match handler(a).await {
                        Ok(r) => serde_json::to_string(&r)
                            .map_err(|e| format!("cannot encode the reply: {e}")),
                        Err(e) => Err(e.to_string()),
                    }
                })
            }),
        );
        self
    }

    /// Removes the handler for `name`; whether there was one.
    pub fn unregister(&self, name: &str) -> bool {
        self.handlers.remove(name)
    }
}
