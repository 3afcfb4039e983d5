//! The supervisor with fake processes under paused time: backoff, rolling
//! restart order, readiness timeouts, heartbeat, scaling and stop, each in
//! milliseconds of real time. The integration tests in `tests/` run the
//! same paths with real processes. `notify.rs`: workers that speak
//! `sd_notify` (`--notify`).

mod notify;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Channels, Supervisor};
use crate::error::Result;
use crate::ipc::message::{ToWatcher, ToWorker, VERSION};
use crate::log::LogFilter;
use crate::watcher::config::Config;
use crate::watcher::event::{
    outbound, Command, CommandSender, Event, EventSender, OutboundReceiver, Outcome, Scale,
};
use crate::watcher::notify::NotifyState;
use crate::watcher::output::{LogFormat, LogOutput};
use crate::watcher::process::{Launcher, Spawned, WorkerId};

/// A spawned fake worker, as the test sees it.
struct Proc {
    slot: u32,
    context_id: u64,
    pid: u32,
    at: Instant,
    events: EventSender,
    outbound: OutboundReceiver,
    /// Its notify socket's state (`config.notify`).
    notify: Option<Arc<NotifyState>>,
}

impl Proc {
    /// Says `message` on its notify socket, as the reader task passes it on.
    fn notify(&self, message: &str) {
        let state = self.notify.as_ref().expect("started with notify");
        if state.apply(message.as_bytes()) && state.wake() {
            let _ = self.events.send(Event::Notify {
                context_id: self.context_id,
            });
        }
    }

    fn say(&self, msg: ToWatcher) {
        let _ = self.events.send(Event::Message {
            context_id: self.context_id,
            msg,
            fds: Vec::new(),
        });
    }

    /// Says hello and ready, as a library worker does.
    fn ready(&self) {
        self.say(ToWatcher::Hello {
            version: VERSION,
            pid: self.pid,
        });
        self.say(ToWatcher::Ready);
    }

    fn exit(&self, code: i32) {
        let _ = self.events.send(Event::Exited {
            context_id: self.context_id,
            status: Some(ExitStatus::from_raw(code << 8)),
        });
    }

    /// Messages the supervisor sent it so far (without waiting).
    fn received(&mut self) -> Vec<ToWorker> {
        let mut out = Vec::new();
        while let Some(o) = self.outbound.try_recv() {
            self.outbound.written(o.fds.len(), o.weight);
            out.push(o.msg);
        }
        out
    }

    fn got_stop(&mut self) -> bool {
        self.received()
            .iter()
            .any(|m| matches!(m, ToWorker::Stop { .. }))
    }
}

#[derive(Default)]
struct FakeState {
    next_pid: u32,
    /// pid -> (context id, events) of processes still "alive".
    alive: HashMap<u32, (u64, EventSender)>,
    /// Processes exit when they get SIGTERM.
    exit_on_term: bool,
    /// The next spawns fail.
    fail_spawns: u32,
}

#[derive(Clone)]
struct Fake {
    state: Arc<Mutex<FakeState>>,
    spawns: mpsc::UnboundedSender<Proc>,
    signals: mpsc::UnboundedSender<(u32, Signal, Instant)>,
}

impl Launcher for Fake {
    fn spawn(
        &self,
        config: &Config,
        id: WorkerId,
        _listen_fds: Vec<OwnedFd>,
        events: &EventSender,
    ) -> Result<Spawned> {
        let WorkerId { slot, context_id } = id;
        let mut state = self.state.lock().unwrap();
        if state.fail_spawns > 0 {
            state.fail_spawns -= 1;
            return Err(crate::error::Error::new(
                crate::error::Kind::Spawn,
                "fake spawn failure",
            ));
        }
        state.next_pid += 1;
        let pid = 1000 + state.next_pid;
        state.alive.insert(pid, (context_id, events.clone()));
        let (tx, rx) = outbound();
        let notify = config.notify.then(|| Arc::new(NotifyState::default()));
        let _ = self.spawns.send(Proc {
            slot,
            context_id,
            pid,
            at: Instant::now(),
            events: events.clone(),
            outbound: rx,
            notify: notify.clone(),
        });
        Ok(Spawned {
            pid,
            outbound: tx,
            notify,
        })
    }

