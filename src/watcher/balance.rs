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

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::event::{Outbound, OutboundSender, MAX_QUEUED_FDS};
use crate::ipc::message::ToWorker;
use crate::listener::Listener;
use crate::socket::{Address, PeerAddr};

/// How the watcher spreads connections over workers (`--balance`).
///
/// ```no_run
/// # fn build() -> Result<(), cluster::Error> {
/// let watcher = cluster::ClusterWatcher::builder(std::process::Command::new("./srv"))
///     .balance(cluster::Balance::LeastConnections)
///     .build()?;
/// # drop(watcher); Ok(()) }
/// ```
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

/// Connections a worker may hold unacknowledged (handed over, not yet
/// accepted by its code) before it counts as busy.
pub(crate) const MAX_UNACKED: usize = 1024;

/// A connection the watcher accepted: the socket, the client's address.
struct Accepted {
    fd: OwnedFd,
    ip: Option<IpAddr>,
    peer: String,
}

/// A worker that takes handed-off connections on one listener.
struct Consumer {
    context_id: u64,
    outbound: OutboundSender,
    /// Cleared when the worker stops or dies: it is handed nothing more.
    accepting: Arc<AtomicBool>,
    /// Its writer is gone (it died): handed nothing more; what it held is
    /// handed out again once its exit is known.
    dead: bool,
    open: u64,
    /// Connections handed to it that its code has not accepted yet, by
    /// connection id: the watcher's own duplicate, so that a connection
    /// the worker never read goes to another worker if this one dies.
    unacked: HashMap<u64, Accepted>,
}

impl Consumer {
    fn available(&self) -> bool {
        !self.dead
            && self.accepting.load(Ordering::Relaxed)
            && self.unacked.len() < MAX_UNACKED
            && self.outbound.queued_fds() < MAX_QUEUED_FDS
    }
}

struct Pool {
    mode: Balance,
    consumers: Vec<Consumer>,
    next: usize,
    sticky: HashMap<IpAddr, u64>,
    next_conn: u64,
    /// Connections waiting for a worker: given back, or held by a worker
    /// that died before it accepted them. They go before new ones.
    pending: VecDeque<Accepted>,
}

/// Upper bound on remembered client addresses for `ip-hash`.
const STICKY_MAX: usize = 100_000;

impl Pool {
    fn new(mode: Balance) -> Pool {
        Pool {
            mode,
            consumers: Vec::new(),
            next: 0,
            sticky: HashMap::new(),
            next_conn: 1,
            pending: VecDeque::new(),
        }
    }

    fn any_available(&self) -> bool {
        self.consumers.iter().any(Consumer::available)
    }

    /// Removes a worker; what it held unaccepted waits for another.
    fn remove(&mut self, context_id: u64) {
        let Some(i) = self
            .consumers
            .iter()
            .position(|c| c.context_id == context_id)
        else {
            return;
        };
        let gone = self.consumers.remove(i);
        let mut held: Vec<(u64, Accepted)> = gone.unacked.into_iter().collect();
        held.sort_by_key(|(conn, _)| std::cmp::Reverse(*conn));
        for (_, a) in held {
            self.pending.push_front(a);
        }
    }

    /// Picks an available worker for a connection from `peer`.
    fn choose(&mut self, peer: Option<IpAddr>) -> Option<usize> {
        let avail: Vec<usize> = (0..self.consumers.len())
            .filter(|&i| self.consumers[i].available())
            .collect();
        let n = avail.len();
        if n == 0 {
            return None;
        }
        let pick = match self.mode {
            Balance::LeastConnections => {
                // Fewest open; ties go round-robin from `next`.
                let start = self.next % n;
                let best = (0..n)
                    .map(|k| (start + k) % n)
                    .min_by_key(|&k| self.consumers[avail[k]].open)
                    .unwrap_or(0);
                self.next = best + 1;
                best
            }
            Balance::IpHash => match peer {
                Some(ip) => {
                    let known = self.sticky.get(&ip).and_then(|id| {
                        avail
                            .iter()
                            .position(|&i| self.consumers[i].context_id == *id)
                    });
                    match known {
                        Some(k) => k,
                        None => {
                            let k = (hash_ip(ip) % n as u64) as usize;
                            if self.sticky.len() >= STICKY_MAX {
                                self.sticky.clear();
                            }
                            self.sticky.insert(ip, self.consumers[avail[k]].context_id);
                            k
                        }
                    }
                }
                None => {
                    self.next = (self.next + 1) % n;
                    self.next
                }
            },
            _ => {
                let k = self.next % n;
                self.next = k + 1;
                k
            }
        };
        Some(avail[pick])
    }

