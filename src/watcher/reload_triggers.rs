//! Pollers that ask the supervisor for a rolling restart: `--watch PATH`
//! (files changed) and `--reload-on-deploy` (the program's path now
//! resolves elsewhere, as after switching a `current` release symlink).
//!
//! `--watch` listens for changes with inotify (the `notify` crate), so a
//! large tree costs nothing while nothing changes; where inotify cannot
//! watch a path (no inotify, the watch limit reached, some network file
//! systems) it falls back to a stat walk every 250 ms. Either way a change
//! is debounced: the restart starts once the paths stayed quiet for the
//! debounce time. The deploy trigger polls (one `canonicalize` a second):
//! inotify does not report a symlink switched above the watched path.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;

use super::config::Config;
use super::event::{Command, CommandSender};

/// Running pollers; aborted on drop.
pub(crate) struct Pollers(Vec<JoinHandle<()>>);

impl Drop for Pollers {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Starts the triggers `config` asks for; each asks `commands` for a restart.
pub(crate) fn start(config: &Config, events: CommandSender) -> Pollers {
    let mut tasks = Vec::new();
    if !config.watch.is_empty() {
        let paths = config.watch.clone();
        let quiet = config.watch_debounce;
        let events = events.clone();
        tasks.push(tokio::spawn(watch_files(paths, quiet, events)));
    }
    if config.reload_on_deploy {
        let program = match &config.current_dir {
            Some(dir) => dir.join(&config.program),
            None => PathBuf::from(&config.program),
        };
        tasks.push(tokio::spawn(watch_deploy(program, events)));
    }
    Pollers(tasks)
}

/// A cheap summary of a tree: changes when a file is added, removed,
/// renamed, resized or modified.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Fingerprint {
    files: u64,
    bytes: u64,
    newest: Option<SystemTime>,
    names: u64,
}

fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    let mut fp = Fingerprint::default();
    for path in paths {
        walk(path, &mut fp, 0);
    }
    fp
}

fn walk(path: &Path, fp: &mut Fingerprint, depth: usize) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    fp.files += 1;
    fp.bytes = fp.bytes.wrapping_add(meta.len());
    // A cheap order-independent hash of the names, so renames count.
    fp.names = fp
        .names
        .wrapping_add(hash(path.as_os_str().as_encoded_bytes()));
    if let Ok(m) = meta.modified() {
        fp.newest = fp.newest.max(Some(m));
    }
    if meta.is_dir() && depth < 32 {
        if let Ok(entries) = std::fs::read_dir(path) {
            for entry in entries.flatten() {
                walk(&entry.path(), fp, depth + 1);
            }
        }
    }
}

fn hash(bytes: &[u8]) -> u64 {
    // FNV-1a
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Asks for a restart once per burst of changes under `paths`.
async fn watch_files(paths: Vec<PathBuf>, quiet: Duration, events: CommandSender) {
    match inotify(&paths) {
        Ok((watcher, rx)) => {
            tracing::debug!("--watch: inotify on {} path(s)", paths.len());
            notified(watcher, rx, &paths, quiet, events).await
        }
        Err(e) => {
            tracing::info!("--watch: cannot use inotify ({e}); polling every 250 ms instead");
            poll_files(paths, quiet, events).await
        }
    }
}

/// An inotify watcher on `paths` (recursive) and the channel it reports on.
fn inotify(
    paths: &[PathBuf],
) -> notify::Result<(
    notify::RecommendedWatcher,
    tokio::sync::mpsc::UnboundedReceiver<()>,
)> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let watched: Vec<PathBuf> = paths.to_vec();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reads and opens are not changes; errors (an overflowed queue)
        // might hide one, so they count. A watched file's directory
        // reports its siblings too: only the file's own events count.
        let change = match event {
            Ok(e) => {
                !matches!(e.kind, EventKind::Access(_))
                    && (e.paths.is_empty()
                        || e.paths
                            .iter()
                            .any(|p| watched.iter().any(|w| p.starts_with(w))))
            }
            Err(_) => true,
        };
        if change {
            let _ = tx.send(());
        }
    })?;
    for path in paths {
        // A file is watched through its directory, so a build or an
        // editor that replaces it (a new inode under the same name) is
        // still seen.
        match path.parent().filter(|_| path.is_file()) {
            Some(dir) => {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                watcher.watch(dir, RecursiveMode::NonRecursive)?
            }
            None => watcher.watch(path, RecursiveMode::Recursive)?,
        }
    }
    Ok((watcher, rx))
}

