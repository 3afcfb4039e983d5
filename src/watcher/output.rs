//! The watcher's single log stream: its own events, records forwarded by
//! workers, and the lines workers print on stdout and stderr, each tagged
//! with the worker's slot and pid, as text or JSON lines.
//!
//! Producers (the supervisor, the stdout/stderr readers, the watcher's own
//! tracing layer) never block: they filter, then push an entry into a
//! bounded queue; a full queue drops the entry and counts it. One writer
//! thread formats and writes entries, one `write` per line, so lines are
//! never split or interleaved, and reports how many were dropped.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::Arc;

use tracing::{Event, Subscriber};
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use super::log_format::format_record;
pub use super::log_format::LogFormat;
pub(crate) use super::log_format::Source;
use crate::log::{now_nanos, record_from_event, LogBatch, LogFilter, LogRecord};

/// Entries the writer may lag behind before producers drop.
const QUEUE: usize = 64 * 1024;

/// A queued batch counts one entry per this many of its bytes (or per
/// record, whichever is more): at most about 8 MiB of batches wait.
const BATCH_BYTES_PER_ENTRY: usize = 128;

struct Entry {
    source: Source,
    record: LogRecord,
}

enum Msg {
    /// Not boxed: the channel allocates a block per 31 messages, a box
    /// would be one more allocation and free per record.
    Entry(Entry),
    /// A worker's records, formatted from the bytes they came in; counts
    /// `weight` against the queue's bound.
    Batch {
        source: Source,
        batch: LogBatch,
        weight: usize,
    },
    /// Acknowledge once everything queued before it is written.
    Flush(SyncSender<()>),
}

struct Shared {
    /// An unbounded channel, bounded by `queued`: a bounded std channel
    /// preallocates and touches every slot (1.5 MiB of the idle watcher's
    /// 2.5 MiB of anonymous memory for 65,536 slots); this one allocates
    /// as entries come and frees as they are written.
    tx: Sender<Msg>,
    /// Entries queued and not yet taken by the writer.
    queued: Arc<AtomicUsize>,
    filter: LogFilter,
    /// The level of a line a worker printed on stderr (1 error .. 5 trace).
    stderr_level: AtomicU8,
    dropped: AtomicU64,
    /// For metrics: entries from workers queued, and entries dropped, ever.
    from_workers: AtomicU64,
    dropped_total: AtomicU64,
}

/// The watcher's log stream (see the module docs). Cheap to clone.
///
/// ```no_run
/// use cluster::{LogFilter, LogFormat, LogOutput};
/// use tracing_subscriber::prelude::*;
///
/// let output = LogOutput::stderr(LogFormat::Json, LogFilter::parse("info").unwrap());
/// tracing_subscriber::registry().with(output.layer()).init();
/// // ClusterWatcher::builder(cmd).log_output(output) ...
/// ```
#[derive(Clone)]
pub struct LogOutput {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LogOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogOutput")
            .field("filter", &self.shared.filter)
            .finish()
    }
}

impl LogOutput {
    /// A stream to the process's stderr.
    pub fn stderr(format: LogFormat, filter: LogFilter) -> LogOutput {
        Self::to_writer(Box::new(std::io::stderr()), format, filter)
    }

    /// A stream to any writer (a file, a pipe).
    pub fn to_writer(
        writer: Box<dyn Write + Send>,
        format: LogFormat,
        filter: LogFilter,
    ) -> LogOutput {
        let (tx, rx) = channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Shared {
            tx,
            queued: queued.clone(),
            filter,
            stderr_level: AtomicU8::new(2),
            dropped: AtomicU64::new(0),
            from_workers: AtomicU64::new(0),
            dropped_total: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&shared);
        let spawned = std::thread::Builder::new()
            .name("cluster-log".into())
            .spawn(move || write_loop(rx, queued, writer, format, weak));
        if let Err(e) = spawned {
            eprintln!("cluster: cannot start the log writer thread: {e}");
        }
        LogOutput { shared }
    }

    /// A `tracing_subscriber` layer that writes the watcher's own events to
    /// this stream (tagged `watcher`), filtered like everything else.
    pub fn layer(&self) -> WatcherLogLayer {
        WatcherLogLayer {
            output: self.clone(),
            filter: self.shared.filter.env_filter(),
        }
    }

