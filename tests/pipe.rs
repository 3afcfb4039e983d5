//! Client socket handoff pipes with real sockets and real processes.
//!
//! Every test takes `SERIAL`: several of them compare the process's open
//! descriptors (`/proc/self/fd`) before and after, which only means
//! something while no other test opens or closes descriptors.

mod common;
use common::fds::{open_fds, run, serial};

use std::future::Future;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use cluster::{
    pipe_pair, ClientSocketPipeListener, ClientSocketReceivePipe, ClientSocketSendPipe, Stream,
    TransferableSocket, MAX_HANDOFF_DATA,
};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

/// Fails when the open descriptors differ from `before`.
fn assert_same_fds(before: &[String]) {
    assert_eq!(open_fds(), before, "descriptors leaked or lost");
}

/// The `client_handoff` example binary, built for this test binary.
fn client_handoff_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| common::build_example("client_handoff"))
        .clone()
}

/// A connected TCP pair on 127.0.0.1: (client, server).
fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

/// Both ends of a fresh pipe.
fn pipes() -> (ClientSocketSendPipe, ClientSocketReceivePipe) {
    let (a, b) = pipe_pair().unwrap();
    (
        ClientSocketSendPipe::new(a).unwrap(),
        ClientSocketReceivePipe::new(b).unwrap(),
    )
}

