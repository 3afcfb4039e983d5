//! The starting side of the dispatcher: claims from the store for the
//! queues that can use more, and claimed jobs handed to free capacity
//! (a persistent worker with the handler, or a new process per job).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{Dispatcher, On, Running, TICK};
use crate::ipc::message::JobOrder;
use crate::jobs::dispatch::pools::assign;
use crate::jobs::dispatch::runner;
use crate::jobs::dispatch::workers::SendFailure;
use crate::jobs::dispatch::JobsEvent;
use crate::jobs::store::{ClaimRequest, Outcome};
use crate::jobs::Job;

/// Most jobs claimed in one statement.
const MAX_CLAIM: usize = 1000;

impl Dispatcher {
    /// Free capacity per pool.
    pub(super) fn free(&self) -> Vec<usize> {
        let mut free = vec![0usize; self.jobs.pools.len()];
        if self.jobs.per_job {
            for (i, p) in self.jobs.pools.iter().enumerate() {
                free[i] = (p.slots as usize).saturating_sub(self.processes[i]);
            }
        } else {
            for w in self.workers.values() {
                free[w.pool] += w.free();
            }
        }
        free
    }

    /// Hands buffered jobs to free capacity, by the pool rule.
    pub(super) fn dispatch(&mut self) {
        let waiting: HashMap<String, usize> = self
            .buffers
            .iter()
            .map(|(q, b)| (q.clone(), b.len()))
            .collect();
        if waiting.values().all(|&n| n == 0) {
            return;
        }
        let free = self.free();
        for (pool, queue, n) in assign(&self.jobs.pools, &free, &waiting, &self.claiming) {
            for _ in 0..n {
                let Some(job) = self.buffers.get_mut(&queue).and_then(|b| b.pop_front()) else {
                    break;
                };
                self.start(job, pool);
            }
        }
    }

    /// Starts `job` in `pool`.
    pub(super) fn start(&mut self, job: Job, pool: usize) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let deadline = self.jobs.timeout.map(|t| Instant::now() + t);
        let pool_name = self.jobs.pools[pool].name.clone();
        if self.jobs.per_job {
            let events = self.events.clone();
            let spawned = runner::spawn(
                &self.watcher,
                &job,
                &pool_name,
                &self.node,
                ticket,
                move |d| {
                    let _ = events.send(JobsEvent::ProcessDone(d));
                },
            );
            match spawned {
                Ok(pid) => {
                    self.processes[pool] += 1;
                    self.running.insert(
                        ticket,
                        Running {
                            job,
                            pool,
                            on: On::Process(pid),
                            deadline,
                            kill_at: None,
                            ending: None,
                        },
                    );
                }
                Err(e) => {
                    let r = Running {
                        job,
                        pool,
                        on: On::Process(0),
                        deadline: None,
                        kill_at: None,
                        ending: None,
                    };
                    self.record(&r, None, Outcome::Failed(e.to_string()));
                }
            }
            return;
        }
        let handler = job.name.clone().unwrap_or_else(|| job.queue.clone());
        let worker = self
            .workers
            .iter_mut()
            .filter(|(_, w)| w.pool == pool && w.free() > 0)
            .find(|(_, w)| w.handlers.contains(&handler));
        let Some((&ctx, w)) = worker else {
            let why = format!("no worker of pool {pool_name} has a handler named {handler:?}");
            self.fail_unstarted(job, pool, why);
            return;
        };
        let order = JobOrder {
            ticket,
            job: Some((job.id.get(), job.attempt)),
            name: handler,
            args: job.args.to_string(),
            queue: job.queue.clone(),
            pool: pool_name,
            node: self.node.clone(),
        };
        match w.send_order(order) {
            Ok(()) => {}
            Err(SendFailure::Gone(_)) => {
                // Its writer is gone: it is exiting. The job waits for another.
                self.buffers
                    .entry(job.queue.clone())
                    .or_default()
                    .push_front(job);
                return;
            }
            Err(SendFailure::TooLarge(len)) => {
                let why = format!(
                    "its names (handler, queue, pool, node) make a message of {len} bytes, more than the {} one message takes",
                    crate::ipc::message::MAX_MESSAGE
                );
                self.fail_unstarted(job, pool, why);
                return;
            }
        }
        w.running.insert(ticket);
        self.running.insert(
            ticket,
            Running {
                job,
                pool,
                on: On::Worker(ctx),
                deadline,
                kill_at: None,
                ending: None,
            },
        );
    }

    /// Records that `job` failed without reaching a worker.
    pub(super) fn fail_unstarted(&mut self, job: Job, pool: usize, why: String) {
        let r = Running {
            job,
            pool,
            on: On::Worker(u64::MAX),
            deadline: None,
            kill_at: None,
            ending: None,
        };
        self.record(&r, None, Outcome::Failed(why));
    }

    /// Starts a claim for every queue that can use more: what its pools
    /// could start now plus the prefetch, less what waits already.
    pub(super) async fn claim(&mut self) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let free = self.free();
        for queue in self.jobs.queues() {
            if self.dry.contains(&queue) || self.claiming.contains(&queue) {
                continue;
            }
            let takers: Vec<usize> = (0..self.jobs.pools.len())
                .filter(|&i| self.jobs.pools[i].queues.contains(&queue))
                .collect();
            let want: usize = takers.iter().map(|&i| free[i]).sum::<usize>() + self.jobs.prefetch;
            let have = self.buffers.get(&queue).map(|b| b.len()).unwrap_or(0);
            let limit = want.saturating_sub(have).min(MAX_CLAIM);
            if limit == 0 {
                continue;
            }
            let owner = takers
                .iter()
                .find(|&&i| self.jobs.pools[i].name == queue)
                .or(takers.first())
                .map(|&i| self.jobs.pools[i].name.clone())
                .unwrap_or_else(|| queue.clone());
            let req = ClaimRequest {
                pool: owner,
                queues: vec![queue.clone()],
                limit,
                node: self.node.clone(),
                safe_mode: self.jobs.safe_mode,
            };
            self.claiming.insert(queue.clone());
            let (store, events) = (store.clone(), self.events.clone());
            tokio::spawn(async move {
                let result = store.claim(req).await;
                let _ = events.send(JobsEvent::Claimed {
                    queue,
                    limit,
                    result,
                });
            });
        }
        // Dry queues may hold retries that fall due later: wake for them.
        if self.due_at.is_none() && !self.dry.is_empty() {
            let dry: Vec<String> = self.dry.iter().cloned().collect();
            if let Ok(Some(at)) = store.next_due(&dry).await {
                let wait = at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                self.due_at = Some(Instant::now() + wait.min(TICK));
            }
        }
    }
}
