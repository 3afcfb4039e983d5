//! `--notify`: the `sd_notify` protocol between the watcher and workers
//! that do not use the library. Each worker gets its own `NOTIFY_SOCKET`, a
//! datagram socket the watcher binds in a private directory and reads with
//! `SO_PASSCRED`, so every message carries the sender's pid as the kernel
//! saw it.
//!
//! * Only the worker itself, or a process of its process group (a helper
//!   such as `systemd-notify` it runs), is listened to: a datagram from any
//!   other pid is ignored, as are datagrams over [`MAX_DATAGRAM`] bytes.
//!   Descriptors attached to a datagram are closed once it was handled
//!   (which is how `sd_notify_barrier`'s `BARRIER=1` is answered).
//! * What a worker said is kept in its [`NotifyState`] (flags, a watchdog
//!   counter, the last `STATUS=`); the reader wakes the supervisor with one
//!   [`Event::Notify`] only when something changed and no earlier wake-up
//!   is still pending, so a worker that floods its socket costs the
//!   supervisor at most one event in its queue. Watchdog pings only bump a
//!   counter, which the heartbeat check reads.
//!
//! The watcher's own `NOTIFY_SOCKET` (it runs under systemd) is another
//! socket entirely: `systemd.rs` writes to it, workers never see it.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::sys::{self, Credentials, Received};
use crate::watcher::event::{Event, EventSender};

/// The longest datagram read (systemd's `NOTIFY_BUFFER_MAX`); longer ones
/// are ignored.
pub(crate) const MAX_DATAGRAM: usize = 4096;

/// `STATUS=` texts are cut to this many characters.
const MAX_STATUS: usize = 200;

/// What a worker said on its notify socket, shared by its reader task and
/// the supervisor.
#[derive(Debug, Default)]
pub(crate) struct NotifyState {
    /// A wake-up for the supervisor is queued and not yet handled.
    pending: AtomicBool,
    ready: AtomicBool,
    reloading: AtomicBool,
    stopping: AtomicBool,
    /// `WATCHDOG=trigger`: the worker asks to be treated as hung.
    trigger: AtomicBool,
    watchdogs: AtomicU64,
    status: Mutex<Option<String>>,
}

/// A snapshot of what a worker said, for the supervisor to act on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Said {
    pub ready: bool,
    pub reloading: bool,
    pub stopping: bool,
    pub trigger: bool,
    pub watchdogs: u64,
}

impl NotifyState {
    /// Applies one message (`KEY=VALUE` lines; unknown keys and other lines
    /// are ignored). Returns whether the supervisor should look: a change
    /// other than one more watchdog ping.
    pub(crate) fn apply(&self, message: &[u8]) -> bool {
        let text = String::from_utf8_lossy(message);
        let mut changed = false;
        for line in text.split('\n') {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match (key, value) {
                ("READY", "1") => {
                    changed |= !self.ready.swap(true, Ordering::SeqCst);
                    changed |= self.reloading.swap(false, Ordering::SeqCst);
                }
                ("RELOADING", "1") => changed |= !self.reloading.swap(true, Ordering::SeqCst),
                ("STOPPING", "1") => changed |= !self.stopping.swap(true, Ordering::SeqCst),
                ("WATCHDOG", "1") => changed |= self.watchdogs.fetch_add(1, Ordering::SeqCst) == 0,
                ("WATCHDOG", "trigger") => changed |= !self.trigger.swap(true, Ordering::SeqCst),
                ("STATUS", text) => {
                    let text: String = text
                        .chars()
                        .filter(|c| !c.is_control())
                        .take(MAX_STATUS)
                        .collect();
                    if let Ok(mut status) = self.status.lock() {
                        if status.as_deref() != Some(text.as_str()) {
                            *status = Some(text);
                            changed = true;
                        }
                    }
                }
                _ => {}
            }
        }
        changed
    }

    /// Whether a wake-up must be sent after a change (none is pending).
    pub(crate) fn wake(&self) -> bool {
        !self.pending.swap(true, Ordering::SeqCst)
    }

    /// What was said so far; clears the pending wake-up first, so a change
    /// after this read sends a new one.
    pub(crate) fn take(&self) -> Said {
        self.pending.store(false, Ordering::SeqCst);
        Said {
            ready: self.ready.load(Ordering::SeqCst),
            reloading: self.reloading.load(Ordering::SeqCst),
            stopping: self.stopping.load(Ordering::SeqCst),
            trigger: self.trigger.load(Ordering::SeqCst),
            watchdogs: self.watchdogs(),
        }
    }