/// Polls `fut` once: `Some(output)` if it completed, `None` if pending.
async fn poll_once<F: Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| match Pin::new(&mut *fut).poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// Asserts that reading `peer` (the other end of a handed-off socket whose
/// every copy is closed) gives end of file.
fn assert_eof(peer: &mut std::net::TcpStream) {
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(peer.read(&mut buf).unwrap(), 0, "socket still open");
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Meta {
    seq: u64,
    label: String,
}

fn is_gone_error(e: &cluster::Error) -> bool {
    e.is_ipc()
        && matches!(
            e.io_error().and_then(|io| io.raw_os_error()),
            Some(libc::EPIPE) | Some(libc::ECONNRESET)
        )
}

#[test]
fn thousand_transfers_arrive_intact_and_in_order() {
    run(async {
        const N: u64 = 1000;
        let (tx, rx) = pipes();
        // Each transfer is a different connection, of every accepted kind; we
        // keep the peers and check that each received socket is the right one.
        let mut peers: Vec<Box<dyn Read + Send>> = Vec::new();
        let mut sockets: Vec<(TransferableSocket, bool)> = Vec::new();
        for i in 0..N {
            let (socket, peer, unix): (TransferableSocket, Box<dyn Read + Send>, bool) = match i % 6
            {
                0 => {
                    let (c, s) = tcp_pair();
                    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    (s.into(), Box::new(c), false)
                }
                1 => {
                    let (c, s) = tcp_pair();
                    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    s.set_nonblocking(true).unwrap();
                    let s = tokio::net::TcpStream::from_std(s).unwrap();
                    (s.into(), Box::new(c), false)
                }
                2 => {
                    let (c, s) = tcp_pair();
                    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    (OwnedFd::from(s).into(), Box::new(c), false)
                }
                3 => {
                    let (c, s) = tcp_pair();
                    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    s.set_nonblocking(true).unwrap();
                    let s = Stream::Tcp(tokio::net::TcpStream::from_std(s).unwrap());
                    (s.into(), Box::new(c), false)
                }
                4 => {
                    let (c, s) = std::os::unix::net::UnixStream::pair().unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    (s.into(), Box::new(c), true)
                }
                _ => {
                    let (c, s) = std::os::unix::net::UnixStream::pair().unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let s = tokio::net::UnixStream::from_std({
                        s.set_nonblocking(true).unwrap();
                        s
                    })
                    .unwrap();
                    (s.into(), Box::new(c), true)
                }
            };
            peers.push(peer);
            sockets.push((socket, unix));
        }
        let kinds: Vec<bool> = sockets.iter().map(|(_, unix)| *unix).collect();
        let sender = tokio::spawn(async move {
            for (i, (socket, _)) in sockets.into_iter().enumerate() {
                let meta = Meta {
                    seq: i as u64,
                    label: format!("connection {i}"),
                };
                tx.send(socket, &meta).await.unwrap();
            }
        });
        for (i, peer) in peers.iter_mut().enumerate() {
            let got = tokio::time::timeout(Duration::from_secs(10), rx.receive::<Meta>())
                .await
                .expect("handoff in time")
                .unwrap()
                .expect("not EOF yet");
            assert_eq!(
                got.data(),
                &Meta {
                    seq: i as u64,
                    label: format!("connection {i}")
                }
            );
            let mut stream = got.into_socket();
            assert_eq!(matches!(stream, Stream::Unix(_)), kinds[i], "kind of {i}");
            stream.write_all(&(i as u32).to_le_bytes()).await.unwrap();
            drop(stream);
            let mut buf = [0u8; 4];
            peer.read_exact(&mut buf).unwrap();
            assert_eq!(u32::from_le_bytes(buf), i as u32);
            // Every copy is closed: the peer sees end of file.
            assert_eq!(peer.read(&mut buf).unwrap(), 0);
        }
        sender.await.unwrap();
        // The sender's pipe was dropped with its task: clean EOF.
        assert!(rx.receive::<Meta>().await.unwrap().is_none());
    });
}

#[test]
fn slow_receiver_makes_sender_wait_and_loses_nothing() {
    run(async {
        let before = open_fds();
        let (tx, rx) = pipes();
        let (mut client, server) = tcp_pair();
        // Warm up: the first send waits for the reactor's first readiness event.
        tx.send(server.try_clone().unwrap(), &0u64).await.unwrap();
        let first = rx.receive::<u64>().await.unwrap().unwrap();
        assert_eq!(*first.data(), 0);
        drop(first);

        // Fill the pipe until a send cannot complete.
        let mut seq = 1u64;
        let mut pending = loop {
            let (tx, socket, this) = (&tx, server.try_clone().unwrap(), seq);
            let mut fut = Box::pin(async move { tx.send(socket, &this).await });
            match poll_once(&mut fut).await {
                Some(result) => result.unwrap(),
                None => break fut,
            }
            seq += 1;
            assert!(seq < 1_000_000, "the pipe never filled up");
        };
        let queued = seq; // handoffs 0..queued were sent, `queued` is waiting
        assert!(queued > 10, "only {queued} handoffs fit");
        // It stays pending while nobody reads (no busy loop completes it).
        for _ in 0..10 {
            tokio::task::yield_now().await;
            assert!(poll_once(&mut pending).await.is_none(), "send completed");
        }

        // Drain concurrently; the waiting send completes, then send some more.
        let receiver = tokio::spawn(async move {
            let mut seqs = Vec::new();
            while let Some(handoff) = rx.receive::<u64>().await.unwrap() {
                let (mut stream, seq) = handoff.into_parts();
                // Each received socket still works.
                stream.write_all(&[seq as u8]).await.unwrap();
                seqs.push(seq);
            }
            seqs
        });
        tokio::time::timeout(Duration::from_secs(10), pending)
            .await
            .expect("the waiting send completes once the receiver reads")
            .unwrap();
        let total = queued + 100;
        for seq in queued + 1..total {
            tx.send(server.try_clone().unwrap(), &seq).await.unwrap();
        }
        drop(tx);
        let seqs = tokio::time::timeout(Duration::from_secs(10), receiver)
            .await
            .expect("receiver done")
            .unwrap();
        assert_eq!(seqs, (1..total).collect::<Vec<_>>());
        // Every byte written through the received sockets reached the peer.
        drop(server);
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut bytes = Vec::new();
        client.read_to_end(&mut bytes).unwrap();
        let expected: Vec<u8> = (1..total).map(|s| s as u8).collect();
        assert_eq!(bytes, expected);
        drop(client);
        assert_same_fds(&before);
    });
}

#[test]
fn receiver_gone_gives_the_sender_an_error_without_leaks() {
    run(async {
        let before = open_fds();
        let (mut client, server) = tcp_pair();

        // Dropped receiver with unread handoffs in its queue.
        let (tx, rx) = pipes();
        for seq in 0..3u64 {
            tx.send(server.try_clone().unwrap(), &seq).await.unwrap();
        }
        drop(rx);
        let err = tx
            .send(server.try_clone().unwrap(), &3u64)
            .await
            .unwrap_err();
        assert!(is_gone_error(&err), "{err:?}");
        drop(tx);

        // A send waiting on a full pipe fails when the receiver goes away.
        let (tx, rx) = pipes();
        tx.send(server.try_clone().unwrap(), &0u64).await.unwrap();
        rx.receive::<u64>().await.unwrap().unwrap();
        let mut pending = loop {
            let mut fut = Box::pin(tx.send(server.try_clone().unwrap(), &1u64));
            match poll_once(&mut fut).await {
                Some(result) => result.unwrap(),
                None => break fut,
            }
        };
        assert!(poll_once(&mut pending).await.is_none());
        drop(rx);
        let err = tokio::time::timeout(Duration::from_secs(10), pending)
            .await
            .expect("the waiting send fails once the receiver is gone")
            .unwrap_err();
        assert!(is_gone_error(&err), "{err:?}");
        drop(tx);

        // Every copy of the server socket, ours and those in flight, is closed.
        drop(server);
        assert_eof(&mut client);
        drop(client);
        assert_same_fds(&before);
    });
}

/// The `client_handoff` example's child mode is a real receiving process;
/// its data type is mirrored here (postcard is positional).
#[derive(Serialize)]
struct Handoff {
    number: u64,
    peer: String,
}

/// Kills and reaps a child process when dropped (also on test failure).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn killed_receiver_process_gives_the_sender_an_error_without_leaks() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let before = open_fds();
        let listener = ClientSocketPipeListener::bind(dir.path().join("pipe.sock")).unwrap();
        let mut child = Reaped(
            Command::new(client_handoff_bin())
                .arg("child")
                .arg(listener.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let tx = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("the child connects")
            .unwrap();
        drop(listener);
        assert!(
            !dir.path().join("pipe.sock").exists(),
            "socket file removed"
        );

        // The child serves a handed-off connection: it is alive and receiving.
        let (mut client, server) = tcp_pair();
        let handoff = Handoff {
            number: 7,
            peer: "test".into(),
        };
        tx.send(server, &handoff).await.unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut raw = Vec::new();
        client.read_to_end(&mut raw).unwrap();
        let response = common::parse_response(&raw).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(
            response.body,
            format!("pid {} served connection 7 from test\n", child.0.id())
        );
        drop(client);

        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.0.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        child.0.wait().unwrap();
        let (mut client, server) = tcp_pair();
        let err = tx.send(server, &handoff).await.unwrap_err();
        assert!(is_gone_error(&err), "{err:?}");
        assert_eof(&mut client);
        drop(client);
        drop(tx);
        drop(child);
        assert_same_fds(&before);
    });
}

