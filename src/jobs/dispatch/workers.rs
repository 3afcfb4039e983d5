//! The workers that run jobs and calls, as the dispatcher sees them: their
//! handlers, their capacity, and the tickets they run (stored jobs and
//! in-memory calls alike: one ticket space, one capacity count).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::ipc::codec::encode;
use crate::ipc::message::{JobOrder, ToWorker, MAX_MESSAGE};
use crate::ipc::parts::split;
#[cfg(test)]
use crate::ipc::parts::PART;
use crate::watcher::event::{Outbound, OutboundSender};

/// A worker that runs jobs.
pub(super) struct Worker {
    pub slot: u32,
    pub pid: u32,
    pub pool: usize,
    pub outbound: OutboundSender,
    /// Cleared when the worker is asked to stop: it gets nothing more.
    pub accepting: Arc<AtomicBool>,
    pub handlers: HashSet<String>,
    pub concurrency: usize,
    /// The tickets it runs (jobs and calls).
    pub running: HashSet<u64>,
}

/// Why an order did not reach a worker.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SendFailure {
    /// The worker's writer is gone (it is exiting); the order, given
    /// back, may go to another worker.
    Gone(Box<JobOrder>),
    /// The order does not fit in one protocol message even without its
    /// arguments (they would go in parts): its encoded size without them.
    TooLarge(usize),
}

impl Worker {
    /// How many more tickets it takes now (0 once it is stopping).
    pub fn free(&self) -> usize {
        if self.accepting.load(Ordering::Relaxed) {
            self.concurrency.saturating_sub(self.running.len())
        } else {
            0
        }
    }

    /// Queues `order` for the worker, its arguments in parts when they do
    /// not fit in the `Job` message (see `ipc/parts.rs`: then every byte of
    /// them goes in `JobPart`s and the `Job` carries none). An order that
    /// does not fit even without its arguments (huge names) is refused
    /// here, before any part is sent and before the writer task would fail
    /// on it (and stop writing to that worker).
    pub fn send_order(&self, mut order: JobOrder) -> Result<(), SendFailure> {
        // Strings encode as a varint length and their bytes: an order whose
        // strings leave this much room fits without encoding it twice.
        let names = order.name.len() + order.queue.len() + order.pool.len() + order.node.len();
        if names + ROOM > MAX_MESSAGE {
            let bare = ToWorker::Job(Box::new(JobOrder {
                args: String::new(),
                ..order.clone()
            }));
            if let Err(crate::ipc::codec::EncodeError::TooLarge { len, .. }) = encode(&bare) {
                return Err(SendFailure::TooLarge(len));
            }
        }
        if names + order.args.len() + ROOM > MAX_MESSAGE {
            let args = std::mem::take(&mut order.args);
            for part in split(&args) {
                let msg = ToWorker::JobPart {
                    ticket: order.ticket,
                    part: part.to_string(),
                };
                if self.outbound.send(Outbound::msg(msg)).is_err() {
                    self.accepting.store(false, Ordering::Relaxed);
                    order.args = args;
                    return Err(SendFailure::Gone(Box::new(order)));
                }
            }
        }
        let msg = ToWorker::Job(Box::new(order));
        self.outbound.send(Outbound::msg(msg)).map_err(|back| {
            self.accepting.store(false, Ordering::Relaxed);
            match back.msg {
                ToWorker::Job(order) => SendFailure::Gone(order),
                _ => unreachable!("the message sent was a job order"),
            }
        })
    }
}

/// Room in a `Job` message for everything but its strings' bytes.
const ROOM: usize = 128;

/// The worker with the handler `name` and room for one more ticket that
/// runs the fewest now (ties: the lowest slot, so the choice is stable).
pub(super) fn least_loaded(workers: &HashMap<u64, Worker>, name: &str) -> Option<u64> {
    workers
        .iter()
        .filter(|(_, w)| w.free() > 0 && w.handlers.contains(name))
        .min_by_key(|(_, w)| (w.running.len(), w.slot))
        .map(|(&ctx, _)| ctx)
}

/// Whether some worker, serving or stopping, has the handler `name`.
pub(super) fn known(workers: &HashMap<u64, Worker>, name: &str) -> bool {
    workers.values().any(|w| w.handlers.contains(name))
}

