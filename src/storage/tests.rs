//! The store's logic: dot paths, versions, compare-and-swap, updates,
//! expiry, the byte limit, snapshots, and the order of changes.

use std::time::{Duration, Instant};

use super::persist;
use super::store::{Changed, Store, StoreError, ENTRY_OVERHEAD};
use crate::ipc::message::ChangeKind;

fn get(s: &Store, p: &str) -> Option<String> {
    s.get(p).unwrap().map(|(t, _)| t)
}

fn version(s: &Store, p: &str) -> u64 {
    s.get(p).unwrap().map_or(0, |(_, v)| v)
}

#[test]
fn set_creates_missing_objects_and_get_reads_by_path() {
    let now = Instant::now();
    let mut s = Store::new(1 << 20);
    s.set("users.42.name", "\"ann\"", None, now).unwrap();
    assert_eq!(get(&s, "users.42.name").as_deref(), Some("\"ann\""));
    assert_eq!(get(&s, "users.42").as_deref(), Some(r#"{"name":"ann"}"#));
    assert_eq!(get(&s, "users.43"), None);
    assert_eq!(get(&s, "users.42.name.first"), None);
    assert_eq!(
        get(&s, "").as_deref(),
        Some(r#"{"users":{"42":{"name":"ann"}}}"#)
    );
    // A value set whole can be reached into.
    s.set("cfg", r#"{"a":{"b":[1,2]}}"#, None, now).unwrap();
    assert_eq!(get(&s, "cfg.a.b").as_deref(), Some("[1,2]"));
    assert_eq!(s.counts().keys, 3 + 3);
}

#[test]
fn setting_through_a_value_that_is_not_an_object_is_an_error() {
    let now = Instant::now();
    let mut s = Store::new(1 << 20);
    s.set("a", "1", None, now).unwrap();
    let before = s.counts();
    match s.set("a.b.c", "2", None, now) {
        Err(StoreError::Invalid(m)) => {
            assert!(m.contains("a is a number, not an object"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.counts(), before, "nothing changed");
    assert!(matches!(
        s.set("", "{}", None, now),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.set("x..y", "1", None, now),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.set("x", "{nope", None, now),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.set("x", r#"{"a.b":1}"#, None, now),
        Err(StoreError::Invalid(_))
    ));
}

#[test]
fn increment_is_exact_and_refuses_what_is_not_an_integer() {
    let now = Instant::now();
    let mut s = Store::new(1 << 20);
    assert_eq!(s.increment("n", 5, now).unwrap().0, 5);
    assert_eq!(s.increment("n", -2, now).unwrap().0, 3);
    assert_eq!(s.increment("deep.counter", 1, now).unwrap().0, 1);
    s.set("s", "\"x\"", None, now).unwrap();
    assert!(s.increment("s", 1, now).is_err());
    s.set("f", "1.5", None, now).unwrap();
    assert!(s.increment("f", 1, now).is_err());
    s.set("big", &i64::MAX.to_string(), None, now).unwrap();
    assert!(s.increment("big", 1, now).is_err());
    assert_eq!(get(&s, "big"), Some(i64::MAX.to_string()));
}

#[test]
fn versions_move_with_anything_at_or_under_a_path() {
    let now = Instant::now();
    let mut s = Store::new(1 << 20);
    let v1 = s
        .set("users.42.name", "\"ann\"", None, now)
        .unwrap()
        .revision;
    assert_eq!(version(&s, "users"), v1);
    assert_eq!(version(&s, "users.42.name"), v1);
    let v2 = s.set("users.7", "{}", None, now).unwrap().revision;
    assert!(v2 > v1);
    assert_eq!(version(&s, "users"), v2);
    assert_eq!(
        version(&s, "users.42"),
        v1,
        "a sibling's change is not ours"
    );
    // Optimistic updates: the first with the right version wins.
    assert!(s
        .update("users.42.name", v1, "\"bob\"", now)
        .unwrap()
        .is_some());
    assert!(s
        .update("users.42.name", v1, "\"eve\"", now)
        .unwrap()
        .is_none());
    assert_eq!(get(&s, "users.42.name").as_deref(), Some("\"bob\""));
    // Version 0: only if absent.
    assert!(s.update("new", 0, "1", now).unwrap().is_some());
    assert!(s.update("new", 0, "2", now).unwrap().is_none());
    // Deleting bumps the parents.
    let before = version(&s, "users");
    s.delete("users.7").unwrap().unwrap();
    assert!(version(&s, "users") > before);
    assert!(s.delete("users.7").unwrap().is_none());
}

#[test]
fn compare_and_swap_has_one_winner() {
    let now = Instant::now();
    let mut s = Store::new(1 << 20);
    let wins: Vec<bool> = (0..8)
        .map(|i| {
            s.compare_and_swap("lock", None, &i.to_string(), now)
                .unwrap()
                .is_some()
        })
        .collect();
    assert_eq!(wins.iter().filter(|w| **w).count(), 1);
    assert!(wins[0]);
    assert!(s
        .compare_and_swap("lock", Some("0"), "9", now)
        .unwrap()
        .is_some());
    assert!(s
        .compare_and_swap("lock", Some("0"), "8", now)
        .unwrap()
        .is_none());
    // Objects compare as JSON.
    s.set("o", r#"{"a":1,"b":2}"#, None, now).unwrap();
    assert!(s
        .compare_and_swap("o", Some(r#"{"b":2,"a":1}"#), "3", now)
        .unwrap()
        .is_some());
}

#[test]
fn ttl_expires_keys_in_order_and_set_clears_it() {
    let t0 = Instant::now();
    let mut s = Store::new(1 << 20);
    s.set("a", "1", Some(Duration::from_millis(100)), t0)
        .unwrap();
    s.set("b", "2", Some(Duration::from_millis(50)), t0)
        .unwrap();
    s.set("c", "3", Some(Duration::from_millis(10)), t0)
        .unwrap();
    s.set("c", "4", None, t0).unwrap(); // no longer expires
    s.increment("n", 1, t0).unwrap();
    s.set("n", "5", Some(Duration::from_millis(30)), t0)
        .unwrap();
    s.increment("n", 1, t0).unwrap(); // keeps the expiry
    assert_eq!(s.next_expiry(), Some(t0 + Duration::from_millis(30)));
    assert!(s.expire(t0 + Duration::from_millis(5)).is_empty());
    let gone: Vec<(String, ChangeKind)> = s
        .expire(t0 + Duration::from_millis(200))
        .into_iter()
        .map(|c| (c.path, c.kind))
        .collect();
    assert_eq!(
        gone,
        [
            ("n".to_string(), ChangeKind::Expired),
            ("b".to_string(), ChangeKind::Expired),
            ("a".to_string(), ChangeKind::Expired)
        ]
    );
    assert_eq!(get(&s, "c").as_deref(), Some("4"));
    assert_eq!(s.next_expiry(), None);
    // Deleting a subtree forgets the expiries under it.
    s.set("t.x", "1", Some(Duration::from_secs(1)), t0).unwrap();
    s.delete("t").unwrap();
    assert_eq!(s.next_expiry(), None);
}

#[test]
fn the_byte_limit_refuses_writes_before_anything_changes() {
    let now = Instant::now();
    let per_key = |k: &str, v: &str| k.len() + ENTRY_OVERHEAD + v.len();
    let limit = per_key("a", "\"xxxxxxxx\"") * 3;
    let mut s = Store::new(limit);
    for k in ["a", "b", "c"] {
        s.set(k, "\"xxxxxxxx\"", None, now).unwrap();
    }
    assert_eq!(s.counts().bytes, limit);
    assert!(matches!(
        s.set("d", "1", None, now),
        Err(StoreError::Full(_))
    ));
    assert!(matches!(
        s.set("x.y", "1", None, now),
        Err(StoreError::Full(_))
    ));
    // Replacing with something no bigger fits; so does anything after a delete.
    s.set("a", "\"yyyyyyyy\"", None, now).unwrap();
    s.set("a", "1", None, now).unwrap();
    s.delete("b").unwrap();
    s.set("d", "\"xxxxxxxx\"", None, now).unwrap();
    assert!(s.counts().bytes <= limit);
    let before = s.counts();
    assert!(matches!(
        s.set("big", &format!("\"{}\"", "x".repeat(limit)), None, now),
        Err(StoreError::Full(_))
    ));
    assert_eq!(s.counts(), before);
}

#[test]
fn changes_come_in_revision_order() {
    let now = Instant::now();
    let mut s = Store::new(1 << 20);
    let mut seen: Vec<Changed> = Vec::new();
    seen.push(s.set("a.b", "1", None, now).unwrap());
    seen.push(s.increment("a.c", 2, now).unwrap().1);
    seen.extend(s.compare_and_swap("a.b", Some("1"), "3", now).unwrap());
    seen.extend(s.delete("a").unwrap());
    let revisions: Vec<u64> = seen.iter().map(|c| c.revision).collect();
    assert_eq!(revisions, [1, 2, 3, 4]);
    assert_eq!(seen[1].value.as_deref(), Some("2"));
    assert_eq!(seen[3].kind, ChangeKind::Deleted);
    assert_eq!(seen[3].value, None);
}

#[test]
fn snapshots_round_trip_with_expiries_and_versions_never_go_back() {
    let now = Instant::now();
    let mut s = Store::new(1 << 20);
    s.set("users.1", r#"{"name":"ann"}"#, None, now).unwrap();
    s.set("session", "\"abc\"", Some(Duration::from_secs(60)), now)
        .unwrap();
    let rev = s.counts().revision;
    let text = persist::snapshot(&s, now).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("store.json");
    persist::write_atomic(&file, text.as_bytes()).unwrap();
    let mut back = Store::new(1 << 20);
    assert!(persist::load_snapshot(&mut back, &file, now).unwrap());
    assert_eq!(get(&back, ""), get(&s, ""));
    assert_eq!(back.counts().revision, rev);
    assert!(version(&back, "users.1") >= version(&s, "users.1"));
    let left = back.next_expiry().unwrap().duration_since(now);
    assert!(
        left > Duration::from_secs(58) && left <= Duration::from_secs(60),
        "{left:?}"
    );
    // No file: nothing loaded. A corrupt one: an error, never a silent loss.
    assert!(!persist::load_snapshot(&mut back, &dir.path().join("none"), now).unwrap());
    std::fs::write(&file, "{not json").unwrap();
    assert!(persist::load_snapshot(&mut back, &file, now)
        .unwrap_err()
        .is_storage());
    // An init file must be an object within the limit.
    std::fs::write(&file, r#"{"hits": 10}"#).unwrap();
    let mut init = Store::new(1 << 20);
    persist::load_init(&mut init, &file).unwrap();
    assert_eq!(get(&init, "hits").as_deref(), Some("10"));
    assert!(version(&init, "hits") >= 1);
    std::fs::write(&file, "[1]").unwrap();
    assert!(persist::load_init(&mut init, &file).is_err());
    let mut tiny = Store::new(10);
    std::fs::write(&file, r#"{"hits": 10}"#).unwrap();
    assert!(persist::load_init(&mut tiny, &file)
        .unwrap_err()
        .is_storage());
}
