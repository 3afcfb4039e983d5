//! The worker's side of logging: [`ClusterLogLayer`] (tracing) and
//! [`ClusterSlogDrain`] (slog, feature `slog`), which filter with the
//! watcher's [`LogFilter`] and queue what passes for the IPC thread.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use super::filter::LogFilter;
use super::record::{format_text, record_from_event, LogRecord};

/// Records a worker may queue before it starts dropping them.
pub(crate) const WORKER_QUEUE: usize = 16 * 1024;

/// What the worker's layer sends to the IPC thread.
pub(crate) struct WorkerLogQueue {
    pub tx: mpsc::Sender<LogRecord>,
    pub dropped: AtomicU64,
}

/// The `tracing_subscriber` layer returned by
/// [`Cluster::log_layer`](crate::Cluster::log_layer): forwards events to
/// the watcher in a worker, writes them to stderr when standalone.
///
/// It filters like an `EnvFilter` layer does, with the watcher's filter
/// (`--log-level`) in a worker, and `RUST_LOG` (else `info`) standalone:
/// an event the filter refuses is disabled at its callsite, so a flood of
/// `trace!` under `--log-level info` costs next to nothing and never
/// crowds out an `info!` record. Being a filtering layer, it filters for
/// the whole subscriber; give other layers their own filter with
/// `Layer::with_filter` if they should see more.
///
/// ```no_run
/// use tracing_subscriber::prelude::*;
/// tracing_subscriber::registry().with(cluster::Cluster::log_layer()).init();
/// tracing::info!(user = "ann", attempts = 3, "logged in"); // attempts stays a number in JSON
/// ```
pub struct ClusterLogLayer {
    queue: Option<&'static WorkerLogQueue>,
    filter: EnvFilter,
}

impl std::fmt::Debug for ClusterLogLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLogLayer")
            .field("worker", &self.queue.is_some())
            .field("filter", &self.filter)
            .finish()
    }
}

impl ClusterLogLayer {
    pub(crate) fn new(queue: Option<&'static WorkerLogQueue>, filter: &LogFilter) -> Self {
        ClusterLogLayer {
            queue,
            filter: filter.env_filter(),
        }
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
            format_text(&record.view(), "", &mut line);
            line.push('\n');
            use std::io::Write;
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }
}

/// The filtering methods of a `Layer<S>` whose `self.filter` is an
/// `EnvFilter`: every one is the filter's, which must see spans open,
/// enter and close to apply span and field directives. Expanded inside the
/// `impl` blocks of this layer and of the watcher's (`WatcherLogLayer`).
macro_rules! delegate_filtering {
    () => {
        fn register_callsite(
            &self,
            metadata: &'static tracing::Metadata<'static>,
        ) -> tracing::subscriber::Interest {
            Layer::<S>::register_callsite(&self.filter, metadata)
        }

        fn enabled(
            &self,
            metadata: &tracing::Metadata<'_>,
            ctx: tracing_subscriber::layer::Context<'_, S>,
        ) -> bool {
            Layer::<S>::enabled(&self.filter, metadata, ctx)
        }

        fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
            Layer::<S>::max_level_hint(&self.filter)
        }

        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            id: &tracing::span::Id,
            ctx: tracing_subscriber::layer::Context<'_, S>,
        ) {
            Layer::<S>::on_new_span(&self.filter, attrs, id, ctx)
        }

        fn on_record(
            &self,
            id: &tracing::span::Id,
            values: &tracing::span::Record<'_>,
            ctx: tracing_subscriber::layer::Context<'_, S>,
        ) {
            Layer::<S>::on_record(&self.filter, id, values, ctx)
        }

        fn on_enter(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
            Layer::<S>::on_enter(&self.filter, id, ctx)
        }

        fn on_exit(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
            Layer::<S>::on_exit(&self.filter, id, ctx)
        }

        fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
            Layer::<S>::on_close(&self.filter, id, ctx)
        }
    };
}
pub(crate) use delegate_filtering;

impl<S> Layer<S> for ClusterLogLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    delegate_filtering!();

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        deliver(self.queue, record_from_event(event, &ctx));
    }
}

/// The `slog::Drain` returned by [`Cluster::slog_drain`](crate::Cluster::slog_drain)
/// (feature `slog`): forwards records to the watcher in a worker, writes
/// them to stderr when standalone. Filters by level and target (the
/// plain directives of the watcher's filter) before queueing. Never
/// blocks; never fails.
///
/// ```no_run
/// let log = slog::Logger::root(cluster::Cluster::slog_drain(), slog::o!("app" => "demo"));
/// slog::info!(log, "logged in"; "user" => "ann", "attempts" => 3);
/// ```
#[cfg(feature = "slog")]
pub struct ClusterSlogDrain {
    queue: Option<&'static WorkerLogQueue>,
    filter: LogFilter,
}

