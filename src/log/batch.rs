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
//! through the same view (`LogRecord::view`, in `record.rs`: this
//! module is a leaf).

use serde::Deserialize;

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
