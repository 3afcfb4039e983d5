//! OS glue: the only module of the crate with `unsafe` code.
//!
//! Everything here is a thin, audited wrapper over a system call whose
//! soundness argument is local: taking ownership of file descriptors that
//! arrive with `SCM_RIGHTS`, through `exec` (systemd's socket activation,
//! a watcher upgrade), probing an inherited descriptor without owning it,
//! the `pre_exec` hooks that run in the forked child between `fork` and
//! `exec` (with [`ChildExec`], the worker's own `execve` with its pid
//! patched into a prepared environment; a new watcher's kept descriptors),
//! and the daemon's `fork` while the process is still single-threaded.

use std::ffi::{c_char, CString};
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
    /// The sender's pid from `SCM_CREDENTIALS`, on a socket with
    /// `SO_PASSCRED` (the kernel checks it: a process cannot claim
    /// another's pid without `CAP_SYS_ADMIN`).
    pub pid: Option<i32>,
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

/// Receives one datagram with `MSG_CMSG_CLOEXEC` and `MSG_DONTWAIT`, with
/// the sender's credentials when the socket has `SO_PASSCRED`.
pub(crate) fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut cmsg_buf = nix::cmsg_space!([RawFd; SCM_MAX_FD], socket::UnixCredentials);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg_buf),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    let mut pid = None;
    let ctrunc = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    if let Ok(cmsgs) = msg.cmsgs() {
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmCredentials(creds) = &cmsg {
                pid = Some(creds.pid());
            }
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
        pid,
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

/// Takes ownership of a Unix `SOCK_SEQPACKET` socket that this process
/// inherited through `exec` at descriptor number `raw` (a pipe end a parent
/// named in an environment variable), and sets `FD_CLOEXEC` on it. Anything
/// else at `raw` (nothing, a standard stream, another kind of descriptor) is
/// refused and left alone.
///
/// The caller (`pipe_end::inherited_pipe`) guarantees this runs at most
/// once per descriptor number and process, and never for the number of the
/// watcher's own socket (`CLUSTER_IPC_FD`), which the worker module takes.
pub(crate) fn take_inherited_seqpacket(raw: RawFd) -> io::Result<OwnedFd> {
    if raw < 3 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    let int_opt = |name: libc::c_int| -> io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are valid for writes of the sizes
        // passed; getsockopt on a closed number or a non-socket fails
        // (EBADF, ENOTSOCK) without side effects, and takes no ownership.
        let rc = unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_SOCKET,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(value)
    };
    if int_opt(libc::SO_DOMAIN)? != libc::AF_UNIX || int_opt(libc::SO_TYPE)? != libc::SOCK_SEQPACKET
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a Unix SOCK_SEQPACKET socket",
        ));
    }
    // SAFETY: the descriptor is open (getsockopt succeeded on it) and is the
    // seqpacket socket the parent passed through exec for this process; the
    // caller takes each number once (a process-wide set) and never the
    // worker's IPC descriptor, so no other OwnedFd will ever close it.
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
///   reaches only the watcher, which then stops the workers in order;
/// * with `exec`, moves the inherited sockets to their numbers, writes the
///   child's pid into its prepared environment and calls `execve` itself
///   (see [`ChildExec`]).
pub(crate) fn prepare_child_exec(
    cmd: &mut tokio::process::Command,
    keep_fd: Option<RawFd>,
    creds: Option<Credentials>,
    exec: Option<ChildExec>,
) {
    let watcher_pid = std::process::id() as libc::pid_t;
    let mut exec = exec;
    // SAFETY: the closure runs in the child between fork and exec, where
    // only async-signal-safe calls are allowed. It calls setgroups, setgid,
    // setuid, getppid, fcntl, prctl, setpgid and _exit through libc: system
    // call wrappers that neither allocate nor take locks (the child has a
    // single thread, so glibc's set*id need not signal other threads). It
    // captures integers, `Option`s of integers and a `ChildExec` by value;
    // the null pointer passed to setgroups with a count of 0 is never read.
    // `ChildExec::run` only calls dup2, getpid, execve and write and writes
    // into memory it owns, allocated before the fork (see there); the
    // closure runs once per fork, in a child that has one thread, and the
    // parent never runs it (it only drops it, freeing those buffers).
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
            match exec.as_mut() {
                // Returns only when execve failed.
                Some(exec) => Err(exec.run()),
                None => Ok(()),
            }
        });
    }
}

