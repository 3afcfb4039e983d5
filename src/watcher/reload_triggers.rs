//! Pollers that ask the supervisor for a rolling restart: `--watch PATH`
//! (files changed) and `--reload-on-deploy` (the program's path now
//! resolves elsewhere, as after switching a `current` release symlink).
//!
//! Both poll rather than use inotify: a stat walk every 250 ms (watch) or
//! every second (deploy) is cheap for source trees and release links, needs
//! no extra dependency, and works on every filesystem (NFS, overlayfs,
//! bind mounts) where inotify may miss changes.

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

async fn watch_files(paths: Vec<PathBuf>, quiet: Duration, events: CommandSender) {
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
        let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        if events
            .send(Command::Restart {
                reason: format!("{} changed", shown.join(", ")),
                done: None,
            })
            .is_err()
        {
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
