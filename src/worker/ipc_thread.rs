//! The `cluster-ipc` thread: a current-thread tokio runtime that owns the
//! channel to the watcher. It forwards what user code queues (requests,
//! messages, log records in batches), hands what the watcher sends to
//! [`Inbound`], reports closed handed-off connections, and, when the
//! watcher goes away, asks the program to stop and makes sure it does not
//! outlive its grace period.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::dispatch::Inbound;
use super::hub_link;
use super::shared::{Outgoing, Shared};
use crate::ipc::codec::{encode, EncodeError};
use crate::ipc::message::{ToWatcher, ToWorker, VERSION};
use crate::ipc::{Channel, RecvError, SendError};
use crate::listener::{Handed, ToIpc};
use crate::log::LogRecord;

/// What the IPC thread owns besides the socket.
pub(crate) struct Ipc {
    pub rx: mpsc::UnboundedReceiver<Outgoing>,
    pub logs: mpsc::Receiver<LogRecord>,
    pub grace: Duration,
    pub inbound: Inbound,
}

/// Most records packed into one datagram.
const LOG_BATCH: usize = 256;

/// Starts the thread; exits the process if it cannot (a worker without
/// its channel would run unsupervised).
pub(crate) fn start(fd: OwnedFd, ipc: Ipc) {
    let spawned = std::thread::Builder::new()
        .name("cluster-ipc".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cluster: cannot start the IPC runtime: {e}");
                    std::process::exit(70);
                }
            };
            rt.block_on(run(fd, ipc));
        });
    if let Err(e) = spawned {
        eprintln!("cluster: cannot start the IPC thread: {e}");
        std::process::exit(70);
    }
}

async fn run(fd: OwnedFd, mut ipc: Ipc) {
    let channel = match Channel::new(fd) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("cluster: cannot use the watcher's socket: {e}");
            std::process::exit(70);
        }
    };
    let shared = ipc.inbound.shared.clone();
    let reason = serve(&channel, &mut ipc, &shared).await;
    // The watcher is gone or broken: fail what waits, ask the program to
    // stop, and make sure this process does not outlive its grace period.
    ipc.inbound.fail_pending(&reason);
    shared.balanced.watcher_gone();
    tracing::warn!("cluster worker: {reason}; stopping");
    let _ = ipc.inbound.stop.send(true);
    let Ipc {
        mut rx,
        grace,
        inbound,
        ..
    } = ipc;
    drop(inbound.inbox);
    // Until the grace period ends, answer exit flushes at once (nothing can
    // be delivered any more).
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            out = rx.recv() => match out {
                Some(Outgoing::Flush(ack)) => { let _ = ack.send(()); }
                Some(_) => {}
                None => std::future::pending::<()>().await,
            },
        }
    }
    eprintln!("cluster worker: still running {grace:?} after the watcher left; exiting");
    std::process::exit(1);
}

/// Serves the channel until it fails; returns why.
async fn serve(channel: &Channel, ipc: &mut Ipc, shared: &Shared) -> String {
    let next_id = AtomicU64::new(1);
    let hello = ToWatcher::Hello {
        version: VERSION,
        pid: std::process::id(),
    };
    let mut buf = Vec::new();
    let mut batch = Vec::with_capacity(LOG_BATCH);
    // Handed-off connections are checked for closing this often (a few
    // fstat calls; cheap, and only when there are any).
    let mut close_check = tokio::time::interval(Duration::from_millis(20));
    close_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drop_check = tokio::time::interval(Duration::from_secs(1));
    drop_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let write_err = |e: SendError| format!("cannot write to the watcher: {e}");
    if let Err(e) = channel.send(&hello, &[]).await {
        return format!("cannot greet the watcher: {e}");
    }
    loop {
        tokio::select! {
            out = ipc.rx.recv() => {
                let Some(out) = out else { return "the worker API was dropped".to_string() };
                // Take what else is queued now too, so requests made at
                // once travel in one message.
                let mut next = Some(out);
                let mut taken = 0;
                while let Some(out) = next.take() {
                    if let Err(e) = outgoing(channel, ipc, shared, &next_id, &mut batch, out).await {
                        return write_err(e);
                    }
                    taken += 1;
                    if taken < DRAIN {
                        next = ipc.rx.try_recv().ok();
                    }
                }
                if let Err(e) = hub_link::flush(channel, &mut ipc.inbound.hub, shared).await {
                    return write_err(e);
                }
            }
            n = ipc.logs.recv_many(&mut batch, LOG_BATCH) => {
                if n == 0 {
                    continue;
                }
                if let Err(e) = send_logs(channel, shared, std::mem::take(&mut batch)).await {
                    return write_err(e);
                }
                if let Err(e) = report_drops(channel, shared).await {
                    return write_err(e);
                }
            }
            _ = close_check.tick(), if shared.balanced.active() => {
                for (listener, count) in shared.balanced.closed_counts() {
                    if let Err(e) = channel.send(&ToWatcher::ConnectionsClosed { listener, count }, &[]).await {
                        return write_err(e);
                    }
                }
            }
            _ = drop_check.tick() => {
                // Drops that happened after the last batch (the queue
                // filled up, then logging stopped) are reported too.
                if let Err(e) = report_drops(channel, shared).await {
                    return write_err(e);
                }
            }
            msg = channel.recv::<ToWorker>(&mut buf) => match msg {
                Ok((msg, fds)) => {
                    if let Err(why) = ipc.inbound.handle(channel, msg, fds).await {
                        return why;
                    }
                    if let Err(e) = hub_link::flush(channel, &mut ipc.inbound.hub, shared).await {
                        return write_err(e);
                    }
                }
                Err(RecvError::Closed) => return "the watcher is gone".to_string(),
                Err(e) => return format!("bad message from the watcher: {e}"),
            },
        }
    }
}

