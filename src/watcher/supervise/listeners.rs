//! The listener registry: every listening socket the watcher binds (once,
//! on the first worker's request, kept for the watcher's lifetime) and what
//! a worker's `listen` request gets in each balancing mode.
//!
//! * shared: a duplicate of the one listener per address;
//! * reuseport: a duplicate of the slot's own `SO_REUSEPORT` listener;
//! * balanced (round-robin, least-connections, ip-hash): a grant for the
//!   address's [`Balancer`], which accepts and hands connections over;
//! * socket activation: a duplicate of the socket systemd passed, for any
//!   mode (it is one socket, so reuseport slots share it).
//!
//! The `--listen` sockets are the same listeners, bound at start-up and
//! pinned: held by the command line (a holder that never leaves), so they
//! are never swept; reuseport ones live as long as their slot.
//!
//! The shared listeners live in a [`SharedSockets`], the bind-once,
//! duplicate-for-everyone core that a `ServerSocketPipeProvider` uses too;
//! the policy around it (holders, bounds, headroom, sweeping) is this
//! registry's.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::activation::{self, Activated};
use crate::error::{Error, Kind, Result};
use crate::ipc::message::BalancedGrant;
use crate::server_pipe::shared::{dup, SharedSockets};
use crate::socket::Address;
use crate::watcher::balance::{Balance, Balancer};
use crate::watcher::bind_policy::BindPolicy;
use crate::watcher::event::OutboundSender;
use crate::watcher::listen::ListenSpec;
use crate::watcher::procfs;
use crate::watcher::upgrade::{ConnForward, HandedListener, ListenerKind};

/// Listening sockets the watcher holds at most (every mode and address).
pub(crate) const MAX_LISTENERS: usize = 1024;

/// Distinct addresses one worker may ask for.
pub(crate) const MAX_ADDRESSES_PER_WORKER: usize = 64;

/// Descriptors the watcher keeps free for spawning workers and serving its
/// control socket: below this headroom it binds and duplicates no more.
pub(crate) const FD_RESERVE: u64 = 256;

/// How long a listener no worker holds stays open (while every slot's
/// worker is ready without it) before it is closed.
pub(crate) const UNUSED_GRACE: Duration = Duration::from_secs(5);

/// The holder of the `--listen` sockets (context ids of workers start at 1).
const COMMAND_LINE: u64 = 0;

/// One listener of the registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Shared(Address),
    Reuseport(Address, u32),
    Balanced(Address),
}

/// What a worker's `listen` request gets.
pub(crate) enum Grant {
    Fd(OwnedFd),
    Balanced(BalancedGrant),
}

/// Every listening socket of the watcher.
pub(crate) struct Listeners {
    balance: Balance,
    backlog: u32,
    /// Shared mode and the `--listen` sockets: one listener per address.
    shared: SharedSockets,
    /// Reuseport mode: one listener per address and slot.
    reuseport: HashMap<(Address, u32), OwnedFd>,
    /// Balanced modes: the watcher's accept loop per address.
    balancers: HashMap<Address, Balancer>,
    next_balancer_id: u64,
    /// Sockets passed by systemd's socket activation, handed out for
    /// matching addresses instead of binding.
    activated: &'static [Activated],
    policy: BindPolicy,
    /// Which live workers asked for each listener, and since when a
    /// listener nobody holds has been unheld.
    holders: HashMap<Key, HashSet<u64>>,
    unheld_since: HashMap<Key, Instant>,
    /// The distinct addresses each live worker asked for.
    asked: HashMap<u64, HashSet<Address>>,
    /// Balanced-mode listeners an old watcher handed over, started as
    /// balancers on the first request.
    adopted_balanced: HashMap<Address, OwnedFd>,
    /// Sockets of systemd's socket activation that an old watcher handed
    /// over (this watcher's own environment names none).
    adopted_activated: Vec<Activated>,
    /// The balancers forward to the new watcher of an upgrade.
    forwarding: bool,
}

