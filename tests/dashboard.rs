//! The dashboard (`--http`): its JSON API over real HTTP, and the page in
//! headless Chromium (tests/browser/dashboard.mjs with playwright-core)
//! against a real watcher running the jobs example.
//!
//! The browser tests need /usr/bin/chromium and `npm ci` in tests/browser
//! (`.ci/run` does both). Without them they say so and pass, unless
//! `CLUSTER_BROWSER_TESTS=1` (set by `.ci/run`), where they fail.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cluster::{JobId, JobQueue, JobState, NewJob};
use common::*;
use serde_json::{json, Value};

const START: Duration = Duration::from_secs(20);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One request on a new connection: (status, body as JSON or as text).
fn request(port: u16, method: &str, path: &str, headers: &[&str], body: &str) -> (u16, String) {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let r = parse_response(&raw).expect("an HTTP response");
    (r.status, r.body)
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The error object's kind, checking its shape.
fn error_kind(body: &str) -> String {
    let v = json_of(body);
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    e["kind"].as_str().expect("error.kind").to_string()
}

fn wait_http(c: &Running, port: u16) {
    wait_for(START, || {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
    })
    .unwrap_or_else(|| panic!("the dashboard did not come up; stderr:\n{}", c.stderr()));
}

/// Submits a job of the jobs example that fails once and for all, with an
/// error that is HTML (the page must show it as text).
fn submit_failing(db: &Path) -> JobId {
    rt().block_on(async {
        let q = JobQueue::open(db.to_str().unwrap()).await.unwrap();
        q.submit(
            NewJob::new(json!({"message": "<img src=x onerror=\"window.__xss=1\"> broke"}))
                .name("fail")
                .max_attempts(1),
        )
        .await
        .unwrap()
    })
}

fn job_errors(db: &Path, id: JobId) -> (JobState, usize) {
    rt().block_on(async {
        let q = JobQueue::open(db.to_str().unwrap()).await.unwrap();
        let j = q.get(id).await.unwrap().unwrap();
        (j.state, j.errors.len())
    })
}

#[test]
fn api_answers_json_with_fitting_statuses() {
    let port = free_port();
    let w = watcher().workers(2);
    let db = w.dir().join("jobs.db");
    let mut c = w
        .arg("--http")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--jobs")
        .arg(&db)
        .start(example("jobs"), &[]);
    c.wait_workers(2, START);
    wait_http(&c, port);

    let (status, body) = request(port, "GET", "/api/status", &[], "");
    assert_eq!(status, 200, "{body}");
    let s = json_of(&body);
    assert_eq!(s["workers_wanted"], 2);
    // One watcher's SQLite store has no nodes.
    let (status, body) = request(port, "GET", "/api/nodes", &[], "");
    assert_eq!((status, json_of(&body)), (200, json!([])), "{body}");
    assert_eq!(s["pid"], c.pid);
    assert_eq!(s["workers"].as_array().unwrap().len(), 2);
    assert_eq!(s["jobs"]["pools"][0]["name"], "default");

    // The samples fill in once a second.
    let samples = wait_for(START, || {
        let (_, body) = request(port, "GET", "/api/samples", &[], "");
        let v = json_of(&body);
        let full = v["workers"].as_object().is_some_and(|m| {
            m.len() == 2
                && m.values()
                    .all(|w| w["cpu_history"].as_array().is_some_and(|h| h.len() >= 2))
        });
        full.then_some(v)
    });
    assert!(samples.is_some(), "no CPU history after {START:?}");

    let (status, body) = request(port, "GET", "/metrics", &[], "");
    assert_eq!(status, 200);
    assert!(
        body.contains("cluster_workers{state=\"ready\"} 2"),
        "{body}"
    );

    // Errors: JSON objects, fitting statuses.
    let (status, body) = request(port, "GET", "/nope", &[], "");
    assert_eq!((status, error_kind(&body).as_str()), (404, "not_found"));
    let (status, body) = request(port, "DELETE", "/api/status", &[], "");
    assert_eq!(
        (status, error_kind(&body).as_str()),
        (405, "method_not_allowed")
    );
    let (status, body) = request(port, "POST", "/api/scale", &[], "{\"workers\": -1}");
    assert_eq!((status, error_kind(&body).as_str()), (400, "bad_request"));
    let (status, body) = request(port, "POST", "/api/scale", &[], "not json");
    assert_eq!((status, error_kind(&body).as_str()), (400, "bad_request"));
    let (status, body) = request(port, "GET", "/api/jobs/abc", &[], "");
    assert_eq!((status, error_kind(&body).as_str()), (400, "bad_request"));
    let (status, body) = request(port, "GET", "/api/jobs/12345", &[], "");
    assert_eq!((status, error_kind(&body).as_str()), (404, "not_found"));
    let (status, body) = request(port, "GET", "/api/jobs?state=sleeping", &[], "");
    assert_eq!((status, error_kind(&body).as_str()), (400, "bad_request"));
    let (status, body) = request(port, "GET", "/api/jobs?limit=0", &[], "");
    assert_eq!((status, error_kind(&body).as_str()), (400, "bad_request"));
    let big = "x".repeat(64 * 1024);
    let (status, body) = request(port, "POST", "/api/scale", &[], &big);
    assert_eq!((status, error_kind(&body).as_str()), (400, "bad_request"));

    // A job through the API: listed, shown, retried only when it failed.
    let id = submit_failing(&db);
    let failed = wait_for(START, || {
        (job_errors(&db, id).0 == JobState::Failed).then_some(())
    });
    assert!(failed.is_some(), "{}", c.stderr());
    let (status, body) = request(port, "GET", "/api/jobs?state=failed&queue=default", &[], "");
    assert_eq!(status, 200, "{body}");
    let list = json_of(&body);
    assert_eq!(list[0]["id"], id.get());
    assert!(list[0]["errors"][0]["error"]
        .as_str()
        .unwrap()
        .contains("<img"));
    let (status, body) = request(port, "GET", &format!("/api/jobs/{id}"), &[], "");
    assert_eq!(
        (status, json_of(&body)["state"].as_str()),
        (200, Some("failed"))
    );
    let (status, body) = request(port, "GET", "/api/jobs/stats", &[], "");
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)["per_queue"]["default"]["failed"], 1);
    let (status, body) = request(port, "POST", &format!("/api/jobs/{id}/retry"), &[], "");
    assert_eq!(status, 200, "{body}");
    let again = wait_for(START, || {
        (job_errors(&db, id) == (JobState::Failed, 2)).then_some(())
    });
    assert!(again.is_some(), "the retry ran: {:?}", job_errors(&db, id));
    let (status, body) = request(port, "POST", &format!("/api/jobs/{id}/cancel"), &[], "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body)["outcome"], "already_failed");
    let (status, body) = request(port, "POST", "/api/jobs/999/cancel", &[], "");
    assert_eq!((status, error_kind(&body).as_str()), (404, "not_found"));

    // Scale through the API, then check with the CLI's view.
    let (status, body) = request(port, "POST", "/api/scale", &[], "{\"workers\": 3}");
    assert_eq!(
        (status, json_of(&body)["workers_wanted"].as_u64()),
        (200, Some(3))
    );
    c.wait_workers(3, START);
    let (status, _) = request(port, "POST", "/api/scale", &[], "{\"workers\": 2}");
    assert_eq!(status, 200);
    let before = c.wait_workers(2, START);

    // Reload answers once every worker is replaced.
    let (status, body) = request(port, "POST", "/api/reload", &[], "");
    assert_eq!(status, 200, "{body}");
    // By then the new workers are ready; the old ones finish draining.
    let after = c.wait_workers(2, START);
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} -> {after:?}"
    );

    // The event stream sends a status event.
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("event: status\ndata: {") {
        let n = s.read(&mut buf).expect("the stream sends within 10 s");
        assert!(n > 0, "the stream ended: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).contains("text/event-stream"));
}

#[test]
fn api_nodes_lists_the_nodes_of_a_shared_store() {
    let Some(url) = common::pg::fresh_url() else {
        return;
    };
    let port = free_port();
    let mut a = watcher()
        .workers(1)
        .arg("--http")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--jobs", &url, "--node", "dash-a"])
        .start(example("jobs"), &[]);
    let mut b = watcher()
        .workers(2)
        .args(["--jobs", &url, "--node", "dash-b"])
        .start(example("jobs"), &[]);
    a.wait_workers(1, START);
    b.wait_workers(2, START);
    wait_http(&a, port);
    let nodes = wait_for(START, || {
        let (status, body) = request(port, "GET", "/api/nodes", &[], "");
        assert_eq!(status, 200, "{body}");
        let v = json_of(&body);
        (v.as_array().map_or(0, Vec::len) == 2).then_some(v)
    })
    .unwrap_or_else(|| panic!("two nodes never listed:\n{}", a.stderr()));
    let mut names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            assert_eq!(n["state"], "alive", "{n}");
            assert!(
                n["heartbeat_at"].is_string() && n["capacity"].is_u64(),
                "{n}"
            );
            n["name"].as_str().unwrap()
        })
        .collect();
    names.sort();
    assert_eq!(names, ["dash-a", "dash-b"]);
    // The page's script asks for them.
    let (_, js) = request(port, "GET", "/app.js", &[], "");
    assert!(js.contains("/api/nodes"));
    b.signal(nix::sys::signal::Signal::SIGTERM);
    b.wait_exit(START).expect("node b stops");
    let gone = wait_for(START, || {
        let (_, body) = request(port, "GET", "/api/nodes", &[], "");
        let v = json_of(&body);
        v.as_array()?
            .iter()
            .any(|n| n["name"] == "dash-b" && n["state"] != "alive")
            .then_some(())
    });
    assert!(gone.is_some(), "a stopped node is not shown alive");
}

