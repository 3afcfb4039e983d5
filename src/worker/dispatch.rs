//! What the worker's IPC thread does with each message from the watcher:
//! socket replies to the waiting `listen` calls, handed-off connections to
//! their balanced listener, stop and heartbeat to the API, user messages to
//! the inbox.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use super::hub_link::HubState;
use super::shared::{Granted, Shared, ToJobs};
use crate::error::{Error, Kind, Result};
use crate::ipc::message::{JobFailure, ToWatcher, ToWorker, VERSION};
use crate::ipc::parts::{Assembly, Joined};
use crate::ipc::Channel;
use crate::listener::Handed;
use crate::socket::Address;

/// The IPC thread's side of the messages from the watcher.
pub(crate) struct Inbound {
    pub shared: Arc<Shared>,
    pub stop: watch::Sender<bool>,
    pub inbox: mpsc::UnboundedSender<Vec<u8>>,
    /// `listen` calls waiting for their reply, by request id, with the
    /// address they asked for.
    pub pending: HashMap<u64, (String, oneshot::Sender<Result<Granted>>)>,
    /// Arguments of jobs that arrive in parts.
    pub parts: Assembly,
    /// Storage requests, watches and commands.
    pub hub: HubState,
}

/// The largest job arguments a worker assembles from parts.
pub(crate) const MAX_ARGS: usize = 256 * 1024 * 1024;

/// Why the channel must close: the watcher broke the protocol, or a write failed.
pub(crate) type Broken = String;

impl Inbound {
    /// Handles one message. Descriptors that no message asked for are
    /// closed as `fds` drops.
    pub(crate) async fn handle(
        &mut self,
        channel: &Channel,
        msg: ToWorker,
        mut fds: Vec<OwnedFd>,
    ) -> std::result::Result<(), Broken> {
        let write_err = |e| format!("cannot write to the watcher: {e}");
        match msg {
            ToWorker::Hello { version, .. } if version != VERSION => {
                return Err(format!(
                    "the watcher speaks protocol version {version}, this worker {VERSION}"
                ));
            }
            ToWorker::Hello { .. } => {}
            ToWorker::SocketReply { id, result } => {
                let Some((_, reply)) = self.pending.remove(&id) else {
                    return Err(format!("a reply to unknown request {id}"));
                };
                let answer = match result {
                    Ok(()) if fds.len() == 1 => Ok(Granted::Fd(fds.remove(0))),
                    Ok(()) => return Err(format!("a socket reply with {} descriptors", fds.len())),
                    Err(why) => Err(Error::new(Kind::Bind, why)),
                };
                let _ = reply.send(answer);
            }
            ToWorker::BalancedReply { id, result } => {
                let Some((addr, reply)) = self.pending.remove(&id) else {
                    return Err(format!("a reply to unknown request {id}"));
                };
                let granted = match (result, Address::parse(&addr)) {
                    // Registered now: the watcher may send a connection
                    // right after this reply, before `listen` returns.
                    (Ok(grant), Ok(address)) => {
                        let listener = self.shared.balanced.register(
                            grant.listener,
                            &address,
                            grant.local.clone(),
                        );
                        Ok(Granted::Balanced(listener))
                    }
                    (Ok(_), Err(e)) => Err(e),
                    (Err(why), _) => Err(Error::new(Kind::Bind, why)),
                };
                let _ = reply.send(granted);
            }
            ToWorker::Connection {
                listener,
                conn,
                peer,
            } => {
                let Some(fd) = fds.pop().filter(|_| fds.is_empty()) else {
                    return Err("a handed-off connection without exactly one descriptor".into());
                };
                let handed = Handed { fd, peer, conn };
                if let Some(Handed { fd, peer, conn }) =
                    self.shared.balanced.deliver(listener, handed)
                {
                    // Nobody accepts on that listener any more: give it
                    // back, the watcher hands it to another worker.
                    channel
                        .send(
                            &ToWatcher::ConnectionReturned {
                                listener,
                                conn,
                                peer,
                            },
                            &[fd.as_fd()],
                        )
                        .await
                        .map_err(write_err)?;
                }
            }
            ToWorker::Stop { .. } => {
                if let Ok(mut status) = self.shared.status.lock() {
                    *status = Some("stopping".into());
                }
                let _ = self.stop.send(true);
            }
            ToWorker::Replies(replies) => self.hub.on_replies(replies, &self.shared),
            ToWorker::Calls(calls) => self.hub.on_calls(calls, &self.shared),
            ToWorker::Changes(changes) => self.hub.on_changes(changes, &self.shared),
            ToWorker::WatchEnded { watch, reason } => self.hub.on_watch_ended(watch, reason),
            ToWorker::Ping { seq } if self.shared.pings.awaiters.load(Ordering::SeqCst) > 0 => {
                self.shared.pings.latest.send_replace(seq);
            }
            ToWorker::Ping { seq } => {
                channel
                    .send(&ToWatcher::Pong { seq }, &[])
                    .await
                    .map_err(write_err)?;
            }
            ToWorker::Data(bytes) => {
                let _ = self.inbox.send(bytes);
            }
            ToWorker::JobPart { ticket, part } => self.parts.push(ticket, &part),
            ToWorker::Job(mut order) => {
                let ticket = order.ticket;
                if self.parts.has(ticket) {
                    let last = std::mem::take(&mut order.args);
                    match self.parts.finish(ticket, last) {
                        Joined::Text(args) => order.args = args,
                        Joined::TooLarge(n) => {
                            let result = Err(JobFailure::BadArgs(format!(
                                "the arguments are {n} bytes; a worker takes at most {MAX_ARGS}"
                            )));
                            channel
                                .send(&ToWatcher::JobDone { ticket, result }, &[])
                                .await
                                .map_err(write_err)?;
                            return Ok(());
                        }
                    }
                }
                let undelivered = match self.shared.jobs.lock() {
                    Ok(jobs) => match jobs.as_ref() {
                        Some(tx) => tx.send(ToJobs::Run(*order)).is_err(),
                        None => true,
                    },
                    Err(_) => true,
                };
                if undelivered {
                    let result = Err(JobFailure::NoHandler(
                        "this worker serves no jobs (Cluster::jobs().run() is not running)".into(),
                    ));
                    channel
                        .send(&ToWatcher::JobDone { ticket, result }, &[])
                        .await
                        .map_err(write_err)?;
                }
            }
            ToWorker::CancelJob { ticket } => {
                if let Ok(jobs) = self.shared.jobs.lock() {
                    if let Some(tx) = jobs.as_ref() {
                        let _ = tx.send(ToJobs::Cancel(ticket));
                    }
                }
            }
        }
        Ok(())
    }

    /// The watcher is gone or broken: fails every waiting `listen`,
    /// request and command, and ends every watch.
    pub(crate) fn fail_pending(&mut self, reason: &str) {
        let shared = self.shared.clone();
        self.hub.fail_all(reason, &shared);
        for (_, (_, reply)) in self.pending.drain() {
            let _ = reply.send(Err(Error::new(
                Kind::Ipc,
                format!("no answer from the watcher: {reason}"),
            )));
        }
    }
}
