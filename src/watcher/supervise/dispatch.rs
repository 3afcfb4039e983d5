//! What the supervisor does with each message a worker sends: the greeting
//! and readiness, socket requests (through the listener registry), pongs,
//! log records, user messages and the balanced modes' connection reports.
//!
//! Nothing a worker sends can hurt the watcher: unexpected descriptors, a
//! wrong protocol version or a malformed report get that worker killed
//! and replaced, and are logged.

use std::os::fd::OwnedFd;

use tokio::time::Instant;

use super::listeners::Grant;
use super::Supervisor;
use crate::error::{Error, Kind};
use crate::ipc::message::{ToWatcher, ToWorker, VERSION};
use crate::jobs::dispatch::JobsEvent;
use crate::log::LogBatch;
use crate::socket::Address;
use crate::watcher::event::{Incoming, Outbound, MAX_QUEUED_FDS};

/// Socket requests one worker may make in its life; more is abuse.
pub(crate) const MAX_SOCKET_REQUESTS: u32 = 1024;
use crate::watcher::hub::Origin;
use crate::watcher::output::Source;

/// Longest status a worker may set.
pub(crate) const MAX_STATUS: usize = 64;

/// A status as a worker may set it: at most [`MAX_STATUS`] bytes of text
/// without control characters.
fn checked_status(text: String) -> Option<String> {
    let ok = !text.is_empty() && text.len() <= MAX_STATUS && !text.chars().any(char::is_control);
    ok.then_some(text)
}

impl Supervisor {
    /// A worker's forwarded records, checked by its reader task.
    pub(super) fn on_logs(&mut self, context_id: u64, batch: LogBatch) {
        let Some(w) = self.pool.workers.get(&context_id) else {
            return;
        };
        let source = Source::Worker {
            slot: w.slot,
            pid: w.pid,
        };
        self.ctx.config.output.emit_batch(source, batch);
    }

    pub(super) fn on_message(&mut self, context_id: u64, msg: ToWatcher, mut fds: Vec<OwnedFd>) {
        let Some(w) = self.pool.workers.get_mut(&context_id) else {
            return;
        };
        if let ToWatcher::ConnectionReturned {
            listener,
            conn,
            peer,
        } = &msg
        {
            if fds.len() == 1 {
                let fd = fds.pop().expect("one descriptor");
                self.pool
                    .listeners
                    .returned(*listener, context_id, *conn, fd, peer);
                return;
            }
            // Malformed: handled below.
        }
        if !fds.is_empty() {
            tracing::error!(
                "worker {} (pid {}) sent {} unexpected descriptor(s); replacing it",
                w.slot,
                w.pid,
                fds.len()
            );
            w.kill(&self.ctx, "protocol error");
            return;
        }
        let source = Source::Worker {
            slot: w.slot,
            pid: w.pid,
        };
        match msg {
            ToWatcher::Hello { version, pid } => {
                if version != VERSION {
                    tracing::error!(
                        "worker {} (pid {pid}) speaks protocol {version}, the watcher {VERSION}; replacing it",
                        w.slot
                    );
                    w.kill(&self.ctx, "protocol version mismatch");
                    return;
                }
                w.hello = true;
                w.send(ToWorker::Hello {
                    version: VERSION,
                    context_id,
                    slot: w.slot,
                });
            }
            ToWatcher::Ready => {
                w.hello = true;
                self.on_ready(context_id);
            }
            ToWatcher::SocketRequest { id, addr } => self.on_socket_request(context_id, id, addr),
            ToWatcher::Pong { .. } => w.last_pong = Instant::now(),
            ToWatcher::Recycle { requests } => {
                let why = format!("served {requests} requests (--max-requests)");
                self.recycle(context_id, &why);
            }
            ToWatcher::Logs(records) => {
                for record in records {
                    self.ctx.config.output.emit(source, record);
                }
            }
            ToWatcher::LogsDropped(n) => {
                self.counters.worker_log_drops += n;
                self.ctx.config.output.note(
                    source,
                    2,
                    "",
                    format!("{n} log record(s) dropped by the worker: its log queue was full"),
                );
            }
            ToWatcher::ConnectionReturned { .. } => {
                tracing::error!(
                    "worker {} (pid {}) returned a connection without exactly one descriptor; replacing it",
                    w.slot,
                    w.pid
                );
                w.kill(&self.ctx, "protocol error");
            }
            ToWatcher::ConnectionsClosed { listener, count } => {
                self.pool.listeners.closed(listener, context_id, count);
            }
            ToWatcher::ConnectionsAccepted { listener, conns } => {
                self.pool.listeners.accepted(listener, context_id, &conns);
            }
            ToWatcher::JobsReady {
                handlers,
                concurrency,
            } => {
                w.jobs = Some((handlers.clone(), concurrency));
                let joined = JobsEvent::WorkerJoined {
                    context_id,
                    slot: w.slot,
                    pid: w.pid,
                    outbound: w.outbound.clone(),
                    accepting: w.accepting.clone(),
                    handlers,
                    concurrency,
                };
                if self.services.jobs.is_none() && self.ctx.config.jobs.is_none() {
                    tracing::warn!(
                        "worker {} (pid {}) serves jobs, but the watcher runs none (no --jobs)",
                        w.slot,
                        w.pid
                    );
                }
                self.services.jobs(joined);
            }
            ToWatcher::JobDone { ticket, result } => {
                self.services.jobs(JobsEvent::JobDone {
                    context_id,
                    ticket,
                    result,
                });
            }
            ToWatcher::JobDonePart { ticket, part } => {
                self.services.jobs(JobsEvent::JobDonePart {
                    context_id,
                    ticket,
                    part,
                });
            }
            ToWatcher::Data(bytes) => {
                self.counters.messages_in += 1;
                w.messages_in += 1;
                let incoming = Incoming {
                    slot: w.slot,
                    context_id,
                    pid: w.pid,
                    bytes,
                };
                if self.channels.messages.try_send(incoming).is_err() {
                    self.counters.message_dropped();
                }
            }
            ToWatcher::SetStatus(text) => match checked_status(text) {
                Some(text) => w.status = Some(text),
                None => tracing::warn!(
                    "worker {} (pid {}) set a status that is not a short line of text; ignored",
                    w.slot,
                    w.pid
                ),
            },
            msg @ (ToWatcher::Requests(_) | ToWatcher::CallResults(_)) => {
                // The reader hands these to the hub itself; this is the
                // path for launchers whose readers do not.
                let origin = Origin {
                    context_id,
                    outbound: &w.outbound,
                };
                let _ = self.ctx.hub.handle(origin, msg);
            }
        }
    }