/// Most queued requests taken in one go (then the channel is read again).
const DRAIN: usize = 1024;

/// Handles one thing user code queued.
async fn outgoing(
    channel: &Channel,
    ipc: &mut Ipc,
    shared: &Shared,
    next_id: &AtomicU64,
    batch: &mut Vec<LogRecord>,
    out: Outgoing,
) -> Result<(), SendError> {
    let hub = &mut ipc.inbound.hub;
    let full = match out {
        Outgoing::Request(id, body) => hub.queue(id, body),
        Outgoing::Unwatch(watch) => hub.unwatch(watch, shared),
        Outgoing::CallResult(r) => hub.result(r),
        Outgoing::Message(m) => {
            if matches!(m, ToWatcher::Ready) {
                let me = ipc.inbound.shared.clone();
                ipc.inbound.hub.ready(&me);
            }
            return channel.send(&m, &[]).await;
        }
        Outgoing::Socket { addr, reply } => {
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            ipc.inbound.pending.insert(id, (addr.clone(), reply));
            return channel
                .send(&ToWatcher::SocketRequest { id, addr }, &[])
                .await;
        }
        Outgoing::Balanced(ToIpc::GiveBack(listener, Handed { fd, peer, conn })) => {
            return channel
                .send(
                    &ToWatcher::ConnectionReturned {
                        listener,
                        conn,
                        peer,
                    },
                    &[fd.as_fd()],
                )
                .await;
        }
        Outgoing::Balanced(ToIpc::AcksDue) => return send_acks(channel, shared).await,
        Outgoing::Flush(ack) => {
            let mut rest = std::mem::take(batch);
            while let Ok(r) = ipc.logs.try_recv() {
                rest.push(r);
            }
            let mut sent = if rest.is_empty() {
                Ok(())
            } else {
                send_logs(channel, shared, rest).await
            };
            if sent.is_ok() {
                sent = report_drops(channel, shared).await;
            }
            if sent.is_ok() {
                sent = hub_link::flush(channel, &mut ipc.inbound.hub, shared).await;
            }
            let _ = ack.send(());
            return sent;
        }
    };
    if full {
        hub_link::flush(channel, &mut ipc.inbound.hub, shared).await?;
    }
    Ok(())
}

/// Tells the watcher which handed-off connections the code accepted.
async fn send_acks(channel: &Channel, shared: &Shared) -> Result<(), SendError> {
    for (listener, conns) in shared.balanced.take_accepted() {
        // One datagram per batch; a batch this large never happens in
        // practice (it would be 8,000 accepts between two sends).
        for chunk in conns.chunks(4096) {
            let conns = chunk.to_vec();
            channel
                .send(&ToWatcher::ConnectionsAccepted { listener, conns }, &[])
                .await?;
        }
    }
    Ok(())
}

/// Tells the watcher how many records the queue dropped since the last report.
async fn report_drops(channel: &Channel, shared: &Shared) -> Result<(), SendError> {
    let dropped = shared.logs.dropped.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        channel.send(&ToWatcher::LogsDropped(dropped), &[]).await?;
    }
    Ok(())
}

/// Sends records in as few datagrams as fit; a single record too large
/// even alone is dropped and counted.
async fn send_logs(
    channel: &Channel,
    shared: &Shared,
    records: Vec<LogRecord>,
) -> Result<(), SendError> {
    let mut stack = vec![records];
    while let Some(mut records) = stack.pop() {
        let msg = ToWatcher::Logs(std::mem::take(&mut records));
        match encode(&msg) {
            Ok(bytes) => channel
                .send_bytes(&bytes, &[])
                .await
                .map_err(SendError::Io)?,
            Err(EncodeError::TooLarge { .. }) => {
                let ToWatcher::Logs(mut records) = msg else {
                    continue;
                };
                if records.len() == 1 {
                    shared.logs.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let second = records.split_off(records.len() / 2);
                // Pushed in reverse so the first half is sent first.
                stack.push(second);
                stack.push(records);
            }
            Err(e) => return Err(SendError::Encode(e)),
        }
    }
    Ok(())
}
