//! Helpers for the integration tests: start the real `cluster` binary and
//! real worker programs, talk HTTP to them on 127.0.0.1, wait on conditions
//! with deadlines, and kill whatever was started even when a test fails.

#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `cluster` binary under test.
pub fn cluster_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cluster"))
}

/// An example binary (cargo builds examples before running tests).
pub fn example(name: &str) -> PathBuf {
    let path = cluster_bin()
        .parent()
        .expect("target dir")
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} missing: run the tests with `cargo test`, which builds the examples",
        path.display()
    );
    path
}

/// The example `name`, built now (`cargo test --test X` does not build
/// examples, a plain `cargo test` does; cargo returns at once when it is
/// up to date, so a stale binary never runs). Call it once per binary.
pub fn build_example(name: &str) -> PathBuf {
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args([
        "build",
        "--quiet",
        "--example",
        name,
        "--manifest-path",
        concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
    ]);
    if !cfg!(debug_assertions) {
        cargo.arg("--release");
    }
    let status = cargo.status().expect("run cargo");
    assert!(status.success(), "cargo build --example {name}: {status}");
    example(name)
}

/// Whether `program --version` runs here; when not, says that the calling
/// test is skipped.
pub fn installed(program: &str) -> bool {
    let ok = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: {program} is not installed");
    }
    ok
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(|s| s.as_str())
    }
}

