//! # cluster
//!
//! A pre-fork server and worker-cluster framework. A **watcher** process
//! owns every listening socket and runs N copies of your server (the
//! **workers**), respawning them when they crash and stopping them
//! gracefully; the workers get their listening sockets from the watcher over
//! a Unix socketpair, so they all share one accept queue that survives any
//! worker's restart.
//!
//! Run any program under the `cluster` binary:
//!
//! ```text
//! cluster --workers 4 --pid-file x.pid ./my-server 127.0.0.1:8080
//! ```
//!
//! ## In a worker
//!
//! ```no_run
//! use cluster::Cluster;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), cluster::Error> {
//!     // From the watcher in a worker; bound here when run standalone.
//!     let listener = Cluster::server_socket_factory().listen("127.0.0.1:8080").await?;
//!     let server = tokio::spawn(async move {
//!         while let Ok((stream, _peer)) = listener.accept().await {
//!             // hand `stream` to hyper, axum, or your protocol
//! #           drop(stream);
//!         }
//!     });
//!     // Ready: now wait until the watcher (or a signal) says stop.
//!     Cluster::await_termination().await;
//!     server.abort();
//!     Ok(())
//! }
//! ```
//!
//! * [`Cluster`]: `is_worker`, `context_id`, `slot`, `server_socket_factory`,
//!   `ready`, `await_termination`.
//! * [`Listener`] / [`Stream`]: what `listen` returns and `accept` yields;
//!   `Listener::into_tcp` gives the tokio `TcpListener` (for `axum::serve`).
//!
//! ## Watching from code
//!
//! [`ClusterWatcher`] is the supervisor the CLI runs, with a builder,
//! `start`, `stop`, `wait` and `workers`.
//!
//! ## Socket pipes, without the watcher
//!
//! Between any two processes, over a `SOCK_SEQPACKET` pipe ([`pipe_pair`],
//! [`inherited_pipe`]): [`ClientSocketSendPipe`] hands accepted
//! connections with data to a [`ClientSocketReceivePipe`]; a
//! [`ServerSocketPipeProvider`] binds listening sockets once and shares
//! them with every [`ServerSocketPipeFactory`] that asks (one accept queue
//! for all of them).
//!
//! ## Jobs
//!
//! [`JobQueue`] submits durable jobs ([`NewJob`]) to a job store (an
//! embedded SQLite file by default) and inspects them ([`Job`],
//! [`JobStats`]); the watcher claims them for its pools. `cluster jobs`
//! is the same from the command line.
//!
//! ## Job server
//!
//! `cluster --job-server 127.0.0.1:1337` serves an HTTP/1.1 JSON API on
//! the watcher: [`JobClient`] calls the workers' [`Cluster::jobs`]
//! handlers by name (in memory) and submits durable jobs; errors are
//! [`CallError`]s. `docs/openapi.json` describes the API for other
//! languages.
//!
//! ## Errors
//!
//! Every fallible call returns [`Error`], inspected with `is_*` predicates.

#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod activation;
mod commands;
pub mod control;
pub mod daemon;
mod error;
mod ipc;
mod jobs;
mod jobserver;
mod listener;
#[cfg(feature = "axum")]
mod listener_axum;
mod log;
mod pidfile;
mod pipe;
mod pipe_end;
mod server_pipe;
mod signal;
mod socket;
mod storage;
// The one module with `unsafe` code: each block says why it is sound.
#[allow(unsafe_code)]
mod sys;
mod transport;
mod watcher;
mod worker;

pub use commands::{
    CommandCall, Commands, Reply, Responder, Response, Target, DEFAULT_COMMAND_TIMEOUT,
};
pub use error::{Error, Result};
pub use ipc::codec::MAX_MESSAGE_SIZE;
pub use jobs::{
    AttemptError, CallError, CancelOutcome, Job, JobClient, JobId, JobQueue, JobState, JobStats,
    ListFilter, NewJob, Node, NodePool, NodeState, RemoteJob, StateCounts, Submitted,
};
pub use listener::{BalancedListener, Listener};
#[cfg(feature = "slog")]
pub use log::ClusterSlogDrain;
pub use log::{ClusterLogLayer, LogFilter};
pub use pipe::{
    ClientSocketPipeListener, ClientSocketReceivePipe, ClientSocketSendPipe, TransferableSocket,
    TransferredSocket, MAX_HANDOFF_DATA,
};
pub use pipe_end::{inherited_pipe, pipe_pair};
pub use server_pipe::{
    ListenerFactory, ServerSocketPipeFactory, ServerSocketPipeProvider, MAX_PIPE_ADDRESSES,
};
pub use socket::{PeerAddr, Stream, DEFAULT_BACKLOG};
pub use storage::{Change, ChangeKind, SetValue, Storage, Versioned, Watch};
pub use watcher::{
    Balance, ClusterWatcher, ClusterWatcherBuilder, LogFormat, LogOutput, Messages, Revive,
    Stopped, Traffic, WatcherLogLayer, WorkerInfo, WorkerMessage, WorkerRef, WorkerState,
    DEFAULT_MAX_RESTARTS, DEFAULT_RESTART_WINDOW,
};
pub use worker::{
    Cluster, JobContext, JobError, Jobs, MessageChannel, ServerSocketFactory, Status,
    MAX_STATUS_LEN,
};

#[doc(hidden)]
pub use jobs::bench as __jobs_bench;
#[doc(hidden)]
pub use jobs::cli_support as __jobs_cli;
/// `512M`-style sizes, for the CLI's `--max-memory`; not a stable API.
#[doc(hidden)]
pub use watcher::recycle::parse_bytes as __parse_bytes;

/// Internals exposed for the benchmarks in `benches/`; not a stable API.
#[doc(hidden)]
pub mod __bench {
    use std::os::fd::{BorrowedFd, OwnedFd};

    use crate::ipc::message::{ToWatcher, ToWorker};
    use crate::ipc::Channel;

    /// Both ends of one IPC socketpair, as the watcher and a worker hold them.
    pub struct Pair {
        watcher: Channel,
        worker: Channel,
        buf: Vec<u8>,
    }

    impl Pair {
        /// A new pair; call within a tokio runtime.
        pub fn new() -> std::io::Result<Pair> {
            let (a, b) = crate::ipc::pair()?;
            Ok(Pair {
                watcher: Channel::new(a)?,
                worker: Channel::new(b)?,
                buf: Vec::new(),
            })
        }

        /// Worker asks, watcher answers: one request/response round trip.
        pub async fn round_trip(&mut self) {
            let ping = ToWorker::Ping { seq: 1 };
            self.watcher.send(&ping, &[]).await.expect("send");
            let (_m, _): (ToWorker, _) = self.worker.recv(&mut self.buf).await.expect("recv");
            self.worker
                .send(&ToWatcher::Pong { seq: 1 }, &[])
                .await
                .expect("send");
            let (_m, _): (ToWatcher, _) = self.watcher.recv(&mut self.buf).await.expect("recv");
        }

        /// Passes `fd` with a small payload from watcher to worker.
        pub async fn pass_fd(&mut self, fd: BorrowedFd<'_>) -> OwnedFd {
            let reply = ToWorker::SocketReply {
                id: 1,
                result: Ok(()),
            };
            self.watcher.send(&reply, &[fd]).await.expect("send");
            let (_m, mut fds): (ToWorker, _) = self.worker.recv(&mut self.buf).await.expect("recv");
            fds.pop().expect("one descriptor")
        }
    }
}
