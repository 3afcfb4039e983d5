//! The watcher's pid file: written atomically, locked while the watcher
//! runs, replaced when stale, removed on exit.
//!
//! Protocol: open (creating) the file at the path and take an exclusive
//! `flock` without blocking. If another process holds it, refuse. After
//! locking, check that the locked inode is still the one at the path (a
//! concurrent watcher may have renamed a new file over it) and retry if not.
//! Then write the pid into a temporary file in the same directory, lock that
//! file too, and rename it over the path: readers never see a partial pid,
//! and the file at the path is locked for as long as we live.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Kind, Result};

/// A held pid file; removed when dropped.
#[derive(Debug)]
pub(crate) struct PidFile {
    path: PathBuf,
    /// Lock on the file now at `path` (the renamed temporary file).
    lock: Option<Flock<File>>,
    /// The pid a stale file held: a previous watcher that died without
    /// cleaning up (what it left running may still be around).
    previous: Option<u32>,
}

impl PidFile {
    /// Acquires `path` and writes this process's pid into it.
    pub(crate) fn acquire(path: &Path) -> Result<PidFile> {
        let shown = path.display().to_string();
        let err = |what: &str, e: io::Error| {
            Error::with_io(Kind::PidFile, format!("cannot {what} pid file {shown}"), e)
        };
        // 1. Lock whatever is at the path now, verifying it stays there.
        let _old_lock = loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| err("create", e))?;
            let locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(l) => l,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    let holder = fs::read_to_string(path).unwrap_or_default();
                    let holder = holder.trim();
                    let who = if holder.is_empty() {
                        "another watcher".to_string()
                    } else {
                        format!("another watcher (pid {holder})")
                    };
                    return Err(Error::new(
                        Kind::PidFileLocked,
                        format!("{who} is running with pid file {shown}"),
                    ));
                }
                Err((_, e)) => return Err(err("lock", e.into())),
            };
            let same = match (locked.metadata(), fs::metadata(path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if same {
                break locked;
            }
        };
        let previous = fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|&p| p != std::process::id());
        // 2. Write the new content beside it, lock it, rename it into place.
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| err("write", e))?;
        let result = (|| {
            writeln!(file, "{}", std::process::id())?;
            file.sync_all()?;
            let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| io::Error::from(e))?;
            fs::rename(&tmp, path)?;
            Ok::<_, io::Error>(lock)
        })();
        match result {
            Ok(lock) => Ok(PidFile {
                path: path.to_path_buf(),
                lock: Some(lock),
                previous,
            }),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(err("write", e))
            }
        }
    }

    /// The pid a stale pid file held when it was taken over.
    pub(crate) fn previous(&self) -> Option<u32> {
        self.previous
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Remove the file only if it is still ours (same inode).
        if let Some(lock) = self.lock.take() {
            let ours = match (lock.metadata(), fs::metadata(&self.path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if ours {
                let _ = fs::remove_file(&self.path);
            }
            drop(lock);
        }
    }
}

/// Reads the pid recorded in `path`, if the file holds one.
#[allow(dead_code)]
pub(crate) fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_acquire_is_refused_and_file_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pid");
        let held = PidFile::acquire(&path).unwrap();
        assert_eq!(read_pid(&path), Some(std::process::id() as i32));
        let err = PidFile::acquire(&path).unwrap_err();
        assert!(err.is_pid_file_locked(), "{err}");
        assert!(err.to_string().contains(&std::process::id().to_string()));
        drop(held);
        assert!(!path.exists());
    }

    #[test]
    fn stale_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pid");
        fs::write(&path, "999999\n").unwrap();
        let held = PidFile::acquire(&path).unwrap();
        assert_eq!(read_pid(&path), Some(std::process::id() as i32));
        drop(held);
    }

    #[test]
    fn missing_directory_is_an_error() {
        let err = PidFile::acquire(Path::new("/nonexistent-dir-for-cluster/x.pid")).unwrap_err();
        assert!(err.is_pid_file() && !err.is_pid_file_locked(), "{err}");
    }
}
