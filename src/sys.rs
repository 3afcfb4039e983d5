//! OS glue: the only module of the crate with `unsafe` code.
//!
//! Everything here is a thin, audited wrapper over a system call whose
//! soundness argument is local: taking ownership of file descriptors that
//! arrive with `SCM_RIGHTS`, through `exec` (systemd's socket activation,
//! a watcher upgrade), probing an inherited descriptor without owning it, the
//! `pre_exec` hook that runs in the forked child between `fork` and `exec`,
//! and the daemon's `fork` while the process is still single-threaded.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};

/// The most descriptors the kernel passes in one message (`SCM_MAX_FD`).
/// The control buffer is sized for this many so that `MSG_CTRUNC` cannot
/// drop (and so leak) descriptors that a peer attached beyond our limit.
const SCM_MAX_FD: usize = 253;

/// What one `recvmsg` returned.
pub(crate) struct Received {
    /// Bytes of payload copied into the buffer.
    pub len: usize,
    /// The datagram was longer than the buffer (`MSG_TRUNC`).
    pub truncated: bool,
    /// The control data was cut (`MSG_CTRUNC`).
    pub ctrunc: bool,
    /// Every descriptor that arrived, owned (closed on drop, `O_CLOEXEC` set).
    pub fds: Vec<OwnedFd>,
}

/// Sends one datagram carrying `bytes` and `fds` (`MSG_NOSIGNAL`, `MSG_DONTWAIT`).
pub(crate) fn send_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() {
        &[]
    } else {
        &[ControlMessage::ScmRights(&raw)]
    };
    let iov = [IoSlice::new(bytes)];
    socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        None,
    )
    .map_err(io::Error::from)
}

/// Receives one datagram with `MSG_CMSG_CLOEXEC` and `MSG_DONTWAIT`.
pub(crate) fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut cmsg_buf = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg_buf),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    let ctrunc = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    if let Ok(cmsgs) = msg.cmsgs() {
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmRights(raws) = cmsg {
                for raw in raws {
                    // SAFETY: the kernel has just installed `raw` in our
                    // descriptor table for this SCM_RIGHTS message; nothing
                    // else in the process knows the number, so we are its
                    // sole owner and may close it when the OwnedFd drops.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
    }
    Ok(Received {
        len: msg.bytes,
        truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
        ctrunc,
        fds,
    })
}

/// Registers `fd` with the current tokio reactor for reads and writes.
/// Must be called within a tokio runtime.
pub(crate) fn register_async(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    use tokio::io::Interest;
    // SAFETY: an OwnedFd is a valid open descriptor that it alone closes;
    // the AsyncFd owns it, and OwnedFd::as_raw_fd always returns the same
    // number, so it stays open and unchanged for the AsyncFd's lifetime.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            fd,
            Interest::READABLE | Interest::WRITABLE,
        )
    }
    .map_err(io::Error::from)
}

/// The pid of the process that created the socket at `raw` (for a
/// socketpair, the watcher), or an error when `raw` is not an open Unix
/// socket. Does not take ownership of `raw`.
pub(crate) fn inherited_socket_peer_pid(raw: RawFd) -> io::Result<i32> {
    if raw < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: F_GETFD only reads the descriptor flags; on a closed number it
    // fails with EBADF and touches nothing.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes passed;
    // getsockopt on a non-socket fails with ENOTSOCK without side effects.
    let rc = unsafe {
        libc::getsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.pid)
}

/// Takes ownership of the IPC descriptor this process inherited through
/// `exec`, and sets `FD_CLOEXEC` on it so that our own children do not
/// inherit it in turn.
///
/// The caller (the worker module) guarantees this runs at most once per
/// process, after [`inherited_socket_peer_pid`] confirmed the descriptor
/// is the watcher's socket.
pub(crate) fn take_inherited_fd(raw: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: the watcher left this descriptor open across exec for us
    // alone; the worker module takes it exactly once (guarded by a
    // OnceLock), so no other OwnedFd will ever close it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_cloexec(fd)
}

