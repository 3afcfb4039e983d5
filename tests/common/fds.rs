//! Descriptor-leak tests: one test at a time per test binary, a fresh
//! runtime per test, and the process's open descriptors to compare.

use std::future::Future;
use std::sync::{Mutex, MutexGuard};

static SERIAL: Mutex<()> = Mutex::new(());

/// Holds the binary's one lock (descriptor counts are per process).
pub fn serial() -> MutexGuard<'static, ()> {
    let guard = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // The first tokio runtime of a process opens descriptors it keeps for
    // good (the signal driver's global pipe): open them before any count.
    static WARM_UP: std::sync::Once = std::sync::Once::new();
    WARM_UP.call_once(|| {
        drop(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        )
    });
    guard
}

/// Runs `test` on a fresh current-thread runtime, holding the lock from
/// before the runtime opens its descriptors until after it closed them.
pub fn run<F: Future>(test: F) -> F::Output {
    let _serial = serial();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(test)
}

/// Open descriptors of this process, as "number -> target" lines (the
/// target names the leak when a comparison fails), without the one that
/// reads /proc/self/fd.
pub fn open_fds() -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                target.display()
            )
        })
        .filter(|f| !f.contains("/fd"))
        .collect();
    fds.sort();
    fds
}
