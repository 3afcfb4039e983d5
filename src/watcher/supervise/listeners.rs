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

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::error::{Error, Kind, Result};
use crate::ipc::message::BalancedGrant;
use crate::socket::Address;
use crate::watcher::balance::{Balance, Balancer};
use crate::watcher::event::OutboundSender;
use crate::watcher::systemd::{self, Activated};

/// What a worker's `listen` request gets.
pub(crate) enum Grant {
    Fd(OwnedFd),
    Balanced(BalancedGrant),
}

/// Every listening socket of the watcher.
pub(crate) struct Listeners {
    balance: Balance,
    backlog: u32,
    shared: HashMap<Address, OwnedFd>,
    /// Reuseport mode: one listener per address and slot.
    reuseport: HashMap<(Address, u32), OwnedFd>,
    /// Balanced modes: the watcher's accept loop per address.
    balancers: HashMap<Address, Balancer>,
    next_balancer_id: u64,
    /// Sockets passed by systemd's socket activation, handed out for
    /// matching addresses instead of binding.
    activated: Vec<Activated>,
}

impl Listeners {
    pub(crate) fn new(balance: Balance, backlog: u32, activated: Vec<Activated>) -> Listeners {
        Listeners {
            balance,
            backlog,
            shared: HashMap::new(),
            reuseport: HashMap::new(),
            balancers: HashMap::new(),
            next_balancer_id: 1,
            activated,
        }
    }

    /// What a worker of `slot` asking for `addr` gets, binding on first
    /// request. A balanced grant's worker joins the pool with [`join`](Self::join)
    /// once its reply is queued, so no connection can overtake the reply.
    pub(crate) fn grant(&mut self, addr: &Address, slot: u32) -> Result<Grant> {
        if self.balance.hands_off() {
            return self.balancer_for(addr).map(Grant::Balanced);
        }
        if let Some(fd) = self.activated_for(addr) {
            return fd.map(Grant::Fd);
        }
        if self.balance == Balance::Reuseport && matches!(addr, Address::Tcp(_)) {
            return self.reuseport_for(addr, slot).map(Grant::Fd);
        }
        self.shared_for(addr).map(Grant::Fd)
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
    pub(crate) fn worker_gone(&self, context_id: u64) {
        for b in self.balancers.values() {
            b.gone(context_id);
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
    }

    /// Closes every listener and removes Unix socket files.
    pub(crate) fn shutdown(&mut self) {
        self.reuseport.clear();
        let addresses: Vec<Address> = self
            .balancers
            .drain()
            .map(|(a, _)| a)
            .chain(self.shared.drain().map(|(a, _)| a))
            .collect();
        for addr in addresses {
            if let Address::Unix(path) = addr {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    fn balancer(&self, id: u64) -> Option<&Balancer> {
        self.balancers.values().find(|b| b.id == id)
    }

    /// The balancer for `addr` (bound and started on first request).
    fn balancer_for(&mut self, addr: &Address) -> Result<BalancedGrant> {
        if !self.balancers.contains_key(addr) {
            let fd = match self.activated_for(addr) {
                Some(fd) => fd?,
                None => addr.bind(self.backlog)?,
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
        if !self.shared.contains_key(addr) {
            let fd = addr.bind(self.backlog)?;
            tracing::info!("listening on {addr}");
            self.shared.insert(addr.clone(), fd);
        }
        dup(&self.shared[addr], addr)
    }

    /// A duplicate of the socket-activated listener matching `addr`, if
    /// systemd passed one.
    fn activated_for(&self, addr: &Address) -> Option<Result<OwnedFd>> {
        let a = self
            .activated
            .iter()
            .find(|a| systemd::matches(addr, &a.addr))?;
        Some(dup(&a.fd, addr))
    }
}

fn dup(fd: &OwnedFd, addr: &Address) -> Result<OwnedFd> {
    fd.try_clone().map_err(|e| {
        Error::with_io(
            Kind::Io,
            format!("cannot duplicate the listener for {addr}"),
            e,
        )
    })
}
