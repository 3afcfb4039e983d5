//! A worker program driven by the integration tests (not a user example).
//!
//! `test_worker MODE [ADDR]`, with MODE one of:
//!
//! * `serve ADDR`: answer each connection with a tiny HTTP/1.1 response whose
//!   headers name the worker (`x-worker-id`, `x-worker-slot`, `x-worker-pid`),
//!   then close it. Exits when `Cluster::await_termination` returns.
//! * `exit`: exit with status 3 at once.
//! * `garbage ADDR`: like `serve`, but the worker in slot `TEST_GARBAGE_SLOT`
//!   writes garbage to its IPC socket once (the first time, marked by the file
//!   `TEST_GARBAGE_MARK`), which must get it replaced.
//!
//! * `hang ADDR`: takes the listener, then never becomes ready (never calls
//!   `ready` or `await_termination`) if the file `TEST_HANG_MARK` exists.
//! * `block ADDR`: like `serve`, but when the file `TEST_BLOCK_MARK` does not
//!   exist yet, creates it and blocks its runtime thread 300 ms after ready.
//!
//! * `log N PACE_MS`: logs N records through `Cluster::log_layer()`
//!   (`record` with fields `i`, `slot`, `pid`), sleeping PACE_MS after every
//!   100, then `done`, then waits for termination and logs `bye`.
//! * `flood N ADDR`: serves like `serve` while a thread logs N records as
//!   fast as it can.
//! * `messages`: answers every `(u64, String)` message from the watcher
//!   with `(n, "slot:pid")`; on `(0, "burst")` sends 1,000 numbered messages;
//!   on `(0, "oversize")` tries a message over the limit and reports
//!   `(0, "too large: <bool>")`.
//! * `print`: writes test lines on stdout and stderr, then waits.
//! * `trace N`: logs N `trace!` records as fast as it can, a `debug!` in a
//!   span `req{user=ann}` and one in `req{user=bob}`, then `info!("done")`,
//!   then waits.
//! * `jsonprint`: prints a JSON object on stdout and a panic-like line on
//!   stderr, then waits.
//! * `grow ADDR`: like `serve`, after touching 64 MiB of memory.
//!
//! Every start appends `spawn <context> <slot> <pid> <unix-ms> [port]` to the
//! file named by `TEST_SPAWN_LOG`, if set.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use cluster::Cluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn log_line(extra: &str) {
    let Some(path) = std::env::var_os("TEST_SPAWN_LOG") else {
        return;
    };
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let line = format!(
        "spawn {} {} {} {ms} {extra}\n",
        Cluster::context_id()
            .map(|c| c.to_string())
            .unwrap_or_else(|| "standalone".into()),
        Cluster::slot().unwrap_or(0),
        std::process::id(),
    );
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let addr = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    if matches!(mode.as_str(), "log" | "flood" | "trace") {
        use tracing_subscriber::prelude::*;
        tracing_subscriber::registry()
            .with(Cluster::log_layer())
            .init();
    }
    match mode.as_str() {
        "log" => return log_records(&addr),
        "messages" => return messages(),
        "print" => return print_lines(),
        "trace" => return trace_flood(&addr),
        "jsonprint" => {
            println!(r#"{{"msg":"listening","port":8080,"tls":false,"tags":["a","b"]}}"#);
            eprintln!("thread 'main' panicked at src/main.rs:1:1: oh no");
            runtime().block_on(Cluster::await_termination());
            return;
        }
        "exit" => {
            log_line("");
            std::process::exit(3);
        }
        "serve" | "garbage" | "hang" | "block" | "flood" => {}
        "grow" => {
            let mut big = vec![0u8; 64 << 20];
            for i in (0..big.len()).step_by(4096) {
                big[i] = 1;
            }
            std::mem::forget(big);
        }
        other => {
            eprintln!("test_worker: unknown mode {other:?}");
            std::process::exit(2);
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = match Cluster::server_socket_factory().listen(&addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("test_worker: {e}");
                std::process::exit(1);
            }
        };
        let port = listener.local_tcp_addr().map(|a| a.port().to_string()).unwrap_or_default();
        log_line(&port);
        if mode == "garbage" {
            maybe_send_garbage();
        }
        if mode == "flood" {
            let n: u64 = std::env::args().nth(3).and_then(|s| s.parse().ok()).unwrap_or(100_000);
            std::thread::spawn(move || {
                for i in 0..n {
                    tracing::info!(i, "flood");
                }
                tracing::info!("flood done");
            });
        }
        if mode == "hang" && std::env::var_os("TEST_HANG_MARK").is_some_and(|m| std::path::Path::new(&m).exists()) {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1000));
            }
        }
        if mode == "block" {
            if let Some(mark) = std::env::var_os("TEST_BLOCK_MARK") {
                if std::fs::OpenOptions::new().write(true).create_new(true).open(&mark).is_ok() {
                    tokio::spawn(async {
                        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                        // Blocks the only runtime thread: heartbeats go unanswered.
                        std::thread::sleep(std::time::Duration::from_secs(1000));
                    });
                }
            }
        }
        let id = Cluster::context_id().map(|c| c.to_string()).unwrap_or_else(|| "standalone".into());
        let head = format!(
            "HTTP/1.1 200 OK\r\nx-worker-id: {id}\r\nx-worker-slot: {}\r\nx-worker-pid: {}\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
            Cluster::slot().unwrap_or(0),
            std::process::id()
        );
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { continue };
                let head = head.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = stream.write_all(head.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Cluster::await_termination().await;
        server.abort();
    });
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn trace_flood(n: &str) {
    let n: u64 = n.parse().unwrap_or(50_000);
    for i in 0..n {
        tracing::trace!(i, "noise");
    }
    tracing::info_span!("req", user = "ann").in_scope(|| tracing::debug!("ann's"));
    tracing::info_span!("req", user = "bob").in_scope(|| tracing::debug!("bob's"));
    tracing::info!(n, ok = true, "done");
    runtime().block_on(Cluster::await_termination());
}

