//! The job server with the real binary and real workers (`examples/jobs`):
//! calls in parallel, every error status (each answer checked against
//! docs/openapi.json), a worker killed mid-call, panics, tokens off
//! loopback, bodies too large or malformed, slowloris and idle
//! connections, durable jobs with keys, rolling restarts, the Rust client
//! and the README's curl and Python clients.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

const START: Duration = Duration::from_secs(20);

/// `cluster OPTIONS --job-server 127.0.0.1:PORT examples/jobs`, waited for
/// until `workers` workers serve calls.
fn serve(w: Watcher, workers: usize) -> (Running, u16) {
    let port = free_port();
    let c = w
        .workers(workers)
        .arg("--job-server")
        .arg(format!("127.0.0.1:{port}"))
        .start(example("jobs"), &[]);
    wait_serving(&c, port, workers);
    (c, port)
}

/// Waits until `GET /v1/health` says `workers` workers serve.
fn wait_serving(c: &Running, port: u16, workers: usize) {
    let up = wait_for(START, || {
        let r = request(port, "GET", "/v1/health", &[], b"").ok()?;
        let v: Value = serde_json::from_str(&r.body).ok()?;
        (r.status == 200 && v["workers"] == workers).then_some(())
    });
    assert!(
        up.is_some(),
        "no {workers} workers serving:\n{}",
        c.stderr()
    );
}

/// One request on a new connection (`Connection: close`).
fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(40)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn post(port: u16, path: &str, body: &str) -> Response {
    request(port, "POST", path, &[], body.as_bytes()).unwrap()
}

fn get(port: u16, path: &str) -> Response {
    request(port, "GET", path, &[], b"").unwrap()
}

fn openapi() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"))
        .expect("docs/openapi.json");
    serde_json::from_str(&text).expect("the OpenAPI document is JSON")
}

/// Checks `r` against the document: the route answers this status, and
/// its JSON body matches the status's schema. Returns the body.
#[track_caller]
fn check(doc: &Value, route: &str, method: &str, r: &Response) -> Value {
    let response = &doc["paths"][route][method]["responses"][r.status.to_string()];
    assert!(
        response.is_object(),
        "{method} {route}: status {} is not in the document (body {})",
        r.status,
        r.body
    );
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    let body: Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body));
    let mut schema = response["content"]["application/json"]["schema"].clone();
    if let Value::Object(m) = &mut schema {
        m.insert("components".into(), doc["components"].clone());
    }
    let validator = jsonschema::validator_for(&schema).expect("a valid schema");
    if let Err(e) = validator.validate(&body) {
        panic!(
            "{method} {route} {}: {} does not match the document: {e}",
            r.status, r.body
        );
    }
    body
}

/// The error kind of an error body.
fn kind(body: &Value) -> &str {
    body["error"]["kind"].as_str().unwrap_or("")
}

/// Runs `n` calls of `sleep` at once (one thread each); returns their
/// statuses and how long all took.
fn parallel_sleeps(port: u16, n: usize, ms: u64) -> (Vec<u16>, Duration) {
    let started = Instant::now();
    let threads: Vec<_> = (0..n)
        .map(|_| {
            std::thread::spawn(move || {
                post(port, "/v1/call/sleep", &format!("{{\"ms\": {ms}}}")).status
            })
        })
        .collect();
    let statuses = threads.into_iter().map(|t| t.join().unwrap()).collect();
    (statuses, started.elapsed())
}

#[test]
fn eight_calls_of_one_second_run_in_parallel_on_eight_workers() {
    let (_c, port) = serve(watcher(), 8);
    let (statuses, took) = parallel_sleeps(port, 8, 1000);
    assert_eq!(statuses, vec![200; 8]);
    assert!(
        took < Duration::from_millis(1500),
        "8 calls on 8 workers took {took:?}"
    );
}

#[test]
fn eight_calls_of_one_second_take_about_two_seconds_on_four_workers() {
    let (_c, port) = serve(watcher(), 4);
    let (statuses, took) = parallel_sleeps(port, 8, 1000);
    assert_eq!(statuses, vec![200; 8]);
    assert!(
        took >= Duration::from_millis(1950) && took < Duration::from_millis(2800),
        "8 calls on 4 workers took {took:?}"
    );
}

