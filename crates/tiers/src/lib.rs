//! strata-tiers: where entries live, and the cache that chains the tiers.
//!
//! - [`Tier`]: what every tier does (get, put, remove, flush, usage).
//! - [`MemoryTier`] (L1): moka, bounded in bytes, per-entry expiry.
//! - [`DiskTier`] (L2): sled, bounded in bytes with least-recently-used eviction; a corrupt
//!   directory is moved aside on open.
//! - [`TieredCache`]: the lookup path L1 → L2 → executor, single flight, promotion, TTL, and
//!   graceful degradation (a failing tier is a counted miss, never a failed call).

pub mod cache;
pub mod disk;
pub mod error;
pub mod memory;
pub mod tier;

pub use cache::{Completion, Lookup, TieredCache, TieredCacheBuilder, TtlPolicy};
pub use disk::{DiskConfig, DiskTier};
pub use error::TierError;
pub use memory::MemoryTier;
pub use strata_analytics::{Outcome, Stats};
pub use tier::{Tier, TierUsage};
