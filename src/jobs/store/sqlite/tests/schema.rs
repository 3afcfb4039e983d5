//! Opening a store: migrations, schema versions, corrupt and unopenable
//! files, corrupt rows, and the query plans of the hot statements.

use rusqlite::Connection;

use super::*;
use crate::jobs::store::sqlite::admin::{CANCEL_REQUESTS, NEXT_DUE, PURGE};
use crate::jobs::store::sqlite::lifecycle::{
    CLAIM_NEXT, CLAIM_NEXT_IDS, CLAIM_TAKE, FIND_ACTIVE_KEY, FINISH_DONE, RUNNING_KEYS,
};

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
                CLAIM_TAKE,
                FINISH_DONE,
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
        let by_key = sql == CLAIM_TAKE || sql == FINISH_DONE;
        for d in &details {
            if d.contains("jobs") && by_key {
                // Batches look each job up by its id, never by state.
                assert!(
                    d.contains("INTEGER PRIMARY KEY"),
                    "{sql}\n  plan: {details:?}"
                );
            } else if d.contains("jobs") {
                assert!(d.contains("INDEX"), "{sql}\n  plan: {details:?}");
            }
            assert!(
                !d.contains("TEMP B-TREE FOR ORDER BY"),
                "{sql}\n  plan: {details:?}"
            );
        }
    }
}
