//! The store itself: a tree of JSON objects addressed by dot path, with a
//! version on every key, optional expiry times and a byte limit. Pure
//! data structure: no I/O, no clock of its own (every call gets `now`),
//! no locking (the hub holds it under one lock, so every operation is
//! atomic against every other).
//!
//! Objects are kept as trees, so a path can reach into a value that was
//! set whole (`set("users", {"42": {...}})`, then `get("users.42.name")`);
//! every other JSON value (numbers, strings, arrays, ...) is a leaf.
//!
//! Versions: each change takes the next store **revision** and stamps it
//! on the changed key and on every key above it, so a key's version
//! changes whenever anything at or under it changes. Version 0 means
//! "absent".
//!
//! Size: every key costs its length plus [`ENTRY_OVERHEAD`] bytes, every
//! leaf its length as compact JSON. A write that would take the total past
//! the limit is refused before anything changes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::ser::{Serialize, SerializeMap, Serializer};

use super::path;
use crate::ipc::message::ChangeKind;

/// Bytes every key costs on top of its own length and its value's.
pub(crate) const ENTRY_OVERHEAD: usize = 64;

/// Why an operation did not apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreError {
    /// A bad path, a value on the way that is not an object, a value that
    /// is not an integer, JSON that does not parse.
    Invalid(String),
    /// The write would take the store past its byte limit.
    Full(String),
}

impl StoreError {
    /// The one-line reason.
    pub(crate) fn text(self) -> String {
        match self {
            StoreError::Invalid(s) | StoreError::Full(s) => s,
        }
    }
}

/// One change, for the watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Changed {
    pub revision: u64,
    pub kind: ChangeKind,
    pub path: String,
    /// The new value's JSON text (`None` when deleted or expired).
    pub value: Option<String>,
}

/// When a key expires, and a number unique to that expiry.
type Expiry = (Instant, u64);

/// One key's value.
pub(crate) struct Node {
    value: Value,
    version: u64,
    /// Bytes of this key and everything under it.
    size: usize,
    /// Keys at and under this one.
    count: usize,
    expires: Option<Expiry>,
}

enum Value {
    Leaf(serde_json::Value),
    Map(BTreeMap<String, Node>),
}

impl Serialize for Node {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.value {
            Value::Leaf(v) => v.serialize(s),
            Value::Map(m) => serialize_map(m, s),
        }
    }
}

fn serialize_map<S: Serializer>(m: &BTreeMap<String, Node>, s: S) -> Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(m.len()))?;
    for (k, v) in m {
        map.serialize_entry(k, v)?;
    }
    map.end()
}

/// The root object, serialized.
struct Root<'a>(&'a BTreeMap<String, Node>);

impl Serialize for Root<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_map(self.0, s)
    }
}

/// Counts the bytes of a serialization without keeping them.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Length of `v` as compact JSON.
fn json_len(v: &serde_json::Value) -> usize {
    let mut c = Counter(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// Compact JSON text of anything serializable (the store's own values
/// always serialize).
fn to_text<T: Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

impl Node {
    /// Builds the node for `value` stored at `key`: objects become maps
    /// (their keys checked), everything else a leaf.
    fn build(key: &str, value: serde_json::Value, version: u64) -> Result<Node, String> {
        let own = key.len() + ENTRY_OVERHEAD;
        match value {
            serde_json::Value::Object(obj) => {
                let mut map = BTreeMap::new();
                let (mut size, mut count) = (own, 1);
                for (k, v) in obj {
                    path::check_key(&k)?;
                    let child = Node::build(&k, v, version)?;
                    size += child.size;
                    count += child.count;
                    map.insert(k, child);
                }
                Ok(Node {
                    value: Value::Map(map),
                    version,
                    size,
                    count,
                    expires: None,
                })
            }
            leaf => Ok(Node {
                size: own + json_len(&leaf),
                value: Value::Leaf(leaf),
                version,
                count: 1,
                expires: None,
            }),
        }
    }

    fn empty_map(key: &str, version: u64) -> Node {
        Node {
            value: Value::Map(BTreeMap::new()),
            version,
            size: key.len() + ENTRY_OVERHEAD,
            count: 1,
            expires: None,
        }
    }

    /// Every expiry at and under this node.
    fn expiries(&self, out: &mut Vec<Expiry>) {
        out.extend(self.expires);
        if let Value::Map(m) = &self.value {
            for child in m.values() {
                child.expiries(out);
            }
        }
    }
}

/// The tree, its counters and its expiry index.
pub(crate) struct Store {
    root: BTreeMap<String, Node>,
    revision: u64,
    bytes: usize,
    keys: usize,
    max_bytes: usize,
    /// Expiry time → path of the key that expires then.
    ttl: BTreeMap<Expiry, String>,
    /// The unique part of the next expiry.
    expiry_seq: u64,
}

/// The store's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub keys: usize,
    pub bytes: usize,
    pub max_bytes: usize,
    pub revision: u64,
}

fn invalid(e: impl Into<String>) -> StoreError {
    StoreError::Invalid(e.into())
}

fn keys_of(p: &str) -> Result<Vec<&str>, StoreError> {
    let keys = path::parse(p).map_err(invalid)?;
    if keys.is_empty() {
        return Err(invalid(
            "the root cannot be written: give a path (for example \"hits\")",
        ));
    }
    Ok(keys)
}

/// Parses the JSON text of a value.
pub(crate) fn parse_value(text: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text).map_err(|e| invalid(format!("the value is not JSON: {e}")))
}

