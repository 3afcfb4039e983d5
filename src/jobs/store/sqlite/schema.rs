//! Opening a SQLite job store: the file checks, the pragmas, the schema
//! version and its migrations.
//!
//! # Schema (version 1, in `PRAGMA user_version`)
//!
//! One table `jobs`, one row per job; times are microseconds since the
//! epoch, `args`, `result` and `errors` JSON text (`errors` an array of
//! `{attempt, error, at}`). Partial indexes keep the hot paths independent
//! of history: `jobs_queued_order (queue, priority, run_at, id) WHERE
//! state = 'queued'` serves claims, `jobs_queued_due (queue, run_at)` the
//! next due time, `jobs_active_key (key) WHERE finished_at IS NULL`
//! deduplication (a claim does not touch it), `jobs_running_node (node)`
//! safe mode's running keys, recovery and cancel requests, `jobs_finished
//! (finished_at)` retention, `jobs_state (state, id)` `list`. `finished_at`
//! is set exactly when the state is done, failed or cancelled. No statement
//! on a per-job path uses `IN (list)` or `RETURNING`: SQLite builds a
//! temporary b-tree for each, per execution (half the cost of a submit).
//! `queues (node, queue)` holds the queues each watcher's pools take.
//! Migrations run in one transaction on open; a newer version than this
//! build knows is refused.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use crate::error::{Error, Kind, Result};
use crate::jobs::store::api::StoreOptions;

/// The schema version this build writes; `MIGRATIONS[i]` takes a store
/// from version `i` to `i + 1`.
pub(crate) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const MIGRATIONS: &[&str] = &[
    // 0 -> 1
    "CREATE TABLE jobs (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        queue            TEXT    NOT NULL,
        name             TEXT,
        args             TEXT    NOT NULL,
        key              TEXT    NOT NULL,
        key_explicit     INTEGER NOT NULL DEFAULT 0,
        state            TEXT    NOT NULL
                         CHECK (state = 'queued' OR state = 'running' OR state = 'done'
                                OR state = 'failed' OR state = 'cancelled'),
        attempt          INTEGER NOT NULL DEFAULT 0,
        max_attempts     INTEGER NOT NULL CHECK (max_attempts >= 1),
        run_at           INTEGER NOT NULL,
        priority         INTEGER NOT NULL DEFAULT 0,
        pool             TEXT,
        node             TEXT,
        worker           TEXT,
        result           TEXT,
        errors           TEXT    NOT NULL DEFAULT '[]',
        created_at       INTEGER NOT NULL,
        started_at       INTEGER,
        finished_at      INTEGER,
        cancel_requested INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_queued_order ON jobs (queue, priority, run_at, id) WHERE state = 'queued';
    CREATE INDEX jobs_queued_due ON jobs (queue, run_at) WHERE state = 'queued';
    CREATE INDEX jobs_active_key ON jobs (key) WHERE finished_at IS NULL;
    CREATE INDEX jobs_running_node ON jobs (node) WHERE state = 'running';
    CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
    CREATE INDEX jobs_state ON jobs (state, id);
    CREATE TABLE queues (
        node          TEXT    NOT NULL,
        queue         TEXT    NOT NULL,
        registered_at INTEGER NOT NULL,
        PRIMARY KEY (node, queue)
    ) WITHOUT ROWID;",
    // 1 -> 2: `jobs_state` cost every claim and every finish two index
    // writes; queued and running jobs have their own partial indexes, done
    // jobs are the bulk (a newest-first scan finds them at once), so only
    // the rare failed and cancelled jobs keep an index by state.
    "DROP INDEX jobs_state;
    CREATE INDEX jobs_unhappy ON jobs (state, id) WHERE state = 'failed' OR state = 'cancelled';",
];

/// Opens (creating unless `options.create` is false) the database at
/// `path`, or a private in-memory one for `None`; sets WAL,
/// `synchronous = NORMAL`, `temp_store = MEMORY`, the page cache and the
/// busy timeout, and migrates the schema. `label` names it in errors.
pub(super) fn open_connection(
    path: Option<&Path>,
    label: &str,
    options: &StoreOptions,
) -> Result<Connection> {
    let cannot = |why: String| {
        Error::new(
            Kind::Store,
            format!("cannot open the job store {label}: {why}"),
        )
    };
    let conn = match path {
        None => Connection::open_in_memory(),
        Some(p) => {
            let dir = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            if !dir.is_dir() {
                return Err(cannot(format!(
                    "the directory {} does not exist",
                    dir.display()
                )));
            }
            if p.is_dir() {
                return Err(cannot("it is a directory".into()));
            }
            let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            if options.create {
                flags |= OpenFlags::SQLITE_OPEN_CREATE;
            } else if !p.exists() {
                return Err(cannot("no such file".into()));
            }
            Connection::open_with_flags(p, flags)
        }
    };
    let open_err = |e: rusqlite::Error| {
        Error::with_cause(Kind::Store, format!("cannot open the job store {label}"), e)
    };
    let mut conn = conn.map_err(open_err)?;
    conn.busy_timeout(options.busy_timeout).map_err(open_err)?;
    // The first statement reads the header: "file is not a database"
    // shows here.
    let _mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(open_err)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(open_err)?;
    // Statement journals (every multi-index UPDATE in a transaction
    // writes one) in memory, not in a temp file: 20 % of a claim's CPU.
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(open_err)?;
    // 16 MiB of page cache (default 2 MiB): the indexes of a busy
    // queue stay in memory.
    conn.pragma_update(None, "cache_size", -16_384)
        .map_err(open_err)?;
    if conn.is_readonly(rusqlite::MAIN_DB).map_err(open_err)? {
        return Err(cannot("the file is not writable".into()));
    }
    migrate(&mut conn, label)?;
    Ok(conn)
}

/// Brings the schema to [`SCHEMA_VERSION`] in one transaction.
fn migrate(conn: &mut Connection, label: &str) -> Result<()> {
    let open_err = |e: rusqlite::Error| {
        Error::with_cause(Kind::Store, format!("cannot open the job store {label}"), e)
    };
    let version = |c: &Connection| -> rusqlite::Result<i64> {
        c.query_row("PRAGMA user_version", [], |r| r.get(0))
    };
    let check = |v: i64| -> Result<()> {
        if v > SCHEMA_VERSION {
            return Err(Error::new(
                Kind::Store,
                format!(
                    "cannot open the job store {label}: its schema version is {v}, this cluster knows up to {SCHEMA_VERSION} (a newer cluster wrote it)"
                ),
            ));
        }
        if v < 0 {
            return Err(Error::new(
                Kind::Store,
                format!("cannot open the job store {label}: invalid schema version {v}"),
            ));
        }
        Ok(())
    };
    let v = version(conn).map_err(open_err)?;
    check(v)?;
    if v == SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(open_err)?;
    // Another process may have migrated while we waited for the lock.
    let v = version(&tx).map_err(open_err)?;
    check(v)?;
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(v as usize) {
        tx.execute_batch(sql).map_err(|e| {
            Error::with_cause(
                Kind::Store,
                format!(
                    "cannot open the job store {label}: migrating the schema from version {from} failed"
                ),
                e,
            )
        })?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(open_err)?;
    tx.commit().map_err(open_err)
}
