//! Talking to a running watcher through its control socket: one request,
//! one answer, and the exit statuses and error lines every subcommand
//! shares.

use std::process::ExitCode;

use cluster::control::{request, Request, Response};

/// Exit status of every subcommand when the caller may not use the
/// watcher's control socket (LSB: "user had insufficient privilege").
pub(crate) const DENIED: u8 = 4;

/// Whether `e` says the control socket is not ours to use.
pub(crate) fn denied(e: &cluster::Error) -> bool {
    e.io_error()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
}

pub(crate) fn refused(r: Response) -> ExitCode {
    let code = if r.denied { DENIED } else { 1 };
    eprintln!(
        "cluster: error: {}",
        r.error.unwrap_or_else(|| "the watcher refused".into())
    );
    ExitCode::from(code)
}

pub(crate) fn error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("cluster: error: {message}");
    ExitCode::FAILURE
}

pub(crate) async fn ask(target: &crate::cli::Target, req: Request) -> Result<Response, ExitCode> {
    let socket = target.socket().map_err(error)?;
    match request(&socket, &req).await {
        Ok(r) if r.ok => Ok(r),
        Ok(r) => Err(refused(r)),
        Err(e) if denied(&e) => {
            eprintln!("cluster: error: {e}");
            Err(ExitCode::from(DENIED))
        }
        Err(e) => Err(error(e)),
    }
}

/// Whether `pid` is a live process (a zombie waiting for its parent to
/// reap it has exited).
pub(crate) fn running(pid: nix::unistd::Pid) -> bool {
    if nix::sys::signal::kill(pid, None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}
