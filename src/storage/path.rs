//! Dot paths: `users.42.name` names the key `name` of the object at key
//! `42` of the object at key `users` of the store's root object. The empty
//! path is the root itself (for `get`, `watch` and dumps only).
//!
//! A key is any non-empty text without a dot; a numeric key such as `42`
//! names an object key, never an array index (arrays are values).

/// Longest path, in bytes.
pub(crate) const MAX_PATH: usize = 1024;

/// Most keys in one path.
pub(crate) const MAX_DEPTH: usize = 32;

/// Splits `path` into its keys. The empty path is the root (no keys).
///
/// # Errors
///
/// A one-line reason for a path that is too long, too deep, or has an
/// empty key (`a..b`, `.a`, `a.`).
pub(crate) fn parse(path: &str) -> Result<Vec<&str>, String> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    if path.len() > MAX_PATH {
        return Err(format!(
            "path of {} bytes is longer than {MAX_PATH} bytes",
            path.len()
        ));
    }
    let keys: Vec<&str> = path.split('.').collect();
    if keys.len() > MAX_DEPTH {
        return Err(format!(
            "path {path:?} has {} keys; at most {MAX_DEPTH}",
            keys.len()
        ));
    }
    if keys.iter().any(|k| k.is_empty()) {
        return Err(format!("path {path:?} has an empty key"));
    }
    Ok(keys)
}

/// Checks a key inside a value being stored: it must be addressable by a
/// path later (non-empty, no dot).
pub(crate) fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("an object in the value has an empty key".into());
    }
    if key.contains('.') {
        return Err(format!(
            "key {key:?} in the value contains a dot, so no path could name it"
        ));
    }
    Ok(())
}

/// Whether a change at `changed` concerns a watch on `prefix`: the change
/// is at or under the prefix, or above it (it replaced or removed the
/// watched subtree).
pub(crate) fn related(prefix: &[String], changed: &[&str]) -> bool {
    prefix.iter().zip(changed).all(|(a, b)| a == b)
}

/// The first `n` keys of `keys` joined with dots.
pub(crate) fn join(keys: &[&str], n: usize) -> String {
    keys[..n.min(keys.len())].join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_on_dots() {
        assert_eq!(parse("users.42.name").unwrap(), ["users", "42", "name"]);
        assert_eq!(parse("hits").unwrap(), ["hits"]);
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn bad_paths_are_refused_with_a_reason() {
        for bad in ["a..b", ".a", "a.", "."] {
            assert!(parse(bad).unwrap_err().contains("empty key"), "{bad}");
        }
        let deep = vec!["k"; MAX_DEPTH + 1].join(".");
        assert!(parse(&deep).unwrap_err().contains("keys"));
        assert!(parse(&vec!["k"; MAX_DEPTH].join(".")).is_ok());
        let long = "x".repeat(MAX_PATH + 1);
        assert!(parse(&long).unwrap_err().contains("longer"));
    }

    #[test]
    fn keys_in_values_must_be_addressable() {
        assert!(check_key("name").is_ok());
        assert!(check_key("42").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key("a.b").unwrap_err().contains("dot"));
    }

    #[test]
    fn related_covers_below_at_and_above() {
        let prefix: Vec<String> = vec!["users".into(), "42".into()];
        assert!(related(&prefix, &["users", "42"]));
        assert!(related(&prefix, &["users", "42", "name"]));
        assert!(related(&prefix, &["users"]));
        assert!(related(&prefix, &[]));
        assert!(!related(&prefix, &["users", "43"]));
        assert!(!related(&prefix, &["groups", "42"]));
        assert!(related(&[], &["anything"]));
    }
}
