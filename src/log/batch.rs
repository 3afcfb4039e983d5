//! Forwarded records read in place: a worker's `Logs` datagram holds up to
//! a few hundred records; the watcher checks the batch where it arrives
//! and its log writer formats the records straight from the datagram's
//! bytes ([`RecordRef`] borrows its strings), so no record is built as
//! owned strings on the way (profile in BENCHMARKS.md: nine allocations
//! and frees a record, a third of the watcher's instructions under a
//! flood).
//!
//! [`RecordRef`] mirrors [`LogRecord`] field for field: postcard is not
//! self-describing, so the two must decode the same bytes (a test checks
//! it). Owned records (the watcher's own, printed lines) are formatted
//! through the same view ([`LogRecord::view`]).

use serde::Deserialize;

use super::record::{FieldValue, LogRecord};

/// A field's value, borrowed (the variants of [`FieldValue`], in order).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub(crate) enum FieldRef<'a> {
    Str(&'a str),
    I64(i64),
    U64(u64),
    F64(f64),
    Bool(bool),
}

impl FieldRef<'_> {
    /// The value as JSON (a non-finite float becomes its text).
    pub(crate) fn to_json(self) -> serde_json::Value {
        match self {
            FieldRef::Str(s) => serde_json::Value::String(s.to_string()),
            FieldRef::I64(n) => n.into(),
            FieldRef::U64(n) => n.into(),
            FieldRef::F64(f) => serde_json::Number::from_f64(f)
                .map(serde_json::Value::Number)
                .unwrap_or_else(|| serde_json::Value::String(f.to_string())),
            FieldRef::Bool(b) => b.into(),
        }
    }
}

impl std::fmt::Display for FieldRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FieldRef::Str(s) => f.write_str(s),
            FieldRef::I64(n) => write!(f, "{n}"),
            FieldRef::U64(n) => write!(f, "{n}"),
            FieldRef::F64(x) => write!(f, "{x}"),
            FieldRef::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// A log record whose strings borrow from a datagram or a [`LogRecord`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct RecordRef<'a> {
    pub level: u8,
    pub target: &'a str,
    pub message: &'a str,
    #[serde(borrow)]
    pub fields: Vec<(&'a str, FieldRef<'a>)>,
    #[serde(borrow)]
    pub spans: Vec<&'a str>,
    pub ts_nanos: u64,
}

impl FieldValue {
    pub(crate) fn view(&self) -> FieldRef<'_> {
        match self {
            FieldValue::Str(s) => FieldRef::Str(s),
            FieldValue::I64(n) => FieldRef::I64(*n),
            FieldValue::U64(n) => FieldRef::U64(*n),
            FieldValue::F64(x) => FieldRef::F64(*x),
            FieldValue::Bool(b) => FieldRef::Bool(*b),
        }
    }
}

impl LogRecord {
    /// The record as a view (allocates only when it has fields or spans).
    pub(crate) fn view(&self) -> RecordRef<'_> {
        RecordRef {
            level: self.level,
            target: &self.target,
            message: &self.message,
            fields: self
                .fields
                .iter()
                .map(|(k, v)| (k.as_str(), v.view()))
                .collect(),
            spans: self.spans.iter().map(String::as_str).collect(),
            ts_nanos: self.ts_nanos,
        }
    }
}

/// The records of a batch: the bytes of a `Vec<LogRecord>` as a worker
/// encoded it, all of them and nothing after. Never panics, whatever the
/// bytes; the error says what was wrong.
pub(crate) fn decode_batch(bytes: &[u8]) -> Result<Vec<RecordRef<'_>>, String> {
    let (records, rest) =
        postcard::take_from_bytes::<Vec<RecordRef<'_>>>(bytes).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} trailing bytes", rest.len()));
    }
    Ok(records)
}

/// A checked batch of forwarded records, as the bytes that arrived.
#[derive(Debug)]
pub(crate) struct LogBatch {
    bytes: Vec<u8>,
    records: usize,
}

impl LogBatch {
    /// Checks `bytes` (see [`decode_batch`]) and keeps a copy.
    pub(crate) fn check(bytes: &[u8]) -> Result<LogBatch, String> {
        let records = decode_batch(bytes)?.len();
        Ok(LogBatch {
            bytes: bytes.to_vec(),
            records,
        })
    }

    /// How many records it holds.
    pub(crate) fn len(&self) -> usize {
        self.records
    }

    /// Its size in bytes.
    pub(crate) fn size(&self) -> usize {
        self.bytes.len()
    }

    /// Its records (checked when it was made, so never an error here; an
    /// empty list if it somehow were).
    pub(crate) fn records(&self) -> Vec<RecordRef<'_>> {
        decode_batch(&self.bytes).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records() -> Vec<LogRecord> {
        vec![
            LogRecord {
                level: 3,
                target: "app::db".into(),
                message: "query ünïcødé \"q\"".into(),
                fields: vec![
                    ("user".into(), FieldValue::Str("ann".into())),
                    ("n".into(), FieldValue::I64(-3)),
                    ("big".into(), FieldValue::U64(u64::MAX)),
                    ("f".into(), FieldValue::F64(0.25)),
                    ("ok".into(), FieldValue::Bool(true)),
                ],
                spans: vec!["request".into(), "query".into()],
                ts_nanos: 1_764_000_000_123_456_789,
            },
            LogRecord {
                level: 1,
                target: String::new(),
                message: String::new(),
                fields: Vec::new(),
                spans: Vec::new(),
                ts_nanos: 0,
            },
        ]
    }

    #[test]
    fn a_batch_reads_what_the_worker_encoded() {
        let owned = records();
        let bytes = postcard::to_stdvec(&owned).unwrap();
        let batch = LogBatch::check(&bytes).unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.size(), bytes.len());
        let views: Vec<RecordRef<'_>> = owned.iter().map(LogRecord::view).collect();
        assert_eq!(batch.records(), views);
    }

    #[test]
    fn malformed_batches_are_errors_not_panics() {
        let bytes = postcard::to_stdvec(&records()).unwrap();
        for cut in 0..bytes.len() {
            assert!(LogBatch::check(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(LogBatch::check(&longer).unwrap_err().contains("trailing"));
        // Invalid UTF-8 in a string, a huge declared length.
        let mut bad = bytes.clone();
        let at = bad.windows(3).position(|w| w == b"app").unwrap();
        bad[at] = 0xff;
        assert!(LogBatch::check(&bad).is_err());
        assert!(LogBatch::check(&[0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        let mut noise = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2_000 {
            noise ^= noise << 13;
            noise ^= noise >> 7;
            noise ^= noise << 17;
            let junk = noise.to_le_bytes();
            let _ = LogBatch::check(&junk[..(noise % 9) as usize]);
        }
    }
}
