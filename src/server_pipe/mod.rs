//! Server socket pipes (amphp's `ServerSocketPipeProvider` and
//! `ServerSocketPipeFactory`): a parent process binds listening sockets
//! and hands duplicates to the processes that ask over a pipe, so every
//! child listening on one address shares one socket and one accept queue,
//! without the cluster watcher.
//!
//! * [`ServerSocketPipeProvider`] (`provider.rs`): the parent's side; binds
//!   each address once (`shared.rs`, the code the watcher's registry uses)
//!   and answers each connection in its own `provide_for`.
//! * [`ServerSocketPipeFactory`] (`factory.rs`): the child's side; `listen`
//!   returns the crate's [`Listener`].
//! * `wire.rs`: the private, versioned datagram format.

mod factory;
mod provider;
pub(crate) mod shared;
mod wire;

use std::future::Future;

pub use factory::ServerSocketPipeFactory;
pub use provider::{ServerSocketPipeProvider, MAX_PIPE_ADDRESSES};

use crate::error::Result;
use crate::listener::Listener;
use crate::worker::ServerSocketFactory;

/// Something that hands out listening sockets by address:
/// [`ServerSocketFactory`] (from the watcher in a worker, bound locally
/// standalone) and [`ServerSocketPipeFactory`] (from a provider over a
/// pipe). Server code written against it runs with either.
///
/// ```no_run
/// use cluster::{Cluster, ListenerFactory};
///
/// async fn serve(factory: &impl ListenerFactory) -> Result<(), cluster::Error> {
///     let listener = factory.listen("127.0.0.1:8080").await?;
///     while let Ok((stream, _peer)) = listener.accept().await {
///         // serve `stream`
/// #       drop(stream);
///     }
///     Ok(())
/// }
///
/// # async fn run() -> Result<(), cluster::Error> {
/// serve(&Cluster::server_socket_factory()).await?;
/// # Ok(()) }
/// ```
pub trait ListenerFactory {
    /// A listener for `addr` (`host:port`, `tcp://host:port`, `:port`,
    /// `unix:///path`).
    ///
    /// # Errors
    ///
    /// As the implementation's own `listen`:
    /// [`ServerSocketFactory::listen`], [`ServerSocketPipeFactory::listen`].
    fn listen(&self, addr: &str) -> impl Future<Output = Result<Listener>> + Send;
}

impl ListenerFactory for ServerSocketFactory {
    fn listen(&self, addr: &str) -> impl Future<Output = Result<Listener>> + Send {
        ServerSocketFactory::listen(self, addr)
    }
}

impl ListenerFactory for ServerSocketPipeFactory {
    fn listen(&self, addr: &str) -> impl Future<Output = Result<Listener>> + Send {
        ServerSocketPipeFactory::listen(self, addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipe_end::pipe_pair;
    use std::os::fd::AsFd;

    fn inode(listener: &Listener) -> u64 {
        match listener {
            Listener::Tcp(l) => nix::sys::stat::fstat(l.as_fd()).unwrap().st_ino,
            Listener::Unix(l) => nix::sys::stat::fstat(l.as_fd()).unwrap().st_ino,
            Listener::Balanced(_) => panic!("balanced"),
        }
    }

    /// A factory served by `provider` in a task.
    fn connect(provider: &ServerSocketPipeProvider) -> ServerSocketPipeFactory {
        let (a, b) = pipe_pair().unwrap();
        let p = provider.clone();
        tokio::spawn(async move { p.provide_for(a).await });
        ServerSocketPipeFactory::new(b).unwrap()
    }

    #[tokio::test]
    async fn two_factories_get_one_socket() {
        let provider = ServerSocketPipeProvider::new();
        let (one, two) = (connect(&provider), connect(&provider));
        let a = one.listen("127.0.0.1:0").await.unwrap();
        let b = ListenerFactory::listen(&two, "tcp://127.0.0.1:0")
            .await
            .unwrap();
        assert_eq!(inode(&a), inode(&b));
        assert_eq!(a.local_tcp_addr(), b.local_tcp_addr());
    }

    #[tokio::test]
    async fn concurrent_listens_on_one_factory() {
        let provider = ServerSocketPipeProvider::new();
        let factory = std::sync::Arc::new(connect(&provider));
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let f = factory.clone();
                let addr = if i % 2 == 0 { "127.0.0.1:0" } else { "[::1]:0" };
                tokio::spawn(async move { f.listen(addr).await.map(|l| (i, inode(&l))) })
            })
            .collect();
        let mut inodes = [Vec::new(), Vec::new()];
        for t in tasks {
            match t.await.unwrap() {
                Ok((i, ino)) => inodes[i % 2].push(ino),
                // No IPv6 loopback here: only the IPv4 ones count.
                Err(e) if e.is_bind() => {}
                Err(e) => panic!("{e}"),
            }
        }
        for same in &inodes {
            assert!(same.windows(2).all(|w| w[0] == w[1]), "{inodes:?}");
        }
        assert_eq!(inodes[0].len(), 4);
    }

