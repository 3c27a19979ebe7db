//! Hourly rollups: additive counters per hour × model × provider, and the daily documents that
//! carry them to S3.
//!
//! Every field of a [`Rollup`] is a sum, so rollups from different processes, hours or nodes merge
//! by adding ([`Rollup::add`]); money is kept in integer nano-dollars so sums are exact.

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::sketch::HotKey;

/// Upper bounds (seconds) of the age buckets used for hits and expired entries: 1 min, 10 min,
/// 1 h, 6 h, 1 d, 7 d, 30 d, and a last bucket for anything older.
pub const AGE_BUCKETS_SECS: [u64; 7] = [60, 600, 3_600, 21_600, 86_400, 604_800, 2_592_000];

/// Number of age buckets (the bounds above plus "older").
pub const AGE_BUCKETS: usize = AGE_BUCKETS_SECS.len() + 1;

/// The bucket of an age in milliseconds.
pub fn age_bucket(age_ms: u64) -> usize {
    let secs = age_ms / 1000;
    AGE_BUCKETS_SECS
        .iter()
        .position(|&bound| secs < bound)
        .unwrap_or(AGE_BUCKETS_SECS.len())
}

/// What one hour of lookups for one model and provider did. Every field is a sum.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rollup {
    /// Lookups, hits and misses alike.
    pub lookups: u64,
    /// Hits from memory.
    pub l1: u64,
    /// Hits from local disk.
    pub l2: u64,
    /// Hits from object storage.
    pub l3: u64,
    /// Lookups that shared an identical in-flight lookup's answer.
    pub coalesced: u64,
    /// Lookups that ran the executor (or found nothing, for a plain `get`).
    pub misses: u64,
    /// Requests that could not be keyed (run uncached).
    pub uncacheable: u64,
    /// Entries found past their expiry (each also ends as a miss or a refill).
    pub expired: u64,
    /// USD the hits would have cost, in nano-dollars.
    pub cost_saved_nano: u64,
    /// Input tokens the hits did not spend.
    pub input_tokens_saved: u64,
    /// Output tokens the hits did not spend.
    pub output_tokens_saved: u64,
    /// Upstream latency the hits avoided, in milliseconds.
    pub latency_saved_ms: u64,
    /// USD the misses paid upstream, in nano-dollars.
    pub cost_spent_nano: u64,
    /// Sum of the lookup times of hits, in microseconds.
    pub hit_lookup_us: u64,
    /// Lookups per scope kind: global, namespace, user, session.
    pub scopes: [u64; 4],
    /// Misses that would have hit under the `aggressive` normalization profile.
    pub aggressive_would_hit: u64,
    /// What those misses cost, in nano-dollars.
    pub aggressive_would_save_nano: u64,
    /// Hits by the age of the served entry (see [`AGE_BUCKETS_SECS`]).
    pub hit_ages: [u64; AGE_BUCKETS],
    /// Expired entries found, by their age (a longer TTL would have served them).
    pub expired_ages: [u64; AGE_BUCKETS],
}

impl Rollup {
    /// Adds `other` into `self`, field by field, saturating at `u64::MAX` (rows from other
    /// nodes' documents and counts from entries are taken as given).
    pub fn add(&mut self, other: &Rollup) {
        self.lookups = self.lookups.saturating_add(other.lookups);
        self.l1 = self.l1.saturating_add(other.l1);
        self.l2 = self.l2.saturating_add(other.l2);
        self.l3 = self.l3.saturating_add(other.l3);
        self.coalesced = self.coalesced.saturating_add(other.coalesced);
        self.misses = self.misses.saturating_add(other.misses);
        self.uncacheable = self.uncacheable.saturating_add(other.uncacheable);
        self.expired = self.expired.saturating_add(other.expired);
        self.cost_saved_nano = self.cost_saved_nano.saturating_add(other.cost_saved_nano);
        self.input_tokens_saved = self
            .input_tokens_saved
            .saturating_add(other.input_tokens_saved);
        self.output_tokens_saved = self
            .output_tokens_saved
            .saturating_add(other.output_tokens_saved);
        self.latency_saved_ms = self.latency_saved_ms.saturating_add(other.latency_saved_ms);
        self.cost_spent_nano = self.cost_spent_nano.saturating_add(other.cost_spent_nano);
        self.hit_lookup_us = self.hit_lookup_us.saturating_add(other.hit_lookup_us);
        add_each(&mut self.scopes, &other.scopes);
        self.aggressive_would_hit = self
            .aggressive_would_hit
            .saturating_add(other.aggressive_would_hit);
        self.aggressive_would_save_nano = self
            .aggressive_would_save_nano
            .saturating_add(other.aggressive_would_save_nano);
        add_each(&mut self.hit_ages, &other.hit_ages);
        add_each(&mut self.expired_ages, &other.expired_ages);
    }

    /// All hits (every tier and coalesced lookups).
    pub fn hits(&self) -> u64 {
        self.l1
            .saturating_add(self.l2)
            .saturating_add(self.l3)
            .saturating_add(self.coalesced)
    }
}

