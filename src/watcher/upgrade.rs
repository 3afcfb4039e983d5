//! Upgrading the watcher itself without downtime (nginx-style): what the
//! old watcher hands the new one through `exec`, and the link between the
//! two. A leaf: the supervisor's two halves (`supervise/upgrade.rs` in the
//! old watcher, `supervise/takeover.rs` in the new one) and the process
//! launcher use it.
//!
//! The old watcher forks and execs the watcher binary found at the path it
//! was started from, with the same arguments, and keeps these descriptors
//! open across `exec` (every other one is close-on-exec):
//!
//! * every listening socket it holds (shared, per-slot reuseport, the ones
//!   its balancers accept on, the ones systemd passed), by the address the
//!   workers asked for, so `127.0.0.1:0` finds the same ephemeral port;
//! * its pid file's locked descriptor, its control socket and the
//!   `--metrics` and `--http` listeners, which the new watcher uses only
//!   once the old one commits;
//! * an anonymous file with a snapshot of the shared storage: the new
//!   watcher starts from it, and at the commit the old watcher rewrites it
//!   with its store as it is then, which the new one loads before it
//!   serves (the store moves with the commit);
//! * one end of a stream socketpair, the *link*, and one end of a
//!   `SOCK_SEQPACKET` pair, the *connection link*: in the balanced modes
//!   the old watcher accepted connections itself, and those it holds when
//!   it commits (waiting for a worker, or given back by its draining
//!   workers) go over it, one per datagram with its address, to the new
//!   watcher's balancer for that address instead of being dropped.
//!
//! `CLUSTER_UPGRADE` describes them as one JSON object (the format number,
//! the old watcher's pid, the link, the number of workers, each descriptor
//! by number), the way `LISTEN_FDS` describes systemd's sockets; a process
//! whose parent is not the named pid ignores it. Over the link each side
//! writes JSON lines: the new watcher `ready` (its workers are ready),
//! `serving` (it holds the pid file and answers the control socket) or
//! `failed` with the reason; the old one `commit` (it stopped answering,
//! take over) and `released` (its last worker and job are done, the job
//! store is free). Unknown lines are logged and skipped, so versions can
//! add messages.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::error::{Error, Kind, Result};
use crate::ipc::{self, codec, Channel};
use crate::socket::Address;

/// The variable that describes the hand-over to the new watcher.
pub(crate) const ENV: &str = "CLUSTER_UPGRADE";

/// The version of the hand-over description.
const FORMAT: u32 = 1;

/// Longest line either side sends on the link.
const MAX_LINE: u64 = 4096;

/// How long forwarding one connection may wait for room in the
/// connection link before the connection is closed.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// What kind of listener a handed-over descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ListenerKind {
    /// One listener for every worker (`--balance shared`, Unix addresses).
    Shared,
    /// One slot's `SO_REUSEPORT` listener.
    Reuseport,
    /// A listener the watcher accepts on (the balanced modes).
    Balanced,
    /// A socket systemd passed (socket activation).
    Activated,
}

/// One listener being handed over.
#[derive(Debug)]
pub(crate) struct HandedListener {
    pub kind: ListenerKind,
    /// The address the workers asked for (for `Activated`: the socket's own).
    pub addr: Address,
    /// The slot of a reuseport listener.
    pub slot: Option<u32>,
    pub fd: OwnedFd,
}

/// What the old watcher hands over: the command to run and the state.
#[derive(Debug)]
pub(crate) struct Plan {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Worker slots now (after `cluster scale`).
    pub workers: usize,
    pub listeners: Vec<HandedListener>,
    pub pid_file: Option<OwnedFd>,
    pub control: Option<OwnedFd>,
    /// Where `control` is (a new configuration may name another path).
    pub control_path: Option<PathBuf>,
    pub metrics: Option<OwnedFd>,
    pub http: Option<OwnedFd>,
    /// The storage snapshot file.
    pub storage: Option<OwnedFd>,
    /// Variables the new watcher must not see (systemd's watchdog pid).
    pub env_remove: Vec<&'static str>,
}

#[derive(Serialize, Deserialize)]
struct State {
    format: u32,
    parent: u32,
    link: RawFd,
    #[serde(default)]
    conns: Option<RawFd>,
    workers: usize,
    #[serde(default)]
    pid_file: Option<RawFd>,
    #[serde(default)]
    control: Option<RawFd>,
    #[serde(default)]
    control_path: Option<PathBuf>,
    #[serde(default)]
    metrics: Option<RawFd>,
    #[serde(default)]
    http: Option<RawFd>,
    #[serde(default)]
    storage: Option<RawFd>,
    #[serde(default)]
    listeners: Vec<ListenerEntry>,
}