#[test]
fn every_answer_of_a_call_is_the_one_the_document_gives() {
    let doc = openapi();
    let (mut c, port) = serve(watcher().arg("--job-max-body").arg("4096"), 2);
    let workers = c.workers();
    let call = "/v1/call/{name}";

    let r = post(port, "/v1/call/echo", r#"{"a": [1, "x"]}"#);
    assert_eq!(r.status, 200);
    assert_eq!(check(&doc, call, "post", &r), json!({"a": [1, "x"]}));
    let r = post(port, "/v1/call/echo", "");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "null"),
        "an empty body is null"
    );

    let r = post(port, "/v1/call/no-such-handler", "{}");
    assert_eq!(r.status, 404);
    assert_eq!(kind(&check(&doc, call, "post", &r)), "not_found");

    let r = post(port, "/v1/call/sleep", r#"{"seconds": 1}"#);
    assert_eq!(r.status, 400);
    let body = check(&doc, call, "post", &r);
    assert_eq!(kind(&body), "bad_args");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("ms"),
        "{body}"
    );

    let r = post(port, "/v1/call/echo", r#"{"a": "#);
    assert_eq!(r.status, 400);
    let body = check(&doc, call, "post", &r);
    assert_eq!(kind(&body), "bad_request");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{body}"
    );

    let r = post(port, "/v1/call/fail", r#"{"message": "nope"}"#);
    assert_eq!(r.status, 422);
    let body = check(&doc, call, "post", &r);
    assert_eq!(
        (kind(&body), body["error"]["message"].as_str()),
        ("handler_error", Some("nope"))
    );

    let r = post(port, "/v1/call/panic", "null");
    assert_eq!(r.status, 500);
    let body = check(&doc, call, "post", &r);
    assert_eq!(kind(&body), "handler_panicked");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("on purpose"),
        "{body}"
    );
    // The worker that panicked lives on and serves the next call.
    assert_eq!(post(port, "/v1/call/echo", "1").status, 200);
    assert_eq!(c.workers(), workers, "a panic cost no worker");

    let r = post(port, "/v1/call/echo?timeout=soon", "1");
    assert_eq!(r.status, 400);
    assert_eq!(kind(&check(&doc, call, "post", &r)), "bad_request");

    let big = format!("\"{}\"", "x".repeat(5000));
    let r = post(port, "/v1/call/echo", &big);
    assert_eq!(r.status, 413);
    assert_eq!(kind(&check(&doc, call, "post", &r)), "too_large");

    let r = get(port, "/v1/call/echo");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    assert_eq!(kind(&check(&doc, call, "post", &r)), "method_not_allowed");

    // Without --jobs there is no store.
    let r = post(port, "/v1/jobs", r#"{"name": "echo"}"#);
    assert_eq!(r.status, 501);
    assert_eq!(kind(&check(&doc, "/v1/jobs", "post", &r)), "no_store");
    let r = get(port, "/v1/jobs/1");
    assert_eq!(r.status, 501);
    check(&doc, "/v1/jobs/{id}", "get", &r);

    let r = get(port, "/v1/handlers");
    assert_eq!(r.status, 200);
    let body = check(&doc, "/v1/handlers", "get", &r);
    assert_eq!(body["workers"], 2);
    assert!(body["handlers"]
        .as_array()
        .unwrap()
        .contains(&json!({"name": "echo", "workers": 2})));

    let r = get(port, "/v1/health");
    assert_eq!(r.status, 200);
    let body = check(&doc, "/v1/health", "get", &r);
    assert_eq!(body["status"], "ok");
    assert!(body["calls"]["done"].as_u64().unwrap() >= 3, "{body}");

    let r = get(port, "/v1/openapi.json");
    assert_eq!(r.status, 200);
    assert_eq!(serde_json::from_str::<Value>(&r.body).unwrap(), doc);

    let r = get(port, "/nowhere");
    assert_eq!(r.status, 404);
    assert_eq!(kind(&serde_json::from_str(&r.body).unwrap()), "not_found");
}