#[test]
fn api_without_jobs_says_so() {
    let port = free_port();
    let (c, _) = watcher()
        .arg("--http")
        .arg(format!(":{port}"))
        .serve_hello(1);
    wait_http(&c, port);
    let (status, body) = request(port, "GET", "/api/jobs", &[], "");
    assert_eq!((status, error_kind(&body).as_str()), (503, "no_jobs"));
    let (status, body) = request(port, "GET", "/api/status", &[], "");
    assert_eq!(status, 200);
    assert!(json_of(&body).get("jobs").is_none(), "{body}");
    let (status, body) = request(port, "GET", "/", &[], "");
    assert_eq!(status, 200);
    assert!(body.contains("<title>cluster</title>"));
}

#[test]
fn a_token_guards_everything_but_the_page() {
    let port = free_port();
    let w = watcher();
    let token_file = w.dir().join("token");
    std::fs::write(&token_file, "s3cret-s3cret-s3cret\n").unwrap();
    let (c, _) = w
        .arg("--http")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--http-token-file")
        .arg(&token_file)
        .serve_hello(1);
    wait_http(&c, port);
    let (status, body) = request(port, "GET", "/api/status", &[], "");
    assert_eq!((status, error_kind(&body).as_str()), (401, "unauthorized"));
    let (status, _) = request(port, "GET", "/metrics", &["Authorization: Bearer nope"], "");
    assert_eq!(status, 401);
    let (status, _) = request(
        port,
        "POST",
        "/api/reload",
        &["Authorization: Bearer s3cret-s3cret-s3cre"],
        "",
    );
    assert_eq!(status, 401, "a prefix of the token is not the token");
    let (status, _) = request(
        port,
        "GET",
        "/api/status",
        &["Authorization: Bearer s3cret-s3cret-s3cret"],
        "",
    );
    assert_eq!(status, 200);
    let (status, _) = request(
        port,
        "GET",
        "/api/status?token=s3cret-s3cret-s3cret",
        &[],
        "",
    );
    assert_eq!(status, 200);
    let (status, _) = request(port, "GET", "/", &[], "");
    assert_eq!(status, 200, "the page itself carries no data");
}

