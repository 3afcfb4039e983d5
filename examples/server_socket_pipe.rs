//! Server socket pipes: a parent process serves one listening socket to N
//! child processes that all serve HTTP on it, sharing one accept queue.
//!
//! ```text
//! cargo run --example server_socket_pipe [ADDR] [CHILDREN]   # default 127.0.0.1:1337, 2
//! curl http://127.0.0.1:1337/    # "served by pid 4242"; again: another pid
//! ```
//!
//! The parent makes one `pipe_pair()` per child, clears `FD_CLOEXEC` on the
//! child's end and re-executes itself as `server_socket_pipe child ADDR`
//! with `SERVER_PIPE_FD` naming that descriptor; it closes its copy of the
//! child's end and runs `ServerSocketPipeProvider::provide_for` on its own
//! end. Each child takes its end with `cluster::inherited_pipe`, asks
//! `ServerSocketPipeFactory::listen(ADDR)`, and the provider binds the
//! address once and hands every child a duplicate. Each child prints one
//! line, `child PID listening on ADDR (inode N)`: the same inode in every
//! line is the one shared socket.
//!
//! SIGTERM or Ctrl-C stops the parent: it sends SIGTERM to every child,
//! which finishes its open connections (up to 5 s) and exits; the parent
//! exits 0 once they are gone. Children ignore SIGINT (a terminal's Ctrl-C
//! reaches the whole process group), and exit by themselves when the
//! parent disappears. Runs standalone; `cluster` is not needed.

use std::convert::Infallible;
use std::os::fd::{AsFd, AsRawFd};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use tokio::signal::unix::{signal, SignalKind};

use cluster::{
    inherited_pipe, pipe_pair, Listener, ServerSocketPipeFactory, ServerSocketPipeProvider,
};

/// The environment variable naming the child's inherited pipe end.
const PIPE_VAR: &str = "SERVER_PIPE_FD";
/// How long children get to exit once asked to.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a child lets open connections finish after SIGTERM.
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
            eprintln!("server_socket_pipe: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.first().map(String::as_str) {
        Some("child") => match args.get(1) {
            Some(addr) => runtime.block_on(child(addr)),
            None => Err("usage: server_socket_pipe child ADDR".into()),
        },
        _ => {
            let addr = args.first().map_or("127.0.0.1:1337", String::as_str);
            match args.get(1).map_or(Ok(2), |n| n.parse::<usize>()) {
                Ok(n) if n > 0 => runtime.block_on(parent(addr, n)),
                _ => Err("usage: server_socket_pipe [ADDR] [CHILDREN >= 1]".into()),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("server_socket_pipe[{}]: {e}", std::process::id());
            ExitCode::FAILURE
        }
    }
}

async fn parent(addr: &str, n: usize) -> Result<(), BoxError> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let provider = ServerSocketPipeProvider::new();
    let exe = std::env::current_exe()?;
    let mut children = Vec::with_capacity(n);
    for _ in 0..n {
        let (mine, theirs) = pipe_pair()?;
        // Only the child's end survives exec, and only into this child: we
        // spawn one child at a time and close our copy right after.
        fcntl(&theirs, FcntlArg::F_SETFD(FdFlag::empty()))?;
        let child = tokio::process::Command::new(&exe)
            .arg("child")
            .arg(addr)
            .env(PIPE_VAR, theirs.as_raw_fd().to_string())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true) // if we fail before stopping them in order
            .spawn()?;
        drop(theirs);
        let provider = provider.clone();
        tokio::spawn(async move {
            if let Err(e) = provider.provide_for(mine).await {
                eprintln!("server_socket_pipe: a child's pipe failed: {e}");
            }
        });
        children.push(child);
    }
    println!("server_socket_pipe: {n} children share {addr}");

    // Until a signal, or until a child exits by itself (one that cannot
    // listen, because the address is taken, say): then stop the others.
    let mut check = tokio::time::interval(Duration::from_millis(200));
    let mut early = None;
    while early.is_none() {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = check.tick() => {
                for child in &mut children {
                    if let Some(status) = child.try_wait()? {
                        early = Some(status);
                    }
                }
            }
        }
    }
    for child in &children {
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    for child in &mut children {
        if tokio::time::timeout(EXIT_TIMEOUT, child.wait())
            .await
            .is_err()
        {
            eprintln!("server_socket_pipe: a child did not exit in time; killing it");
            let _ = child.kill().await;
        }
    }
    match early {
        Some(status) => Err(format!("a child exited early ({status})").into()),
        None => Ok(()),
    }
}

async fn child(addr: &str) -> Result<(), BoxError> {
    // Ignore SIGINT (a terminal's Ctrl-C reaches us too): the parent stops
    // us with SIGTERM. Registered for as long as we run.
    let _sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let parent = std::os::unix::process::parent_id();
    let pid = std::process::id();

    let factory = ServerSocketPipeFactory::new(inherited_pipe(PIPE_VAR)?)?;
    let listener = factory.listen(addr).await?;
    let local = listener
        .local_tcp_addr()
        .map_or_else(|| addr.to_string(), |a| a.to_string());
    let inode = match &listener {
        Listener::Tcp(l) => nix::sys::stat::fstat(l.as_fd()).ok(),
        Listener::Unix(l) => nix::sys::stat::fstat(l.as_fd()).ok(),
        _ => None,
    }
    .map_or(0, |st| st.st_ino);
    println!("child {pid} listening on {local} (inode {inode})");

    let graceful = GracefulShutdown::new();
    let mut parent_check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = parent_check.tick() => {
                if std::os::unix::process::parent_id() != parent {
                    break; // the parent is gone
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let body = Bytes::from(format!("served by pid {pid}\n"));
                    let service = service_fn(move |_req: Request<Incoming>| {
                        let body = body.clone();
                        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                    });
                    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    eprintln!("server_socket_pipe[{pid}]: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!("server_socket_pipe[{pid}]: connections still open after {DRAIN_TIMEOUT:?}");
    }
    Ok(())
}
