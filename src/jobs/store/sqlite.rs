//! The embedded SQLite store (bundled rusqlite, WAL).
//!
//! # Threading: one actor thread per handle
//!
//! A rusqlite `Connection` is `Send` but not `Sync`, and every call blocks.
//! Each [`SqliteStore`] owns one thread (`cluster-jobs-db`) that owns the
//! connection; async callers send it boxed closures over a channel and get
//! the answer on a `tokio::sync::oneshot`, so no runtime thread ever waits
//! on SQLite (or on another process's write lock, up to `busy_timeout`).
//! Requests run one at a time in arrival order, which also makes every
//! transaction's read-check-write sequence race-free within the process;
//! between processes, write transactions start with `BEGIN IMMEDIATE`, so
//! they serialize on SQLite's write lock instead of failing on upgrade.
//! Dropping the handle ends the thread after the queued requests.
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
//! temporary b-tree for each, per execution (half the cost of a submit). `queues (node, queue)`
//! holds the queues each watcher's pools take. Migrations run in one
//! transaction on open; a newer version than this build knows is refused.
//!
//! # Wake-ups
//!
//! SQLite has no LISTEN/NOTIFY. A watcher binds a Unix datagram socket at
//! `<db>.wake` ([`WakeListener`]); every submit, cancel and retry through
//! any handle on that file sends it one byte after COMMIT (non-blocking,
//! errors ignored: no listener, a full buffer). The dispatcher still polls
//! at a slow pace, for writers that bypass this code.

use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixDatagram as StdUnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, Row, Transaction, TransactionBehavior,
};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::error::{Error, Kind, Result};
use crate::jobs::model::{
    retry_delay, AttemptError, CancelOutcome, Job, JobId, JobState, JobStats, ListFilter, NewJob,
    Submitted,
};
use crate::jobs::time::{from_micros, to_micros};

use super::api::{
    ClaimRequest, FinishReport, Finished, Outcome, RecoverReport, Store, StoreOptions,
};

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
];

const JOB_COLUMNS: &str = "id, queue, name, args, key, key_explicit, attempt, max_attempts, \
     state, run_at, priority, pool, node, worker, result, errors, created_at, started_at, \
     finished_at, cancel_requested";

/// Appends `{attempt: ?2, error: ?3, at: ?4}` to `errors` (a corrupt value
/// is replaced rather than failing every later write to the row).
const APPEND_ERROR: &str = "errors = json_insert(CASE WHEN json_valid(errors) AND \
     json_type(errors) = 'array' THEN errors ELSE '[]' END, '$[#]', \
     json_object('attempt', ?2, 'error', ?3, 'at', ?4))";

// The statements on hot paths; `hot_paths_are_index_scans` checks their
// plans. The claim names its index: the planner, without statistics,
// would rather take `jobs_queued_due` and sort every due job.
const CLAIM_NEXT: &str = "SELECT id, key FROM jobs INDEXED BY jobs_queued_order \
     WHERE state = 'queued' AND queue = ?1 AND run_at <= ?2 ORDER BY priority, run_at, id";
/// Without safe mode the key is not needed, and the index covers the query.
const CLAIM_NEXT_IDS: &str = "SELECT id FROM jobs INDEXED BY jobs_queued_order \
     WHERE state = 'queued' AND queue = ?1 AND run_at <= ?2 ORDER BY priority, run_at, id \
     LIMIT ?3";
const RUNNING_KEYS: &str = "SELECT key FROM jobs INDEXED BY jobs_running_node \
     WHERE state = 'running'";
const FIND_ACTIVE_KEY: &str =
    "SELECT id FROM jobs WHERE finished_at IS NULL AND key = ?1 ORDER BY id LIMIT 1";
const NEXT_DUE: &str = "SELECT min(run_at) FROM jobs WHERE state = 'queued' AND queue = ?1";
const CANCEL_REQUESTS: &str = "SELECT id, attempt FROM jobs WHERE state = 'running' \
     AND node = ?1 AND cancel_requested ORDER BY id";
const PURGE: &str = "DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?1";

type Request = Box<dyn FnOnce(&mut Db) + Send>;

/// A handle on a SQLite job store: a channel to its actor thread.
#[derive(Debug)]
pub(crate) struct SqliteStore {
    requests: mpsc::Sender<Request>,
    url: String,
    label: String,
}

