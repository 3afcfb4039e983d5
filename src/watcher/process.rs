//! Starting and signalling worker processes, behind the [`Launcher`] seam.
//!
//! [`Processes`] is the real thing: fork+exec of the program with the
//! worker's end of a socketpair, and the tasks that serve its channel
//! (reader, writer), capture its stdout and stderr, and wait for its exit.
//! The supervisor only sees the [`Launcher`] trait, so its unit tests drive
//! it with fake processes under paused time.

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::task::JoinHandle;

use super::capture::capture;
use super::config::Config;
use super::event::{Event, EventSender, Outbound, OutboundSender};
use super::hub::{Hub, Origin, MAX_BACKLOG};
use super::listen::{self, FIRST_FD};
use super::notify::{NotifyDir, NotifySocket, NotifyState, Owner};
use super::output::Source;
use super::upgrade::{self, NewWatcher, Plan, ToOld, UpgradeEvent};
use super::{exec, systemd};
use crate::error::{Error, Kind, Result};
use crate::ipc::codec::{self, DecodeError};
use crate::ipc::message::{logs_batch, ToWatcher};
use crate::ipc::{self, env, Channel, RecvError};
use crate::log::LogBatch;
use crate::sys;

/// The watcher's handle on a spawned worker process.
pub(crate) struct Spawned {
    pub pid: u32,
    pub outbound: OutboundSender,
    /// What it says on its notify socket (`--notify`).
    pub notify: Option<Arc<NotifyState>>,
}

/// Which worker to start: its slot and its (new) context id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WorkerId {
    pub slot: u32,
    pub context_id: u64,
}

/// How the supervisor starts and signals workers.
pub(crate) trait Launcher: Send {
    /// Starts worker `id` with `listen_fds` (the `--listen` sockets, in
    /// order) as its descriptors 3, 4, .... Its tasks report on `events`:
    /// every message, a broken channel, notifications, and finally its exit.
    fn spawn(
        &self,
        config: &Config,
        id: WorkerId,
        listen_fds: Vec<OwnedFd>,
        events: &EventSender,
    ) -> Result<Spawned>;

    /// Sends `sig` to the worker `pid`.
    fn signal(&self, pid: u32, sig: Signal);

    /// Starts the new watcher of an upgrade from `plan`. What it says on
    /// the link and, at the end, its exit are reported on `events` as
    /// [`Event::Upgrade`].
    fn spawn_watcher(&self, plan: Plan, events: &EventSender) -> Result<NewWatcher>;

    /// Sends `sig` to the process `pid` alone (the new watcher of an
    /// upgrade, which is in the old one's process group, not its own).
    fn signal_watcher(&self, pid: u32, sig: Signal);
}

/// Pids of the children this watcher started (workers and per-job
/// processes) that tokio has not reaped yet: every other child of a
/// subreaper watcher is an orphan something left behind.
static OURS: Mutex<Option<HashSet<u32>>> = Mutex::new(None);

/// Spawns `cmd` and registers the child as the watcher's own, under the
/// registry's lock, so the orphan reaper never sees it as someone else's.
pub(crate) fn spawn_registered(
    cmd: &mut tokio::process::Command,
) -> std::io::Result<(tokio::process::Child, u32)> {
    let mut ours = OURS
        .lock()
        .map_err(|_| std::io::Error::other("launcher state poisoned"))?;
    let child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);
    ours.get_or_insert_with(HashSet::new).insert(pid);
    Ok((child, pid))
}

/// Forgets a child that tokio reaped.
pub(crate) fn unregister(pid: u32) {
    if let Ok(mut ours) = OURS.lock() {
        if let Some(set) = ours.as_mut() {
            set.remove(&pid);
        }
    }
}

/// Real worker processes. Each worker leads its own process group, and
/// every signal goes to the group, so a shell script's children stop with
/// it; when a worker exits, whatever is left in its group is killed.
///
/// With `subreaper`, the watcher also becomes the "child subreaper" of its
/// descendants (Linux `PR_SET_CHILD_SUBREAPER`): a process a worker left
/// behind outside its group (it called `setsid`) is re-parented to the
/// watcher when the worker dies, and is killed and reaped here instead of
/// living on under init.
pub(crate) struct Processes {
    reaper: Option<JoinHandle<()>>,
    /// Where the workers' notify sockets are (`--notify`), made on first use.
    notify_dir: Mutex<Option<NotifyDir>>,
    /// Where each worker's reader hands storage requests and commands.
    hub: Arc<Hub>,
}

