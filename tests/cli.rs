//! The `cluster` CLI refuses bad input with one clear line and a non-zero
//! exit, leaving no process behind.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;

fn refused(args: &[&str], code: i32, needle: &str) {
    let (status, stderr) = watcher()
        .args(args)
        .spawn()
        .run_to_end(Duration::from_secs(10));
    assert_eq!(status.code(), Some(code), "{args:?}: {stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "{args:?}: one line expected, got:\n{stderr}"
    );
    assert!(stderr.starts_with("cluster: error: "), "{stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: {stderr:?} lacks {needle:?}"
    );
}

#[test]
fn unknown_option() {
    refused(&["--bogus", "/bin/true"], 2, "--bogus");
}

#[test]
fn zero_workers() {
    refused(&["--workers", "0", "/bin/true"], 2, "at least 1");
}

#[test]
fn missing_program() {
    refused(
        &["--workers", "1", "/nonexistent/program"],
        1,
        "program not found",
    );
    refused(
        &["--workers", "1", "no-such-program-in-path-xyz"],
        1,
        "program not found",
    );
}

#[test]
fn missing_program_argument() {
    refused(&["--workers", "1"], 2, "PROGRAM");
}

#[test]
fn non_executable_program() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("script");
    std::fs::write(&file, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused(
        &["--workers", "1", file.to_str().unwrap()],
        1,
        "not executable",
    );
}

#[test]
fn unwritable_pid_file_location() {
    refused(
        &[
            "--workers",
            "1",
            "--pid-file",
            "/nonexistent-dir/x.pid",
            "/bin/sleep",
            "10",
        ],
        1,
        "cannot create pid file /nonexistent-dir/x.pid",
    );
}

#[test]
fn bad_log_level() {
    refused(
        &["--log-level", "not a level!!", "/bin/true"],
        2,
        "--log-level",
    );
}

#[test]
fn help_and_version_succeed() {
    let out = cli(["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--workers",
        "--pid-file",
        "--shutdown-timeout",
        "--backlog",
        "--log-level",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    let out = cli(["--version"]);
    assert!(out.status.success());
}
