//! Balancing modes: how connections on a listening address reach workers.
//!
//! * `shared` (default): one listener, one accept queue, a dup for every
//!   worker; the kernel wakes whichever worker is waiting.
//! * `reuseport`: one `SO_REUSEPORT` listener per slot, owned by the watcher
//!   and handed to that slot's worker and to its replacements, so the kernel
//!   spreads connections evenly by flow hash and a restarting slot's queue
//!   survives.
//! * `round-robin`, `least-connections`, `ip-hash` (the balanced modes): the
//!   watcher accepts and hands each connection to a worker over its
//!   socketpair; the worker's `listen` returns a `BalancedListener`. Workers report
//!   closed connections, so the watcher knows each one's load; `ip-hash`
//!   keeps a client address on the same worker while that worker lives.
//!
//! In every mode the worker's code is the same: `listen(addr)`, `accept`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use super::event::{Outbound, OutboundSender};
use crate::ipc::message::ToWorker;
use crate::listener::Listener;
use crate::socket::{Address, PeerAddr};

/// How the watcher spreads connections over workers (`--balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Balance {
    /// One listener and accept queue shared by every worker.
    #[default]
    Shared,
    /// One `SO_REUSEPORT` listener per slot (TCP; Unix addresses are shared).
    Reuseport,
    /// The watcher accepts and hands connections to workers in turn.
    RoundRobin,
    /// The watcher hands each connection to the worker with the fewest open.
    LeastConnections,
    /// The watcher hands a client address's connections to the same worker.
    IpHash,
}

impl Balance {
    /// Whether the watcher accepts and hands off connections in this mode.
    pub(crate) fn hands_off(self) -> bool {
        matches!(
            self,
            Balance::RoundRobin | Balance::LeastConnections | Balance::IpHash
        )
    }
}

impl std::str::FromStr for Balance {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "shared" => Balance::Shared,
            "reuseport" => Balance::Reuseport,
            "round-robin" => Balance::RoundRobin,
            "least-connections" => Balance::LeastConnections,
            "ip-hash" => Balance::IpHash,
            _ => {
                return Err(format!(
                    "'{s}' is not a balancing mode (shared, reuseport, round-robin, least-connections, ip-hash)"
                ))
            }
        })
    }
}

/// A worker that takes handed-off connections on one listener.
struct Consumer {
    context_id: u64,
    outbound: OutboundSender,
    /// Cleared when the worker stops or dies.
    accepting: Arc<AtomicBool>,
    open: u64,
}

struct Pool {
    mode: Balance,
    consumers: Vec<Consumer>,
    next: usize,
    sticky: HashMap<IpAddr, u64>,
    next_conn: u64,
}

/// Upper bound on remembered client addresses for `ip-hash`.
const STICKY_MAX: usize = 100_000;

impl Pool {
    fn prune(&mut self) {
        self.consumers
            .retain(|c| c.accepting.load(Ordering::Relaxed) && !c.outbound.is_closed());
    }

    /// Picks a worker for a connection from `peer`.
    fn choose(&mut self, peer: Option<IpAddr>) -> Option<usize> {
        self.prune();
        let n = self.consumers.len();
        if n == 0 {
            return None;
        }
        let index = match self.mode {
            Balance::LeastConnections => {
                // Fewest open; ties go round-robin from `next`.
                let start = self.next % n;
                let best = (0..n)
                    .map(|k| (start + k) % n)
                    .min_by_key(|&i| self.consumers[i].open)
                    .unwrap_or(0);
                self.next = best + 1;
                best
            }
            Balance::IpHash => match peer {
                Some(ip) => {
                    let known = self
                        .sticky
                        .get(&ip)
                        .and_then(|id| self.consumers.iter().position(|c| c.context_id == *id));
                    match known {
                        Some(i) => i,
                        None => {
                            let i = (hash_ip(ip) % n as u64) as usize;
                            if self.sticky.len() >= STICKY_MAX {
                                self.sticky.clear();
                            }
                            self.sticky.insert(ip, self.consumers[i].context_id);
                            i
                        }
                    }
                }
                None => {
                    self.next = (self.next + 1) % n;
                    self.next
                }
            },
            _ => {
                let i = self.next % n;
                self.next = i + 1;
                i
            }
        };
        Some(index)
    }
}