/// One `GET /` on a new connection (`Connection: close`).
pub fn http_get(port: u16) -> std::io::Result<Response> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// One `GET path` on a new connection; returns the raw response text.
pub fn http_get_path(port: u16, path: &str) -> std::io::Result<Response> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let mut lines = head.lines();
    let status_line = lines.next().ok_or_else(|| bad("empty response"))?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: body.to_string(),
    })
}

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Every live descendant of `pid`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next().unwrap_or("");
            let ppid: u32 = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            if state != "Z" {
                parent_of.insert(p, ppid);
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for (&child, &parent) in &parent_of {
            if parent == p {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out.sort();
    out
}

pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// Where [`Watcher::pid_file`] puts the pid file, in the run's temp dir.
const PID_FILE: &str = "x.pid";

/// Starts building a `cluster` run: options first, then
/// [`Watcher::start`] with the program, e.g.
/// `watcher().workers(2).pid_file().start(&hello, &[&addr])`.
pub fn watcher() -> Watcher {
    Watcher {
        dir: tempfile::tempdir().expect("tempdir"),
        args: Vec::new(),
        envs: Vec::new(),
        pid_file: None,
        debug_log: true,
        binary: None,
    }
}

/// The options of a `cluster` run not started yet. Each run has a fresh
/// temp dir ([`Watcher::dir`]) that holds its stdout and stderr and lives
/// as long as the [`Running`].
pub struct Watcher {
    dir: tempfile::TempDir,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    pid_file: Option<PathBuf>,
    debug_log: bool,
    binary: Option<PathBuf>,
}

impl Watcher {
    /// Starts the watcher by `path` (a link to or copy of the `cluster`
    /// binary) instead of [`cluster_bin`].
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// The run's temp dir, for files a test creates before the start.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Where [`Watcher::pid_file`] puts the pid file (known before it is
    /// asked for, to prepare or query it before the start).
    pub fn pid_path(&self) -> PathBuf {
        self.dir.path().join(PID_FILE)
    }

    /// `--workers N`.
    pub fn workers(self, n: usize) -> Self {
        self.arg("--workers").arg(n.to_string())
    }

    /// `--pid-file <dir>/x.pid`, named afterwards by [`Running::pid_file`]
    /// (and its control socket by [`Running::control_socket`]).
    pub fn pid_file(mut self) -> Self {
        let path = self.pid_path();
        self.pid_file = Some(path.clone());
        self.arg("--pid-file").arg(path)
    }

    /// `--log-format FORMAT`.
    pub fn log_format(self, format: &str) -> Self {
        self.arg("--log-format").arg(format)
    }

    /// `--log-level LEVEL`.
    pub fn log_level(self, level: &str) -> Self {
        self.arg("--log-level").arg(level)
    }

    /// One more command-line argument, as it is.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// More command-line arguments, as they are.
    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// An environment variable for the watcher (and so for its workers).
    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.envs.push((key.into(), value.as_ref().to_owned()));
        self
    }

    /// Leaves `RUST_LOG` as the tests' environment has it instead of
    /// setting `debug`: for tests of exactly what a user sees.
    pub fn inherit_rust_log(mut self) -> Self {
        self.debug_log = false;
        self
    }

    /// Starts `cluster OPTIONS... PROGRAM ARGS...`. Put `.arg("--")` before
    /// it where the program or its arguments could pass for options.
    pub fn start(self, program: impl AsRef<OsStr>, args: &[&str]) -> Running {
        self.arg(program).args(args).spawn()
    }

    /// Starts `n` workers of the `hello_http` example on a free 127.0.0.1
    /// port, and waits until they run and the port answers (15 s each):
    /// returns the watcher and the port.
    pub fn serve_hello(self, n: usize) -> (Running, u16) {
        let timeout = Duration::from_secs(15);
        let port = free_port();
        let mut c = self
            .workers(n)
            .start(example("hello_http"), &[&format!("127.0.0.1:{port}")]);
        c.wait_workers(n, timeout);
        c.wait_serving(port, timeout);
        (c, port)
    }

    /// Starts `cluster ARGS...` with the arguments given so far (no program
    /// added), stdin from /dev/null, stdout and stderr to files in the temp
    /// dir, and `RUST_LOG=debug` unless [`Watcher::inherit_rust_log`].
    pub fn spawn(self) -> Running {
        let stdout = std::fs::File::create(self.dir.path().join("stdout")).unwrap();
        let stderr = std::fs::File::create(self.dir.path().join("stderr")).unwrap();
        let mut cmd = Command::new(self.binary.unwrap_or_else(cluster_bin));
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        if self.debug_log {
            cmd.env("RUST_LOG", "debug");
        }
        cmd.envs(self.envs);
        let child = cmd.spawn().expect("spawn cluster");
        let mut running = Running::adopt(child, self.dir);
        running.pid_file = self.pid_file;
        running.args = self.args;
        running
    }
}

/// A running `cluster` watcher with its own temp dir; killed with all its
/// descendants when dropped.
pub struct Running {
    pub child: Option<Child>,
    pub pid: u32,
    pub dir: tempfile::TempDir,
    /// Every worker pid ever seen, so they can be killed on drop.
    seen: Vec<u32>,
    pid_file: Option<PathBuf>,
    /// The command line, for messages.
    args: Vec<OsString>,
}

impl Running {
    /// Wraps a `cluster` process the test spawned itself (for example
    /// through `sh` with extra descriptors), so it is killed with its
    /// descendants on drop like one from [`Watcher::start`].
    pub fn adopt(child: Child, dir: tempfile::TempDir) -> Running {
        Running {
            pid: child.id(),
            child: Some(child),
            dir,
            seen: Vec::new(),
            pid_file: None,
            args: Vec::new(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.path("stdout")).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.path("stderr")).unwrap_or_default()
    }

    /// The pid file that [`Watcher::pid_file`] asked for.
    pub fn pid_file(&self) -> &Path {
        self.pid_file
            .as_deref()
            .expect("started without Watcher::pid_file")
    }

    /// The control socket beside the pid file.
    pub fn control_socket(&self) -> PathBuf {
        self.pid_file().with_extension("sock")
    }

    /// Runs `cluster SUBCOMMAND --pid-file <pid file> ARGS...` against this
    /// watcher, e.g. `c.control(&["scale", "3"])`.
    pub fn control(&self, command: &[&str]) -> Output {
        control(self.pid_file(), command)
    }

    /// The watcher's live children (the workers).
    pub fn workers(&mut self) -> Vec<u32> {
        let mut kids = descendants(self.pid);
        kids.retain(|&p| alive(p));
        for &k in &kids {
            if !self.seen.contains(&k) {
                self.seen.push(k);
            }
        }
        kids
    }

    /// Waits until exactly `n` workers run, returning their pids.
    pub fn wait_workers(&mut self, n: usize, timeout: Duration) -> Vec<u32> {
        match wait_for(timeout, || {
            let w = self.workers();
            (w.len() == n).then_some(w)
        }) {
            Some(w) => w,
            None => panic!(
                "expected {n} workers, have {:?}; stderr:\n{}",
                self.workers(),
                self.stderr()
            ),
        }
    }

    /// Waits until a `GET /` on `port` is answered, and returns the answer.
    pub fn wait_serving(&self, port: u16, timeout: Duration) -> Response {
        wait_for(timeout, || http_get(port).ok())
            .unwrap_or_else(|| panic!("not serving on port {port}; stderr:\n{}", self.stderr()))
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        signal(self.pid, sig);
    }

    /// Waits for the watcher to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        wait_for(timeout, || child.try_wait().ok().flatten())
    }

    /// Waits for a run that ends by itself (bad input, a daemon's launcher)
    /// and returns (status, stdout, stderr); fails the test on timeout.
    pub fn output(&mut self, timeout: Duration) -> (ExitStatus, String, String) {
        match self.wait_exit(timeout) {
            Some(status) => (status, self.stdout(), self.stderr()),
            None => panic!(
                "cluster {:?} did not exit within {timeout:?}; stderr:\n{}",
                self.args,
                self.stderr()
            ),
        }
    }

    /// [`Running::output`] without stdout: (status, stderr).
    pub fn run_to_end(&mut self, timeout: Duration) -> (ExitStatus, String) {
        let (status, _, stderr) = self.output(timeout);
        (status, stderr)
    }

    pub fn seen_workers(&self) -> Vec<u32> {
        self.seen.clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut all = descendants(self.pid);
        all.extend(self.seen.iter().copied());
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for p in all {
            if alive(p) {
                signal(p, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// Runs `cluster ARGS...` to completion (for bad-input cases), with a
/// deadline; returns (status, stderr).
pub fn run_to_end(args: &[&str], timeout: Duration) -> (ExitStatus, String) {
    watcher().args(args).spawn().run_to_end(timeout)
}

/// Runs `cluster ARGS...` with a deadline, `RUST_LOG` left as it is, and
/// returns (status, stdout, stderr); kills it on timeout.
pub fn cluster_output(args: &[&str], timeout: Duration) -> (ExitStatus, String, String) {
    watcher()
        .inherit_rust_log()
        .args(args)
        .spawn()
        .output(timeout)
}

/// Runs `cluster ARGS...` (a control subcommand, `--help`) to the end,
/// with stdin from /dev/null.
pub fn cli<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Output {
    Command::new(cluster_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run cluster")
}

/// Runs `cluster SUBCOMMAND --pid-file PID_FILE ARGS...`, also where no
/// watcher runs (yet).
/// `cluster status --json -q` of a running watcher; `None` when it does
/// not answer. Exit 5 (degraded: fewer workers ready than wanted) is an
/// answer too.
pub fn status_json(c: &Running) -> Option<serde_json::Value> {
    let out = c.control(&["status", "--json", "-q"]);
    if !matches!(out.status.code(), Some(0 | 5)) {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The `workers` rows of a status.
pub fn workers_of(v: &serde_json::Value) -> Vec<serde_json::Value> {
    v["workers"].as_array().cloned().unwrap_or_default()
}

/// Waits (20 s at most) until the status has `n` rows, all ready; returns it.
pub fn wait_ready(c: &Running, n: usize) -> serde_json::Value {
    wait_for(Duration::from_secs(20), || {
        status_json(c).filter(|v| {
            let w = workers_of(v);
            w.len() == n && w.iter().all(|w| w["state"] == "ready")
        })
    })
    .unwrap_or_else(|| panic!("never {n} ready workers:\n{}", c.stderr()))
}

pub fn control(pid_file: &Path, command: &[&str]) -> Output {
    let (subcommand, rest) = command.split_first().expect("a subcommand");
    let head = [
        OsStr::new(subcommand),
        OsStr::new("--pid-file"),
        pid_file.as_os_str(),
    ];
    cli(head.into_iter().chain(rest.iter().map(OsStr::new)))
}

/// Lines of a spawn log written by `test_worker` (`spawn ctx slot pid ms [port]`).
pub fn spawn_log(path: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// Counts of a load generator.
#[derive(Default)]
pub struct Load {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub errors: Mutex<Vec<String>>,
    pub stop: AtomicBool,
}

impl Load {
    pub fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut e = self.errors.lock().unwrap();
        if e.len() < 20 {
            e.push(what);
        }
    }

    /// Stops the clients and returns (ok, failed, first errors).
    pub fn finish(&self, threads: Vec<std::thread::JoinHandle<()>>) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in threads {
            let _ = t.join();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.errors.lock().map(|e| e.clone()).unwrap_or_default(),
        )
    }
}

/// One request on a fresh connection per iteration.
pub fn new_connection_client(port: u16, load: Arc<Load>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !load.stop.load(Ordering::Relaxed) {
            match http_get(port) {
                Ok(r) if r.status == 200 => {
                    load.ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(r) => load.fail(format!("status {}", r.status)),
                Err(e) => load.fail(format!("new connection: {e}")),
            }
        }
    })
}

/// Reads one response with a Content-Length body; returns whether the
/// server asked to close the connection.
pub fn read_response(reader: &mut BufReader<TcpStream>) -> std::io::Result<bool> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    if !line.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("bad status line {line:?}")));
    }
    let (mut length, mut close) = (0usize, false);
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let lower = l.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("connection:") && lower.contains("close") {
            close = true;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(close)
}

/// Keep-alive requests on one connection, reconnecting when the server
/// says `Connection: close`. A request that gets no response is a failure.
pub fn keep_alive_client(port: u16, load: Arc<Load>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        'outer: while !load.stop.load(Ordering::Relaxed) {
            let stream = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => s,
                Err(e) => {
                    load.fail(format!("keep-alive connect: {e}"));
                    continue;
                }
            };
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            while !load.stop.load(Ordering::Relaxed) {
                if let Err(e) = writer.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") {
                    load.fail(format!("keep-alive write: {e}"));
                    continue 'outer;
                }
                match read_response(&mut reader) {
                    Ok(close) => {
                        load.ok.fetch_add(1, Ordering::Relaxed);
                        if close {
                            continue 'outer;
                        }
                    }
                    Err(e) => {
                        load.fail(format!("keep-alive read: {e}"));
                        continue 'outer;
                    }
                }
            }
        }
    })
}
pub mod fds;
pub mod pg;
