//! Connecting to PostgreSQL: the URL (our `schema=` parameter taken out,
//! the password hidden in messages), the bounded pool, and the mapping of
//! the driver's errors to one line, with which of them are worth a retry.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use crate::error::{Error, Kind, Result};

/// Connections one store handle opens at most (claims of several queues,
/// the outcome writer, heartbeats and reads share them); the listener has
/// one more of its own. Independent of `--workers`.
pub(super) const POOL_SIZE: usize = 4;

/// How long opening one connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A PostgreSQL URL taken apart: what the driver parses, our schema
/// parameter, and the URL with its password hidden.
#[derive(Debug, Clone)]
pub(super) struct PgUrl {
    pub config: tokio_postgres::Config,
    pub schema: Option<String>,
    /// The URL for messages: `postgres://user:***@host/db`.
    pub label: String,
}

impl PgUrl {
    /// Parses `url`, taking out `schema=NAME` (ours, not libpq's).
    ///
    /// # Errors
    ///
    /// A URL the driver does not accept: [`Error::is_config`].
    pub(super) fn parse(url: &str) -> Result<PgUrl> {
        let label = redact(url);
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (url, None),
        };
        let mut schema = None;
        let mut kept = Vec::new();
        for param in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            match param.strip_prefix("schema=") {
                Some(s) => schema = Some(s.to_string()),
                None => kept.push(param),
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| {
            Error::new(
                Kind::Config,
                format!(
                    "invalid PostgreSQL URL {label}: {}",
                    describe_pg(&e).trim_start_matches("invalid connection string: ")
                ),
            )
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.keepalives_idle(Duration::from_secs(30));
        if config.get_application_name().is_none() {
            config.application_name("cluster");
        }
        Ok(PgUrl {
            config,
            schema,
            label,
        })
    }

    /// A pool of at most `POOL_SIZE` connections, made on first use.
    pub(super) fn pool(&self) -> Result<Pool> {
        let manager = Manager::from_config(
            self.config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .wait_timeout(Some(Duration::from_secs(30)))
            .build()
            .map_err(|e| {
                Error::new(
                    Kind::Store,
                    format!("cannot open the job store {}: {e}", self.label),
                )
            })
    }
}

/// `url` with the password (in the user info or a `password=` parameter)
/// replaced by `***`.
pub(super) fn redact(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(start) = out.find("://").map(|i| i + 3) {
        let end = out[start..]
            .find(['/', '?'])
            .map(|i| start + i)
            .unwrap_or(out.len());
        if let Some(at) = out[start..end].rfind('@').map(|i| start + i) {
            if let Some(colon) = out[start..at].find(':').map(|i| start + i) {
                out.replace_range(colon + 1..at, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k == "password" => format!("{k}=***"),
                _ => p.to_string(),
            })
            .collect();
        out = format!("{head}{}", query.join("&"));
    }
    out
}

/// One line for a driver error: the server's message for a database
/// error, else what failed and why.
pub(super) fn describe_pg(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return match db.detail() {
            Some(d) => format!("{} ({d})", db.message()),
            None => db.message().to_string(),
        };
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// A failed statement: the driver's error or the pool's.
#[derive(Debug)]
pub(super) enum Fail {
    Pg(tokio_postgres::Error),
    Pool(PoolError),
    /// Ours (a corrupt row, a bad argument): never retried.
    Ours(Error),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Fail {
        Fail::Pg(e)
    }
}

impl From<PoolError> for Fail {
    fn from(e: PoolError) -> Fail {
        Fail::Pool(e)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::Ours(e)
    }
}

impl Fail {
    /// The connection broke or could not be made, the server is shutting
    /// down or starting: the same statement may work on a new connection.
    pub(super) fn is_transient(&self) -> bool {
        match self {
            Fail::Pg(e) => pg_transient(e),
            Fail::Pool(PoolError::Backend(e)) => pg_transient(e),
            Fail::Pool(PoolError::Timeout(_)) => true,
            Fail::Pool(_) | Fail::Ours(_) => false,
        }
    }

    /// Two transactions ran into each other (a deadlock, a serialization
    /// failure, or a unique running key taken by a concurrent claim): the
    /// statement is to be run again at once.
    pub(super) fn is_conflict(&self) -> bool {
        let code = match self {
            Fail::Pg(e) => e.code(),
            Fail::Pool(PoolError::Backend(e)) => e.code(),
            _ => None,
        };
        matches!(
            code,
            Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::UNIQUE_VIOLATION
        )
    }

    /// Why it failed, in one line.
    pub(super) fn reason(&self) -> String {
        match self {
            Fail::Ours(e) => e.to_string(),
            Fail::Pg(e) => describe_pg(e),
            Fail::Pool(PoolError::Backend(e)) => describe_pg(e),
            Fail::Pool(PoolError::Timeout(_)) => {
                "timed out waiting for a database connection".to_string()
            }
            Fail::Pool(e) => e.to_string(),
        }
    }

    /// The store error for `what` on the store named `label`.
    pub(super) fn into_error(self, label: &str, what: &str) -> Error {
        if let Fail::Ours(e) = self {
            return e;
        }
        let why = self.reason();
        Error::new(Kind::Store, format!("job store {label}: {what}: {why}"))
    }
}

fn pg_transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        let c = code.code();
        return c.starts_with("08")
            || *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW;
    }
    if e.to_string().starts_with("timeout") {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// Text for a `text` parameter: PostgreSQL's text cannot hold NUL, which
/// a worker's error output may contain.
pub(super) fn clean_text(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact("postgresql://h/db?user=u&password=pw&schema=s"),
            "postgresql://h/db?user=u&password=***&schema=s"
        );
        assert_eq!(
            redact("postgres://u:p@ss@h/db"),
            "postgres://u:***@h/db",
            "the last @ ends the user info"
        );
    }

    #[test]
    fn the_schema_parameter_is_ours() {
        let u =
            PgUrl::parse("postgres://u@localhost/db?schema=app_jobs&connect_timeout=3").unwrap();
        assert_eq!(u.schema.as_deref(), Some("app_jobs"));
        assert_eq!(u.config.get_dbname(), Some("db"));
        assert_eq!(
            u.config.get_connect_timeout(),
            Some(&Duration::from_secs(3))
        );
        let e = PgUrl::parse("postgres://u:pw@localhost/db?bogus=1").unwrap_err();
        assert!(e.is_config(), "{e}");
        assert!(e.to_string().contains("u:***@"), "{e}");
        assert!(!e.to_string().contains("pw"), "{e}");
    }

    #[test]
    fn nul_is_replaced() {
        assert_eq!(clean_text("a\0b"), "a\u{FFFD}b");
        assert_eq!(clean_text("ab"), "ab");
    }
}
