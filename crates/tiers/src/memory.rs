//! L1: moka, weighed in bytes, each entry expiring at its own `expires_at`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use moka::Expiry;
use moka::future::Cache;
use strata_analytics::TierName;
use strata_core::{CacheKey, Entry};

use crate::error::TierError;
use crate::tier::{Tier, TierUsage};

/// The memory tier. Cheap to clone (clones share the cache).
///
/// moka admits with TinyLFU and evicts LRU; it runs its housekeeping inside cache calls (no
/// background threads), so the weighed size can pass the bound briefly between two calls.
#[derive(Clone)]
pub struct MemoryTier {
    cache: Cache<u128, Arc<Entry>>,
    capacity: u64,
}

struct UntilExpiresAt;

fn time_left(entry: &Entry) -> Option<Duration> {
    let at = entry.expires_at?;
    Some((at - Utc::now()).to_std().unwrap_or(Duration::ZERO))
}

impl Expiry<u128, Arc<Entry>> for UntilExpiresAt {
    fn expire_after_create(&self, _: &u128, entry: &Arc<Entry>, _: Instant) -> Option<Duration> {
        time_left(entry)
    }

    fn expire_after_update(
        &self,
        _: &u128,
        entry: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        time_left(entry)
    }
}

impl MemoryTier {
    /// A memory tier holding at most `capacity` bytes (as weighed by [`Entry::weight`]).
    pub fn new(capacity: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(capacity)
            .weigher(|_: &u128, entry: &Arc<Entry>| entry.weight())
            .expire_after(UntilExpiresAt)
            .build();
        MemoryTier { cache, capacity }
    }

    /// The moka cache underneath, for the single-flight path of [`crate::TieredCache`].
    pub(crate) fn cache(&self) -> &Cache<u128, Arc<Entry>> {
        &self.cache
    }

    /// Runs moka's pending housekeeping, so that [`Tier::usage`] counts every entry written so
    /// far (moka counts them as it maintains itself, a little behind the writes).
    pub async fn settle_counts(&self) {
        self.cache.run_pending_tasks().await;
    }

    /// The entry with digest `id`, if present and not expired.
    pub async fn get_id(&self, id: u128) -> Option<Arc<Entry>> {
        self.cache.get(&id).await
    }

    /// Stores an entry under digest `id`.
    pub async fn insert_id(&self, id: u128, entry: Arc<Entry>) {
        self.cache.insert(id, entry).await;
    }

    /// Removes the entry with digest `id`.
    pub async fn remove_id(&self, id: u128) {
        self.cache.invalidate(&id).await;
    }

    /// Runs moka's pending housekeeping (evictions, expirations) now.
    pub async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks().await;
    }

    /// Bytes held, as weighed.
    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// The byte bound.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

#[async_trait]
impl Tier for MemoryTier {
    fn name(&self) -> TierName {
        TierName::L1
    }

    async fn get(&self, key: &CacheKey) -> Result<Option<Arc<Entry>>, TierError> {
        Ok(self.get_id(key.id()).await)
    }

    async fn put(&self, key: &CacheKey, entry: &Arc<Entry>) -> Result<(), TierError> {
        self.insert_id(key.id(), Arc::clone(entry)).await;
        Ok(())
    }

    async fn remove(&self, key: &CacheKey) -> Result<(), TierError> {
        self.remove_id(key.id()).await;
        Ok(())
    }

    async fn flush(&self) -> Result<(), TierError> {
        Ok(())
    }

    fn usage(&self) -> TierUsage {
        TierUsage {
            entries: self.cache.entry_count(),
            bytes: self.cache.weighted_size(),
            capacity: Some(self.capacity),
        }
    }
}