impl Processes {
    /// Must be called within a tokio runtime when `subreaper` is set.
    pub(crate) fn new(subreaper: bool, hub: Arc<Hub>) -> Processes {
        let reaper = subreaper
            .then(|| match nix::sys::prctl::set_child_subreaper(true) {
                Ok(()) => match crate::signal::child_exits() {
                    Ok(sigchld) => Some(tokio::spawn(reap_orphans(sigchld))),
                    Err(e) => {
                        tracing::warn!("cannot watch SIGCHLD: {e}; orphans are not reaped");
                        None
                    }
                },
                Err(e) => {
                    tracing::warn!("cannot become the child subreaper: {e}");
                    None
                }
            })
            .flatten();
        Processes {
            reaper,
            notify_dir: Mutex::new(None),
            hub,
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        if let Some(r) = &self.reaper {
            r.abort();
        }
    }
}

impl Launcher for Processes {
    fn spawn(
        &self,
        config: &Config,
        id: WorkerId,
        listen_fds: Vec<OwnedFd>,
        events: &EventSender,
    ) -> Result<Spawned> {
        let notify = if config.notify {
            let mut made = self
                .notify_dir
                .lock()
                .map_err(|_| Error::new(Kind::Spawn, "launcher state poisoned"))?;
            let dir = match &mut *made {
                Some(dir) => dir,
                None => made.insert(NotifyDir::create(config.credentials).map_err(|e| {
                    Error::with_io(Kind::Spawn, "cannot create the notify directory", e)
                })?),
            };
            Some(dir.bind(id.context_id).map_err(|e| {
                Error::with_io(Kind::Spawn, "cannot bind a worker's notify socket", e)
            })?)
        } else {
            None
        };
        spawn(config, id, listen_fds, notify, events, &self.hub)
    }

    fn signal(&self, pid: u32, sig: Signal) {
        signal_group(pid, sig);
    }

    fn spawn_watcher(&self, plan: Plan, events: &EventSender) -> Result<NewWatcher> {
        spawn_watcher(plan, events)
    }

    fn signal_watcher(&self, pid: u32, sig: Signal) {
        if pid == 0 || pid > i32::MAX as u32 {
            return;
        }
        let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), sig);
    }
}

/// Forks and execs the new watcher of an upgrade: the binary and arguments
/// of `plan`, `CLUSTER_UPGRADE` describing what it inherits, every
/// descriptor of the plan and one end of the link and of the connection
/// link kept open across `exec`, stdio shared with this watcher. It gets no
/// parent-death signal and stays in this process group: it outlives this
/// watcher. A task reads the link
/// and another waits for its exit (after the link's EOF, bounded).
fn spawn_watcher(plan: Plan, events: &EventSender) -> Result<NewWatcher> {
    let err = |e: std::io::Error| {
        Error::with_io(
            Kind::Upgrade,
            format!("cannot start the new watcher {}", plan.program.display()),
            e,
        )
    };
    let (ours, theirs) = upgrade::link_pair().map_err(err)?;
    let (link, reader) = upgrade::split(ours).map_err(err)?;
    let (conns, conns_theirs) = upgrade::conns_pair().map_err(err)?;
    let (description, keep) = plan.describe(theirs.as_raw_fd(), conns_theirs.as_raw_fd());
    let mut cmd = tokio::process::Command::new(&plan.program);
    cmd.args(&plan.args)
        .env(upgrade::ENV, description)
        .kill_on_drop(false);
    for var in &plan.env_remove {
        cmd.env_remove(var);
    }
    sys::prepare_upgrade_exec(&mut cmd, keep);
    let (mut child, pid) = spawn_registered(&mut cmd).map_err(err)?;
    // The child has its copies; ours close now.
    drop((theirs, conns_theirs, plan));
    let tx = events.clone();
    let read = tokio::spawn(upgrade::read_link::<ToOld>(reader, move |msg| {
        let _ = tx.send(Event::Upgrade(UpgradeEvent::FromNew { pid, msg }));
    }));
    let tx = events.clone();
    tokio::spawn(async move {
        let status = child.wait().await;
        unregister(pid);
        let _ = tokio::time::timeout(DRAIN_AFTER_EXIT, read).await;
        let _ = tx.send(Event::Upgrade(UpgradeEvent::NewExited {
            pid,
            status: status.ok(),
        }));
    });
    Ok(NewWatcher {
        pid,
        link,
        conns: std::sync::Arc::new(upgrade::ConnForward::new(conns)),
    })
}

