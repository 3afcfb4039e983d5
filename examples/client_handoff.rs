//! Client socket handoff: one acceptor process hands every TCP connection,
//! with data attached, to N child processes that serve HTTP.
//!
//! ```text
//! cargo build --release --example client_handoff
//! target/release/examples/client_handoff [ADDR] [CHILDREN]   # default 127.0.0.1:8081, 2
//! curl http://127.0.0.1:8081/    # "pid 4242 served connection 1 from 127.0.0.1:51234"
//! ```
//!
//! The parent binds the TCP listener and a `ClientSocketPipeListener` in a
//! private temporary directory, then starts the children by re-executing
//! itself as `client_handoff child PIPE_PATH`; each child connects with
//! `ClientSocketReceivePipe::connect`. The parent accepts connections and
//! sends them round-robin, each with a `Handoff { number, peer }`, to the
//! children, which answer the request with their pid and that data.
//!
//! Ctrl-C or SIGTERM stops the parent: it closes the pipes, and every child
//! finishes its open connections (up to 5 s) and exits when its pipe
//! reaches end of file. Children ignore SIGINT so that a terminal's Ctrl-C,
//! which reaches the whole process group, stops them in that order too.
//! Runs standalone; `cluster` is not needed.

use std::convert::Infallible;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, SignalKind};

use cluster::{ClientSocketPipeListener, ClientSocketReceivePipe, Stream};

/// The data the parent attaches to every connection it hands off.
#[derive(Debug, Serialize, Deserialize)]
struct Handoff {
    /// 1 for the first connection the parent accepted, then 2, 3, ...
    number: u64,
    /// The client's address, as the parent saw it.
    peer: String,
}

/// How long children get to connect, and to exit once asked to.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a child lets open connections finish after its pipe closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("client_handoff: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.first().map(String::as_str) {
        Some("child") => match args.get(1) {
            Some(path) => runtime.block_on(child(Path::new(path))),
            None => Err("usage: client_handoff child PIPE_PATH".into()),
        },
        _ => {
            let addr = args.first().map_or("127.0.0.1:8081", String::as_str);
            match args.get(1).map_or(Ok(2), |n| n.parse::<usize>()) {
                Ok(n) if n > 0 => runtime.block_on(parent(addr, n)),
                _ => Err("usage: client_handoff [ADDR] [CHILDREN >= 1]".into()),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("client_handoff[{}]: {e}", std::process::id());
            ExitCode::FAILURE
        }
    }
}

async fn parent(addr: &str, n: usize) -> Result<(), BoxError> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    // A directory only we can enter (mode 0700): only our children connect.
    let dir = tempfile::tempdir()?;
    let pipe_listener = ClientSocketPipeListener::bind(dir.path().join("handoff.sock"))?;

    let exe = std::env::current_exe()?;
    let mut children = Vec::with_capacity(n);
    for _ in 0..n {
        let child = tokio::process::Command::new(&exe)
            .arg("child")
            .arg(pipe_listener.path())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true) // if we fail before stopping them in order
            .spawn()?;
        children.push(child);
    }
    let mut pipes = Vec::with_capacity(n);
    let deadline = tokio::time::sleep(STARTUP_TIMEOUT);
    tokio::pin!(deadline);
    while pipes.len() < n {
        tokio::select! {
            pipe = pipe_listener.accept() => pipes.push(pipe?),
            _ = &mut deadline => return Err("the children did not connect in time".into()),
            _ = sigterm.recv() => return Ok(()),
            _ = sigint.recv() => return Ok(()),
        }
    }
    drop(pipe_listener); // removes the socket file; nobody else may connect
    println!(
        "client_handoff: listening on {} with {n} children",
        listener.local_addr()?
    );

    let mut number = 0u64;
    let mut next = 0usize;
    loop {
        let accepted = tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                eprintln!("client_handoff: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        number += 1;
        let handoff = Handoff {
            number,
            peer: peer.to_string(),
        };
        let i = next % pipes.len();
        next = next.wrapping_add(1);
        // A slow child makes `send` wait; a signal still stops us.
        let sent = tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            sent = pipes[i].send(stream, &handoff) => sent,
        };
        if let Err(e) = sent {
            // The connection is closed; stop sending to that child.
            eprintln!("client_handoff: child pipe {i} failed, dropping it: {e}");
            pipes.remove(i);
            if pipes.is_empty() {
                return Err("every child is gone".into());
            }
        }
    }

    // Closing the pipes tells every child to finish and exit.
    drop(pipes);
    drop(listener);
    for child in &mut children {
        if tokio::time::timeout(EXIT_TIMEOUT, child.wait())
            .await
            .is_err()
        {
            eprintln!("client_handoff: a child did not exit in time; killing it");
            let _ = child.kill().await;
        }
    }
    Ok(())
}

async fn child(path: &Path) -> Result<(), BoxError> {
    // Ignore SIGINT (a terminal's Ctrl-C reaches us too): we stop when the
    // parent closes the pipe. Registered for as long as we run.
    let _sigint = signal(SignalKind::interrupt())?;
    let pipe = ClientSocketReceivePipe::connect(path)?;
    let pid = std::process::id();
    let graceful = GracefulShutdown::new();
    let mut errors_in_a_row = 0;
    loop {
        match pipe.receive::<Handoff>().await {
            Ok(Some(handoff)) => {
                errors_in_a_row = 0;
                let (stream, data) = handoff.into_parts();
                serve(&graceful, stream, data, pid);
            }
            Ok(None) => break, // the parent closed the pipe
            Err(e) => {
                // A malformed handoff costs only that connection.
                eprintln!("client_handoff[{pid}]: {e}");
                errors_in_a_row += 1;
                if errors_in_a_row >= 100 {
                    return Err("the pipe keeps failing".into());
                }
            }
        }
    }
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!("client_handoff[{pid}]: connections still open after {DRAIN_TIMEOUT:?}");
    }
    Ok(())
}

/// Serves HTTP/1.1 on one handed-off connection, watched by `graceful`.
fn serve(graceful: &GracefulShutdown, stream: Stream, data: Handoff, pid: u32) {
    let body = Bytes::from(format!(
        "pid {pid} served connection {} from {}\n",
        data.number, data.peer
    ));
    let service = service_fn(move |_req: Request<Incoming>| {
        let mut response = Response::new(Full::new(body.clone()));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        async move { Ok::<_, Infallible>(response) }
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        let _ = conn.await;
    });
}