fn hash_ip(ip: IpAddr) -> u64 {
    let bytes: Vec<u8> = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    // FNV-1a, then a final mix so nearby addresses spread.
    let mut h = bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51afd7ed558ccd);
    h ^ (h >> 33)
}

/// One handed-off address: the watcher's accept loop and its worker pool.
pub(crate) struct Balancer {
    pub id: u64,
    pub local: String,
    pool: Arc<Mutex<Pool>>,
    wake: Arc<Notify>,
    requeue: mpsc::UnboundedSender<Accepted>,
    task: JoinHandle<()>,
}

/// An accepted connection waiting for a worker.
type Accepted = (OwnedFd, Option<IpAddr>, String);

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Balancer {
    /// Starts accepting on `fd` (a bound listener for `address`). Must be
    /// called within a tokio runtime.
    pub(crate) fn start(
        id: u64,
        mode: Balance,
        address: &Address,
        fd: OwnedFd,
    ) -> std::io::Result<Balancer> {
        let listener = Listener::from_fd(address, fd)?;
        let local = match (&listener, address) {
            (Listener::Tcp(l), _) => l.local_addr()?.to_string(),
            (_, a) => a.to_string(),
        };
        let pool = Arc::new(Mutex::new(Pool {
            mode,
            consumers: Vec::new(),
            next: 0,
            sticky: HashMap::new(),
            next_conn: 1,
        }));
        let wake = Arc::new(Notify::new());
        let (requeue, requeued) = mpsc::unbounded_channel();
        let task = tokio::spawn(accept_loop(
            id,
            listener,
            pool.clone(),
            wake.clone(),
            requeued,
        ));
        Ok(Balancer {
            id,
            local,
            pool,
            wake,
            requeue,
            task,
        })
    }

    /// Adds a worker that asked for this address.
    pub(crate) fn add(
        &self,
        context_id: u64,
        outbound: OutboundSender,
        accepting: Arc<AtomicBool>,
    ) {
        if let Ok(mut pool) = self.pool.lock() {
            pool.consumers.retain(|c| c.context_id != context_id);
            pool.consumers.push(Consumer {
                context_id,
                outbound,
                accepting,
                open: 0,
            });
        }
        self.wake.notify_waiters();
        self.wake.notify_one();
    }

    /// A worker reported `count` handed-off connections closed.
    pub(crate) fn closed(&self, context_id: u64, count: u32) {
        if let Ok(mut pool) = self.pool.lock() {
            if let Some(c) = pool
                .consumers
                .iter_mut()
                .find(|c| c.context_id == context_id)
            {
                c.open = c.open.saturating_sub(count as u64);
            }
        }
    }

    /// A worker gave back a connection it will not serve (its listener is
    /// gone): it takes no more, and the connection goes to another worker.
    pub(crate) fn returned(&self, context_id: u64, fd: OwnedFd, peer: &str) {
        if let Ok(mut pool) = self.pool.lock() {
            pool.consumers.retain(|c| c.context_id != context_id);
        }
        let ip = peer.parse::<std::net::SocketAddr>().ok().map(|a| a.ip());
        let _ = self.requeue.send((fd, ip, peer.to_string()));
    }

    /// Open connections per worker context id (for tests and status).
    #[allow(dead_code)]
    pub(crate) fn load(&self) -> Vec<(u64, u64)> {
        self.pool
            .lock()
            .map(|p| p.consumers.iter().map(|c| (c.context_id, c.open)).collect())
            .unwrap_or_default()
    }
}

