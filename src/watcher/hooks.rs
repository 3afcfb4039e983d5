//! `--on-event CMD`: a program the watcher runs for each lifecycle event
//! (a worker crashed, a slot gave up after `--max-restarts`, a worker was
//! recycled, a rolling restart failed, the watcher started or is
//! stopping), what component-server's cron check did when it mailed the
//! operator about a restarted daemon.
//!
//! The supervisor never waits for it: events go through a bounded queue
//! to one task that runs the commands one at a time (`sh -c CMD`, the
//! event as JSON on stdin and in `CLUSTER_EVENT_JSON`, its name in
//! `CLUSTER_EVENT`), each for at most [`HOOK_TIMEOUT`]; a full queue drops
//! the event with a warning.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::process::{spawn_registered, unregister};

/// Events that may wait for the hook before new ones are dropped.
const HOOK_QUEUE: usize = 64;

/// How long one run of the hook may take before it is killed.
pub(crate) const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the supervisor sends events; does nothing without `--on-event`.
#[derive(Default)]
pub(crate) struct Hooks {
    tx: Option<mpsc::Sender<serde_json::Value>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Hooks {
    /// Starts the runner for `command`, if there is one. Must be called
    /// within a tokio runtime.
    pub(crate) fn start(command: Option<&str>) -> Hooks {
        let Some(command) = command.map(str::to_string) else {
            return Hooks::default();
        };
        let (tx, mut rx) = mpsc::channel::<serde_json::Value>(HOOK_QUEUE);
        let task = tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                run(&command, &event).await;
            }
        });
        Hooks {
            tx: Some(tx),
            task: Some(task),
        }
    }

    /// Queues `event` (`"event"` names it) for the hook; never blocks.
    pub(crate) fn emit(&self, name: &str, mut fields: serde_json::Map<String, serde_json::Value>) {
        let Some(tx) = &self.tx else { return };
        fields.insert("event".into(), name.into());
        fields.insert("watcher_pid".into(), std::process::id().into());
        fields.insert(
            "ts".into(),
            {
                let mut ts = String::new();
                crate::log::format_timestamp(crate::log::now_nanos(), &mut ts);
                ts
            }
            .into(),
        );
        if tx.try_send(serde_json::Value::Object(fields)).is_err() {
            tracing::warn!("--on-event: event {name} dropped (the hook is too slow)");
        }
    }

    /// Waits (at most `timeout`) until the queued events have run: at stop.
    pub(crate) async fn finish(&mut self, timeout: Duration) {
        self.tx = None;
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(timeout, task).await;
        }
    }
}

/// Runs the hook once for `event`.
async fn run(command: &str, event: &serde_json::Value) {
    let name = event
        .get("event")
        .and_then(|e| e.as_str())
        .unwrap_or("")
        .to_string();
    let json = event.to_string();
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .env("CLUSTER_EVENT", &name)
        .env("CLUSTER_EVENT_JSON", &json)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let (mut child, pid) = match spawn_registered(&mut cmd) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("--on-event: cannot run '{command}': {e}");
            return;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let mut line = json.into_bytes();
        line.push(b'\n');
        // A hook that does not read stdin is fine.
        let _ = tokio::time::timeout(HOOK_TIMEOUT, stdin.write_all(&line)).await;
    }
    match tokio::time::timeout(HOOK_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => tracing::warn!("--on-event for {name}: the hook {status}"),
        Ok(Err(e)) => tracing::warn!("--on-event for {name}: {e}"),
        Err(_) => {
            tracing::warn!("--on-event for {name}: the hook ran past {HOOK_TIMEOUT:?}; killed");
            let _ = child.kill().await;
        }
    }
    unregister(pid);
}

/// Builds the fields of an event: `fields!("slot" => 1, "why" => "...")`.
macro_rules! event_fields {
    ($($k:expr => $v:expr),* $(,)?) => {{
        #[allow(unused_mut)]
        let mut m = serde_json::Map::new();
        $( m.insert($k.to_string(), serde_json::json!($v)); )*
        m
    }};
}
pub(crate) use event_fields;