/// Sends `sig` to the process group led by worker `pid`.
///
/// The supervisor only signals workers whose exit it has not handled yet,
/// and a group's id stays allocated while any member lives, so the group is
/// ours; the one window is a group that emptied between the waiter task's
/// reap and the exit event, whose id a new group leader would have to take
/// in that instant (a pidfd cannot name a group; noted in ARCHITECTURE.md).
fn signal_group(pid: u32, sig: Signal) {
    if pid == 0 || pid > i32::MAX as u32 {
        return;
    }
    let _ = nix::sys::signal::killpg(Pid::from_raw(pid as i32), sig);
}

/// The direct children of this process, from `/proc/self/task/*/children`.
fn children() -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// Kills and reaps the children that are not workers: processes a worker
/// left behind, re-parented to the watcher when their parent died.
async fn reap_orphans(mut sigchld: tokio::signal::unix::Signal) {
    loop {
        let orphans: Vec<u32> = {
            let Ok(ours) = OURS.lock() else { return };
            children()
                .into_iter()
                .filter(|p| !ours.as_ref().is_some_and(|o| o.contains(p)))
                .collect()
        };
        for pid in orphans {
            let p = Pid::from_raw(pid as i32);
            match nix::sys::wait::waitpid(p, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                    tracing::warn!("killing pid {pid}, left behind by a worker that exited");
                    let _ = nix::sys::signal::kill(p, Signal::SIGKILL);
                }
                _ => tracing::debug!("reaped pid {pid}, left behind by a worker"),
            }
        }
        // The next exit of any child, or a slow poll for the rest.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), sigchld.recv()).await;
    }
}

/// Kills what a previous watcher (`pid`, found in a stale pid file) left
/// running: every process whose environment says it belongs to it (workers
/// and their children inherit `CLUSTER_WATCHER_PID`). Returns how many.
pub(crate) fn kill_left_behind(pid: u32) -> usize {
    let me = std::process::id();
    if pid == me || pid == 0 {
        return 0;
    }
    let needle = format!("{}={pid}", env::WATCHER_PID);
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for entry in dir.flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if p == me {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let theirs = environ.split(|&b| b == 0).any(|v| v == needle.as_bytes());
        if theirs && nix::sys::signal::kill(Pid::from_raw(p as i32), Signal::SIGKILL).is_ok() {
            killed += 1;
        }
    }
    killed
}

