//! Server socket pipes with real sockets and real processes: the
//! `server_socket_pipe` example (a parent with a provider, two re-executed
//! children with factories), and providers and factories in this process.
//!
//! Every test takes `SERIAL`: one compares the process's open descriptors
//! (`/proc/self/fd`) before and after, which only means something while no
//! other test opens or closes descriptors.

mod common;
use common::fds::{open_fds, run, serial};

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use cluster::{
    pipe_pair, Cluster, Listener, ListenerFactory, ServerSocketPipeFactory,
    ServerSocketPipeProvider,
};
use nix::sys::signal::Signal;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

/// The `server_socket_pipe` example binary, built for this test binary.
fn example_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| common::build_example("server_socket_pipe"))
        .clone()
}

/// The example's parent process; it and its children are killed on drop.
struct Parent {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Parent {
    fn start(args: &[&str]) -> Parent {
        let mut child = Command::new(example_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start server_socket_pipe");
        let lines = forward(child.stdout.take().unwrap());
        let stderr = forward(child.stderr.take().unwrap());
        Parent {
            child,
            lines,
            stderr,
        }
    }

    /// The next line of its (and its children's) stdout within `timeout`.
    fn line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        common::wait_for(timeout, || self.child.try_wait().ok().flatten())
    }

    /// Everything written to stderr so far (and until it closes, up to `timeout`).
    fn stderr_until_closed(&self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut out = String::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.stderr.recv_timeout(left) {
                Ok(line) => out += &(line + "\n"),
                Err(_) => break,
            }
        }
        out
    }
}

