//! The examples run without a watcher: the factory binds locally and a
//! signal ends them.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

#[test]
fn hello_http_runs_standalone() {
    let port = free_port();
    let mut child = Command::new(example("hello_http"))
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let r = wait_for(Duration::from_secs(15), || http_get(port).ok());
    let r = match r {
        Some(r) => r,
        None => {
            let _ = child.kill();
            panic!("standalone hello_http did not answer");
        }
    };
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "Hello, World!");
    assert_eq!(r.header("x-worker-id"), Some("standalone"));
    signal(pid, Signal::SIGTERM);
    let status = wait_for(Duration::from_secs(10), || child.try_wait().ok().flatten());
    if status.is_none() {
        let _ = child.kill();
    }
    assert_eq!(status.expect("exits on SIGTERM").code(), Some(0));
}

#[test]
fn cluster_environment_without_the_socket_means_standalone() {
    // A grandchild inherits the variables but not the descriptor: it must
    // not take some other descriptor for the watcher's.
    let port = free_port();
    let mut child = Command::new(example("test_worker"))
        .args(["serve", &format!("127.0.0.1:{port}")])
        .env("CLUSTER_IPC_FD", "0")
        .env("CLUSTER_WATCHER_PID", "1")
        .env("CLUSTER_CONTEXT_ID", "5")
        .env("CLUSTER_SLOT", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let r = wait_for(Duration::from_secs(15), || http_get(port).ok());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r.expect("serves").header("x-worker-id"), Some("standalone"));
}
