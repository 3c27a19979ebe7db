//! The epochs in force on this node: read on every lookup, persisted in the disk tier's
//! database, and exchanged with other nodes through the bucket.
//!
//! Lookups read an `Arc` snapshot (a flag skips even that while nothing was ever invalidated).
//! A bump replaces the snapshot and persists it before returning; [`EpochStore::sync`] merges
//! what the bucket holds and publishes what it lacks (see [`crate::s3::control`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use chrono::Utc;
use strata_core::epochs::latest_plausible_ms;
use strata_core::{Entry, Epochs, Selector};

use crate::disk::DiskTier;
use crate::error::TierError;
use crate::s3::S3Tier;
use crate::s3::control::{Expect, Written};

const CURRENT_KEY: &[u8] = b"current";
/// The copy of the epochs kept beside the disk tier's database.
const EPOCHS_BESIDE: &str = "epochs.json";
/// Conditional writes of the shared document tried before leaving the rest to node copies.
const CAS_ATTEMPTS: u32 = 8;

/// The epochs of one node.
pub struct EpochStore {
    current: RwLock<Arc<Epochs>>,
    empty: AtomicBool,
    tree: Option<sled::Tree>,
    /// The disk tier, beside whose database a copy of the epochs is kept (see
    /// [`DiskTier::keep_beside`]): sled cannot open a database it finds corrupt, and a node
    /// that lost its epochs would serve what it had invalidated.
    disk: Option<DiskTier>,
    conditional_writes: bool,
    sync: tokio::sync::Mutex<SyncState>,
    /// Warnings about a shared document that cannot be exchanged, one per interval.
    shared_warnings: strata_analytics::Throttle,
}

#[derive(Default)]
struct SyncState {
    /// Other nodes' copies already merged, by path: their ETag.
    seen: HashMap<String, Option<String>>,
    /// What this node last wrote as its own copy.
    published_copy: Option<Epochs>,
}

/// What one [`EpochStore::sync`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Whether this node learnt of bumps it did not know.
    pub learnt: bool,
    /// Whether the shared `control/epochs.json` was written.
    pub published: bool,
    /// Conditional writes that lost a race and were retried.
    pub conflicts: u32,
}

impl std::fmt::Debug for EpochStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochStore")
            .field("current", &self.snapshot())
            .field("persistent", &self.tree.is_some())
            .finish()
    }
}

impl EpochStore {
    /// Epochs kept in memory only (a cache without a disk tier).
    pub fn in_memory() -> Self {
        Self::with_tree(None, Epochs::default())
    }

