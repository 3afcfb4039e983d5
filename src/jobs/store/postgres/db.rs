//! The handle, [`PgStore`]: its pool, its schema, and what every
//! statement shares (a pooled connection, prepared statements, the retry
//! of broken connections and conflicts).
//!
//! The SQL is in `claim.rs`, `finish.rs`, `admin.rs` and `nodes.rs`, as
//! more `impl PgStore` blocks.

use std::future::Future;
use std::time::{Duration, Instant};

use deadpool_postgres::{GenericClient, Object, Pool};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::error::{Error, Kind, Result};
use crate::jobs::store::api::StoreOptions;

use super::conn::{Fail, PgUrl};
use super::schema;

/// The schema used when neither `--jobs-schema` nor `schema=` names one.
pub(crate) const DEFAULT_SCHEMA: &str = "cluster";

/// How hard a statement is retried when its connection breaks.
#[derive(Debug, Clone, Copy)]
pub(super) enum Retry {
    /// Never: a submit whose commit may have happened must not run twice.
    Never,
    /// For a few seconds (a stale pooled connection, a short restart).
    Briefly,
    /// For minutes: outcomes are fenced, so running them twice is safe,
    /// and losing them would leave jobs running on a live node.
    Outcomes,
}

impl Retry {
    fn budget(self) -> Duration {
        match self {
            Retry::Never => Duration::ZERO,
            Retry::Briefly => Duration::from_secs(3),
            Retry::Outcomes => Duration::from_secs(300),
        }
    }
}

/// A handle on a PostgreSQL job store: a small pool of connections.
pub(crate) struct PgStore {
    pool: Pool,
    /// The URL with its password hidden: for messages and `url()`.
    pub(super) label: String,
    /// The schema's name, and quoted for SQL.
    pub(super) schema: String,
    pub(super) s: String,
    pub(super) options: StoreOptions,
    /// For the listener's own connection.
    pub(super) config: tokio_postgres::Config,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &self.label)
            .field("schema", &self.schema)
            .finish()
    }
}

impl PgStore {
    /// Connects, and creates or migrates the schema (unless
    /// `options.create` is false: then it must exist).
    ///
    /// # Errors
    ///
    /// A malformed URL or schema name: [`Error::is_config`](crate::Error::is_config).
    /// The server cannot be reached, refuses the login, has no such
    /// database, or holds a newer schema: [`Error::is_store`](crate::Error::is_store),
    /// one line naming the URL (password hidden) and the server's reason.
    pub(crate) async fn open(url: &str, options: StoreOptions) -> Result<PgStore> {
        let parsed = PgUrl::parse(url)?;
        let schema = options
            .schema
            .clone()
            .or(parsed.schema.clone())
            .unwrap_or_else(|| DEFAULT_SCHEMA.to_string());
        schema::check_schema_name(&schema)?;
        let pool = parsed.pool()?;
        let mut client = pool.get().await.map_err(|e| {
            Error::new(
                Kind::Store,
                format!(
                    "cannot open the job store {}: {}",
                    parsed.label,
                    Fail::from(e).reason()
                ),
            )
        })?;
        schema::migrate(&mut client, &schema, &parsed.label, options.create).await?;
        drop(client);
        Ok(PgStore {
            pool,
            label: parsed.label,
            s: format!("\"{schema}\""),
            schema,
            options,
            config: parsed.config,
        })
    }

    /// A pooled connection.
    pub(super) async fn client(&self) -> std::result::Result<Object, Fail> {
        Ok(self.pool.get().await?)
    }

    /// The notification channel of this schema.
    pub(super) fn channel(&self) -> String {
        format!("cluster_jobs:{}", self.schema)
    }

    /// Runs `f` until it succeeds, retrying conflicts at once (a few
    /// times) and transient failures for as long as `retry` allows.
    pub(super) async fn run<T, F, Fut>(&self, what: &str, retry: Retry, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, Fail>>,
    {
        let start = Instant::now();
        let mut pause = Duration::from_millis(20);
        let mut conflicts = 0;
        let mut warned = false;
        loop {
            match f().await {
                Ok(v) => {
                    if warned {
                        tracing::info!("job store {}: {what} worked again", self.label);
                    }
                    return Ok(v);
                }
                Err(e) if e.is_conflict() && conflicts < 8 => conflicts += 1,
                Err(e) if e.is_transient() && start.elapsed() < retry.budget() => {
                    if !warned && start.elapsed() > Duration::from_secs(1) {
                        warned = true;
                        let e = e.into_error(&self.label, what);
                        tracing::warn!("{e}; retrying");
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e.into_error(&self.label, what)),
            }
        }
    }
}

/// Runs `sql` (prepared once per connection) on `c`.
pub(super) async fn query(
    c: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> std::result::Result<Vec<Row>, tokio_postgres::Error> {
    let statement = c.prepare_cached(sql).await?;
    c.query(&statement, params).await
}

/// Runs `sql` (prepared once per connection) on `c`; the rows changed.
pub(super) async fn execute(
    c: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> std::result::Result<u64, tokio_postgres::Error> {
    let statement = c.prepare_cached(sql).await?;
    c.execute(&statement, params).await
}