    fn on_socket_request(&mut self, context_id: u64, id: u64, addr: String) {
        let Some(w) = self.pool.workers.get_mut(&context_id) else {
            return;
        };
        w.socket_requests += 1;
        if w.socket_requests > MAX_SOCKET_REQUESTS {
            tracing::error!(
                "worker {} (pid {}) asked for more than {MAX_SOCKET_REQUESTS} sockets; replacing it",
                w.slot,
                w.pid
            );
            w.kill(&self.ctx, "too many socket requests");
            return;
        }
        let slot = w.slot;
        let backed_up = w.outbound.queued_fds() >= MAX_QUEUED_FDS / 4;
        let granted = if backed_up {
            // It does not read its replies: hold no more descriptors for it.
            Err(Error::new(
                Kind::Io,
                format!("cannot listen on {addr}: too many socket replies wait to be read"),
            ))
        } else {
            Address::parse(&addr).and_then(|a| self.pool.listeners.grant(&a, slot, context_id))
        };
        let Some(w) = self.pool.workers.get(&context_id) else {
            return;
        };
        let balanced = self.ctx.config.balance.hands_off();
        match granted {
            Ok(Grant::Fd(fd)) => {
                let _ = w.outbound.send(Outbound {
                    msg: ToWorker::SocketReply { id, result: Ok(()) },
                    fds: vec![fd],
                    weight: 0,
                });
            }
            Ok(Grant::Balanced(grant)) => {
                let listener = grant.listener;
                w.send(ToWorker::BalancedReply {
                    id,
                    result: Ok(grant),
                });
                // Joins the pool only after the reply is queued, so no
                // connection can overtake it.
                self.pool.listeners.join(
                    listener,
                    context_id,
                    w.outbound.clone(),
                    w.accepting.clone(),
                );
            }
            Err(e) => {
                let message = e.to_string();
                w.send(if balanced {
                    ToWorker::BalancedReply {
                        id,
                        result: Err(message.clone()),
                    }
                } else {
                    ToWorker::SocketReply {
                        id,
                        result: Err(message.clone()),
                    }
                });
                if !self.ever_ready && (e.is_bind() || e.is_invalid_address()) {
                    self.fail(e);
                } else {
                    tracing::error!("worker {} asked for {addr:?}: {message}", w.slot);
                }
            }
        }
    }
}
