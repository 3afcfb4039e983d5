//! Prometheus text exposition (format 0.0.4) of a [`Snapshot`], served on
//! `GET /metrics` by `--metrics ADDR` and by the dashboard (`--http`), both
//! through [`super::http`].
//!
//! The supervisor owns the counters; for each scrape the server asks it
//! for a [`Snapshot`] (a command on its queue, answered at once), then
//! [`render`] reads each worker's memory and CPU time from `/proc` and
//! writes the text.

use std::fmt::Write as _;
use std::time::Duration;

use super::procfs;
use super::status::{Snapshot, WorkerState};

/// The exposition text for `s`, with each worker's memory and CPU time
/// read from `/proc` now (a worker that exited meanwhile is left out).
pub(crate) fn render(s: &Snapshot) -> String {
    let mut out = String::with_capacity(2048);
    fn family(out: &mut String, name: &str, kind: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    }

    family(
        &mut out,
        "cluster_workers",
        "gauge",
        "Worker processes by state.",
    );
    for state in [
        WorkerState::Starting,
        WorkerState::Ready,
        WorkerState::Stopping,
    ] {
        let n = s.workers.iter().filter(|w| w.2 == state).count();
        let _ = writeln!(out, "cluster_workers{{state=\"{state}\"}} {n}");
    }

    family(
        &mut out,
        "cluster_worker_restarts_total",
        "counter",
        "Workers started for a slot after its first one (respawns and rolling restarts).",
    );
    for (slot, restarts, _) in &s.slots {
        let _ = writeln!(
            out,
            "cluster_worker_restarts_total{{slot=\"{slot}\"}} {restarts}"
        );
    }
    family(
        &mut out,
        "cluster_worker_crashes_total",
        "counter",
        "Serving workers of a slot that exited without being asked to stop.",
    );
    for (slot, _, crashes) in &s.slots {
        let _ = writeln!(
            out,
            "cluster_worker_crashes_total{{slot=\"{slot}\"}} {crashes}"
        );
    }

    family(
        &mut out,
        "cluster_reloads_total",
        "counter",
        "Rolling restarts by result.",
    );
    let _ = writeln!(
        out,
        "cluster_reloads_total{{result=\"ok\"}} {}",
        s.reloads_ok
    );
    let _ = writeln!(
        out,
        "cluster_reloads_total{{result=\"failed\"}} {}",
        s.reloads_failed
    );

    family(
        &mut out,
        "cluster_slot_gave_up",
        "gauge",
        "1 for a slot that crashed more than --max-restarts times within --restart-window and is not restarted.",
    );
    for (slot, _, _) in &s.slots {
        let up = u8::from(s.gave_up.contains(slot));
        let _ = writeln!(out, "cluster_slot_gave_up{{slot=\"{slot}\"}} {up}");
    }
    family(
        &mut out,
        "cluster_workers_recycled_total",
        "counter",
        "Workers replaced for --max-requests or --max-memory.",
    );
    let _ = writeln!(out, "cluster_workers_recycled_total {}", s.recycled);

    family(
        &mut out,
        "cluster_log_records_total",
        "counter",
        "Log records and output lines from workers queued for the log stream.",
    );
    let _ = writeln!(out, "cluster_log_records_total {}", s.log_records);
    family(
        &mut out,
        "cluster_log_records_dropped_total",
        "counter",
        "Log records dropped because a queue was full (in a worker or in the watcher).",
    );
    let _ = writeln!(out, "cluster_log_records_dropped_total {}", s.log_dropped);

    family(
        &mut out,
        "cluster_messages_total",
        "counter",
        "User messages between the watcher and workers.",
    );
    let _ = writeln!(
        out,
        "cluster_messages_total{{direction=\"in\"}} {}",
        s.messages_in
    );
    let _ = writeln!(
        out,
        "cluster_messages_total{{direction=\"out\"}} {}",
        s.messages_out
    );

    shared_state(&mut out, s);

    let samples: Vec<(u32, u32, Option<u64>, Option<Duration>)> = s
        .workers
        .iter()
        .map(|&(slot, pid, _)| (slot, pid, procfs::rss_bytes(pid), procfs::cpu_time(pid)))
        .collect();
    family(
        &mut out,
        "cluster_worker_rss_bytes",
        "gauge",
        "Resident memory of a worker process (VmRSS).",
    );
    for (slot, pid, rss, _) in &samples {
        if let Some(rss) = rss {
            let _ = writeln!(
                out,
                "cluster_worker_rss_bytes{{slot=\"{slot}\",pid=\"{pid}\"}} {rss}"
            );
        }
    }
    family(
        &mut out,
        "cluster_worker_cpu_seconds_total",
        "counter",
        "CPU time (user + system) used by a worker process.",
    );
    for (slot, pid, _, cpu) in &samples {
        if let Some(cpu) = cpu {
            let _ = writeln!(
                out,
                "cluster_worker_cpu_seconds_total{{slot=\"{slot}\",pid=\"{pid}\"}} {}",
                cpu.as_secs_f64()
            );
        }
    }
    out
}

