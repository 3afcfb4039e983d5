//! The watcher's filter reaches the workers and is an `EnvFilter`; JSON
//! logs keep their types; printed JSON objects stay objects; stderr is
//! logged at WARN. With the real binary and real workers.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

fn json_lines(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Runs `test_worker ARGS` under `cluster OPTIONS` until `until` is in its
/// log, stops it, and returns the log.
fn run(options: &[&str], args: &[&str], until: &str) -> String {
    let mut c = watcher()
        .inherit_rust_log()
        .workers(1)
        .args(options)
        .start(example("test_worker"), args);
    wait_for(T, || c.stderr().contains(until).then_some(()))
        .unwrap_or_else(|| panic!("no {until:?} in\n{}", c.stderr()));
    c.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, stderr) = c.run_to_end(T);
    assert!(status.success(), "{stderr}");
    stderr
}

#[test]
fn a_trace_flood_under_log_level_info_loses_no_info_record() {
    let stderr = run(&["--log-level", "info"], &["trace", "50000"], "done");
    assert!(!stderr.contains("dropped"), "{stderr}");
    assert!(
        !stderr.contains("noise"),
        "trace records are filtered in the worker"
    );
    assert!(stderr.contains("done n=50000 ok=true"), "{stderr}");
}

#[test]
fn log_level_takes_envfilter_span_and_field_directives() {
    let stderr = run(
        &["--log-level", "info,[req{user=ann}]=debug"],
        &["trace", "10"],
        "done",
    );
    assert!(stderr.contains("ann's"), "{stderr}");
    assert!(!stderr.contains("bob's"), "{stderr}");
    let (status, err) = cluster_output(&["--log-level", "info,=x=y", "/bin/true"], T).map_parts();
    assert_eq!(status, Some(2), "{err}");
    assert!(
        err.starts_with("cluster: error: invalid --log-level"),
        "{err}"
    );
}

#[test]
fn json_logs_keep_numbers_and_booleans_typed() {
    let stderr = run(
        &["--log-format", "json", "--log-level", "info"],
        &["trace", "5"],
        "\"done\"",
    );
    let done = json_lines(&stderr)
        .into_iter()
        .find(|v| v["message"] == "done")
        .expect("the done record");
    assert_eq!(done["fields"]["n"], 5, "{done}");
    assert_eq!(done["fields"]["ok"], true, "{done}");
    assert_eq!(done["slot"], 1);
}

#[test]
fn a_json_object_on_stdout_stays_an_object_and_stderr_is_a_warning() {
    let stderr = run(&["--log-format", "json"], &["jsonprint"], "panicked");
    let lines = json_lines(&stderr);
    let out = lines
        .iter()
        .find(|v| v["source"] == "stdout")
        .unwrap_or_else(|| panic!("{stderr}"));
    assert_eq!(out["message"], "listening");
    assert_eq!(out["fields"]["port"], 8080, "{out}");
    assert_eq!(out["fields"]["tls"], false);
    assert_eq!(out["fields"]["tags"], serde_json::json!(["a", "b"]));
    assert_eq!(out["level"], "INFO");
    let err = lines.iter().find(|v| v["source"] == "stderr").unwrap();
    assert_eq!(
        err["level"], "WARN",
        "a panic on stderr is a warning: {err}"
    );

    let stderr = run(
        &["--log-format", "json", "--stderr-level", "error"],
        &["jsonprint"],
        "panicked",
    );
    let err = json_lines(&stderr)
        .into_iter()
        .find(|v| v["source"] == "stderr")
        .unwrap();
    assert_eq!(err["level"], "ERROR");
}

trait Parts {
    fn map_parts(self) -> (Option<i32>, String);
}

impl Parts for (std::process::ExitStatus, String, String) {
    fn map_parts(self) -> (Option<i32>, String) {
        (self.0.code(), self.2)
    }
}