/// Device and inode of the file open at descriptor number `raw`, or `None`
/// when nothing is open there. Does not take ownership of `raw`.
pub(crate) fn inode_of(raw: RawFd) -> Option<(u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a full `struct stat` into the valid buffer on
    // success and nothing on failure (EBADF for a closed number); the buffer
    // is read only after success.
    let rc = unsafe { libc::fstat(raw, st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: fstat returned 0, so it initialised the whole struct.
    let st = unsafe { st.assume_init() };
    Some((st.st_dev, st.st_ino))
}

/// Registers `f` to run when the process exits normally (returning from
/// `main` or `std::process::exit`). Returns false if registration failed.
pub(crate) fn at_exit(f: extern "C" fn()) -> bool {
    // SAFETY: atexit only stores the function pointer; `f` is a plain
    // `extern "C" fn()` that never unwinds (it only sends on channels and
    // waits with a timeout), as atexit handlers must.
    unsafe { libc::atexit(f) == 0 }
}

/// User and group ids a worker runs as (`--user`, `--group`), resolved
/// before any fork: the `pre_exec` hook may not look names up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Credentials {
    /// `setuid` to this user, if set.
    pub uid: Option<libc::uid_t>,
    /// `setgid` to this group, if set.
    pub gid: Option<libc::gid_t>,
}

/// Installs the hook that runs in the forked child (a worker, or a
/// per-job process) before `exec`:
///
/// * with `creds`, drops privileges: clears the supplementary groups
///   (`setgroups(0)`), then `setgid`, then `setuid` (in that order: once
///   the uid changes, the group calls are no longer permitted). This comes
///   first because a credential change clears `PR_SET_PDEATHSIG`;
/// * clears `FD_CLOEXEC` on `keep_fd`, if any (a worker's end of its
///   socketpair) so it survives `exec`, while every other descriptor of the
///   watcher (all opened with `O_CLOEXEC`) is closed;
/// * asks for `SIGTERM` when the watcher dies (`PR_SET_PDEATHSIG`), and
///   exits at once if the watcher is already gone;
/// * moves the worker into its own process group, so a terminal's Ctrl-C
///   reaches only the watcher, which then stops the workers in order.
pub(crate) fn prepare_child_exec(
    cmd: &mut tokio::process::Command,
    keep_fd: Option<RawFd>,
    creds: Option<Credentials>,
) {
    // SAFETY: the closure runs in the child between fork and exec, where
    // only async-signal-safe calls are allowed. It calls setgroups, setgid,
    // setuid, getppid, fcntl, prctl, setpgid and _exit through libc: system
    // call wrappers that neither allocate nor take locks (the child has a
    // single thread, so glibc's set*id need not signal other threads). It
    // captures integers and `Option`s of integers by value; the null pointer
    // passed to setgroups with a count of 0 is never read.
    let watcher_pid = std::process::id() as libc::pid_t;
    unsafe {
        cmd.pre_exec(move || {
            if let Some(creds) = creds {
                if libc::setgroups(0, std::ptr::null()) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(gid) = creds.gid {
                    if libc::setgid(gid) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if let Some(uid) = creds.uid {
                    if libc::setuid(uid) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            if let Some(keep_fd) = keep_fd {
                let flags = libc::fcntl(keep_fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(keep_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != watcher_pid {
                // The watcher died between fork and prctl: do not start.
                libc::_exit(1);
            }
            if libc::setpgid(0, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sets `FD_CLOEXEC` on a descriptor just taken over, so our own children
/// do not inherit it.
fn set_cloexec(fd: OwnedFd) -> io::Result<OwnedFd> {
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(io::Error::from)?;
    Ok(fd)
}

/// Takes ownership of a descriptor passed to this process through `exec`
/// by the process that started it, and sets `FD_CLOEXEC` on it so that
/// workers do not inherit it (they get their own duplicates over IPC):
///
/// * systemd's socket activation (`LISTEN_FDS`, descriptors from 3 on);
/// * a watcher upgrade (`CLUSTER_UPGRADE`): the old watcher's listeners,
///   pid file lock, control socket and the link to the old watcher.
///
/// The callers (`watcher::systemd::listen_fds`, `watcher::upgrade::take`)
/// guarantee this runs at most once per descriptor number and process,
/// after checking that the descriptors are meant for this process
/// (`LISTEN_PID` is ours; the upgrade's parent pid is our parent's).
pub(crate) fn take_exec_fd(raw: RawFd) -> io::Result<OwnedFd> {
    if raw < 3 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: F_GETFD only reads the descriptor flags; on a closed number it
    // fails with EBADF and touches nothing.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (checked above) and was passed to this
    // process through exec for this process alone (the caller checked the
    // variables naming it are meant for us); the callers take each number
    // once (guarded by a process-wide flag), so no other OwnedFd will ever
    // close it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_cloexec(fd)
}

/// Installs the hook that runs in the forked child before `exec` when a
/// watcher starts its successor (an upgrade): it clears `FD_CLOEXEC` on
/// `keep` (the listeners, the pid file lock, the control socket and the
/// link), so exactly these survive `exec` at the same numbers. Unlike a
/// worker, the new watcher gets no parent-death signal and stays in the
/// old watcher's process group and session: it must outlive the old one.
pub(crate) fn prepare_upgrade_exec(cmd: &mut tokio::process::Command, keep: Vec<RawFd>) {
    // SAFETY: the closure runs in the child between fork and exec, where
    // only async-signal-safe calls are allowed. It only reads the vector it
    // owns (allocated before the fork; nothing is allocated or freed in the
    // child) and calls fcntl through libc, a system call wrapper that takes
    // no locks.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &keep {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Number of threads of this process (entries of `/proc/self/task`).
fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// `fork(2)`, only while the process has a single thread: the child is a
/// full copy that may do anything the parent could (allocate, take locks,
/// start a runtime). Used to daemonize before any runtime or log thread
/// exists.
///
/// # Errors
///
/// An error when more than one thread runs (the fork is not attempted), or
/// the error of `fork` itself.
pub(crate) fn fork_single_threaded() -> io::Result<nix::unistd::ForkResult> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "cannot fork: the process already runs {threads} threads"
        )));
    }
    // SAFETY: fork is unsafe because, in a multi-threaded process, the child
    // inherits locks (of the allocator, of stdio) that other threads may hold
    // and can then only make async-signal-safe calls. We checked just above
    // that this process runs exactly one thread (this one), and nothing in
    // this function starts another, so no lock can be held by a thread that
    // does not exist in the child: the child may do everything the parent may.
    unsafe { nix::unistd::fork() }.map_err(io::Error::from)
}