impl Listeners {
    pub(crate) fn new(
        balance: Balance,
        backlog: u32,
        activated: &'static [Activated],
        policy: BindPolicy,
    ) -> Listeners {
        Listeners {
            balance,
            backlog,
            shared: SharedSockets::new(backlog),
            reuseport: HashMap::new(),
            balancers: HashMap::new(),
            next_balancer_id: 1,
            activated,
            policy,
            holders: HashMap::new(),
            unheld_since: HashMap::new(),
            asked: HashMap::new(),
            adopted_balanced: HashMap::new(),
            adopted_activated: Vec::new(),
            forwarding: false,
        }
    }

    /// Duplicates of every listener, for the new watcher of an upgrade.
    ///
    /// # Errors
    ///
    /// `is_io` when a descriptor cannot be duplicated (none are left).
    pub(crate) fn handover(&self) -> Result<Vec<HandedListener>> {
        let mut out = Vec::new();
        let mut push = |kind, addr: &Address, slot, fd: std::io::Result<OwnedFd>| {
            let fd = fd.map_err(|e| {
                Error::with_io(
                    Kind::Io,
                    format!("cannot duplicate the listener for {addr}"),
                    e,
                )
            })?;
            out.push(HandedListener {
                kind,
                addr: addr.clone(),
                slot,
                fd,
            });
            Ok::<_, Error>(())
        };
        for (addr, fd) in self.shared.iter() {
            push(ListenerKind::Shared, addr, None, fd.try_clone())?;
        }
        for ((addr, slot), fd) in &self.reuseport {
            push(ListenerKind::Reuseport, addr, Some(*slot), fd.try_clone())?;
        }
        for (addr, b) in &self.balancers {
            push(ListenerKind::Balanced, addr, None, b.listener_fd())?;
        }
        for (addr, fd) in &self.adopted_balanced {
            push(ListenerKind::Balanced, addr, None, fd.try_clone())?;
        }
        for a in self.activated.iter().chain(&self.adopted_activated) {
            push(ListenerKind::Activated, &a.addr, None, a.fd.try_clone())?;
        }
        Ok(out)
    }

    /// Takes the listeners the old watcher of an upgrade handed over: the
    /// workers' requests find them as if this watcher had bound them (an
    /// address no worker asks for again is closed like any unused one).
    pub(crate) fn adopt(&mut self, handed: Vec<HandedListener>) {
        let now = Instant::now();
        for h in handed {
            tracing::debug!(
                "upgrade: took over the listener for {} ({:?})",
                h.addr,
                h.kind
            );
            let key = match (h.kind, h.slot) {
                (ListenerKind::Shared, _) => {
                    self.shared.insert(h.addr.clone(), h.fd);
                    Key::Shared(h.addr)
                }
                (ListenerKind::Reuseport, Some(slot)) => {
                    self.reuseport.insert((h.addr.clone(), slot), h.fd);
                    Key::Reuseport(h.addr, slot)
                }
                (ListenerKind::Balanced, _) => {
                    self.adopted_balanced.insert(h.addr, h.fd);
                    continue;
                }
                (ListenerKind::Activated, _) => {
                    self.adopted_activated.push(Activated {
                        addr: h.addr,
                        fd: h.fd,
                    });
                    continue;
                }
                (ListenerKind::Reuseport, None) => {
                    tracing::warn!(
                        "upgrade: a reuseport listener for {} without a slot; closed",
                        h.addr
                    );
                    continue;
                }
            };
            self.unheld_since.insert(key, now);
        }
    }

    /// The new watcher of an upgrade serves: the balancers stop accepting
    /// and send what they hold, and what draining workers give back, to it.
    /// No listener is closed for want of a holder from now on.
    pub(crate) fn forward(&mut self, to: &Arc<ConnForward>) {
        self.forwarding = true;
        for (addr, b) in &mut self.balancers {
            b.forward(addr, to.clone());
        }
    }

    /// In the new watcher of an upgrade: a connection the old one accepted
    /// on `addr`. Closed when no worker here asked for `addr`.
    pub(crate) fn inject(&self, addr: &Address, fd: OwnedFd, peer: String) {
        match self.balancers.get(addr) {
            Some(b) => b.inject(fd, peer),
            None => tracing::warn!(
                "upgrade: the old watcher handed over a connection on {addr}, where no worker listens; closed"
            ),
        }
    }

