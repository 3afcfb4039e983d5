//! Into the hot table and out of the queue: submit (deduplication under a
//! per-key advisory lock, the queue gate, one `INSERT … SELECT FROM
//! unnest(…)` per chunk, one notification per queue) and claim (`FOR
//! UPDATE SKIP LOCKED`, safe mode on the unique running-key index).

use std::collections::{BTreeSet, HashMap};
use std::time::SystemTime;

use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;

use crate::error::{Error, Kind};
use crate::jobs::model::{Job, JobId, NewJob, Submitted};
use crate::jobs::store::api::ClaimRequest;

use super::conn::Fail;
use super::db::{execute, query, PgStore};
use super::rows::{hot_columns, job_from_row};

/// Most jobs inserted by one statement (its arrays stay a few MB).
const INSERT_CHUNK: usize = 5000;

/// The rows of a submit as arrays, `t(queue, name, args, key, key_explicit,
/// max_attempts, run_at, priority, ord)`.
const UNNEST: &str = "unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bool[], \
     $6::int[], $7::timestamptz[], $8::int[]) WITH ORDINALITY \
     AS t(queue, name, args, key, key_explicit, max_attempts, run_at, priority, ord)";

/// The columns of some jobs of a submit, for [`UNNEST`].
struct Columns<'a> {
    queue: Vec<String>,
    name: Vec<Option<&'a str>>,
    args: Vec<String>,
    key: Vec<&'a str>,
    explicit: Vec<bool>,
    max: Vec<i32>,
    run_at: Vec<Option<SystemTime>>,
    priority: Vec<i32>,
}

impl<'a> Columns<'a> {
    fn of(jobs: &'a [NewJob], keys: &'a [String], which: &[usize]) -> Columns<'a> {
        Columns {
            queue: which.iter().map(|&i| jobs[i].queue.clone()).collect(),
            name: which.iter().map(|&i| jobs[i].name.as_deref()).collect(),
            args: which.iter().map(|&i| jobs[i].args.to_string()).collect(),
            key: which.iter().map(|&i| keys[i].as_str()).collect(),
            explicit: which.iter().map(|&i| jobs[i].key.is_some()).collect(),
            max: which
                .iter()
                .map(|&i| i32::try_from(jobs[i].max_attempts).unwrap_or(i32::MAX))
                .collect(),
            run_at: which.iter().map(|&i| jobs[i].run_at).collect(),
            priority: which.iter().map(|&i| jobs[i].priority).collect(),
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 8] {
        [
            &self.queue,
            &self.name,
            &self.args,
            &self.key,
            &self.explicit,
            &self.max,
            &self.run_at,
            &self.priority,
        ]
    }
}