#[derive(Serialize, Deserialize)]
struct ListenerEntry {
    kind: ListenerKind,
    addr: String,
    #[serde(default)]
    slot: Option<u32>,
    fd: RawFd,
}

impl Plan {
    /// The value of [`ENV`] for a child that gets `link`, `conns` (the
    /// connection link) and this plan's descriptors at their numbers, and
    /// every number it must keep open.
    pub(crate) fn describe(&self, link: RawFd, conns: RawFd) -> (String, Vec<RawFd>) {
        let raw = |fd: &Option<OwnedFd>| fd.as_ref().map(|f| f.as_raw_fd());
        let state = State {
            format: FORMAT,
            parent: std::process::id(),
            link,
            conns: Some(conns),
            workers: self.workers,
            pid_file: raw(&self.pid_file),
            control: raw(&self.control),
            control_path: self.control_path.clone(),
            metrics: raw(&self.metrics),
            http: raw(&self.http),
            storage: raw(&self.storage),
            listeners: self
                .listeners
                .iter()
                .map(|l| ListenerEntry {
                    kind: l.kind,
                    addr: l.addr.to_string(),
                    slot: l.slot,
                    fd: l.fd.as_raw_fd(),
                })
                .collect(),
        };
        let mut keep = vec![link, conns];
        keep.extend(
            [
                &state.pid_file,
                &state.control,
                &state.metrics,
                &state.http,
                &state.storage,
            ]
            .into_iter()
            .flatten(),
        );
        keep.extend(state.listeners.iter().map(|l| l.fd));
        // Serializing plain numbers and strings cannot fail.
        let json = serde_json::to_string(&state).unwrap_or_default();
        (json, keep)
    }
}

/// The command an upgrade runs: this process's own, as it was started.
/// The program is the path it was started as, made absolute against the
/// working directory of the start (a bare name is looked up in `PATH` now),
/// without resolving symbolic links, so an upgrade after a deploy switched
/// a link (or replaced the file) runs the new binary; when that fails,
/// the running executable's path.
pub(crate) fn own_command() -> (PathBuf, Vec<OsString>) {
    let mut args = std::env::args_os();
    let argv0 = args.next().map(PathBuf::from);
    let rest: Vec<OsString> = args.collect();
    let found = argv0.and_then(|a| {
        if a.components().count() > 1 || a.is_absolute() {
            std::env::current_dir().ok().map(|d| d.join(&a))
        } else {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(&a))
                    .find(|p| p.is_file())
            })
        }
    });
    let program = found
        .or_else(|| std::env::current_exe().ok())
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
    (program, rest)
}

/// What a new watcher inherited from the old one.
#[derive(Debug)]
pub(crate) struct Inherited {
    /// The old watcher's pid.
    pub parent: u32,
    pub link: OwnedFd,
    /// The connection link (an old watcher of this build always sends one).
    pub conns: Option<OwnedFd>,
    pub workers: usize,
    pub pid_file: Option<OwnedFd>,
    pub control: Option<OwnedFd>,
    /// Where the old watcher's control socket is.
    pub control_path: Option<PathBuf>,
    pub metrics: Option<OwnedFd>,
    pub http: Option<OwnedFd>,
    /// The storage snapshot file.
    pub storage: Option<File>,
    pub listeners: Vec<HandedListener>,
}