    /// The level given to the lines workers print on stderr (default
    /// `WARN`: tracebacks and panics land there); stdout lines are `INFO`.
    ///
    /// ```
    /// use cluster::{LogFilter, LogFormat, LogOutput};
    /// let output = LogOutput::to_writer(Box::new(std::io::sink()), LogFormat::Text, LogFilter::default())
    ///     .with_stderr_level(tracing::Level::ERROR);
    /// # drop(output);
    /// ```
    pub fn with_stderr_level(self, level: tracing::Level) -> LogOutput {
        self.shared
            .stderr_level
            .store(crate::log::level_number(&level), Ordering::Relaxed);
        self
    }

    /// The level of a line printed on `source` (stdout `INFO`, stderr as
    /// set by [`with_stderr_level`](Self::with_stderr_level)).
    pub(crate) fn line_level(&self, source: Source) -> u8 {
        match source {
            Source::Stderr { .. } | Source::Job { stderr: true, .. } => {
                self.shared.stderr_level.load(Ordering::Relaxed)
            }
            _ => 3,
        }
    }

    /// The stream's filter (handed to every worker).
    pub fn filter(&self) -> &LogFilter {
        &self.shared.filter
    }

    /// Whether a record at `level` from `target` passes the filter.
    pub(crate) fn enabled(&self, target: &str, level: u8) -> bool {
        self.shared.filter.enabled(target, level)
    }

    /// Queues a record that passes the filter; never blocks. A worker's
    /// forwarded records were filtered by the worker (with span and field
    /// directives, which need the worker's spans) and are not filtered
    /// again; lines and notes are checked against the plain directives.
    pub(crate) fn emit(&self, source: Source, record: LogRecord) {
        let forwarded = matches!(source, Source::Worker { .. });
        if !forwarded && !self.enabled(&record.target, record.level) {
            return;
        }
        self.push(source, record);
    }

    /// Queues a record without filtering it; never blocks.
    fn push(&self, source: Source, record: LogRecord) {
        let shared = &self.shared;
        let queued = shared.queued.fetch_add(1, Ordering::Relaxed) < QUEUE
            && shared.tx.send(Msg::Entry(Entry { source, record })).is_ok();
        if queued {
            if source != Source::Watcher {
                shared.from_workers.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            // Full (or the writer is gone): counted, reported as a record.
            shared.queued.fetch_sub(1, Ordering::Relaxed);
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            shared.dropped_total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues a worker's batch of forwarded records (filtered by the
    /// worker, not again); never blocks. It weighs its records or a record
    /// per [`BATCH_BYTES_PER_ENTRY`] bytes, whichever is more, so the
    /// queue's bound also bounds the bytes it holds.
    pub(crate) fn emit_batch(&self, source: Source, batch: LogBatch) {
        let shared = &self.shared;
        let count = batch.len() as u64;
        let weight = batch.len().max(batch.size() / BATCH_BYTES_PER_ENTRY).max(1);
        let queued = shared.queued.fetch_add(weight, Ordering::Relaxed) < QUEUE
            && shared
                .tx
                .send(Msg::Batch {
                    source,
                    batch,
                    weight,
                })
                .is_ok();
        if queued {
            shared.from_workers.fetch_add(count, Ordering::Relaxed);
        } else {
            shared.queued.fetch_sub(weight, Ordering::Relaxed);
            shared.dropped.fetch_add(count, Ordering::Relaxed);
            shared.dropped_total.fetch_add(count, Ordering::Relaxed);
        }
    }

    /// Entries from workers (records, stdout and stderr lines) queued for
    /// the stream so far, and entries dropped because the queue was full.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.shared.from_workers.load(Ordering::Relaxed),
            self.shared.dropped_total.load(Ordering::Relaxed),
        )
    }

    /// Waits (up to `timeout`, never longer: the reader of the stream may
    /// have stopped reading) until everything queued so far is written.
    pub fn flush(&self, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let (tx, rx) = sync_channel(1);
        if self.shared.tx.send(Msg::Flush(tx)).is_err() {
            return;
        }
        let _ = rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
    }

    /// Queues a watcher record with `message`.
    pub(crate) fn note(&self, source: Source, level: u8, target: &str, message: String) {
        self.emit(
            source,
            LogRecord {
                level,
                target: target.to_string(),
                message,
                fields: Vec::new(),
                spans: Vec::new(),
                ts_nanos: now_nanos(),
            },
        );
    }
}

/// The layer returned by [`LogOutput::layer`]: filters the watcher's own
/// events with the stream's [`LogFilter`] (as an `EnvFilter`, so span and
/// field directives apply) and writes them to the stream.
///
/// ```no_run
/// use cluster::{LogFilter, LogFormat, LogOutput};
/// use tracing_subscriber::prelude::*;
///
/// let output = LogOutput::stderr(LogFormat::Text, LogFilter::parse("info").unwrap());
/// let layer: cluster::WatcherLogLayer = output.layer();
/// tracing_subscriber::registry().with(layer).init();
/// ```
pub struct WatcherLogLayer {
    output: LogOutput,
    filter: EnvFilter,
}

impl std::fmt::Debug for WatcherLogLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatcherLogLayer")
            .field("filter", &self.filter)
            .finish()
    }
}