    /// Epochs kept in the disk tier's database (tree `epochs`), loaded as last persisted.
    pub fn open(disk: &DiskTier) -> Result<Self, TierError> {
        let tree = disk.open_tree("epochs")?;
        let mut current: Epochs = match tree.get(CURRENT_KEY)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                TierError::Storage(format!("stored invalidation epochs do not parse: {e}"))
            })?,
            None => Epochs::default(),
        };
        // The copies kept beside the database (this one's, and that of one moved aside as
        // corrupt) are written with every change: a database that damage cut short, or a new
        // one, may hold an older state, and an invalidation it lacks must still hold.
        let mut taken_up = false;
        for beside in [
            disk.kept_beside(EPOCHS_BESIDE),
            disk.salvaged(EPOCHS_BESIDE),
        ]
        .into_iter()
        .flatten()
        {
            if let Ok(epochs) = serde_json::from_slice::<Epochs>(&beside) {
                taken_up |= current.merge(&epochs);
            }
        }
        let mut store = Self::with_tree(Some(tree), Epochs::default());
        store.disk = Some(disk.clone());
        store.update(|epochs| {
            *epochs = current;
            Some(())
        })?;
        if taken_up {
            tracing::warn!(
                "invalidations the database lacked were taken up from the copy kept beside it \
                 (the database was cut short by damage, or moved aside as corrupt)"
            );
        }
        let dropped = store.drop_beyond_clock()?;
        if !dropped.is_empty() {
            tracing::warn!(
                dropped = %dropped.join(", "),
                "dropped stored invalidation epochs from the future (forged, or a clock gone wrong)"
            );
        }
        Ok(store)
    }

    fn with_tree(tree: Option<sled::Tree>, current: Epochs) -> Self {
        EpochStore {
            empty: AtomicBool::new(current.is_empty()),
            current: RwLock::new(Arc::new(current)),
            tree,
            disk: None,
            conditional_writes: true,
            sync: tokio::sync::Mutex::new(SyncState::default()),
            shared_warnings: strata_analytics::Throttle::default(),
        }
    }

    /// Whether [`EpochStore::sync`] writes the shared document with a compare-and-swap on its
    /// ETag (the default). Off, it writes unconditionally and relies on the per-node copies
    /// alone, for servers that reject conditional headers.
    pub fn conditional_writes(mut self, on: bool) -> Self {
        self.conditional_writes = on;
        self
    }

    /// The epochs in force now.
    pub fn snapshot(&self) -> Arc<Epochs> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether an entry may be served under the epochs in force (see [`Epochs::admits`]: with
    /// nothing ever invalidated, an entry that records an epoch is refused too).
    pub fn admits(&self, entry: &Entry) -> bool {
        if self.empty.load(Ordering::Acquire) {
            return entry.epochs.is_empty();
        }
        self.snapshot().admits(entry)
    }

    /// The epochs an entry written now records.
    pub fn stamp(&self, entry: &Entry) -> BTreeMap<String, u64> {
        if self.empty.load(Ordering::Acquire) {
            return BTreeMap::new();
        }
        self.snapshot().stamp(entry)
    }

    /// Bumps the epoch of `selector` on this node and persists it (not yet flushed; see
    /// [`EpochStore::flush`]). Returns the new value.
    pub fn bump(&self, selector: &Selector) -> Result<u64, TierError> {
        self.update(|epochs| Some(epochs.bump(selector, Utc::now())))
            .map(|v| v.unwrap_or(0))
    }

    /// Bumps the epochs of many selectors at once, persisting them in one write (one
    /// [`EpochStore::bump`] per key of a large pattern would rewrite the whole document each
    /// time). Returns how many were bumped.
    pub fn bump_all<'a>(
        &self,
        selectors: impl IntoIterator<Item = &'a Selector>,
    ) -> Result<usize, TierError> {
        let now = Utc::now();
        self.update(|epochs| {
            let bumped = selectors
                .into_iter()
                .map(|selector| epochs.bump(selector, now))
                .count();
            (bumped > 0).then_some(bumped)
        })
        .map(|n| n.unwrap_or(0))
    }

    /// Merges epochs learnt elsewhere (another node's copy, the shared document). Values
    /// beyond this node's clock plus [`CLOCK_SKEW`](strata_core::CLOCK_SKEW) are dropped first, with a warning naming
    /// `source`: merged by maximum they could never be undone, and one `not_before_ms` in the
    /// far future would refuse every answer on every node. Returns whether anything changed.
    pub fn absorb_from(&self, other: &Epochs, source: &str) -> Result<bool, TierError> {
        let mut other = other.clone();
        let dropped = other.drop_beyond(latest_plausible_ms(Utc::now()));
        if !dropped.is_empty() {
            strata_analytics::throttled!(
                self.shared_warnings,
                source,
                dropped = %dropped.join(", "),
                "ignoring invalidation epochs from the future (forged, or a clock gone wrong)"
            );
        }
        self.absorb(&other)
    }

    /// Merges epochs learnt elsewhere, as they are. Returns whether anything changed.
    pub fn absorb(&self, other: &Epochs) -> Result<bool, TierError> {
        if self.snapshot().covers(other) {
            return Ok(false);
        }
        self.update(|epochs| epochs.merge(other).then_some(0))
            .map(|v| v.is_some())
    }

    /// Drops this node's epochs that lie beyond its clock plus [`CLOCK_SKEW`](strata_core::CLOCK_SKEW) (left by an
    /// older release that merged forged values). Returns what was dropped, as `name=value`.
    pub fn drop_beyond_clock(&self) -> Result<Vec<String>, TierError> {
        let mut dropped = Vec::new();
        self.update(|epochs| {
            dropped = epochs.drop_beyond(latest_plausible_ms(Utc::now()));
            (!dropped.is_empty()).then_some(())
        })?;
        Ok(dropped)
    }

    /// Drops key tombstones older than `cutoff_ms`. Returns how many.
    pub fn prune_keys_before(&self, cutoff_ms: u64) -> Result<usize, TierError> {
        let mut pruned = 0;
        self.update(|epochs| {
            pruned = epochs.prune_keys_before(cutoff_ms);
            (pruned > 0).then_some(0)
        })?;
        Ok(pruned)
    }

    /// Applies `change` to a copy of the epochs; if it returns `Some`, persists the copy and
    /// puts it in force.
    fn update<R>(
        &self,
        change: impl FnOnce(&mut Epochs) -> Option<R>,
    ) -> Result<Option<R>, TierError> {
        let mut guard = self.current.write().unwrap_or_else(|p| p.into_inner());
        let mut next = Epochs::clone(&guard);
        let Some(result) = change(&mut next) else {
            return Ok(None);
        };
        if let Some(tree) = &self.tree {
            let bytes = serde_json::to_vec(&next)
                .map_err(|e| TierError::Storage(format!("encoding epochs: {e}")))?;
            if let Some(disk) = &self.disk {
                disk.keep_beside(EPOCHS_BESIDE, &bytes);
            }
            tree.insert(CURRENT_KEY, bytes)?;
        }
        self.empty.store(next.is_empty(), Ordering::Release);
        *guard = Arc::new(next);
        Ok(Some(result))
    }

    /// Makes the persisted epochs durable.
    pub async fn flush(&self) -> Result<(), TierError> {
        if let Some(tree) = &self.tree {
            tree.flush_async().await?;
        }
        Ok(())
    }

    /// Exchanges epochs with the bucket: merges every other node's copy that changed since the
    /// last sync and the shared `control/epochs.json`; then, if the shared document lacks
    /// anything this node knows, writes the union back (compare-and-swap on the ETag, retried
    /// on conflict), and refreshes this node's own copy.
    pub async fn sync(&self, s3: &S3Tier) -> Result<SyncReport, TierError> {
        self.sync_then(s3, || {}).await
    }

    /// [`EpochStore::sync`], calling `learnt` as soon as every copy has been read and merged,
    /// before the writes: from then on this node refuses what the bucket says is invalidated.
    pub async fn sync_then(
        &self,
        s3: &S3Tier,
        learnt: impl FnOnce(),
    ) -> Result<SyncReport, TierError> {
        let mut learnt = Some(learnt);
        let mut state = self.sync.lock().await;
        let mut report = SyncReport::default();
        let own = s3.layout().node_epochs_path(s3.node_id());
        for object in s3.list(&s3.layout().node_epochs_root()).await? {
            if object.key == own || state.seen.get(&object.key) == Some(&object.etag) {
                continue;
            }
            if let Some(copy) = s3.read_node_epochs(&object.key).await? {
                report.learnt |= self.absorb_from(&copy, &object.key)?;
            }
            state.seen.insert(object.key, object.etag);
        }
        // The shared document is a convenience: every node's own copy, read above, says what
        // it knows, and this node's is written below. Should the shared one be unreadable or
        // unwritable (a store that refuses conditional writes, say), the sync still holds.
        if let Err(e) = self.exchange_shared(s3, &mut report, &mut learnt).await {
            strata_analytics::throttled!(
                self.shared_warnings,
                error = %e,
                "cannot exchange the shared epochs document; the per-node copies carry the epochs"
            );
        }
        let local = self.snapshot();
        // Nothing to say until something was invalidated: a node that never saw an epoch
        // writes no copy.
        let unchanged = match &state.published_copy {
            Some(copy) => copy == &*local,
            None => local.is_empty(),
        };
        if !unchanged {
            s3.write_node_epochs(&local).await?;
            state.published_copy = Some(Epochs::clone(&local));
        }
        if report.learnt {
            self.flush().await?;
        }
        Ok(report)
    }

    /// Reads `control/epochs.json`, merges it, and writes the union back if it lacks anything
    /// this node knows (compare-and-swap on the ETag, retried on conflict).
    async fn exchange_shared(
        &self,
        s3: &S3Tier,
        report: &mut SyncReport,
        learnt: &mut Option<impl FnOnce()>,
    ) -> Result<(), TierError> {
        for _ in 0..CAS_ATTEMPTS {
            let (shared, etag) = s3.read_epochs().await?.unwrap_or_default();
            report.learnt |= self.absorb_from(&shared, "control/epochs.json")?;
            if let Some(learnt) = learnt.take() {
                learnt();
            }
            let local = self.snapshot();
            if shared.covers(&local) {
                break;
            }
            let expect = match (self.conditional_writes, etag) {
                (false, _) => Expect::Anything,
                (true, Some(etag)) => Expect::ETag(etag),
                (true, None) => Expect::Absent,
            };
            match s3.write_epochs(&local, &expect).await? {
                Written::Done => {
                    report.published = true;
                    break;
                }
                Written::Conflict => report.conflicts += 1,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use strata_core::{Codec, Selector};

    use super::*;
    use crate::disk::DiskConfig;

    /// Damage that cuts sled's log short can leave the database an older copy of the epochs
    /// than the one kept beside it; the entries written before the cut come back, and the
    /// invalidation after it must still take them back.
    #[test]
    fn the_copy_kept_beside_brings_back_what_a_database_cut_short_lacks() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let config = DiskConfig::new(dir.path().join("l2"));
        let before = {
            let disk = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
            let store = EpochStore::open(&disk).unwrap_or_else(|e| panic!("{e}"));
            let before = serde_json::to_vec(&*store.snapshot()).unwrap_or_default();
            store
                .bump(&Selector::Tag("after-the-cut".into()))
                .unwrap_or_else(|e| panic!("{e}"));
            // The database as a cut log would leave it: the state before the invalidation.
            disk.open_tree("epochs")
                .and_then(|tree| Ok(tree.insert(CURRENT_KEY, &*before)?))
                .unwrap_or_else(|e| panic!("{e}"));
            disk.flush_blocking().unwrap_or_else(|e| panic!("{e}"));
            before
        };
        assert!(!before.is_empty());
        std::thread::sleep(std::time::Duration::from_millis(100));
        let disk = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
        let store = EpochStore::open(&disk).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            store.snapshot().tag.contains_key("after-the-cut"),
            "the invalidation still holds"
        );
    }
}
