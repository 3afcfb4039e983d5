//! Pipe ends: the connected Unix `SOCK_SEQPACKET` sockets that the client
//! socket pipes (`pipe.rs`) and the server socket pipes (`server_pipe/`)
//! run on. [`pipe_pair`] makes a pair, [`inherited_pipe`] takes the end a
//! parent passed through `exec`, and [`channel`] checks an end and wraps it
//! for the current tokio runtime.

use std::collections::HashSet;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::Mutex;

use socket2::{Domain, SockRef, Type};

use crate::error::{Error, Kind, Result};
use crate::ipc::Channel;
use crate::sys;

/// Creates a connected pair of `SOCK_SEQPACKET` Unix sockets, both ends
/// close-on-exec: the two ends of a client socket pipe
/// ([`ClientSocketSendPipe`](crate::ClientSocketSendPipe) and
/// [`ClientSocketReceivePipe`](crate::ClientSocketReceivePipe)) or of a
/// server socket pipe ([`ServerSocketPipeProvider::provide_for`](crate::ServerSocketPipeProvider::provide_for)
/// and [`ServerSocketPipeFactory`](crate::ServerSocketPipeFactory)).
///
/// Either end may be used for either direction. To give one end to a child
/// process it must survive `exec`: clear `FD_CLOEXEC` on the child's end
/// just before spawning, name its number in the child's environment, close
/// it in the parent once the child runs, and take it in the child with
/// [`inherited_pipe`]. When that is impractical, let the child connect to a
/// [`ClientSocketPipeListener`](crate::ClientSocketPipeListener) instead.
///
/// # Errors
///
/// An error for which [`Error::is_ipc`] is true when `socketpair(2)` fails
/// (for example at the descriptor limit).
pub fn pipe_pair() -> Result<(OwnedFd, OwnedFd)> {
    crate::ipc::pair().map_err(|e| Error::with_io(Kind::Ipc, "cannot create a pipe socketpair", e))
}

/// Descriptor numbers [`inherited_pipe`] has taken in this process.
static TAKEN: Mutex<Option<HashSet<RawFd>>> = Mutex::new(None);

/// Takes the pipe end a parent passed to this process through `exec`: the
/// Unix `SOCK_SEQPACKET` socket whose descriptor number the environment
/// variable `var` names (`SERVER_PIPE_FD=3`, say). It is set close-on-exec,
/// so this process's own children do not inherit it.
///
/// The parent makes its end of a [`pipe_pair`] inheritable (clears
/// `FD_CLOEXEC`, for example with
/// `nix::fcntl::fcntl(&fd, F_SETFD(FdFlag::empty()))`), spawns the child
/// with `var` set to that number, and closes its copy once the child runs:
/// `examples/server_socket_pipe.rs` does this. Take the descriptor early in
/// `main`: each number is taken at most once per process, and the
/// descriptor is checked to be a Unix `SOCK_SEQPACKET` socket (anything else
/// at that number is left alone).
///
/// # Errors
///
/// An error for which [`Error::is_ipc`] is true when `var` is unset or not
/// a descriptor number, when nothing suitable is open at that number (a
/// closed descriptor, a standard stream, a descriptor that is not a Unix
/// `SOCK_SEQPACKET` socket), when the number was taken already, or when it
/// is the watcher's own socket of a `cluster` worker (`CLUSTER_IPC_FD`).
pub fn inherited_pipe(var: &str) -> Result<OwnedFd> {
    let bad = |why: String| Error::new(Kind::Ipc, format!("no inherited pipe in {var}: {why}"));
    let value = std::env::var(var).map_err(|e| bad(e.to_string()))?;
    let raw: RawFd = value
        .trim()
        .parse()
        .map_err(|_| bad(format!("{value:?} is not a descriptor number")))?;
    let ipc_fd = std::env::var(crate::ipc::env::IPC_FD).ok();
    if ipc_fd.and_then(|v| v.trim().parse::<RawFd>().ok()) == Some(raw) {
        return Err(bad(format!(
            "descriptor {raw} is the watcher's socket ({})",
            crate::ipc::env::IPC_FD
        )));
    }
    let mut taken = TAKEN.lock().unwrap_or_else(|p| p.into_inner());
    let taken = taken.get_or_insert_with(HashSet::new);
    if taken.contains(&raw) {
        return Err(bad(format!("descriptor {raw} was taken already")));
    }
    let fd =
        sys::take_inherited_seqpacket(raw).map_err(|e| bad(format!("descriptor {raw}: {e}")))?;
    taken.insert(raw);
    Ok(fd)
}

/// Checks that `fd` is a Unix `SOCK_SEQPACKET` socket; `what` names the
/// pipe in the error ("a client socket pipe").
fn check_seqpacket(fd: &OwnedFd, what: &str) -> Result<()> {
    let sock = SockRef::from(fd);
    let message = format!("{what} needs a Unix SOCK_SEQPACKET socket");
    let ty = sock
        .r#type()
        .map_err(|e| Error::with_io(Kind::Ipc, message.clone(), e))?;
    let domain = sock
        .domain()
        .map_err(|e| Error::with_io(Kind::Ipc, message.clone(), e))?;
    if ty != Type::SEQPACKET || domain != Domain::UNIX {
        return Err(Error::new(Kind::Ipc, message));
    }
    Ok(())
}

/// Wraps a checked pipe end in a [`Channel`] on the current runtime; `what`
/// names the pipe in errors. `fd` is closed on every error.
pub(crate) fn channel(fd: OwnedFd, what: &str) -> Result<Channel> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::new(
            Kind::Ipc,
            format!("{what} must be created within a tokio runtime"),
        ));
    }
    check_seqpacket(&fd, what)?;
    Channel::new(fd).map_err(|e| Error::with_io(Kind::Ipc, format!("cannot set up {what}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, IntoRawFd};

    #[test]
    fn inherited_pipe_takes_a_seqpacket_once() {
        let (a, _b) = pipe_pair().unwrap();
        let raw = a.into_raw_fd(); // "inherited": owned by nobody now
        let var = "CLUSTER_TEST_INHERITED_PIPE_A";
        std::env::set_var(var, raw.to_string());
        let fd = inherited_pipe(var).unwrap();
        assert_eq!(fd.as_raw_fd(), raw);
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        // The same number again is refused (it is owned now).
        assert!(inherited_pipe(var).unwrap_err().is_ipc());
    }

    #[test]
    fn inherited_pipe_refuses_other_descriptors() {
        let var = "CLUSTER_TEST_INHERITED_PIPE_B";
        let (r, _w) = nix::unistd::pipe().unwrap();
        for value in ["", "x", "0", "2", "-1", &r.as_raw_fd().to_string()] {
            std::env::set_var(var, value);
            assert!(inherited_pipe(var).unwrap_err().is_ipc(), "{value:?}");
        }
        // The pipe was left alone: still open and ours.
        assert!(nix::fcntl::fcntl(&r, nix::fcntl::FcntlArg::F_GETFD).is_ok());
        std::env::remove_var(var);
        assert!(inherited_pipe(var).unwrap_err().is_ipc());
    }
}
