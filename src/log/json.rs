//! One log record as a JSON line, written straight into the writer's
//! buffer: no `serde_json::Map` of the fields, no allocation per record in
//! the common case. The output is byte for byte what `serde_json` writes
//! for the same object (keys in the same order, fields sorted by key with
//! the last of equal keys kept, the same string escapes); the tests check
//! that against `serde_json`.
//!
//! A profile of the watcher under a log flood (BENCHMARKS.md) put 57 % of
//! the writer thread's instructions in building the map and serializing
//! it; this is the hot path of the one thread that writes the stream.

use std::fmt::Write;

use super::batch::{FieldRef, RecordRef};
use super::record::{format_timestamp, level_name};
#[cfg(test)]
use super::record::{FieldValue, LogRecord};

/// Who a line is from: the keys written before the record's own.
pub(crate) struct JsonHead<'a> {
    pub source: &'a str,
    pub slot: Option<u32>,
    pub job: Option<i64>,
    pub pid: u32,
}

/// Appends `record` as one JSON object (no newline) to `out`.
pub(crate) fn write_json_line(head: &JsonHead<'_>, record: &RecordRef<'_>, out: &mut String) {
    out.push_str("{\"ts\":\"");
    format_timestamp(record.ts_nanos, out);
    out.push_str("\",\"level\":\"");
    out.push_str(level_name(record.level));
    out.push_str("\",\"source\":");
    push_str(out, head.source);
    let mut digits = itoa::Buffer::new();
    if let Some(slot) = head.slot {
        out.push_str(",\"slot\":");
        out.push_str(digits.format(slot));
    }
    if let Some(job) = head.job {
        out.push_str(",\"job\":");
        out.push_str(digits.format(job));
    }
    out.push_str(",\"pid\":");
    out.push_str(digits.format(head.pid));
    if !record.target.is_empty() {
        out.push_str(",\"target\":");
        push_str(out, record.target);
    }
    out.push_str(",\"message\":");
    push_str(out, record.message);
    write_fields(&record.fields, out);
    if !record.spans.is_empty() {
        out.push_str(",\"spans\":[");
        for (i, span) in record.spans.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_str(out, span);
        }
        out.push(']');
    }
    out.push('}');
}

