//! The SQL logic of the SQLite store, on in-memory and file databases:
//! the helpers, and a job's way through the store (submit, claim, safe
//! mode, dedupe, finish, backoff, recover). Reads and operator commands
//! are in `tests/admin.rs`, opening and the schema in `tests/schema.rs`,
//! wake-ups and shared files in `tests/wake.rs`.

use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use super::*;
use crate::jobs::model::{JobState, NewJob};
use crate::jobs::store::api::Outcome;
use crate::jobs::time::to_micros;

fn options() -> StoreOptions {
    StoreOptions {
        retry_base: Duration::from_millis(50),
        retry_cap: Duration::from_secs(1),
        ..StoreOptions::default()
    }
}

async fn memory() -> SqliteStore {
    SqliteStore::open(None, "sqlite::memory:", options())
        .await
        .unwrap()
}

async fn file(path: &Path) -> Result<SqliteStore> {
    SqliteStore::open(Some(path), &path.display().to_string(), options()).await
}

fn req(queues: &[&str], limit: usize, safe_mode: bool) -> ClaimRequest {
    ClaimRequest {
        pool: "p".into(),
        queues: queues.iter().map(|q| q.to_string()).collect(),
        limit,
        node: "n1".into(),
        safe_mode,
    }
}

fn finished(job: &Job, outcome: Outcome) -> Finished {
    Finished {
        id: job.id,
        attempt: job.attempt,
        worker: Some("slot 1 pid 42".into()),
        outcome,
    }
}

fn past(secs: u64) -> SystemTime {
    SystemTime::now() - Duration::from_secs(secs)
}

async fn submit_ids(s: &SqliteStore, jobs: Vec<NewJob>) -> Vec<JobId> {
    s.submit(jobs)
        .await
        .unwrap()
        .into_iter()
        .map(Submitted::id)
        .collect()
}

async fn job(s: &SqliteStore, id: JobId) -> Job {
    s.get(id).await.unwrap().expect("job exists")
}

#[tokio::test]
async fn submit_then_get_round_trips_every_field() {
    let s = memory().await;
    let at = past(10);
    let ids = submit_ids(
        &s,
        vec![NewJob::new(json!({"a": [1, "x"]}))
            .queue("mail")
            .name("send")
            .key("k1")
            .max_attempts(5)
            .priority(-3)
            .run_at(at)],
    )
    .await;
    let j = job(&s, ids[0]).await;
    assert_eq!(j.queue, "mail");
    assert_eq!(j.name.as_deref(), Some("send"));
    assert_eq!(j.args, json!({"a": [1, "x"]}));
    assert_eq!((j.key.as_str(), j.key_explicit), ("k1", true));
    assert_eq!((j.attempt, j.max_attempts), (0, 5));
    assert_eq!(j.state, JobState::Queued);
    assert_eq!(j.priority, -3);
    assert_eq!(to_micros(j.run_at), to_micros(at));
    assert!(j.errors.is_empty() && j.result.is_none() && j.started_at.is_none());
    assert!(!j.cancel_requested);
    let derived = submit_ids(&s, vec![NewJob::new(json!([1]))]).await;
    let d = job(&s, derived[0]).await;
    assert!(!d.key_explicit);
    assert_eq!(d.key, NewJob::new(json!([1])).effective_key());
    assert_eq!(d.queue, "default");
    assert!(s.get(JobId::new(999)).await.unwrap().is_none());
}