    #[tokio::test]
    async fn a_cancelled_listen_leaves_the_pipe_usable() {
        let provider = ServerSocketPipeProvider::new();
        let (a, b) = pipe_pair().unwrap();
        let factory = ServerSocketPipeFactory::new(b).unwrap();
        // The request is sent, then the future dropped before any answer
        // (nobody serves the pipe yet).
        let first = factory.listen("127.0.0.1:0");
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), first)
                .await
                .is_err()
        );
        let p = provider.clone();
        tokio::spawn(async move { p.provide_for(a).await });
        let listener = factory.listen("127.0.0.1:0").await.unwrap();
        assert!(listener.local_tcp_addr().is_some());
    }

    #[tokio::test]
    async fn provide_for_until_stops_on_cancel() {
        let provider = ServerSocketPipeProvider::new();
        let (a, b) = pipe_pair().unwrap();
        let factory = ServerSocketPipeFactory::new(b).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let p = provider.clone();
        let task = tokio::spawn(async move {
            p.provide_for_until(a, async {
                let _ = stopped.await;
            })
            .await
        });
        factory.listen("127.0.0.1:0").await.unwrap();
        stop.send(()).unwrap();
        task.await.unwrap().unwrap();
        let err = factory.listen("127.0.0.1:0").await.unwrap_err();
        assert!(err.is_ipc(), "{err}");
    }

    #[tokio::test]
    async fn an_invalid_address_is_refused_locally() {
        let provider = ServerSocketPipeProvider::new();
        let factory = connect(&provider);
        for bad in ["nonsense", "ftp://x:1", "unix:"] {
            let err = factory.listen(bad).await.unwrap_err();
            assert!(err.is_invalid_address(), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn addresses_are_bounded_per_connection() {
        let provider = ServerSocketPipeProvider::new();
        let dir = tempfile::tempdir().unwrap();
        let factory = connect(&provider);
        for i in 0..MAX_PIPE_ADDRESSES {
            let path = dir.path().join(format!("{i}.sock"));
            factory
                .listen(&format!("unix:{}", path.display()))
                .await
                .unwrap();
        }
        let one_more = format!("unix:{}", dir.path().join("more.sock").display());
        let err = factory.listen(&one_more).await.unwrap_err();
        assert!(!err.is_bind() && !err.is_ipc(), "{err}");
        assert!(err.to_string().contains("at most 64"), "{err}");
        // The connection stays usable, and another one may ask.
        factory
            .listen(&format!("unix:{}", dir.path().join("0.sock").display()))
            .await
            .unwrap();
        connect(&provider).listen(&one_more).await.unwrap();
        // The provider's Unix socket files go with it.
        drop(factory);
        drop(provider);
        let gone = || !dir.path().join("more.sock").exists();
        for _ in 0..100 {
            if gone() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(gone());
    }
}