#[test]
fn hundred_thousand_transfers_leave_descriptor_counts_flat() {
    let _serial = serial();
    const N: u64 = 100_000;
    let started = Instant::now();
    let at_start = open_fds();
    let (a, b) = pipe_pair().unwrap();
    // One connection, duplicated for every handoff (a new connection each
    // time would measure the TCP stack, not the pipe).
    let (client, server) = tcp_pair();
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let (ready_tx, ready_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let (close_tx, close_rx) = mpsc::channel::<()>();
    // Sender and receiver each on their own thread and runtime.
    let receiver = std::thread::spawn(move || {
        let rt = runtime();
        let rx = {
            let _in_runtime = rt.enter();
            ClientSocketReceivePipe::new(b).unwrap()
        };
        ready_tx.send(()).unwrap();
        rt.block_on(async {
            for seq in 0..N {
                let handoff = rx.receive::<u64>().await.unwrap().expect("not EOF");
                assert_eq!(*handoff.data(), seq);
                assert!(matches!(handoff.socket(), Stream::Tcp(_)));
            }
        });
        done_tx.send(()).unwrap();
        let _ = close_rx.recv();
        drop(rx);
        drop(rt);
    });
    let rt = runtime();
    let tx = {
        let _in_runtime = rt.enter();
        ClientSocketSendPipe::new(a).unwrap()
    };
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("receiver ready");
    let before = open_fds();
    rt.block_on(async {
        for seq in 0..N {
            tx.send(server.try_clone().unwrap(), &seq).await.unwrap();
        }
    });
    done_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("receiver done");
    // Both ends after N handoffs, pipes still open: nothing more, nothing less.
    assert_same_fds(&before);
    close_tx.send(()).unwrap();
    receiver.join().unwrap();
    drop((tx, rt, client, server));
    assert_same_fds(&at_start);
    eprintln!("{N} handoffs in {:?}", started.elapsed());
}

#[test]
fn oversize_data_is_refused_and_the_socket_closed() {
    run(async {
        let before = open_fds();
        let (tx, rx) = pipes();
        let (mut client, server) = tcp_pair();
        let too_big = vec![1u8; MAX_HANDOFF_DATA];
        let err = tx.send(server, &too_big).await.unwrap_err();
        assert!(err.is_too_large(), "{err:?}");
        assert!(!err.is_ipc());
        // Our only copy of the server socket was closed, not leaked.
        assert_eof(&mut client);
        drop(client);

        // The largest allowed data still goes through, and the pipe works on.
        let (mut client, server) = tcp_pair();
        let largest = vec![2u8; MAX_HANDOFF_DATA - 3]; // plus a 3-byte length
        tx.send(server, &largest).await.unwrap();
        let got = rx.receive::<Vec<u8>>().await.unwrap().unwrap();
        assert_eq!(got.data(), &largest);
        drop(got);
        assert_eof(&mut client);
        drop((client, tx, rx));
        assert_same_fds(&before);
    });
}

/// Sends one raw datagram with `fds` attached on a `SOCK_SEQPACKET` socket.
fn send_raw(sock: &OwnedFd, bytes: &[u8], fds: &[&dyn AsFd]) {
    let raw: Vec<_> = fds.iter().map(|fd| fd.as_fd().as_raw_fd()).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
    let iov = [std::io::IoSlice::new(bytes)];
    sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None).unwrap();
}

