//! The library's error type: an opaque struct with a private kind and
//! `is_*` predicates, in the style of hyper.

use std::fmt;
use std::io;

/// The error type of every fallible operation in this crate.
///
/// Inspect it with the `is_*` predicates; its `Display` form is one line
/// meant for people, its `source()` the underlying I/O error when there is one.
pub struct Error {
    kind: Kind,
    context: String,
    source: Option<io::Error>,
    /// A non-I/O cause (a SQLite or JSON error), kept for `source()`.
    cause: Option<Box<dyn std::error::Error + Send + Sync>>,
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
    /// The worker program could not be started.
    Spawn,
    /// Invalid configuration (for example zero workers), or a request the
    /// watcher cannot take in its current state.
    Config,
    /// A rolling restart failed (a replacement was not ready in time).
    Reload,
    /// Any other I/O error.
    Io,
    /// The job store failed: it cannot be opened, is corrupt or of an
    /// unknown schema version, or a statement failed.
    Store,
    /// No such job (or other named thing).
    NotFound,
    /// A wait ran out of time.
    Timeout,
}

impl Error {
    pub(crate) fn new(kind: Kind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
            cause: None,
        }
    }

    pub(crate) fn with_io(kind: Kind, context: impl Into<String>, source: io::Error) -> Self {
        Error {
            kind,
            context: context.into(),
            source: Some(source),
            cause: None,
        }
    }

    /// An error of `kind` caused by a non-I/O error (SQLite, JSON), which
    /// `Display` appends and `source()` returns.
    pub(crate) fn with_cause(
        kind: Kind,
        context: impl Into<String>,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
            cause: Some(cause.into()),
        }
    }

    #[allow(dead_code)]
    pub(crate) fn kind(&self) -> Kind {
        self.kind
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

    /// The pid file could not be created, locked or written.
    pub fn is_pid_file(&self) -> bool {
        matches!(self.kind, Kind::PidFile | Kind::PidFileLocked)
    }

    /// The worker program could not be started.
    pub fn is_spawn(&self) -> bool {
        self.kind == Kind::Spawn
    }

    /// The configuration was invalid, or the watcher could not take the
    /// request in its current state (stopping, already started, ...).
    pub fn is_config(&self) -> bool {
        self.kind == Kind::Config
    }

    /// A rolling restart failed: a replacement exited or was not ready in
    /// time. The old workers keep serving.
    pub fn is_reload(&self) -> bool {
        self.kind == Kind::Reload
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

    /// A wait (for example [`JobQueue::wait`](crate::JobQueue::wait)) ran
    /// out of time.
    pub fn is_timeout(&self) -> bool {
        self.kind == Kind::Timeout
    }

    /// The underlying OS error, if any.
    pub fn io_error(&self) -> Option<&io::Error> {
        self.source.as_ref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        if let Some(cause) = &self.cause {
            write!(f, ": {cause}")?;
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
            .field("cause", &self.cause)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        if let Some(source) = &self.source {
            return Some(source as &(dyn std::error::Error + 'static));
        }
        self.cause
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match &e.source {
            Some(s) => s.kind(),
            None => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
