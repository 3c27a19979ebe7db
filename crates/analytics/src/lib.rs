//! strata-analytics: what the cache did, what it saved, and what to change.
//!
//! - [`counters`]: lock-free [`Counters`] updated on every lookup, and the [`Stats`] snapshot
//!   (hits per tier, misses, errors, cost, tokens and latency saved).
//! - [`recorder`]: [`Analytics`], which takes every lookup's outcome through a bounded channel
//!   (a full channel drops and counts, it never blocks) into hourly rollups persisted in sled,
//!   plus the hot-key sketch and the request metrics API.
//! - [`rollup`]: the additive [`Rollup`] per hour × model × provider and the per-node daily
//!   documents ([`DailyRollups`]) published to S3.
//! - [`sketch`]: the bounded Space-Saving sketch of the hottest keys.
//! - [`report`]: [`Report`], built from rollups of one node or many: totals, breakdowns, trends,
//!   hot and cold keys, storage and suggestions.
//! - [`render`]: the report as a terminal table, JSON, CSV or one self-contained HTML page.
//! - [`pricing`]: list prices per model ([`Pricing`]), used when a caller gives no cost.
//! - [`throttle`]: [`Throttle`] and [`throttled!`], one warning per interval for a failure that
//!   repeats (a failing tier, S3 uploads, persisting the rollups).
//!
//! Savings are counted per hit as what the original call cost, as recorded in the entry that was
//! served: never as `(hits - 1) × cost` or any other estimate.

pub mod counters;
mod hit_marks;
pub mod pricing;
pub mod recorder;
pub mod render;
pub mod report;
pub mod rollup;
pub mod sketch;
#[cfg(test)]
mod test_entry;
pub mod throttle;

pub use counters::{Counters, ErrorKind, Hits, Outcome, Stats, TierName};
pub use pricing::{Price, Pricing, PricingError};
pub use recorder::{
    Analytics, AnalyticsConfig, AnalyticsError, Event, PeriodMetrics, ProviderMetrics,
    RequestMetric,
};
pub use report::{
    ColdEntries, ColdModel, GroupBy, HTTP_PROVIDER, Report, ReportExtras, ReportOptions,
    Suggestion, Summary, TierStorage,
};
pub use rollup::{DailyRollups, HourRow, Rollup, RowKey};
pub use sketch::{HotKey, Sketch};
pub use throttle::{Throttle, WARN_EVERY};

/// What [`throttled!`] expands to, for crates that use it without depending on `tracing`.
#[doc(hidden)]
pub use tracing as __tracing;