/// The actor thread's state.
struct Db {
    conn: Connection,
    options: StoreOptions,
    /// The path, for messages.
    label: String,
    wake: Option<Wake>,
}

/// Sends one byte to a watcher's wake socket.
struct Wake {
    socket: StdUnixDatagram,
    path: PathBuf,
}

impl Wake {
    fn new(db: &Path) -> Option<Wake> {
        let socket = StdUnixDatagram::unbound().ok()?;
        socket.set_nonblocking(true).ok()?;
        Some(Wake {
            socket,
            path: wake_path_for(db),
        })
    }

    fn send(&self) {
        // No listener (ENOENT, ECONNREFUSED) or a full buffer (EAGAIN, a
        // wake is already pending): nothing to do.
        let _ = self.socket.send_to(&[1], &self.path);
    }
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn i64_of(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl SqliteStore {
    /// Opens (creating unless `options.create` is false) the database at
    /// `path`, or a private in-memory one for `None`; sets WAL,
    /// `synchronous = NORMAL` and the busy timeout, and migrates the schema.
    ///
    /// # Errors
    ///
    /// [`Error::is_store`], with one line naming the path: the directory
    /// does not exist, the file does not exist (`create` false), is not a
    /// SQLite database, is not writable, or has a newer schema version.
    pub(crate) async fn open(
        path: Option<&Path>,
        url: &str,
        options: StoreOptions,
    ) -> Result<SqliteStore> {
        let label = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| ":memory:".into());
        let (requests, inbox) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<()>>();
        let path = path.map(Path::to_path_buf);
        let thread_label = label.clone();
        std::thread::Builder::new()
            .name("cluster-jobs-db".into())
            .spawn(
                move || match Db::open(path.as_deref(), thread_label, options) {
                    Ok(mut db) => {
                        let _ = ready_tx.send(Ok(()));
                        while let Ok(request) = inbox.recv() {
                            request(&mut db);
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                },
            )
            .map_err(|e| {
                Error::with_io(
                    Kind::Store,
                    format!("cannot open the job store {label}: cannot start its thread"),
                    e,
                )
            })?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(SqliteStore {
                requests,
                url: url.to_string(),
                label,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::new(
                Kind::Store,
                format!("cannot open the job store {label}: its thread stopped"),
            )),
        }
    }

    /// Runs `f` on the actor thread.
    async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Db) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = oneshot::channel();
        let request: Request = Box::new(move |db: &mut Db| {
            let _ = tx.send(f(db));
        });
        let gone = || {
            Error::new(
                Kind::Store,
                format!("job store {}: its thread stopped", self.label),
            )
        };
        self.requests.send(request).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Runs SQL on the store's connection; for tests.
    #[cfg(test)]
    pub(crate) async fn with_conn<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R> {
        self.call(move |db| {
            let label = db.label.clone();
            f(&db.conn).map_err(sql_error(&label, "test statement"))
        })
        .await
    }
}

/// Maps a rusqlite error to one line naming the store.
fn sql_error(label: &str, what: &str) -> impl FnOnce(rusqlite::Error) -> Error {
    let context = format!("job store {label}: {what}");
    move |e| Error::with_cause(Kind::Store, context, e)
}

fn corrupt(label: &str, what: String) -> Error {
    Error::new(
        Kind::Store,
        format!("job store {label}: corrupt row: {what}"),
    )
}

// The watcher's job dispatcher (DESIGN 4a, being written) is the caller.
#[allow(dead_code)]
impl Db {
    fn open(path: Option<&Path>, label: String, options: StoreOptions) -> Result<Db> {
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
        migrate(&mut conn, &label)?;
        let wake = path.and_then(Wake::new);
        Ok(Db {
            conn,
            options,
            label,
            wake,
        })
    }

    fn err(&self, what: &str) -> impl FnOnce(rusqlite::Error) -> Error {
        sql_error(&self.label, what)
    }

    fn write_tx(&mut self, what: &str) -> Result<Transaction<'_>> {
        let e = sql_error(&self.label, what);
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(e)
    }

    fn wake(&self) {
        if let Some(w) = &self.wake {
            w.send();
        }
    }

    fn submit(&mut self, jobs: Vec<NewJob>) -> Result<Vec<Submitted>> {
        for job in &jobs {
            job.validate()?;
        }
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let label = self.label.clone();
        let e = |what: &'static str| sql_error(&label, what);
        let now_us = to_micros(now());
        let tx = self.write_tx("submit")?;
        let known = known_queues(&tx).map_err(e("submit"))?;
        if !known.is_empty() {
            if let Some(bad) = jobs.iter().find(|j| !known.contains(&j.queue)) {
                return Err(Error::new(
                    Kind::Config,
                    format!(
                        "no pool takes queue {} (pools take: {})",
                        bad.queue,
                        known.join(", ")
                    ),
                ));
            }
        }
        let mut out = Vec::with_capacity(jobs.len());
        let mut inserted = false;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO jobs (queue, name, args, key, key_explicit, state, \
                     max_attempts, run_at, priority, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6, ?7, ?8, ?9)",
                )
                .map_err(e("submit"))?;
            let mut existing = tx.prepare_cached(FIND_ACTIVE_KEY).map_err(e("submit"))?;
            for job in &jobs {
                let key = job.effective_key();
                if job.dedupe {
                    let found: Option<i64> = existing
                        .query_row([&key], |r| r.get(0))
                        .optional()
                        .map_err(e("submit"))?;
                    if let Some(id) = found {
                        out.push(Submitted::Existing(JobId::new(id)));
                        continue;
                    }
                }
                let args = job.args.to_string();
                let run_at = job.run_at.map(to_micros).unwrap_or(now_us);
                insert
                    .execute(params![
                        job.queue,
                        job.name,
                        args,
                        key,
                        job.key.is_some(),
                        job.max_attempts,
                        run_at,
                        job.priority,
                        now_us
                    ])
                    .map_err(e("submit"))?;
                out.push(Submitted::New(JobId::new(tx.last_insert_rowid())));
                inserted = true;
            }
        }
        tx.commit().map_err(e("submit"))?;
        if inserted {
            self.wake();
        }
        Ok(out)
    }

    fn claim(&mut self, req: ClaimRequest) -> Result<Vec<Job>> {
        if req.limit == 0 || req.queues.is_empty() {
            return Ok(Vec::new());
        }
        let label = self.label.clone();
        let e = |what: &'static str| sql_error(&label, what);
        let now_us = to_micros(now());
        let mut seen_queues = HashSet::new();
        let queues: Vec<&String> = req
            .queues
            .iter()
            .filter(|q| seen_queues.insert(q.as_str()))
            .collect();
        let tx = self.write_tx("claim")?;
        let mut picked: Vec<i64> = Vec::new();
        {
            let mut keys: HashSet<String> = HashSet::new();
            if req.safe_mode {
                let mut running = tx.prepare_cached(RUNNING_KEYS).map_err(e("claim"))?;
                let rows = running
                    .query_map([], |r| r.get::<_, String>(0))
                    .map_err(e("claim"))?;
                for k in rows {
                    keys.insert(k.map_err(e("claim"))?);
                }
            }
            // Safe mode reads past jobs whose key is taken, so it cannot
            // use LIMIT; SQLite steps the index lazily, so it reads only
            // as far as it needs.
            let sql = if req.safe_mode {
                CLAIM_NEXT
            } else {
                CLAIM_NEXT_IDS
            };
            let mut next = tx.prepare_cached(sql).map_err(e("claim"))?;
            'queues: for queue in queues {
                if picked.len() >= req.limit {
                    break;
                }
                let mut rows = if req.safe_mode {
                    next.query(params![queue, now_us])
                } else {
                    next.query(params![queue, now_us, i64_of(req.limit - picked.len())])
                }
                .map_err(e("claim"))?;
                while let Some(row) = rows.next().map_err(e("claim"))? {
                    if picked.len() >= req.limit {
                        break 'queues;
                    }
                    let id: i64 = row.get(0).map_err(e("claim"))?;
                    if req.safe_mode {
                        let key: String = row.get(1).map_err(e("claim"))?;
                        if !keys.insert(key) {
                            continue;
                        }
                    }
                    picked.push(id);
                }
            }
        }
        let mut jobs = Vec::with_capacity(picked.len());
        {
            // Not `RETURNING`: it builds a temporary table per statement,
            // which costs more than the read by primary key.
            let mut take = tx
                .prepare_cached(
                    "UPDATE jobs SET state = 'running', attempt = attempt + 1, started_at = ?2, \
                     pool = ?3, node = ?4, worker = NULL, cancel_requested = 0 \
                     WHERE id = ?1 AND state = 'queued'",
                )
                .map_err(e("claim"))?;
            let mut read = tx
                .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))
                .map_err(e("claim"))?;
            for id in picked {
                take.execute(params![id, now_us, req.pool, req.node])
                    .map_err(e("claim"))?;
                let raw = read.query_row([id], RawJob::from_row).map_err(e("claim"))?;
                jobs.push(raw.into_job(&label)?);
            }
        }
        tx.commit().map_err(e("claim"))?;
        Ok(jobs)
    }

    fn finish(&mut self, done: Vec<Finished>) -> Result<FinishReport> {
        let mut report = FinishReport::default();
        if done.is_empty() {
            return Ok(report);
        }
        let label = self.label.clone();
        let e = |what: &'static str| sql_error(&label, what);
        let (base, cap) = (self.options.retry_base, self.options.retry_cap);
        let now_t = now();
        let now_us = to_micros(now_t);
        let tx = self.write_tx("finish")?;
        {
            let fence = "WHERE id = ?1 AND attempt = ?2 AND state = 'running'";
            let mut ok = tx
                .prepare_cached(&format!(
                    "UPDATE jobs SET state = 'done', result = ?3, finished_at = ?4, \
                     worker = COALESCE(?5, worker) {fence}"
                ))
                .map_err(e("finish"))?;
            let mut cancelled = tx
                .prepare_cached(&format!(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ?3, \
                     worker = COALESCE(?4, worker) {fence}"
                ))
                .map_err(e("finish"))?;
            let mut failed = tx
                .prepare_cached(&format!(
                    "UPDATE jobs SET {APPEND_ERROR}, worker = COALESCE(?5, worker), \
                     state = CASE WHEN cancel_requested THEN 'cancelled' \
                                  WHEN attempt < max_attempts THEN 'queued' ELSE 'failed' END, \
                     run_at = CASE WHEN NOT cancel_requested AND attempt < max_attempts \
                                   THEN ?6 ELSE run_at END, \
                     finished_at = CASE WHEN NOT cancel_requested AND attempt < max_attempts \
                                        THEN NULL ELSE ?4 END {fence}"
                ))
                .map_err(e("finish"))?;
            for f in done {
                let changed = match f.outcome {
                    Outcome::Done(result) => {
                        let result = result.map(|v| v.to_string());
                        ok.execute(params![f.id.get(), f.attempt, result, now_us, f.worker])
                    }
                    Outcome::Cancelled => {
                        cancelled.execute(params![f.id.get(), f.attempt, now_us, f.worker])
                    }
                    Outcome::Failed(error) | Outcome::Lost(error) => {
                        let retry_at = to_micros(now_t + retry_delay(base, cap, f.attempt));
                        failed.execute(params![
                            f.id.get(),
                            f.attempt,
                            error,
                            now_us,
                            f.worker,
                            retry_at
                        ])
                    }
                }
                .map_err(e("finish"))?;
                if changed == 1 {
                    report.applied += 1;
                } else {
                    report.stale.push((f.id, f.attempt));
                }
            }
        }
        tx.commit().map_err(e("finish"))?;
        Ok(report)
    }

    fn assign(&mut self, id: JobId, attempt: u32, worker: String) -> Result<bool> {
        let n = self
            .conn
            .execute(
                "UPDATE jobs SET worker = ?3 WHERE id = ?1 AND attempt = ?2 AND state = 'running'",
                params![id.get(), attempt, worker],
            )
            .map_err(self.err("assign"))?;
        Ok(n == 1)
    }

    fn get(&mut self, id: JobId) -> Result<Option<Job>> {
        let raw = self
            .conn
            .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))
            .and_then(|mut s| s.query_row([id.get()], RawJob::from_row).optional())
            .map_err(self.err("get"))?;
        raw.map(|r| r.into_job(&self.label)).transpose()
    }

    fn list(&mut self, filter: ListFilter) -> Result<Vec<Job>> {
        if filter.limit == 0 {
            return Ok(Vec::new());
        }
        let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs");
        let mut conds = Vec::new();
        if filter.state.is_some() {
            conds.push("state = ?1");
        }
        if filter.queue.is_some() {
            conds.push("queue = ?2");
        }
        if !conds.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conds.join(" AND "));
        }
        sql.push_str(" ORDER BY id DESC LIMIT ?3");
        let state = filter.state.map(JobState::as_str);
        let limit = i64_of(filter.limit);
        let label = self.label.clone();
        let raws = self
            .conn
            .prepare_cached(&sql)
            .and_then(|mut s| {
                // Unused numbered parameters are fine: bind by position.
                let rows = s.query_map(params![state, filter.queue, limit], RawJob::from_row)?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(self.err("list"))?;
        raws.into_iter().map(|r| r.into_job(&label)).collect()
    }

    fn stats(&mut self) -> Result<JobStats> {
        let rows = self
            .conn
            .prepare_cached("SELECT queue, state, count(*) FROM jobs GROUP BY queue, state")
            .and_then(|mut s| {
                let rows = s.query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(self.err("stats"))?;
        let mut parsed = Vec::with_capacity(rows.len());
        for (queue, state, n) in rows {
            let state = state
                .parse::<JobState>()
                .map_err(|_| corrupt(&self.label, format!("unknown state '{state}'")))?;
            parsed.push((queue, state, u64::try_from(n).unwrap_or(0)));
        }
        Ok(JobStats::from_rows(parsed))
    }

    /// The state, attempt and max_attempts of job `id`, or not found.
    fn state_of(tx: &Transaction<'_>, label: &str, id: JobId) -> Result<(JobState, i64, i64)> {
        let row: Option<(String, i64, i64)> = tx
            .query_row(
                "SELECT state, attempt, max_attempts FROM jobs WHERE id = ?1",
                [id.get()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(sql_error(label, "read job"))?;
        let (state, attempt, max) =
            row.ok_or_else(|| Error::new(Kind::NotFound, format!("no job {id}")))?;
        let state = state
            .parse::<JobState>()
            .map_err(|_| corrupt(label, format!("job {id} has unknown state '{state}'")))?;
        Ok((state, attempt, max))
    }

    fn retry(&mut self, id: JobId) -> Result<()> {
        let label = self.label.clone();
        let now_us = to_micros(now());
        let tx = self.write_tx("retry")?;
        let (state, _, _) = Self::state_of(&tx, &label, id)?;
        if !matches!(state, JobState::Failed | JobState::Cancelled) {
            return Err(Error::new(
                Kind::Config,
                format!("job {id} is {state}: only failed or cancelled jobs can be retried"),
            ));
        }
        tx.execute(
            "UPDATE jobs SET state = 'queued', run_at = ?2, finished_at = NULL, \
             cancel_requested = 0, max_attempts = MAX(max_attempts, attempt + 1) WHERE id = ?1",
            params![id.get(), now_us],
        )
        .map_err(sql_error(&label, "retry"))?;
        tx.commit().map_err(sql_error(&label, "retry"))?;
        self.wake();
        Ok(())
    }

    fn cancel(&mut self, id: JobId) -> Result<CancelOutcome> {
        let label = self.label.clone();
        let now_us = to_micros(now());
        let tx = self.write_tx("cancel")?;
        let (state, _, _) = Self::state_of(&tx, &label, id)?;
        let outcome = match state {
            JobState::Queued => {
                tx.execute(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ?2 WHERE id = ?1",
                    params![id.get(), now_us],
                )
                .map_err(sql_error(&label, "cancel"))?;
                CancelOutcome::Cancelled
            }
            JobState::Running => {
                tx.execute(
                    "UPDATE jobs SET cancel_requested = 1 WHERE id = ?1",
                    [id.get()],
                )
                .map_err(sql_error(&label, "cancel"))?;
                CancelOutcome::Requested
            }
            finished => CancelOutcome::AlreadyFinished(finished),
        };
        tx.commit().map_err(sql_error(&label, "cancel"))?;
        if !matches!(outcome, CancelOutcome::AlreadyFinished(_)) {
            self.wake();
        }
        Ok(outcome)
    }

    fn cancel_requests(&mut self, node: String) -> Result<Vec<(JobId, u32)>> {
        let label = self.label.clone();
        let rows = self
            .conn
            .prepare_cached(CANCEL_REQUESTS)
            .and_then(|mut s| {
                let rows =
                    s.query_map([node], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(self.err("cancel requests"))?;
        rows.into_iter()
            .map(|(id, attempt)| {
                let attempt = u32::try_from(attempt)
                    .map_err(|_| corrupt(&label, format!("job {id} has attempt {attempt}")))?;
                Ok((JobId::new(id), attempt))
            })
            .collect()
    }

    fn recover(&mut self, node: Option<String>) -> Result<RecoverReport> {
        let label = self.label.clone();
        let e = |what: &'static str| sql_error(&label, what);
        let now_us = to_micros(now());
        let tx = self.write_tx("recover")?;
        let left: Vec<(i64, i64, i64, bool)> = {
            let mut s = tx
                .prepare_cached(
                    "SELECT id, attempt, max_attempts, cancel_requested FROM jobs \
                     WHERE state = 'running' AND (?1 IS NULL OR node = ?1) ORDER BY id",
                )
                .map_err(e("recover"))?;
            let rows = s
                .query_map([&node], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .map_err(e("recover"))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(e("recover"))?
        };
        let mut report = RecoverReport::default();
        {
            let mut fail = tx
                .prepare_cached(&format!(
                    "UPDATE jobs SET {APPEND_ERROR}, \
                     state = CASE WHEN cancel_requested THEN 'cancelled' \
                                  WHEN attempt < max_attempts THEN 'queued' ELSE 'failed' END, \
                     run_at = CASE WHEN NOT cancel_requested AND attempt < max_attempts \
                                   THEN ?4 ELSE run_at END, \
                     finished_at = CASE WHEN NOT cancel_requested AND attempt < max_attempts \
                                        THEN NULL ELSE ?4 END \
                     WHERE id = ?1 AND attempt = ?2 AND state = 'running'"
                ))
                .map_err(e("recover"))?;
            for (id, attempt, max, cancel) in left {
                let msg = format!("the watcher stopped while it ran (attempt {attempt})");
                fail.execute(params![id, attempt, msg, now_us])
                    .map_err(e("recover"))?;
                if cancel {
                    report.cancelled += 1;
                } else if attempt < max {
                    report.requeued += 1;
                } else {
                    report.failed += 1;
                }
            }
        }
        tx.commit().map_err(e("recover"))?;
        if report.requeued > 0 {
            self.wake();
        }
        Ok(report)
    }

    fn purge(&mut self, older_than: Duration) -> Result<u64> {
        let cutoff = to_micros(
            now()
                .checked_sub(older_than)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        );
        let n = self
            .conn
            .execute(PURGE, [cutoff])
            .map_err(self.err("purge"))?;
        Ok(n as u64)
    }

    fn register_queues(&mut self, node: String, queues: Vec<String>) -> Result<()> {
        let label = self.label.clone();
        let e = |what: &'static str| sql_error(&label, what);
        let now_us = to_micros(now());
        let tx = self.write_tx("register queues")?;
        tx.execute("DELETE FROM queues WHERE node = ?1", [&node])
            .map_err(e("register queues"))?;
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO queues (node, queue, registered_at) VALUES (?1, ?2, ?3)",
                )
                .map_err(e("register queues"))?;
            for q in &queues {
                ins.execute(params![node, q, now_us])
                    .map_err(e("register queues"))?;
            }
        }
        tx.commit().map_err(e("register queues"))
    }

    fn next_due(&mut self, queues: Vec<String>) -> Result<Option<SystemTime>> {
        let label = self.label.clone();
        let mut stmt = self
            .conn
            .prepare_cached(NEXT_DUE)
            .map_err(sql_error(&label, "next due"))?;
        let mut best: Option<i64> = None;
        for q in &queues {
            let t: Option<i64> = stmt
                .query_row([q], |r| r.get(0))
                .map_err(sql_error(&label, "next due"))?;
            best = match (best, t) {
                (Some(b), Some(t)) => Some(b.min(t)),
                (b, t) => b.or(t),
            };
        }
        Ok(best.map(from_micros))
    }
}

fn known_queues(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut s = conn.prepare_cached("SELECT DISTINCT queue FROM queues ORDER BY queue")?;
    let rows = s.query_map([], |r| r.get(0))?;
    rows.collect()
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

/// A row as read, before its JSON and enums are checked.
struct RawJob {
    id: i64,
    queue: String,
    name: Option<String>,
    args: String,
    key: String,
    key_explicit: bool,
    attempt: i64,
    max_attempts: i64,
    state: String,
    run_at: i64,
    priority: i64,
    pool: Option<String>,
    node: Option<String>,
    worker: Option<String>,
    result: Option<String>,
    errors: String,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    cancel_requested: bool,
}

#[derive(serde::Deserialize)]
struct StoredError {
    attempt: i64,
    error: String,
    at: i64,
}

impl RawJob {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<RawJob> {
        Ok(RawJob {
            id: r.get(0)?,
            queue: r.get(1)?,
            name: r.get(2)?,
            args: r.get(3)?,
            key: r.get(4)?,
            key_explicit: r.get(5)?,
            attempt: r.get(6)?,
            max_attempts: r.get(7)?,
            state: r.get(8)?,
            run_at: r.get(9)?,
            priority: r.get(10)?,
            pool: r.get(11)?,
            node: r.get(12)?,
            worker: r.get(13)?,
            result: r.get(14)?,
            errors: r.get(15)?,
            created_at: r.get(16)?,
            started_at: r.get(17)?,
            finished_at: r.get(18)?,
            cancel_requested: r.get(19)?,
        })
    }

    fn into_job(self, label: &str) -> Result<Job> {
        let id = self.id;
        let bad = |what: String| corrupt(label, format!("job {id}: {what}"));
        let json = |what: &str, text: &str| -> Result<Value> {
            serde_json::from_str(text).map_err(|e| bad(format!("{what} is not JSON ({e})")))
        };
        let count = |what: &str, n: i64| -> Result<u32> {
            u32::try_from(n).map_err(|_| bad(format!("{what} is {n}")))
        };
        let state = self
            .state
            .parse::<JobState>()
            .map_err(|_| bad(format!("unknown state '{}'", self.state)))?;
        let stored: Vec<StoredError> = serde_json::from_str(&self.errors)
            .map_err(|e| bad(format!("errors are not a JSON list ({e})")))?;
        let mut errors = Vec::with_capacity(stored.len());
        for s in stored {
            errors.push(AttemptError::new(
                count("an error's attempt", s.attempt)?,
                s.error,
                from_micros(s.at),
            ));
        }
        Ok(Job {
            id: JobId::new(id),
            queue: self.queue,
            name: self.name,
            args: json("args", &self.args)?,
            key: self.key,
            key_explicit: self.key_explicit,
            attempt: count("attempt", self.attempt)?,
            max_attempts: count("max_attempts", self.max_attempts)?,
            state,
            run_at: from_micros(self.run_at),
            priority: i32::try_from(self.priority)
                .map_err(|_| bad(format!("priority is {}", self.priority)))?,
            pool: self.pool,
            node: self.node,
            worker: self.worker,
            result: self
                .result
                .as_deref()
                .map(|r| json("result", r))
                .transpose()?,
            errors,
            created_at: from_micros(self.created_at),
            started_at: self.started_at.map(from_micros),
            finished_at: self.finished_at.map(from_micros),
            cancel_requested: self.cancel_requested,
        })
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn url(&self) -> &str {
        &self.url
    }

    async fn submit(&self, jobs: Vec<NewJob>) -> Result<Vec<Submitted>> {
        self.call(move |db| db.submit(jobs)).await
    }

    async fn claim(&self, req: ClaimRequest) -> Result<Vec<Job>> {
        self.call(move |db| db.claim(req)).await
    }

    async fn finish(&self, done: Vec<Finished>) -> Result<FinishReport> {
        self.call(move |db| db.finish(done)).await
    }

    async fn assign(&self, id: JobId, attempt: u32, worker: String) -> Result<bool> {
        self.call(move |db| db.assign(id, attempt, worker)).await
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>> {
        self.call(move |db| db.get(id)).await
    }

    async fn list(&self, filter: ListFilter) -> Result<Vec<Job>> {
        self.call(move |db| db.list(filter)).await
    }

    async fn stats(&self) -> Result<JobStats> {
        self.call(|db| db.stats()).await
    }

    async fn retry(&self, id: JobId) -> Result<()> {
        self.call(move |db| db.retry(id)).await
    }

    async fn cancel(&self, id: JobId) -> Result<CancelOutcome> {
        self.call(move |db| db.cancel(id)).await
    }

    async fn cancel_requests(&self, node: &str) -> Result<Vec<(JobId, u32)>> {
        let node = node.to_string();
        self.call(move |db| db.cancel_requests(node)).await
    }

    async fn recover(&self, node: Option<&str>) -> Result<RecoverReport> {
        let node = node.map(str::to_string);
        self.call(move |db| db.recover(node)).await
    }

    async fn purge(&self, older_than: Duration) -> Result<u64> {
        self.call(move |db| db.purge(older_than)).await
    }

    async fn register_queues(&self, node: &str, queues: &[String]) -> Result<()> {
        let (node, queues) = (node.to_string(), queues.to_vec());
        self.call(move |db| db.register_queues(node, queues)).await
    }

    async fn known_queues(&self) -> Result<Vec<String>> {
        self.call(|db| known_queues(&db.conn).map_err(db.err("known queues")))
            .await
    }

    async fn next_due(&self, queues: &[String]) -> Result<Option<SystemTime>> {
        let queues = queues.to_vec();
        self.call(move |db| db.next_due(queues)).await
    }
}

/// The wake socket of a SQLite store at `db`: `<db>.wake`.
pub(crate) fn wake_path_for(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(".wake");
    PathBuf::from(s)
}

/// The watcher's end of the wake side channel: a Unix datagram socket at
/// `<db>.wake` that every submit, cancel and retry pokes after COMMIT.
///
/// Bind it before the first claim, so no submit falls between a claim that
/// found nothing and the wait. Several wakes coalesce into one `wait`.
// The watcher's job dispatcher (DESIGN 4a, being written) is the caller.
#[allow(dead_code)]
#[derive(Debug)]
pub(crate) struct WakeListener {
    socket: tokio::net::UnixDatagram,
    path: PathBuf,
    ino: u64,
}

// The watcher's job dispatcher (DESIGN 4a, being written) is the caller.
#[allow(dead_code)]
impl WakeListener {
    /// Binds `<db>.wake` (within a tokio runtime). A stale socket file left
    /// by a dead watcher is replaced.
    ///
    /// # Errors
    ///
    /// [`Error::is_bind`]: another live process listens there, the path is
    /// taken by something that is not a socket, or the bind failed (the
    /// path is longer than a socket address allows, ...). The dispatcher
    /// can then fall back to polling.
    pub(crate) fn bind(db: &Path) -> Result<WakeListener> {
        let path = wake_path_for(db);
        let fail = |what: &str, e: std::io::Error| {
            Error::with_io(
                Kind::Bind,
                format!("cannot bind the job wake socket {}: {what}", path.display()),
                e,
            )
        };
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_socket() => {
                // Alive if someone receives on it (that listener gets a
                // spurious wake, which is harmless).
                let probe = StdUnixDatagram::unbound().map_err(|e| fail("probe", e))?;
                if probe.send_to(&[0], &path).is_ok() {
                    return Err(Error::new(
                        Kind::Bind,
                        format!(
                            "cannot bind the job wake socket {}: another process listens on it",
                            path.display()
                        ),
                    ));
                }
                std::fs::remove_file(&path).map_err(|e| fail("removing the stale socket", e))?;
            }
            Ok(_) => {
                return Err(Error::new(
                    Kind::Bind,
                    format!(
                        "cannot bind the job wake socket {}: the path exists and is not a socket",
                        path.display()
                    ),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail("stat", e)),
        }
        let socket = tokio::net::UnixDatagram::bind(&path).map_err(|e| fail("bind", e))?;
        let ino = std::fs::symlink_metadata(&path)
            .map(|m| m.ino())
            .map_err(|e| fail("stat", e))?;
        Ok(WakeListener { socket, path, ino })
    }

    /// The socket's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Returns once at least one wake arrived since the last `wait`, and
    /// drains the ones queued behind it.
    ///
    /// # Errors
    ///
    /// The socket failed (an I/O error; see [`Error::io_error`]).
    pub(crate) async fn wait(&self) -> Result<()> {
        let mut buf = [0u8; 8];
        self.socket
            .recv(&mut buf)
            .await
            .map_err(|e| Error::with_io(Kind::Io, "job wake socket", e))?;
        while self.socket.try_recv(&mut buf).is_ok() {}
        Ok(())
    }
}

impl Drop for WakeListener {
    fn drop(&mut self) {
        // Only our own file: a newer listener may have replaced it.
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests;