impl<S> Layer<S> for WatcherLogLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    crate::log::delegate_filtering!();

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut record = record_from_event(event, &ctx);
        // The watcher's own target is an implementation detail.
        if record.target.starts_with("cluster") {
            record.target.clear();
        }
        // Filtered already (the filter above saw its spans).
        self.output.push(Source::Watcher, record);
    }
}

fn write_loop(
    rx: Receiver<Msg>,
    queued: Arc<AtomicUsize>,
    writer: Box<dyn Write + Send>,
    format: LogFormat,
    shared: std::sync::Weak<Shared>,
) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, writer);
    let mut line = String::with_capacity(256);
    let watcher_pid = std::process::id();
    loop {
        // Block for one entry, then take whatever else is queued before flushing.
        let first = match rx.recv() {
            Ok(e) => e,
            Err(_) => break,
        };
        let mut next = Some(first);
        let mut acks = Vec::new();
        while let Some(msg) = next {
            match msg {
                Msg::Entry(entry) => {
                    queued.fetch_sub(1, Ordering::Relaxed);
                    line.clear();
                    format_entry(&entry, format, watcher_pid, &mut line);
                    line.push('\n');
                    // A failing output (closed pipe) loses the line; nothing
                    // else can be done with it.
                    let _ = out.write_all(line.as_bytes());
                }
                Msg::Batch {
                    source,
                    batch,
                    weight,
                } => {
                    queued.fetch_sub(weight, Ordering::Relaxed);
                    for record in batch.records() {
                        line.clear();
                        format_record(source, &record, format, watcher_pid, &mut line);
                        line.push('\n');
                        let _ = out.write_all(line.as_bytes());
                    }
                }
                Msg::Flush(ack) => acks.push(ack),
            }
            if !acks.is_empty() {
                break;
            }
            next = rx.try_recv().ok();
        }
        if let Some(shared) = shared.upgrade() {
            let dropped = shared.dropped.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                line.clear();
                let record = LogRecord {
                    level: 2,
                    target: String::new(),
                    message: format!(
                        "{dropped} log record(s) dropped: the log output could not keep up"
                    ),
                    fields: Vec::new(),
                    spans: Vec::new(),
                    ts_nanos: now_nanos(),
                };
                format_entry(
                    &Entry {
                        source: Source::Watcher,
                        record,
                    },
                    format,
                    watcher_pid,
                    &mut line,
                );
                line.push('\n');
                let _ = out.write_all(line.as_bytes());
            }
        }
        let _ = out.flush();
        for ack in acks {
            let _ = ack.send(());
        }
    }
    let _ = out.flush();
}

