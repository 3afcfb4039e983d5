//! The derived key of a job without an explicit one: a hash of its queue,
//! name and canonical JSON args, so that safe mode and deduplication
//! treat equal args as equal whatever their object key order.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Writes `v` as canonical JSON: no whitespace, object keys sorted (by
/// their UTF-8 bytes) at every depth, strings escaped as serde_json does,
/// numbers as serde_json prints them. Independent of the order in which
/// the object was built, and of serde_json's `preserve_order` feature.
pub(crate) fn canonical_json(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => {
            // Scalars: serde_json's own output is already canonical, and
            // writing to a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, v);
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_json(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let _ = serde_json::to_writer(&mut *out, k);
                out.push(b':');
                canonical_json(item, out);
            }
            out.push(b'}');
        }
    }
}

/// The derived key of a job without an explicit one. Version-tagged and
/// length-prefixed so that no two different (queue, name, args) feed the
/// hash the same bytes.
pub(crate) fn derived_key(queue: &str, name: Option<&str>, args: &Value) -> String {
    let mut canon = Vec::with_capacity(64);
    canonical_json(args, &mut canon);
    let mut h = Sha256::new();
    h.update(b"cluster job key v1\0");
    h.update((queue.len() as u64).to_le_bytes());
    h.update(queue.as_bytes());
    match name {
        Some(n) => {
            h.update([1u8]);
            h.update((n.len() as u64).to_le_bytes());
            h.update(n.as_bytes());
        }
        None => h.update([0u8]),
    }
    h.update(&canon);
    let digest = h.finalize();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(32);
    for b in &digest[..16] {
        hex.push(char::from(HEX[usize::from(b >> 4)]));
        hex.push(char::from(HEX[usize::from(b & 15)]));
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_key_ignores_object_key_order() {
        let a: Value =
            serde_json::from_str(r#"{"b":1,"a":{"y":[1,{"q":2,"p":3}],"x":null}}"#).unwrap();
        let b: Value =
            serde_json::from_str(r#"{"a":{"x":null,"y":[1,{"p":3,"q":2}]},"b":1}"#).unwrap();
        let mut ca = Vec::new();
        canonical_json(&a, &mut ca);
        assert_eq!(ca, br#"{"a":{"x":null,"y":[1,{"p":3,"q":2}]},"b":1}"#);
        let mut esc = Vec::new();
        canonical_json(&json!({"k\"\n": "é\u{1}"}), &mut esc);
        assert_eq!(esc, "{\"k\\\"\\n\":\"é\\u0001\"}".as_bytes());
        assert_eq!(derived_key("q", None, &a), derived_key("q", None, &b));
        assert_eq!(derived_key("q", None, &a).len(), 32);
    }

    #[test]
    fn derived_key_separates_queue_name_and_args() {
        let args = json!(["x"]);
        let k = derived_key("q", None, &args);
        assert_ne!(k, derived_key("r", None, &args));
        assert_ne!(k, derived_key("q", Some("h"), &args));
        assert_ne!(k, derived_key("q", None, &json!(["y"])));
        // Length prefixes: moving bytes between queue and name changes the key.
        assert_ne!(
            derived_key("ab", Some("c"), &args),
            derived_key("a", Some("bc"), &args)
        );
        // Array order matters (it is part of the value).
        assert_ne!(
            derived_key("q", None, &json!([1, 2])),
            derived_key("q", None, &json!([2, 1]))
        );
    }

    #[test]
    fn derived_key_is_stable_across_builds() {
        // Pinned: a change here breaks deduplication against existing stores.
        assert_eq!(
            derived_key("default", None, &json!(["a", "b"])),
            derived_key("default", None, &json!(["a", "b"]))
        );
        let pinned = derived_key("default", Some("h"), &json!({"n": 1}));
        assert_eq!(pinned, PINNED_KEY);
    }

    /// SHA-256 of `cluster job key v1\0`, 7u64 LE, `default`, 1u8, 1u64 LE,
    /// `h`, `{"n":1}`, first 16 bytes (checked with Python's hashlib).
    const PINNED_KEY: &str = "2dac3dcd2e1547a917fcc707f81eb689";
}
