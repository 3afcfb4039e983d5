//! The files a watcher leaves beside its pid file for the jobs tools: the
//! store URL file (`x.pid` → `x.jobs`).

use std::path::{Path, PathBuf};

/// The file beside a watcher's pid file that holds its job store URL (one
/// line): `x.pid` → `x.jobs`. The watcher writes it; `cluster jobs
/// --pid-file x.pid` reads it.
pub(crate) fn jobs_url_file_for_pid_file(pid_file: &Path) -> PathBuf {
    pid_file.with_extension("jobs")
}

/// Reads the store URL a watcher wrote beside its pid file. A relative
/// path in it is taken relative to the file's directory.
///
/// # Errors
///
/// The file is missing or unreadable ([`crate::Error::is_config`], naming
/// the file), or empty.
pub(crate) fn jobs_url_from_pid_file(pid_file: &Path) -> crate::Result<String> {
    use crate::error::{Error, Kind};
    let file = jobs_url_file_for_pid_file(pid_file);
    let text = std::fs::read_to_string(&file).map_err(|e| {
        Error::with_io(
            Kind::Config,
            format!(
                "cannot read the job store URL from {} (does the watcher of {} run jobs?)",
                file.display(),
                pid_file.display()
            ),
            e,
        )
    })?;
    let url = text.lines().next().unwrap_or("").trim();
    if url.is_empty() {
        return Err(Error::new(
            Kind::Config,
            format!("{} holds no job store URL", file.display()),
        ));
    }
    // A bare relative SQLite path is relative to the file, not to the
    // caller's working directory.
    if let Ok(super::store::StoreUrl::Sqlite(p)) = super::store::StoreUrl::parse(url) {
        if p.is_relative() && !url.starts_with("sqlite:") {
            let dir = file.parent().unwrap_or(Path::new("."));
            return Ok(dir.join(p).display().to_string());
        }
    }
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_url_file_is_beside_the_pid_file() {
        assert_eq!(
            jobs_url_file_for_pid_file(Path::new("/run/x.pid")),
            Path::new("/run/x.jobs")
        );
        assert_eq!(
            jobs_url_file_for_pid_file(Path::new("x")),
            Path::new("x.jobs")
        );
    }

    #[test]
    fn jobs_url_from_pid_file_resolves_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("w.pid");
        let e = jobs_url_from_pid_file(&pid).unwrap_err();
        assert!(e.is_config(), "{e}");
        assert!(e.to_string().contains("w.jobs"), "{e}");
        std::fs::write(dir.path().join("w.jobs"), "jobs.db\n").unwrap();
        assert_eq!(
            jobs_url_from_pid_file(&pid).unwrap(),
            dir.path().join("jobs.db").display().to_string()
        );
        std::fs::write(dir.path().join("w.jobs"), "/abs/jobs.db\n").unwrap();
        assert_eq!(jobs_url_from_pid_file(&pid).unwrap(), "/abs/jobs.db");
        std::fs::write(dir.path().join("w.jobs"), "\n").unwrap();
        assert!(jobs_url_from_pid_file(&pid).unwrap_err().is_config());
    }
}
