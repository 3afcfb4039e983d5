//! The store on disk: `--storage-init FILE.json` (a JSON object to start
//! from) and `--storage-file F` (snapshots written atomically, reloaded at
//! start).
//!
//! A snapshot is one JSON object: `{"format": 1, "revision": N,
//! "expires": {"path": unix-ms, ...}, "data": {...}}`. It is written to a
//! new temporary file beside `F` (`O_EXCL`, unpredictable name), synced,
//! renamed over `F`, and the directory synced, so `F` is always either
//! the old snapshot or the new one, never a mix.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use super::store::Store;
use crate::error::{Error, Kind, Result};

/// The snapshot format this build writes and reads.
const FORMAT: u32 = 1;

#[derive(Deserialize)]
struct Snapshot {
    format: u32,
    #[serde(default)]
    revision: u64,
    #[serde(default)]
    expires: std::collections::BTreeMap<String, u64>,
    data: serde_json::Value,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The text of a snapshot of `store` taken at `now`.
pub(crate) fn snapshot(store: &Store, now: Instant) -> Result<String> {
    let (data, revision) = store
        .get("")
        .ok()
        .flatten()
        .unwrap_or_else(|| ("{}".into(), 0));
    let wall = unix_ms(SystemTime::now());
    let expires: serde_json::Map<String, serde_json::Value> = store
        .expiries()
        .map(|(p, at)| {
            let left = at.saturating_duration_since(now).as_millis() as u64;
            (p.to_string(), (wall + left).into())
        })
        .collect();
    let expires = serde_json::to_string(&expires)
        .map_err(|e| Error::with_cause(Kind::Storage, "cannot encode the snapshot", e))?;
    Ok(format!(
        "{{\"format\":{FORMAT},\"revision\":{revision},\"expires\":{expires},\"data\":{data}}}\n"
    ))
}

fn read(path: &Path, what: &str) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::with_io(
            Kind::Storage,
            format!("cannot read {what} {}", path.display()),
            e,
        )),
    }
}

/// Loads the snapshot at `path` into `store`; `false` when there is none.
pub(crate) fn load_snapshot(store: &mut Store, path: &Path, now: Instant) -> Result<bool> {
    let Some(text) = read(path, "the storage file")? else {
        return Ok(false);
    };
    let bad = |why: String| {
        Error::new(
            Kind::Storage,
            format!("the storage file {} is not usable: {why}", path.display()),
        )
    };
    let snap: Snapshot = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if snap.format != FORMAT {
        return Err(bad(format!(
            "format {} (this build reads {FORMAT})",
            snap.format
        )));
    }
    let wall = unix_ms(SystemTime::now());
    let expiries = snap
        .expires
        .into_iter()
        .map(|(p, ms)| (p, now + Duration::from_millis(ms.saturating_sub(wall))))
        .collect();
    store
        .load(snap.data, snap.revision, expiries)
        .map_err(|e| bad(e.text()))?;
    Ok(true)
}

/// Loads the JSON object in `path` (`--storage-init`) into `store`.
pub(crate) fn load_init(store: &mut Store, path: &Path) -> Result<()> {
    let text = read(path, "--storage-init")?.ok_or_else(|| {
        Error::new(
            Kind::Storage,
            format!(
                "cannot read --storage-init {}: no such file",
                path.display()
            ),
        )
    })?;
    let bad = |why: String| {
        Error::new(
            Kind::Storage,
            format!("--storage-init {}: {why}", path.display()),
        )
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    store.load(value, 1, Vec::new()).map_err(|e| bad(e.text()))
}

/// Writes `text` to `path` atomically (see the module docs).
pub(crate) fn write_atomic(path: &Path, text: &[u8]) -> std::io::Result<()> {
    use std::hash::{BuildHasher, Hasher};
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let nonce = {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    };
    let tmp = dir.join(format!(".{}.{nonce:016x}.tmp", name.to_string_lossy()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