impl Store {
    pub(crate) fn new(max_bytes: usize) -> Store {
        Store {
            root: BTreeMap::new(),
            revision: 0,
            bytes: 0,
            keys: 0,
            max_bytes,
            ttl: BTreeMap::new(),
            expiry_seq: 0,
        }
    }

    pub(crate) fn counts(&self) -> Counts {
        Counts {
            keys: self.keys,
            bytes: self.bytes,
            max_bytes: self.max_bytes,
            revision: self.revision,
        }
    }

    fn node(&self, keys: &[&str]) -> Option<&Node> {
        let (last, above) = keys.split_last()?;
        let mut map = &self.root;
        for k in above {
            match &map.get(*k)?.value {
                Value::Map(m) => map = m,
                Value::Leaf(_) => return None,
            }
        }
        map.get(*last)
    }

    /// The value at `path` as JSON text and its version; `None` when
    /// missing (also below a value that is not an object). The empty path
    /// is the whole store.
    pub(crate) fn get(&self, p: &str) -> Result<Option<(String, u64)>, StoreError> {
        let keys = path::parse(p).map_err(invalid)?;
        if keys.is_empty() {
            return Ok(Some((to_text(&Root(&self.root)), self.revision)));
        }
        Ok(self.node(&keys).map(|n| (to_text(n), n.version)))
    }

    /// The value at `path`, parsed (for comparisons).
    fn get_json(&self, keys: &[&str]) -> Option<serde_json::Value> {
        self.node(keys).and_then(|n| serde_json::to_value(n).ok())
    }

    /// Sets `path` to the JSON `text`, creating missing objects on the
    /// way; `ttl` makes it expire. Returns the change (its revision is the
    /// new version).
    pub(crate) fn set(
        &mut self,
        p: &str,
        text: &str,
        ttl: Option<Duration>,
        now: Instant,
    ) -> Result<Changed, StoreError> {
        let value = parse_value(text)?;
        self.put(p, value, text.to_string(), ttl, false, now)
    }

    /// Adds `by` to the integer at `path` (a missing one counts as 0);
    /// keeps its expiry.
    pub(crate) fn increment(
        &mut self,
        p: &str,
        by: i64,
        now: Instant,
    ) -> Result<(i64, Changed), StoreError> {
        let keys = keys_of(p)?;
        let current = match self.node(&keys).map(|n| &n.value) {
            None => 0,
            Some(Value::Leaf(serde_json::Value::Number(n))) if n.is_i64() => {
                n.as_i64().unwrap_or(0)
            }
            Some(Value::Leaf(serde_json::Value::Number(n))) if n.is_u64() => {
                return Err(invalid(format!(
                    "{p} is {n}, beyond a 64-bit signed integer"
                )))
            }
            Some(Value::Leaf(v)) => {
                return Err(invalid(format!("{p} is {}, not an integer", kind_of(v))))
            }
            Some(Value::Map(_)) => {
                return Err(invalid(format!("{p} is an object, not an integer")))
            }
        };
        let new = current
            .checked_add(by)
            .ok_or_else(|| invalid(format!("{p} + {by} overflows a 64-bit signed integer")))?;
        let changed = self.put(p, new.into(), new.to_string(), None, true, now)?;
        Ok((new, changed))
    }

    /// Sets `path` to `new` if its value equals `expected` (`None`: absent).
    pub(crate) fn compare_and_swap(
        &mut self,
        p: &str,
        expected: Option<&str>,
        new: &str,
        now: Instant,
    ) -> Result<Option<Changed>, StoreError> {
        let keys = keys_of(p)?;
        let expected = expected.map(parse_value).transpose()?;
        let new_value = parse_value(new)?;
        if self.get_json(&keys) != expected {
            return Ok(None);
        }
        self.put(p, new_value, new.to_string(), None, false, now)
            .map(Some)
    }