/// Room for a pid in a prepared environment entry: `u32::MAX` has 10 digits.
const PID_WIDTH: usize = 10;

/// A null-terminated array of C string pointers, filled in the child.
struct Pointers(Vec<*const c_char>);

// SAFETY: the pointers are null until the forked child fills them (in
// `ChildExec::run`) with the addresses of strings owned by the same
// `ChildExec`; the parent never dereferences them, and the child has one
// thread. Moving or sharing the array between the parent's threads (as
// `pre_exec` requires of its closure) therefore shares no live pointer.
unsafe impl Send for Pointers {}
// SAFETY: as for `Send`: nothing reads the pointers in the parent.
unsafe impl Sync for Pointers {}

/// The end of a worker's start when it must see its own pid in its
/// environment (`LISTEN_PID`, `WATCHDOG_PID`) or inherit sockets at fixed
/// numbers (`LISTEN_FDS`: 3, 4, ...).
///
/// std's `Command` builds the child's environment before `fork` and offers
/// no way to change it afterwards, and the child's pid is only known after
/// the fork. So the hook ends with its own `execve`: every string and array
/// is allocated here, before the fork, with [`PID_WIDTH`] bytes reserved
/// where a pid goes; the child only copies digits into that room, fills the
/// pre-sized pointer arrays, calls `dup2` for the sockets and `execve`. No
/// allocation, no lock, no `environ` swap.
pub(crate) struct ChildExec {
    path: CString,
    argv: Vec<CString>,
    /// `KEY=VALUE\0` entries.
    env: Vec<Vec<u8>>,
    /// (entry, offset of its value): entries whose value becomes the pid.
    pid_slots: Vec<(usize, usize)>,
    /// `dup2(from, to)` in the child, in order; every `from` is above
    /// every `to`, so no move overwrites a descriptor a later one reads.
    moves: Vec<(RawFd, RawFd)>,
    /// Written to stderr (the watcher's capture pipe) if `execve` fails.
    failed_line: Vec<u8>,
    argv_ptrs: Pointers,
    env_ptrs: Pointers,
}

