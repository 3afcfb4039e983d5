//! The durable job store behind one object-safe async trait, [`Store`],
//! chosen at run time by URL ([`open`]). The trait and its types are in
//! `api.rs`, the SQLite implementation in `sqlite/`.
//!
//! The watcher is the only process that claims jobs and records outcomes
//! (DESIGN 4a); producers (the `cluster jobs` CLI, [`crate::JobQueue`])
//! submit, inspect, cancel and retry. Every method is one transaction, so
//! a batch is all or nothing.
//!
//! # Guarantees every store gives
//!
//! * **Claims are exclusive**: a queued job is handed to one claim only;
//!   the claim moves it to `running` and increments `attempt` in the same
//!   transaction.
//! * **Fencing**: `finish`, `assign` and the recovery of a dead node apply
//!   only where `(id, attempt)` still match and the job is `running`, so a
//!   late report of an old attempt cannot overwrite a newer one.
//! * **Safe mode** (a claim's `safe_mode`): never two running jobs with the
//!   same effective key, counting the jobs already running in the store and
//!   the batch being claimed.
//! * **Deduplication** (`NewJob::dedupe`): no insert while a job with the
//!   same effective key is queued or running; the existing id is returned.
//! * At-least-once execution: a job runs again only when the worker, the
//!   watcher or the node running it died (or failed it) before its outcome
//!   was recorded.

mod api;
pub(crate) mod postgres;
pub(crate) mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Error, Kind, Result};

pub(crate) use api::{ClaimRequest, Finished, Heartbeat, NodeInfo, Outcome, Store, StoreOptions};
// The watcher's job dispatcher (DESIGN 4a, being written) names these here.
#[allow(unused_imports)]
pub(crate) use api::{FinishReport, RecoverReport, DEFAULT_RETENTION};
#[allow(unused_imports)]
pub(crate) use sqlite::wake_path_for;

/// Where a store lives, parsed from a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreUrl {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A private in-memory SQLite database (tests).
    SqliteMemory,
    /// A PostgreSQL URL.
    Postgres(String),
}

impl StoreUrl {
    /// Accepts `jobs.db`, `./x/jobs.db`, `/abs/jobs.db`, `sqlite://path`,
    /// `sqlite:path`, `sqlite::memory:`, `postgres://…`, `postgresql://…`.
    ///
    /// # Errors
    ///
    /// An empty URL or an unknown scheme: [`Error::is_config`].
    pub(crate) fn parse(url: &str) -> Result<StoreUrl> {
        let url = url.trim();
        if url.is_empty() {
            return Err(Error::new(Kind::Config, "the job store URL is empty"));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(url.to_string()));
        }
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            return match path {
                ":memory:" => Ok(StoreUrl::SqliteMemory),
                "" => Err(Error::new(
                    Kind::Config,
                    format!("the job store URL '{url}' names no file"),
                )),
                p => Ok(StoreUrl::Sqlite(PathBuf::from(p))),
            };
        }
        if url == ":memory:" {
            return Ok(StoreUrl::SqliteMemory);
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return Err(Error::new(
                Kind::Config,
                format!(
                    "unknown job store URL scheme '{scheme}' in '{url}' (a SQLite file path, sqlite://PATH or postgres://...)"
                ),
            ));
        }
        Ok(StoreUrl::Sqlite(PathBuf::from(url)))
    }
}

/// Opens the store that `url` names.
///
/// # Errors
///
/// A bad URL: [`Error::is_config`]; a store that cannot be opened (see
/// [`sqlite::SqliteStore::open`] and [`postgres::PgStore::open`]):
/// [`Error::is_store`].
pub(crate) async fn open(url: &str, options: StoreOptions) -> Result<Arc<dyn Store>> {
    match StoreUrl::parse(url)? {
        StoreUrl::Sqlite(path) => Ok(Arc::new(
            sqlite::SqliteStore::open(Some(&path), url, options).await?,
        )),
        StoreUrl::SqliteMemory => Ok(Arc::new(
            sqlite::SqliteStore::open(None, url, options).await?,
        )),
        StoreUrl::Postgres(_) => Ok(Arc::new(postgres::PgStore::open(url, options).await?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let p = |s: &str| StoreUrl::parse(s).unwrap();
        assert_eq!(p("jobs.db"), StoreUrl::Sqlite("jobs.db".into()));
        assert_eq!(p("./x/jobs.db"), StoreUrl::Sqlite("./x/jobs.db".into()));
        assert_eq!(
            p("sqlite://x/jobs.db"),
            StoreUrl::Sqlite("x/jobs.db".into())
        );
        assert_eq!(
            p("sqlite:///abs/jobs.db"),
            StoreUrl::Sqlite("/abs/jobs.db".into())
        );
        assert_eq!(p("sqlite:jobs.db"), StoreUrl::Sqlite("jobs.db".into()));
        assert_eq!(p("sqlite::memory:"), StoreUrl::SqliteMemory);
        assert!(matches!(p("postgres://u@h/db"), StoreUrl::Postgres(_)));
        assert!(StoreUrl::parse("").unwrap_err().is_config());
        assert!(StoreUrl::parse("sqlite://").unwrap_err().is_config());
        assert!(StoreUrl::parse("mysql://h/db").unwrap_err().is_config());
    }
}
