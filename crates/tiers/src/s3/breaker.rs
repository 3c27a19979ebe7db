//! A circuit breaker: after `threshold` consecutive failures, calls are skipped for a cool-down.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Counts consecutive failures and opens for `cool_down` once they reach `threshold`.
///
/// After the cool-down one call goes through (half-open): the first to [`Breaker::acquire`]
/// re-arms the cool-down for everyone else while it runs. Its success closes the breaker; its
/// failure leaves it open for that new cool-down; a probe that never reports (its caller gave
/// up) lets the next call through once the cool-down has passed again.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cool_down: Duration,
    origin: Instant,
    failures: AtomicU32,
    /// Microseconds since `origin` until which calls are skipped; 0 when closed.
    open_until_us: AtomicU64,
    /// Whether a half-open probe is out (its verdict reopens or closes the breaker).
    probe_out: AtomicBool,
    opened: AtomicU64,
}

impl Breaker {
    /// A closed breaker. A `threshold` of 0 never opens.
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Breaker {
            threshold,
            cool_down,
            origin: Instant::now(),
            failures: AtomicU32::new(0),
            open_until_us: AtomicU64::new(0),
            probe_out: AtomicBool::new(false),
            opened: AtomicU64::new(0),
        }
    }

    fn now_us(&self) -> u64 {
        self.origin.elapsed().as_micros() as u64
    }

    /// Whether a call may go ahead now (closed, or half-open with no probe out); takes nothing.
    pub fn allows(&self) -> bool {
        self.now_us() >= self.open_until_us.load(Relaxed)
    }

    /// Takes the right to make one call now: always when closed; when half-open, only for the
    /// first caller (the probe), everyone else being refused until it reports.
    pub fn acquire(&self) -> bool {
        let until = self.open_until_us.load(Relaxed);
        if until == 0 {
            return true;
        }
        let now = self.now_us();
        if now < until {
            return false;
        }
        let cool_down = u64::try_from(self.cool_down.as_micros()).unwrap_or(u64::MAX);
        let rearmed = now.saturating_add(cool_down).max(1);
        let probe = self
            .open_until_us
            .compare_exchange(until, rearmed, Relaxed, Relaxed)
            .is_ok();
        if probe {
            self.probe_out.store(true, Relaxed);
        }
        probe
    }

    /// How long until calls may go ahead again (zero when closed).
    pub fn remaining(&self) -> Duration {
        let until = self.open_until_us.load(Relaxed);
        Duration::from_micros(until.saturating_sub(self.now_us()))
    }

    /// Records a call that reached the server and got an answer.
    pub fn success(&self) {
        self.failures.store(0, Relaxed);
        self.open_until_us.store(0, Relaxed);
        self.probe_out.store(false, Relaxed);
    }

    /// Records a call that failed (no answer, timeout, 5xx).
    pub fn failure(&self) {
        if self.threshold == 0 {
            return;
        }
        // The half-open probe failed: open again, for a cool-down from now.
        if self.probe_out.swap(false, Relaxed) {
            self.open("the probe call after the cool-down failed");
            return;
        }
        // Calls already in flight when it opened fail too: they do not open it again.
        if !self.allows() {
            return;
        }
        let failures = self.failures.fetch_add(1, Relaxed) + 1;
        if failures >= self.threshold {
            // Stay one failure away from opening again once the cool-down is over.
            self.failures.store(self.threshold - 1, Relaxed);
            self.open(&format!("S3 failed {failures} times in a row"));
        }
    }

    fn open(&self, why: &str) {
        let cool_down = u64::try_from(self.cool_down.as_micros()).unwrap_or(u64::MAX);
        let until = self.now_us().saturating_add(cool_down);
        self.open_until_us.store(until.max(1), Relaxed);
        self.opened.fetch_add(1, Relaxed);
        tracing::warn!(cool_down = ?self.cool_down, "{why}; skipping S3 for the cool-down");
    }

    /// How many times the breaker has opened.
    pub fn times_opened(&self) -> u64 {
        self.opened.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_and_closes_on_success() {
        let b = Breaker::new(3, Duration::from_millis(50));
        assert!(b.allows());
        b.failure();
        b.failure();
        assert!(b.allows());
        b.failure();
        assert!(!b.allows());
        assert_eq!(b.times_opened(), 1);
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.allows(), "half-open after the cool-down");
        b.failure();
        assert!(!b.allows(), "one failure when half-open opens it again");
        std::thread::sleep(Duration::from_millis(60));
        b.success();
        b.failure();
        assert!(b.allows(), "a success resets the count");
    }

    #[test]
    fn half_open_lets_one_probe_through_until_it_reports() {
        let b = Breaker::new(1, Duration::from_secs(1));
        assert!(b.acquire() && b.acquire(), "closed: every call");
        b.failure();
        assert!(!b.acquire());
        std::thread::sleep(Duration::from_millis(1050));
        assert!(b.allows(), "half-open");
        assert!(b.acquire(), "the probe");
        assert!(
            !b.acquire() && !b.allows(),
            "no second call while the probe is out"
        );
        b.failure();
        assert!(!b.acquire(), "a failed probe leaves it open");
        assert_eq!(b.times_opened(), 2, "and counts as opening it again");
        std::thread::sleep(Duration::from_millis(1050));
        assert!(b.acquire(), "the next probe");
        b.success();
        assert!(b.acquire() && b.acquire(), "a successful probe closes it");
        b.failure();
        std::thread::sleep(Duration::from_millis(1050));
        assert!(b.acquire(), "a probe whose caller gave up");
        std::thread::sleep(Duration::from_millis(1050));
        assert!(
            b.acquire(),
            "frees the way once the cool-down has passed again"
        );
    }

    #[test]
    fn calls_failing_while_it_is_open_do_not_open_it_again() {
        let b = Breaker::new(2, Duration::from_secs(60));
        b.failure();
        b.failure();
        assert!(!b.allows());
        let until = b.remaining();
        // Eight uploads that were in flight when it opened fail now.
        for _ in 0..8 {
            b.failure();
        }
        assert_eq!(b.times_opened(), 1);
        assert!(b.remaining() <= until);
    }
}
