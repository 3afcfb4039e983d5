//! The library's error type: an opaque struct with a private kind and
//! `is_*` predicates, in the style of hyper.

use std::fmt;
use std::io;
use std::sync::Arc;

/// The error type of every fallible operation in this crate.
///
/// Inspect it with the `is_*` predicates; its `Display` form is one line
/// meant for people, its `source()` the underlying error when there is one
/// (an I/O error, for example; [`io_error`](Error::io_error) gives it typed).
/// Errors are cheap to clone: the source is shared.
///
/// ```no_run
/// # async fn run() {
/// match cluster::Cluster::server_socket_factory().listen("127.0.0.1:80").await {
///     Ok(_listener) => {}
///     Err(e) if e.is_bind() => eprintln!("cannot bind: {e}"),
///     Err(e) => eprintln!("{e}"),
/// }
/// # }
/// ```
#[derive(Clone)]
pub struct Error {
    kind: Kind,
    context: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// An address string could not be parsed.
    InvalidAddress,
    /// Binding or listening failed (in use, permission, ...).
    Bind,
    /// The IPC channel failed: I/O error, closed, or a malformed message.
    Ipc,
    /// A message was larger than the protocol allows.
    TooLarge,
    /// The pid file is held by another running watcher.
    PidFileLocked,
    /// The pid file could not be created, written or read.
    PidFile,
    /// The control socket could not be created, or did not answer.
    Control,
    /// The worker program could not be started.
    Spawn,
    /// Invalid configuration (for example zero workers or an unknown user).
    Config,
    /// The watcher is not running: never started, stopping, or stopped.
    Closed,
    /// `start` was called on a watcher that was already started.
    AlreadyStarted,
    /// A rolling restart failed (a replacement was not ready in time).
    Reload,
    /// A watcher upgrade failed and was rolled back (the new watcher did
    /// not start, or its workers were not ready in time).
    Upgrade,
    /// Any other I/O error.
    Io,
    /// The job store failed: it cannot be opened, is corrupt or of an
    /// unknown schema version, or a statement failed.
    Store,
    /// No such job (or other named thing).
    NotFound,
    /// A wait ran out of time.
    Timeout,
    /// A storage operation does not apply (bad path, a value on the way
    /// that is not an object, not an integer, bad JSON), or the storage
    /// file cannot be read or written.
    Storage,
    /// The storage's byte limit refused a write.
    StorageFull,
    /// A command's target does not exist.
    UnknownTarget,
    /// The target has no handler for the command.
    UnknownCommand,
    /// The target exited before it answered.
    TargetDied,
    /// The command's handler failed.
    Handler,
    /// Too many commands in flight, watches, or a watch that fell behind.
    Busy,
}