/// Takes what the old watcher handed over, when [`ENV`] is set and names
/// this process's parent. Runs once per process; later calls find nothing.
///
/// # Errors
///
/// [`Error::is_upgrade`] when the description is malformed or names a
/// descriptor that is not open (or not a listener where one is expected);
/// descriptors taken before the error are closed.
pub(crate) fn take() -> Result<Option<Inherited>> {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let Ok(text) = std::env::var(ENV) else {
        return Ok(None);
    };
    let bad = |why: String| Error::new(Kind::Upgrade, format!("bad {ENV}: {why}"));
    let state: State = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if state.parent != nix::unistd::getppid().as_raw() as u32 {
        tracing::debug!(
            "{ENV} names pid {} as the old watcher, not our parent; ignored",
            state.parent
        );
        return Ok(None);
    }
    if state.format != FORMAT {
        return Err(bad(format!(
            "format {} (this build knows {FORMAT})",
            state.format
        )));
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(None);
    }
    let mut numbers: Vec<RawFd> = vec![state.link];
    numbers.extend(
        [
            state.conns,
            state.pid_file,
            state.control,
            state.metrics,
            state.http,
            state.storage,
        ]
        .into_iter()
        .flatten(),
    );
    numbers.extend(state.listeners.iter().map(|l| l.fd));
    let mut sorted = numbers.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != numbers.len() {
        return Err(bad("a descriptor is named twice".into()));
    }
    let take = |n: RawFd, what: &str| {
        crate::sys::take_exec_fd(n).map_err(|e| bad(format!("{what} (fd {n}): {e}")))
    };
    let opt = |n: Option<RawFd>, what: &str| n.map(|n| take(n, what)).transpose();
    let link = take(state.link, "the link")?;
    let conns = opt(state.conns, "the connection link")?;
    let pid_file = opt(state.pid_file, "the pid file")?;
    let control = opt(state.control, "the control socket")?;
    let metrics = opt(state.metrics, "the metrics listener")?;
    let http = opt(state.http, "the dashboard listener")?;
    let storage = opt(state.storage, "the storage snapshot")?.map(File::from);
    let mut listeners = Vec::new();
    for l in state.listeners {
        let fd = take(l.fd, &format!("the listener for {}", l.addr))?;
        let addr = Address::parse(&l.addr).map_err(|e| bad(e.to_string()))?;
        if let Err(why) = crate::activation::listening_address(&fd) {
            return Err(bad(format!("fd {} for {addr}: {why}", l.fd)));
        }
        listeners.push(HandedListener {
            kind: l.kind,
            addr,
            slot: l.slot,
            fd,
        });
    }
    Ok(Some(Inherited {
        parent: state.parent,
        link,
        conns,
        workers: state.workers,
        pid_file,
        control,
        control_path: state.control_path,
        metrics,
        http,
        storage,
        listeners,
    }))
}

/// An anonymous file (`O_TMPFILE` in the temporary directory, else a
/// file removed at once) holding `text`: the storage snapshot handed to
/// the new watcher.
///
/// # Errors
///
/// The error of creating or writing it.
pub(crate) fn snapshot_file(text: &str) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::env::temp_dir();
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(&dir)
    {
        Ok(f) => f,
        Err(_) => {
            // No O_TMPFILE on this file system: a private name, removed
            // as soon as it is open.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let name = dir.join(format!(".cluster-upgrade-{}-{nanos:x}", std::process::id()));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&name)?;
            let _ = std::fs::remove_file(&name);
            f
        }
    };
    rewrite_snapshot(&file, text)?;
    Ok(file)
}

/// Replaces what the snapshot file holds with `text` (both watchers have
/// it open: the new one reads what the old one wrote before `commit`).
///
/// # Errors
///
/// The error of writing it.
pub(crate) fn rewrite_snapshot(file: &File, text: &str) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.set_len(0)?;
    file.write_all_at(text.as_bytes(), 0)
}

/// What the snapshot file holds now.
///
/// # Errors
///
/// The error of reading it, or `InvalidData` when it is not UTF-8.
pub(crate) fn read_snapshot(file: &File) -> io::Result<String> {
    use std::io::{Read, Seek};
    let mut f = file.try_clone()?;
    f.seek(io::SeekFrom::Start(0))?;
    let mut text = String::new();
    f.read_to_string(&mut text)?;
    Ok(text)
}

/// What the new watcher tells the old one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub(crate) enum ToOld {
    /// Every worker it started is ready.
    Ready,
    /// It holds the pid file and serves the control socket.
    Serving,
    /// It cannot go on (and exits).
    Failed { why: String },
}

/// What the old watcher tells the new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub(crate) enum ToNew {
    /// The old watcher stopped answering: take the pid file and serve.
    Commit,
    /// The old watcher's workers and jobs are done: the job store is free.
    Released,
}

/// What the supervisor hears about an upgrade.
#[derive(Debug)]
pub(crate) enum UpgradeEvent {
    /// In the old watcher: the new one (`pid`) said something.
    FromNew { pid: u32, msg: ToOld },
    /// In the old watcher: the new one exited (after its link closed).
    NewExited {
        pid: u32,
        status: Option<ExitStatus>,
    },
    /// In the new watcher: the old one said something.
    FromOld(ToNew),
    /// In the new watcher: the link closed (the old watcher exited).
    OldGone,
    /// In the new watcher: a connection the old one accepted, for the
    /// balancer of `addr`.
    Connection {
        addr: Address,
        peer: String,
        fd: OwnedFd,
    },
}

