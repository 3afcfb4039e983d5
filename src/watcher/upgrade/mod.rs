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

mod link;

pub(crate) use link::{
    conns_pair, link_pair, read_conns, read_link, read_snapshot, rewrite_snapshot, snapshot_file,
    split, ConnForward, LinkTx,
};

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Kind, Result};
use crate::socket::Address;

/// The variable that describes the hand-over to the new watcher.
pub(crate) const ENV: &str = "CLUSTER_UPGRADE";

/// The version of the hand-over description.
const FORMAT: u32 = 1;

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

/// The new watcher as the old one sees it.
#[derive(Debug)]
pub(crate) struct NewWatcher {
    pub pid: u32,
    pub link: LinkTx,
    /// Where the connections this watcher's balancers hold go.
    pub conns: Arc<ConnForward>,
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
}