#[test]
fn calls_past_a_busy_worker_wait_then_503_and_a_full_queue_503s_at_once() {
    let doc = openapi();
    let call = "/v1/call/{name}";
    let (c, port) = serve(watcher().arg("--job-queue-limit").arg("1"), 1);
    // The one worker sleeps; one call may wait, the next is refused.
    let busy = std::thread::spawn(move || post(port, "/v1/call/sleep", r#"{"ms": 2500}"#).status);
    let running = wait_for(START, || {
        let v: Value = serde_json::from_str(&get(port, "/v1/health").body).ok()?;
        (v["calls"]["running"] == 1).then_some(())
    });
    assert!(running.is_some(), "{}", c.stderr());
    let started = Instant::now();
    let waiting = std::thread::spawn(move || post(port, "/v1/call/echo?timeout=0.5", "1"));
    wait_for(START, || {
        let v: Value = serde_json::from_str(&get(port, "/v1/health").body).ok()?;
        (v["calls"]["queued"] == 1).then_some(())
    })
    .expect("the second call waits");
    let full = post(port, "/v1/call/echo", "1");
    assert_eq!(full.status, 503);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "a full queue answers at once"
    );
    assert_eq!(kind(&check(&doc, call, "post", &full)), "queue_full");
    assert_eq!(full.header("retry-after"), Some("1"));

    let timed_out = waiting.join().unwrap();
    assert_eq!(timed_out.status, 503);
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(kind(&check(&doc, call, "post", &timed_out)), "timeout");
    assert_eq!(busy.join().unwrap(), 200);
    assert_eq!(post(port, "/v1/call/echo", "2").status, 200);
}

#[test]
fn a_worker_killed_mid_call_fails_only_its_call_with_502_and_the_next_call_succeeds() {
    let doc = openapi();
    let (mut c, port) = serve(watcher(), 2);
    let workers = c.workers();
    let calls: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let r = post(port, "/v1/call/sleep", r#"{"ms": 3000}"#);
                (r, Instant::now())
            })
        })
        .collect();
    wait_for(START, || {
        let v: Value = serde_json::from_str(&get(port, "/v1/health").body).ok()?;
        (v["calls"]["running"] == 2).then_some(())
    })
    .expect("both calls run");
    let killed_at = Instant::now();
    signal(workers[0], Signal::SIGKILL);
    let mut answers: Vec<(Response, Instant)> =
        calls.into_iter().map(|t| t.join().unwrap()).collect();
    answers.sort_by_key(|(r, _)| r.status);
    let (ok, lost) = (&answers[0], &answers[1]);
    assert_eq!(
        ok.0.status, 200,
        "the other worker's call goes on: {:?}",
        ok.0
    );
    assert_eq!(lost.0.status, 502, "{:?}", lost.0);
    let body = check(&doc, "/v1/call/{name}", "post", &lost.0);
    assert_eq!(kind(&body), "worker_lost");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("SIGKILL"),
        "{body}"
    );
    assert!(
        lost.1.duration_since(killed_at) < Duration::from_secs(1),
        "502 {:?} after the kill",
        lost.1.duration_since(killed_at)
    );
    assert_eq!(post(port, "/v1/call/echo", "3").status, 200);
}

#[test]
fn an_address_off_loopback_needs_a_token_and_every_request_carries_it() {
    let doc = openapi();
    let port = free_port();
    let mut refused = watcher()
        .arg("--job-server")
        .arg(format!("0.0.0.0:{port}"))
        .start(example("jobs"), &[]);
    let (status, _, stderr) = refused.output(START);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .lines()
            .last()
            .unwrap_or("")
            .contains("--job-server-token-file"),
        "{stderr}"
    );

    let w = watcher();
    let token_file = w.dir().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let port = free_port();
    let c = w
        .workers(1)
        .arg("--job-server")
        .arg(format!("0.0.0.0:{port}"))
        .arg("--job-server-token-file")
        .arg(&token_file)
        .start(example("jobs"), &[]);
    let auth = [("Authorization", "Bearer s3cret-token")];
    let up = wait_for(START, || {
        let r = request(port, "GET", "/v1/health", &auth, b"").ok()?;
        (r.status == 200).then_some(())
    });
    assert!(up.is_some(), "{}", c.stderr());
    let r = request(port, "POST", "/v1/call/echo", &[], b"1").unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_eq!(
        kind(&check(&doc, "/v1/call/{name}", "post", &r)),
        "unauthorized"
    );
    let wrong = [("Authorization", "Bearer s3cret-tokem")];
    assert_eq!(
        request(port, "GET", "/v1/health", &wrong, b"")
            .unwrap()
            .status,
        401
    );
    let r = request(port, "POST", "/v1/call/echo", &auth, b"[1]").unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "[1]"));
}

