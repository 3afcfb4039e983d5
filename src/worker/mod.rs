//! The worker side: the [`Cluster`] facade.
//!
//! Inside a worker started by the watcher, the first call into `Cluster`
//! connects to the watcher: it takes the inherited socketpair end named by
//! `CLUSTER_IPC_FD` and starts a small background thread (`cluster-ipc`)
//! with its own single-threaded runtime that owns the channel. User code
//! talks to that thread through channels, so the API works from any runtime
//! and the watcher's messages are handled even while user code is busy.
//!
//! Without a watcher (standalone), the same calls bind locally and wait for
//! signals, so one program runs with and without `cluster`.

mod dispatch;
mod endpoint;
mod hub_link;
mod ipc_thread;
mod jobs;
mod link;
mod shared;
mod status;
mod termination;

pub use jobs::{JobContext, JobError, Jobs};
pub use status::{Status, MAX_STATUS_LEN};

use serde::{de::DeserializeOwned, Serialize};

use crate::activation;
use crate::error::{Error, Kind, Result};
use crate::ipc::codec::{decode_user, encode_user};
use crate::ipc::message::ToWatcher;
use crate::listener::Listener;
use crate::log::ClusterLogLayer;
use crate::signal;
use crate::socket::{Address, DEFAULT_BACKLOG};
use link::link;
use shared::{Granted, Shared};
use termination::serve_until_stopped;

/// Entry point of the worker API. All functions are associated functions:
/// there is one cluster connection per process.
///
/// ```no_run
/// # async fn run() -> Result<(), cluster::Error> {
/// use cluster::Cluster;
///
/// let listener = Cluster::server_socket_factory().listen("127.0.0.1:8080").await?;
/// tokio::spawn(async move {
///     while let Ok((stream, _peer)) = listener.accept().await {
///         // serve `stream` ...
/// #       drop(stream);
///     }
/// });
/// Cluster::await_termination().await; // ready; returns when asked to stop
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Cluster {
    _private: (),
}

impl Cluster {
    /// Whether this process is a worker started by a `cluster` watcher.
    pub fn is_worker() -> bool {
        link().is_some()
    }

    /// The context id of this worker: unique per spawn, so a respawned
    /// worker in the same slot gets a new one. `None` when standalone.
    pub fn context_id() -> Option<u64> {
        link().map(|l| l.context_id)
    }

    /// The worker's slot, `1..=N`, stable across respawns of that slot.
    /// `None` when standalone.
    pub fn slot() -> Option<u32> {
        link().map(|l| l.slot)
    }

    /// The factory that hands out listening sockets: from the watcher in a
    /// worker, bound locally when standalone.
    pub fn server_socket_factory() -> ServerSocketFactory {
        ServerSocketFactory { _private: () }
    }

    /// A `tracing_subscriber` layer that forwards events (level, target,
    /// message, typed fields, span names, timestamp) to the watcher, which
    /// writes them to its log stream tagged with this worker's slot and
    /// pid. Standalone, it writes the same lines to stderr.
    ///
    /// It filters with the watcher's `--log-level` (an `EnvFilter`,
    /// span and field directives included; standalone: `RUST_LOG`, else
    /// `info`) before anything is built or queued, so filtered events cost
    /// next to nothing.
    ///
    /// Forwarding never blocks: events go through a bounded queue (16,384
    /// records); when it is full they are dropped and counted, and the
    /// watcher logs how many.
    ///
    /// ```no_run
    /// use tracing_subscriber::prelude::*;
    /// tracing_subscriber::registry().with(cluster::Cluster::log_layer()).init();
    /// tracing::info!(user = "ann", "logged in");
    /// ```
    pub fn log_layer() -> ClusterLogLayer {
        match link() {
            Some(l) => ClusterLogLayer::new(Some(&l.logs), &l.log_filter),
            None => ClusterLogLayer::new(None, &standalone_filter()),
        }
    }

    /// A `slog::Drain` that forwards records (level, module or tag, message,
    /// key-value pairs) to the watcher like [`log_layer`](Cluster::log_layer)
    /// does; standalone it writes to stderr. Requires the `slog` feature.
    ///
    /// ```no_run
    /// # #[cfg(feature = "slog")] {
    /// let log = slog::Logger::root(cluster::Cluster::slog_drain(), slog::o!("app" => "demo"));
    /// slog::info!(log, "logged in"; "user" => "ann");
    /// # }
    /// ```
    #[cfg(feature = "slog")]
    pub fn slog_drain() -> crate::log::ClusterSlogDrain {
        match link() {
            Some(l) => crate::log::ClusterSlogDrain::new(Some(&l.logs), l.log_filter.clone()),
            None => crate::log::ClusterSlogDrain::new(None, standalone_filter()),
        }
    }