impl Drop for Parent {
    fn drop(&mut self) {
        for pid in common::descendants(self.child.id()) {
            common::signal(pid, Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn forward(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// "child 4242 listening on 127.0.0.1:8080 (inode 123)" → (4242, addr, 123).
fn parse_child_line(line: &str) -> Option<(u32, String, u64)> {
    let rest = line.strip_prefix("child ")?;
    let (pid, rest) = rest.split_once(" listening on ")?;
    let (addr, rest) = rest.split_once(" (inode ")?;
    let inode = rest.strip_suffix(')')?;
    Some((pid.parse().ok()?, addr.to_string(), inode.parse().ok()?))
}

#[test]
fn two_children_share_one_socket_and_one_accept_queue() {
    let _serial = serial();
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut parent = Parent::start(&[&addr, "2"]);

    // Both children report the one socket: same address, same inode.
    let mut children = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while children.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = parent.line(left).unwrap_or_else(|| {
            panic!(
                "children did not report; stderr: {}",
                parent.stderr_until_closed(Duration::from_millis(100))
            )
        });
        if let Some((pid, local, inode)) = parse_child_line(&line) {
            assert_eq!(local, addr, "{line}");
            children.insert(pid, inode);
        }
    }
    let inodes: HashSet<u64> = children.values().copied().collect();
    assert_eq!(inodes.len(), 1, "two sockets: {children:?}");
    assert_ne!(inodes.into_iter().next(), Some(0));

    // One accept queue: new connections reach both children.
    let mut answered = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered.len() < 2 && Instant::now() < deadline {
        if let Ok(response) = common::http_get(port) {
            assert_eq!(response.status, 200);
            let pid: u32 = response
                .body
                .trim()
                .strip_prefix("served by pid ")
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("body {:?}", response.body));
            assert!(children.contains_key(&pid), "pid {pid} is not a child");
            answered.insert(pid);
        }
    }
    assert_eq!(answered.len(), 2, "only {answered:?} answered");

    // SIGTERM stops the children, then the parent, which exits 0.
    common::signal(parent.child.id(), Signal::SIGTERM);
    let status = parent
        .wait_exit(Duration::from_secs(20))
        .expect("the parent did not exit after SIGTERM");
    assert!(status.success(), "{status}");
    for pid in children.keys() {
        assert!(
            common::wait_for(Duration::from_secs(5), || (!common::alive(*pid))
                .then_some(()))
            .is_some(),
            "child {pid} outlived the parent"
        );
    }
}

#[test]
fn a_bind_failure_in_the_parent_fails_the_child_with_its_reason() {
    let _serial = serial();
    // The port is taken (listening, no SO_REUSEADDR sharing possible).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut parent = Parent::start(&[&addr, "1"]);
    let status = parent
        .wait_exit(Duration::from_secs(30))
        .expect("the parent did not exit");
    assert!(!status.success());
    // The child's error is the parent's bind error, with the OS reason.
    let stderr = parent.stderr_until_closed(Duration::from_secs(5));
    assert!(
        stderr.contains(&format!("cannot listen on {addr}: Address already in use")),
        "{stderr}"
    );
}

#[test]
fn a_bind_failure_is_an_err_with_the_parents_reason() {
    run(async {
        let provider = ServerSocketPipeProvider::new();
        let factory = connect(&provider);
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let err = factory.listen(&addr).await.unwrap_err();
        assert!(err.is_bind(), "{err}");
        assert_eq!(
            err.io_error().and_then(|e| e.raw_os_error()),
            Some(libc::EADDRINUSE)
        );
        assert_eq!(
            err.to_string(),
            format!("cannot listen on {addr}: Address already in use (os error 98)")
        );
        // A path the parent cannot bind: its reason too.
        let err = factory
            .listen("unix:/nonexistent-dir/x.sock")
            .await
            .unwrap_err();
        assert!(err.is_bind(), "{err}");
        assert!(
            err.to_string().contains("No such file or directory"),
            "{err}"
        );
        // The connection still serves.
        factory.listen("127.0.0.1:0").await.unwrap();
    })
}

/// A factory whose pipe `provider` serves in a task.
fn connect(provider: &ServerSocketPipeProvider) -> ServerSocketPipeFactory {
    let (a, b) = pipe_pair().unwrap();
    let p = provider.clone();
    tokio::spawn(async move { p.provide_for(a).await });
    ServerSocketPipeFactory::new(b).unwrap()
}

fn inode(listener: &Listener) -> u64 {
    let fd = match listener {
        Listener::Tcp(l) => l.as_fd(),
        Listener::Unix(l) => l.as_fd(),
        _ => panic!("not a socket listener"),
    };
    nix::sys::stat::fstat(fd).unwrap().st_ino
}

/// A request as the factory encodes it: version 1, id, address.
fn raw_request(id: u8, addr: &str) -> Vec<u8> {
    assert!(addr.len() < 128);
    let mut bytes = vec![1, id, addr.len() as u8];
    bytes.extend_from_slice(addr.as_bytes());
    bytes
}

fn send_raw(fd: &OwnedFd, bytes: &[u8], fds: &[i32]) {
    let iov = [std::io::IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None).unwrap();
}

#[test]
fn garbage_and_hang_ups_do_not_disturb_other_connections() {
    run(async {
        let provider = ServerSocketPipeProvider::new();
        let good = connect(&provider);
        let before = inode(&good.listen("127.0.0.1:0").await.unwrap());

        let (r, _w) = nix::unistd::pipe().unwrap();
        let oversize = vec![1u8; 70_000];
        let truncated = raw_request(1, "127.0.0.1:0")[..5].to_vec();
        let mut wrong_version = raw_request(1, "127.0.0.1:0");
        wrong_version[0] = 99;
        type Attack = (&'static str, Vec<u8>, bool, bool);
        let attacks: Vec<Attack> = vec![
            // (what, bytes, attach a descriptor, then hang up before the reply)
            (
                "garbage",
                b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(),
                false,
                false,
            ),
            ("oversize", oversize, false, false),
            ("truncated", truncated, false, false),
            ("wrong version", wrong_version, false, false),
            ("empty datagram", Vec::new(), false, false),
            (
                "descriptor attached",
                raw_request(1, "127.0.0.1:0"),
                true,
                false,
            ),
            (
                "hang-up mid-request",
                raw_request(1, "127.0.0.1:0"),
                false,
                true,
            ),
        ];
        let mut tasks = Vec::new();
        let mut kept = Vec::new();
        for (what, bytes, attach, hang_up) in attacks {
            let (mine, theirs) = pipe_pair().unwrap();
            let p = provider.clone();
            tasks.push((
                what,
                hang_up,
                tokio::spawn(async move { p.provide_for(theirs).await }),
            ));
            let fds = if attach { vec![r.as_raw_fd()] } else { vec![] };
            send_raw(&mine, &bytes, &fds);
            if hang_up {
                drop(mine);
            } else {
                kept.push(mine); // the attacker stays connected
            }
            // Between attacks, the good connection still gets its socket.
            assert_eq!(
                inode(&good.listen("127.0.0.1:0").await.unwrap()),
                before,
                "after {what}"
            );
        }
        for (what, hang_up, task) in tasks {
            let result = tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .unwrap_or_else(|_| panic!("{what}: the provider still serves the connection"))
                .unwrap();
            if hang_up {
                // Its reply may or may not have been sent: either is fine.
                if let Err(e) = result {
                    assert!(e.is_ipc(), "{what}: {e}");
                }
            } else {
                let err = result.expect_err(what);
                assert!(err.is_ipc(), "{what}: {err}");
            }
        }
        // The attackers' connections were closed by the provider.
        for fd in &kept {
            let mut buf = [0u8; 16];
            let n =
                nix::sys::socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).unwrap();
            assert_eq!(n, 0, "connection still open");
        }
        assert_eq!(inode(&good.listen("127.0.0.1:0").await.unwrap()), before);
    })
}

#[test]
fn one_provider_serves_many_connections_at_once() {
    run(async {
        let provider = ServerSocketPipeProvider::new();
        let factories: Vec<_> = (0..16)
            .map(|_| std::sync::Arc::new(connect(&provider)))
            .collect();
        let port = common::free_port();
        let addr = format!("127.0.0.1:{port}");
        let tasks: Vec<_> = factories
            .iter()
            .map(|f| {
                let (f, addr) = (f.clone(), addr.clone());
                tokio::spawn(async move { inode(&f.listen(&addr).await.unwrap()) })
            })
            .collect();
        let mut inodes = HashSet::new();
        for t in tasks {
            inodes.insert(t.await.unwrap());
        }
        assert_eq!(inodes.len(), 1, "{inodes:?}");
        // Through the trait, as a server generic over its factory would.
        async fn via_trait(f: &impl ListenerFactory, addr: &str) -> u64 {
            inode(&f.listen(addr).await.unwrap())
        }
        assert!(inodes.contains(&via_trait(factories[0].as_ref(), &addr).await));
        // The standalone ServerSocketFactory implements it too: it binds
        // here, so the address is in use (SO_REUSEADDR does not share a
        // listening port).
        let err = Cluster::server_socket_factory()
            .listen(&addr)
            .await
            .unwrap_err();
        assert!(err.is_bind(), "{err}");
    })
}

#[test]
fn no_descriptor_leaks_over_10000_requests() {
    let dir = tempfile::tempdir().unwrap();
    let unix = format!("unix:{}", dir.path().join("s.sock").display());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let in_use = taken.local_addr().unwrap().to_string();
    let before = run(async { open_fds() });
    run(async {
        let initial = open_fds();
        let provider = ServerSocketPipeProvider::new();
        let factory = connect(&provider);
        let addrs = ["127.0.0.1:0", unix.as_str(), "[::1]:0", in_use.as_str()];
        let round = |n: usize| {
            let factory = &factory;
            async move {
                for i in 0..n {
                    let addr = addrs[i % addrs.len()];
                    match factory.listen(addr).await {
                        Ok(listener) => drop(listener),
                        Err(e) if e.is_bind() => {} // in use; or no IPv6 here
                        Err(e) => panic!("{addr}: {e}"),
                    }
                }
            }
        };
        round(addrs.len()).await;
        // Bound once: the provider holds its sockets and pipe ends now.
        let warm = open_fds();
        round(10_000).await;
        assert_eq!(open_fds(), warm, "descriptors leaked over 10,000 requests");
        drop(factory);
        drop(provider);
        // The provider's task ends when it sees the pipe close.
        let deadline = Instant::now() + Duration::from_secs(5);
        while open_fds() != initial && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            open_fds(),
            initial,
            "descriptors left after the provider is gone"
        );
    });
    assert_eq!(run(async { open_fds() }), before);
    assert!(
        !dir.path().join("s.sock").exists(),
        "the provider's socket file is left"
    );
}
