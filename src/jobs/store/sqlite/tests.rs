//! The SQL logic of the SQLite store, on in-memory and file databases.

use std::os::unix::net::UnixDatagram as StdUnixDatagram;
use std::time::{Duration, SystemTime};

use rusqlite::Connection;
use serde_json::{json, Value};

use super::admin::{CANCEL_REQUESTS, NEXT_DUE, PURGE};
use super::lifecycle::{CLAIM_NEXT, CLAIM_NEXT_IDS, FIND_ACTIVE_KEY, RUNNING_KEYS};
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

#[tokio::test]
async fn purge_deletes_only_old_finished_jobs() {
    let s = memory().await;
    let ids = submit_ids(
        &s,
        vec![
            NewJob::new(json!(1)),
            NewJob::new(json!(2)),
            NewJob::new(json!(3)),
            NewJob::new(json!(4)),
        ],
    )
    .await;
    let c = s.claim(req(&["default"], 2, false)).await.unwrap();
    s.finish(vec![finished(&c[0], Outcome::Done(None))])
        .await
        .unwrap();
    s.cancel(ids[3]).await.unwrap();
    assert_eq!(s.purge(Duration::from_secs(3600)).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(3)).await;
    assert_eq!(s.purge(Duration::ZERO).await.unwrap(), 2);
    assert!(s.get(c[0].id).await.unwrap().is_none());
    assert!(s.get(ids[3]).await.unwrap().is_none());
    // Running and queued jobs stay.
    assert_eq!(job(&s, c[1].id).await.state, JobState::Running);
    assert_eq!(job(&s, ids[2]).await.state, JobState::Queued);
    // Ids are never reused after a purge.
    let next = submit_ids(&s, vec![NewJob::new(json!(5))]).await;
    assert!(next[0] > ids[3]);
}

#[tokio::test]
async fn cancel_queued_running_and_finished_jobs() {
    let s = memory().await;
    let ids = submit_ids(
        &s,
        vec![
            NewJob::new(json!(1)),
            NewJob::new(json!(2)),
            NewJob::new(json!(3)),
            NewJob::new(json!(4)),
        ],
    )
    .await;
    let running = s.claim(req(&["default"], 3, false)).await.unwrap();
    // Queued: cancelled at once, never claimed.
    assert_eq!(s.cancel(ids[3]).await.unwrap(), CancelOutcome::Cancelled);
    let c = job(&s, ids[3]).await;
    assert_eq!(c.state, JobState::Cancelled);
    assert!(c.finished_at.is_some());
    // Running: requested; the dispatcher finds it.
    assert_eq!(s.cancel(ids[0]).await.unwrap(), CancelOutcome::Requested);
    assert_eq!(s.cancel(ids[1]).await.unwrap(), CancelOutcome::Requested);
    assert!(job(&s, ids[0]).await.cancel_requested);
    assert_eq!(
        s.cancel_requests("n1").await.unwrap(),
        [(ids[0], 1), (ids[1], 1)]
    );
    assert!(s.cancel_requests("n2").await.unwrap().is_empty());
    // The watcher stopped one; the other failed meanwhile: both cancelled,
    // neither re-queued.
    s.finish(vec![
        finished(&running[0], Outcome::Cancelled),
        finished(&running[1], Outcome::Failed("interrupted".into())),
        finished(&running[2], Outcome::Done(None)),
    ])
    .await
    .unwrap();
    assert_eq!(job(&s, ids[0]).await.state, JobState::Cancelled);
    let second = job(&s, ids[1]).await;
    assert_eq!(second.state, JobState::Cancelled);
    assert_eq!(second.errors[0].error, "interrupted");
    assert!(s.cancel_requests("n1").await.unwrap().is_empty());
    // Finished: unchanged.
    assert_eq!(
        s.cancel(ids[2]).await.unwrap(),
        CancelOutcome::AlreadyFinished(JobState::Done)
    );
    assert_eq!(
        s.cancel(ids[3]).await.unwrap(),
        CancelOutcome::AlreadyFinished(JobState::Cancelled)
    );
    let e = s.cancel(JobId::new(999)).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert_eq!(e.to_string(), "no job 999");
}