impl Error {
    pub(crate) fn new(kind: Kind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    pub(crate) fn with_io(kind: Kind, context: impl Into<String>, source: io::Error) -> Self {
        Self::with_source(kind, context, source)
    }

    pub(crate) fn with_source(
        kind: Kind,
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error {
            kind,
            context: context.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// An error of `kind` caused by a boxed error (SQLite, JSON), which
    /// `Display` appends and `source()` returns.
    pub(crate) fn with_cause(
        kind: Kind,
        context: impl Into<String>,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error {
            kind,
            context: context.into(),
            source: Some(Arc::from(cause.into())),
        }
    }

    /// "the watcher is not running", "... is stopping": for calls on a
    /// watcher that cannot take them any more.
    pub(crate) fn closed(context: impl Into<String>) -> Self {
        Self::new(Kind::Closed, context)
    }

    /// The kind, for code that carries an error across a process boundary
    /// (`server_pipe/wire.rs`).
    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }

    /// The context text, without the source.
    pub(crate) fn context(&self) -> &str {
        &self.context
    }

    /// The address given to `listen` could not be parsed.
    pub fn is_invalid_address(&self) -> bool {
        self.kind == Kind::InvalidAddress
    }

    /// Binding a listening socket failed (address in use, permission denied, ...).
    pub fn is_bind(&self) -> bool {
        self.kind == Kind::Bind
    }

    /// The IPC channel to the watcher (or a worker) failed or carried a malformed message.
    pub fn is_ipc(&self) -> bool {
        self.kind == Kind::Ipc
    }

    /// A message exceeded the protocol's size bound and was not sent.
    pub fn is_too_large(&self) -> bool {
        self.kind == Kind::TooLarge
    }

    /// Another watcher holds the pid file.
    pub fn is_pid_file_locked(&self) -> bool {
        self.kind == Kind::PidFileLocked
    }

    /// The pid file could not be created, locked or written (or another
    /// watcher holds it: see [`is_pid_file_locked`](Error::is_pid_file_locked)).
    pub fn is_pid_file(&self) -> bool {
        matches!(self.kind, Kind::PidFile | Kind::PidFileLocked)
    }

    /// The control socket could not be created (the watcher side), or no
    /// watcher answered on it (the client side).
    pub fn is_control(&self) -> bool {
        self.kind == Kind::Control
    }

    /// The worker program could not be started.
    pub fn is_spawn(&self) -> bool {
        self.kind == Kind::Spawn
    }

    /// The configuration was invalid: zero workers, a user that does not
    /// exist, a path that cannot be watched, a bad log filter, ...
    pub fn is_config(&self) -> bool {
        self.kind == Kind::Config
    }

    /// The watcher cannot take the call: it was never started, is
    /// stopping, or has stopped.
    pub fn is_closed(&self) -> bool {
        self.kind == Kind::Closed
    }

    /// [`ClusterWatcher::start`](crate::ClusterWatcher::start) was called twice.
    pub fn is_already_started(&self) -> bool {
        self.kind == Kind::AlreadyStarted
    }

    /// A rolling restart failed: a replacement exited or was not ready in
    /// time. The old workers keep serving.
    pub fn is_reload(&self) -> bool {
        self.kind == Kind::Reload
    }

    /// A watcher upgrade (`cluster upgrade`, SIGUSR2,
    /// [`ClusterWatcher::upgrade`](crate::ClusterWatcher::upgrade)) failed:
    /// the new watcher could not be started, exited, or its workers were
    /// not ready in time. It was rolled back: the old watcher keeps serving.
    pub fn is_upgrade(&self) -> bool {
        self.kind == Kind::Upgrade
    }

    /// The job store failed: it could not be opened (missing directory, not
    /// a SQLite database, unwritable, a newer schema than this build knows),
    /// its contents are corrupt, or a statement failed.
    pub fn is_store(&self) -> bool {
        self.kind == Kind::Store
    }

    /// The job (or other named thing) does not exist.
    pub fn is_not_found(&self) -> bool {
        self.kind == Kind::NotFound
    }

    /// A wait (for example [`JobQueue::wait`](crate::JobQueue::wait), or a
    /// command's reply) ran out of time.
    pub fn is_timeout(&self) -> bool {
        self.kind == Kind::Timeout
    }

    /// A storage operation did not apply: a bad path, a value on the way
    /// that is not an object (`set`), a value that is not an integer
    /// (`increment`), JSON that does not parse; or the storage file could
    /// not be read or written. Also true for
    /// [`is_storage_full`](Error::is_storage_full).
    pub fn is_storage(&self) -> bool {
        matches!(self.kind, Kind::Storage | Kind::StorageFull)
    }

    /// The storage's byte limit (`--storage-max-bytes`) refused a write;
    /// nothing was changed.
    pub fn is_storage_full(&self) -> bool {
        self.kind == Kind::StorageFull
    }

    /// A command's target does not exist: no such slot, name, or no
    /// worker at all.
    pub fn is_unknown_target(&self) -> bool {
        self.kind == Kind::UnknownTarget
    }

    /// The target has no handler registered for the command's name.
    pub fn is_unknown_command(&self) -> bool {
        self.kind == Kind::UnknownCommand
    }

    /// The command's target exited (or its channel closed) before it
    /// answered.
    pub fn is_target_died(&self) -> bool {
        self.kind == Kind::TargetDied
    }

    /// The command's handler returned an error, panicked, or could not
    /// take the arguments; the message is the handler's.
    pub fn is_handler_error(&self) -> bool {
        self.kind == Kind::Handler
    }

    /// A bound refused the request: too many commands in flight or
    /// watches for one process, or a watch whose reader fell too far
    /// behind (it ended).
    pub fn is_busy(&self) -> bool {
        self.kind == Kind::Busy
    }

    /// The underlying OS error, if the source is one.
    pub fn io_error(&self) -> Option<&io::Error> {
        self.source.as_deref()?.downcast_ref::<io::Error>()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("cluster::Error")
            .field("kind", &self.kind)
            .field("context", &self.context)
            .field("source", &self.source)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = e
            .io_error()
            .map(|s| s.kind())
            .unwrap_or(io::ErrorKind::Other);
        io::Error::new(kind, e)
    }
}

/// A `Result` with this crate's [`Error`].
///
/// ```no_run
/// fn workers() -> cluster::Result<usize> {
///     Ok(4)
/// }
/// # assert_eq!(workers().unwrap(), 4);
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_source_and_keep_the_io_error() {
        let e = Error::with_io(
            Kind::Bind,
            "cannot listen on 127.0.0.1:80",
            io::Error::from(io::ErrorKind::PermissionDenied),
        );
        let c = e.clone();
        assert!(c.is_bind());
        assert_eq!(
            c.io_error().map(|e| e.kind()),
            Some(io::ErrorKind::PermissionDenied)
        );
        assert!(std::error::Error::source(&c).is_some());
        assert_eq!(io::Error::from(c).kind(), io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn kinds_are_distinct() {
        let closed = Error::closed("the watcher is not running");
        assert!(closed.is_closed() && !closed.is_config() && !closed.is_control());
        let control = Error::new(Kind::Control, "cannot create control socket");
        assert!(control.is_control() && !control.is_pid_file());
    }
}