/// A valid envelope: version 1, then the user's postcard bytes.
fn envelope(user: &[u8]) -> Vec<u8> {
    let mut out = vec![1u8, user.len() as u8];
    assert!(user.len() < 128);
    out.extend_from_slice(user);
    out
}

#[test]
fn malformed_datagrams_are_errors_and_their_descriptors_closed() {
    run(async {
        let before = open_fds();
        let (raw_tx, b) = pipe_pair().unwrap();
        let rx = ClientSocketReceivePipe::new(b).unwrap();
        let (mut client, server) = tcp_pair();
        let seq_5 = postcard::to_stdvec(&5u64).unwrap();
        let (pipe_r, pipe_w) = nix::unistd::pipe().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let unix_dgram = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let unix_listener = std::os::unix::net::UnixListener::bind(dir.path().join("l")).unwrap();

        let cases: Vec<(&str, Vec<u8>, Vec<&dyn AsFd>)> = vec![
            ("no descriptor", envelope(&seq_5), vec![]),
            ("two descriptors", envelope(&seq_5), vec![&server, &server]),
            (
                "garbage",
                b"\xff\xff\xff\xff\xff\xff".to_vec(),
                vec![&server],
            ),
            ("empty datagram with a descriptor", vec![], vec![&server]),
            (
                "wrong version",
                {
                    let mut e = envelope(&seq_5);
                    e[0] = 2;
                    e
                },
                vec![&server],
            ),
            (
                "trailing bytes",
                {
                    let mut e = envelope(&seq_5);
                    e.push(0);
                    e
                },
                vec![&server],
            ),
            (
                "envelope length past the end",
                vec![1, 100, 5],
                vec![&server],
            ),
            (
                "data of another type",
                envelope(&[0xff, 0xff]),
                vec![&server],
            ),
            ("data with trailing bytes", envelope(&[5, 0]), vec![&server]),
            ("oversize datagram", vec![0u8; 70_000], vec![&server]),
            ("a pipe, not a socket", envelope(&seq_5), vec![&pipe_r]),
            ("a datagram socket", envelope(&seq_5), vec![&udp]),
            ("a listening socket", envelope(&seq_5), vec![&tcp_listener]),
            (
                "a Unix datagram socket",
                envelope(&seq_5),
                vec![&unix_dgram],
            ),
            (
                "a listening Unix socket",
                envelope(&seq_5),
                vec![&unix_listener],
            ),
        ];
        for (what, bytes, fds) in &cases {
            send_raw(&raw_tx, bytes, fds);
            match rx.receive::<u64>().await {
                Err(e) => assert!(e.is_ipc(), "{what}: {e:?}"),
                Ok(got) => panic!("{what}: accepted {:?}", got.map(|g| *g.data())),
            }
        }
        drop(cases);
        // The pipe still works after all that.
        send_raw(&raw_tx, &envelope(&seq_5), &[&server]);
        let got = rx.receive::<u64>().await.unwrap().unwrap();
        assert_eq!(*got.data(), 5);
        drop(got);

        // Every received copy was closed: the peers see it.
        drop(server);
        assert_eof(&mut client);
        drop(pipe_r);
        assert_eq!(
            nix::unistd::write(&pipe_w, b"x"),
            Err(nix::errno::Errno::EPIPE),
            "pipe read end still open"
        );
        drop((client, pipe_w, udp, tcp_listener, raw_tx, rx));
        drop((unix_dgram, unix_listener, dir));
        assert_same_fds(&before);
    });
}

