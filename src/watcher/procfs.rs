//! Per-process figures from `/proc`: resident memory and CPU time.
//!
//! Read outside the supervisor (by the control socket's handler, the
//! metrics responder and `ClusterWatcher::workers`), one small file each,
//! so a status request never stalls worker supervision.

use std::sync::OnceLock;
use std::time::Duration;

/// Resident set size of `pid` in bytes (`VmRSS` of `/proc/PID/status`);
/// `None` when the process is gone (or is a zombie, which has no `VmRSS`).
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_rss(&status)
}

fn parse_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    // The kernel always reports kB (KiB).
    match parts.next() {
        Some("kB") | None => Some(value * 1024),
        Some(_) => None,
    }
}

/// CPU time `pid` has used so far, user plus system (`utime + stime` of
/// `/proc/PID/stat`); `None` when the process is gone.
pub(crate) fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_cpu_ticks(&stat)?;
    let hz = clock_ticks();
    Some(Duration::from_secs(ticks / hz) + Duration::from_nanos((ticks % hz) * 1_000_000_000 / hz))
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces or
    // ')': the fields after the last ')' start with field 3 (state).
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?; // field 14
    let stime: u64 = fields.next()?.parse().ok()?; // field 15
    Some(utime + stime)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
fn clock_ticks() -> u64 {
    static HZ: OnceLock<u64> = OnceLock::new();
    *HZ.get_or_init(
        || match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
            Ok(Some(n)) if n > 0 => n as u64,
            _ => 100,
        },
    )
}

/// Descriptors this process has open (entries of `/proc/self/fd`).
pub(crate) fn open_fds() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

/// The soft limit on this process's open descriptors (`RLIMIT_NOFILE`).
pub(crate) fn fd_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// Descriptors this process may still open before it reaches its limit.
pub(crate) fn fd_headroom() -> Option<u64> {
    Some(fd_limit()?.saturating_sub(open_fds()? as u64))
}

/// CPU use of each pid in percent of one core, measured over `window`:
/// CPU time is read, then read again after `window`. `None` for a pid that
/// exited meanwhile.
pub(crate) async fn cpu_percent(pids: &[u32], window: Duration) -> Vec<Option<f64>> {
    let before: Vec<Option<Duration>> = pids.iter().map(|&p| cpu_time(p)).collect();
    let started = std::time::Instant::now();
    tokio::time::sleep(window).await;
    let elapsed = started.elapsed().as_secs_f64();
    pids.iter()
        .zip(before)
        .map(|(&pid, before)| {
            let (before, after) = (before?, cpu_time(pid)?);
            let used = after.saturating_sub(before).as_secs_f64();
            Some((used / elapsed * 1000.0).round() / 10.0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let stat =
            "1234 (a b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 5 1000 200";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn parses_vmrss() {
        let status = "Name:\tx\nVmPeak:\t 100 kB\nVmRSS:\t    2048 kB\nThreads:\t1\n";
        assert_eq!(parse_rss(status), Some(2048 * 1024));
        assert_eq!(parse_rss("Name:\tzombie\n"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_bytes(me).unwrap() > 0);
        assert!(cpu_time(me).is_some());
        assert_eq!(rss_bytes(u32::MAX), None);
    }
}