#[test]
fn bad_http_options_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short");
    std::fs::write(&short, "abc").unwrap();
    let hello = example("hello_http");
    let hello = hello.to_str().unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--http".into(), "0.0.0.0:0".into()],
            "not a loopback address: it needs --http-token-file",
        ),
        (
            vec![
                "--http".into(),
                ":0".into(),
                "--http-token-file".into(),
                short.display().to_string(),
            ],
            "too short",
        ),
        (
            vec![
                "--http".into(),
                ":0".into(),
                "--http-token-file".into(),
                dir.path().join("missing").display().to_string(),
            ],
            "cannot read the token file",
        ),
        (
            vec!["--http".into(), "nowhere".into()],
            "is not a host:port address",
        ),
    ];
    for (args, want) in cases {
        let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
        all.extend([hello, "127.0.0.1:0"]);
        let (status, _, stderr) = cluster_output(&all, START);
        assert!(!status.success(), "{args:?} was accepted");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // A port already taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let (status, _, stderr) = cluster_output(&["--http", &addr, hello, "127.0.0.1:0"], START);
    assert!(!status.success());
    assert!(stderr.contains("cannot serve the dashboard"), "{stderr}");
}

/// Node and the playwright-core package, when both are here.
fn browser() -> Option<(PathBuf, PathBuf)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let ready = chromium.exists() && dir.join("node_modules/playwright-core").exists();
    if ready {
        return Some((dir.join("dashboard.mjs"), chromium));
    }
    let why = format!(
        "the browser test needs {} and `npm ci` in {}",
        chromium.display(),
        dir.display()
    );
    if std::env::var_os("CLUSTER_BROWSER_TESTS").is_some_and(|v| v == "1") {
        panic!("{why}");
    }
    eprintln!("SKIPPED: {why}");
    None
}