#[cfg(feature = "slog")]
impl std::fmt::Debug for ClusterSlogDrain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSlogDrain")
            .field("worker", &self.queue.is_some())
            .field("filter", &self.filter)
            .finish()
    }
}

#[cfg(feature = "slog")]
impl ClusterSlogDrain {
    pub(crate) fn new(queue: Option<&'static WorkerLogQueue>, filter: LogFilter) -> Self {
        ClusterSlogDrain { queue, filter }
    }
}

#[cfg(feature = "slog")]
struct SlogFields(Vec<(String, super::record::FieldValue)>);

#[cfg(feature = "slog")]
impl slog::Serializer for SlogFields {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        let text = super::record::clip(val.to_string());
        self.0
            .push((key.to_string(), super::record::FieldValue::Str(text)));
        Ok(())
    }
    fn emit_u64(&mut self, key: slog::Key, val: u64) -> slog::Result {
        self.0
            .push((key.to_string(), super::record::FieldValue::U64(val)));
        Ok(())
    }
    fn emit_i64(&mut self, key: slog::Key, val: i64) -> slog::Result {
        self.0
            .push((key.to_string(), super::record::FieldValue::I64(val)));
        Ok(())
    }
    fn emit_u32(&mut self, key: slog::Key, val: u32) -> slog::Result {
        self.emit_u64(key, val.into())
    }
    fn emit_i32(&mut self, key: slog::Key, val: i32) -> slog::Result {
        self.emit_i64(key, val.into())
    }
    fn emit_f64(&mut self, key: slog::Key, val: f64) -> slog::Result {
        self.0
            .push((key.to_string(), super::record::FieldValue::F64(val)));
        Ok(())
    }
    fn emit_bool(&mut self, key: slog::Key, val: bool) -> slog::Result {
        self.0
            .push((key.to_string(), super::record::FieldValue::Bool(val)));
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
        let target = if record.tag().is_empty() {
            record.module()
        } else {
            record.tag()
        };
        if !self.filter.enabled(target, level) {
            return Ok(());
        }
        let mut fields = SlogFields(Vec::new());
        // Record pairs first, then the logger's context.
        let _ = record.kv().serialize(record, &mut fields);
        let _ = values.serialize(record, &mut fields);
        deliver(
            self.queue,
            LogRecord {
                level,
                target: target.to_string(),
                message: super::record::clip(record.msg().to_string()),
                fields: fields.0,
                spans: Vec::new(),
                ts_nanos: super::record::now_nanos(),
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::prelude::*;

    fn queue(n: usize) -> (&'static WorkerLogQueue, mpsc::Receiver<LogRecord>) {
        let (tx, rx) = mpsc::channel(n);
        let queue = Box::leak(Box::new(WorkerLogQueue {
            tx,
            dropped: AtomicU64::new(0),
        }));
        (queue, rx)
    }

    #[test]
    fn a_trace_flood_under_info_queues_nothing_and_loses_no_info_record() {
        let (q, mut rx) = queue(16);
        let filter = LogFilter::parse("info").unwrap();
        let subscriber =
            tracing_subscriber::registry().with(ClusterLogLayer::new(Some(q), &filter));
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..50_000 {
                tracing::trace!(i, "noise");
            }
            tracing::info!("done");
        });
        assert_eq!(q.dropped.load(Ordering::Relaxed), 0);
        assert_eq!(rx.try_recv().unwrap().message, "done");
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn span_field_directives_select_events_inside_the_span() {
        let (q, mut rx) = queue(16);
        let filter = LogFilter::parse("info,[req{user=ann}]=debug").unwrap();
        let subscriber =
            tracing_subscriber::registry().with(ClusterLogLayer::new(Some(q), &filter));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info_span!("req", user = "bob").in_scope(|| tracing::debug!("bob's"));
            tracing::info_span!("req", user = "ann").in_scope(|| tracing::debug!("ann's"));
        });
        let got: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|r| r.message)
            .collect();
        assert_eq!(got, ["ann's"]);
    }

    #[cfg(feature = "slog")]
    #[test]
    fn slog_records_carry_level_message_typed_pairs_and_are_filtered() {
        let (q, mut rx) = queue(8);
        let drain = ClusterSlogDrain::new(Some(q), LogFilter::parse("info").unwrap());
        let log = slog::Logger::root(drain, slog::o!("app" => "demo"));
        slog::debug!(log, "filtered");
        slog::warn!(log, "disk {}", "full"; "free" => 3);
        let r = rx.try_recv().unwrap();
        assert_eq!(r.level, 2);
        assert_eq!(r.message, "disk full");
        assert_eq!(
            r.fields,
            vec![
                ("free".to_string(), super::super::record::FieldValue::I64(3)),
                ("app".to_string(), "demo".into())
            ]
        );
        assert!(rx.try_recv().is_err());
    }
}