/// Adds `other` into `into` element by element, saturating at `u64::MAX`.
pub(crate) fn add_each(into: &mut [u64], other: &[u64]) {
    for (a, b) in into.iter_mut().zip(other) {
        *a = a.saturating_add(*b);
    }
}

/// Which hour, model and provider a rollup counts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RowKey {
    /// Hours since the Unix epoch (UTC).
    pub hour: i64,
    /// The normalized model.
    pub model: String,
    /// The provider (`openai`, …); empty when a lookup found nothing to say it.
    pub provider: String,
}

impl RowKey {
    /// The hour containing `at`.
    pub fn hour_of(at: DateTime<Utc>) -> i64 {
        at.timestamp().div_euclid(3600)
    }

    /// When this row's hour starts.
    pub fn start(&self) -> DateTime<Utc> {
        self.hour
            .checked_mul(3600)
            .and_then(|secs| Utc.timestamp_opt(secs, 0).single())
            .unwrap_or_default()
    }

    /// The UTC day of this row.
    pub fn day(&self) -> NaiveDate {
        self.start().date_naive()
    }

    /// The sled key: the hour big-endian (sign bit flipped, so keys sort by time), then
    /// `model \0 provider`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.model.len() + 1 + self.provider.len());
        out.extend_from_slice(&sortable_be(self.hour));
        out.extend_from_slice(self.model.as_bytes());
        out.push(0);
        out.extend_from_slice(self.provider.as_bytes());
        out
    }

    /// The inverse of [`RowKey::encode`].
    pub fn decode(bytes: &[u8]) -> Option<RowKey> {
        let hour = decode_hour(bytes.get(..8)?)?;
        let rest = std::str::from_utf8(bytes.get(8..)?).ok()?;
        let (model, provider) = rest.split_once('\0')?;
        Some(RowKey {
            hour,
            model: model.to_owned(),
            provider: provider.to_owned(),
        })
    }
}

/// A signed number (an hour, a time in milliseconds) as 8 bytes that sort like the number.
pub fn sortable_be(hour: i64) -> [u8; 8] {
    ((hour as u64) ^ (1 << 63)).to_be_bytes()
}

fn decode_hour(bytes: &[u8]) -> Option<i64> {
    let raw = u64::from_be_bytes(bytes.try_into().ok()?);
    Some((raw ^ (1 << 63)) as i64)
}

/// One rollup with its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HourRow {
    /// Hour, model and provider.
    #[serde(flatten)]
    pub key: RowKey,
    /// The counts.
    #[serde(flatten)]
    pub rollup: Rollup,
}

/// A node's rollups of one UTC day, as stored at `{prefix}/analytics/{node_id}/{YYYY-MM-DD}.json`.
/// The node rewrites its own document for a day as the day goes on; no node writes another's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DailyRollups {
    /// Document format version.
    pub version: u32,
    /// The node that wrote it.
    pub node_id: String,
    /// The UTC day.
    pub date: NaiveDate,
    /// When it was written.
    pub written_at: DateTime<Utc>,
    /// Every hour × model × provider row of the day.
    pub rows: Vec<HourRow>,
    /// The node's hot keys when the document was written (lifetime counts).
    #[serde(default)]
    pub hot_keys: Vec<HotKey>,
    /// Lookups the node could not record (channel full) so far.
    #[serde(default)]
    pub dropped: u64,
}

/// The current format of [`DailyRollups`].
pub const DAILY_VERSION: u32 = 1;

/// Nano-dollars to USD.
pub fn nano_to_usd(nano: u64) -> f64 {
    nano as f64 / 1e9
}

/// USD to nano-dollars; negative, NaN and infinite amounts count as zero.
pub fn usd_to_nano(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * 1e9).round() as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_keys_round_trip_and_sort_by_hour() {
        let a = RowKey {
            hour: -5,
            model: "gpt-4o".into(),
            provider: "openai".into(),
        };
        let b = RowKey {
            hour: 494_000,
            model: "a".into(),
            provider: String::new(),
        };
        assert_eq!(RowKey::decode(&a.encode()), Some(a.clone()));
        assert_eq!(RowKey::decode(&b.encode()), Some(b.clone()));
        assert!(a.encode() < b.encode());
        assert_eq!(RowKey::decode(b"short"), None);
    }

    #[test]
    fn ages_fall_in_their_buckets() {
        assert_eq!(age_bucket(0), 0);
        assert_eq!(age_bucket(59_999), 0);
        assert_eq!(age_bucket(60_000), 1);
        assert_eq!(age_bucket(2 * 86_400_000), 5);
        assert_eq!(age_bucket(u64::MAX), AGE_BUCKETS - 1);
    }

    #[test]
    fn rollups_add_field_by_field() {
        let mut a = Rollup {
            lookups: 3,
            l1: 1,
            cost_saved_nano: 10,
            ..Default::default()
        };
        a.hit_ages[2] = 1;
        let mut b = a.clone();
        b.misses = 2;
        a.add(&b);
        assert_eq!(a.lookups, 6);
        assert_eq!(a.l1, 2);
        assert_eq!(a.misses, 2);
        assert_eq!(a.cost_saved_nano, 20);
        assert_eq!(a.hit_ages[2], 2);
    }
}