/// Runs the browser script against a watcher with the jobs example.
fn run_in_browser(token: Option<&str>, screenshot: Option<PathBuf>) {
    let Some((script, chromium)) = browser() else {
        return;
    };
    let port = free_port();
    let w = watcher().workers(2).pid_file();
    let db = w.dir().join("jobs.db");
    let mut w = w
        .arg("--http")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--jobs")
        .arg(&db);
    if let Some(t) = token {
        let file = w.dir().join("token");
        std::fs::write(&file, t).unwrap();
        w = w.arg("--http-token-file").arg(file);
    }
    let mut c = w.start(example("jobs"), &[]);
    c.wait_workers(2, START);
    wait_http(&c, port);
    let id = submit_failing(&db);
    let failed = wait_for(START, || {
        (job_errors(&db, id).0 == JobState::Failed).then_some(())
    });
    assert!(failed.is_some(), "{}", c.stderr());

    let mut cmd = Command::new("node");
    cmd.arg(&script)
        .env("BASE_URL", format!("http://127.0.0.1:{port}"))
        .env("WORKERS", "2")
        .env("FAILED_JOB", id.to_string())
        .env("CLUSTER_BIN", cluster_bin())
        .env("PID_FILE", c.pid_file())
        .env("CHROMIUM", &chromium);
    if let Some(t) = token {
        cmd.env("TOKEN", t);
    }
    if let Some(path) = &screenshot {
        cmd.env("SCREENSHOT", path);
    }
    if let Some(path) = &screenshot {
        let _ = std::fs::remove_file(path);
    }
    let out = cmd.output().expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the browser script failed: {stderr}{stdout}\nwatcher:\n{}",
        c.stderr()
    );
    let seen = json_of(stdout.trim());
    assert_eq!(seen["scaledUp"], 3, "{seen}");
    assert!(seen["killedRowMs"].as_u64().unwrap() <= 2000, "{seen}");
    if let Some(path) = &screenshot {
        assert!(path.exists(), "no screenshot at {}", path.display());
        eprintln!("screenshot: {}; the page saw {seen}", path.display());
    }
    assert!(seen["phoneWidth"].as_u64().unwrap() <= 390);
    // What the page did, seen from outside: the retry ran the job again.
    let again = wait_for(START, || {
        (job_errors(&db, id) == (JobState::Failed, 2)).then_some(())
    });
    assert!(again.is_some(), "the retry ran: {:?}", job_errors(&db, id));
    let reloaded: Vec<u64> = seen["reloaded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    let now: Vec<u64> = c.workers().into_iter().map(u64::from).collect();
    assert!(
        reloaded.iter().all(|p| now.contains(p)),
        "{reloaded:?} vs {now:?}"
    );
}

#[test]
fn dashboard_in_a_browser_shows_and_acts() {
    // A test artifact: target/tmp/dashboard.png (and dashboard-phone.png).
    let screenshot = std::env::var_os("CLUSTER_DASHBOARD_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png"));
    run_in_browser(None, Some(screenshot));
}

#[test]
fn dashboard_in_a_browser_with_a_token() {
    run_in_browser(Some("s3cret-s3cret-s3cret"), None);
}
