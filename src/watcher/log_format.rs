//! How one entry of the watcher's log stream is written: the formats,
//! where an entry came from, and the line as text or JSON (a printed line
//! that is itself a JSON object keeps its keys as fields). A leaf, so the
//! stream's queue and writer (`output.rs`) stay apart from the format.

use serde::Serialize;

use crate::log::{format_text, format_timestamp, level_name, write_json_line, JsonHead, RecordRef};

/// How the watcher writes its log stream.
///
/// ```no_run
/// use cluster::{LogFilter, LogFormat, LogOutput};
/// let output = LogOutput::stderr(LogFormat::Json, LogFilter::default());
/// # drop(output);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LogFormat {
    /// `2026-11-23T10:00:00.000000Z  INFO [w2 1234] target: message k=v`
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Watcher,
    Worker {
        slot: u32,
        pid: u32,
    },
    Stdout {
        slot: u32,
        pid: u32,
    },
    Stderr {
        slot: u32,
        pid: u32,
    },
    /// A line a per-job process printed (`stderr` or stdout).
    Job {
        job: i64,
        pid: u32,
        stderr: bool,
    },
}

#[derive(Serialize)]
struct JsonLine<'a> {
    ts: &'a str,
    level: &'static str,
    source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    slot: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<i64>,
    pid: u32,
    #[serde(skip_serializing_if = "str::is_empty")]
    target: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    fields: serde_json::Map<String, serde_json::Value>,
    #[serde(skip_serializing_if = "<[&str]>::is_empty")]
    spans: &'a [&'a str],
}

pub(crate) fn format_record(
    from: Source,
    record: &RecordRef<'_>,
    format: LogFormat,
    watcher_pid: u32,
    out: &mut String,
) {
    let (source, slot, pid) = match from {
        Source::Watcher => ("watcher", None, watcher_pid),
        Source::Worker { slot, pid } => ("worker", Some(slot), pid),
        Source::Stdout { slot, pid } => ("stdout", Some(slot), pid),
        Source::Stderr { slot, pid } => ("stderr", Some(slot), pid),
        Source::Job { pid, stderr, .. } => (if stderr { "stderr" } else { "stdout" }, None, pid),
    };
    let job = match from {
        Source::Job { job, .. } => Some(job),
        _ => None,
    };
    match format {
        LogFormat::Text => {
            let tag = match (from, slot) {
                (Source::Watcher, _) => "watcher".to_string(),
                (Source::Worker { .. }, Some(slot)) => format!("w{slot} {pid}"),
                (Source::Job { job, .. }, _) => format!("job {job} {pid} {source}"),
                (_, Some(slot)) => format!("w{slot} {pid} {source}"),
                (_, None) => String::new(),
            };
            format_text(record, &tag, out);
        }
        LogFormat::Json => {
            if source_is_line(from) {
                if let Some((text, object)) = json_object_line(record.message) {
                    format_object_line(record, source, slot, job, pid, text, object, out);
                    return;
                }
            }
            let head = JsonHead {
                source,
                slot,
                job,
                pid,
            };
            write_json_line(&head, record, out);
        }
    }
}

/// A printed line that was a JSON object: its keys join the record's
/// fields (the slow path: a map, as before).
#[allow(clippy::too_many_arguments)]
fn format_object_line(
    record: &RecordRef<'_>,
    source: &'static str,
    slot: Option<u32>,
    job: Option<i64>,
    pid: u32,
    message: String,
    object: serde_json::Map<String, serde_json::Value>,
    out: &mut String,
) {
    let mut ts = String::with_capacity(32);
    format_timestamp(record.ts_nanos, &mut ts);
    let mut fields: serde_json::Map<String, serde_json::Value> = record
        .fields
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_json()))
        .collect();
    fields.extend(object);
    let line = JsonLine {
        ts: &ts,
        level: level_name(record.level),
        source,
        slot,
        job,
        pid,
        target: record.target,
        message: &message,
        fields,
        spans: &record.spans,
    };
    match serde_json::to_string(&line) {
        Ok(s) => out.push_str(&s),
        Err(e) => out.push_str(&format!(
            "{{\"level\":\"ERROR\",\"message\":\"unencodable record: {e}\"}}"
        )),
    }
}

/// Whether the entry is a line a process printed (not a record).
fn source_is_line(source: Source) -> bool {
    matches!(
        source,
        Source::Stdout { .. } | Source::Stderr { .. } | Source::Job { .. }
    )
}

/// A printed line that is one JSON object (a structured logger's output):
/// its `message` or `msg` text, and its other keys as fields, so the
/// object stays an object in the JSON stream instead of a quoted string.
fn json_object_line(line: &str) -> Option<(String, serde_json::Map<String, serde_json::Value>)> {
    if !line.trim_start().starts_with('{') {
        return None;
    }
    let serde_json::Value::Object(mut object) = serde_json::from_str(line).ok()? else {
        return None;
    };
    let text = ["message", "msg"]
        .iter()
        .find_map(|k| match object.get(*k) {
            Some(serde_json::Value::String(s)) => Some((k.to_string(), s.clone())),
            _ => None,
        });
    let message = match text {
        Some((key, text)) => {
            object.remove(&key);
            text
        }
        None => String::new(),
    };
    Some((message, object))
}
