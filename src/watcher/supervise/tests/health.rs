//! The crash-loop limit, backoff rows and recycling, with fake processes
//! under paused time.

use std::time::Duration;

use tokio::sync::oneshot;

use super::{config, settle, start};
use crate::ipc::message::ToWatcher;
use crate::watcher::event::{Command, Scale};

#[tokio::test(start_paused = true)]
async fn a_slot_that_fails_more_than_max_restarts_within_the_window_gives_up() {
    let mut c = config(2);
    c.max_restarts = Some(3);
    c.restart_window = Duration::from_secs(60);
    c.heartbeat_timeout = None; // the fake workers never answer pings
    let mut h = start(c);
    let mut w = h.spawned_n(2).await;
    w[1].ready();
    settle().await;
    // Slot 1 crashes at start, again and again: 3 respawns, then it gives up.
    let mut last = w.remove(0);
    for _ in 0..3 {
        last.exit(1);
        last = h.spawned().await;
        assert_eq!(last.slot, 1);
    }
    last.exit(1);
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(h.no_spawn(), "no respawn after giving up");
    let (tx, rx) = oneshot::channel();
    h.command(Command::Status(tx));
    let report = rx.await.unwrap();
    assert_eq!(report.ready, 1);
    assert_eq!(report.idle.len(), 1);
    assert!(report.idle[0].gave_up && report.idle[0].next_start.is_none());
    assert_eq!(report.idle[0].last_exit_code, Some(1));
    let (tx, rx) = oneshot::channel();
    h.command(Command::Snapshot(tx));
    assert_eq!(rx.await.unwrap().gave_up, [1]);
    // A rolling restart starts it again.
    let done = h.restart();
    let again = h.spawned().await;
    assert_eq!(again.slot, 1);
    again.ready();
    let other = h.spawned().await;
    other.ready();
    settle().await;
    w[0].exit(0);
    done.await.unwrap().unwrap();
    let (tx, rx) = oneshot::channel();
    h.command(Command::Status(tx));
    let report = rx.await.unwrap();
    assert!(report.idle.is_empty(), "slot 1 serves again");
    assert_eq!(report.ready, 2);
}

#[tokio::test(start_paused = true)]
async fn failures_spread_wider_than_the_window_never_give_up() {
    let mut c = config(1);
    c.max_restarts = Some(2);
    c.restart_window = Duration::from_secs(10);
    c.backoff_reset = Duration::from_secs(1000);
    c.heartbeat_timeout = None;
    let mut h = start(c);
    let mut w = h.spawned().await;
    for _ in 0..6 {
        w.ready();
        tokio::time::sleep(Duration::from_secs(6)).await;
        w.killed(libc::SIGSEGV);
        w = h.spawned().await;
    }
    assert_eq!(w.slot, 1, "still restarted after 6 crashes 6 s apart");
}

#[tokio::test(start_paused = true)]
async fn a_backoff_slot_is_listed_with_its_next_start() {
    let mut h = start(config(2));
    let w = h.spawned_n(2).await;
    w[1].ready();
    settle().await;
    w[0].exit(1);
    settle().await;
    let (tx, rx) = oneshot::channel();
    h.command(Command::Status(tx));
    let report = rx.await.unwrap();
    assert_eq!(report.workers.len(), 1);
    assert_eq!(report.wanted, 2);
    let idle = &report.idle[0];
    assert_eq!((idle.slot, idle.gave_up), (1, false));
    let next = idle.next_start.expect("a next start");
    assert!(
        next > Duration::ZERO && next <= Duration::from_millis(100),
        "{next:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn recycling_replaces_one_worker_through_the_rolling_path() {
    let mut h = start(config(2));
    let mut old = h.spawned_n(2).await;
    for p in &old {
        p.ready();
    }
    settle().await;
    // Worker 2 served its --max-requests.
    old[1].say(ToWatcher::Recycle { requests: 100 });
    let new = h.spawned().await;
    assert_eq!(new.slot, 2);
    settle().await;
    assert!(
        !old[1].got_stop(),
        "the old worker serves until its replacement is ready"
    );
    // Asking again while it is being replaced does nothing more.
    h.command(Command::Recycle {
        context_id: old[1].context_id,
        why: "again".into(),
    });
    settle().await;
    assert!(h.no_spawn());
    new.ready();
    settle().await;
    assert!(old[1].got_stop(), "drains once replaced");
    assert!(!old[0].got_stop(), "slot 1 is left alone");
    old[1].exit(0);
    settle().await;
    assert!(h.no_spawn(), "one replacement, no respawn");
    let (tx, rx) = oneshot::channel();
    h.command(Command::Snapshot(tx));
    let s = rx.await.unwrap();
    assert_eq!(
        (s.recycled, s.reloads_ok),
        (1, 0),
        "a recycle is not a reload"
    );
    // A worker that is not ready (starting) is not recycled.
    h.command(Command::Scale {
        to: Scale::To(3),
        done: None,
    });
    let third = h.spawned().await;
    h.command(Command::Recycle {
        context_id: third.context_id,
        why: "too big".into(),
    });
    settle().await;
    assert!(h.no_spawn());
}
