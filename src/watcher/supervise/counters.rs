//! Counters for `--metrics` that have no other home, and the report of
//! messages from workers that nobody read. A leaf.

use std::time::Duration;

use tokio::time::Instant;

/// Counters for `--metrics` that have no other home.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) messages_in: u64,
    pub(super) messages_out: u64,
    /// Messages from workers dropped because nobody read them: in all, and
    /// since the last report (logged at most once a second, and at stop).
    pub(super) messages_dropped: u64,
    pub(super) dropped_unreported: u64,
    pub(super) drop_report_at: Option<Instant>,
    /// Records workers reported dropping from their own queues.
    pub(super) worker_log_drops: u64,
    /// Workers replaced for `--max-requests` or `--max-memory`.
    pub(super) recycled: u64,
    /// Failed reloads already told to the `--on-event` hook.
    pub(super) reloads_failed_told: u64,
}

/// How often dropped messages are reported at most.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(1);

impl Counters {
    pub(super) fn message_dropped(&mut self) {
        self.messages_dropped += 1;
        self.dropped_unreported += 1;
        self.drop_report_at
            .get_or_insert_with(|| Instant::now() + DROP_REPORT_EVERY);
    }

    /// Logs the drops since the last report, if any.
    pub(super) fn report_drops(&mut self) {
        self.drop_report_at = None;
        if self.dropped_unreported > 0 {
            tracing::warn!(
                "{} message(s) from workers dropped ({} in all): nobody reads ClusterWatcher::messages() fast enough",
                self.dropped_unreported,
                self.messages_dropped
            );
            self.dropped_unreported = 0;
        }
    }
}
