//! `ClusterWatcher` driven from code, with real worker processes.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use cluster::{ClusterWatcher, WorkerState};
use common::*;

#[tokio::test(flavor = "current_thread")]
async fn builder_start_workers_stop() {
    let port = free_port();
    let mut cmd = std::process::Command::new(example("test_worker"));
    cmd.args(["serve", &format!("127.0.0.1:{port}")]);
    let watcher = ClusterWatcher::builder(cmd)
        .workers(3)
        .shutdown_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    watcher.start().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let workers = loop {
        let w = watcher.workers().await;
        if w.len() == 3 && w.iter().all(|w| w.state == WorkerState::Ready) {
            break w;
        }
        assert!(tokio::time::Instant::now() < deadline, "not ready: {w:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let slots: Vec<u32> = workers.iter().map(|w| w.slot).collect();
    assert_eq!(slots, [1, 2, 3]);
    let contexts: HashSet<u64> = workers.iter().map(|w| w.context_id).collect();
    assert_eq!(contexts.len(), 3);
    let r = tokio::task::spawn_blocking(move || http_get(port))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);
    let pid: u32 = r.header("x-worker-pid").unwrap().parse().unwrap();
    assert!(workers.iter().any(|w| w.pid == pid));

    watcher.stop(Duration::from_secs(5)).await.unwrap();
    for w in &workers {
        assert!(!alive(w.pid), "worker {} still alive", w.pid);
    }
    assert!(watcher.workers().await.is_empty());
    // A stopped watcher takes no more requests, and a second start is refused.
    assert!(watcher.restart().await.unwrap_err().is_closed());
    assert!(watcher.scale(2).await.unwrap_err().is_closed());
    assert!(watcher.broadcast(&1u8).unwrap_err().is_closed());
    assert!(watcher.start().await.unwrap_err().is_already_started());
}

#[tokio::test(flavor = "current_thread")]
async fn zero_workers_and_missing_program_are_refused() {
    let err = ClusterWatcher::builder(std::process::Command::new("/bin/true"))
        .workers(0)
        .build()
        .unwrap_err();
    assert!(err.is_config(), "{err}");
    let err = ClusterWatcher::builder(std::process::Command::new("/nonexistent/x"))
        .build()
        .unwrap_err();
    assert!(err.is_spawn(), "{err}");
}

#[test]
fn workers_inherit_no_descriptor_but_their_channel() {
    let mut c = watcher()
        .workers(1)
        .pid_file()
        .arg("--")
        .start("/bin/sleep", &["100"]);
    let worker = c.wait_workers(1, Duration::from_secs(15))[0];
    let mut sockets = 0;
    for entry in std::fs::read_dir(format!("/proc/{worker}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        let target = target.to_string_lossy().to_string();
        assert!(
            !target.contains("x.pid"),
            "the pid file leaked into the worker"
        );
        if target.starts_with("socket:") {
            sockets += 1;
        }
    }
    assert_eq!(sockets, 1, "only the IPC socket");
    let environ = std::fs::read(format!("/proc/{worker}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(environ.contains(&format!("CLUSTER_WATCHER_PID={}", c.pid)));
    assert!(environ.contains("CLUSTER_SLOT=1"));
}