#[test]
fn pipe_listener_refuses_an_existing_path() {
    let _serial = serial();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("taken");
    std::fs::write(&path, b"").unwrap();
    let err = ClientSocketPipeListener::bind(&path).unwrap_err();
    assert!(err.is_bind(), "{err:?}");
    assert!(path.exists(), "the existing file is left alone");
    let err = ClientSocketReceivePipe::connect(dir.path().join("nobody")).unwrap_err();
    assert!(err.is_ipc(), "{err:?}");
}

#[test]
fn client_handoff_example_serves_from_several_children_and_stops_on_sigterm() {
    let _serial = serial();
    const CHILDREN: usize = 3;
    let port = common::free_port();
    let child = Command::new(client_handoff_bin())
        .arg(format!("127.0.0.1:{port}"))
        .arg(CHILDREN.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // A parent with children like a watcher: both killed on drop.
    let mut example = common::Running::adopt(child, tempfile::tempdir().unwrap());
    let children = example.wait_workers(CHILDREN, Duration::from_secs(10));

    let mut pids = std::collections::BTreeSet::new();
    let mut last_number = 0;
    for _ in 0..3 * CHILDREN {
        let response = common::wait_for(Duration::from_secs(10), || common::http_get(port).ok())
            .expect("an HTTP answer");
        assert_eq!(response.status, 200);
        // "pid P served connection N from 127.0.0.1:PORT"
        let words: Vec<&str> = response.body.split_whitespace().collect();
        assert_eq!(words.len(), 7, "{:?}", response.body);
        assert_eq!(
            (words[0], words[2], words[3], words[5]),
            ("pid", "served", "connection", "from"),
            "{:?}",
            response.body
        );
        let pid: u32 = words[1].parse().unwrap();
        assert!(
            children.contains(&pid),
            "{pid} is not a child: {children:?}"
        );
        let number: u64 = words[4].parse().unwrap();
        assert!(number > last_number, "connection numbers go up: {number}");
        last_number = number;
        assert!(words[6].starts_with("127.0.0.1:"), "{:?}", response.body);
        pids.insert(pid);
    }
    assert!(pids.len() >= 2, "one child served everything: {pids:?}");

    example.signal(nix::sys::signal::Signal::SIGTERM);
    let status = example
        .wait_exit(Duration::from_secs(15))
        .expect("the example exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    for pid in &children {
        assert!(
            common::wait_for(Duration::from_secs(5), || (!common::alive(*pid))
                .then_some(()))
            .is_some(),
            "child {pid} still alive"
        );
    }
}
