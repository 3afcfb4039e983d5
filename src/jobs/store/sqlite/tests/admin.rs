//! Reads and operator commands: purge, cancel, retry, assign, list,
//! stats, the queue registry, batch validation, the next due time.

use super::*;

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
