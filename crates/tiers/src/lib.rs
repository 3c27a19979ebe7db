//! strata-tiers: where entries live, and the cache that chains the tiers.
//!
//! - [`Tier`]: what every tier does (get, put, remove, flush, usage).
//! - [`MemoryTier`] (L1): moka, bounded in bytes, per-entry expiry.
//! - [`DiskTier`] (L2): sled, bounded in bytes with least-recently-used eviction; a corrupt
//!   directory is moved aside on open.
//! - [`S3Tier`] (L3): any S3-compatible store, laid out by model and date, with a local index,
//!   a durable write-behind outbox and a circuit breaker.
//! - [`TieredCache`]: the lookup path L1 → L2 → L3 → executor, single flight, promotion, TTL, and
//!   graceful degradation (a failing tier is a counted miss, never a failed call).
//! - [`EpochStore`] and [`invalidate`]: invalidation by selector, key and pattern on every tier
//!   and every node, `clear`, and garbage collection.
//! - [`reports`]: cost-savings reports from this node's analytics or every node's (daily
//!   rollups published to S3), with storage and cold entries that only the tiers know.

pub mod audit;
pub mod cache;
pub mod disk;
pub mod epochs;
pub mod error;
pub mod invalidate;
mod memo;
pub mod memory;
pub mod reports;
pub mod s3;
pub mod tier;
mod writer;

pub use audit::AuditRecord;
pub use cache::{Completion, Lookup, TieredCache, TieredCacheBuilder, TtlPolicy};
pub use disk::{DiskConfig, DiskTier, Salvage, Swept};
pub use epochs::{EpochStore, SyncReport};
pub use error::TierError;
pub use invalidate::{GcReport, Invalidation, Progress};
pub use memory::MemoryTier;
pub use reports::{Published, ReportSource};
pub use s3::{RebuildReport, S3Config, S3Stats, S3Tier, WarmReport};
pub use strata_analytics::{Outcome, Stats};
pub use tier::{Tier, TierUsage};
