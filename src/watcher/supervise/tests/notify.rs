//! Workers that speak `sd_notify` (`--notify`), with fake processes under
//! paused time: readiness only from `READY=1`, the watchdog, draining on
//! `STOPPING=1`, the stop signal.

use std::time::Duration;

use nix::sys::signal::Signal;

use super::{config, settle, start};
use crate::watcher::config::Config;

/// One worker with `--notify`.
fn notify_config() -> Config {
    let mut c = config(1);
    c.notify = true;
    c
}

/// One worker with `--notify` and a 1 s heartbeat.
fn watchdog_config() -> Config {
    let mut c = notify_config();
    c.heartbeat_timeout = Some(Duration::from_secs(1));
    c
}

#[tokio::test(start_paused = true)]
async fn with_notify_only_ready_1_makes_a_worker_ready() {
    let mut h = start(notify_config());
    let p = h.spawned().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!*h.ready.borrow(), "no readiness is assumed after a delay");
    p.notify("STATUS=warming up\nREADY=0");
    settle().await;
    assert!(!*h.ready.borrow());
    p.notify("READY=1\nSTATUS=serving");
    settle().await;
    assert!(*h.ready.borrow());
    assert_eq!(h.status().await[0].2, "ready");
}

#[tokio::test(start_paused = true)]
async fn without_notify_a_worker_is_ready_after_the_ready_delay() {
    let mut c = config(1);
    c.assume_ready_after = Duration::from_millis(300);
    let mut h = start(c);
    let _p = h.spawned().await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(!*h.ready.borrow());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(*h.ready.borrow());
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_stops_sending_watchdog_is_killed_and_replaced() {
    let mut h = start(watchdog_config());
    let p = h.spawned().await;
    p.notify("READY=1");
    p.notify("WATCHDOG=1");
    // Pinging every 500 ms keeps it alive.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        p.notify("WATCHDOG=1");
    }
    settle().await;
    assert!(h.signals.try_recv().is_err(), "no signal while it pings");
    let silent = tokio::time::Instant::now();
    let (pid, sig, at) = h.signal().await;
    assert_eq!((pid, sig), (p.pid, Signal::SIGKILL));
    let after = at.duration_since(silent);
    assert!(
        after > Duration::from_secs(1) && after <= Duration::from_millis(1800),
        "killed {after:?} after the last ping"
    );
    let next = h.spawned().await;
    assert_eq!(next.slot, 1);
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_never_sends_watchdog_is_not_held_to_it() {
    let mut h = start(watchdog_config());
    let p = h.spawned().await;
    p.notify("READY=1");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(h.signals.try_recv().is_err());
}

#[tokio::test(start_paused = true)]
async fn stopping_1_drains_the_worker_and_starts_a_new_one_at_once() {
    let mut c = notify_config();
    c.shutdown_timeout = Duration::from_secs(3);
    let mut h = start(c);
    let old = h.spawned().await;
    old.notify("READY=1");
    settle().await;
    old.notify("STOPPING=1\nSTATUS=recycling");
    let new = h.spawned().await;
    assert_eq!(new.slot, 1);
    assert!(
        new.at.duration_since(old.at) <= Duration::from_millis(100),
        "no backoff for a ready worker"
    );
    assert!(h.signals.try_recv().is_err(), "it is not asked to stop");
    let states: Vec<String> = h.status().await.into_iter().map(|w| w.2).collect();
    assert_eq!(states, ["stopping", "starting"]);
    // Still alive after the shutdown timeout: killed.
    let (pid, sig, _) = h.signal().await;
    assert_eq!((pid, sig), (old.pid, Signal::SIGKILL));
    old.exit(0);
    settle().await;
    assert!(h.no_spawn(), "its exit starts nothing more");
}

#[tokio::test(start_paused = true)]
async fn a_replacement_that_says_stopping_before_ready_fails_the_reload() {
    let mut h = start(notify_config());
    let old = h.spawned().await;
    old.notify("READY=1");
    settle().await;
    let done = h.restart();
    let new = h.spawned().await;
    new.notify("STOPPING=1");
    let result = done.await.unwrap();
    assert!(result.unwrap_err().is_reload());
    let (pid, sig, _) = h.signal().await;
    assert_eq!((pid, sig), (new.pid, Signal::SIGKILL));
    settle().await;
    let left: Vec<(u32, String)> = h.status().await.into_iter().map(|w| (w.1, w.2)).collect();
    assert_eq!(
        left,
        [(old.pid, "ready".to_string())],
        "the old one serves on"
    );
}

#[tokio::test(start_paused = true)]
async fn workers_that_do_not_use_the_library_get_the_stop_signal() {
    let mut c = config(1);
    c.stop_signal = Signal::SIGQUIT;
    let mut h = start(c);
    let p = h.spawned().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    h.command(crate::watcher::event::Command::Stop { timeout: None });
    let (pid, sig, _) = h.signal().await;
    assert_eq!((pid, sig), (p.pid, Signal::SIGQUIT));
}

#[tokio::test(start_paused = true)]
async fn watchdog_trigger_kills_the_worker() {
    let mut h = start(notify_config());
    let p = h.spawned().await;
    p.notify("READY=1");
    p.notify("WATCHDOG=trigger");
    let (pid, sig, _) = h.signal().await;
    assert_eq!((pid, sig), (p.pid, Signal::SIGKILL));
}
