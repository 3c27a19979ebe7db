//! Counters for every lookup and their snapshot.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};
use strata_core::Entry;

use crate::rollup::usd_to_nano;

/// Where a lookup's answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Served from memory.
    L1,
    /// Served from local disk.
    L2,
    /// Served from object storage.
    L3,
    /// Waited for an identical in-flight lookup and shared its answer: the upstream call was
    /// made once for all of them.
    Coalesced,
    /// Not cached: the executor ran and its answer was stored.
    Miss,
    /// The request could not be keyed (malformed): the executor ran, nothing was stored.
    Uncacheable,
}

impl Outcome {
    /// Every outcome, in declaration order (`outcome as usize` is its place here).
    pub const ALL: [Outcome; 6] = [
        Outcome::L1,
        Outcome::L2,
        Outcome::L3,
        Outcome::Coalesced,
        Outcome::Miss,
        Outcome::Uncacheable,
    ];

    /// The outcome's name as people read it: `L1`, `L2`, `L3`, `Coalesced`, `Miss`,
    /// `Uncacheable` (the Python package's `Hit.outcome`, the replay's latencies by outcome).
    pub fn name(self) -> &'static str {
        match self {
            Outcome::L1 => "L1",
            Outcome::L2 => "L2",
            Outcome::L3 => "L3",
            Outcome::Coalesced => "Coalesced",
            Outcome::Miss => "Miss",
            Outcome::Uncacheable => "Uncacheable",
        }
    }

    /// Whether the answer came without calling the executor.
    pub fn is_hit(self) -> bool {
        matches!(
            self,
            Outcome::L1 | Outcome::L2 | Outcome::L3 | Outcome::Coalesced
        )
    }
}

/// A cache tier, for error accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TierName {
    /// Memory.
    L1,
    /// Local disk.
    L2,
    /// Object storage.
    L3,
}

impl TierName {
    /// The tier's position, L1 to L3 as 0 to 2, for per-tier arrays.
    pub fn index(self) -> usize {
        match self {
            TierName::L1 => 0,
            TierName::L2 => 1,
            TierName::L3 => 2,
        }
    }
}

/// What went wrong in a tier; each kind is counted and the lookup goes on as a miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The tier failed (I/O, timeout, unavailable).
    Io,
    /// The stored bytes did not decode (checksum, magic, version, JSON): the copy is removed.
    Corrupt,
    /// The stored entry's canonical request or scope differs from the incoming one (a digest
    /// collision): never served.
    Collision,
}

/// Lock-free counters, shared by every lookup of one cache.
#[derive(Debug, Default)]
pub struct Counters {
    lookups: AtomicU64,
    hits: [AtomicU64; 4],
    misses: AtomicU64,
    uncacheable: AtomicU64,
    expired: AtomicU64,
    invalidated: AtomicU64,
    tier_errors: [AtomicU64; 3],
    corrupt: AtomicU64,
    collisions: AtomicU64,
    executor_errors: AtomicU64,
    puts: AtomicU64,
    cost_saved_nano_usd: AtomicU64,
    input_tokens_saved: AtomicU64,
    output_tokens_saved: AtomicU64,
    latency_saved_ms: AtomicU64,
}

/// Hits per tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hits {
    /// From memory.
    pub l1: u64,
    /// From local disk.
    pub l2: u64,
    /// From object storage.
    pub l3: u64,
    /// Shared with an identical in-flight lookup.
    #[serde(default)]
    pub coalesced: u64,
}

impl Hits {
    /// All hits, saturating at `u64::MAX`.
    pub fn total(&self) -> u64 {
        self.l1
            .saturating_add(self.l2)
            .saturating_add(self.l3)
            .saturating_add(self.coalesced)
    }
}