/// Forks and execs one worker `id`, and starts the tasks that read its
/// channel and notify socket, write to it, and wait for its exit.
///
/// With `--listen` or `--notify` the child execs itself (see `exec.rs`):
/// the `--listen` sockets go to descriptors 3, 4, ... and every descriptor
/// it keeps (its socketpair end, the sockets' sources) is first
/// duplicated above them, so no move overwrites another.
fn spawn(
    config: &Config,
    id: WorkerId,
    listen_fds: Vec<OwnedFd>,
    notify: Option<NotifySocket>,
    events: &EventSender,
    hub: &Arc<Hub>,
) -> Result<Spawned> {
    let WorkerId { slot, context_id } = id;
    let spawn_err = |e: std::io::Error| {
        Error::with_io(
            Kind::Spawn,
            format!("cannot start {}", Path::new(&config.program).display()),
            e,
        )
    };
    let (ours, theirs) = ipc::pair().map_err(spawn_err)?;
    let own_exec = !config.listen.is_empty() || config.notify;
    let floor = FIRST_FD + listen_fds.len() as i32;
    let theirs = if own_exec {
        sys::dup_above(theirs.as_fd(), floor).map_err(spawn_err)?
    } else {
        theirs
    };
    let sources = listen_fds
        .iter()
        .map(|fd| sys::dup_above(fd.as_fd(), floor))
        .collect::<std::io::Result<Vec<OwnedFd>>>()
        .map_err(spawn_err)?;
    drop(listen_fds);
    let moves: Vec<_> = (FIRST_FD..)
        .zip(&sources)
        .map(|(to, from)| (from.as_raw_fd(), to))
        .collect();
    let mut cmd = tokio::process::Command::new(&config.program);
    cmd.args(&config.args);
    for (k, v) in &config.envs {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    if let Some(dir) = &config.current_dir {
        cmd.current_dir(dir);
    }
    // Socket activation, notification and upgrades are the watcher's business.
    for var in systemd::ENV_VARS {
        cmd.env_remove(var);
    }
    cmd.env_remove(upgrade::ENV);
    if let Some(jobs) = &config.jobs {
        if let Some(i) = crate::jobs::dispatch::pools::pool_of(&jobs.pools, slot) {
            cmd.env(env::POOL, &jobs.pools[i].name);
        }
        cmd.env(env::JOB_CONCURRENCY, jobs.concurrency.to_string());
    }
    if !config.listen.is_empty() {
        // LISTEN_PID is written in the child (exec::PID_VARS).
        cmd.env("LISTEN_FDS", sources.len().to_string())
            .env("LISTEN_FDNAMES", listen::fd_names(&config.listen))
            .env("LISTEN_PID", "");
    }
    if let Some(sock) = &notify {
        cmd.env("NOTIFY_SOCKET", sock.path());
        if let Some(limit) = config.heartbeat_timeout {
            cmd.env("WATCHDOG_USEC", limit.as_micros().to_string())
                .env("WATCHDOG_PID", "");
        }
    }
    match config.worker_name(slot) {
        Some(name) => cmd.env(env::NAME, name),
        None => cmd.env_remove(env::NAME),
    };
    cmd.env(env::IPC_FD, theirs.as_raw_fd().to_string())
        .env(env::WATCHER_PID, std::process::id().to_string())
        .env(env::CONTEXT_ID, context_id.to_string())
        .env(env::SLOT, slot.to_string())
        .env(env::LOG_FILTER, config.output.filter().as_str())
        .env(
            env::MAX_REQUESTS,
            config
                .max_requests
                .map(|n| n.saturating_add(jitter(context_id, config.max_requests_jitter)))
                .unwrap_or(0)
                .to_string(),
        )
        .env(
            env::SHUTDOWN_TIMEOUT_MS,
            config.shutdown_timeout.as_millis().to_string(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    let exec = own_exec
        .then(|| exec::child_exec(cmd.as_std(), moves))
        .transpose()
        .map_err(spawn_err)?;
    sys::prepare_child_exec(&mut cmd, Some(theirs.as_raw_fd()), config.credentials, exec);
    // Registered under the lock, so the orphan reaper never sees the new
    // child as someone else's.
    let (mut child, pid) = spawn_registered(&mut cmd).map_err(spawn_err)?;
    drop(theirs);
    drop(sources);
    // Tasks whose work must be done before the exit is reported, so that
    // every line and message a worker sent is handled before its exit.
    let mut drained = Vec::new();
    if let Some(out) = child.stdout.take() {
        drained.push(capture(
            out,
            config.output.clone(),
            Source::Stdout { slot, pid },
            None,
        ));
    }
    if let Some(err) = child.stderr.take() {
        drained.push(capture(
            err,
            config.output.clone(),
            Source::Stderr { slot, pid },
            None,
        ));
    }
    let channel = match Channel::new(ours) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            let _ = child.start_kill();
            return Err(spawn_err(e));
        }
    };
    let owner = Owner {
        slot,
        pid,
        context_id,
    };
    let (notify, notify_exited) = match notify.map(|s| s.serve(owner, events.clone())) {
        Some(Ok(reader)) => {
            drained.push(reader.task);
            (Some(reader.state), Some(reader.exited))
        }
        Some(Err(e)) => {
            let _ = child.start_kill();
            return Err(spawn_err(e));
        }
        None => (None, None),
    };

    let (outbound, mut rx) = super::event::outbound_for(channel.clone());

    // Reader: storage requests and commands go to the hub as they arrive;
    // every other message or failure becomes an event.
    let tx = events.clone();
    let reader = channel.clone();
    let (hub, replies) = (hub.clone(), outbound.clone());
    drained.push(tokio::spawn(async move {
        let mut buf = Vec::new();
        loop {
            let received = match reader.recv_bytes(&mut buf).await {
                Ok((len, fds)) => match logs_batch(&buf[..len]) {
                    // Records, read in place by the log writer: checked
                    // here, so a malformed batch fails the channel as any
                    // malformed message does.
                    Some(records) if fds.is_empty() => match LogBatch::check(records) {
                        Ok(batch) => {
                            if tx.send(Event::Logs { context_id, batch }).is_err() {
                                return;
                            }
                            continue;
                        }
                        Err(e) => Err(RecvError::Decode(DecodeError::Malformed(e))),
                    },
                    _ => codec::decode::<ToWatcher>(&buf[..len])
                        .map(|msg| (msg, fds))
                        .map_err(RecvError::Decode),
                },
                Err(e) => Err(e),
            };
            match received {
                Ok((msg, fds)) => {
                    let msg = if fds.is_empty() && Hub::takes(&msg) {
                        // A worker that does not read its replies is not
                        // read either: its socket fills up, not our memory.
                        while replies.queued_bytes() > MAX_BACKLOG {
                            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                        }
                        let origin = Origin {
                            context_id,
                            outbound: &replies,
                        };
                        match hub.handle(origin, msg) {
                            None => {
                                // Others' requests get their turn.
                                tokio::task::yield_now().await;
                                continue;
                            }
                            Some(msg) => msg,
                        }
                    } else {
                        msg
                    };
                    if tx
                        .send(Event::Message {
                            context_id,
                            msg,
                            fds,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
                Err(error) => {
                    let _ = tx.send(Event::ChannelClosed { context_id, error });
                    return;
                }
            }
        }
    }));

    // Exit watcher: reports the exit after the worker's channel and output
    // reached EOF (bounded: a grandchild may hold them open).
    let tx = events.clone();
    tokio::spawn(async move {
        let status = child.wait().await;
        // Whatever the worker left in its group goes with it.
        signal_group(pid, Signal::SIGKILL);
        unregister(pid);
        if let Some(exited) = notify_exited {
            let _ = exited.send(());
        }
        let _ = tokio::time::timeout(DRAIN_AFTER_EXIT, async {
            for task in drained {
                let _ = task.await;
            }
        })
        .await;
        let _ = tx.send(Event::Exited {
            context_id,
            status: status.ok(),
        });
    });

    // Writer: ends when the supervisor drops the sender. A write error means
    // the worker is gone or going (EPIPE); its exit event follows, so the
    // writer just stops.
    tokio::spawn(async move {
        while let Some(Outbound { msg, fds, weight }) = rx.recv().await {
            let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
            let sent = channel.send(&msg, &borrowed).await;
            rx.written(fds.len(), weight);
            if let Err(e) = sent {
                tracing::debug!("worker {slot} (context {context_id}): {e}");
                return;
            }
        }
    });

    Ok(Spawned {
        pid,
        outbound,
        notify,
    })
}

/// How long a worker's output and messages may still arrive after it exited.
const DRAIN_AFTER_EXIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A random number in `0..=max`, different for every spawn (so workers
/// started together do not all recycle together).
fn jitter(context_id: u64, max: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    if max == 0 {
        return 0;
    }
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(context_id);
    h.finish() % max.saturating_add(1)
}

/// `SIGKILL` for 9, `signal 64` for what has no name.
pub(crate) fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {sig}"))
}

/// Describes how a worker ended, for logs.
pub(crate) fn describe_exit(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        None => "ended (status unknown)".to_string(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => format!("was killed by {}", signal_name(sig)),
            _ => format!("ended ({s})"),
        },
    }
}