    /// The new watcher of an upgrade holds the listeners now: forget them
    /// without removing Unix socket files (they are its files), after the
    /// balancers sent it what they still held.
    pub(crate) fn hand_over(&mut self) {
        for b in self.balancers.values() {
            b.flush();
        }
        self.shared.clear();
        self.reuseport.clear();
        self.balancers.clear();
        self.adopted_balanced.clear();
        self.adopted_activated.clear();
        self.holders.clear();
        self.unheld_since.clear();
    }

    /// What worker `context_id` of `slot` asking for `addr` gets, binding
    /// on first request. A balanced grant's worker joins the pool with
    /// [`join`](Self::join) once its reply is queued, so no connection can
    /// overtake the reply.
    ///
    /// # Errors
    ///
    /// `is_bind` when the policy forbids `addr` or binding fails; `is_io`
    /// ones when a bound is reached (addresses per worker, listeners in
    /// all, descriptors left).
    pub(crate) fn grant(&mut self, addr: &Address, slot: u32, context_id: u64) -> Result<Grant> {
        self.policy.check(addr)?;
        let asked = self.asked.entry(context_id).or_default();
        if !asked.contains(addr) && asked.len() >= MAX_ADDRESSES_PER_WORKER {
            return Err(Error::new(
                Kind::Io,
                format!("cannot listen on {addr}: a worker may ask for at most {MAX_ADDRESSES_PER_WORKER} addresses"),
            ));
        }
        check_headroom(addr)?;
        let (key, grant) = if self.balance.hands_off() {
            let key = Key::Balanced(addr.clone());
            (key, self.balancer_for(addr).map(Grant::Balanced))
        } else if let Some(fd) = self.activated_for(addr) {
            return fd.map(Grant::Fd);
        } else if self.balance == Balance::Reuseport && matches!(addr, Address::Tcp(_)) {
            let key = Key::Reuseport(addr.clone(), slot);
            (key, self.reuseport_for(addr, slot).map(Grant::Fd))
        } else {
            (
                Key::Shared(addr.clone()),
                self.shared_for(addr).map(Grant::Fd),
            )
        };
        let grant = grant?;
        self.asked
            .entry(context_id)
            .or_default()
            .insert(addr.clone());
        self.unheld_since.remove(&key);
        self.holders.entry(key).or_default().insert(context_id);
        Ok(grant)
    }

    /// The `--listen` sockets for a worker of `slot`, in order (duplicates
    /// for it to inherit): bound on first use (at start-up for the first
    /// slots, when a slot is added by scaling), then pinned for the
    /// watcher's lifetime (reuseport ones for the slot's), and put in
    /// blocking mode when bound, as socket activation passes them (a
    /// program's plain blocking `accept` loop works; programs that want
    /// non-blocking sockets set that themselves). The operator named them,
    /// so `--allow-bind` does not apply.
    ///
    /// # Errors
    ///
    /// `is_bind` when an address cannot be bound, `is_io` ones when a
    /// bound is reached.
    pub(crate) fn inherited(&mut self, specs: &[ListenSpec], slot: u32) -> Result<Vec<OwnedFd>> {
        specs.iter().map(|s| self.pinned(&s.addr, slot)).collect()
    }

    fn pinned(&mut self, addr: &Address, slot: u32) -> Result<OwnedFd> {
        if let Some(fd) = self.activated_for(addr) {
            return fd;
        }
        check_headroom(addr)?;
        let (key, fd) = if self.balance == Balance::Reuseport && matches!(addr, Address::Tcp(_)) {
            (
                Key::Reuseport(addr.clone(), slot),
                self.reuseport_for(addr, slot)?,
            )
        } else {
            (Key::Shared(addr.clone()), self.shared_for(addr)?)
        };
        self.unheld_since.remove(&key);
        if self.holders.entry(key).or_default().insert(COMMAND_LINE) {
            // Once, when it is pinned: a library worker may have made it
            // non-blocking since, and must keep it that way.
            socket2::SockRef::from(&fd)
                .set_nonblocking(false)
                .map_err(|e| Error::with_io(Kind::Bind, format!("cannot listen on {addr}"), e))?;
            let local = socket2::SockRef::from(&fd).local_addr().ok();
            if let Some(local) = local.and_then(|a| a.as_socket()) {
                if Address::Tcp(local) != *addr {
                    tracing::info!("--listen {addr} is {local}");
                }
            }
        }
        Ok(fd)
    }