#[tokio::test]
async fn retry_requeues_failed_and_cancelled_jobs_only() {
    let s = memory().await;
    let ids = submit_ids(
        &s,
        vec![
            NewJob::new(json!(1)).max_attempts(1).priority(-1),
            NewJob::new(json!(2)),
            NewJob::new(json!(3)),
        ],
    )
    .await;
    let j = s
        .claim(req(&["default"], 1, false))
        .await
        .unwrap()
        .remove(0);
    s.finish(vec![finished(&j, Outcome::Failed("no".into()))])
        .await
        .unwrap();
    assert_eq!(job(&s, ids[0]).await.state, JobState::Failed);
    s.retry(ids[0]).await.unwrap();
    let r = job(&s, ids[0]).await;
    assert_eq!(r.state, JobState::Queued);
    assert_eq!((r.attempt, r.max_attempts), (1, 2), "one more try");
    assert!(r.finished_at.is_none());
    assert_eq!(r.errors.len(), 1, "errors are kept");
    let j = s
        .claim(req(&["default"], 1, false))
        .await
        .unwrap()
        .remove(0);
    assert_eq!((j.id, j.attempt), (ids[0], 2));
    // Running, queued: refused.
    let e = s.retry(ids[0]).await.unwrap_err();
    assert!(e.is_config() && e.to_string().contains("is running"), "{e}");
    assert!(s.retry(ids[1]).await.unwrap_err().is_config());
    // Cancelled before any attempt: queued again, max_attempts unchanged.
    s.cancel(ids[2]).await.unwrap();
    s.retry(ids[2]).await.unwrap();
    let c = job(&s, ids[2]).await;
    assert_eq!(
        (c.state, c.attempt, c.max_attempts),
        (JobState::Queued, 0, 3)
    );
    // Done: refused; unknown: not found.
    s.finish(vec![finished(&j, Outcome::Done(None))])
        .await
        .unwrap();
    assert!(s.retry(ids[0]).await.unwrap_err().is_config());
    assert!(s.retry(JobId::new(404)).await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn assign_is_fenced() {
    let s = memory().await;
    submit_ids(&s, vec![NewJob::new(json!(1))]).await;
    let j = s
        .claim(req(&["default"], 1, false))
        .await
        .unwrap()
        .remove(0);
    assert!(!s.assign(j.id, 2, "slot 9".into()).await.unwrap());
    assert!(s.assign(j.id, 1, "slot 2 pid 1234".into()).await.unwrap());
    assert_eq!(
        job(&s, j.id).await.worker.as_deref(),
        Some("slot 2 pid 1234")
    );
}

#[tokio::test]
async fn list_is_newest_first_and_filters() {
    let s = memory().await;
    let ids = submit_ids(
        &s,
        vec![
            NewJob::new(json!(1)).queue("a"),
            NewJob::new(json!(2)).queue("b"),
            NewJob::new(json!(3)).queue("a"),
        ],
    )
    .await;
    s.claim(req(&["b"], 1, false)).await.unwrap();
    let all = s.list(ListFilter::new()).await.unwrap();
    assert_eq!(
        all.iter().map(|j| j.id).collect::<Vec<_>>(),
        [ids[2], ids[1], ids[0]]
    );
    let a = s.list(ListFilter::new().queue("a").limit(1)).await.unwrap();
    assert_eq!(a.iter().map(|j| j.id).collect::<Vec<_>>(), [ids[2]]);
    let running = s
        .list(ListFilter::new().state(JobState::Running))
        .await
        .unwrap();
    assert_eq!(running.iter().map(|j| j.id).collect::<Vec<_>>(), [ids[1]]);
    let none = s
        .list(ListFilter::new().state(JobState::Running).queue("a"))
        .await
        .unwrap();
    assert!(none.is_empty());
    assert!(s.list(ListFilter::new().limit(0)).await.unwrap().is_empty());
}

#[tokio::test]
async fn stats_count_per_state_and_queue() {
    let s = memory().await;
    assert_eq!(s.stats().await.unwrap(), JobStats::default());
    let ids = submit_ids(
        &s,
        vec![
            NewJob::new(json!(1)).queue("a"),
            NewJob::new(json!(2)).queue("a"),
            NewJob::new(json!(3)).queue("b"),
        ],
    )
    .await;
    s.claim(req(&["a"], 1, false)).await.unwrap();
    s.cancel(ids[2]).await.unwrap();
    let st = s.stats().await.unwrap();
    assert_eq!(
        (st.total, st.queued, st.running, st.cancelled),
        (3, 1, 1, 1)
    );
    assert_eq!(st.per_queue["a"].queued, 1);
    assert_eq!(st.per_queue["a"].running, 1);
    assert_eq!(st.per_queue["b"].cancelled, 1);
    assert_eq!(st.per_queue["b"].total(), 1);
}

#[tokio::test]
async fn registered_queues_gate_submits() {
    let s = memory().await;
    assert!(s.known_queues().await.unwrap().is_empty());
    s.register_queues("n1", &["b".into(), "a".into()])
        .await
        .unwrap();
    s.register_queues("n2", &["a".into()]).await.unwrap();
    assert_eq!(s.known_queues().await.unwrap(), ["a", "b"]);
    let e = s
        .submit(vec![
            NewJob::new(json!(1)).queue("a"),
            NewJob::new(json!(2)).queue("nosuch"),
        ])
        .await
        .unwrap_err();
    assert!(e.is_config(), "{e}");
    assert_eq!(
        e.to_string(),
        "no pool takes queue nosuch (pools take: a, b)"
    );
    assert_eq!(s.stats().await.unwrap().total, 0, "nothing submitted");
    assert!(s
        .submit(vec![NewJob::new(json!(1)).queue("a")])
        .await
        .is_ok());
    // Unregistered: every queue goes.
    s.register_queues("n1", &[]).await.unwrap();
    s.register_queues("n2", &[]).await.unwrap();
    assert!(s
        .submit(vec![NewJob::new(json!(1)).queue("nosuch")])
        .await
        .is_ok());
}

#[tokio::test]
async fn invalid_jobs_fail_the_whole_batch() {
    let s = memory().await;
    let e = s
        .submit(vec![
            NewJob::new(json!(1)),
            NewJob::new(json!(2)).max_attempts(0),
        ])
        .await
        .unwrap_err();
    assert!(e.is_config(), "{e}");
    assert!(e.to_string().contains("max_attempts"), "{e}");
    assert_eq!(s.stats().await.unwrap().total, 0);
    assert!(s.submit(Vec::new()).await.unwrap().is_empty());
}

#[tokio::test]
async fn next_due_is_the_earliest_queued_run_at() {
    let s = memory().await;
    let q = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(s.next_due(&q(&["a"])).await.unwrap(), None);
    let soon = SystemTime::now() + Duration::from_secs(60);
    let later = SystemTime::now() + Duration::from_secs(600);
    submit_ids(
        &s,
        vec![
            NewJob::new(json!(1)).queue("a").run_at(later),
            NewJob::new(json!(2)).queue("b").run_at(soon),
        ],
    )
    .await;
    let a = s.next_due(&q(&["a"])).await.unwrap().unwrap();
    assert_eq!(to_micros(a), to_micros(later));
    let ab = s.next_due(&q(&["a", "b"])).await.unwrap().unwrap();
    assert_eq!(to_micros(ab), to_micros(soon));
    assert_eq!(s.next_due(&[]).await.unwrap(), None);
}

#[tokio::test]
async fn a_fresh_file_is_migrated_from_version_0() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("old.db");
    {
        // A SQLite file at user_version 0 with someone's table in it.
        let c = Connection::open(&db).unwrap();
        c.execute_batch("CREATE TABLE notes (t TEXT); INSERT INTO notes VALUES ('hi');")
            .unwrap();
    }
    let s = file(&db).await.unwrap();
    let v: i64 = s
        .with_conn(|c| c.query_row("PRAGMA user_version", [], |r| r.get(0)))
        .await
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    let mode: String = s
        .with_conn(|c| c.query_row("PRAGMA journal_mode", [], |r| r.get(0)))
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    submit_ids(&s, vec![NewJob::new(json!(1))]).await;
    drop(s);
    // Reopening an up-to-date store changes nothing and keeps the jobs.
    let s = file(&db).await.unwrap();
    assert_eq!(s.stats().await.unwrap().total, 1);
}

#[tokio::test]
async fn a_newer_schema_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("new.db");
    {
        let c = Connection::open(&db).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
    }
    let e = file(&db).await.unwrap_err();
    assert!(e.is_store(), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("schema version is 99"), "{msg}");
    assert!(msg.contains(&db.display().to_string()), "{msg}");
}

