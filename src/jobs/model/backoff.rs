//! The retry backoff of failed attempts: exponential, capped, jittered.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// How long to wait before attempt `attempt + 1` after attempt `attempt`
/// failed: `base × 2^(attempt-1)`, capped at `cap`, then ±25 % jitter.
/// Defaults (see `StoreOptions`): base 1 s, cap 10 min.
pub(crate) fn retry_delay(base: Duration, cap: Duration, attempt: u32) -> Duration {
    retry_delay_jittered(base, cap, attempt, random_unit())
}

/// [`retry_delay`] with the jitter given: `unit` in `[0, 1)` maps to
/// `[-25 %, +25 %)`.
pub(crate) fn retry_delay_jittered(
    base: Duration,
    cap: Duration,
    attempt: u32,
    unit: f64,
) -> Duration {
    let exp = attempt.saturating_sub(1).min(40);
    let raw = base.saturating_mul(1u32 << exp.min(31));
    let raw = if exp > 31 { cap } else { raw.min(cap) };
    let factor = 0.75 + 0.5 * unit.clamp(0.0, 1.0);
    raw.mul_f64(factor)
}

/// A number in `[0, 1)` that differs between calls; for jitter only. Uses
/// std's randomly keyed hasher rather than a random-number crate.
pub(crate) fn random_unit() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_caps_and_jitters() {
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(600);
        let mid = |a| retry_delay_jittered(base, cap, a, 0.5);
        assert_eq!(mid(1), Duration::from_secs(1));
        assert_eq!(mid(2), Duration::from_secs(2));
        assert_eq!(mid(4), Duration::from_secs(8));
        assert_eq!(mid(11), Duration::from_secs(600));
        assert_eq!(mid(1000), Duration::from_secs(600));
        assert_eq!(mid(0), Duration::from_secs(1));
        assert_eq!(
            retry_delay_jittered(base, cap, 1, 0.0),
            Duration::from_millis(750)
        );
        for a in 1..20 {
            let d = retry_delay(base, cap, a);
            let m = mid(a);
            assert!(d >= m.mul_f64(0.75) && d <= m.mul_f64(1.25), "{a}: {d:?}");
        }
    }
}
