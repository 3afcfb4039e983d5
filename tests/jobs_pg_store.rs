//! The PostgreSQL store against a real server (see `common/pg.rs`): the
//! same model as SQLite (submit, dedupe, get, list, stats, cancel, retry,
//! purge), claims that never hand one job to two claimers, fencing, safe
//! mode under concurrent claims, and clear errors for a bad URL, a wrong
//! password and a server that is down.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use cluster::__jobs_bench::BenchStore;
use cluster::{CancelOutcome, JobQueue, JobState, ListFilter, NewJob, Submitted};
use common::pg;
use serde_json::json;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn the_job_model_holds_on_postgres() {
    let Some(url) = pg::fresh_url() else { return };
    rt().block_on(async {
        let q = JobQueue::open(&url).await.unwrap();
        assert!(!q.url().contains("password"));
        let a = q.submit(NewJob::new(json!({"a": 1}))).await.unwrap();
        let ids = q
            .submit_many(vec![
                NewJob::new(json!([1])).queue("mail").priority(-1),
                NewJob::new(json!([2])).queue("mail").name("send"),
            ])
            .await
            .unwrap();
        assert_eq!(ids.len(), 2);
        assert!(ids[0] > a && ids[1] > ids[0], "ids in submit order");
        // Deduplication against the store and within the batch.
        let k = || NewJob::new(json!({"x": 1})).key("k1").dedupe(true);
        let first = q.submit(k()).await.unwrap();
        let out = q
            .submit_all(vec![
                k(),
                NewJob::new(json!(7)).key("k2").dedupe(true),
                NewJob::new(json!(8)).key("k2").dedupe(true),
            ])
            .await
            .unwrap();
        assert_eq!(out[0], Submitted::Existing(first));
        assert!(out[1].is_new());
        assert_eq!(out[2], Submitted::Existing(out[1].id()));
        let job = q.get(ids[1]).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Queued);
        assert_eq!(job.name.as_deref(), Some("send"));
        assert_eq!(job.args, json!([2]));
        assert_eq!(q.stats().await.unwrap().queued, 5);
        let mail = q.list(ListFilter::new().queue("mail")).await.unwrap();
        assert_eq!(
            mail.iter().map(|j| j.id).collect::<Vec<_>>(),
            vec![ids[1], ids[0]]
        );
        // Cancel a queued job: it leaves the hot table, and can be retried.
        assert_eq!(q.cancel(a).await.unwrap(), CancelOutcome::Cancelled);
        assert_eq!(
            q.cancel(a).await.unwrap(),
            CancelOutcome::AlreadyFinished(JobState::Cancelled)
        );
        let cancelled = q
            .list(ListFilter::new().state(JobState::Cancelled))
            .await
            .unwrap();
        assert_eq!(cancelled.len(), 1);
        assert!(cancelled[0].finished_at.is_some());
        q.retry(a).await.unwrap();
        assert_eq!(q.get(a).await.unwrap().unwrap().state, JobState::Queued);
        assert!(
            q.retry(a).await.unwrap_err().is_config(),
            "a queued job is not retried"
        );
        assert!(q.get(cluster::JobId::new(999_999)).await.unwrap().is_none());
        assert!(q
            .cancel(cluster::JobId::new(999_999))
            .await
            .unwrap_err()
            .is_not_found());
        assert!(q
            .submit(NewJob::new(json!(1)).max_attempts(0))
            .await
            .unwrap_err()
            .is_config());
        // NUL in arguments survives (json keeps \u0000).
        let nul = q.submit(NewJob::new(json!("a\u{0}b"))).await.unwrap();
        assert_eq!(q.get(nul).await.unwrap().unwrap().args, json!("a\u{0}b"));
    });
}

#[test]
fn claims_finish_and_fencing() {
    let Some(url) = pg::fresh_url() else { return };
    rt().block_on(async {
        let store = BenchStore::open(&url).await.unwrap();
        let q = JobQueue::open(&url).await.unwrap();
        store.submit("q", 10).await.unwrap();
        let claimed = store.claim("q", 4).await.unwrap();
        assert_eq!(claimed.len(), 4);
        assert!(claimed.iter().all(|&(_, a)| a == 1));
        let ids: Vec<i64> = claimed.iter().map(|c| c.0).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "claimed in id order");
        // Finish two, fail one (retried later), give one back.
        assert_eq!(store.finish(claimed[..2].to_vec()).await.unwrap(), 2);
        assert_eq!(
            store.finish(claimed[..1].to_vec()).await.unwrap(),
            0,
            "fenced: already done"
        );
        assert_eq!(store.fail(vec![claimed[2]], "boom\0x").await.unwrap(), 1);
        assert_eq!(store.release(vec![claimed[3]]).await.unwrap(), 1);
        let failed = q
            .get(cluster::JobId::new(claimed[2].0))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(failed.state, JobState::Queued);
        assert_eq!(failed.errors.len(), 1);
        assert_eq!(failed.errors[0].attempt, 1);
        assert!(
            failed.run_at > std::time::SystemTime::now(),
            "retried after a backoff"
        );
        let released = q
            .get(cluster::JobId::new(claimed[3].0))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((released.state, released.attempt), (JobState::Queued, 0));
        // A stale attempt cannot finish the newer one.
        let again = store.claim("q", 100).await.unwrap();
        assert!(again.iter().any(|&(id, a)| id == claimed[3].0 && a == 1));
        assert!(
            !again.iter().any(|&(id, _)| id == claimed[2].0),
            "not due yet"
        );
        assert_eq!(store.finish(vec![(claimed[2].0, 1)]).await.unwrap(), 0);
        let stats = q.stats().await.unwrap();
        assert_eq!((stats.done, stats.running, stats.queued), (2, 7, 1));
        assert_eq!(store.finish(again).await.unwrap(), 7);
        let done = q
            .list(ListFilter::new().state(JobState::Done))
            .await
            .unwrap();
        assert_eq!(done.len(), 9);
        assert!(done.iter().all(|j| j.result == Some(json!({"ok": true}))));
        assert_eq!(store.purge(Duration::ZERO).await.unwrap(), 9);
        assert_eq!(q.stats().await.unwrap().total, 1);
    });
}

