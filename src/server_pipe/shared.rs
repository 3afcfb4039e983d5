//! Bind once, hand out duplicates: the one implementation of it in the
//! crate. The watcher's listener registry (shared mode and the `--listen`
//! sockets) and a [`ServerSocketPipeProvider`](crate::ServerSocketPipeProvider)
//! both keep their listeners in a [`SharedSockets`]: one socket per
//! [`Address`], bound on the first request with the watcher's options
//! ([`Address::bind`]: the backlog, `SO_REUSEADDR`, non-blocking and
//! close-on-exec, a stale Unix socket file replaced) and kept while its
//! owner holds it; every request gets a `dup` of it, so everyone who asks
//! for one address shares one socket and one accept queue.
//!
//! Policy (who may ask, how many, descriptor headroom, logging) stays with
//! the owner: this is only the map and the bind.

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use crate::error::{Error, Kind, Result};
use crate::socket::Address;

/// Listening sockets, one per address, bound on first request.
#[derive(Debug)]
pub(crate) struct SharedSockets {
    backlog: u32,
    bound: HashMap<Address, OwnedFd>,
}

impl SharedSockets {
    /// An empty set whose binds use `backlog`.
    pub(crate) fn new(backlog: u32) -> SharedSockets {
        SharedSockets {
            backlog,
            bound: HashMap::new(),
        }
    }

    /// Whether a socket for `addr` is held.
    pub(crate) fn contains(&self, addr: &Address) -> bool {
        self.bound.contains_key(addr)
    }

    /// How many sockets are held.
    pub(crate) fn len(&self) -> usize {
        self.bound.len()
    }

    /// A duplicate of the socket for `addr`, binding it first when none is
    /// held; the flag says whether this call bound it. A socket bound here
    /// is kept even when its duplicate then fails.
    ///
    /// # Errors
    ///
    /// `is_bind` when binding fails, `is_io` when the duplicate fails.
    pub(crate) fn grant(&mut self, addr: &Address) -> Result<(OwnedFd, bool)> {
        let bound = !self.bound.contains_key(addr);
        if bound {
            let fd = addr.bind(self.backlog)?;
            self.bound.insert(addr.clone(), fd);
        }
        Ok((dup(&self.bound[addr], addr)?, bound))
    }

    /// Holds `fd` as the socket for `addr` (one bound elsewhere, such as a
    /// listener an old watcher handed over), replacing any held one.
    pub(crate) fn insert(&mut self, addr: Address, fd: OwnedFd) {
        self.bound.insert(addr, fd);
    }

    /// Stops holding the socket for `addr` and returns it (the caller
    /// decides about a Unix socket's file).
    pub(crate) fn remove(&mut self, addr: &Address) -> Option<OwnedFd> {
        self.bound.remove(addr)
    }

    /// Every held socket with its address.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Address, &OwnedFd)> {
        self.bound.iter()
    }

    /// Forgets every socket without removing Unix socket files (another
    /// process holds them now: a watcher upgrade's new watcher).
    pub(crate) fn clear(&mut self) {
        self.bound.clear();
    }

    /// Closes every socket and removes the files of the Unix ones.
    pub(crate) fn close_all(&mut self) {
        for (addr, fd) in self.bound.drain() {
            drop(fd);
            if let Address::Unix(path) = addr {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// A duplicate of `fd`, the listener for `addr`.
///
/// # Errors
///
/// `is_io` when `dup` fails (no descriptor left).
pub(crate) fn dup(fd: &OwnedFd, addr: &Address) -> Result<OwnedFd> {
    fd.try_clone().map_err(|e| {
        Error::with_io(
            Kind::Io,
            format!("cannot duplicate the listener for {addr}"),
            e,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn inode(fd: &OwnedFd) -> u64 {
        nix::sys::stat::fstat(fd).unwrap().st_ino
    }

    #[test]
    fn binds_once_and_hands_out_duplicates() {
        let mut sockets = SharedSockets::new(16);
        let addr = Address::parse("127.0.0.1:0").unwrap();
        let (a, bound_a) = sockets.grant(&addr).unwrap();
        let (b, bound_b) = sockets.grant(&addr).unwrap();
        assert!(bound_a && !bound_b);
        assert_ne!(a.as_raw_fd(), b.as_raw_fd());
        assert_eq!(inode(&a), inode(&b));
        assert_eq!(sockets.len(), 1);
        let held = sockets.iter().next().unwrap().1;
        assert_eq!(inode(held), inode(&a));
    }

    #[test]
    fn a_failed_bind_holds_nothing() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = Address::Tcp(taken.local_addr().unwrap());
        let mut sockets = SharedSockets::new(16);
        let err = sockets.grant(&addr).unwrap_err();
        assert!(err.is_bind(), "{err}");
        assert!(!sockets.contains(&addr));
    }

    #[test]
    fn close_all_removes_unix_files_and_clear_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (dir.path().join("one.sock"), dir.path().join("two.sock"));
        let mut sockets = SharedSockets::new(16);
        sockets.grant(&Address::Unix(one.clone())).unwrap();
        sockets.clear();
        assert!(one.exists(), "clear keeps the file");
        sockets.grant(&Address::Unix(two.clone())).unwrap();
        sockets.close_all();
        assert!(!two.exists(), "close_all removes the file");
        assert_eq!(sockets.len(), 0);
    }
}