    /// Sets `path` to `text` if its version is `version` (0: absent).
    pub(crate) fn update(
        &mut self,
        p: &str,
        version: u64,
        text: &str,
        now: Instant,
    ) -> Result<Option<Changed>, StoreError> {
        let keys = keys_of(p)?;
        let value = parse_value(text)?;
        let current = self.node(&keys).map_or(0, |n| n.version);
        if current != version {
            return Ok(None);
        }
        self.put(p, value, text.to_string(), None, false, now)
            .map(Some)
    }

    /// Removes `path` and everything under it. `None` when it was missing.
    pub(crate) fn delete(&mut self, p: &str) -> Result<Option<Changed>, StoreError> {
        let keys = keys_of(p)?;
        Ok(self.remove(&keys, ChangeKind::Deleted))
    }

    /// Removes the keys whose time is up, oldest first.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Changed> {
        let mut out = Vec::new();
        while let Some((&(at, rev), _)) = self.ttl.first_key_value() {
            if at > now {
                break;
            }
            let Some(p) = self.ttl.remove(&(at, rev)) else {
                break;
            };
            let keys: Vec<&str> = p.split('.').collect();
            let ours = self
                .node(&keys)
                .is_some_and(|n| n.expires == Some((at, rev)));
            if ours {
                out.extend(self.remove(&keys, ChangeKind::Expired));
            }
        }
        out
    }

    /// When the next key expires.
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.ttl.first_key_value().map(|(&(at, _), _)| at)
    }

    /// Every key with an expiry: its path and when.
    pub(crate) fn expiries(&self) -> impl Iterator<Item = (&str, Instant)> {
        self.ttl.iter().map(|(&(at, _), p)| (p.as_str(), at))
    }

    /// Checks a write of `node` at `keys` against the types on the way and
    /// the byte limit, before anything changes.
    fn check(&self, keys: &[&str], node: &Node) -> Result<(), StoreError> {
        let (last, above) = keys.split_last().ok_or_else(|| invalid("empty path"))?;
        let mut map = Some(&self.root);
        let mut created = 0;
        for (i, k) in above.iter().enumerate() {
            match map.and_then(|m| m.get(*k)) {
                Some(n) => match &n.value {
                    Value::Map(m) => map = Some(m),
                    Value::Leaf(v) => {
                        return Err(invalid(format!(
                            "cannot set {}: {} is {}, not an object",
                            keys.join("."),
                            path::join(keys, i + 1),
                            kind_of(v)
                        )))
                    }
                },
                None => {
                    map = None;
                    created += k.len() + ENTRY_OVERHEAD;
                }
            }
        }
        let old = map.and_then(|m| m.get(*last)).map_or(0, |n| n.size);
        let grows = (node.size + created).saturating_sub(old);
        if grows > 0 && self.bytes + grows > self.max_bytes {
            return Err(StoreError::Full(format!(
                "storage is full: writing {} needs {grows} more bytes; {} of {} bytes are used (--storage-max-bytes)",
                keys.join("."),
                self.bytes,
                self.max_bytes
            )));
        }
        Ok(())
    }

    /// Writes `value` at `p` (checked first); `text` is its JSON for the
    /// watches. `keep_ttl` carries an existing expiry over (increment).
    fn put(
        &mut self,
        p: &str,
        value: serde_json::Value,
        text: String,
        ttl: Option<Duration>,
        keep_ttl: bool,
        now: Instant,
    ) -> Result<Changed, StoreError> {
        let keys = keys_of(p)?;
        let last = keys[keys.len() - 1];
        let revision = self.revision + 1;
        let mut node = Node::build(last, value, revision).map_err(invalid)?;
        self.check(&keys, &node)?;
        if let Some(ttl) = ttl {
            let at = now
                .checked_add(ttl)
                .unwrap_or(now + Duration::from_secs(86_400 * 365));
            self.expiry_seq += 1;
            node.expires = Some((at, self.expiry_seq));
        }
        let mut removed = None;
        let (ds, dc) = put_in(
            &mut self.root,
            &keys,
            node,
            revision,
            keep_ttl,
            &mut removed,
        );
        self.revision = revision;
        self.bytes = self.bytes.saturating_add_signed(ds);
        self.keys = self.keys.saturating_add_signed(dc);
        if let Some(old) = removed {
            self.forget_expiries(&old, keep_ttl);
        }
        if let Some(at) = ttl.and(self.node(&keys).and_then(|n| n.expires)) {
            self.ttl.insert(at, p.to_string());
        }
        Ok(Changed {
            revision,
            kind: ChangeKind::Set,
            path: p.to_string(),
            value: Some(text),
        })
    }

    /// Drops the expiry index entries of a removed subtree (all but its
    /// top's when that expiry was carried over).
    fn forget_expiries(&mut self, old: &Node, kept_top: bool) {
        if self.ttl.is_empty() {
            return;
        }
        let mut gone = Vec::new();
        old.expiries(&mut gone);
        for e in gone {
            if kept_top && Some(e) == old.expires {
                continue;
            }
            self.ttl.remove(&e);
        }
    }

    fn remove(&mut self, keys: &[&str], kind: ChangeKind) -> Option<Changed> {
        let revision = self.revision + 1;
        let old = remove_in(&mut self.root, keys, revision)?;
        self.revision = revision;
        self.bytes = self.bytes.saturating_sub(old.size);
        self.keys = self.keys.saturating_sub(old.count);
        self.forget_expiries(&old, false);
        Some(Changed {
            revision,
            kind,
            path: keys.join("."),
            value: None,
        })
    }

    /// Replaces the whole store with `root` (an object), every key at
    /// `revision`, and the given expiries (path, when).
    pub(crate) fn load(
        &mut self,
        root: serde_json::Value,
        revision: u64,
        expiries: Vec<(String, Instant)>,
    ) -> Result<(), StoreError> {
        let serde_json::Value::Object(obj) = root else {
            return Err(invalid("the stored data must be a JSON object"));
        };
        // Version 0 means absent: loaded keys start at 1 at least.
        let revision = revision.max(1);
        let mut fresh = Store::new(self.max_bytes);
        fresh.revision = revision;
        for (k, v) in obj {
            path::check_key(&k).map_err(invalid)?;
            let node = Node::build(&k, v, revision).map_err(invalid)?;
            fresh.bytes += node.size;
            fresh.keys += node.count;
            fresh.root.insert(k, node);
        }
        if fresh.bytes > fresh.max_bytes {
            return Err(StoreError::Full(format!(
                "the data takes {} bytes, more than the limit of {} (--storage-max-bytes)",
                fresh.bytes, fresh.max_bytes
            )));
        }
        for (p, at) in expiries {
            let keys: Vec<&str> = p.split('.').collect();
            fresh.expiry_seq += 1;
            let e = (at, fresh.expiry_seq);
            if let Some(n) = node_mut(&mut fresh.root, &keys) {
                n.expires = Some(e);
                fresh.ttl.insert(e, p.clone());
            }
        }
        *self = fresh;
        Ok(())
    }
}

