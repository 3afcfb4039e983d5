//! The axum example (`examples/axum.rs`, feature `axum`) with the real
//! binary: standalone, and under `cluster` in every balance mode, served
//! through `axum::serve(cluster::Listener, ..)` with
//! `with_graceful_shutdown(Cluster::await_termination())`.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

#[test]
fn axum_example_serves_standalone_and_stops_on_sigterm() {
    let port = free_port();
    let mut child = std::process::Command::new(example("axum"))
        .arg(format!("127.0.0.1:{port}"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let answered = wait_for(T, || http_get(port).ok());
    signal(child.id(), nix::sys::signal::Signal::SIGTERM);
    let exited = wait_for(T, || child.try_wait().ok().flatten());
    if exited.is_none() {
        let _ = child.kill();
    }
    let r = answered.expect("serving standalone");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-worker-id"), Some("standalone"));
    assert!(exited.expect("exits on SIGTERM").success());
}

#[test]
fn axum_example_serves_under_cluster_in_every_balance_mode() {
    for mode in [
        "shared",
        "reuseport",
        "round-robin",
        "least-connections",
        "ip-hash",
    ] {
        let port = free_port();
        let mut c = watcher()
            .workers(2)
            .pid_file()
            .args(["--balance", mode, "--log-format", "json"])
            .start(example("axum"), &[&format!("127.0.0.1:{port}")]);
        c.wait_workers(2, T);
        let r = c.wait_serving(port, T);
        assert_eq!(r.status, 200, "{mode}");
        assert!(r.body.contains("Hello from axum"), "{mode}: {}", r.body);
        let id = r.header("x-worker-id").unwrap_or("").to_string();
        assert!(
            id.parse::<u64>().is_ok(),
            "{mode}: a worker answered, not {id:?}"
        );
        let j = http_get_path(port, "/json").unwrap();
        let v: serde_json::Value = serde_json::from_str(&j.body).unwrap();
        assert!(
            v["client"].as_str().unwrap_or("").starts_with("127.0.0.1:"),
            "{mode}: ConnectInfo<PeerAddr> is the client: {v}"
        );
        // A rolling restart through the graceful shutdown.
        let out = c.control(&["reload"]);
        assert!(
            out.status.success(),
            "{mode}: reload: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            http_get(port).unwrap().status,
            200,
            "{mode}: after the reload"
        );
        c.signal(nix::sys::signal::Signal::SIGTERM);
        let (status, stderr) = c.run_to_end(T);
        assert!(status.success(), "{mode}: {stderr}");
        // Typed fields from Cluster::log_layer(): status is a number.
        let served = stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == "served")
            .unwrap_or_else(|| panic!("{mode}: no request record in\n{stderr}"));
        assert_eq!(served["fields"]["status"], 200, "{mode}: {served}");
        assert!(served["fields"]["micros"].is_u64(), "{mode}: {served}");
        let drained = stderr.matches("drained; exiting").count();
        assert!(
            drained >= 4,
            "{mode}: 2 reloaded + 2 stopped workers drained, saw {drained}:\n{stderr}"
        );
    }
}