    /// A typed channel to the watcher: [`send`](MessageChannel::send)
    /// messages to it and [`recv`](MessageChannel::recv) what it sends
    /// (`ClusterWatcher::send`, `broadcast`, or a reply). Every channel of
    /// one process shares one inbox: call it once and keep it.
    ///
    /// # Errors
    ///
    /// [`Error::is_ipc`] when the process is not a worker (standalone).
    pub fn channel<T: Serialize + DeserializeOwned>() -> Result<MessageChannel<T>> {
        match link() {
            Some(link) => Ok(MessageChannel {
                link: link.as_ref(),
                _type: std::marker::PhantomData,
            }),
            None => Err(Error::new(
                Kind::Ipc,
                "not running under a cluster watcher: there is no one to send messages to",
            )),
        }
    }

    /// Job handlers for this worker: register them by name with
    /// [`Jobs::handle`], then [`Jobs::run`]. The watcher (run with
    /// `--jobs`) hands this worker jobs of its pool's queues, at most
    /// [`Jobs::concurrency`] at once; a worker may serve HTTP and jobs at
    /// once (spawn `run`).
    pub fn jobs() -> Jobs {
        Jobs::new()
    }

    /// The worker's name: `NAME-<slot>` with `--name NAME`, its own with
    /// `--names a,b,c`; `None` without either, and standalone.
    pub fn name() -> Option<String> {
        link().and_then(|l| l.name.clone())
    }

    /// Tells the watcher what this worker is doing: `idle`, `processing`,
    /// `stopping` or a short text (at most 64 bytes). `cluster status`
    /// shows it; `cluster stop --slot` stops an `idle` worker at once and
    /// gives any other its timeout. Never blocks.
    ///
    /// ```no_run
    /// use cluster::{Cluster, Status};
    /// Cluster::set_status(Status::Processing)?;
    /// Cluster::set_status("warming the cache")?;
    /// # Ok::<(), cluster::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::is_config`] for an empty text, one over 64 bytes or with
    /// control characters (nothing is sent).
    pub fn set_status(status: impl Into<Status>) -> Result<()> {
        let status = status.into().checked()?;
        if let Some(link) = link() {
            let text = status.as_str().to_string();
            if let Ok(mut s) = link.status.lock() {
                *s = Some(text.clone());
            }
            let _ = link.send(ToWatcher::SetStatus(text));
        }
        Ok(())
    }

    /// The shared storage held by the watcher: JSON values by dot path,
    /// atomic increments and compare-and-swap, versions, expiry, watches.
    /// It survives this worker's crashes and rolling restarts. Standalone,
    /// a storage of this process's own.
    pub fn storage() -> crate::Storage {
        crate::Storage::new(endpoint::transport())
    }

    /// This worker's command handlers: [`register`](crate::Commands::register)
    /// them (before the worker is ready), and the watcher or other workers
    /// can call them. Built in: `ping` (answers `"pong"`) and `status`
    /// (slot, name, pid, context id and status).
    pub fn commands() -> crate::Commands {
        crate::Commands::new(endpoint::handlers())
    }

    /// Sends command `name` with `args` to `target`: the watcher
    /// ([`Target::Watcher`](crate::Target::Watcher)), a slot (`3`), a
    /// worker name (`"web-2"`) or every worker
    /// ([`Target::All`](crate::Target::All)); the watcher routes it.
    /// Await it (after an optional [`timeout`](crate::CommandCall::timeout),
    /// default 10 s) for the [`Reply`](crate::Reply).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), cluster::Error> {
    /// use std::time::Duration;
    /// use cluster::{Cluster, Target};
    ///
    /// let reply = Cluster::command("web-2", "whoami", &()).timeout(Duration::from_secs(1)).await?;
    /// let who: serde_json::Value = reply.decode()?;
    /// for r in Cluster::command(Target::All, "ping", &()).await?.responses() {
    ///     println!("slot {}: {:?}", r.from().slot(), r.json());
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// For one target: [`Error::is_unknown_target`], [`Error::is_unknown_command`],
    /// [`Error::is_timeout`], [`Error::is_target_died`] (it exited before
    /// answering), [`Error::is_handler_error`] (its handler failed);
    /// [`Error::is_busy`] past 1,024 commands in flight. For all workers
    /// each response carries its own error.
    pub fn command<A: Serialize + ?Sized>(
        target: impl Into<crate::Target>,
        name: &str,
        args: &A,
    ) -> crate::CommandCall {
        crate::CommandCall::new(endpoint::transport(), target.into(), name, args)
    }

    /// Tells the watcher that this worker is ready to serve. Idempotent;
    /// a no-op when standalone. [`await_termination`](Cluster::await_termination)
    /// calls it too, so most programs never need to.
    pub fn ready() {
        if let Some(link) = link() {
            termination::ready(link);
        }
    }

    /// Marks the worker ready, then waits until it should stop: the watcher
    /// asked it to (graceful stop or restart), the watcher went away, or the
    /// process received SIGTERM, SIGINT, SIGQUIT or SIGHUP.
    ///
    /// Standalone, only the signals end the wait.
    pub async fn await_termination() {
        Self::ready();
        match link() {
            Some(link) => serve_until_stopped(link.clone()).await,
            None => {
                signal::termination().await;
            }
        }
    }
}