#[test]
fn concurrent_claims_hand_each_job_to_one_claimer() {
    let Some(url) = pg::fresh_url() else { return };
    rt().block_on(async {
        let seed = BenchStore::open(&url).await.unwrap();
        seed.submit("q", 3000).await.unwrap();
        let mut tasks = Vec::new();
        for n in 0..4 {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let s = BenchStore::open(&url).await.unwrap();
                let mut mine = Vec::new();
                loop {
                    let got = s.claim_as("q", 50, &format!("n{n}"), false).await.unwrap();
                    if got.is_empty() {
                        return mine;
                    }
                    mine.extend(got.iter().map(|c| c.0));
                    s.finish(got).await.unwrap();
                }
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let unique: HashSet<i64> = all.iter().copied().collect();
        assert_eq!(all.len(), 3000, "every job claimed");
        assert_eq!(unique.len(), 3000, "no job claimed twice");
    });
}

#[test]
fn safe_mode_never_runs_two_jobs_with_one_key_under_concurrent_claims() {
    let Some(url) = pg::fresh_url() else { return };
    rt().block_on(async {
        let q = JobQueue::open(&url).await.unwrap();
        let jobs = (0..200)
            .map(|i| NewJob::new(json!([i])).key(format!("k{}", i % 10)))
            .collect();
        q.submit_many(jobs).await.unwrap();
        let mut tasks = Vec::new();
        for n in 0..3 {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let s = BenchStore::open(&url).await.unwrap();
                let mut claims = Vec::new();
                for _ in 0..20 {
                    claims.push(
                        s.claim_as("default", 10, &format!("n{n}"), true)
                            .await
                            .unwrap(),
                    );
                    tokio::task::yield_now().await;
                }
                claims
            }));
        }
        let mut held = 0;
        for t in tasks {
            for c in t.await.unwrap() {
                held += c.len();
            }
        }
        // Nothing is finished, so each key runs at most once: 10 at most.
        assert_eq!(held, 10, "one running job per key, across claimers");
        let running = q
            .list(ListFilter::new().state(JobState::Running))
            .await
            .unwrap();
        let keys: HashSet<&str> = running.iter().map(|j| j.key.as_str()).collect();
        assert_eq!(keys.len(), running.len());
    });
}

#[test]
fn unreachable_and_refused_stores_are_one_clear_line() {
    let Some(base) = pg::base_url() else {
        eprintln!("SKIPPED: no PostgreSQL");
        return;
    };
    rt().block_on(async {
        let down = format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            common::free_port()
        );
        let e = JobQueue::open(&down).await.unwrap_err();
        assert!(e.is_store(), "{e}");
        let text = e.to_string();
        assert!(
            text.starts_with("cannot open the job store postgres://"),
            "{text}"
        );
        assert!(text.contains("onnection refused"), "{text}");
        assert!(!text.contains('\n'));
        let e = JobQueue::open("postgres://u@h:notaport/db")
            .await
            .unwrap_err();
        assert!(e.is_config(), "{e}");
        let e = JobQueue::open(&format!("{base}?schema=Bad-Name"))
            .await
            .unwrap_err();
        assert!(e.is_config(), "{e}");
        let e = JobQueue::open_existing(&pg::with_fresh_schema(&base))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no job store in schema"), "{e}");
        // A wrong password, where the server asks for one.
        let host = base.split('@').nth(1).unwrap_or("");
        let wrong = format!("postgres://{}:wrong@{host}", pg::PASSWORD_USER);
        match JobQueue::open(&wrong).await {
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains("password authentication failed"), "{text}");
                assert!(text.contains(":***@"), "the password is hidden: {text}");
                assert!(!text.contains("wrong"), "{text}");
            }
            Ok(_) => eprintln!("this server does not check passwords; wrong-password case skipped"),
        }
    });
}