#[test]
fn idle_connections_slowloris_huge_and_malformed_bodies_do_not_stop_other_clients() {
    raise_fd_limit();
    let doc = openapi();
    let (c, port) = serve(watcher().arg("--job-max-body").arg("1000"), 2);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect"))
        .collect();
    // A slowloris client: a request head that never ends.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"POST /v1/call/echo HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        .unwrap();
    // A body far past the bound, declared and sent.
    let huge = vec![b'1'; 1_000_000];
    let r = request(port, "POST", "/v1/call/echo", &[], &huge).unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(
        kind(&check(&doc, "/v1/call/{name}", "post", &r)),
        "too_large"
    );
    // Malformed JSON of every sort is a 400, never a hang or a crash.
    for bad in ["{", "[1,]", "nul", "\"\\u12\"", "{\"a\":1}}", "\u{0}"] {
        let r = post(port, "/v1/call/echo", bad);
        assert_eq!(r.status, 400, "{bad:?}: {r:?}");
        assert_eq!(
            kind(&check(&doc, "/v1/call/{name}", "post", &r)),
            "bad_request"
        );
    }
    let r = request(port, "POST", "/v1/call/echo", &[], b"\xff\xfe").unwrap();
    assert_eq!(r.status, 400);
    // Meanwhile other clients are served at once.
    let started = Instant::now();
    for i in 0..20 {
        let r = post(port, "/v1/call/echo", &i.to_string());
        assert_eq!((r.status, r.body.clone()), (200, i.to_string()));
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "20 calls took {:?}",
        started.elapsed()
    );
    drop(idle);
    drop(slow);
    assert_eq!(
        post(port, "/v1/call/echo", "1").status,
        200,
        "{}",
        c.stderr()
    );
}

#[test]
fn a_request_head_that_never_ends_is_cut_off_after_the_header_timeout() {
    let (_c, port) = serve(watcher().arg("--job-header-timeout").arg("1"), 1);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = slow.read_to_end(&mut buf);
    let took = started.elapsed();
    assert!(read.is_ok() || took < Duration::from_secs(4), "{read:?}");
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    // An idle connection (no byte sent) is closed the same way.
    let mut idle = TcpStream::connect(addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let _ = idle.read_to_end(&mut Vec::new());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "idle closed after {:?}",
        started.elapsed()
    );
}