    fn signal(&self, pid: u32, sig: Signal) {
        let _ = self.signals.send((pid, sig, Instant::now()));
        let mut state = self.state.lock().unwrap();
        let exits = sig == Signal::SIGKILL || (sig == Signal::SIGTERM && state.exit_on_term);
        if exits {
            if let Some((context_id, events)) = state.alive.remove(&pid) {
                let status = if sig == Signal::SIGKILL {
                    ExitStatus::from_raw(libc::SIGKILL)
                } else {
                    ExitStatus::from_raw(0)
                };
                let _ = events.send(Event::Exited {
                    context_id,
                    status: Some(status),
                });
            }
        }
    }
}

struct Harness {
    fake: Fake,
    spawns: mpsc::UnboundedReceiver<Proc>,
    signals: mpsc::UnboundedReceiver<(u32, Signal, Instant)>,
    commands: CommandSender,
    ready: watch::Receiver<bool>,
    run: JoinHandle<Outcome>,
}

fn config(workers: usize) -> Config {
    let mut c = Config::new(&std::process::Command::new("fake-worker"));
    c.workers = workers;
    c.systemd = false;
    c.output = LogOutput::to_writer(
        Box::new(std::io::sink()),
        LogFormat::Text,
        LogFilter::default(),
    );
    c
}

fn start(config: Config) -> Harness {
    let (spawns_tx, spawns) = mpsc::unbounded_channel();
    let (signals_tx, signals) = mpsc::unbounded_channel();
    let fake = Fake {
        state: Arc::default(),
        spawns: spawns_tx,
        signals: signals_tx,
    };
    let (commands_tx, commands) = mpsc::unbounded_channel();
    let (ready_tx, ready) = watch::channel(false);
    let (messages, _) = mpsc::channel(16);
    let supervisor = Supervisor::new(
        config,
        Box::new(fake.clone()),
        Channels {
            commands,
            commands_tx: commands_tx.clone(),
            messages,
            ready: ready_tx,
        },
        crate::watcher::hub::Hub::new(Default::default()),
    );
    let (started, _) = oneshot::channel();
    let run = tokio::spawn(supervisor.run(started));
    Harness {
        fake,
        spawns,
        signals,
        commands: commands_tx,
        ready,
        run,
    }
}

impl Harness {
    async fn spawned(&mut self) -> Proc {
        tokio::time::timeout(Duration::from_secs(3600), self.spawns.recv())
            .await
            .expect("a spawn within the hour")
            .expect("spawn channel open")
    }

    async fn spawned_n(&mut self, n: usize) -> Vec<Proc> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(self.spawned().await);
        }
        v
    }

    async fn signal(&mut self) -> (u32, Signal, Instant) {
        tokio::time::timeout(Duration::from_secs(3600), self.signals.recv())
            .await
            .expect("a signal within the hour")
            .expect("signal channel open")
    }

    fn no_spawn(&mut self) -> bool {
        self.spawns.try_recv().is_err()
    }

    fn command(&self, cmd: Command) {
        self.commands.send(cmd).expect("supervisor running");
    }

    fn restart(&self) -> oneshot::Receiver<Result<()>> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Restart {
            reason: "test".into(),
            done: Some(tx),
        });
        rx
    }

    async fn status(&self) -> Vec<(u32, u32, String)> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Status(tx));
        rx.await
            .unwrap()
            .workers
            .into_iter()
            .map(|w| (w.slot, w.pid, w.state.to_string()))
            .collect()
    }
}

