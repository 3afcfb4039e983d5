//! One forwarded log record, its typed field values, and the text format
//! both sides write.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::batch::{FieldRef, RecordRef};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Longest message or field value forwarded; longer ones are cut with a note.
pub(crate) const MAX_TEXT: usize = 8 * 1024;

/// A field's value with its type kept, so the JSON stream writes numbers
/// and booleans as numbers and booleans.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum FieldValue {
    Str(String),
    I64(i64),
    U64(u64),
    F64(f64),
    Bool(bool),
}

#[cfg(test)]
impl FieldValue {
    /// The value as JSON (a non-finite float becomes its text).
    pub(crate) fn to_json(&self) -> serde_json::Value {
        self.view().to_json()
    }
}

impl From<&str> for FieldValue {
    fn from(s: &str) -> Self {
        FieldValue::Str(s.to_string())
    }
}

impl std::fmt::Display for FieldValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.view().fmt(f)
    }
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

/// One structured log record, as forwarded from a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct LogRecord {
    /// 1 error, 2 warn, 3 info, 4 debug, 5 trace.
    pub level: u8,
    pub target: String,
    pub message: String,
    pub fields: Vec<(String, FieldValue)>,
    /// Names of the spans the event happened in, outermost first.
    pub spans: Vec<String>,
    /// Nanoseconds since the Unix epoch.
    pub ts_nanos: u64,
}

pub(crate) fn level_number(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        Level::TRACE => 5,
    }
}

pub(crate) fn level_name(n: u8) -> &'static str {
    match n {
        1 => "ERROR",
        2 => "WARN",
        3 => "INFO",
        4 => "DEBUG",
        _ => "TRACE",
    }
}

pub(crate) fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos().min(u64::MAX as u128) as u64)
        .unwrap_or(0)
}

/// RFC 3339 UTC with microseconds, without a date library.
pub(crate) fn format_timestamp(nanos: u64, out: &mut String) {
    let secs = nanos / 1_000_000_000;
    let micros = (nanos % 1_000_000_000) / 1_000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    // Digits pushed one by one: `write!` with padding cost about 2,000
    // instructions a timestamp, on the log writer's hot path.
    push_digits(out, y.clamp(0, 9999) as u64, 4);
    out.push('-');
    push_digits(out, m as u64, 2);
    out.push('-');
    push_digits(out, d as u64, 2);
    out.push('T');
    push_digits(out, rem / 3600, 2);
    out.push(':');
    push_digits(out, (rem % 3600) / 60, 2);
    out.push(':');
    push_digits(out, rem % 60, 2);
    out.push('.');
    push_digits(out, micros, 6);
    out.push('Z');
}

/// Appends the last `width` decimal digits of `n`, zero-padded.
fn push_digits(out: &mut String, n: u64, width: u32) {
    let mut div = 10u64.pow(width - 1);
    while div > 0 {
        out.push(char::from(b'0' + ((n / div) % 10) as u8));
        div /= 10;
    }
}

/// Cuts `s` to at most [`MAX_TEXT`] bytes on a character boundary.
pub(crate) fn clip(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let total = s.len();
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        let _ = write!(s, "… [{} bytes cut]", total - end);
    }
    s
}

/// Collects an event's message and fields, keeping their types.
#[derive(Default)]
pub(crate) struct FieldCollector {
    pub message: String,
    pub fields: Vec<(String, FieldValue)>,
}

impl FieldCollector {
    fn push(&mut self, field: &Field, value: FieldValue) {
        self.fields.push((field.name().to_string(), value));
    }
}