fn format_entry(entry: &Entry, format: LogFormat, watcher_pid: u32, out: &mut String) {
    format_record(entry.source, &entry.record.view(), format, watcher_pid, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::FieldValue;

    fn record(message: &str) -> LogRecord {
        LogRecord {
            level: 3,
            target: "app".into(),
            message: message.into(),
            fields: vec![("user".into(), "ann \"a\"".into())],
            spans: vec!["request".into()],
            ts_nanos: 0,
        }
    }

    /// A writer that counts lines and blocks until `open` is set.
    struct Gate {
        open: Arc<std::sync::atomic::AtomicBool>,
        lines: Arc<AtomicUsize>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            while !self.open.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let n = buf.iter().filter(|&&b| b == b'\n').count();
            self.lines.fetch_add(n, Ordering::SeqCst);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_every_queued_entry_is_written() {
        let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lines = Arc::new(AtomicUsize::new(0));
        let gate = Gate {
            open: open.clone(),
            lines: lines.clone(),
        };
        let out = LogOutput::to_writer(Box::new(gate), LogFormat::Text, LogFilter::default());
        let total = QUEUE + 5_000;
        let worker = Source::Worker { slot: 1, pid: 2 };
        for i in 0..total {
            out.emit(worker, record(&format!("r{i}")));
        }
        let (queued, dropped) = out.counts();
        assert_eq!(queued as usize + dropped as usize, total);
        // The writer took at most a buffer's worth before it blocked.
        assert!(
            dropped > 0 && (queued as usize) < QUEUE + 2_000,
            "{queued} {dropped}"
        );
        open.store(true, Ordering::SeqCst);
        out.flush(std::time::Duration::from_secs(10));
        // Every queued entry, and the note about the drops.
        assert_eq!(lines.load(Ordering::SeqCst), queued as usize + 1);
        // The bound is free again once written.
        out.emit(worker, record("again"));
        out.flush(std::time::Duration::from_secs(10));
        assert_eq!(out.counts().1, dropped);
    }

    #[test]
    fn json_lines_parse() {
        let mut s = String::new();
        let entry = Entry {
            source: Source::Stderr { slot: 2, pid: 77 },
            record: record("he said \"hi\"\nbye"),
        };
        format_entry(&entry, LogFormat::Json, 1, &mut s);
        assert!(!s.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["source"], "stderr");
        assert_eq!(v["slot"], 2);
        assert_eq!(v["pid"], 77);
        assert_eq!(v["message"], "he said \"hi\"\nbye");
        assert_eq!(v["fields"]["user"], "ann \"a\"");
        assert_eq!(v["spans"][0], "request");
    }

    #[test]
    fn typed_fields_stay_typed_and_printed_json_objects_stay_objects() {
        let mut r = record("req");
        r.fields = vec![
            ("n".into(), FieldValue::U64(1)),
            ("worker".into(), FieldValue::Bool(true)),
        ];
        let mut s = String::new();
        let entry = Entry {
            source: Source::Worker { slot: 1, pid: 7 },
            record: r,
        };
        format_entry(&entry, LogFormat::Json, 1, &mut s);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["fields"], serde_json::json!({"n": 1, "worker": true}));

        let mut printed = record(r#"{"msg":"listening","port":8080,"tls":false,"tags":["a"]}"#);
        printed.fields.clear();
        let entry = Entry {
            source: Source::Stdout { slot: 1, pid: 7 },
            record: printed,
        };
        s.clear();
        format_entry(&entry, LogFormat::Json, 1, &mut s);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["message"], "listening");
        assert_eq!(
            v["fields"],
            serde_json::json!({"port": 8080, "tls": false, "tags": ["a"]})
        );
        // Not an object: kept as text.
        for line in ["[1,2]", "{not json", "plain"] {
            s.clear();
            let entry = Entry {
                source: Source::Stdout { slot: 1, pid: 7 },
                record: record(line),
            };
            format_entry(&entry, LogFormat::Json, 1, &mut s);
            let v: serde_json::Value = serde_json::from_str(&s).unwrap();
            assert_eq!(v["message"], line);
        }
    }

    #[test]
    fn text_tags() {
        let mut s = String::new();
        let entry = Entry {
            source: Source::Worker { slot: 3, pid: 9 },
            record: record("hello"),
        };
        format_entry(&entry, LogFormat::Text, 1, &mut s);
        assert!(
            s.contains(" INFO [w3 9] request: app: hello user=ann \"a\""),
            "{s}"
        );
    }
}