/// Lets the supervisor handle everything sent so far.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[tokio::test(start_paused = true)]
async fn crashing_worker_backs_off_doubling_from_100ms() {
    let mut h = start(config(1));
    let first = h.spawned().await;
    let mut last = first.at;
    first.exit(1);
    let mut gaps = Vec::new();
    for _ in 0..5 {
        let p = h.spawned().await;
        gaps.push(p.at.duration_since(last));
        last = p.at;
        p.exit(1);
    }
    let ms: Vec<u128> = gaps.iter().map(|g| g.as_millis()).collect();
    assert_eq!(ms, [100, 200, 400, 800, 1600]);
}

#[tokio::test(start_paused = true)]
async fn backoff_resets_after_a_worker_stayed_up() {
    let mut c = config(1);
    c.backoff_reset = Duration::from_secs(30);
    let mut h = start(c);
    h.spawned().await.exit(1);
    h.spawned().await.exit(1); // 100 ms later
    let third = h.spawned().await; // 200 ms later
    tokio::time::sleep(Duration::from_secs(31)).await;
    third.exit(1);
    let fourth = h.spawned().await;
    assert_eq!(
        fourth.at.duration_since(third.at + Duration::from_secs(31)),
        Duration::from_millis(100),
        "back to the first delay"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_spawn_is_retried_with_backoff() {
    let mut h = start(config(2));
    let _ = h.spawned().await;
    let second = h.spawned().await;
    second.ready();
    settle().await;
    h.fake.state.lock().unwrap().fail_spawns = 1;
    // Slot 2's worker dies; its respawn fails once (after 100 ms), then
    // works (200 ms later).
    let died = Instant::now();
    second.exit(1);
    let again = h.spawned().await;
    assert_eq!(again.slot, 2);
    assert_eq!(again.at.duration_since(died), Duration::from_millis(300));
}

#[tokio::test(start_paused = true)]
async fn rolling_restart_replaces_one_slot_at_a_time_after_readiness() {
    let mut h = start(config(3));
    let mut old = h.spawned_n(3).await;
    for p in &old {
        p.ready();
    }
    settle().await;
    assert!(*h.ready.borrow(), "every worker ready");
    let done = h.restart();
    for slot in 1..=3u32 {
        let new = h.spawned().await;
        assert_eq!(new.slot, slot, "slots in order");
        settle().await;
        assert!(h.no_spawn(), "one replacement at a time");
        let i = slot as usize - 1;
        assert!(
            !old[i].got_stop(),
            "old worker {slot} serves until the replacement is ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        new.ready();
        settle().await;
        assert!(old[i].got_stop(), "old worker {slot} drains once replaced");
        old[i].exit(0);
    }
    done.await.unwrap().unwrap();
    settle().await; // the last exit is handled
    let states: Vec<String> = h.status().await.into_iter().map(|s| s.2).collect();
    assert_eq!(states, ["ready", "ready", "ready"]);
}

#[tokio::test(start_paused = true)]
async fn replacement_not_ready_in_time_is_killed_and_the_old_worker_keeps_serving() {
    let mut c = config(2);
    c.ready_timeout = Duration::from_secs(5);
    let mut h = start(c);
    let mut old = h.spawned_n(2).await;
    for p in &old {
        p.ready();
    }
    settle().await;
    let started = Instant::now();
    let done = h.restart();
    let stuck = h.spawned().await;
    stuck.say(ToWatcher::Hello {
        version: VERSION,
        pid: stuck.pid,
    });
    let (pid, sig, at) = h.signal().await;
    assert_eq!((pid, sig), (stuck.pid, Signal::SIGKILL));
    assert_eq!(at.duration_since(started), Duration::from_secs(5));
    let err = done.await.unwrap().unwrap_err();
    assert!(err.is_reload(), "{err}");
    settle().await;
    assert!(h.no_spawn(), "the reload stops at the first failure");
    assert!(!old[0].got_stop() && !old[1].got_stop());
    let pids: Vec<u32> = h.status().await.into_iter().map(|s| s.1).collect();
    assert_eq!(pids, [old[0].pid, old[1].pid]);
}

#[tokio::test(start_paused = true)]
async fn a_reload_asked_for_during_a_reload_is_queued_and_merged() {
    let mut h = start(config(1));
    let first = h.spawned().await;
    first.ready();
    settle().await;
    let a = h.restart();
    let b = h.restart();
    let c = h.restart();
    let r1 = h.spawned().await;
    r1.ready();
    settle().await;
    first.exit(0);
    // The two queued requests are one more reload.
    let r2 = h.spawned().await;
    r2.ready();
    settle().await;
    r1.exit(0);
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    c.await.unwrap().unwrap();
    settle().await;
    assert!(h.no_spawn(), "exactly two reloads");
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_stops_answering_pings_is_killed_and_replaced() {
    let mut c = config(1);
    c.heartbeat_timeout = Some(Duration::from_secs(2));
    let mut h = start(c);
    let mut w = h.spawned().await;
    w.ready();
    settle().await;
    let since = Instant::now();
    // Answer pings for a while, then go silent.
    let mut answered = 0;
    while since.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for m in w.received() {
            if let ToWorker::Ping { seq } = m {
                w.say(ToWatcher::Pong { seq });
                answered += 1;
            }
        }
    }
    assert!(answered >= 8, "pinged every 500 ms: {answered}");
    let silent = Instant::now();
    let (pid, sig, at) = h.signal().await;
    assert_eq!((pid, sig), (w.pid, Signal::SIGKILL));
    let waited = at.duration_since(silent);
    assert!(
        waited > Duration::from_millis(1500) && waited <= Duration::from_millis(2600),
        "killed {waited:?} after the last pong"
    );
    let next = h.spawned().await;
    assert_eq!(next.slot, 1);
}

#[tokio::test(start_paused = true)]
async fn a_program_that_never_says_hello_is_ready_after_a_second() {
    let mut h = start(config(1));
    let w = h.spawned().await;
    tokio::time::sleep(Duration::from_millis(999)).await;
    assert!(!*h.ready.borrow());
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert!(*h.ready.borrow());
    assert_eq!(h.status().await, [(1, w.pid, "ready".to_string())]);
}

#[tokio::test(start_paused = true)]
async fn scaling_up_starts_slots_and_down_stops_the_highest() {
    let mut h = start(config(1));
    let one = h.spawned().await;
    one.ready();
    let (tx, rx) = oneshot::channel();
    h.command(Command::Scale {
        to: Scale::To(3),
        done: Some(tx),
    });
    assert_eq!(rx.await.unwrap().unwrap(), 3);
    let mut added = h.spawned_n(2).await;
    assert_eq!((added[0].slot, added[1].slot), (2, 3));
    for p in &added {
        p.ready();
    }
    let (tx, rx) = oneshot::channel();
    h.command(Command::Scale {
        to: Scale::Down,
        done: Some(tx),
    });
    assert_eq!(rx.await.unwrap().unwrap(), 2);
    assert!(added[1].got_stop(), "slot 3 stops");
    assert!(!added[0].got_stop());
    added[1].exit(0);
    settle().await;
    assert!(h.no_spawn(), "a retired slot is not respawned");
    for bad in [Scale::To(0), Scale::To(5000)] {
        let (tx, rx) = oneshot::channel();
        h.command(Command::Scale {
            to: bad,
            done: Some(tx),
        });
        assert!(rx.await.unwrap().unwrap_err().is_config());
    }
}

#[tokio::test(start_paused = true)]
async fn stop_escalates_from_message_to_sigterm_to_sigkill() {
    let mut h = start(config(1));
    let mut w = h.spawned().await;
    w.ready();
    settle().await;
    let asked = Instant::now();
    h.command(Command::Stop {
        timeout: Some(Duration::from_secs(4)),
    });
    settle().await;
    assert!(w.got_stop(), "in-band stop first");
    let (pid, sig, at) = h.signal().await;
    assert_eq!((pid, sig), (w.pid, Signal::SIGTERM));
    assert_eq!(at.duration_since(asked), Duration::from_secs(1), "reminder");
    let (pid, sig, at) = h.signal().await;
    assert_eq!((pid, sig), (w.pid, Signal::SIGKILL));
    assert_eq!(at.duration_since(asked), Duration::from_secs(4));
    let outcome = h.run.await.unwrap();
    assert!(matches!(outcome, Outcome::Stopped));
}

#[tokio::test(start_paused = true)]
async fn requests_while_stopping_are_refused_with_is_closed() {
    let mut h = start(config(1));
    let w = h.spawned().await;
    w.ready();
    settle().await;
    h.fake.state.lock().unwrap().exit_on_term = false;
    h.command(Command::Stop { timeout: None });
    let done = h.restart();
    assert!(done.await.unwrap().unwrap_err().is_closed());
    let (tx, rx) = oneshot::channel();
    h.command(Command::Scale {
        to: Scale::Up,
        done: Some(tx),
    });
    assert!(rx.await.unwrap().unwrap_err().is_closed());
    w.exit(0);
    assert!(matches!(h.run.await.unwrap(), Outcome::Stopped));
}

impl Proc {
    fn killed(&self, sig: i32) {
        let _ = self.events.send(Event::Exited {
            context_id: self.context_id,
            status: Some(ExitStatus::from_raw(sig)),
        });
    }
}

#[tokio::test(start_paused = true)]
async fn a_ready_worker_killed_from_outside_is_replaced_at_once() {
    let mut h = start(config(1));
    let w = h.spawned().await;
    w.ready();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = Instant::now();
    w.killed(libc::SIGKILL);
    let next = h.spawned().await;
    assert_eq!(next.at.duration_since(killed), Duration::ZERO);
    // Killed again right after it became ready: at most one start per
    // 100 ms for the slot.
    next.ready();
    settle().await;
    next.killed(libc::SIGKILL);
    let third = h.spawned().await;
    assert_eq!(
        third.at.duration_since(next.at),
        super::slots::MIN_RESPAWN_INTERVAL
    );
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_crashes_soon_after_start_still_backs_off() {
    let mut h = start(config(2));
    let mut w = h.spawned_n(2).await;
    for p in &w {
        p.ready();
    }
    settle().await;
    // Slot 1 keeps crashing on its own (SIGSEGV) right after it is ready:
    // a crash loop, not a kill, so its delays double.
    let mut last = w.remove(0);
    let mut gaps = Vec::new();
    for _ in 0..4 {
        let died = Instant::now();
        last.killed(libc::SIGSEGV);
        let next = h.spawned().await;
        assert_eq!(next.slot, 1);
        gaps.push(next.at.duration_since(died).as_millis());
        next.ready();
        settle().await;
        last = next;
    }
    assert_eq!(gaps, [100, 200, 400, 800]);
}

#[tokio::test(start_paused = true)]
async fn killing_a_random_ready_worker_every_200ms_never_empties_the_cluster() {
    let mut c = config(4);
    c.respawn_delay = Duration::from_millis(100);
    let mut h = start(c);
    let mut alive: Vec<Proc> = h.spawned_n(4).await;
    for p in &alive {
        p.ready();
    }
    settle().await;
    let mut seed = 12345u64;
    let mut worst = Duration::ZERO;
    for _ in 0..100 {
        // Replacements say hello and become ready within a few ms.
        while let Ok(p) = h.spawns.try_recv() {
            p.ready();
            alive.push(p);
        }
        settle().await;
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let victim = alive.remove((seed >> 33) as usize % alive.len());
        let killed = Instant::now();
        victim.killed(libc::SIGKILL);
        let replacement = h.spawned().await;
        worst = worst.max(replacement.at.duration_since(killed));
        replacement.ready();
        alive.push(replacement);
        let live = h.status().await.len();
        assert!(live >= 3, "{live} workers after a kill");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        worst <= super::slots::MIN_RESPAWN_INTERVAL,
        "worst replacement delay {worst:?}"
    );
}

mod health;