/// `,"fields":{...}` in key order, the last of equal keys kept (what a
/// `BTreeMap` built from the list holds); nothing when there are none.
fn write_fields(fields: &[(&str, FieldRef<'_>)], out: &mut String) {
    if fields.is_empty() {
        return;
    }
    out.push_str(",\"fields\":{");
    let sorted = fields.windows(2).all(|w| w[0].0 < w[1].0);
    if sorted {
        for (i, (key, value)) in fields.iter().enumerate() {
            push_field(i == 0, key, *value, out);
        }
    } else {
        let mut order: Vec<&(&str, FieldRef<'_>)> = fields.iter().collect();
        // Stable: among equal keys the last one given stays last.
        order.sort_by(|a, b| a.0.cmp(b.0));
        let mut first = true;
        for (i, (key, value)) in order.iter().map(|f| (f.0, f.1)).enumerate() {
            if order.get(i + 1).is_some_and(|next| next.0 == key) {
                continue;
            }
            push_field(first, key, value, out);
            first = false;
        }
    }
    out.push('}');
}

fn push_field(first: bool, key: &str, value: FieldRef<'_>, out: &mut String) {
    if !first {
        out.push(',');
    }
    push_str(out, key);
    out.push(':');
    match value {
        FieldRef::Str(s) => push_str(out, s),
        FieldRef::I64(n) => out.push_str(itoa::Buffer::new().format(n)),
        FieldRef::U64(n) => out.push_str(itoa::Buffer::new().format(n)),
        FieldRef::Bool(b) => out.push_str(if b { "true" } else { "false" }),
        // Rare: serde_json's own float formatting (a non-finite one is its text).
        FieldRef::F64(_) => match serde_json::to_string(&value.to_json()) {
            Ok(s) => out.push_str(&s),
            Err(_) => out.push_str("null"),
        },
    }
}

/// Appends `s` as a JSON string with serde_json's escapes: `"` `\` and the
/// control characters below U+0020 (`\b \t \n \f \r` by name, the rest as
/// `\u00XX`); everything else, non-ASCII included, as it is.
fn push_str(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        // `i` is at an ASCII byte, so both slices end on char boundaries.
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{:04x}", b);
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the writer wrote before: a serde_json object built the slow way.
    fn reference(head: &JsonHead<'_>, record: &LogRecord) -> String {
        let mut ts = String::new();
        format_timestamp(record.ts_nanos, &mut ts);
        let mut object = serde_json::Map::new();
        object.insert("ts".into(), ts.into());
        object.insert("level".into(), level_name(record.level).into());
        object.insert("source".into(), head.source.into());
        if let Some(slot) = head.slot {
            object.insert("slot".into(), slot.into());
        }
        if let Some(job) = head.job {
            object.insert("job".into(), job.into());
        }
        object.insert("pid".into(), head.pid.into());
        if !record.target.is_empty() {
            object.insert("target".into(), record.target.clone().into());
        }
        object.insert("message".into(), record.message.clone().into());
        let fields: serde_json::Map<String, serde_json::Value> = record
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect();
        if !fields.is_empty() {
            object.insert("fields".into(), fields.into());
        }
        if !record.spans.is_empty() {
            object.insert("spans".into(), record.spans.clone().into());
        }
        // The object's keys were written in this order by the old struct.
        let order = [
            "ts", "level", "source", "slot", "job", "pid", "target", "message", "fields", "spans",
        ];
        let mut s = String::from("{");
        for key in order {
            if let Some(v) = object.get(key) {
                if s.len() > 1 {
                    s.push(',');
                }
                s.push_str(&serde_json::to_string(key).unwrap());
                s.push(':');
                s.push_str(&serde_json::to_string(v).unwrap());
            }
        }
        s.push('}');
        s
    }

    fn record(message: &str, fields: Vec<(String, FieldValue)>) -> LogRecord {
        LogRecord {
            level: 3,
            target: "app::db".into(),
            message: message.into(),
            fields,
            spans: vec!["request".into(), "q\"uery".into()],
            ts_nanos: 1_764_000_000_123_456_789,
        }
    }

    #[test]
    fn the_line_is_what_serde_json_writes() {
        let every_byte: String = (0u8..0x80).map(char::from).collect();
        let messages = [
            "record",
            "",
            "quote \" backslash \\ slash / tab \t nl \n cr \r",
            "\u{7f} \u{1b}[31m ünïcødé 日本 🎉",
            every_byte.as_str(),
        ];
        let fields = vec![
            vec![],
            vec![("user".into(), FieldValue::Str("ann \"a\"".into()))],
            vec![
                ("z".into(), FieldValue::I64(-5)),
                ("a".into(), FieldValue::U64(u64::MAX)),
                ("m".into(), FieldValue::Bool(true)),
                ("a".into(), FieldValue::Str("last wins".into())),
                ("f".into(), FieldValue::F64(1.5e-7)),
                ("inf".into(), FieldValue::F64(f64::INFINITY)),
                ("k\n".into(), FieldValue::Bool(false)),
            ],
            vec![
                ("a".into(), FieldValue::I64(1)),
                ("b".into(), FieldValue::I64(2)),
            ],
        ];
        let heads = [
            JsonHead {
                source: "worker",
                slot: Some(2),
                job: None,
                pid: 1234,
            },
            JsonHead {
                source: "stderr",
                slot: None,
                job: Some(-7),
                pid: 1,
            },
        ];
        for head in &heads {
            for message in messages {
                for f in &fields {
                    let mut r = record(message, f.clone());
                    let spanned = r.spans.clone();
                    for target in ["app::db", ""] {
                        r.target = target.into();
                        for spans in [vec![], spanned.clone()] {
                            r.spans = spans;
                            let mut out = String::new();
                            write_json_line(head, &r.view(), &mut out);
                            assert_eq!(out, reference(head, &r));
                            let _: serde_json::Value = serde_json::from_str(&out).unwrap();
                        }
                    }
                }
            }
        }
    }
}
