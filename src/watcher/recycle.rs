//! Recycling by memory (`--max-memory BYTES`): a task beside the
//! supervisor reads each ready worker's resident memory from `/proc` once
//! a second and asks the supervisor to replace a worker past the limit
//! (`Command::Recycle`), which it does through the rolling-restart path.
//! Recycling by requests (`--max-requests`) is counted in the worker (the
//! crate's `Listener`), which asks itself (`ToWatcher::Recycle`).
//!
//! The task asks for the worker list like `cluster status` does, so
//! `/proc` is read outside the supervisor.

use std::time::Duration;

use tokio::sync::oneshot;

use super::event::{Command, CommandSender};
use super::procfs;
use super::status::WorkerState;

/// How often memory is checked.
pub(crate) const MEMORY_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The running memory check; stops when dropped.
pub(crate) struct MemoryWatch {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MemoryWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MemoryWatch {
    /// Checks every [`MEMORY_CHECK_EVERY`] that no ready worker uses more
    /// than `limit` bytes. Must be called within a tokio runtime.
    pub(crate) fn start(limit: u64, commands: CommandSender) -> MemoryWatch {
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(MEMORY_CHECK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (tx, rx) = oneshot::channel();
                if commands.send(Command::Status(tx)).is_err() {
                    return;
                }
                let Ok(report) = rx.await else { return };
                for w in report.workers {
                    if w.state != WorkerState::Ready {
                        continue;
                    }
                    let Some(rss) = procfs::rss_bytes(w.pid) else {
                        continue;
                    };
                    if rss > limit {
                        let why = format!(
                            "uses {} of memory, more than --max-memory {}",
                            human_bytes(rss),
                            human_bytes(limit)
                        );
                        let _ = commands.send(Command::Recycle {
                            context_id: w.context_id,
                            why,
                        });
                    }
                }
            }
        });
        MemoryWatch { task }
    }
}

/// `123.4 MiB`-style sizes.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Parses a size: `512M`, `1.5G`, `1048576`, `64KiB` (binary units).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (like 512M or 2G)"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("'{s}' is not a size (units: K, M, G, T)")),
    };
    let bytes = value * factor as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("'{s}' is not a usable size"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5G"), Ok(3 << 29));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("64KiB"), Ok(64 << 10));
        for bad in ["", "x", "12Q", "0", "-1M"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }
}