#[tokio::test]
async fn a_corrupt_file_is_refused_with_a_store_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("junk.db");
    // Deterministic noise (xorshift), more than one page.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let bytes: Vec<u8> = (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&db, bytes).unwrap();
    let e = file(&db).await.unwrap_err();
    assert!(e.is_store(), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("file is not a database"), "{msg}");
    assert!(msg.contains(&db.display().to_string()), "{msg}");
    assert_eq!(msg.lines().count(), 1);
    assert!(
        std::error::Error::source(&e).is_some(),
        "the SQLite error is kept"
    );
    // A short text file too.
    std::fs::write(&db, "hello\n").unwrap();
    assert!(file(&db).await.unwrap_err().is_store());
}

#[tokio::test]
async fn unopenable_paths_are_store_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/dir/jobs.db");
    let e = file(&missing).await.unwrap_err();
    assert!(e.is_store(), "{e}");
    assert!(e.to_string().contains("does not exist"), "{e}");
    let e = file(dir.path()).await.unwrap_err();
    assert!(e.is_store() && e.to_string().contains("directory"), "{e}");
    let absent = dir.path().join("absent.db");
    let opts = StoreOptions {
        create: false,
        ..options()
    };
    let e = SqliteStore::open(Some(&absent), "absent.db", opts)
        .await
        .unwrap_err();
    assert!(
        e.is_store() && e.to_string().contains("no such file"),
        "{e}"
    );
    assert!(!absent.exists(), "not created");
}

