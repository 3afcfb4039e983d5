//! The job types: the explicit key, validation, parsing, serialization.

use std::time::Duration;

use serde_json::{json, Value};

use super::*;

#[test]
fn explicit_key_wins() {
    let j = NewJob::new(json!(1)).key("mine");
    assert_eq!(j.effective_key(), "mine");
}

#[test]
fn validation() {
    assert!(NewJob::new(json!(1)).validate().is_ok());
    let e = NewJob::new(json!(1))
        .max_attempts(0)
        .validate()
        .unwrap_err();
    assert!(e.is_config(), "{e}");
    assert!(NewJob::new(json!(1))
        .queue("")
        .validate()
        .unwrap_err()
        .is_config());
    assert!(NewJob::new(json!(1))
        .key("")
        .validate()
        .unwrap_err()
        .is_config());
}

#[test]
fn states_and_ids_parse() {
    for s in JobState::ALL {
        assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
        assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
    }
    assert!("bogus".parse::<JobState>().unwrap_err().is_config());
    assert_eq!("7".parse::<JobId>().unwrap(), JobId::new(7));
    for bad in ["0", "-1", "x", "", "1.5"] {
        assert!(bad.parse::<JobId>().unwrap_err().is_config(), "{bad}");
    }
}

#[test]
fn job_serializes_times_as_rfc3339() {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(86_400);
    let job = Job {
        id: JobId(1),
        queue: "q".into(),
        name: None,
        args: json!([]),
        key: "k".into(),
        key_explicit: true,
        attempt: 1,
        max_attempts: 3,
        state: JobState::Failed,
        run_at: t,
        priority: 0,
        pool: None,
        node: None,
        worker: None,
        result: None,
        errors: vec![AttemptError::new(1, "boom".into(), t)],
        created_at: t,
        started_at: Some(t),
        finished_at: None,
        cancel_requested: false,
    };
    let v = serde_json::to_value(&job).unwrap();
    assert_eq!(v["run_at"], "1970-01-02T00:00:00.000Z");
    assert_eq!(v["finished_at"], Value::Null);
    assert_eq!(v["errors"][0]["at"], "1970-01-02T00:00:00.000Z");
    assert_eq!(v["state"], "failed");
    let back: Job = serde_json::from_value(v).unwrap();
    assert_eq!(back, job);
}