async fn notified(
    watcher: notify::RecommendedWatcher,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<()>,
    paths: &[PathBuf],
    quiet: Duration,
    events: CommandSender,
) {
    // Dropping the watcher ends the notifications.
    let _watcher = watcher;
    while rx.recv().await.is_some() {
        // Debounce: wait until nothing changed for `quiet`.
        while let Ok(Some(())) = tokio::time::timeout(quiet, rx.recv()).await {}
        if !restart(paths, &events) {
            return;
        }
    }
}

/// Sends the restart for a change under `paths`; `false` once the
/// supervisor is gone.
fn restart(paths: &[PathBuf], events: &CommandSender) -> bool {
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    events
        .send(Command::Restart {
            reason: format!("{} changed", shown.join(", ")),
            done: None,
        })
        .is_ok()
}

async fn poll_files(paths: Vec<PathBuf>, quiet: Duration, events: CommandSender) {
    let tick = Duration::from_millis(250).min(quiet.max(Duration::from_millis(20)));
    let scan = |paths: Vec<PathBuf>| async move {
        tokio::task::spawn_blocking(move || fingerprint(&paths))
            .await
            .unwrap_or_default()
    };
    let mut seen = scan(paths.clone()).await;
    loop {
        tokio::time::sleep(tick).await;
        let now = scan(paths.clone()).await;
        if now == seen {
            continue;
        }
        // Changed: wait until it stays the same for `quiet` (debounce).
        let mut last = now;
        loop {
            tokio::time::sleep(quiet).await;
            let again = scan(paths.clone()).await;
            if again == last {
                break;
            }
            last = again;
        }
        seen = last;
        if !restart(&paths, &events) {
            return;
        }
    }
}

async fn watch_deploy(program: PathBuf, events: CommandSender) {
    let resolve = |p: PathBuf| async move {
        tokio::task::spawn_blocking(move || std::fs::canonicalize(&p).ok())
            .await
            .ok()
            .flatten()
    };
    let mut target = resolve(program.clone()).await;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = resolve(program.clone()).await;
        // A missing target mid-switch is ignored until it resolves again.
        if now.is_some() && now != target {
            let shown = now
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            target = now;
            if events
                .send(Command::Restart {
                    reason: format!("{} now points to {shown}", program.display()),
                    done: None,
                })
                .is_err()
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn inotify_reports_a_change_once_per_burst() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let paths = vec![dir.path().to_path_buf()];
        let (watcher, changes) = inotify(&paths).expect("inotify works here");
        let task = tokio::spawn(async move {
            notified(watcher, changes, &paths, Duration::from_millis(100), tx).await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        for i in 0..5 {
            std::fs::write(dir.path().join(format!("f{i}")), "x").unwrap();
        }
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert!(matches!(first, Ok(Some(Command::Restart { .. }))));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(rx.try_recv().is_err(), "one restart for the burst");
        task.abort();
    }

    #[tokio::test]
    async fn a_watched_file_replaced_by_a_rename_is_still_watched() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("server");
        std::fs::write(&file, "v1").unwrap();
        std::fs::write(dir.path().join("sibling"), "x").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let paths = vec![file.clone()];
        let (watcher, changes) = inotify(&paths).unwrap();
        let task = tokio::spawn(async move {
            notified(watcher, changes, &paths, Duration::from_millis(50), tx).await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::fs::write(dir.path().join("sibling"), "y").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(rx.try_recv().is_err(), "a sibling's change is not ours");
        for v in ["v2", "v3"] {
            let tmp = dir.path().join("server.tmp");
            std::fs::write(&tmp, v).unwrap();
            std::fs::rename(&tmp, &file).unwrap();
            let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
            assert!(matches!(got, Ok(Some(Command::Restart { .. }))), "{v}");
        }
        task.abort();
    }

    #[test]
    fn fingerprint_sees_edits_additions_and_renames() {
        let dir = tempfile::tempdir().unwrap();
        let paths = vec![dir.path().to_path_buf()];
        std::fs::write(dir.path().join("a"), "1").unwrap();
        let a = fingerprint(&paths);
        std::fs::write(dir.path().join("a"), "12").unwrap();
        let b = fingerprint(&paths);
        assert_ne!(a, b);
        std::fs::write(dir.path().join("b"), "").unwrap();
        let c = fingerprint(&paths);
        assert_ne!(b, c);
        std::fs::rename(dir.path().join("b"), dir.path().join("c")).unwrap();
        assert_ne!(c, fingerprint(&paths));
    }
}
