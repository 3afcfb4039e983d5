//! Log records: what a worker forwards to the watcher, and how both sides
//! format and filter them.
//!
//! In a worker, [`Cluster::log_layer`](crate::Cluster::log_layer) turns each
//! `tracing` event into a [`LogRecord`] and hands it to the IPC thread
//! through a bounded queue: a full queue drops the record and counts it, so
//! logging never blocks the worker's request path; the count is sent to the
//! watcher, which reports it. The IPC thread packs queued records into as
//! few datagrams as fit. Standalone, the layer writes the same text format
//! to stderr.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Records a worker may queue before it starts dropping them.
pub(crate) const WORKER_QUEUE: usize = 16 * 1024;

/// Longest message or field value forwarded; longer ones are cut with a note.
pub(crate) const MAX_TEXT: usize = 8 * 1024;

/// One structured log record, as forwarded from a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LogRecord {
    /// 1 error, 2 warn, 3 info, 4 debug, 5 trace.
    pub level: u8,
    pub target: String,
    pub message: String,
    pub fields: Vec<(String, String)>,
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
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    );
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

/// Level filter with per-target directives: `info`, `warn,my_app=debug`.
/// The longest matching target prefix wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFilter {
    default: u8,
    directives: Vec<(String, u8)>,
}

impl Default for LogFilter {
    fn default() -> Self {
        LogFilter {
            default: 3,
            directives: Vec::new(),
        }
    }
}

fn parse_level(s: &str) -> Option<u8> {
    Some(match s.to_ascii_lowercase().as_str() {
        "off" => 0,
        "error" => 1,
        "warn" => 2,
        "info" => 3,
        "debug" => 4,
        "trace" => 5,
        _ => return None,
    })
}

impl LogFilter {
    /// Parses `level` or comma-separated `target=level` / `level` directives
    /// (levels: off, error, warn, info, debug, trace).
    ///
    /// # Errors
    ///
    /// [`Error::is_config`](crate::Error::is_config) with a one-line reason.
    pub fn parse(spec: &str) -> crate::Result<LogFilter> {
        let bad = |why: String| crate::Error::new(crate::error::Kind::Config, why);
        let mut filter = LogFilter::default();
        if spec.trim().is_empty() {
            return Err(bad("empty log filter".into()));
        }
        let is_target = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'))
        };
        for part in spec.split(',').map(str::trim) {
            match part.split_once('=') {
                Some((target, level)) if is_target(target) => match parse_level(level) {
                    Some(l) => filter.directives.push((target.to_string(), l)),
                    None => return Err(bad(format!("'{level}' is not a level (off, error, warn, info, debug, trace)"))),
                },
                Some(_) => return Err(bad(format!("'{part}' is not target=level"))),
                None => match parse_level(part) {
                    Some(l) => filter.default = l,
                    None if is_target(part) => filter.directives.push((part.to_string(), 5)),
                    None => {
                        return Err(bad(format!(
                            "'{part}' is not a level (off, error, warn, info, debug, trace) or target=level"
                        )))
                    }
                },
            }
        }
        // Longest prefix first.
        filter
            .directives
            .sort_by_key(|d| std::cmp::Reverse(d.0.len()));
        Ok(filter)
    }

    /// Whether a record at `level` (1 error .. 5 trace) from `target` passes.
    pub(crate) fn enabled(&self, target: &str, level: u8) -> bool {
        let max = self
            .directives
            .iter()
            .find(|(t, _)| target == t || target.starts_with(&format!("{t}::")))
            .map(|(_, l)| *l)
            .unwrap_or(self.default);
        level <= max
    }

    /// The most verbose level any directive allows.
    pub(crate) fn max_level(&self) -> u8 {
        self.directives
            .iter()
            .map(|d| d.1)
            .fold(self.default, u8::max)
    }
}

/// Collects an event's message and fields as strings.
#[derive(Default)]
pub(crate) struct FieldCollector {
    pub message: String,
    pub fields: Vec<(String, String)>,
}

