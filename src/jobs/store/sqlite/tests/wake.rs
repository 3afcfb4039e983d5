//! Wake-ups through the side channel, and two handles on one file.

use std::os::unix::net::UnixDatagram as StdUnixDatagram;

use super::*;

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
