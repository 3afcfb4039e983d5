//! A library watcher that broadcasts a message to its workers and collects
//! a reply from every one of them.
//!
//! Run with:
//!
//! ```text
//! cargo run --example messages            # 3 workers
//! cargo run --example messages -- 5       # 5 workers
//! ```
//!
//! The same binary is both sides: started by the user it is the watcher
//! (`ClusterWatcher`), which spawns itself as the workers; a worker
//! (`Cluster::is_worker()`) answers each `Ask` with a `Reply`.

use std::collections::BTreeMap;
use std::time::Duration;

use cluster::{Cluster, ClusterWatcher};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
enum Ask {
    WhoAreYou { round: u32 },
}

#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    round: u32,
    slot: u32,
    pid: u32,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), cluster::Error> {
    if Cluster::is_worker() {
        return worker().await;
    }
    let workers: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let exe = std::env::current_exe().map_err(|e| {
        eprintln!("messages: cannot find my own executable: {e}");
        std::process::exit(1)
    })?;
    let watcher = ClusterWatcher::builder(std::process::Command::new(exe))
        .workers(workers)
        .build()?;
    watcher.start().await?;

    // Workers subscribe when they start: ask again until every one answered.
    let mut replies = BTreeMap::new();
    let mut messages = watcher.messages();
    let mut round = 0;
    while replies.len() < workers {
        round += 1;
        watcher.broadcast(&Ask::WhoAreYou { round })?;
        let window = tokio::time::sleep(Duration::from_millis(500));
        tokio::pin!(window);
        loop {
            tokio::select! {
                Some(message) = messages.next() => {
                    let reply: Reply = message.decode()?;
                    if reply.round == round {
                        replies.insert(reply.slot, reply.pid);
                    }
                }
                _ = &mut window => break,
            }
        }
    }
    for (slot, pid) in &replies {
        println!("worker {slot} (pid {pid}) answered");
    }
    watcher.stop(Duration::from_secs(5)).await
}

async fn worker() -> Result<(), cluster::Error> {
    let channel = Cluster::channel::<Ask>()?;
    let replies = Cluster::channel::<Reply>()?;
    Cluster::ready();
    let slot = Cluster::slot().unwrap_or(0);
    let termination = Cluster::await_termination();
    tokio::pin!(termination);
    loop {
        tokio::select! {
            ask = channel.recv() => {
                let Ask::WhoAreYou { round } = ask?;
                replies.send(&Reply { round, slot, pid: std::process::id() })?;
            }
            _ = &mut termination => return Ok(()),
        }
    }
}