#[tokio::test]
async fn corrupt_rows_are_errors_not_panics() {
    let s = memory().await;
    let ids = submit_ids(&s, vec![NewJob::new(json!(1)), NewJob::new(json!(2))]).await;
    let (a, b) = (ids[0].get(), ids[1].get());
    s.with_conn(move |c| {
        c.execute("UPDATE jobs SET args = 'not json' WHERE id = ?1", [a])?;
        c.execute("UPDATE jobs SET errors = '{oops' WHERE id = ?1", [b])
    })
    .await
    .unwrap();
    let e = s.get(ids[0]).await.unwrap_err();
    assert!(e.is_store() && e.to_string().contains("corrupt"), "{e}");
    assert!(s.list(ListFilter::new()).await.unwrap_err().is_store());
    // A corrupt errors column does not block recording a failure.
    s.with_conn(move |c| c.execute("UPDATE jobs SET state = 'done' WHERE id = ?1", [a]))
        .await
        .unwrap();
    let j = s.claim(req(&["default"], 1, false)).await;
    let j = j.unwrap_err();
    assert!(
        j.is_store(),
        "claim returns the corrupt row as an error: {j}"
    );
    s.with_conn(move |c| {
        c.execute(
            "UPDATE jobs SET state = 'running', attempt = 1 WHERE id = ?1",
            [b],
        )
    })
    .await
    .unwrap();
    let r = s
        .finish(vec![Finished {
            id: ids[1],
            attempt: 1,
            worker: None,
            outcome: Outcome::Failed("x".into()),
        }])
        .await
        .unwrap();
    assert_eq!(r.applied, 1);
    assert_eq!(job(&s, ids[1]).await.errors[0].error, "x");
}