/// Errors by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Errors {
    /// Tier failures in memory.
    pub l1: u64,
    /// Tier failures on disk.
    pub l2: u64,
    /// Tier failures in object storage.
    pub l3: u64,
    /// Stored copies that failed to decode (and were removed).
    pub corrupt: u64,
    /// Stored entries whose request differed from the incoming one.
    pub collisions: u64,
    /// Executor calls that failed (never cached).
    pub executor: u64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Lookups, including uncacheable requests.
    pub lookups: u64,
    /// Hits per tier.
    pub hits: Hits,
    /// Lookups that ran the executor and stored its answer.
    pub misses: u64,
    /// Requests that could not be keyed; the executor ran and nothing was stored.
    pub uncacheable: u64,
    /// Entries found but past their expiry (counted within misses).
    pub expired: u64,
    /// Copies found invalidated (an epoch moved past them) and dropped.
    #[serde(default)]
    pub invalidated: u64,
    /// Errors by kind.
    pub errors: Errors,
    /// Entries written by `put` or after a miss.
    pub puts: u64,
    /// USD the served hits would have cost.
    pub cost_saved_usd: f64,
    /// Tokens the served hits would have used, input plus output.
    pub tokens_saved: u64,
    /// Input tokens saved.
    pub input_tokens_saved: u64,
    /// Output tokens saved.
    pub output_tokens_saved: u64,
    /// Upstream latency the served hits avoided.
    pub latency_saved_ms: u64,
}

impl Stats {
    /// Hits over lookups, 0 when there were none.
    pub fn hit_rate(&self) -> f64 {
        if self.lookups == 0 {
            0.0
        } else {
            self.hits.total() as f64 / self.lookups as f64
        }
    }

    /// The sum of two snapshots (a stored lifetime total plus this process's counts).
    pub fn merged(&self, other: &Stats) -> Stats {
        Stats {
            lookups: self.lookups.saturating_add(other.lookups),
            hits: Hits {
                l1: self.hits.l1.saturating_add(other.hits.l1),
                l2: self.hits.l2.saturating_add(other.hits.l2),
                l3: self.hits.l3.saturating_add(other.hits.l3),
                coalesced: self.hits.coalesced.saturating_add(other.hits.coalesced),
            },
            misses: self.misses.saturating_add(other.misses),
            uncacheable: self.uncacheable.saturating_add(other.uncacheable),
            expired: self.expired.saturating_add(other.expired),
            invalidated: self.invalidated.saturating_add(other.invalidated),
            errors: Errors {
                l1: self.errors.l1.saturating_add(other.errors.l1),
                l2: self.errors.l2.saturating_add(other.errors.l2),
                l3: self.errors.l3.saturating_add(other.errors.l3),
                corrupt: self.errors.corrupt.saturating_add(other.errors.corrupt),
                collisions: self
                    .errors
                    .collisions
                    .saturating_add(other.errors.collisions),
                executor: self.errors.executor.saturating_add(other.errors.executor),
            },
            puts: self.puts.saturating_add(other.puts),
            cost_saved_usd: self.cost_saved_usd + other.cost_saved_usd,
            tokens_saved: self.tokens_saved.saturating_add(other.tokens_saved),
            input_tokens_saved: self
                .input_tokens_saved
                .saturating_add(other.input_tokens_saved),
            output_tokens_saved: self
                .output_tokens_saved
                .saturating_add(other.output_tokens_saved),
            latency_saved_ms: self.latency_saved_ms.saturating_add(other.latency_saved_ms),
        }
    }
}

impl Counters {
    /// Counts one lookup and, for a hit, what the served entry saved.
    pub fn record(&self, outcome: Outcome, served: Option<&Entry>) {
        self.lookups.fetch_add(1, Relaxed);
        match outcome {
            Outcome::L1 => self.hits[0].fetch_add(1, Relaxed),
            Outcome::L2 => self.hits[1].fetch_add(1, Relaxed),
            Outcome::L3 => self.hits[2].fetch_add(1, Relaxed),
            Outcome::Coalesced => self.hits[3].fetch_add(1, Relaxed),
            Outcome::Miss => self.misses.fetch_add(1, Relaxed),
            Outcome::Uncacheable => self.uncacheable.fetch_add(1, Relaxed),
        };
        if let (true, Some(entry)) = (outcome.is_hit(), served) {
            add_saturating(&self.cost_saved_nano_usd, usd_to_nano(entry.cost.total));
            add_saturating(&self.input_tokens_saved, entry.tokens.input);
            add_saturating(&self.output_tokens_saved, entry.tokens.output);
            add_saturating(&self.latency_saved_ms, entry.latency_ms);
        }
    }

    /// Counts a tier error.
    pub fn record_error(&self, tier: TierName, kind: ErrorKind) {
        let slot = match kind {
            ErrorKind::Io => &self.tier_errors[tier.index()],
            ErrorKind::Corrupt => &self.corrupt,
            ErrorKind::Collision => &self.collisions,
        };
        slot.fetch_add(1, Relaxed);
    }

