//! Recycling by memory (`--max-memory BYTES`): the sampler, which reads
//! each worker's resident memory from `/proc` once a second anyway, asks
//! the supervisor to replace a ready worker past the limit
//! (`Command::Recycle`), which it does through the rolling-restart path.
//! Recycling by requests (`--max-requests`) is counted in the worker (the
//! crate's `Listener`), which asks itself (`ToWatcher::Recycle`).

use super::event::{Command, CommandSender};
use super::status::{WorkerInfo, WorkerState};

/// Asks for the replacement of every ready worker in `workers` whose
/// resident memory (`rss` of its pid) is above `limit` bytes.
pub(crate) fn over_memory(
    limit: u64,
    workers: &[WorkerInfo],
    rss: impl Fn(u32) -> Option<u64>,
    commands: &CommandSender,
) {
    for w in workers.iter().filter(|w| w.state == WorkerState::Ready) {
        let Some(used) = rss(w.pid).filter(|&b| b > limit) else {
            continue;
        };
        let why = format!(
            "uses {} of memory, more than --max-memory {}",
            human_bytes(used),
            human_bytes(limit)
        );
        let _ = commands.send(Command::Recycle {
            context_id: w.context_id,
            why,
        });
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