/// The writing end of a link: one JSON line per message.
pub(crate) struct LinkTx(Box<dyn Write + Send>);

impl LinkTx {
    pub(crate) fn new(w: impl Write + Send + 'static) -> LinkTx {
        LinkTx(Box::new(w))
    }

    /// Writes `msg` (never blocks for long: the messages are a few bytes
    /// and the peer reads them at once).
    pub(crate) fn send<T: Serialize>(&mut self, msg: &T) -> io::Result<()> {
        let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
        line.push(b'\n');
        self.0.write_all(&line)?;
        self.0.flush()
    }
}

impl std::fmt::Debug for LinkTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkTx")
    }
}

/// The new watcher as the old one sees it.
#[derive(Debug)]
pub(crate) struct NewWatcher {
    pub pid: u32,
    pub link: LinkTx,
    /// Where the connections this watcher's balancers hold go.
    pub conns: Arc<ConnForward>,
}

/// One connection on the connection link (its descriptor rides along).
#[derive(Debug, Serialize, Deserialize)]
struct Forwarded {
    /// The address the workers asked for, as the balancers know it.
    addr: String,
    /// The client's address, as the balancer printed it.
    peer: String,
}

/// The old watcher's end of the connection link.
#[derive(Debug)]
pub(crate) struct ConnForward {
    fd: OwnedFd,
}

impl ConnForward {
    pub(crate) fn new(fd: OwnedFd) -> ConnForward {
        ConnForward { fd }
    }

    /// Sends connection `fd` from `peer`, accepted on `addr`, to the new
    /// watcher. Waits at most [`FORWARD_TIMEOUT`] for room (the new
    /// watcher reads at once; a datagram is a few dozen bytes); the caller
    /// closes `fd` either way.
    ///
    /// # Errors
    ///
    /// The socket's error: the new watcher is gone or does not read.
    pub(crate) fn send(&self, addr: &Address, fd: &OwnedFd, peer: &str) -> io::Result<()> {
        let msg = Forwarded {
            addr: addr.to_string(),
            peer: peer.to_string(),
        };
        let bytes = codec::encode(&msg).map_err(|e| io::Error::other(e.to_string()))?;
        let deadline = Instant::now() + FORWARD_TIMEOUT;
        loop {
            match crate::sys::send_with_fds(self.fd.as_fd(), &bytes, &[fd.as_fd()]) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::from(io::ErrorKind::TimedOut));
                    }
                    let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
                    let mut poll = [nix::poll::PollFd::new(
                        self.fd.as_fd(),
                        nix::poll::PollFlags::POLLOUT,
                    )];
                    match nix::poll::poll(&mut poll, nix::poll::PollTimeout::from(ms)) {
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A pair for a connection link (`SOCK_SEQPACKET`, both ends close-on-exec).
pub(crate) fn conns_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    ipc::pair()
}

/// Reads connections from the old watcher until the connection link
/// closes, handing each to `on`. A datagram that is not one connection
/// with one descriptor is logged and dropped (its descriptors closed).
/// Must be called within a tokio runtime.
pub(crate) async fn read_conns(fd: OwnedFd, mut on: impl FnMut(Address, String, OwnedFd)) {
    let channel = match Channel::new(fd) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("upgrade: cannot read the connection link: {e}");
            return;
        }
    };
    let mut buf = Vec::new();
    loop {
        match channel.recv::<Forwarded>(&mut buf).await {
            Ok((msg, fds)) => {
                let addr = Address::parse(&msg.addr);
                match (addr, <[OwnedFd; 1]>::try_from(fds)) {
                    (Ok(addr), Ok([fd])) => on(addr, msg.peer, fd),
                    _ => tracing::warn!(
                        "upgrade: a malformed connection from the old watcher ({:?}); closed",
                        msg.addr
                    ),
                }
            }
            Err(ipc::RecvError::Closed) => return,
            Err(e) => {
                tracing::warn!("upgrade: connection link: {e}");
                if matches!(e, ipc::RecvError::Io(_)) {
                    return;
                }
            }
        }
    }
}

/// A socketpair for a link (both ends close-on-exec).
pub(crate) fn link_pair() -> io::Result<(UnixStream, UnixStream)> {
    UnixStream::pair()
}

/// Splits one end of a link into its writer and a tokio stream to read.
/// Must be called within a tokio runtime.
pub(crate) fn split(end: UnixStream) -> io::Result<(LinkTx, tokio::net::UnixStream)> {
    let reader = end.try_clone()?;
    // Shared by both handles (one open file description): writes of a few
    // bytes to a socket the peer drains never find it full.
    reader.set_nonblocking(true)?;
    Ok((LinkTx::new(end), tokio::net::UnixStream::from_std(reader)?))
}

