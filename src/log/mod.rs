//! Log records: what a worker forwards to the watcher, and how both sides
//! format and filter them.
//!
//! In a worker, [`Cluster::log_layer`](crate::Cluster::log_layer) filters
//! each `tracing` event with the watcher's filter (an `EnvFilter`, handed
//! to the worker in `CLUSTER_LOG_FILTER`), so what the watcher would drop
//! is never built nor queued; what passes becomes a [`LogRecord`] handed
//! to the IPC thread through a bounded queue: a full queue drops the
//! record and counts it, so logging never blocks the worker's request
//! path; the count is sent to the watcher, which reports it. The IPC
//! thread packs queued records into as few datagrams as fit. Standalone,
//! the layer writes the same text format to stderr.
//!
//! The files: [`record`] (the record, its typed fields, text formatting),
//! [`filter`] (the public [`LogFilter`]), [`layer`] (the worker's tracing
//! layer and slog drain), [`json`] (a record as a JSON line, written
//! straight into the watcher's buffer), [`batch`] (a worker's records
//! read in place from the datagram they came in).

mod batch;
mod filter;
mod json;
mod layer;
pub(crate) use layer::delegate_filtering;
mod record;

pub(crate) use batch::{LogBatch, RecordRef};
pub use filter::LogFilter;
pub(crate) use json::{write_json_line, JsonHead};
pub use layer::ClusterLogLayer;
#[cfg(feature = "slog")]
pub use layer::ClusterSlogDrain;
pub(crate) use layer::{WorkerLogQueue, WORKER_QUEUE};
#[cfg(test)]
pub(crate) use record::FieldValue;
pub(crate) use record::{
    format_text, format_timestamp, level_name, level_number, now_nanos, record_from_event,
    LogRecord,
};