    /// Hands `a` to a worker. Gives it back when no worker can take it.
    fn dispatch(&mut self, listener: u64, mut a: Accepted) -> Result<(), Accepted> {
        loop {
            let Some(i) = self.choose(a.ip) else {
                return Err(a);
            };
            let conn = self.next_conn;
            self.next_conn += 1;
            // Our own copy until the worker says its code accepted it.
            let keep = a.fd.try_clone().ok();
            let c = &mut self.consumers[i];
            let out = Outbound {
                msg: ToWorker::Connection {
                    listener,
                    conn,
                    peer: a.peer.clone(),
                },
                fds: vec![a.fd],
                weight: 0,
            };
            match c.outbound.send(out) {
                Ok(()) => {
                    c.open += 1;
                    if let Some(fd) = keep {
                        c.unacked.insert(
                            conn,
                            Accepted {
                                fd,
                                ip: a.ip,
                                peer: a.peer,
                            },
                        );
                    }
                    return Ok(());
                }
                Err(back) => {
                    // Its writer is gone: try another worker.
                    c.dead = true;
                    let Some(fd) = back.fds.into_iter().next() else {
                        return Ok(());
                    };
                    a.fd = fd;
                }
            }
        }
    }

    fn consumer(&mut self, context_id: u64) -> Option<&mut Consumer> {
        self.consumers
            .iter_mut()
            .find(|c| c.context_id == context_id)
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

/// One balanced address: the watcher's accept loop and its worker pool.
pub(crate) struct Balancer {
    pub id: u64,
    pub local: String,
    pool: Arc<Mutex<Pool>>,
    wake: Arc<Notify>,
    task: JoinHandle<()>,
}

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
        let pool = Arc::new(Mutex::new(Pool::new(mode)));
        let wake = Arc::new(Notify::new());
        let task = tokio::spawn(accept_loop(id, listener, pool.clone(), wake.clone()));
        Ok(Balancer {
            id,
            local,
            pool,
            wake,
            task,
        })
    }

    /// Runs `f` on the pool; wakes the accept loop when `f` says something
    /// changed that it waits for (a worker joined or became free, a
    /// connection waits).
    fn with_pool(&self, f: impl FnOnce(&mut Pool) -> bool) {
        let wake = self.pool.lock().map(|mut p| f(&mut p)).unwrap_or(false);
        if wake {
            self.wake.notify_one();
        }
    }

    /// Adds a worker that asked for this address.
    pub(crate) fn add(
        &self,
        context_id: u64,
        outbound: OutboundSender,
        accepting: Arc<AtomicBool>,
    ) {
        self.with_pool(|pool| {
            pool.remove(context_id);
            pool.consumers.push(Consumer {
                context_id,
                outbound,
                accepting,
                dead: false,
                open: 0,
                unacked: HashMap::new(),
            });
            true
        });
    }

    /// A worker's code accepted these connections: the watcher's copies close.
    pub(crate) fn accepted(&self, context_id: u64, conns: &[u64]) {
        self.with_pool(|pool| {
            let Some(c) = pool.consumer(context_id) else {
                return false;
            };
            let was_busy = !c.available();
            for conn in conns {
                c.unacked.remove(conn);
            }
            was_busy && c.available()
        });
    }

    /// A worker reported `count` handed-off connections closed.
    pub(crate) fn closed(&self, context_id: u64, count: u32) {
        self.with_pool(|pool| {
            if let Some(c) = pool.consumer(context_id) {
                c.open = c.open.saturating_sub(count as u64);
            }
            false
        });
    }

    /// A worker gave back connection `conn`, which it will not serve (its
    /// listener is gone): it takes no more, and the connection goes to
    /// another worker.
    pub(crate) fn returned(&self, context_id: u64, conn: u64, fd: OwnedFd, peer: &str) {
        let ip = peer.parse::<std::net::SocketAddr>().ok().map(|a| a.ip());
        self.with_pool(|pool| {
            if let Some(c) = pool.consumer(context_id) {
                c.accepting.store(false, Ordering::Relaxed);
                c.unacked.remove(&conn);
                c.open = c.open.saturating_sub(1);
            }
            pool.pending.push_back(Accepted {
                fd,
                ip,
                peer: peer.to_string(),
            });
            true
        });
    }

    /// A worker exited (or its channel closed, after every message it sent
    /// was handled): it leaves the pool at once, and the connections it was
    /// handed but never accepted go to other workers.
    pub(crate) fn gone(&self, context_id: u64) {
        self.with_pool(|pool| {
            pool.remove(context_id);
            !pool.pending.is_empty()
        });
    }
}

