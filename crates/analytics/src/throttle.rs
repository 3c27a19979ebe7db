//! Warnings about a failure that repeats, at most one per interval. A full disk or an S3 outage
//! fails every call (every lookup, every upload, every persist of the rollups), and a warning
//! per call buries everything else on the terminal; the failures in between are logged at debug
//! level, and the next warning says how many it stands for. Every failure is still counted
//! where it is counted (the cache's [`Stats`](crate::Stats), the outbox's failures).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// How often one source of failures (a tier, the S3 uploads) is warned about.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// Lets one warning through per interval and counts the ones held back.
#[derive(Debug)]
pub struct Throttle {
    every_ms: u64,
    base: Instant,
    /// Milliseconds after `base` before which no warning goes out.
    next_ms: AtomicU64,
    held: AtomicU64,
}

impl Throttle {
    /// A throttle letting one warning through per `every`.
    pub fn new(every: Duration) -> Self {
        Throttle {
            every_ms: u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
            base: Instant::now(),
            next_ms: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(held)` if this failure is to be warned about, with the number of failures held
    /// back since the last warning; `None` if it is to be held back.
    pub fn admit(&self) -> Option<u64> {
        let now = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Relaxed);
        let due = now >= next
            && self
                .next_ms
                .compare_exchange(next, now.saturating_add(self.every_ms), Relaxed, Relaxed)
                .is_ok();
        if due {
            Some(self.held.swap(0, Relaxed))
        } else {
            self.held.fetch_add(1, Relaxed);
            None
        }
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(WARN_EVERY)
    }
}

/// Logs an event at warn level when `$throttle` admits it, with the failures held back since
/// the last warning as the field `failures_since_last_warning`, and at debug level otherwise.
/// The fields come first, as in `tracing::warn!`.
#[macro_export]
macro_rules! throttled {
    ($throttle:expr, $($fields:tt)+) => {
        match $throttle.admit() {
            Some(0) => $crate::__tracing::warn!($($fields)+),
            Some(held) => {
                $crate::__tracing::warn!(failures_since_last_warning = held, $($fields)+)
            }
            None => $crate::__tracing::debug!($($fields)+),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_interval_and_the_next_counts_the_held_back() {
        let throttle = Throttle::new(Duration::from_millis(200));
        assert_eq!(throttle.admit(), Some(0));
        for _ in 0..5 {
            assert_eq!(throttle.admit(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(throttle.admit(), Some(5));
        assert_eq!(throttle.admit(), None);
    }
}
