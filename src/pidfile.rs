//! The watcher's pid file: written atomically, locked while the watcher
//! runs, replaced when stale, removed on exit, and safe in a directory that
//! other users can write to (such as `/tmp`).
//!
//! Protocol: open (creating) the file at the path and take an exclusive
//! `flock` without blocking. If another process holds it, refuse. After
//! locking, check that the locked inode is still the one at the path (a
//! concurrent watcher may have renamed a new file over it) and retry if not.
//! Then write the pid into a temporary file in the same directory, lock that
//! file too, and rename it over the path: readers never see a partial pid,
//! and the file at the path is locked for as long as we live.
//!
//! Every step works relative to a descriptor of the directory (`openat`,
//! `renameat`, `unlinkat`), never follows a symbolic link at the pid file's
//! name (`O_NOFOLLOW`; a path that is a link is refused), and creates the
//! temporary file under an unpredictable name with `O_EXCL`, so a local
//! user who plants links there cannot make the watcher write elsewhere.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{openat, renameat, Flock, FlockArg, OFlag};
use nix::sys::stat::{fstat, fstatat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

use crate::error::{Error, Kind, Result};

/// A held pid file; removed when dropped.
#[derive(Debug)]
pub(crate) struct PidFile {
    dir: OwnedFd,
    name: PathBuf,
    /// Lock on the file now at `path` (the renamed temporary file).
    lock: Option<Flock<File>>,
    /// The pid a stale file held: a previous watcher that died without
    /// cleaning up (what it left running may still be around).
    previous: Option<u32>,
}

/// Whether `file` is the file at `name` in `dir` (not following links).
fn same_file(dir: &OwnedFd, name: &Path, file: &File) -> bool {
    match (
        fstat(file.as_fd()),
        fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW),
    ) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
        _ => false,
    }
}

/// An unpredictable suffix for the temporary file's name.
pub(crate) fn random_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS's random source.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

impl PidFile {
    /// Acquires `path` and writes this process's pid into it.
    pub(crate) fn acquire(path: &Path) -> Result<PidFile> {
        let shown = path.display().to_string();
        let err = |what: &str, e: io::Error| {
            Error::with_io(Kind::PidFile, format!("cannot {what} pid file {shown}"), e)
        };
        let name = path
            .file_name()
            .map(PathBuf::from)
            .ok_or_else(|| err("use", io::Error::from(io::ErrorKind::InvalidInput)))?;
        let dir_path = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let dir = nix::fcntl::open(
            dir_path,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| err("create", e.into()))?;
        if let Ok(st) = fstatat(
            &dir,
            name.as_path(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                return Err(Error::new(
                    Kind::PidFile,
                    format!("pid file {shown} is a symbolic link; refusing to follow it"),
                ));
            }
        }
        // 1. Lock whatever is at the path now, verifying it stays there.
        let (_old_lock, previous) = loop {
            let fd = openat(
                &dir,
                name.as_path(),
                OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o644),
            )
            .map_err(|e| err("create", e.into()))?;
            let mut file = File::from(fd);
            let mut content = String::new();
            let _ = file.read_to_string(&mut content);
            let locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(l) => l,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    let holder = content.trim();
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
            if same_file(&dir, &name, &locked) {
                let previous = content
                    .trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|&p| p != std::process::id());
                break (locked, previous);
            }
        };
        // 2. Write the new content beside it, lock it, rename it into place.
        let tmp = PathBuf::from(format!(
            ".{}.{:016x}.tmp",
            name.to_string_lossy(),
            random_suffix()
        ));
        let fd = openat(
            &dir,
            tmp.as_path(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .map_err(|e| err("write", e.into()))?;
        let mut file = File::from(fd);
        let result = (|| {
            writeln!(file, "{}", std::process::id())?;
            file.sync_all()?;
            let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| io::Error::from(e))?;
            renameat(&dir, tmp.as_path(), &dir, name.as_path())?;
            Ok::<_, io::Error>(lock)
        })();
        match result {
            Ok(lock) => Ok(PidFile {
                dir,
                name,
                lock: Some(lock),
                previous,
            }),
            Err(e) => {
                let _ = unlinkat(&dir, tmp.as_path(), UnlinkatFlags::NoRemoveDir);
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
            if same_file(&self.dir, &self.name, &lock) {
                let _ = unlinkat(&self.dir, self.name.as_path(), UnlinkatFlags::NoRemoveDir);
            }
            drop(lock);
        }
    }
}

/// Reads the pid recorded in `path`, if the file holds one.
#[cfg(test)]
pub(crate) fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

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
    fn a_symlink_at_the_path_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious");
        fs::write(&target, "keep me").unwrap();
        let path = dir.path().join("x.pid");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let err = PidFile::acquire(&path).unwrap_err();
        assert!(
            err.is_pid_file() && err.to_string().contains("symbolic link"),
            "{err}"
        );
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep me");
        // A dangling link is refused too, and creates nothing.
        let dangling = dir.path().join("y.pid");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert!(PidFile::acquire(&dangling).is_err());
        assert!(!dir.path().join("nowhere").exists());
    }

    #[test]
    fn planted_temporary_names_do_not_redirect_the_write() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious");
        fs::write(&target, "keep me").unwrap();
        // The old, predictable temporary name, planted as a link.
        let planted = dir
            .path()
            .join(format!(".x.pid.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&target, &planted).unwrap();
        let path = dir.path().join("x.pid");
        let held = PidFile::acquire(&path).unwrap();
        assert_eq!(read_pid(&path), Some(std::process::id() as i32));
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep me");
        drop(held);
        assert!(!path.exists());
    }

    #[test]
    fn the_previous_pid_of_a_stale_file_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pid");
        fs::write(&path, "4242\n").unwrap();
        let held = PidFile::acquire(&path).unwrap();
        assert_eq!(held.previous(), Some(4242));
    }

    #[test]
    fn missing_directory_is_an_error() {
        let err = PidFile::acquire(Path::new("/nonexistent-dir-for-cluster/x.pid")).unwrap_err();
        assert!(err.is_pid_file() && !err.is_pid_file_locked(), "{err}");
    }
}
