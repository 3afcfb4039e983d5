//! A worker program for the shared-state tests (not a user example): it
//! registers commands that exercise the storage and the command router,
//! and the tests drive it with `cluster command`.
//!
//! Commands (arguments as JSON):
//!
//! * `cas "KEY"`: compare-and-swap KEY from absent to this worker's slot;
//!   answers whether it won.
//! * `fail`, `panic`: a handler error, a handler panic.
//! * `sleep MS`: answers after MS milliseconds.
//! * `die`: exits (status 9) without answering.
//! * `set_status "TEXT"`: `Cluster::set_status(TEXT)`; while it is
//!   `processing`, the worker does not exit when asked to stop (it is
//!   busy), so the watcher has to kill it after the timeout.
//! * `watch_start "PREFIX"`: watches PREFIX from now on (answers once the
//!   watch runs); `watch_take`: the changes seen so far, as
//!   `[revision, kind, path, value]`.
//! * `increments {"key": K, "n": N}`: N increments of K, 16 at a time.
//! * `flood {"bytes": B, "ms": T}`: writes new keys of B bytes as fast as it
//!   can for T ms, 64 at a time; answers `{ok, full, other}` counts.
//! * `probe N`: N storage reads one after another; answers the slowest in
//!   microseconds.
//! * `call {"to": T, "name": N}`: sends N to T itself; answers
//!   `{"ok": reply}` or `{"error": kind}`.
//! * `whoami`: slot, name and pid.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::{Cluster, Target};
use serde_json::{json, Value};

type Changes = Arc<Mutex<Vec<Value>>>;

/// Set while the status is `processing`: a stop is then ignored.
static BUSY: AtomicBool = AtomicBool::new(false);

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

fn kind(e: &cluster::Error) -> &'static str {
    if e.is_unknown_target() {
        "unknown target"
    } else if e.is_unknown_command() {
        "unknown command"
    } else if e.is_timeout() {
        "timeout"
    } else if e.is_target_died() {
        "target died"
    } else if e.is_handler_error() {
        "handler error"
    } else if e.is_storage_full() {
        "storage full"
    } else {
        "other"
    }
}

async fn run() {
    let changes: Changes = Arc::default();
    let c = Cluster::commands();
    c.register("cas", |key: String| async move {
        let slot = Cluster::slot().unwrap_or(0);
        Cluster::storage()
            .compare_and_swap(&key, None::<&u32>, &slot)
            .await
            .map_err(|e| e.to_string())
    });
    c.register("fail", |_: Value| async {
        Err::<(), _>("deliberate failure")
    });
    c.register("panic", |_: Value| async {
        if std::hint::black_box(true) {
            panic!("deliberate panic");
        }
        Ok::<(), String>(())
    });
    c.register("sleep", |ms: u64| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, String>(ms)
    });
    c.register("die", |_: Value| async {
        std::process::exit(9);
        #[allow(unreachable_code)]
        Ok::<(), String>(())
    });
    c.register("set_status", |text: String| async move {
        BUSY.store(text == "processing", Ordering::SeqCst);
        Cluster::set_status(text).map_err(|e| e.to_string())
    });
    let seen = changes.clone();
    c.register("watch_start", move |prefix: String| {
        let seen = seen.clone();
        async move {
            let mut watch = Cluster::storage()
                .watch(&prefix)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                while let Some(Ok(c)) = watch.next().await {
                    let kind = format!("{:?}", c.kind());
                    let value: Option<Value> = c.value().ok().flatten();
                    seen.lock()
                        .unwrap()
                        .push(json!([c.revision(), kind, c.path(), value]));
                }
            });
            Ok::<_, String>(true)
        }
    });
    let seen = changes.clone();
    c.register("watch_take", move |_: Value| {
        let seen = seen.clone();
        async move { Ok::<_, String>(std::mem::take(&mut *seen.lock().unwrap())) }
    });
    c.register("increments", |a: Value| async move {
        let key = a["key"].as_str().unwrap_or("n").to_string();
        let n = a["n"].as_u64().unwrap_or(1);
        let storage = Cluster::storage();
        let mut tasks = tokio::task::JoinSet::new();
        for lane in 0..16 {
            let (storage, key) = (storage.clone(), key.clone());
            tasks.spawn(async move {
                let mut i = lane;
                while i < n {
                    storage.increment(&key, 1).await?;
                    i += 16;
                }
                Ok::<_, cluster::Error>(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(n)
    });
    c.register("flood", |a: Value| async move {
        let bytes = a["bytes"].as_u64().unwrap_or(1024) as usize;
        let until = Instant::now() + Duration::from_millis(a["ms"].as_u64().unwrap_or(1000));
        let value = "x".repeat(bytes);
        let counts = Arc::new(Mutex::new((0u64, 0u64, 0u64)));
        let mut tasks = tokio::task::JoinSet::new();
        for lane in 0..64u64 {
            let (value, counts) = (value.clone(), counts.clone());
            tasks.spawn(async move {
                let storage = Cluster::storage();
                let mut i = 0u64;
                while Instant::now() < until {
                    let key = format!("flood.k{lane}_{i}");
                    i += 1;
                    let r = storage.set(&key, &value).await;
                    let mut c = counts.lock().unwrap();
                    match r {
                        Ok(_) => c.0 += 1,
                        Err(e) if e.is_storage_full() => c.1 += 1,
                        Err(_) => c.2 += 1,
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let (ok, full, other) = *counts.lock().unwrap();
        Ok::<_, String>(json!({ "ok": ok, "full": full, "other": other }))
    });
    c.register("probe", |n: u64| async move {
        let storage = Cluster::storage();
        let mut slowest = Duration::ZERO;
        for _ in 0..n {
            let t = Instant::now();
            storage
                .get::<Value>("probe")
                .await
                .map_err(|e| e.to_string())?;
            slowest = slowest.max(t.elapsed());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok::<_, String>(slowest.as_micros() as u64)
    });
    c.register("call", |a: Value| async move {
        let to = a["to"].as_str().unwrap_or("watcher").to_string();
        let name = a["name"].as_str().unwrap_or("ping").to_string();
        let timeout = Duration::from_millis(a["timeout_ms"].as_u64().unwrap_or(2000));
        let started = Instant::now();
        let r = Cluster::command(Target::parse(&to), &name, &a["args"])
            .timeout(timeout)
            .await;
        let ms = started.elapsed().as_millis() as u64;
        Ok::<_, String>(match r {
            Ok(reply) => json!({ "ok": reply.decode::<Value>().unwrap_or(Value::Null), "ms": ms }),
            Err(e) => json!({ "error": kind(&e), "message": e.to_string(), "ms": ms }),
        })
    });
    c.register("whoami", |_: Value| async {
        Ok::<_, String>(json!({
            "slot": Cluster::slot(), "name": Cluster::name(), "pid": std::process::id(),
        }))
    });
    Cluster::await_termination().await;
    while BUSY.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