impl ChildExec {
    /// Prepares `execve(path, argv, env)`, where the variables named in
    /// `pid_keys` get the child's pid, after `moves` (`dup2(from, to)`).
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a string with a NUL byte, or moves whose sources
    /// are not all above their targets (or a target below 3).
    pub(crate) fn new(
        path: &std::ffi::OsStr,
        argv: &[std::ffi::OsString],
        env: &[(std::ffi::OsString, std::ffi::OsString)],
        pid_keys: &[&str],
        moves: Vec<(RawFd, RawFd)>,
    ) -> io::Result<ChildExec> {
        use std::os::unix::ffi::OsStrExt;
        let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, why.to_string());
        let cstr = |s: &std::ffi::OsStr| CString::new(s.as_bytes()).map_err(|_| bad("NUL byte"));
        let highest_target = moves.iter().map(|m| m.1).max().unwrap_or(2);
        if moves
            .iter()
            .any(|&(from, to)| to < 3 || from <= highest_target)
        {
            return Err(bad("descriptor moves overlap"));
        }
        let mut entries = Vec::with_capacity(env.len());
        let mut pid_slots = Vec::new();
        for (key, value) in env {
            let mut entry = key.as_bytes().to_vec();
            if entry.contains(&0) || entry.contains(&b'=') || value.as_bytes().contains(&0) {
                return Err(bad("bad environment variable"));
            }
            entry.push(b'=');
            if pid_keys.iter().any(|k| k.as_bytes() == key.as_bytes()) {
                pid_slots.push((entries.len(), entry.len()));
                entry.extend_from_slice(&[b'0'; PID_WIDTH]);
            } else {
                entry.extend_from_slice(value.as_bytes());
            }
            entry.push(0);
            entries.push(entry);
        }
        let argv = argv
            .iter()
            .map(|a| cstr(a))
            .collect::<io::Result<Vec<_>>>()?;
        let mut failed_line = b"cluster: cannot execute ".to_vec();
        failed_line.extend_from_slice(path.as_bytes());
        failed_line.push(b'\n');
        Ok(ChildExec {
            path: cstr(path)?,
            argv_ptrs: Pointers(vec![std::ptr::null(); argv.len() + 1]),
            env_ptrs: Pointers(vec![std::ptr::null(); entries.len() + 1]),
            argv,
            env: entries,
            pid_slots,
            moves,
            failed_line,
        })
    }

    /// In the child: moves the descriptors, writes the pid, execs. Returns
    /// only on failure, with the error.
    ///
    /// Async-signal-safe: dup2, getpid, execve and write are system calls;
    /// everything else writes bytes and pointers into buffers allocated
    /// before the fork, through iterators that cannot panic.
    fn run(&mut self) -> io::Error {
        for &(from, to) in &self.moves {
            // SAFETY: dup2 on descriptors the parent kept open across the
            // fork; it closes whatever `to` was in this child only.
            if unsafe { libc::dup2(from, to) } < 0 {
                return io::Error::last_os_error();
            }
        }
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() }.unsigned_abs();
        let mut digits = [0u8; PID_WIDTH];
        let digits = decimal(pid, &mut digits);
        for &(entry, at) in &self.pid_slots {
            if let Some(room) = self.env.get_mut(entry).and_then(|e| e.get_mut(at..)) {
                for (dst, src) in room.iter_mut().zip(digits.iter().chain([&0u8])) {
                    *dst = *src;
                }
            }
        }
        for (ptr, entry) in self.env_ptrs.0.iter_mut().zip(&self.env) {
            *ptr = entry.as_ptr().cast();
        }
        for (ptr, arg) in self.argv_ptrs.0.iter_mut().zip(&self.argv) {
            *ptr = arg.as_ptr();
        }
        // SAFETY: the path and every argv/env entry are NUL-terminated
        // strings owned by `self`, and both pointer arrays end with the null
        // pointer they were created with (one more slot than entries).
        unsafe {
            libc::execve(
                self.path.as_ptr(),
                self.argv_ptrs.0.as_ptr(),
                self.env_ptrs.0.as_ptr(),
            )
        };
        let error = io::Error::last_os_error();
        // SAFETY: writes bytes from a live buffer to stderr; the result is
        // irrelevant (the error is reported either way).
        let _ = unsafe {
            libc::write(
                libc::STDERR_FILENO,
                self.failed_line.as_ptr().cast(),
                self.failed_line.len(),
            )
        };
        error
    }
}

/// Writes `n` in decimal into the end of `buf`, returning the digits.
fn decimal(mut n: u32, buf: &mut [u8; PID_WIDTH]) -> &[u8] {
    let mut start = PID_WIDTH;
    for slot in buf.iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        start -= 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.get(start..).unwrap_or_default()
}

/// A duplicate of `fd` numbered `min` or above, with `FD_CLOEXEC` (so that
/// a child's `dup2` to low numbers never overwrites a source it still needs).
pub(crate) fn dup_above(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only creates a new descriptor (or fails).
    let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl just returned this new descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
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
///   pid file lock, control socket and the links to the old watcher.
///
/// The callers (`activation::inherited`, `watcher::upgrade::take`)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_digits() {
        let mut buf = [0u8; PID_WIDTH];
        assert_eq!(decimal(0, &mut buf), b"0");
        assert_eq!(decimal(4242, &mut buf), b"4242");
        assert_eq!(decimal(u32::MAX, &mut buf), b"4294967295");
    }

    #[test]
    fn child_exec_refuses_overlapping_moves_and_nul_bytes() {
        let env = [("A".into(), "1".into())];
        let argv = ["x".into()];
        assert!(ChildExec::new("x".as_ref(), &argv, &env, &[], vec![(10, 3), (11, 4)]).is_ok());
        assert!(ChildExec::new("x".as_ref(), &argv, &env, &[], vec![(4, 3), (11, 4)]).is_err());
        assert!(ChildExec::new("x".as_ref(), &argv, &env, &[], vec![(10, 2)]).is_err());
        let nul = [("A".into(), "1\0".into())];
        assert!(ChildExec::new("x".as_ref(), &argv, &nul, &[], vec![]).is_err());
        let e = ChildExec::new("x".as_ref(), &argv, &env, &["A"], vec![]).unwrap();
        assert_eq!(e.env[0], b"A=0000000000\0");
        assert_eq!(e.pid_slots, [(0, 2)]);
    }
}
