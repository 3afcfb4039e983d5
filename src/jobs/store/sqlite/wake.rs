//! The wake-up side channel of a SQLite store: the sender every write
//! handle pokes after COMMIT, and the watcher's [`WakeListener`].
//!
//! SQLite has no LISTEN/NOTIFY. A watcher binds a Unix datagram socket at
//! `<db>.wake` ([`WakeListener`]); every submit, cancel and retry through
//! any handle on that file sends it one byte after COMMIT (non-blocking,
//! errors ignored: no listener, a full buffer). The dispatcher still polls
//! at a slow pace, for writers that bypass this code.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixDatagram as StdUnixDatagram;
use std::path::{Path, PathBuf};

use crate::error::{Error, Kind, Result};

/// The wake socket of a SQLite store at `db`: `<db>.wake`.
pub(crate) fn wake_path_for(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(".wake");
    PathBuf::from(s)
}

/// Sends one byte to a watcher's wake socket.
pub(super) struct Wake {
    socket: StdUnixDatagram,
    path: PathBuf,
}

impl Wake {
    pub(super) fn new(db: &Path) -> Option<Wake> {
        let socket = StdUnixDatagram::unbound().ok()?;
        socket.set_nonblocking(true).ok()?;
        Some(Wake {
            socket,
            path: wake_path_for(db),
        })
    }

    pub(super) fn send(&self) {
        // No listener (ENOENT, ECONNREFUSED) or a full buffer (EAGAIN, a
        // wake is already pending): nothing to do.
        let _ = self.socket.send_to(&[1], &self.path);
    }
}

/// The watcher's end of the wake side channel: a Unix datagram socket at
/// `<db>.wake` that every submit, cancel and retry pokes after COMMIT.
///
/// Bind it before the first claim, so no submit falls between a claim that
/// found nothing and the wait. Several wakes coalesce into one `wait`.
// The watcher's job dispatcher (DESIGN 4a, being written) is the caller.
#[allow(dead_code)]
#[derive(Debug)]
pub(crate) struct WakeListener {
    socket: tokio::net::UnixDatagram,
    path: PathBuf,
    ino: u64,
}

// The watcher's job dispatcher (DESIGN 4a, being written) is the caller.
#[allow(dead_code)]
impl WakeListener {
    /// Binds `<db>.wake` (within a tokio runtime). A stale socket file left
    /// by a dead watcher is replaced.
    ///
    /// # Errors
    ///
    /// [`Error::is_bind`]: another live process listens there, the path is
    /// taken by something that is not a socket, or the bind failed (the
    /// path is longer than a socket address allows, ...). The dispatcher
    /// can then fall back to polling.
    pub(crate) fn bind(db: &Path) -> Result<WakeListener> {
        let path = wake_path_for(db);
        let fail = |what: &str, e: std::io::Error| {
            Error::with_io(
                Kind::Bind,
                format!("cannot bind the job wake socket {}: {what}", path.display()),
                e,
            )
        };
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_socket() => {
                // Alive if someone receives on it (that listener gets a
                // spurious wake, which is harmless).
                let probe = StdUnixDatagram::unbound().map_err(|e| fail("probe", e))?;
                if probe.send_to(&[0], &path).is_ok() {
                    return Err(Error::new(
                        Kind::Bind,
                        format!(
                            "cannot bind the job wake socket {}: another process listens on it",
                            path.display()
                        ),
                    ));
                }
                std::fs::remove_file(&path).map_err(|e| fail("removing the stale socket", e))?;
            }
            Ok(_) => {
                return Err(Error::new(
                    Kind::Bind,
                    format!(
                        "cannot bind the job wake socket {}: the path exists and is not a socket",
                        path.display()
                    ),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail("stat", e)),
        }
        let socket = tokio::net::UnixDatagram::bind(&path).map_err(|e| fail("bind", e))?;
        let ino = std::fs::symlink_metadata(&path)
            .map(|m| m.ino())
            .map_err(|e| fail("stat", e))?;
        Ok(WakeListener { socket, path, ino })
    }

    /// The socket's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Returns once at least one wake arrived since the last `wait`, and
    /// drains the ones queued behind it.
    ///
    /// # Errors
    ///
    /// The socket failed (an I/O error; see [`Error::io_error`]).
    pub(crate) async fn wait(&self) -> Result<()> {
        let mut buf = [0u8; 8];
        self.socket
            .recv(&mut buf)
            .await
            .map_err(|e| Error::with_io(Kind::Io, "job wake socket", e))?;
        while self.socket.try_recv(&mut buf).is_ok() {}
        Ok(())
    }
}

impl Drop for WakeListener {
    fn drop(&mut self) {
        // Only our own file: a newer listener may have replaced it.
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
