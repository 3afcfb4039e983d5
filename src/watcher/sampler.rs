//! Per-worker figures sampled once a second and kept for a few minutes:
//! CPU use (from the CPU time read now and a second ago), resident memory,
//! and the job counters. `cluster status` reads the latest sample instead of
//! waiting for a fresh CPU measurement, and the dashboard draws the history
//! as sparklines and charts.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::event::{Command, CommandSender};
use super::procfs;
use super::recycle;
use super::status::JobsStatus;

/// How often the sampler samples.
pub(crate) const EVERY: Duration = Duration::from_secs(1);

/// How many samples each history keeps (at one a second: 5 minutes).
const KEEP: usize = 300;

/// One worker's latest figures and their history.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct WorkerSeries {
    pub slot: u32,
    pub pid: u32,
    /// CPU use over the last interval, in percent of one core.
    pub cpu_percent: Option<f64>,
    pub rss_bytes: Option<u64>,
    /// Oldest first, one a second.
    pub cpu_history: VecDeque<f64>,
    pub rss_history: VecDeque<u64>,
    #[serde(skip)]
    last_cpu: Option<(Instant, Duration)>,
}

/// Jobs done and failed per minute, oldest first.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct JobRates {
    pub done_per_minute: VecDeque<u64>,
    pub failed_per_minute: VecDeque<u64>,
    #[serde(skip)]
    minute_start: Option<(Instant, u64, u64)>,
}

/// What the sampler knows.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Samples {
    /// By pid.
    pub workers: HashMap<u32, WorkerSeries>,
    pub jobs: Option<JobRates>,
}

/// The shared samples, and the task that takes them.
#[derive(Clone)]
pub(crate) struct Sampler {
    samples: Arc<RwLock<Samples>>,
    task: Arc<JoinHandle<()>>,
}

impl Drop for Sampler {
    fn drop(&mut self) {
        if Arc::strong_count(&self.task) == 1 {
            self.task.abort();
        }
    }
}

impl Sampler {
    /// Starts sampling the workers the supervisor reports; with
    /// `max_memory`, a ready worker whose RSS passes it is recycled.
    pub(crate) fn start(commands: CommandSender, max_memory: Option<u64>) -> Sampler {
        let samples = Arc::new(RwLock::new(Samples::default()));
        let shared = samples.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (tx, rx) = oneshot::channel();
                if commands.send(Command::Status(tx)).is_err() {
                    return;
                }
                let Ok(report) = rx.await else { return };
                let (jtx, jrx) = oneshot::channel();
                let jobs = match commands.send(Command::JobsStatus {
                    reply: jtx,
                    counts: false,
                }) {
                    Ok(()) => jrx.await.ok(),
                    Err(_) => None,
                };
                let pids: Vec<(u32, u32)> =
                    report.workers.iter().map(|w| (w.pid, w.slot)).collect();
                if let Ok(mut s) = shared.write() {
                    sample(&mut s, &pids, jobs.as_ref(), Instant::now());
                    if let Some(limit) = max_memory {
                        let rss = |pid| s.workers.get(&pid).and_then(|w| w.rss_bytes);
                        recycle::over_memory(limit, &report.workers, rss, &commands);
                    }
                }
            }
        });
        Sampler {
            samples,
            task: Arc::new(task),
        }
    }

    /// The latest samples.
    pub(crate) fn read(&self) -> Samples {
        self.samples.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// The latest CPU use of `pid`.
    pub(crate) fn cpu_percent(&self, pid: u32) -> Option<f64> {
        self.samples
            .read()
            .ok()?
            .workers
            .get(&pid)
            .and_then(|w| w.cpu_percent)
    }
}

fn push<T>(q: &mut VecDeque<T>, v: T) {
    if q.len() >= KEEP {
        q.pop_front();
    }
    q.push_back(v);
}

/// Takes one sample of `pids` (pid, slot) at `now`.
fn sample(s: &mut Samples, pids: &[(u32, u32)], jobs: Option<&JobsStatus>, now: Instant) {
    s.workers
        .retain(|pid, _| pids.iter().any(|(p, _)| p == pid));
    for &(pid, slot) in pids {
        let w = s.workers.entry(pid).or_insert_with(|| WorkerSeries {
            slot,
            pid,
            ..WorkerSeries::default()
        });
        let cpu = procfs::cpu_time(pid);
        if let (Some((then, before)), Some(now_cpu)) = (w.last_cpu, cpu) {
            let wall = now.duration_since(then).as_secs_f64();
            if wall > 0.0 {
                let used = now_cpu.saturating_sub(before).as_secs_f64();
                let pct = (used / wall * 1000.0).round() / 10.0;
                w.cpu_percent = Some(pct);
                push(&mut w.cpu_history, pct);
            }
        }
        w.last_cpu = cpu.map(|c| (now, c));
        w.rss_bytes = procfs::rss_bytes(pid);
        if let Some(rss) = w.rss_bytes {
            push(&mut w.rss_history, rss);
        }
    }
    if let Some(j) = jobs {
        let rates = s.jobs.get_or_insert_with(JobRates::default);
        let failed = j.failed;
        match rates.minute_start {
            None => rates.minute_start = Some((now, j.done, failed)),
            Some((start, done0, failed0))
                if now.duration_since(start) >= Duration::from_secs(60) =>
            {
                push(&mut rates.done_per_minute, j.done.saturating_sub(done0));
                push(&mut rates.failed_per_minute, failed.saturating_sub(failed0));
                rates.minute_start = Some((now, j.done, failed));
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_bounded_history_and_forgets_gone_workers() {
        let mut s = Samples::default();
        let me = std::process::id();
        let t0 = Instant::now();
        for i in 0..(KEEP as u64 + 10) {
            sample(&mut s, &[(me, 1)], None, t0 + Duration::from_secs(i));
        }
        let w = &s.workers[&me];
        assert_eq!(w.cpu_history.len(), KEEP);
        assert!(w.rss_bytes.is_some() && w.cpu_percent.is_some());
        sample(&mut s, &[], None, t0 + Duration::from_secs(1000));
        assert!(s.workers.is_empty());
    }

    #[test]
    fn job_rates_are_per_minute() {
        let mut s = Samples::default();
        let t0 = Instant::now();
        let mut j = JobsStatus::default();
        sample(&mut s, &[], Some(&j), t0);
        j.done = 120;
        j.failed = 3;
        sample(&mut s, &[], Some(&j), t0 + Duration::from_secs(61));
        let r = s.jobs.as_ref().unwrap();
        assert_eq!(r.done_per_minute, [120]);
        assert_eq!(r.failed_per_minute, [3]);
    }
}