fn node_mut<'a>(map: &'a mut BTreeMap<String, Node>, keys: &[&str]) -> Option<&'a mut Node> {
    let (first, rest) = keys.split_first()?;
    let node = map.get_mut(*first)?;
    if rest.is_empty() {
        return Some(node);
    }
    match &mut node.value {
        Value::Map(m) => node_mut(m, rest),
        Value::Leaf(_) => None,
    }
}

/// Puts `node` at `keys` under `map` (the way was checked), stamping
/// `revision` on every key above it; returns the change in (bytes, keys).
fn put_in(
    map: &mut BTreeMap<String, Node>,
    keys: &[&str],
    mut node: Node,
    revision: u64,
    keep_ttl: bool,
    removed: &mut Option<Node>,
) -> (isize, isize) {
    let Some((first, rest)) = keys.split_first() else {
        return (0, 0);
    };
    if rest.is_empty() {
        let (s, c) = (node.size as isize, node.count as isize);
        if keep_ttl {
            node.expires = map.get(*first).and_then(|old| old.expires);
        }
        return match map.insert((*first).to_string(), node) {
            Some(old) => {
                let d = (s - old.size as isize, c - old.count as isize);
                *removed = Some(old);
                d
            }
            None => (s, c),
        };
    }
    let mut created = (0, 0);
    if !map.contains_key(*first) {
        let fresh = Node::empty_map(first, revision);
        created = (fresh.size as isize, 1);
        map.insert((*first).to_string(), fresh);
    }
    let Some(child) = map.get_mut(*first) else {
        return (0, 0);
    };
    let Value::Map(m) = &mut child.value else {
        return (0, 0); // refused by `check` before
    };
    let (ds, dc) = put_in(m, rest, node, revision, keep_ttl, removed);
    child.size = child.size.saturating_add_signed(ds);
    child.count = child.count.saturating_add_signed(dc);
    child.version = revision;
    (ds + created.0, dc + created.1)
}

/// Removes the node at `keys` under `map`, stamping `revision` on every
/// key above it.
fn remove_in(map: &mut BTreeMap<String, Node>, keys: &[&str], revision: u64) -> Option<Node> {
    let (first, rest) = keys.split_first()?;
    if rest.is_empty() {
        return map.remove(*first);
    }
    let child = map.get_mut(*first)?;
    let Value::Map(m) = &mut child.value else {
        return None;
    };
    let old = remove_in(m, rest, revision)?;
    child.size = child.size.saturating_sub(old.size);
    child.count = child.count.saturating_sub(old.count);
    child.version = revision;
    Some(old)
}