#[tokio::test]
async fn claim_orders_by_priority_then_run_at_then_id_and_skips_future_jobs() {
    let s = memory().await;
    let ids = submit_ids(
        &s,
        vec![
            NewJob::new(json!(0)).run_at(past(5)),                  // 0
            NewJob::new(json!(1)).run_at(past(50)),                 // 1: earlier
            NewJob::new(json!(2)).priority(-1).run_at(past(1)),     // 2: first
            NewJob::new(json!(3)).run_at(past(5)),                  // 3: same run_at as 0, later id
            NewJob::new(json!(4)).delay(Duration::from_secs(3600)), // not due
            NewJob::new(json!(5)).queue("other"),                   // other queue
        ],
    )
    .await;
    // Same microsecond for 0 and 3 is not guaranteed by past(): pin them.
    let (a, b) = (ids[0].get(), ids[3].get());
    s.with_conn(move |c| {
        c.execute(
            "UPDATE jobs SET run_at = (SELECT run_at FROM jobs WHERE id = ?1) WHERE id = ?2",
            [a, b],
        )
    })
    .await
    .unwrap();
    let got = s.claim(req(&["default"], 10, false)).await.unwrap();
    let order: Vec<JobId> = got.iter().map(|j| j.id).collect();
    assert_eq!(order, [ids[2], ids[1], ids[0], ids[3]]);
    for j in &got {
        assert_eq!(j.state, JobState::Running);
        assert_eq!(j.attempt, 1);
        assert_eq!(j.pool.as_deref(), Some("p"));
        assert_eq!(j.node.as_deref(), Some("n1"));
        assert!(j.started_at.is_some());
    }
    assert!(s
        .claim(req(&["default"], 10, false))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(job(&s, ids[4]).await.state, JobState::Queued);
    // A limit is a limit; zero claims nothing.
    assert!(s.claim(req(&["other"], 0, false)).await.unwrap().is_empty());
    assert_eq!(s.claim(req(&["other"], 1, false)).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_shared_pool_takes_its_queues_in_the_given_order() {
    let s = memory().await;
    let mut jobs = Vec::new();
    for i in 0..2 {
        jobs.push(NewJob::new(json!(i)).queue("a").run_at(past(100)));
    }
    for i in 0..3 {
        jobs.push(NewJob::new(json!(i)).queue("b"));
    }
    submit_ids(&s, jobs).await;
    // b first although a's jobs are older; a repeated queue counts once.
    let got = s.claim(req(&["b", "a", "b"], 4, false)).await.unwrap();
    let queues: Vec<&str> = got.iter().map(|j| j.queue.as_str()).collect();
    assert_eq!(queues, ["b", "b", "b", "a"]);
    let rest = s.claim(req(&["a", "b"], 10, false)).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].queue, "a");
}

#[tokio::test]
async fn safe_mode_never_returns_a_key_that_is_running() {
    let s = memory().await;
    let ids = submit_ids(
        &s,
        vec![
            NewJob::new(json!(1)).key("k"),
            NewJob::new(json!(2)).key("k"),
            NewJob::new(json!(3)).key("other"),
            NewJob::new(json!(4)).key("k"),
        ],
    )
    .await;
    // One per key in a batch.
    let first = s.claim(req(&["default"], 10, true)).await.unwrap();
    let got: Vec<JobId> = first.iter().map(|j| j.id).collect();
    assert_eq!(got, [ids[0], ids[2]]);
    // "k" is running in the store: nothing more in safe mode.
    assert!(s
        .claim(req(&["default"], 10, true))
        .await
        .unwrap()
        .is_empty());
    // Without safe mode the same key may run twice.
    let loose = s.claim(req(&["default"], 1, false)).await.unwrap();
    assert_eq!(loose[0].id, ids[1]);
    // Both running "k" jobs finish: the next one can be claimed safely.
    let running_k = job(&s, ids[0]).await;
    let report = s
        .finish(vec![
            finished(&running_k, Outcome::Done(None)),
            finished(&loose[0], Outcome::Done(None)),
        ])
        .await
        .unwrap();
    assert_eq!(report.applied, 2);
    let next = s.claim(req(&["default"], 10, true)).await.unwrap();
    assert_eq!(next.iter().map(|j| j.id).collect::<Vec<_>>(), [ids[3]]);
}

#[tokio::test]
async fn safe_mode_compares_derived_keys_regardless_of_object_key_order() {
    let s = memory().await;
    let a: Value = serde_json::from_str(r#"{"x":1,"y":2}"#).unwrap();
    let b: Value = serde_json::from_str(r#"{"y":2,"x":1}"#).unwrap();
    submit_ids(&s, vec![NewJob::new(a), NewJob::new(b)]).await;
    assert_eq!(s.claim(req(&["default"], 10, true)).await.unwrap().len(), 1);
}

#[tokio::test]
async fn dedupe_returns_the_queued_or_running_job_with_the_same_key() {
    let s = memory().await;
    let keyed = || NewJob::new(json!(["x"])).key("once").dedupe(true);
    let out = s.submit(vec![keyed(), keyed()]).await.unwrap();
    let id = out[0].id();
    assert_eq!(out, [Submitted::New(id), Submitted::Existing(id)]);
    // Without dedupe the key does not stop an insert.
    let plain = s
        .submit(vec![NewJob::new(json!(1)).key("once")])
        .await
        .unwrap();
    assert!(plain[0].is_new());
    // Running counts too (the oldest active job is the existing one).
    let claimed = s.claim(req(&["default"], 1, false)).await.unwrap();
    assert_eq!(claimed[0].id, id);
    assert_eq!(
        s.submit(vec![keyed()]).await.unwrap(),
        [Submitted::Existing(id)]
    );
    // Derived keys dedupe equal arguments.
    let a: Value = serde_json::from_str(r#"{"p":1,"q":[true]}"#).unwrap();
    let b: Value = serde_json::from_str(r#"{"q":[true],"p":1}"#).unwrap();
    let out = s
        .submit(vec![
            NewJob::new(a).dedupe(true),
            NewJob::new(b).dedupe(true),
        ])
        .await
        .unwrap();
    assert_eq!(out[1], Submitted::Existing(out[0].id()));
    // Once nothing with the key is queued or running, a new one goes in.
    let c = s.claim(req(&["default"], 10, false)).await.unwrap();
    let done: Vec<Finished> = c.iter().map(|j| finished(j, Outcome::Done(None))).collect();
    s.finish(done).await.unwrap();
    s.finish(vec![finished(&claimed[0], Outcome::Done(None))])
        .await
        .unwrap();
    assert!(s.submit(vec![keyed()]).await.unwrap()[0].is_new());
}

#[tokio::test]
async fn finishes_are_fenced_by_attempt_and_state() {
    let s = memory().await;
    let ids = submit_ids(&s, vec![NewJob::new(json!(1)).max_attempts(3)]).await;
    let j = s
        .claim(req(&["default"], 1, false))
        .await
        .unwrap()
        .remove(0);
    // A wrong attempt changes nothing.
    let mut wrong = finished(&j, Outcome::Done(None));
    wrong.attempt = 7;
    let r = s.finish(vec![wrong]).await.unwrap();
    assert_eq!(r.applied, 0);
    assert_eq!(r.stale, [(j.id, 7)]);
    // Attempt 1 fails, the job is re-queued; attempt 2 is claimed.
    let r = s
        .finish(vec![finished(&j, Outcome::Lost("worker died".into()))])
        .await
        .unwrap();
    assert_eq!(r.applied, 1);
    let requeued = job(&s, ids[0]).await;
    assert_eq!(requeued.state, JobState::Queued);
    wait_until_due(&requeued).await;
    let j2 = s
        .claim(req(&["default"], 1, false))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(j2.attempt, 2);
    // A late report of attempt 1 is fenced off and attempt 2 goes on.
    let r = s
        .finish(vec![finished(&j, Outcome::Done(Some(json!("late"))))])
        .await
        .unwrap();
    assert_eq!((r.applied, r.stale.clone()), (0, vec![(j.id, 1)]));
    let now = job(&s, ids[0]).await;
    assert_eq!(
        (now.state, now.attempt, now.result.clone()),
        (JobState::Running, 2, None)
    );
    // The right attempt applies once.
    let r = s
        .finish(vec![finished(&j2, Outcome::Done(Some(json!({"ok": 1}))))])
        .await
        .unwrap();
    assert_eq!(r.applied, 1);
    let r = s
        .finish(vec![finished(&j2, Outcome::Done(None))])
        .await
        .unwrap();
    assert_eq!(r.stale, [(j2.id, 2)]);
    let d = job(&s, ids[0]).await;
    assert_eq!(d.state, JobState::Done);
    assert_eq!(d.result, Some(json!({"ok": 1})));
    assert_eq!(d.worker.as_deref(), Some("slot 1 pid 42"));
    assert!(d.finished_at.is_some());
    assert_eq!(d.errors.len(), 1);
    assert_eq!(d.errors[0].error, "worker died");
}

async fn wait_until_due(j: &Job) {
    if let Ok(d) = j.run_at.duration_since(SystemTime::now()) {
        tokio::time::sleep(d + Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn failures_back_off_then_fail_with_every_attempts_error() {
    let s = memory().await;
    let ids = submit_ids(&s, vec![NewJob::new(json!(1)).max_attempts(3)]).await;
    for attempt in 1..=3u32 {
        let current = job(&s, ids[0]).await;
        wait_until_due(&current).await;
        let j = s
            .claim(req(&["default"], 1, false))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(j.attempt, attempt);
        let t0 = SystemTime::now();
        let r = s
            .finish(vec![finished(
                &j,
                Outcome::Failed(format!("boom {attempt}")),
            )])
            .await
            .unwrap();
        let t1 = SystemTime::now();
        assert_eq!(r.applied, 1);
        let after = job(&s, ids[0]).await;
        if attempt < 3 {
            assert_eq!(after.state, JobState::Queued, "attempt {attempt}");
            assert!(after.finished_at.is_none());
            // 50 ms × 2^(attempt-1) ± 25 % after the finish, which ran
            // between t0 and t1 (bounds that hold on a slow machine).
            let base = Duration::from_millis(50 * (1 << (attempt - 1)));
            let (min, max) = (base.mul_f64(0.75), base.mul_f64(1.25));
            assert!(after.run_at >= t0 + min, "retry sooner than {min:?}");
            assert!(after.run_at <= t1 + max, "retry later than {max:?}");
            // Not claimable before it is due (whatever the machine's speed:
            // a claim that got it must have started after run_at).
            if let Some(early) = s.claim(req(&["default"], 1, false)).await.unwrap().pop() {
                assert!(early.started_at.unwrap() >= after.run_at, "claimed early");
                s.with_conn(|c| {
                    c.execute(
                        "UPDATE jobs SET state = 'queued', attempt = attempt - 1",
                        [],
                    )
                })
                .await
                .unwrap();
            }
        } else {
            assert_eq!(after.state, JobState::Failed);
            assert!(after.finished_at.is_some());
        }
    }
    let f = job(&s, ids[0]).await;
    let errs: Vec<(u32, &str)> = f
        .errors
        .iter()
        .map(|e| (e.attempt, e.error.as_str()))
        .collect();
    assert_eq!(errs, [(1, "boom 1"), (2, "boom 2"), (3, "boom 3")]);
    assert!(s
        .claim(req(&["default"], 1, false))
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn recover_after_a_crash_requeues_or_fails_what_was_running() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("jobs.db");
    let ids;
    {
        let s = file(&db).await.unwrap();
        ids = submit_ids(
            &s,
            vec![
                NewJob::new(json!(1)).max_attempts(2),
                NewJob::new(json!(2)).max_attempts(1),
                NewJob::new(json!(3)),
                NewJob::new(json!(4)),
            ],
        )
        .await;
        let claimed = s.claim(req(&["default"], 3, false)).await.unwrap();
        assert_eq!(claimed.len(), 3);
        assert_eq!(s.cancel(ids[2]).await.unwrap(), CancelOutcome::Requested);
        // The watcher dies: the store is dropped with jobs running.
    }
    let s = file(&db).await.unwrap();
    // Another node's recovery does not touch ours.
    assert_eq!(
        s.recover(Some("n2")).await.unwrap(),
        RecoverReport::default()
    );
    let r = s.recover(Some("n1")).await.unwrap();
    assert_eq!(
        r,
        RecoverReport {
            requeued: 1,
            failed: 1,
            cancelled: 1
        }
    );
    let a = job(&s, ids[0]).await;
    assert_eq!(a.state, JobState::Queued);
    assert_eq!(a.errors.len(), 1);
    assert_eq!(a.errors[0].attempt, 1);
    assert_eq!(
        a.errors[0].error,
        "the watcher stopped while it ran (attempt 1)"
    );
    assert!(a.run_at <= SystemTime::now());
    let b = job(&s, ids[1]).await;
    assert_eq!(b.state, JobState::Failed);
    assert!(b.finished_at.is_some());
    assert_eq!(job(&s, ids[2]).await.state, JobState::Cancelled);
    assert_eq!(job(&s, ids[3]).await.state, JobState::Queued);
    assert_eq!(s.recover(None).await.unwrap(), RecoverReport::default());
    // The re-queued job runs again as attempt 2.
    let again = s.claim(req(&["default"], 10, false)).await.unwrap();
    let a2 = again.iter().find(|j| j.id == ids[0]).unwrap();
    assert_eq!(a2.attempt, 2);
}

mod admin;
mod schema;
mod wake;