impl Visit for FieldCollector {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.fields
                .push((field.name().to_string(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields
                .push((field.name().to_string(), format!("{value:?}")));
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
        fields: visitor
            .fields
            .into_iter()
            .map(|(k, v)| (k, clip(v)))
            .collect(),
        spans,
        ts_nanos: now_nanos(),
    }
}

/// Formats a record as one text line (without the trailing newline).
pub(crate) fn format_text(record: &LogRecord, tag: &str, out: &mut String) {
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
    push_escaped(&record.message, out);
    for (k, v) in &record.fields {
        let _ = write!(out, " {k}=");
        push_escaped(v, out);
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

/// What the worker's layer sends to the IPC thread.
pub(crate) struct WorkerLogQueue {
    pub tx: mpsc::Sender<LogRecord>,
    pub dropped: AtomicU64,
}

/// The `tracing_subscriber` layer returned by
/// [`Cluster::log_layer`](crate::Cluster::log_layer): forwards events to
/// the watcher in a worker, writes them to stderr when standalone.
pub struct ClusterLogLayer {
    queue: Option<&'static WorkerLogQueue>,
}

impl ClusterLogLayer {
    pub(crate) fn new(queue: Option<&'static WorkerLogQueue>) -> Self {
        ClusterLogLayer { queue }
    }
}

/// Hands a record to the watcher (worker) or writes it to stderr
/// (standalone). Never blocks in a worker.
pub(crate) fn deliver(queue: Option<&WorkerLogQueue>, record: LogRecord) {
    match queue {
        Some(queue) => {
            if queue.tx.try_send(record).is_err() {
                queue.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        None => {
            let mut line = String::with_capacity(128);
            format_text(&record, "", &mut line);
            line.push('\n');
            use std::io::Write;
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }
}

impl<S> Layer<S> for ClusterLogLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        deliver(self.queue, record_from_event(event, &ctx));
    }
}

/// The `slog::Drain` returned by [`Cluster::slog_drain`](crate::Cluster::slog_drain)
/// (feature `slog`): forwards records to the watcher in a worker, writes
/// them to stderr when standalone. Never blocks; never fails.
#[cfg(feature = "slog")]
pub struct ClusterSlogDrain {
    queue: Option<&'static WorkerLogQueue>,
}

#[cfg(feature = "slog")]
impl ClusterSlogDrain {
    pub(crate) fn new(queue: Option<&'static WorkerLogQueue>) -> Self {
        ClusterSlogDrain { queue }
    }
}

#[cfg(feature = "slog")]
struct SlogFields(Vec<(String, String)>);

#[cfg(feature = "slog")]
impl slog::Serializer for SlogFields {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        self.0.push((key.to_string(), clip(val.to_string())));
        Ok(())
    }
}

#[cfg(feature = "slog")]
impl slog::Drain for ClusterSlogDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        values: &slog::OwnedKVList,
    ) -> Result<(), slog::Never> {
        use slog::KV;
        let level = match record.level() {
            slog::Level::Critical | slog::Level::Error => 1,
            slog::Level::Warning => 2,
            slog::Level::Info => 3,
            slog::Level::Debug => 4,
            slog::Level::Trace => 5,
        };
        let mut fields = SlogFields(Vec::new());
        // Record pairs first, then the logger's context.
        let _ = record.kv().serialize(record, &mut fields);
        let _ = values.serialize(record, &mut fields);
        let target = if record.tag().is_empty() {
            record.module()
        } else {
            record.tag()
        };
        deliver(
            self.queue,
            LogRecord {
                level,
                target: target.to_string(),
                message: clip(record.msg().to_string()),
                fields: fields.0,
                spans: Vec::new(),
                ts_nanos: now_nanos(),
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        let mut s = String::new();
        format_timestamp(1_700_000_000_123_456_789, &mut s);
        assert_eq!(s, "2023-11-14T22:13:20.123456Z");
        s.clear();
        format_timestamp(0, &mut s);
        assert_eq!(s, "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn filter_directives() {
        let f = LogFilter::parse("warn,my_app=debug,my_app::db=error").unwrap();
        assert!(f.enabled("other", 2));
        assert!(!f.enabled("other", 3));
        assert!(f.enabled("my_app", 4));
        assert!(f.enabled("my_app::http", 4));
        assert!(!f.enabled("my_app::db", 2));
        assert!(!f.enabled("my_apple", 4));
        assert_eq!(f.max_level(), 4);
        assert!(LogFilter::parse("loud").is_ok(), "a bare target");
        for bad in ["", "x=loud", "not a level!!", "=info"] {
            assert!(LogFilter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn text_lines_stay_one_line() {
        let r = LogRecord {
            level: 2,
            target: "app".into(),
            message: "two\nlines".into(),
            fields: vec![("k".into(), "v\r".into())],
            spans: vec!["req".into()],
            ts_nanos: 0,
        };
        let mut s = String::new();
        format_text(&r, "w1 pid 9", &mut s);
        assert_eq!(
            s,
            "1970-01-01T00:00:00.000000Z  WARN [w1 pid 9] req: app: two\\nlines k=v\\r"
        );
    }

    #[cfg(feature = "slog")]
    #[test]
    fn slog_records_carry_level_message_and_pairs() {
        let (tx, mut rx) = mpsc::channel(8);
        let queue: &'static WorkerLogQueue = Box::leak(Box::new(WorkerLogQueue {
            tx,
            dropped: AtomicU64::new(0),
        }));
        let log = slog::Logger::root(
            ClusterSlogDrain::new(Some(queue)),
            slog::o!("app" => "demo"),
        );
        slog::warn!(log, "disk {}", "full"; "free" => 3);
        let r = rx.try_recv().unwrap();
        assert_eq!(r.level, 2);
        assert_eq!(r.message, "disk full");
        assert_eq!(
            r.fields,
            vec![
                ("free".to_string(), "3".to_string()),
                ("app".to_string(), "demo".to_string())
            ]
        );
    }

    #[test]
    fn clip_cuts_on_a_char_boundary() {
        let s = clip("é".repeat(MAX_TEXT));
        assert!(s.len() < MAX_TEXT + 40);
        assert!(s.ends_with("bytes cut]"));
    }
}