impl Visit for FieldCollector {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.push(field, FieldValue::Str(clip(value.to_string())));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, FieldValue::I64(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, FieldValue::U64(value));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        match i64::try_from(value) {
            Ok(n) => self.push(field, FieldValue::I64(n)),
            Err(_) => self.push(field, FieldValue::Str(value.to_string())),
        }
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        match u64::try_from(value) {
            Ok(n) => self.push(field, FieldValue::U64(n)),
            Err(_) => self.push(field, FieldValue::Str(value.to_string())),
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.push(field, FieldValue::F64(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, FieldValue::Bool(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.push(field, FieldValue::Str(clip(format!("{value:?}"))));
        }
    }
}

/// Builds a record from a tracing event.
pub(crate) fn record_from_event<S>(event: &Event<'_>, ctx: &Context<'_, S>) -> LogRecord
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let mut visitor = FieldCollector::default();
    event.record(&mut visitor);
    let spans = ctx
        .event_scope(event)
        .map(|scope| scope.from_root().map(|s| s.name().to_string()).collect())
        .unwrap_or_default();
    let meta = event.metadata();
    LogRecord {
        level: level_number(meta.level()),
        target: meta.target().to_string(),
        message: clip(visitor.message),
        fields: visitor.fields,
        spans,
        ts_nanos: now_nanos(),
    }
}

/// Formats a record as one text line (without the trailing newline).
pub(crate) fn format_text(record: &RecordRef<'_>, tag: &str, out: &mut String) {
    format_timestamp(record.ts_nanos, out);
    let _ = write!(out, " {:>5} ", level_name(record.level));
    if !tag.is_empty() {
        let _ = write!(out, "[{tag}] ");
    }
    if !record.spans.is_empty() {
        let _ = write!(out, "{}: ", record.spans.join(":"));
    }
    if !record.target.is_empty() {
        let _ = write!(out, "{}: ", record.target);
    }
    push_escaped(record.message, out);
    for (k, v) in &record.fields {
        let _ = write!(out, " {k}=");
        match v {
            FieldRef::Str(s) => push_escaped(s, out),
            other => {
                let _ = write!(out, "{other}");
            }
        }
    }
}

/// Appends `s` with control characters escaped, so a record stays one line.
fn push_escaped(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push('\t'),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::batch::LogBatch;
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        let mut s = String::new();
        format_timestamp(1_700_000_000_123_456_789, &mut s);
        assert_eq!(s, "2023-11-14T22:13:20.123456Z");
        s.clear();
        format_timestamp(0, &mut s);
        assert_eq!(s, "1970-01-01T00:00:00.000000Z");
        s.clear();
        format_timestamp(4_102_444_799_999_999_000, &mut s);
        assert_eq!(s, "2099-12-31T23:59:59.999999Z");
        s.clear();
        format_timestamp(951_827_696_000_001_000, &mut s);
        assert_eq!(s, "2000-02-29T12:34:56.000001Z");
    }

    #[test]
    fn text_lines_stay_one_line() {
        let r = LogRecord {
            level: 2,
            target: "app".into(),
            message: "two\nlines".into(),
            fields: vec![("k".into(), "v\r".into()), ("n".into(), FieldValue::U64(3))],
            spans: vec!["req".into()],
            ts_nanos: 0,
        };
        let mut s = String::new();
        format_text(&r.view(), "w1 pid 9", &mut s);
        assert_eq!(
            s,
            "1970-01-01T00:00:00.000000Z  WARN [w1 pid 9] req: app: two\\nlines k=v\\r n=3"
        );
    }

    #[test]
    fn field_types_are_kept() {
        use tracing_subscriber::prelude::*;
        #[derive(Clone, Default)]
        struct Grab(std::sync::Arc<std::sync::Mutex<Vec<LogRecord>>>);
        impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Grab {
            fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
                self.0.lock().unwrap().push(record_from_event(event, &ctx));
            }
        }
        let grab = Grab::default();
        let subscriber = tracing_subscriber::registry().with(grab.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                n = 1u64,
                neg = -2i64,
                ok = true,
                ratio = 0.5,
                who = "ann",
                big = 1u128 << 100,
                "hi"
            );
        });
        let got = grab.0.lock().unwrap();
        let fields = &got[0].fields;
        let json: Vec<(String, serde_json::Value)> = fields
            .iter()
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect();
        assert_eq!(
            serde_json::Value::Object(json.into_iter().collect()),
            serde_json::json!({"n": 1, "neg": -2, "ok": true, "ratio": 0.5, "who": "ann", "big": "1267650600228229401496703205376"})
        );
        assert_eq!(got[0].message, "hi");
    }

    #[test]
    fn clip_cuts_on_a_char_boundary() {
        let s = clip("é".repeat(MAX_TEXT));
        assert!(s.len() < MAX_TEXT + 40);
        assert!(s.ends_with("bytes cut]"));
    }

    #[test]
    fn non_finite_floats_become_text() {
        assert_eq!(
            FieldValue::F64(f64::NAN).to_json(),
            serde_json::json!("NaN")
        );
    }

    fn batch_records() -> Vec<LogRecord> {
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
        let owned = batch_records();
        let bytes = postcard::to_stdvec(&owned).unwrap();
        let batch = LogBatch::check(&bytes).unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.size(), bytes.len());
        let views: Vec<RecordRef<'_>> = owned.iter().map(LogRecord::view).collect();
        assert_eq!(batch.records(), views);
    }

    #[test]
    fn malformed_batches_are_errors_not_panics() {
        let bytes = postcard::to_stdvec(&batch_records()).unwrap();
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