    fn count(&self) -> usize {
        self.shared.len() + self.reuseport.len() + self.balancers.len()
    }

    fn check_room(&self, addr: &Address) -> Result<()> {
        if self.count() >= MAX_LISTENERS {
            return Err(Error::new(
                Kind::Io,
                format!(
                    "cannot listen on {addr}: the watcher already holds {MAX_LISTENERS} listeners"
                ),
            ));
        }
        Ok(())
    }

    /// When [`sweep`](Self::sweep) has something to close, if ever.
    /// Every address the watcher listens on, sorted: as bound (the real
    /// port for port 0; a balanced address as its balancer accepts).
    pub(crate) fn addresses(&self) -> Vec<String> {
        let local = |addr: &Address, fd: &OwnedFd| match addr {
            Address::Tcp(_) => socket2::SockRef::from(fd)
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .map(|a| a.to_string())
                .unwrap_or_else(|| addr.to_string()),
            Address::Unix(_) => addr.to_string(),
        };
        let mut all: Vec<String> = self
            .shared
            .iter()
            .map(|(a, fd)| local(a, fd))
            .chain(self.reuseport.iter().map(|((a, _), fd)| local(a, fd)))
            .chain(self.balancers.values().map(|b| b.local.clone()))
            .collect();
        all.sort();
        all.dedup();
        all
    }

    pub(crate) fn next_sweep(&self) -> Option<Instant> {
        if self.forwarding {
            return None;
        }
        self.unheld_since.values().min().map(|&t| t + UNUSED_GRACE)
    }