async fn accept_loop(
    id: u64,
    listener: Listener,
    pool: Arc<Mutex<Pool>>,
    wake: Arc<Notify>,
    mut requeued: mpsc::UnboundedReceiver<Accepted>,
) {
    loop {
        // Accept only while some worker can take the connection: otherwise
        // it waits in the kernel's queue, not in ours.
        loop {
            let ready = pool
                .lock()
                .map(|mut p| {
                    p.prune();
                    !p.consumers.is_empty()
                })
                .unwrap_or(false);
            if ready {
                break;
            }
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(100), wake.notified()).await;
        }
        // Connections given back by a worker go first.
        let (fd, peer_ip, peer_text): Accepted = tokio::select! {
            biased;
            Some(back) = requeued.recv() => back,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let (ip, text) = match peer {
                        PeerAddr::Tcp(a) => (Some(a.ip()), a.to_string()),
                        _ => (None, String::new()),
                    };
                    match stream.into_fd() {
                        Ok(fd) => (fd, ip, text),
                        Err(_) => continue,
                    }
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let mut outbound = Outbound {
            msg: ToWorker::Data(Vec::new()),
            fds: vec![fd],
        };
        // Hand it to a worker; if that worker's channel is gone, try another.
        loop {
            let choice = pool.lock().ok().and_then(|mut p| {
                let i = p.choose(peer_ip)?;
                let conn = p.next_conn;
                p.next_conn += 1;
                p.consumers[i].open += 1;
                Some((
                    p.consumers[i].outbound.clone(),
                    p.consumers[i].context_id,
                    conn,
                ))
            });
            let Some((tx, context_id, conn)) = choice else {
                // No worker at all: keep the connection until one asks.
                let _ =
                    tokio::time::timeout(std::time::Duration::from_millis(100), wake.notified())
                        .await;
                continue;
            };
            outbound.msg = ToWorker::Connection {
                listener: id,
                conn,
                peer: peer_text.clone(),
            };
            match tx.send(outbound) {
                Ok(()) => break,
                Err(mpsc::error::SendError(back)) => {
                    outbound = back;
                    if let Ok(mut p) = pool.lock() {
                        p.consumers.retain(|c| c.context_id != context_id);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(mode: Balance, n: u64) -> Pool {
        let consumers = (1..=n)
            .map(|id| Consumer {
                context_id: id,
                outbound: mpsc::unbounded_channel().0,
                accepting: Arc::new(AtomicBool::new(true)),
                open: 0,
            })
            .collect();
        Pool {
            mode,
            consumers,
            next: 0,
            sticky: HashMap::new(),
            next_conn: 1,
        }
    }

    #[test]
    fn modes_parse() {
        assert_eq!(
            "least-connections".parse::<Balance>(),
            Ok(Balance::LeastConnections)
        );
        assert!("fastest".parse::<Balance>().is_err());
    }

    #[test]
    fn least_connections_picks_the_idlest() {
        // Senders whose receivers are dropped count as closed; keep them.
        let mut rxs = Vec::new();
        let mut p = pool(Balance::LeastConnections, 3);
        for c in &mut p.consumers {
            let (tx, rx) = mpsc::unbounded_channel();
            c.outbound = tx;
            rxs.push(rx);
        }
        p.consumers[0].open = 5;
        p.consumers[1].open = 1;
        p.consumers[2].open = 3;
        assert_eq!(p.choose(None), Some(1));
    }

    #[test]
    fn ip_hash_is_sticky() {
        let mut rxs = Vec::new();
        let mut p = pool(Balance::IpHash, 4);
        for c in &mut p.consumers {
            let (tx, rx) = mpsc::unbounded_channel();
            c.outbound = tx;
            rxs.push(rx);
        }
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let first = p.choose(Some(ip));
        for _ in 0..20 {
            assert_eq!(p.choose(Some(ip)), first);
        }
        let spread: std::collections::HashSet<_> = (0..64u8)
            .map(|i| p.choose(Some(IpAddr::from([10, 0, 0, i]))))
            .collect();
        assert!(spread.len() > 1, "different clients spread");
    }
}