/// Reads `T` messages from a link until EOF, handing each to `on`; a line
/// that is not a `T` (a newer peer's message) is logged and skipped. An
/// over-long line ends the reading (as EOF does).
pub(crate) async fn read_link<T: serde::de::DeserializeOwned>(
    stream: tokio::net::UnixStream,
    mut on: impl FnMut(T),
) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_LINE);
        match limited.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) if !line.ends_with('\n') => {
                tracing::warn!("upgrade link: a line over {MAX_LINE} bytes; closing the link");
                return;
            }
            Ok(_) => match serde_json::from_str::<T>(line.trim()) {
                Ok(msg) => on(msg),
                Err(e) => tracing::warn!("upgrade link: ignoring {:?}: {e}", line.trim()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_json_lines_with_a_tag() {
        let s = serde_json::to_string(&ToOld::Failed { why: "no".into() }).unwrap();
        assert_eq!(s, r#"{"msg":"failed","why":"no"}"#);
        assert_eq!(
            serde_json::to_string(&ToNew::Commit).unwrap(),
            r#"{"msg":"commit"}"#
        );
        let back: ToNew = serde_json::from_str(r#"{"msg":"released"}"#).unwrap();
        assert_eq!(back, ToNew::Released);
    }

    #[test]
    fn the_description_names_every_descriptor_once() {
        let (a, b) = link_pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let plan = Plan {
            program: "cluster".into(),
            args: Vec::new(),
            workers: 3,
            listeners: vec![HandedListener {
                kind: ListenerKind::Shared,
                addr: Address::parse("127.0.0.1:0").unwrap(),
                slot: None,
                fd: OwnedFd::from(l),
            }],
            pid_file: Some(OwnedFd::from(a)),
            control: None,
            control_path: None,
            metrics: None,
            http: None,
            storage: None,
            env_remove: Vec::new(),
        };
        let (json, keep) = plan.describe(b.as_raw_fd(), 99);
        let state: State = serde_json::from_str(&json).unwrap();
        assert_eq!(state.format, FORMAT);
        assert_eq!(state.workers, 3);
        assert_eq!(state.parent, std::process::id());
        assert_eq!(state.listeners[0].addr, "127.0.0.1:0");
        assert_eq!(state.conns, Some(99));
        assert_eq!(keep.len(), 4);
        assert!(keep.contains(&b.as_raw_fd()) && keep.contains(&99));
    }

    #[tokio::test]
    async fn the_link_carries_lines_and_skips_unknown_ones() {
        let (a, b) = link_pair().unwrap();
        let (mut tx, _) = split(a).unwrap();
        let (_, rx) = split(b).unwrap();
        tx.send(&ToOld::Ready).unwrap();
        tx.0.write_all(b"{\"msg\":\"from_the_future\"}\n").unwrap();
        tx.send(&ToOld::Failed { why: "x".into() }).unwrap();
        drop(tx);
        let mut got = Vec::new();
        read_link::<ToOld>(rx, |m| got.push(m)).await;
        assert_eq!(got, vec![ToOld::Ready, ToOld::Failed { why: "x".into() }]);
    }

    #[tokio::test]
    async fn connections_cross_the_connection_link_with_their_address() {
        let (a, b) = conns_pair().unwrap();
        let tx = ConnForward::new(a);
        let (mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let addr = Address::parse("127.0.0.1:8080").unwrap();
        tx.send(&addr, &OwnedFd::from(theirs), "10.0.0.1:5000")
            .unwrap();
        // A datagram without a descriptor is dropped, the link goes on.
        crate::sys::send_with_fds(tx.fd.as_fd(), b"\x00\x00", &[]).unwrap();
        let (a2, _keep) = std::os::unix::net::UnixStream::pair().unwrap();
        tx.send(&addr, &OwnedFd::from(a2), "10.0.0.2:5000").unwrap();
        drop(tx);
        let mut got = Vec::new();
        read_conns(b, |addr, peer, fd| got.push((addr.to_string(), peer, fd))).await;
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "127.0.0.1:8080");
        assert_eq!(got[0].1, "10.0.0.1:5000");
        // The descriptor is the same socket: what is written arrives.
        let mut s = std::os::unix::net::UnixStream::from(got.remove(0).2);
        s.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        std::io::Read::read_exact(&mut &mine, &mut buf).unwrap();
        assert_eq!(&buf, b"hi");
    }
}