async fn accept_loop(id: u64, listener: Listener, pool: Arc<Mutex<Pool>>, wake: Arc<Notify>) {
    loop {
        // Accept only while some worker can take the connection: otherwise
        // it waits in the kernel's queue, not in ours. Connections that wait
        // for a worker go first.
        let waiting = {
            let Ok(mut p) = pool.lock() else { return };
            if !p.any_available() {
                None
            } else {
                let mut next = p.pending.pop_front();
                while let Some(a) = next.take() {
                    if let Err(a) = p.dispatch(id, a) {
                        p.pending.push_front(a);
                        break;
                    }
                    next = p.pending.pop_front();
                }
                Some(p.pending.is_empty() && p.any_available())
            }
        };
        if waiting != Some(true) {
            let _ = tokio::time::timeout(Duration::from_millis(100), wake.notified()).await;
            continue;
        }
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // A worker joined or left, or a connection came back.
            _ = wake.notified() => continue,
        };
        let a = match accepted {
            Ok((stream, peer)) => {
                let (ip, text) = match peer {
                    PeerAddr::Tcp(a) => (Some(a.ip()), a.to_string()),
                    _ => (None, String::new()),
                };
                match stream.into_fd() {
                    Ok(fd) => Accepted { fd, ip, peer: text },
                    Err(_) => continue,
                }
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Ok(mut p) = pool.lock() {
            if let Err(a) = p.dispatch(id, a) {
                p.pending.push_back(a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watcher::event::{outbound, OutboundReceiver};

    fn pool(mode: Balance, n: u64) -> (Pool, Vec<OutboundReceiver>) {
        let mut p = Pool::new(mode);
        let mut rxs = Vec::new();
        for id in 1..=n {
            let (tx, rx) = outbound();
            rxs.push(rx);
            p.consumers.push(Consumer {
                context_id: id,
                outbound: tx,
                accepting: Arc::new(AtomicBool::new(true)),
                dead: false,
                open: 0,
                unacked: HashMap::new(),
            });
        }
        (p, rxs)
    }

    fn conn() -> (Accepted, std::os::unix::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        (
            Accepted {
                fd: a.into(),
                ip: None,
                peer: String::new(),
            },
            b,
        )
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
        let (mut p, _rxs) = pool(Balance::LeastConnections, 3);
        p.consumers[0].open = 5;
        p.consumers[1].open = 1;
        p.consumers[2].open = 3;
        assert_eq!(p.choose(None), Some(1));
    }

    #[test]
    fn ip_hash_is_sticky() {
        let (mut p, _rxs) = pool(Balance::IpHash, 4);
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

    #[test]
    fn connections_a_dead_worker_never_accepted_go_to_another() {
        let (mut p, _rxs) = pool(Balance::RoundRobin, 2);
        let mut peers = Vec::new();
        for _ in 0..4 {
            let (a, peer) = conn();
            peers.push(peer);
            assert!(p.dispatch(1, a).is_ok());
        }
        // Worker 1 got connections 1 and 3; its code accepted 1 only.
        p.consumers[0].unacked.remove(&1);
        p.remove(1);
        assert_eq!(p.pending.len(), 1, "connection 3 waits for another worker");
        let a = p.pending.pop_front().unwrap();
        assert!(p.dispatch(1, a).is_ok());
        assert_eq!(p.consumers.len(), 1);
        assert_eq!(p.consumers[0].unacked.len(), 3);
    }

    #[test]
    fn a_busy_worker_is_skipped() {
        let (mut p, _rxs) = pool(Balance::RoundRobin, 2);
        for conn in 0..MAX_UNACKED as u64 {
            let (a, _peer) = conn_pair();
            p.consumers[0].unacked.insert(conn, a);
        }
        for _ in 0..5 {
            assert_eq!(p.choose(None), Some(1));
        }
        p.consumers[1].accepting.store(false, Ordering::Relaxed);
        assert_eq!(p.choose(None), None, "nobody can take it");
    }

    fn conn_pair() -> (Accepted, std::os::unix::net::UnixStream) {
        conn()
    }

    #[test]
    fn a_worker_whose_writer_is_gone_is_skipped_and_the_connection_kept() {
        let (mut p, mut rxs) = pool(Balance::RoundRobin, 2);
        drop(rxs.remove(0)); // worker 1's writer ended
        let (a, _peer) = conn();
        assert!(p.dispatch(1, a).is_ok());
        assert!(p.consumers[0].dead);
        assert_eq!(p.consumers[1].unacked.len(), 1);
    }
}