/// The hot statements must use an index, never scan the table, so claims
/// stay fast however much history the table holds.
#[tokio::test]
async fn hot_paths_are_index_scans() {
    let s = memory().await;
    let plans = s
        .with_conn(|c| {
            let statements = [
                CLAIM_NEXT,
                CLAIM_NEXT_IDS,
                RUNNING_KEYS,
                FIND_ACTIVE_KEY,
                NEXT_DUE,
                CANCEL_REQUESTS,
                PURGE,
            ];
            let mut out = Vec::new();
            for sql in statements {
                let mut st = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                let nulls = std::iter::repeat_n(rusqlite::types::Null, st.parameter_count());
                let details: Vec<String> = st
                    .query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))?
                    .collect::<rusqlite::Result<_>>()?;
                out.push((sql, details));
            }
            Ok(out)
        })
        .await;
    let plans = plans.unwrap();
    for (sql, details) in plans {
        for d in &details {
            if d.contains("jobs") {
                assert!(d.contains("INDEX"), "{sql}\n  plan: {details:?}");
            }
            assert!(
                !d.contains("TEMP B-TREE FOR ORDER BY"),
                "{sql}\n  plan: {details:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_submit_wakes_the_listener() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("jobs.db");
    let listener = WakeListener::bind(&db).unwrap();
    assert_eq!(listener.path(), dir.path().join("jobs.db.wake"));
    let s = file(&db).await.unwrap();
    submit_ids(&s, vec![NewJob::new(json!(1))]).await;
    tokio::time::timeout(Duration::from_secs(5), listener.wait())
        .await
        .expect("woken")
        .unwrap();
    // Several wakes coalesce; a cancel wakes too.
    let ids = submit_ids(&s, vec![NewJob::new(json!(2))]).await;
    submit_ids(&s, vec![NewJob::new(json!(3))]).await;
    tokio::time::timeout(Duration::from_secs(5), listener.wait())
        .await
        .expect("woken")
        .unwrap();
    s.cancel(ids[0]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), listener.wait())
        .await
        .expect("woken by cancel")
        .unwrap();
    // A second listener on a live socket is refused; dropping the first
    // removes the socket file.
    let e = WakeListener::bind(&db).unwrap_err();
    assert!(e.is_bind(), "{e}");
    drop(listener);
    assert!(!dir.path().join("jobs.db.wake").exists());
}

#[tokio::test]
async fn a_stale_wake_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("jobs.db");
    let wake = dir.path().join("jobs.db.wake");
    drop(StdUnixDatagram::bind(&wake).unwrap()); // a dead watcher's file
    assert!(wake.exists());
    let listener = WakeListener::bind(&db).unwrap();
    let s = file(&db).await.unwrap();
    submit_ids(&s, vec![NewJob::new(json!(1))]).await;
    tokio::time::timeout(Duration::from_secs(5), listener.wait())
        .await
        .expect("woken")
        .unwrap();
    // Something that is not a socket is not removed.
    drop(listener);
    std::fs::write(&wake, "mine").unwrap();
    assert!(WakeListener::bind(&db).unwrap_err().is_bind());
    assert_eq!(std::fs::read_to_string(&wake).unwrap(), "mine");
}

#[tokio::test]
async fn two_handles_on_one_file_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("jobs.db");
    let a = file(&db).await.unwrap();
    let b = file(&db).await.unwrap();
    let ids = submit_ids(&a, vec![NewJob::new(json!(1)), NewJob::new(json!(2))]).await;
    let (ca, cb) = tokio::join!(
        a.claim(req(&["default"], 1, false)),
        b.claim(req(&["default"], 1, false))
    );
    let mut got: Vec<JobId> = ca
        .unwrap()
        .into_iter()
        .chain(cb.unwrap())
        .map(|j| j.id)
        .collect();
    got.sort();
    assert_eq!(got, ids, "each job claimed once");
}

#[test]
fn wake_path_is_beside_the_database() {
    assert_eq!(
        wake_path_for(Path::new("/x/jobs.db")),
        Path::new("/x/jobs.db.wake")
    );
}