#[test]
fn durable_jobs_with_keys_coalesce_and_long_polls_answer_when_they_end() {
    let doc = openapi();
    let w = watcher();
    let db = w.dir().join("jobs.db");
    let (c, port) = serve(w.arg("--jobs").arg(&db), 2);
    let jobs = "/v1/jobs";
    let r = post(
        port,
        jobs,
        r#"{"name": "sleep", "args": {"ms": 1500}, "key": "nightly"}"#,
    );
    assert_eq!(r.status, 201, "{r:?}\n{}", c.stderr());
    let first = check(&doc, jobs, "post", &r);
    assert_eq!(first["existing"], false);
    // The same key while that job is queued or running: the same job.
    let r = post(
        port,
        jobs,
        r#"{"name": "sleep", "args": {"ms": 1500}, "key": "nightly"}"#,
    );
    assert_eq!(r.status, 200, "{r:?}");
    let again = check(&doc, jobs, "post", &r);
    assert_eq!(
        (again["id"].clone(), again["existing"].clone()),
        (first["id"].clone(), json!(true))
    );

    let id = first["id"].as_i64().unwrap();
    let started = Instant::now();
    let r = get(port, &format!("/v1/jobs/{id}?wait=10"));
    assert_eq!(r.status, 200);
    let job = check(&doc, "/v1/jobs/{id}", "get", &r);
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["result"]["slept_ms"], 1500, "{job}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Once it ended, the key is free again.
    let r = post(
        port,
        jobs,
        r#"{"name": "echo", "args": [1], "key": "nightly"}"#,
    );
    assert_eq!(r.status, 201);
    assert_ne!(check(&doc, jobs, "post", &r)["id"], first["id"]);

    let r = get(port, "/v1/jobs/999999");
    assert_eq!(r.status, 404);
    assert_eq!(kind(&check(&doc, "/v1/jobs/{id}", "get", &r)), "not_found");
    let r = get(port, "/v1/jobs/abc");
    assert_eq!(r.status, 400);
    check(&doc, "/v1/jobs/{id}", "get", &r);
    let r = post(port, jobs, r#"{"name": "echo", "colour": "red"}"#);
    assert_eq!(r.status, 400);
    let body = check(&doc, jobs, "post", &r);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("colour"),
        "{body}"
    );
    let r = post(port, jobs, r#"{"name": "echo", "queue": "nosuch"}"#);
    assert_eq!(r.status, 400, "{r:?}");
    check(&doc, jobs, "post", &r);
}

#[test]
fn a_rolling_restart_moves_new_calls_to_new_workers_and_lets_running_ones_finish() {
    let (mut c, port) = serve(watcher().pid_file(), 2);
    let old = c.workers();
    let long = std::thread::spawn(move || post(port, "/v1/call/sleep", r#"{"ms": 2000}"#));
    wait_for(START, || {
        let v: Value = serde_json::from_str(&get(port, "/v1/health").body).ok()?;
        (v["calls"]["running"] == 1).then_some(())
    })
    .expect("the long call runs");
    let reload = {
        let pid_file = c.pid_file().to_path_buf();
        std::thread::spawn(move || control(&pid_file, &["reload"]))
    };
    let mut calls = 0;
    while !reload.is_finished() {
        let r = post(port, "/v1/call/echo", "1");
        assert_eq!(r.status, 200, "a call during the reload failed: {r:?}");
        calls += 1;
    }
    let out = reload.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(calls > 0);
    let r = long.join().unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains(r#""slept_ms":2000"#), "{}", r.body);
    let new = c.wait_workers(2, START);
    assert!(
        new.iter().all(|p| !old.contains(p)),
        "old {old:?} new {new:?}"
    );
    assert_eq!(post(port, "/v1/call/echo", "1").status, 200);
}

#[test]
fn the_rust_client_calls_in_parallel_and_tells_errors_apart() {
    let (_c, port) = serve(watcher(), 4);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = cluster::JobClient::connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap();
        let started = Instant::now();
        let second = json!({"ms": 1000});
        let (a, b, c) = tokio::join!(
            client.call::<_, Value>("sleep", &second),
            client.call::<_, Value>("sleep", &second),
            client.call::<_, Value>("sleep", &second),
        );
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        for r in [a, b, c] {
            assert_eq!(r.unwrap()["slept_ms"], 1000);
        }
        let e = client
            .call::<_, Value>("nope", &json!(1))
            .await
            .unwrap_err();
        assert!(e.is_not_found() && e.status() == Some(404), "{e}");
        let e = client
            .call::<_, Value>("fail", &json!({}))
            .await
            .unwrap_err();
        assert!(e.is_handler_error() && !e.is_panic(), "{e}");
        let e = client
            .call::<_, Value>("panic", &json!({}))
            .await
            .unwrap_err();
        assert!(e.is_handler_error() && e.is_panic(), "{e}");
        let e = client
            .call::<_, Value>("sleep", &json!("x"))
            .await
            .unwrap_err();
        assert!(e.is_bad_args(), "{e}");
        let e = client.submit("echo", &json!(1)).await.unwrap_err();
        assert_eq!(e.kind(), "no_store");
        // Many calls in flight at once over the keep-alive pool.
        let many: Vec<_> = (0..200)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move { client.call::<_, u32>("echo", &i).await })
            })
            .collect();
        for (i, t) in many.into_iter().enumerate() {
            assert_eq!(t.await.unwrap().unwrap(), i as u32);
        }
        let handlers = client.handlers().await.unwrap();
        assert!(handlers.contains(&("echo".to_string(), 4)), "{handlers:?}");
        let gone = cluster::JobClient::connect(&format!("http://127.0.0.1:{}", free_port())).await;
        assert!(gone.unwrap_err().is_connect());
    });
}