    /// How many `WATCHDOG=1` arrived.
    pub(crate) fn watchdogs(&self) -> u64 {
        self.watchdogs.load(Ordering::SeqCst)
    }

    /// The last `STATUS=` text.
    pub(crate) fn status(&self) -> Option<String> {
        self.status.lock().ok().and_then(|s| s.clone())
    }
}

/// The supervisor's side of one worker's [`NotifyState`]: what it has
/// acted on so far.
#[derive(Debug)]
pub(crate) struct Notified {
    pub state: Arc<NotifyState>,
    pub seen: Said,
    /// The worker sent `WATCHDOG=1` once: the heartbeat holds it to that.
    pub armed: bool,
}

impl Notified {
    pub(crate) fn new(state: Arc<NotifyState>) -> Notified {
        Notified {
            state,
            seen: Said::default(),
            armed: false,
        }
    }

    /// Whether a `WATCHDOG=1` arrived since the last call.
    pub(crate) fn pinged(&mut self) -> bool {
        let count = self.state.watchdogs();
        let new = count > self.seen.watchdogs;
        self.seen.watchdogs = count;
        new
    }
}

/// The private directory of one watcher's notify sockets, removed with it.
/// Mode 0700, so other users cannot send; with `--user` it is 0711 and
/// each socket belongs to the workers' user (mode 0600): they can send to
/// it, nobody else can, and they cannot add or remove files there.
#[derive(Debug)]
pub(crate) struct NotifyDir {
    path: PathBuf,
    creds: Option<Credentials>,
}

impl NotifyDir {
    /// Creates the directory in the temporary directory (`$TMPDIR`, else
    /// `/tmp`; `/tmp` when that path is too long for socket addresses).
    pub(crate) fn create(creds: Option<Credentials>) -> io::Result<NotifyDir> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let mut base = std::env::temp_dir();
        if base.as_os_str().len() > 60 {
            base = PathBuf::from("/tmp");
        }
        let name = format!(
            "cluster-notify.{}.{:016x}",
            std::process::id(),
            crate::pidfile::random_suffix()
        );
        let path = base.join(name);
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        if creds.is_some() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o711))?;
        }
        Ok(NotifyDir { path, creds })
    }

    /// Binds the notify socket of worker `context_id`.
    pub(crate) fn bind(&self, context_id: u64) -> io::Result<NotifySocket> {
        let path = self.path.join(context_id.to_string());
        let sock = UnixDatagram::bind(&path)?;
        let socket = NotifySocket {
            sock,
            file: SocketFile(path.clone()),
        };
        sock_setup(&socket.sock)?;
        if let Some(creds) = self.creds {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            std::os::unix::fs::chown(&path, creds.uid, creds.gid)?;
        }
        Ok(socket)
    }
}

impl Drop for NotifyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn sock_setup(sock: &UnixDatagram) -> io::Result<()> {
    sock.set_nonblocking(true)?;
    nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::PassCred, &true)?;
    Ok(())
}

/// One worker's notify socket, bound before the worker starts (its path is
/// in the worker's environment); the file is removed when it is dropped.
#[derive(Debug)]
pub(crate) struct NotifySocket {
    sock: UnixDatagram,
    file: SocketFile,
}

/// A socket's file, removed on drop.
#[derive(Debug)]
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Who a notify socket belongs to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Owner {
    pub slot: u32,
    pub pid: u32,
    pub context_id: u64,
}

/// A running reader: the state it fills, and how to end it.
pub(crate) struct Reader {
    pub state: Arc<NotifyState>,
    /// Fire (or drop) when the worker exited: the reader handles what is
    /// still queued and ends.
    pub exited: oneshot::Sender<()>,
    pub task: JoinHandle<()>,
}

impl NotifySocket {
    /// The value of the worker's `NOTIFY_SOCKET`.
    pub(crate) fn path(&self) -> &Path {
        &self.file.0
    }