/// The log filter of a process without a watcher: `RUST_LOG`, else `info`.
fn standalone_filter() -> crate::log::LogFilter {
    std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| crate::log::LogFilter::parse(&s).ok())
        .unwrap_or_default()
}

/// A typed channel between a worker and its watcher; see [`Cluster::channel`].
///
/// ```no_run
/// # async fn run() -> Result<(), cluster::Error> {
/// let chan = cluster::Cluster::channel::<String>()?;
/// chan.send(&"hello".to_string())?;
/// let reply: String = chan.recv().await?;
/// # drop(reply);
/// # Ok(()) }
/// ```
pub struct MessageChannel<T> {
    link: &'static Shared,
    _type: std::marker::PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for MessageChannel<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageChannel")
            .field("context_id", &self.link.context_id)
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned> MessageChannel<T> {
    /// Sends `msg` to the watcher. Never blocks; messages keep their order.
    ///
    /// # Errors
    ///
    /// [`Error::is_too_large`] when the encoded message exceeds
    /// [`MAX_MESSAGE_SIZE`](crate::MAX_MESSAGE_SIZE) (nothing is sent); [`Error::is_ipc`] when the
    /// watcher is gone.
    pub fn send(&self, msg: &T) -> Result<()> {
        let bytes = encode_user(msg)?;
        self.link.send(ToWatcher::Data(bytes))
    }

    /// Waits for the next message from the watcher.
    ///
    /// # Errors
    ///
    /// [`Error::is_ipc`] when the watcher is gone, or when a message is not
    /// a `T` (that message is consumed).
    pub async fn recv(&self) -> Result<T> {
        let bytes = self
            .link
            .inbox
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| Error::new(Kind::Ipc, "the connection to the watcher is closed"))?;
        decode_user(&bytes)
    }
}

/// Hands out listening sockets; get one with [`Cluster::server_socket_factory`].
///
/// ```no_run
/// # async fn run() -> Result<(), cluster::Error> {
/// let factory = cluster::Cluster::server_socket_factory();
/// let http = factory.listen("127.0.0.1:8080").await?;
/// let admin = factory.listen("unix:///tmp/admin.sock").await?;
/// # drop((http, admin));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ServerSocketFactory {
    _private: (),
}

impl ServerSocketFactory {
    /// Returns a listener for `addr`: `host:port`, `tcp://host:port`,
    /// `:port` (all interfaces) or `unix:///path`.
    ///
    /// In a worker, the watcher binds the address once and every worker that
    /// asks gets the same socket (one shared accept queue); port 0 gives every
    /// worker the same ephemeral port. Standalone, the address is bound here,
    /// with the same options (`SO_REUSEADDR`, a backlog of
    /// [`DEFAULT_BACKLOG`](crate::DEFAULT_BACKLOG)).
    ///
    /// Either way, a socket this process inherited through socket
    /// activation (`LISTEN_PID` is this process: the watcher's `--listen`,
    /// or systemd) that is bound to a matching address is used instead:
    /// the same address, a wildcard of either family on the same port, or
    /// the same Unix socket.
    ///
    /// Must be called within a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::is_invalid_address`] for an unparsable address,
    /// [`Error::is_bind`] when the address cannot be bound (in use, not
    /// permitted), [`Error::is_ipc`] when the watcher cannot be reached.
    pub async fn listen(&self, addr: &str) -> Result<Listener> {
        let parsed = Address::parse(addr);
        let inherited = parsed.as_ref().ok().and_then(|a| {
            activation::inherited()
                .iter()
                .find(|i| activation::matches(a, &i.addr))
        });
        let fd = match (inherited, link()) {
            (Some(inherited), _) => inherited.fd.try_clone().map_err(|e| {
                Error::with_io(
                    Kind::Io,
                    format!("cannot use the inherited socket for {addr}"),
                    e,
                )
            })?,
            (None, None) => parsed
                .as_ref()
                .map_err(Error::clone)?
                .bind(DEFAULT_BACKLOG)?,
            (None, Some(link)) => {
                // Asked even when the address does not parse here: the
                // watcher parses it too, and a bad address before any
                // worker was ready stops it with one clear error instead
                // of a crash loop.
                let granted = link.request_socket(addr).await;
                parsed.as_ref().map_err(Error::clone)?;
                match granted? {
                    Granted::Fd(fd) => fd,
                    Granted::Balanced(listener) => return Ok(Listener::Balanced(listener)),
                }
            }
        };
        let parsed = parsed?;
        Listener::from_fd(&parsed, fd).map_err(|e| {
            Error::with_io(Kind::Io, format!("cannot use the listener for {parsed}"), e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_and_static<T: Send + 'static>(_: &T) {}

    #[test]
    fn await_termination_is_send_and_static() {
        // axum's `with_graceful_shutdown` and `tokio::spawn` need both.
        let future = Cluster::await_termination();
        send_and_static(&future);
    }
}
