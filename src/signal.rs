//! Signal handling: the only module that installs signal handlers.
//! The watcher's: TERM/INT/QUIT stop, USR1/HUP reload, TTIN/TTOU scale, USR2
//! upgrade.
//!
//! Handlers are installed through `tokio::signal::unix`, lazily, when a
//! caller first waits: a program that never asks keeps the default
//! dispositions (SIGTERM kills it).

use std::io;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// A signal the watcher acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WatcherSignal {
    /// SIGTERM, SIGINT or SIGQUIT: stop gracefully (a second one forces).
    Stop(&'static str),
    /// SIGUSR1 or SIGHUP: rolling restart.
    Reload(&'static str),
    /// SIGTTIN: one more worker.
    ScaleUp,
    /// SIGTTOU: one worker less.
    ScaleDown,
    /// SIGUSR2: upgrade the watcher itself.
    Upgrade,
}

/// The signals a watcher listens to.
pub(crate) struct WatcherSignals {
    term: Signal,
    int: Signal,
    quit: Signal,
    usr1: Signal,
    usr2: Signal,
    hup: Signal,
    ttin: Signal,
    ttou: Signal,
}

impl WatcherSignals {
    /// Installs the handlers. Must be called within a tokio runtime.
    pub(crate) fn install() -> io::Result<WatcherSignals> {
        Ok(WatcherSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
            hup: signal(SignalKind::hangup())?,
            ttin: signal(SignalKind::from_raw(libc::SIGTTIN))?,
            ttou: signal(SignalKind::from_raw(libc::SIGTTOU))?,
        })
    }

    /// Waits for the next signal.
    pub(crate) async fn recv(&mut self) -> WatcherSignal {
        tokio::select! {
            _ = self.term.recv() => WatcherSignal::Stop("SIGTERM"),
            _ = self.int.recv() => WatcherSignal::Stop("SIGINT"),
            _ = self.quit.recv() => WatcherSignal::Stop("SIGQUIT"),
            _ = self.usr1.recv() => WatcherSignal::Reload("SIGUSR1"),
            _ = self.hup.recv() => WatcherSignal::Reload("SIGHUP"),
            _ = self.usr2.recv() => WatcherSignal::Upgrade,
            _ = self.ttin.recv() => WatcherSignal::ScaleUp,
            _ = self.ttou.recv() => WatcherSignal::ScaleDown,
        }
    }
}

/// A stream of SIGCHLD (a child exited), for the watcher's orphan reaper.
/// Must be called within a tokio runtime.
pub(crate) fn child_exits() -> io::Result<Signal> {
    signal(SignalKind::child())
}

/// Resolves when the process receives SIGTERM, SIGINT, SIGQUIT or SIGHUP,
/// with the signal's name. A handler that cannot be installed is logged and
/// that signal is not waited for.
pub(crate) async fn termination() -> &'static str {
    async fn one(kind: SignalKind, name: &'static str) -> &'static str {
        match signal(kind) {
            Ok(mut s) => {
                s.recv().await;
                name
            }
            Err(e) => {
                tracing::warn!("cannot install a handler for {name}: {e}");
                std::future::pending().await
            }
        }
    }
    tokio::select! {
        n = one(SignalKind::terminate(), "SIGTERM") => n,
        n = one(SignalKind::interrupt(), "SIGINT") => n,
        n = one(SignalKind::quit(), "SIGQUIT") => n,
        n = one(SignalKind::hangup(), "SIGHUP") => n,
    }
}
