//! The worker's own `execve`, for workers that must see their own pid in
//! their environment (`LISTEN_PID`, `WATCHDOG_PID`) or inherit sockets at
//! fixed numbers (`--listen`, `--notify`): the environment, argument list
//! and program path std would use, computed before the fork into a
//! [`ChildExec`] (the async-signal-safe half, in `sys.rs`).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::sys::ChildExec;

/// Variables whose value is the child's own pid, set in the child.
pub(crate) const PID_VARS: [&str; 2] = ["LISTEN_PID", "WATCHDOG_PID"];

/// What `cmd` would exec, with `moves` (`dup2(from, to)`) done first and
/// the [`PID_VARS`] it sets replaced by the child's pid.
///
/// # Errors
///
/// `NotFound` when the program is not found on `PATH`, `InvalidInput` for
/// a string with a NUL byte.
pub(crate) fn child_exec(
    cmd: &std::process::Command,
    moves: Vec<(RawFd, RawFd)>,
) -> io::Result<ChildExec> {
    let mut env: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    for (key, value) in cmd.get_envs() {
        match value {
            Some(v) => env.insert(key.to_owned(), v.to_owned()),
            None => env.remove(key),
        };
    }
    let program = cmd.get_program();
    let path = find_program(
        program,
        env.get(OsStr::new("PATH")).map(|p| p.as_os_str()),
        cmd.get_current_dir(),
    )
    .map_err(|why| io::Error::new(io::ErrorKind::NotFound, why))?;
    let argv: Vec<OsString> = std::iter::once(program.to_owned())
        .chain(cmd.get_args().map(|a| a.to_owned()))
        .collect();
    let env: Vec<(OsString, OsString)> = env.into_iter().collect();
    ChildExec::new(path.as_os_str(), &argv, &env, &PID_VARS, moves)
}

/// The path `execvp` would run for `program`: as it is when it has a
/// slash, else the first executable file in `path` (the child's `PATH`;
/// `/bin:/usr/bin` without one), relative paths seen from the child's
/// directory `cwd`. The error says why none would run.
pub(crate) fn find_program(
    program: &OsStr,
    path: Option<&OsStr>,
    cwd: Option<&Path>,
) -> Result<PathBuf, String> {
    let shown = Path::new(program).display();
    let candidates: Vec<PathBuf> = if program.as_bytes().contains(&b'/') {
        vec![PathBuf::from(program)]
    } else {
        std::env::split_paths(path.unwrap_or(OsStr::new("/bin:/usr/bin")))
            .map(|dir| match dir.as_os_str().is_empty() {
                true => PathBuf::from(".").join(program),
                false => dir.join(program),
            })
            .collect()
    };
    let mut found_not_executable = None;
    for candidate in candidates {
        let seen_from_here = match cwd {
            Some(cwd) if candidate.is_relative() => cwd.join(&candidate),
            _ => candidate.clone(),
        };
        match std::fs::metadata(&seen_from_here) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => return Ok(candidate),
            Ok(m) if m.is_dir() => found_not_executable = Some(format!("{shown} is a directory")),
            Ok(_) => found_not_executable = Some(format!("{shown} is not executable")),
            Err(_) => {}
        }
    }
    Err(found_not_executable.unwrap_or_else(|| format!("program not found: {shown}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_resolve_as_execvp_would() {
        let sh = find_program(
            OsStr::new("sh"),
            Some(OsStr::new("/nonexistent:/bin")),
            None,
        )
        .unwrap();
        assert_eq!(sh, Path::new("/bin/sh"));
        let abs = find_program(OsStr::new("/bin/sh"), None, None).unwrap();
        assert_eq!(abs, Path::new("/bin/sh"));
        let missing = find_program(OsStr::new("./nope"), None, None).unwrap_err();
        assert_eq!(missing, "program not found: ./nope");
        let dir = find_program(OsStr::new("/bin"), None, None).unwrap_err();
        assert_eq!(dir, "/bin is a directory");
        assert!(find_program(
            OsStr::new("no-such-program-here"),
            Some(OsStr::new("/bin")),
            None
        )
        .is_err());
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        let prog = dir.path().join("bin/prog");
        std::fs::write(&prog, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        let found = find_program(
            OsStr::new("prog"),
            Some(OsStr::new("bin")),
            Some(dir.path()),
        )
        .unwrap();
        assert_eq!(
            found,
            Path::new("bin/prog"),
            "relative to the child's directory"
        );
    }

    #[test]
    fn the_environment_is_the_commands() {
        let mut cmd = std::process::Command::new("/bin/true");
        cmd.env("CLUSTER_TEST_X", "1")
            .env("LISTEN_PID", "")
            .env_remove("HOME");
        assert!(child_exec(&cmd, Vec::new()).is_ok());
        cmd.env("BAD", "a\0b");
        assert!(child_exec(&cmd, Vec::new()).is_err());
    }
}