fn log_records(n: &str) {
    let n: u64 = n.parse().unwrap_or(10);
    let pace: u64 = std::env::args()
        .nth(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let slot = Cluster::slot().unwrap_or(0);
    let pid = std::process::id();
    runtime().block_on(async move {
        let span = tracing::info_span!("job", kind = "test");
        for i in 0..n {
            span.in_scope(|| tracing::info!(i, slot, pid, "record"));
            if pace > 0 && i % 100 == 99 {
                tokio::time::sleep(std::time::Duration::from_millis(pace)).await;
            }
        }
        tracing::warn!(slot, pid, "done");
        Cluster::await_termination().await;
        // Logged while exiting: must still reach the watcher.
        tracing::info!(slot, pid, "bye");
    });
}

fn messages() {
    runtime().block_on(async {
        let chan = Cluster::channel::<(u64, String)>().expect("a worker");
        let me = format!("{}:{}", Cluster::slot().unwrap_or(0), std::process::id());
        Cluster::ready();
        loop {
            tokio::select! {
                msg = chan.recv() => match msg {
                    Ok((0, cmd)) if cmd == "burst" => {
                        for i in 1..=1000u64 {
                            chan.send(&(i, me.clone())).unwrap();
                        }
                    }
                    Ok((0, cmd)) if cmd == "oversize" => {
                        let too_large = chan
                            .send(&(0, "x".repeat(cluster::MAX_MESSAGE_SIZE + 1)))
                            .is_err_and(|e| e.is_too_large());
                        chan.send(&(0, format!("too large: {too_large}"))).unwrap();
                    }
                    Ok((n, _)) => chan.send(&(n, me.clone())).unwrap(),
                    Err(_) => return,
                },
                _ = Cluster::await_termination() => return,
            }
        }
    });
}

fn print_lines() {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for i in 0..2000 {
        writeln!(out, "line-{i}-{}", "0".repeat(100)).unwrap();
    }
    writeln!(out, "{}", "x".repeat(20_000)).unwrap();
    out.write_all(b"bad \xff\xfe utf8\n").unwrap();
    out.flush().unwrap();
    drop(out);
    let mut err = std::io::stderr().lock();
    for i in 0..2000 {
        writeln!(err, "err-{i}-{}", "1".repeat(100)).unwrap();
    }
    write!(err, "last line without newline").unwrap();
    drop(err);
    runtime().block_on(Cluster::await_termination());
}

fn maybe_send_garbage() {
    let wanted: u32 = std::env::var("TEST_GARBAGE_SLOT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let Some(mark) = std::env::var_os("TEST_GARBAGE_MARK") else {
        return;
    };
    if Cluster::slot() != Some(wanted) {
        return;
    }
    if std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&mark)
        .is_err()
    {
        return; // already done once: this is the replacement
    }
    let fd: i32 = std::env::var("CLUSTER_IPC_FD").unwrap().parse().unwrap();
    let garbage = [0xffu8, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x02];
    // SAFETY: writes from a valid buffer of the given length to the IPC
    // descriptor this process inherited (owned by the cluster library, which
    // keeps it open for the life of the process); a test-only misuse.
    let n = unsafe { libc::write(fd, garbage.as_ptr().cast(), garbage.len()) };
    assert_eq!(n, garbage.len() as isize, "garbage write failed");
}