    /// Closes the listeners no live worker has held for [`UNUSED_GRACE`].
    /// The caller sweeps only while every slot's worker is ready: a worker
    /// that is starting may still ask for a listener nobody holds.
    pub(crate) fn sweep(&mut self, now: Instant) {
        if self.forwarding {
            return;
        }
        let due: Vec<Key> = self
            .unheld_since
            .iter()
            .filter(|(_, &t)| now.duration_since(t) >= UNUSED_GRACE)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.unheld_since.remove(&key);
            self.holders.remove(&key);
            let addr = match &key {
                Key::Shared(a) => {
                    self.shared.remove(a);
                    a
                }
                Key::Reuseport(a, slot) => {
                    self.reuseport.remove(&(a.clone(), *slot));
                    a
                }
                Key::Balanced(a) => {
                    self.balancers.remove(a);
                    a
                }
            };
            tracing::info!("closed {addr}: no worker has used it for {UNUSED_GRACE:?}");
            if let (Address::Unix(path), false) = (addr, matches!(key, Key::Reuseport(..))) {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Adds a worker to the pool of balanced listener `listener`.
    pub(crate) fn join(
        &self,
        listener: u64,
        context_id: u64,
        outbound: OutboundSender,
        accepting: Arc<AtomicBool>,
    ) {
        if let Some(b) = self.balancer(listener) {
            b.add(context_id, outbound, accepting);
        }
    }

    /// A worker gave connection `conn` back: it goes to another worker.
    /// When the listener is unknown (gone), the connection is closed.
    pub(crate) fn returned(
        &self,
        listener: u64,
        context_id: u64,
        conn: u64,
        fd: OwnedFd,
        peer: &str,
    ) {
        if let Some(b) = self.balancer(listener) {
            b.returned(context_id, conn, fd, peer);
        }
    }

    /// A worker's code accepted handed-off connections.
    pub(crate) fn accepted(&self, listener: u64, context_id: u64, conns: &[u64]) {
        if let Some(b) = self.balancer(listener) {
            b.accepted(context_id, conns);
        }
    }

    /// A worker exited, or its channel closed after everything it sent was
    /// handled: it leaves every pool, and connections it was handed but
    /// never accepted go to other workers.
    pub(crate) fn worker_gone(&mut self, context_id: u64) {
        for b in self.balancers.values() {
            b.gone(context_id);
        }
        self.asked.remove(&context_id);
        let now = Instant::now();
        for (key, holders) in &mut self.holders {
            if holders.remove(&context_id) && holders.is_empty() {
                self.unheld_since.insert(key.clone(), now);
            }
        }
    }

    /// A worker reported handed-off connections closed.
    pub(crate) fn closed(&self, listener: u64, context_id: u64, count: u32) {
        if let Some(b) = self.balancer(listener) {
            b.closed(context_id, count);
        }
    }

    /// A slot was scaled away: its reuseport listeners close. Connections
    /// still queued in them are reset (Linux does not migrate them unless
    /// `net.ipv4.tcp_migrate_req` is set).
    pub(crate) fn retire_slot(&mut self, slot: u32) {
        self.reuseport.retain(|(_, s), _| *s != slot);
        let retired = |k: &Key| matches!(k, Key::Reuseport(_, s) if *s == slot);
        self.holders.retain(|k, _| !retired(k));
        self.unheld_since.retain(|k, _| !retired(k));
    }

    /// Closes every listener and removes Unix socket files.
    pub(crate) fn shutdown(&mut self) {
        self.reuseport.clear();
        for (addr, _) in self.balancers.drain() {
            if let Address::Unix(path) = addr {
                let _ = std::fs::remove_file(path);
            }
        }
        self.shared.close_all();
    }

    fn balancer(&self, id: u64) -> Option<&Balancer> {
        self.balancers.values().find(|b| b.id == id)
    }

    /// The balancer for `addr` (bound and started on first request).
    fn balancer_for(&mut self, addr: &Address) -> Result<BalancedGrant> {
        if !self.balancers.contains_key(addr) {
            self.check_room(addr)?;
            let fd = match (self.adopted_balanced.remove(addr), self.activated_for(addr)) {
                (Some(fd), _) => fd,
                (None, Some(fd)) => fd?,
                (None, None) => addr.bind(self.backlog)?,
            };
            let id = self.next_balancer_id;
            self.next_balancer_id += 1;
            let balancer = Balancer::start(id, self.balance, addr, fd)
                .map_err(|e| Error::with_io(Kind::Bind, format!("cannot listen on {addr}"), e))?;
            tracing::info!(
                "listening on {addr} ({:?}: the watcher accepts)",
                self.balance
            );
            self.balancers.insert(addr.clone(), balancer);
        }
        let b = &self.balancers[addr];
        Ok(BalancedGrant {
            listener: b.id,
            local: b.local.clone(),
        })
    }

    /// The listener of `slot` for `addr` (reuseport), bound on first
    /// request and kept for the slot's replacements.
    fn reuseport_for(&mut self, addr: &Address, slot: u32) -> Result<OwnedFd> {
        let key = (addr.clone(), slot);
        if !self.reuseport.contains_key(&key) {
            self.check_room(addr)?;
            // Every slot of a port-0 address shares the port the first drew.
            let port = self
                .reuseport
                .iter()
                .find(|((a, _), _)| a == addr)
                .and_then(|(_, fd)| socket2::SockRef::from(fd).local_addr().ok())
                .and_then(|a| a.as_socket())
                .map(|a| a.port());
            let fd = addr.bind_reuseport(self.backlog, port)?;
            tracing::info!("listening on {addr} (reuseport, slot {slot})");
            self.reuseport.insert(key.clone(), fd);
        }
        dup(&self.reuseport[&key], addr)
    }

    /// The listener for `addr`, bound on first request.
    fn shared_for(&mut self, addr: &Address) -> Result<OwnedFd> {
        if !self.shared.contains(addr) {
            self.check_room(addr)?;
        }
        let (fd, bound) = self.shared.grant(addr)?;
        if bound {
            tracing::info!("listening on {addr}");
        }
        Ok(fd)
    }

    /// A duplicate of the socket-activated listener matching `addr`, if
    /// systemd passed one.
    fn activated_for(&self, addr: &Address) -> Option<Result<OwnedFd>> {
        let a = self
            .activated
            .iter()
            .chain(&self.adopted_activated)
            .find(|a| activation::matches(addr, &a.addr))?;
        Some(dup(&a.fd, addr))
    }
}

/// Refuses to bind or duplicate below [`FD_RESERVE`] free descriptors.
fn check_headroom(addr: &Address) -> Result<()> {
    match procfs::fd_headroom().filter(|&h| h < FD_RESERVE) {
        Some(headroom) => Err(Error::new(
            Kind::Io,
            format!("cannot listen on {addr}: the watcher has only {headroom} descriptors left (it keeps {FD_RESERVE} in reserve)"),
        )),
        None => Ok(()),
    }
}