#[test]
fn the_amp_quickstart_example_takes_about_one_second() {
    let (_c, port) = serve(watcher(), 4);
    let out = std::process::Command::new(example("job_client"))
        .arg(format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches(r#""slept_ms":1000"#).count(), 3, "{text}");
    let took: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("3 calls of 1 s took "))
        .and_then(|l| l.trim_end_matches(" s").parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!((0.95..1.5).contains(&took), "{text}");
    assert!(
        text.contains("not found: ") && text.contains("handler error: no"),
        "{text}"
    );
}

/// The README's curl and Python clients, as the README gives them.
#[test]
fn the_readme_curl_and_python_clients_work() {
    let (_c, port) = serve(watcher(), 4);
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## Job server")
        .nth(1)
        .expect("a Job server section in the README");
    let block = |lang: &str| -> String {
        let start = section
            .find(&format!("```{lang}\n"))
            .unwrap_or_else(|| panic!("no {lang} block"));
        let rest = &section[start + lang.len() + 4..];
        rest[..rest.find("```").unwrap()].replace("1337", &port.to_string())
    };
    let curl = block("sh");
    let started = Instant::now();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&curl)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{curl}\n{text}");
    assert_eq!(text.matches(r#""slept_ms":1000"#).count(), 3, "{text}");
    assert!(
        started.elapsed() < Duration::from_millis(1800),
        "{:?}",
        started.elapsed()
    );

    let python = block("python");
    assert!(
        python.lines().count() <= 12,
        "the Python client is about ten lines"
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(&python)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{python}\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("'slept_ms': 1000").count(), 3, "{text}");
}

/// Lets this test process open a thousand connections on a machine whose
/// soft descriptor limit is 1024 (the watcher it starts inherits it).
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = hard.min(8192);
        if soft < want {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, want, hard);
        }
    }
}

#[test]
fn a_unix_socket_job_server_is_private_to_the_watchers_user() {
    use std::os::unix::fs::PermissionsExt;
    let w = watcher();
    let path = w.dir().join("jobs.sock");
    let c = w
        .workers(1)
        .arg("--job-server")
        .arg(format!("unix://{}", path.display()))
        .start(example("jobs"), &[]);
    let answer = |req: &str| -> Option<Response> {
        let mut s = std::os::unix::net::UnixStream::connect(&path).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(req.as_bytes()).ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).ok()?;
        parse_response(&raw).ok()
    };
    let health = "GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let up = wait_for(START, || answer(health).filter(|r| r.status == 200));
    assert!(up.is_some(), "{}", c.stderr());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let call = "POST /v1/call/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 7\r\n\r\n{\"a\":1}";
    let r = answer(call).unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "{\"a\":1}"));
    let mut c = c;
    c.signal(Signal::SIGTERM);
    assert_eq!(
        c.wait_exit(START).and_then(|s| s.code()),
        Some(0),
        "{}",
        c.stderr()
    );
    assert!(!path.exists(), "the socket file is removed at exit");
}

#[test]
fn arguments_and_results_larger_than_one_message_cross_in_parts() {
    let w = watcher();
    let db = w.dir().join("jobs.db");
    let w = w
        .arg("--jobs")
        .arg(&db)
        .arg("--job-max-body")
        .arg("20000000");
    let (mut c, port) = serve(w, 1);
    let before = c.workers();
    // About 900 KB of JSON with two-byte characters: 14 parts each way.
    let args = json!({ "text": "é".repeat(450_000), "n": [1, 2, 3] });
    let body = serde_json::to_string(&args).unwrap();
    let r = post(port, "/v1/call/echo", &body);
    assert_eq!(r.status, 200, "{}", &r.body[..r.body.len().min(300)]);
    assert_eq!(serde_json::from_str::<Value>(&r.body).unwrap(), args);

    // A durable job: its arguments from the store, its result into it.
    let job = serde_json::to_string(&json!({ "name": "echo", "args": args })).unwrap();
    let r = post(port, "/v1/jobs", &job);
    assert_eq!(r.status, 201, "{r:?}\n{}", c.stderr());
    let id = serde_json::from_str::<Value>(&r.body).unwrap()["id"].clone();
    let r = get(port, &format!("/v1/jobs/{id}?wait=20"));
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["state"], "done", "{}", &r.body[..r.body.len().min(300)]);
    assert_eq!(v["result"], args);

    // Past the 16 MiB the watcher assembles: the handler's result fails
    // the call with a reason, and the worker lives on.
    let huge = serde_json::to_string(&"x".repeat(17 << 20)).unwrap();
    let r = post(port, "/v1/call/echo", &huge);
    assert_eq!(r.status, 422, "{}", &r.body[..r.body.len().min(300)]);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bytes of JSON"),
        "{v}"
    );
    // The same worker goes on serving small calls.
    let r = post(port, "/v1/call/echo", "[1]");
    assert_eq!((r.status, r.body.as_str()), (200, "[1]"));
    let r = get(port, "/v1/handlers");
    assert!(r.body.contains("\"echo\""), "{}", r.body);
    assert_eq!(c.workers(), before, "the worker is the same process");
}