    /// Counts an entry found past its expiry.
    pub fn record_expired(&self) {
        self.expired.fetch_add(1, Relaxed);
    }

    /// Counts a copy found invalidated (and dropped).
    pub fn record_invalidated(&self) {
        self.invalidated.fetch_add(1, Relaxed);
    }

    /// Counts a failed executor call.
    pub fn record_executor_error(&self) {
        self.executor_errors.fetch_add(1, Relaxed);
    }

    /// Counts a stored entry.
    pub fn record_put(&self) {
        self.puts.fetch_add(1, Relaxed);
    }

    /// A consistent-enough snapshot (each counter is read once).
    pub fn snapshot(&self) -> Stats {
        let get = |a: &AtomicU64| a.load(Relaxed);
        let input = get(&self.input_tokens_saved);
        let output = get(&self.output_tokens_saved);
        Stats {
            lookups: get(&self.lookups),
            hits: Hits {
                l1: get(&self.hits[0]),
                l2: get(&self.hits[1]),
                l3: get(&self.hits[2]),
                coalesced: get(&self.hits[3]),
            },
            misses: get(&self.misses),
            uncacheable: get(&self.uncacheable),
            expired: get(&self.expired),
            invalidated: get(&self.invalidated),
            errors: Errors {
                l1: get(&self.tier_errors[0]),
                l2: get(&self.tier_errors[1]),
                l3: get(&self.tier_errors[2]),
                corrupt: get(&self.corrupt),
                collisions: get(&self.collisions),
                executor: get(&self.executor_errors),
            },
            puts: get(&self.puts),
            cost_saved_usd: get(&self.cost_saved_nano_usd) as f64 / 1e9,
            tokens_saved: input.saturating_add(output),
            input_tokens_saved: input,
            output_tokens_saved: output,
            latency_saved_ms: get(&self.latency_saved_ms),
        }
    }
}

/// Adds `n` to `counter`, stopping at `u64::MAX` instead of wrapping around: costs, tokens and
/// latencies come from callers and logs, and a sum that wrapped would read as a small saving.
fn add_saturating(counter: &AtomicU64, n: u64) {
    if n == 0 {
        return;
    }
    // The closure always returns `Some`: the update cannot be refused.
    let _ = counter.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_add(n)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_entry;

    fn entry(cost: f64, input: u64, output: u64, latency_ms: u64) -> Entry {
        test_entry::entry("x", cost, (input, output), latency_ms)
    }

    #[test]
    fn savings_are_the_served_entries_own_cost() {
        let counters = Counters::default();
        let a = entry(0.0125, 100, 50, 900);
        let b = entry(0.0031, 10, 5, 100);
        counters.record(Outcome::Miss, Some(&a));
        counters.record(Outcome::L1, Some(&a));
        counters.record(Outcome::L2, Some(&a));
        counters.record(Outcome::L1, Some(&b));
        let stats = counters.snapshot();
        assert_eq!(stats.lookups, 4);
        assert_eq!(stats.hits.total(), 3);
        assert_eq!(stats.misses, 1);
        assert!((stats.cost_saved_usd - 0.0281).abs() < 1e-12);
        assert_eq!(stats.tokens_saved, 2 * 150 + 15);
        assert_eq!(stats.latency_saved_ms, 1900);
        assert!((stats.hit_rate() - 0.75).abs() < 1e-12);
        let twice = stats.merged(&stats);
        assert_eq!(twice.hits.l1, 4);
        assert!((twice.cost_saved_usd - 0.0562).abs() < 1e-12);
    }

    #[test]
    fn absurd_savings_saturate_instead_of_wrapping() {
        let counters = Counters::default();
        let huge = entry(1e308, u64::MAX, u64::MAX, u64::MAX);
        for _ in 0..3 {
            counters.record(Outcome::L1, Some(&huge));
        }
        let stats = counters.snapshot();
        assert_eq!(stats.input_tokens_saved, u64::MAX);
        assert_eq!(stats.tokens_saved, u64::MAX);
        assert_eq!(stats.latency_saved_ms, u64::MAX);
        assert_eq!(stats.cost_saved_usd, u64::MAX as f64 / 1e9);
    }
}
