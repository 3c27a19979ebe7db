//! The trait every tier implements.

use std::sync::Arc;

use async_trait::async_trait;
use strata_analytics::TierName;
use strata_core::{CacheKey, Entry};

use crate::error::TierError;

/// How full a tier is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TierUsage {
    /// Entries held.
    pub entries: u64,
    /// Bytes held (as the tier weighs them).
    pub bytes: u64,
    /// The bound on bytes, if any.
    pub capacity: Option<u64>,
}

/// A place entries can be stored and found again.
///
/// A tier stores and returns entries as they are; checking that an entry answers a request
/// (canonical request, scope, expiry) is the job of [`crate::TieredCache`]. A tier that finds
/// corrupt bytes removes them and returns [`TierError::Corrupt`].
#[async_trait]
pub trait Tier: Send + Sync {
    /// Which tier this is, for counters and logs.
    fn name(&self) -> TierName;

    /// The entry stored under `key`, if any.
    async fn get(&self, key: &CacheKey) -> Result<Option<Arc<Entry>>, TierError>;

    /// Stores `entry` under `key`, replacing what was there.
    async fn put(&self, key: &CacheKey, entry: &Arc<Entry>) -> Result<(), TierError>;

    /// Removes the entry under `key`, if any.
    async fn remove(&self, key: &CacheKey) -> Result<(), TierError>;

    /// Makes every write so far durable (a no-op for volatile tiers).
    async fn flush(&self) -> Result<(), TierError>;

    /// How full the tier is.
    fn usage(&self) -> TierUsage;
}