/// A label value with `\\`, `"` and newlines escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Names, statuses, commands and the shared storage.
fn shared_state(out: &mut String, s: &Snapshot) {
    fn family(out: &mut String, name: &str, kind: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    }
    family(
        out,
        "cluster_worker_info",
        "gauge",
        "A worker process with its name and the status it reported (always 1).",
    );
    for (slot, pid, name, status, _) in &s.info {
        let _ = writeln!(
            out,
            "cluster_worker_info{{slot=\"{slot}\",pid=\"{pid}\",name=\"{}\",status=\"{}\"}} 1",
            label(name.as_deref().unwrap_or("")),
            label(status.as_deref().unwrap_or(""))
        );
    }
    family(
        out,
        "cluster_worker_commands_total",
        "counter",
        "Commands a worker process sent and received.",
    );
    for (slot, pid, _, _, t) in &s.info {
        for (direction, n) in [("sent", t.commands_sent), ("received", t.commands_received)] {
            let _ = writeln!(
                out,
                "cluster_worker_commands_total{{slot=\"{slot}\",pid=\"{pid}\",direction=\"{direction}\"}} {n}"
            );
        }
    }
    let st = &s.storage;
    for (name, kind, help, value) in [
        (
            "cluster_storage_keys",
            "gauge",
            "Keys in the shared storage.",
            st.keys as f64,
        ),
        (
            "cluster_storage_bytes",
            "gauge",
            "Bytes the shared storage holds, as its limit counts them.",
            st.bytes as f64,
        ),
        (
            "cluster_storage_max_bytes",
            "gauge",
            "The shared storage's byte limit.",
            st.max_bytes as f64,
        ),
        (
            "cluster_storage_operations_total",
            "counter",
            "Shared storage operations.",
            st.ops_total as f64,
        ),
    ] {
        family(out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_help_and_type() {
        let me = std::process::id();
        let s = Snapshot {
            workers: vec![
                (1, me, WorkerState::Ready),
                (2, u32::MAX, WorkerState::Starting),
            ],
            slots: vec![(1, 2, 1), (2, 0, 0)],
            reloads_ok: 3,
            reloads_failed: 1,
            log_records: 10,
            log_dropped: 4,
            messages_in: 5,
            messages_out: 6,
            gave_up: vec![2],
            recycled: 7,
            info: vec![(
                1,
                me,
                Some("web-1".into()),
                Some("say \"hi\"".into()),
                crate::watcher::status::Traffic {
                    commands_sent: 2,
                    ..Default::default()
                },
            )],
            storage: crate::watcher::status::HubStats {
                keys: 3,
                ..Default::default()
            },
        };
        let text = render(&s);
        for line in [
            "cluster_workers{state=\"starting\"} 1",
            "cluster_workers{state=\"ready\"} 1",
            "cluster_workers{state=\"stopping\"} 0",
            "cluster_worker_restarts_total{slot=\"1\"} 2",
            "cluster_worker_crashes_total{slot=\"1\"} 1",
            "cluster_reloads_total{result=\"ok\"} 3",
            "cluster_slot_gave_up{slot=\"1\"} 0",
            "cluster_slot_gave_up{slot=\"2\"} 1",
            "cluster_workers_recycled_total 7",
            "cluster_reloads_total{result=\"failed\"} 1",
            "cluster_log_records_total 10",
            "cluster_log_records_dropped_total 4",
            "cluster_messages_total{direction=\"in\"} 5",
            "cluster_messages_total{direction=\"out\"} 6",
            &format!("cluster_worker_info{{slot=\"1\",pid=\"{me}\",name=\"web-1\",status=\"say \\\"hi\\\"\"}} 1"),
            &format!("cluster_worker_commands_total{{slot=\"1\",pid=\"{me}\",direction=\"sent\"}} 2"),
            "cluster_storage_keys 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(text.contains(&format!(
            "cluster_worker_rss_bytes{{slot=\"1\",pid=\"{me}\"}} "
        )));
        assert!(text.contains(&format!(
            "cluster_worker_cpu_seconds_total{{slot=\"1\",pid=\"{me}\"}} "
        )));
        // A pid that does not exist has no samples.
        assert!(!text.contains(&format!("pid=\"{}\"", u32::MAX)));
        // Every sample line belongs to a family announced before it.
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(typed.contains(name), "{line}");
            }
        }
    }
}
