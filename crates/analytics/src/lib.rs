//! strata-analytics: what the cache did and what it saved.
//!
//! - [`counters`]: lock-free [`Counters`] updated on every lookup, and the [`Stats`] snapshot
//!   (hits per tier, misses, errors, cost, tokens and latency saved).
//! - [`pricing`]: list prices per model ([`Pricing`]), used when a caller gives no cost.
//!
//! Savings are counted per hit as what the original call cost, as recorded in the entry that was
//! served: never as `(hits - 1) × cost` or any other estimate.

pub mod counters;
pub mod pricing;

pub use counters::{Counters, ErrorKind, Hits, Outcome, Stats, TierName};
pub use pricing::{Price, Pricing, PricingError};