/// Every handler name with how many workers that take work have it.
pub(super) fn handlers(workers: &HashMap<u64, Worker>) -> Vec<(String, usize)> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for w in workers.values() {
        let serving = w.accepting.load(Ordering::Relaxed);
        for h in &w.handlers {
            *counts.entry(h.as_str()).or_default() += usize::from(serving);
        }
    }
    let mut out: Vec<(String, usize)> = counts
        .into_iter()
        .map(|(name, n)| (name.to_string(), n))
        .collect();
    out.sort();
    out
}

/// A worker for unit tests, with its writer's receiving end (what the
/// dispatcher sent it).
#[cfg(test)]
pub(super) fn test_worker(
    slot: u32,
    handlers: &[&str],
    concurrency: usize,
    running: &[u64],
) -> (Worker, crate::watcher::event::OutboundReceiver) {
    let (outbound, rx) = crate::watcher::event::outbound();
    let worker = Worker {
        slot,
        pid: 100 + slot,
        pool: 0,
        outbound,
        accepting: Arc::new(AtomicBool::new(true)),
        handlers: handlers.iter().map(|s| s.to_string()).collect(),
        concurrency,
        running: running.iter().copied().collect(),
    };
    (worker, rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(slot: u32, handlers: &[&str], concurrency: usize, running: &[u64]) -> Worker {
        let (w, rx) = test_worker(slot, handlers, concurrency, running);
        std::mem::forget(rx);
        w
    }

    #[test]
    fn the_least_loaded_worker_with_the_handler_and_room_is_chosen() {
        let mut ws = HashMap::new();
        ws.insert(1, worker(1, &["a"], 4, &[1, 2]));
        ws.insert(2, worker(2, &["a"], 4, &[3]));
        ws.insert(3, worker(3, &["b"], 4, &[]));
        ws.insert(4, worker(4, &["a"], 1, &[4]));
        assert_eq!(least_loaded(&ws, "a"), Some(2));
        assert_eq!(least_loaded(&ws, "b"), Some(3));
        assert_eq!(least_loaded(&ws, "c"), None);
        ws.get(&2)
            .unwrap()
            .accepting
            .store(false, Ordering::Relaxed);
        assert_eq!(
            least_loaded(&ws, "a"),
            Some(1),
            "a stopping worker gets nothing"
        );
        assert!(known(&ws, "a") && !known(&ws, "c"));
        assert_eq!(
            handlers(&ws),
            vec![("a".to_string(), 2), ("b".to_string(), 1)]
        );
    }

    #[test]
    fn large_arguments_go_in_parts_and_an_order_still_too_large_is_refused() {
        let (w, mut rx) = test_worker(1, &["a"], 1, &[]);
        let order = |args: String| JobOrder {
            ticket: 1,
            job: None,
            name: "a".into(),
            args,
            queue: String::new(),
            pool: String::new(),
            node: String::new(),
        };
        // Sends `o` and gives back the messages it took and the arguments
        // they carried together.
        let mut sent = |o: JobOrder| -> (usize, String) {
            assert_eq!(w.send_order(o), Ok(()));
            let mut joined = String::new();
            let mut messages = 0;
            while let Some(out) = rx.try_recv() {
                messages += 1;
                assert!(
                    crate::ipc::codec::encode(&out.msg).is_ok(),
                    "each fits one message"
                );
                match out.msg {
                    ToWorker::JobPart { part, .. } => joined.push_str(&part),
                    ToWorker::Job(o) => joined.push_str(&o.args),
                    other => panic!("{other:?}"),
                }
            }
            (messages, joined)
        };
        assert_eq!(sent(order("1".into())), (1, "1".into()));
        let args = "y".repeat(3 * PART);
        assert_eq!(sent(order(args.clone())), (4, args), "3 parts, a bare job");
        // Small arguments beside long names go in a part too.
        let mut long = order("[1]".into());
        long.name = "n".repeat(MAX_MESSAGE - 100);
        assert_eq!(sent(long), (2, "[1]".into()));
        let mut big = order("1".into());
        big.name = "n".repeat(MAX_MESSAGE);
        assert!(matches!(w.send_order(big), Err(SendFailure::TooLarge(_))));
        assert!(rx.try_recv().is_none(), "nothing was sent for it");
    }
}