    /// Starts reading for the worker `owner` (now that its pid is known).
    /// Must be called within a tokio runtime.
    pub(crate) fn serve(self, owner: Owner, events: EventSender) -> io::Result<Reader> {
        let state = Arc::new(NotifyState::default());
        let NotifySocket { sock, file } = self;
        let fd = sys::register_async(OwnedFd::from(sock))?;
        let (exited, mut exited_rx) = oneshot::channel();
        let mut handler = Handler {
            owner,
            state: state.clone(),
            events,
            ignored: 0,
        };
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                tokio::select! {
                    ready = fd.readable() => {
                        let Ok(mut guard) = ready else { break };
                        match guard.try_io(|inner| sys::recv_with_fds(inner.get_ref().as_fd(), &mut buf)) {
                            Ok(Ok(received)) => handler.handle(&received, &buf),
                            Ok(Err(e)) => {
                                tracing::debug!("notify socket of worker {}: {e}", owner.slot);
                                guard.clear_ready();
                            }
                            Err(_would_block) => {}
                        }
                    }
                    _ = &mut exited_rx => break,
                }
            }
            // The worker is gone: what it sent before is still handled.
            while let Ok(received) = sys::recv_with_fds(fd.get_ref().as_fd(), &mut buf) {
                handler.handle(&received, &buf);
            }
            drop(file);
        });
        Ok(Reader {
            state,
            exited,
            task,
        })
    }
}

/// What the reader does with each datagram.
struct Handler {
    owner: Owner,
    state: Arc<NotifyState>,
    events: EventSender,
    /// Datagrams ignored so far (the first is logged as a warning).
    ignored: u64,
}

impl Handler {
    fn handle(&mut self, received: &Received, buf: &[u8]) {
        let why = if received.truncated {
            Some(format!("it is longer than {MAX_DATAGRAM} bytes"))
        } else {
            match received.pid {
                Some(pid) if self.sent_by_owner(pid) => None,
                Some(pid) => Some(format!(
                    "pid {pid} is neither the worker nor in its process group"
                )),
                None => Some("it carries no credentials".into()),
            }
        };
        if let Some(why) = why {
            self.ignored += 1;
            let Owner { slot, pid, .. } = self.owner;
            if self.ignored == 1 {
                tracing::warn!(
                    "ignoring a message on the notify socket of worker {slot} (pid {pid}): {why}"
                );
            } else {
                tracing::debug!(
                    "ignoring a message on the notify socket of worker {slot} (pid {pid}): {why}"
                );
            }
            return;
        }
        let message = buf.get(..received.len).unwrap_or_default();
        if self.state.apply(message) && self.state.wake() {
            let _ = self.events.send(Event::Notify {
                context_id: self.owner.context_id,
            });
        }
        // Attached descriptors close when `received` is dropped by the
        // caller: after the message was handled (BARRIER=1).
    }

    /// Whether `pid` is the worker or a member of its process group (the
    /// worker leads its own group; its children stay in it unless they
    /// leave). The sender is alive while its credentials are checked when
    /// it waits for the answer to a barrier, as `systemd-notify` does.
    fn sent_by_owner(&self, pid: i32) -> bool {
        if pid <= 0 {
            return false;
        }
        if pid as u32 == self.owner.pid {
            return true;
        }
        nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid)))
            .is_ok_and(|group| group.as_raw() as u32 == self.owner.pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_change_the_state_once() {
        let s = NotifyState::default();
        assert!(s.apply(b"READY=1\nSTATUS=serving"));
        assert!(!s.apply(b"READY=1\nSTATUS=serving"));
        assert!(!s.apply(b"garbage\n\xff\xfe=\n=1\nREADY=2"));
        assert!(s.apply(b"WATCHDOG=1"));
        assert!(!s.apply(b"WATCHDOG=1"), "further pings only count");
        assert_eq!(s.watchdogs(), 2);
        assert!(s.apply(b"RELOADING=1"));
        assert!(s.take().reloading);
        assert!(s.apply(b"READY=1"), "READY=1 ends the reload");
        assert!(!s.take().reloading);
        assert!(s.apply(b"STATUS=a\x07b"));
        assert_eq!(s.status().as_deref(), Some("ab"));
        assert!(s.apply(&[b"STATUS=".as_slice(), &[b'x'; 500]].concat()));
        assert_eq!(s.status().map(|t| t.len()), Some(MAX_STATUS));
        assert!(s.apply(b"STOPPING=1"));
        assert!(s.apply(b"WATCHDOG=trigger"));
        let said = s.take();
        assert!(said.ready && said.stopping && said.trigger);
    }

    #[test]
    fn one_wake_up_until_taken() {
        let s = NotifyState::default();
        assert!(s.wake());
        assert!(!s.wake());
        s.take();
        assert!(s.wake());
    }
}
