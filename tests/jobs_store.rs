//! `cluster jobs ...` against real job store files: each subcommand, and
//! bad input refused with one clear line and the right exit status.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn cluster(dir: &Path, args: &[&str], stdin: Option<&str>) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cluster"));
    cmd.args(args)
        .current_dir(dir)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start cluster");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input.as_bytes()).expect("write stdin");
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("wait for cluster");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Runs `cluster jobs ARGS` and expects success; returns stdout.
fn ok(dir: &Path, args: &[&str]) -> String {
    ok_in(dir, args, None)
}

fn ok_in(dir: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let r = cluster(dir, &[&["jobs"], args].concat(), stdin);
    assert_eq!(
        r.code,
        Some(0),
        "{args:?}\nstdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    r.stdout
}

/// Runs `cluster jobs ARGS` and expects exit `code` with one stderr line
/// `cluster: error: ...` containing `needle`.
fn refused(dir: &Path, args: &[&str], stdin: Option<&str>, code: i32, needle: &str) {
    let r = cluster(dir, &[&["jobs"], args].concat(), stdin);
    assert_eq!(r.code, Some(code), "{args:?}: {}", r.stderr);
    assert_eq!(
        r.stderr.trim_end().lines().count(),
        1,
        "{args:?}: one line expected:\n{}",
        r.stderr
    );
    assert!(r.stderr.starts_with("cluster: error: "), "{}", r.stderr);
    assert!(
        r.stderr.contains(needle),
        "{args:?}: {:?} lacks {needle:?}",
        r.stderr
    );
    assert!(r.stdout.is_empty(), "nothing on stdout: {}", r.stdout);
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn tempdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    (dir, path)
}

const DB: &str = "jobs.db";

#[test]
fn submit_prints_the_new_id_and_plain_args_become_a_json_array() {
    let (_t, d) = tempdir();
    assert_eq!(
        ok(&d, &["submit", "--jobs", DB, "--", "a", "--b", "c d"]),
        "1\n"
    );
    assert_eq!(
        ok(
            &d,
            &["submit", "--jobs", DB, "--queue", "mail", "--name", "send", "x"]
        ),
        "2\n"
    );
    let one = json(&ok(&d, &["show", "--jobs", DB, "1", "--json"]));
    assert_eq!(one["args"], serde_json::json!(["a", "--b", "c d"]));
    assert_eq!(one["queue"], "default");
    assert_eq!(one["state"], "queued");
    assert_eq!(one["attempt"], 0);
    assert_eq!(one["max_attempts"], 3);
    assert!(one["created_at"].as_str().unwrap().ends_with('Z'));
    let two = json(&ok(&d, &["show", "--jobs", DB, "2", "--json"]));
    assert_eq!(
        (two["queue"].as_str(), two["name"].as_str()),
        (Some("mail"), Some("send"))
    );
}

#[test]
fn submit_options_are_recorded() {
    let (_t, d) = tempdir();
    ok(
        &d,
        &[
            "submit",
            "--jobs",
            &format!("sqlite://{DB}"),
            "--json",
            r#"{"b": 2, "a": [1]}"#,
            "--max-attempts",
            "5",
            "--priority",
            "-2",
            "--run-at",
            "2030-01-02T03:04:05Z",
        ],
    );
    let j = json(&ok(&d, &["show", "--jobs", DB, "1", "--json"]));
    assert_eq!(j["args"], serde_json::json!({"a": [1], "b": 2}));
    assert_eq!(j["max_attempts"], 5);
    assert_eq!(j["priority"], -2);
    assert_eq!(j["run_at"], "2030-01-02T03:04:05.000Z");
    assert_eq!(j["key_explicit"], false);
    assert_eq!(j["key"].as_str().unwrap().len(), 32);
    ok(
        &d,
        &[
            "submit",
            "--jobs",
            &format!("sqlite:{DB}"),
            "--delay",
            "60",
            "x",
        ],
    );
    let j = json(&ok(&d, &["show", "--jobs", DB, "2", "--json"]));
    assert!(j["run_at"].as_str().unwrap() > j["created_at"].as_str().unwrap());
}

#[test]
fn an_explicit_key_deduplicates() {
    let (_t, d) = tempdir();
    let args = ["submit", "--jobs", DB, "--key", "nightly", "run"];
    assert_eq!(ok(&d, &args), "1\n");
    assert_eq!(ok(&d, &args), "existing 1\n");
    // Without a key, the same arguments are a new job.
    assert_eq!(ok(&d, &["submit", "--jobs", DB, "run"]), "2\n");
    assert_eq!(ok(&d, &["submit", "--jobs", DB, "run"]), "3\n");
    // --dedupe uses the derived key.
    assert_eq!(
        ok(&d, &["submit", "--jobs", DB, "--dedupe", "run"]),
        "existing 2\n"
    );
    // Once cancelled (no longer queued), the key is free again.
    ok(&d, &["cancel", "--jobs", DB, "1"]);
    assert_eq!(ok(&d, &args), "4\n");
}

#[test]
fn stdin_submits_every_line_in_one_go() {
    let (_t, d) = tempdir();
    let input =
        "{\"args\": {\"n\": 1}, \"queue\": \"mail\", \"name\": \"h\", \"max_attempts\": 2}\n\
                 [\"bare\", \"array\"]\n\
                 \n\
                 {\"args\": 3, \"key\": \"k\"}\n\
                 {\"args\": 4, \"key\": \"k\"}\n\
                 {\"just\": \"an object\"}\n";
    let out = ok_in(
        &d,
        &["submit", "--jobs", DB, "--stdin", "--queue", "q"],
        Some(input),
    );
    assert_eq!(out, "1\n2\n3\nexisting 3\n4\n");
    let list = json(&ok(&d, &["list", "--jobs", DB, "--json"]));
    let jobs = list.as_array().unwrap();
    assert_eq!(jobs.len(), 4);
    // Newest first.
    assert_eq!(jobs[0]["args"], serde_json::json!({"just": "an object"}));
    assert_eq!(
        jobs[0]["queue"], "q",
        "the command line's --queue is the default"
    );
    assert_eq!(jobs[3]["queue"], "mail");
    assert_eq!(jobs[3]["name"], "h");
    assert_eq!(jobs[3]["max_attempts"], 2);
    assert_eq!(jobs[2]["args"], serde_json::json!(["bare", "array"]));
}

#[test]
fn a_malformed_stdin_line_submits_nothing() {
    let (_t, d) = tempdir();
    ok(&d, &["submit", "--jobs", DB, "first"]);
    let input = "[1]\n[2]\n{oops\n[4]\n";
    refused(
        &d,
        &["submit", "--jobs", DB, "--stdin"],
        Some(input),
        1,
        "stdin line 3",
    );
    let bad_field = "{\"args\": 1, \"max_atempts\": 2}\n";
    refused(
        &d,
        &["submit", "--jobs", DB, "--stdin"],
        Some(bad_field),
        1,
        "stdin line 1: unknown field `max_atempts`",
    );
    refused(
        &d,
        &["submit", "--jobs", DB, "--stdin"],
        Some("[1]\n{\"args\": 1, \"max_attempts\": 0}\n"),
        1,
        "stdin line 2: max_attempts must be at least 1",
    );
    let stats = json(&ok(&d, &["stats", "--jobs", DB, "--json"]));
    assert_eq!(stats["total"], 1, "only the first job exists");
}

#[test]
fn list_shows_a_table_and_filters() {
    let (_t, d) = tempdir();
    ok(
        &d,
        &[
            "submit", "--jobs", DB, "--queue", "a", "--name", "resize", "x",
        ],
    );
    ok(
        &d,
        &[
            "submit",
            "--jobs",
            DB,
            "--queue",
            "b",
            "--key",
            "a-rather-long-key-indeed",
            "y",
        ],
    );
    ok(&d, &["submit", "--jobs", DB, "--queue", "a", "z"]);
    ok(&d, &["cancel", "--jobs", DB, "3"]);
    let table = ok(&d, &["list", "--jobs", DB]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    for col in [
        "ID",
        "QUEUE",
        "NAME",
        "STATE",
        "ATTEMPT",
        "KEY",
        "AGE",
        "LAST ERROR",
    ] {
        assert!(lines[0].contains(col), "{table}");
    }
    assert!(
        lines[1].trim_start().starts_with('3') && lines[1].contains("cancelled"),
        "{table}"
    );
    assert!(
        lines[2].contains("a-rather-lo…"),
        "keys are shortened: {table}"
    );
    assert!(
        lines[3].contains("resize") && lines[3].contains("0/3"),
        "{table}"
    );
    let a = json(&ok(&d, &["list", "--jobs", DB, "--queue", "a", "--json"]));
    assert_eq!(a.as_array().unwrap().len(), 2);
    let c = json(&ok(
        &d,
        &["list", "--jobs", DB, "--state", "cancelled", "--json"],
    ));
    assert_eq!(c.as_array().unwrap().len(), 1);
    assert_eq!(c[0]["id"], 3);
    let one = json(&ok(&d, &["list", "--jobs", DB, "--limit", "1", "--json"]));
    assert_eq!(one.as_array().unwrap().len(), 1);
    assert_eq!(
        ok(&d, &["list", "--jobs", DB, "--state", "running"]),
        "no jobs\n"
    );
}

#[test]
fn show_prints_every_field_and_each_attempts_error() {
    let (_t, d) = tempdir();
    ok(
        &d,
        &[
            "submit",
            "--jobs",
            DB,
            "--key",
            "k",
            "--max-attempts",
            "2",
            "x",
        ],
    );
    // Two failed attempts, written the way the watcher records them.
    let conn = rusqlite::Connection::open(d.join(DB)).unwrap();
    conn.execute(
        "UPDATE jobs SET state = 'failed', attempt = 2, finished_at = 1000000, \
         errors = '[{\"attempt\":1,\"error\":\"timeout\",\"at\":1000},\
                    {\"attempt\":2,\"error\":\"boom\\nat line 3\",\"at\":2000}]' WHERE id = 1",
        [],
    )
    .unwrap();
    let text = ok(&d, &["show", "--jobs", DB, "1"]);
    for needle in [
        "id:",
        "queue:           default",
        "state:           failed",
        "attempt:         2 of 2",
        "key:             k (given)",
        "args:            [\"x\"]",
        "attempt 1 at 1970-01-01T00:00:00.001Z: timeout",
        "attempt 2 at 1970-01-01T00:00:00.002Z: boom",
        "    at line 3",
        "finished:        1970-01-01T00:00:01.000Z",
    ] {
        assert!(text.contains(needle), "{needle:?} missing in:\n{text}");
    }
    let j = json(&ok(&d, &["show", "--jobs", DB, "1", "--json"]));
    assert_eq!(j["errors"][1]["error"], "boom\nat line 3");
    assert_eq!(j["errors"][0]["at"], "1970-01-01T00:00:00.001Z");
    refused(&d, &["show", "--jobs", DB, "42"], None, 1, "no job 42");
    refused(&d, &["show", "--jobs", DB, "x"], None, 2, "not a job id");
}

#[test]
fn stats_totals_and_per_queue() {
    let (_t, d) = tempdir();
    ok(&d, &["submit", "--jobs", DB, "--queue", "a", "1"]);
    ok(&d, &["submit", "--jobs", DB, "--queue", "a", "2"]);
    ok(&d, &["submit", "--jobs", DB, "--queue", "b", "3"]);
    ok(&d, &["cancel", "--jobs", DB, "3"]);
    let text = ok(&d, &["stats", "--jobs", DB]);
    assert!(
        text.starts_with("total 3: 2 queued, 0 running, 0 done, 0 failed, 1 cancelled\n"),
        "{text}"
    );
    assert!(
        text.contains("QUEUE") && text.contains("CANCELLED"),
        "{text}"
    );
    let s = json(&ok(&d, &["stats", "--jobs", DB, "--json"]));
    assert_eq!(s["total"], 3);
    assert_eq!(s["per_queue"]["a"]["queued"], 2);
    assert_eq!(s["per_queue"]["b"]["cancelled"], 1);
}

#[test]
fn cancel_and_retry() {
    let (_t, d) = tempdir();
    ok(&d, &["submit", "--jobs", DB, "1"]);
    ok(&d, &["submit", "--jobs", DB, "2"]);
    assert_eq!(ok(&d, &["cancel", "--jobs", DB, "1"]), "cancelled\n");
    assert_eq!(
        ok(&d, &["cancel", "--jobs", DB, "1"]),
        "already cancelled\n"
    );
    // A running job (as a watcher left it after its claim).
    let conn = rusqlite::Connection::open(d.join(DB)).unwrap();
    conn.execute(
        "UPDATE jobs SET state = 'running', attempt = 1, node = 'n' WHERE id = 2",
        [],
    )
    .unwrap();
    assert_eq!(
        ok(&d, &["cancel", "--jobs", DB, "2"]),
        "cancel requested (running)\n"
    );
    let j = json(&ok(&d, &["show", "--jobs", DB, "2", "--json"]));
    assert_eq!(j["cancel_requested"], true);
    refused(
        &d,
        &["retry", "--jobs", DB, "2"],
        None,
        1,
        "job 2 is running",
    );
    assert_eq!(
        ok(&d, &["retry", "--jobs", DB, "1"]),
        "job 1 queued again\n"
    );
    let j = json(&ok(&d, &["show", "--jobs", DB, "1", "--json"]));
    assert_eq!(j["state"], "queued");
    refused(
        &d,
        &["retry", "--jobs", DB, "1"],
        None,
        1,
        "only failed or cancelled",
    );
    refused(&d, &["cancel", "--jobs", DB, "9"], None, 1, "no job 9");
    refused(&d, &["retry", "--jobs", DB, "9"], None, 1, "no job 9");
    conn.execute("UPDATE jobs SET state = 'done' WHERE id = 2", [])
        .unwrap();
    assert_eq!(ok(&d, &["cancel", "--jobs", DB, "2"]), "already done\n");
}

#[test]
fn pid_file_stands_for_the_store_url_written_beside_it() {
    let (_t, d) = tempdir();
    ok(&d, &["submit", "--jobs", DB, "x"]);
    refused(
        &d,
        &["list", "--pid-file", "w.pid"],
        None,
        1,
        "cannot read the job store URL from w.jobs",
    );
    // A relative path in the file is relative to the file.
    std::fs::create_dir(d.join("run")).unwrap();
    std::fs::write(d.join("run/w.jobs"), "../jobs.db\n").unwrap();
    let s = json(&ok(&d, &["stats", "-p", "run/w.pid", "--json"]));
    assert_eq!(s["total"], 1);
    assert_eq!(ok(&d, &["submit", "--pid-file", "run/w.pid", "y"]), "2\n");
    refused(
        &d,
        &["list", "--jobs", DB, "-p", "run/w.pid"],
        None,
        2,
        "cannot be used with",
    );
}

#[test]
fn a_queue_no_pool_takes_is_refused_once_a_watcher_registered_its_queues() {
    let (_t, d) = tempdir();
    ok(&d, &["submit", "--jobs", DB, "--queue", "anything", "x"]);
    let conn = rusqlite::Connection::open(d.join(DB)).unwrap();
    conn.execute_batch(
        "INSERT INTO queues (node, queue, registered_at) VALUES ('n', 'a', 0), ('n', 'b', 0)",
    )
    .unwrap();
    refused(
        &d,
        &["submit", "--jobs", DB, "--queue", "nosuch", "x"],
        None,
        1,
        "no pool takes queue nosuch (pools take: a, b)",
    );
    assert_eq!(
        ok(&d, &["submit", "--jobs", DB, "--queue", "b", "x"]),
        "2\n"
    );
}

#[test]
fn bad_input_is_refused_with_one_line() {
    let (_t, d) = tempdir();
    ok(&d, &["submit", "--jobs", DB, "x"]);
    refused(
        &d,
        &["list", "--jobs", DB, "--state", "bogus"],
        None,
        2,
        "unknown job state 'bogus'",
    );
    refused(
        &d,
        &["submit", "--jobs", DB, "--max-attempts", "0", "x"],
        None,
        2,
        "--max-attempts",
    );
    refused(
        &d,
        &["submit", "--jobs", DB, "--json", "{nope"],
        None,
        1,
        "--json is not valid JSON",
    );
    refused(
        &d,
        &["submit", "--jobs", DB, "--json", "1", "x"],
        None,
        2,
        "cannot be used with",
    );
    refused(
        &d,
        &["submit", "--jobs", DB, "--run-at", "tomorrow", "x"],
        None,
        2,
        "RFC 3339",
    );
    refused(
        &d,
        &[
            "submit",
            "--jobs",
            DB,
            "--run-at",
            "2030-01-01T00:00:00Z",
            "--delay",
            "1",
            "x",
        ],
        None,
        2,
        "cannot be used with",
    );
    refused(&d, &["list"], None, 2, "--jobs");
    refused(
        &d,
        &["list", "--jobs", "mysql://h/db"],
        None,
        1,
        "unknown job store URL scheme",
    );
    refused(
        &d,
        &["submit", "--jobs", "postgres://nosuchhost.invalid/db", "x"],
        None,
        1,
        "cannot open the job store postgres://nosuchhost.invalid/db: error connecting to server",
    );
}

#[test]
fn unopenable_stores_are_one_clear_line() {
    let (_t, d) = tempdir();
    refused(
        &d,
        &["submit", "--jobs", "no/such/dir/jobs.db", "x"],
        None,
        1,
        "cannot open the job store no/such/dir/jobs.db: the directory no/such/dir does not exist",
    );
    // Read-only commands do not create a store.
    refused(
        &d,
        &["list", "--jobs", "typo.db"],
        None,
        1,
        "typo.db: no such file",
    );
    assert!(!d.join("typo.db").exists());
    std::fs::create_dir(d.join("adir")).unwrap();
    refused(
        &d,
        &["stats", "--jobs", "adir"],
        None,
        1,
        "adir: it is a directory",
    );
    // Not writable even for root.
    refused(
        &d,
        &["submit", "--jobs", "/proc/jobs.db", "x"],
        None,
        1,
        "cannot open the job store /proc/jobs.db: unable to open database file",
    );
}

#[test]
fn a_corrupt_store_file_is_refused() {
    let (_t, d) = tempdir();
    let mut x: u32 = 2_463_534_242;
    let noise: Vec<u8> = (0..10_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 3) as u8
        })
        .collect();
    std::fs::write(d.join("bad.db"), &noise).unwrap();
    for args in [
        &["list", "--jobs", "bad.db"][..],
        &["submit", "--jobs", "bad.db", "x"],
        &["show", "--jobs", "bad.db", "1"],
    ] {
        refused(
            &d,
            args,
            None,
            1,
            "cannot open the job store bad.db: file is not a database",
        );
    }
    assert_eq!(
        std::fs::read(d.join("bad.db")).unwrap(),
        noise,
        "left as it was"
    );
}

#[test]
fn a_store_written_by_a_newer_cluster_is_refused() {
    let (_t, d) = tempdir();
    ok(&d, &["submit", "--jobs", DB, "x"]);
    let conn = rusqlite::Connection::open(d.join(DB)).unwrap();
    conn.pragma_update(None, "user_version", 1000).unwrap();
    drop(conn);
    refused(
        &d,
        &["list", "--jobs", DB],
        None,
        1,
        "schema version is 1000",
    );
}