impl PgStore {
    /// The queues alive nodes take, sorted, each once.
    pub(super) async fn known_queues_on(
        &self,
        c: &impl GenericClient,
    ) -> std::result::Result<Vec<String>, tokio_postgres::Error> {
        let s = &self.s;
        let rows = query(
            c,
            &format!(
                "SELECT DISTINCT q FROM {s}.nodes, unnest(queues) AS q \
                 WHERE state = 'alive' ORDER BY q"
            ),
            &[],
        )
        .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Wakes the listeners of `queues` (delivered at COMMIT; PostgreSQL
    /// folds repeats within a transaction).
    pub(super) async fn notify(
        &self,
        c: &impl GenericClient,
        queues: &BTreeSet<String>,
    ) -> std::result::Result<(), tokio_postgres::Error> {
        if queues.is_empty() {
            return Ok(());
        }
        // A payload is at most 8,000 bytes: a longer queue name wakes
        // with an empty one (listeners wake for any payload).
        let payloads: Vec<&str> = queues
            .iter()
            .map(|q| if q.len() < 7000 { q.as_str() } else { "" })
            .collect();
        execute(
            c,
            "SELECT pg_notify($1, q) FROM unnest($2::text[]) AS q",
            &[&self.channel(), &payloads],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn submit_once(
        &self,
        jobs: &[NewJob],
    ) -> std::result::Result<Vec<Submitted>, Fail> {
        if jobs.len() <= INSERT_CHUNK && !jobs.iter().any(|j| j.dedupe) {
            return self.submit_plain(jobs).await;
        }
        let s = &self.s;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let known = self.known_queues_on(&tx).await?;
        if !known.is_empty() {
            if let Some(bad) = jobs.iter().find(|j| !known.contains(&j.queue)) {
                return Err(Fail::Ours(Error::new(
                    Kind::Config,
                    format!(
                        "no pool takes queue {} (pools take: {})",
                        bad.queue,
                        known.join(", ")
                    ),
                )));
            }
        }
        let keys: Vec<String> = jobs.iter().map(NewJob::effective_key).collect();
        // Deduplication: the keys of dedupe jobs are locked (in one
        // order, so two submits cannot deadlock) until COMMIT, then
        // looked up among the queued and running jobs.
        let dedupe_keys: Vec<&str> = jobs
            .iter()
            .zip(&keys)
            .filter(|(j, _)| j.dedupe)
            .map(|(_, k)| k.as_str())
            .collect();
        let mut existing: HashMap<String, i64> = HashMap::new();
        if !dedupe_keys.is_empty() {
            let prefix = format!("cluster:key:{}:", self.schema);
            execute(
                &tx,
                "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT \
                 hashtextextended($1 || k, 0) AS h FROM unnest($2::text[]) AS k ORDER BY 1) x",
                &[&prefix, &dedupe_keys],
            )
            .await?;
            let rows = query(
                &tx,
                &format!(
                    "SELECT DISTINCT ON (key) key, id FROM {s}.jobs WHERE key = ANY($1) \
                     ORDER BY key, id"
                ),
                &[&dedupe_keys],
            )
            .await?;
            for r in rows {
                existing.insert(r.get(0), r.get(1));
            }
        }
        // Which jobs are inserted, and what the others point at: an
        // existing id, or the position of an earlier job of this batch.
        enum Slot {
            Existing(i64),
            Batch(usize),
            New(usize),
        }
        let mut slots = Vec::with_capacity(jobs.len());
        let mut first_in_batch: HashMap<&str, usize> = HashMap::new();
        let mut fresh: Vec<usize> = Vec::new();
        for (i, (job, key)) in jobs.iter().zip(&keys).enumerate() {
            if job.dedupe {
                if let Some(&id) = existing.get(key) {
                    slots.push(Slot::Existing(id));
                    continue;
                }
                if let Some(&at) = first_in_batch.get(key.as_str()) {
                    slots.push(Slot::Batch(at));
                    continue;
                }
            }
            first_in_batch.entry(key.as_str()).or_insert(fresh.len());
            slots.push(Slot::New(fresh.len()));
            fresh.push(i);
        }
        let insert = format!(
            "INSERT INTO {s}.jobs (queue, name, args, key, key_explicit, state, max_attempts, \
             run_at, priority, created_at) \
             SELECT t.queue, t.name, t.args::json, t.key, t.key_explicit, 'queued', \
             t.max_attempts, COALESCE(t.run_at, now()), t.priority, now() FROM {UNNEST} \
             ORDER BY t.ord RETURNING id"
        );
        let mut ids: Vec<i64> = Vec::with_capacity(fresh.len());
        let mut queues = BTreeSet::new();
        for chunk in fresh.chunks(INSERT_CHUNK) {
            let cols = Columns::of(jobs, &keys, chunk);
            let rows = query(&tx, &insert, &cols.params()).await?;
            let mut got: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            // Identity values are drawn in row order: sorted, they are
            // the ids of the rows as given.
            got.sort_unstable();
            ids.extend(got);
            queues.extend(cols.queue);
        }
        if ids.len() != fresh.len() {
            return Err(Fail::Ours(Error::new(
                Kind::Store,
                format!(
                    "job store {}: submit: {} rows inserted for {} jobs",
                    self.label,
                    ids.len(),
                    fresh.len()
                ),
            )));
        }
        self.notify(&tx, &queues).await?;
        tx.commit().await?;
        let out = slots
            .into_iter()
            .map(|slot| match slot {
                Slot::Existing(id) => Submitted::Existing(JobId::new(id)),
                Slot::Batch(at) => Submitted::Existing(JobId::new(ids[at])),
                Slot::New(at) => Submitted::New(JobId::new(ids[at])),
            })
            .collect();
        Ok(out)
    }

    /// A submit without deduplication, in one autocommitted statement (one
    /// round trip): the queue gate, the insert and one notification per
    /// queue.
    async fn submit_plain(&self, jobs: &[NewJob]) -> std::result::Result<Vec<Submitted>, Fail> {
        let s = &self.s;
        let keys: Vec<String> = jobs.iter().map(NewJob::effective_key).collect();
        let all: Vec<usize> = (0..jobs.len()).collect();
        let cols = Columns::of(jobs, &keys, &all);
        let sql = format!(
            "WITH known AS (SELECT DISTINCT q FROM {s}.nodes, unnest(queues) AS q \
                 WHERE state = 'alive'), \
             t AS (SELECT * FROM {UNNEST}), \
             bad AS (SELECT t.queue FROM t WHERE EXISTS (SELECT 1 FROM known) \
                 AND t.queue NOT IN (SELECT q FROM known) LIMIT 1), \
             ins AS (INSERT INTO {s}.jobs (queue, name, args, key, key_explicit, state, \
                 max_attempts, run_at, priority, created_at) \
                 SELECT t.queue, t.name, t.args::json, t.key, t.key_explicit, 'queued', \
                 t.max_attempts, COALESCE(t.run_at, now()), t.priority, now() FROM t \
                 WHERE NOT EXISTS (SELECT 1 FROM bad) ORDER BY t.ord RETURNING id, queue), \
             n AS (SELECT pg_notify($9, d.q) FROM (SELECT DISTINCT queue AS q FROM ins) d) \
             SELECT id, NULL::text, NULL::text FROM ins WHERE (SELECT count(*) FROM n) >= 0 \
             UNION ALL SELECT NULL, b.queue, (SELECT string_agg(q, ', ' ORDER BY q) FROM known) \
             FROM bad b"
        );
        let channel = self.channel();
        let mut params: Vec<&(dyn ToSql + Sync)> = cols.params().to_vec();
        params.push(&channel);
        let client = self.client().await?;
        let rows = query(&client, &sql, &params).await?;
        if let Some(r) = rows
            .iter()
            .find(|r| r.get::<_, Option<String>>(1).is_some())
        {
            let bad: String = r.get(1);
            let known: Option<String> = r.get(2);
            return Err(Fail::Ours(Error::new(
                Kind::Config,
                format!(
                    "no pool takes queue {bad} (pools take: {})",
                    known.unwrap_or_default()
                ),
            )));
        }
        let mut ids: Vec<i64> = rows.iter().filter_map(|r| r.get(0)).collect();
        ids.sort_unstable();
        if ids.len() != jobs.len() {
            return Err(Fail::Ours(Error::new(
                Kind::Store,
                format!(
                    "job store {}: submit: {} rows inserted for {} jobs",
                    self.label,
                    ids.len(),
                    jobs.len()
                ),
            )));
        }
        Ok(ids
            .into_iter()
            .map(|id| Submitted::New(JobId::new(id)))
            .collect())
    }

    /// The claim of one queue: up to `limit` jobs, in one statement.
    fn claim_sql(&self, safe: bool) -> String {
        let s = &self.s;
        let cols = hot_columns("j");
        let update = format!(
            "UPDATE {s}.jobs j SET state = 'running', attempt = j.attempt + 1, \
             started_at = now(), pool = $3, node = $4, worker = NULL, \
             cancel_requested = false, exclusive = {safe} \
             FROM picked WHERE j.id = picked.id RETURNING {cols}"
        );
        if !safe {
            return format!(
                "WITH picked AS (SELECT id FROM {s}.jobs \
                 WHERE state = 'queued' AND queue = $1 AND run_at <= now() \
                 ORDER BY priority, run_at, id LIMIT $2 FOR UPDATE SKIP LOCKED) {update}"
            );
        }
        // Safe mode: skip keys running anywhere, and take one job per key
        // of those left. A concurrent claim of the same key on another
        // node makes the UPDATE fail on `jobs_running_key`; it is run again.
        format!(
            "WITH cand AS (SELECT id, key, priority, run_at FROM {s}.jobs q \
             WHERE state = 'queued' AND queue = $1 AND run_at <= now() \
             AND NOT EXISTS (SELECT 1 FROM {s}.jobs r \
                 WHERE r.key = q.key AND r.state = 'running' AND r.exclusive) \
             ORDER BY priority, run_at, id LIMIT $2::bigint * 2 FOR UPDATE SKIP LOCKED), \
             picked AS (SELECT id FROM (SELECT id, priority, run_at, \
                 row_number() OVER (PARTITION BY key ORDER BY priority, run_at, id) AS n \
                 FROM cand) c WHERE n = 1 ORDER BY priority, run_at, id LIMIT $2) {update}"
        )
    }

    pub(super) async fn claim_once(
        &self,
        req: &ClaimRequest,
    ) -> std::result::Result<Vec<Job>, Fail> {
        let sql = self.claim_sql(req.safe_mode);
        let mut queues: Vec<&String> = Vec::new();
        for q in &req.queues {
            if !queues.contains(&q) {
                queues.push(q);
            }
        }
        let mut client = self.client().await?;
        let mut out: Vec<Job> = Vec::new();
        if queues.len() == 1 {
            let limit = i64::try_from(req.limit).unwrap_or(i64::MAX);
            let rows = query(&client, &sql, &[queues[0], &limit, &req.pool, &req.node]).await?;
            for r in &rows {
                out.push(job_from_row(r, &self.label)?);
            }
        } else {
            let tx = client.transaction().await?;
            for q in queues {
                let left = req.limit - out.len();
                if left == 0 {
                    break;
                }
                let limit = i64::try_from(left).unwrap_or(i64::MAX);
                let rows = query(&tx, &sql, &[q, &limit, &req.pool, &req.node]).await?;
                let mut batch = Vec::with_capacity(rows.len());
                for r in &rows {
                    batch.push(job_from_row(r, &self.label)?);
                }
                sort_claimed(&mut batch);
                out.extend(batch);
            }
            tx.commit().await?;
            return Ok(out);
        }
        sort_claimed(&mut out);
        Ok(out)
    }
}

/// `RETURNING` has no order: the claim order is priority, run_at, id.
fn sort_claimed(jobs: &mut [Job]) {
    jobs.sort_by_key(|j| (j.priority, j.run_at, j.id));
}
