//! Taking answers back: invalidation by selector, by key and by pattern, `clear`, garbage
//! collection, and the background tasks that refresh epochs and sweep the disk tier.
//!
//! Bulk selectors (model, user, session, namespace, tag, age, all) bump an epoch: O(1), no
//! entry is touched, and every tier stops serving the covered entries at once because every
//! lookup checks the epochs ([`crate::EpochStore`]). The copies are removed lazily when a lookup
//! meets them, by the disk sweep, and for good by [`TieredCache::gc`]. Keys and patterns remove
//! the matching copies from every tier at once and leave a key tombstone (a key epoch) so that
//! other nodes' copies stop being served too.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::Utc;
use strata_analytics::TierName;
use strata_core::{CacheKey, CodecError, Entry, Epochs, ModelSlug, Selector};

use crate::cache::{Inner, TieredCache};
use crate::epochs::{EpochStore, SyncReport};
use crate::error::TierError;
use crate::s3::S3Tier;
use crate::s3::layout::{ENTRY_SUFFIX, Layout, METADATA_SUFFIX};

/// What an invalidation did on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidation {
    /// What was invalidated, for people.
    pub what: String,
    /// Entries affected. Exact for keys and patterns (copies found and removed); for epoch
    /// selectors, an estimate counted on this node's tiers (see [`Invalidation::exact`]).
    pub affected: u64,
    /// Whether `affected` is exact.
    pub exact: bool,
    /// Whether the bucket's shared epochs were updated (with an S3 tier). When this is false,
    /// the invalidation holds on this node and is published by the next refresh.
    pub published: bool,
}

/// What [`TieredCache::gc`] found and freed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Entries looked at in L2.
    pub l2_seen: u64,
    /// Entries removed from L2 (expired, invalidated or corrupt).
    pub l2_removed: u64,
    /// Bytes they held.
    pub l2_bytes: u64,
    /// Objects listed under `llm-cache/` and `cache-index/by-hash/`.
    pub s3_listed: u64,
    /// Entry objects found expired, invalidated or corrupt.
    pub s3_entries: u64,
    /// Objects deleted (entries, metadata, pointers).
    pub s3_objects: u64,
    /// Bytes those objects held.
    pub s3_bytes: u64,
    /// Key tombstones pruned: older than the longest TTL, they hide nothing any more.
    pub tombstones_pruned: u64,
    /// Analytics records pruned for age: hit ids and request metrics past the retention.
    pub analytics_pruned: u64,
    /// Objects of nodes stopped long ago deleted from the bucket: per-node epoch copies not
    /// written for `forget_nodes_after`, and daily analytics past the retention.
    pub stale_objects: u64,
    /// Whether nothing was deleted (`--dry-run`): the counts say what would be.
    pub dry_run: bool,
    /// Whether the run stopped between two pages of the bucket's listing (asked to). The
    /// counts are this run's; the next gc takes up where it stopped (a dry run starts over).
    pub stopped: bool,
}

/// Progress of a long operation, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Objects listed so far.
    Listed(u64),
    /// Entry objects checked so far, and objects listed so far (a gc lists and checks a page
    /// at a time: the total is not known before the end).
    Checked(u64, u64),
    /// Objects deleted so far, and the number that will have been deleted once the batch in
    /// hand is.
    Deleted(u64, u64),
}

impl TieredCache {
    /// The invalidation epochs of this cache.
    pub fn epochs(&self) -> &Arc<EpochStore> {
        &self.inner.epochs
    }

    /// Invalidates every entry a selector covers, on every tier of every node.
    ///
    /// Bulk selectors bump an epoch (O(1), nothing is scanned); the bump is persisted before
    /// this returns and, with an S3 tier, published to `control/epochs.json`, which other nodes
    /// read every refresh interval. [`Selector::Key`] removes the entry from every tier now.
    /// `affected` is exact only for keys; call [`TieredCache::estimate`] first for a count.
    pub async fn invalidate(&self, selector: &Selector) -> Result<Invalidation, TierError> {
        let inner = &self.inner;
        let selector = self.canonical_selector(selector);
        let mut affected = 0;
        let exact = matches!(selector, Selector::Key(_));
        if let Selector::Key(id) = &selector {
            let key = CacheKey::parse(id)
                .or_else(|| CacheKey::parse(&format!("x_{id}")))
                .ok_or_else(|| {
                    TierError::Invalid(format!(
                        "`{id}` is not a cache key (`model_32hex`) or a cache id (32 hex digits)"
                    ))
                })?;
            // The tombstone goes first: should a removal below fail part-way (S3
            // unreachable), the copies it leaves behind are refused all the same.
            inner.epochs.bump(&Selector::Key(key.hex()))?;
            inner.epochs.flush().await?;
            affected = u64::from(self.remove_everywhere(&key).await?);
        } else {
            inner.epochs.bump(&selector)?;
        }
        inner.epochs.flush().await?;
        let published = self.publish().await;
        self.audit(
            "invalidate",
            Some(selector.to_string()),
            exact.then_some(affected),
        )
        .await;
        Ok(Invalidation {
            what: selector.to_string(),
            affected,
            exact,
            published,
        })
    }

    /// Model names go through the normalizer (`GPT-4o` means `gpt-4o`); display keys become
    /// cache ids.
    fn canonical_selector(&self, selector: &Selector) -> Selector {
        match selector {
            Selector::Model(m) => Selector::Model(self.inner.normalizer.model_name(m)),
            other => other.clone(),
        }
    }

    /// Removes `key`'s copies from L1, L2 and S3 (and the outbox). Returns whether any tier
    /// had one.
    async fn remove_everywhere(&self, key: &CacheKey) -> Result<bool, TierError> {
        let inner = &self.inner;
        // Queued writes land first: none may bring back what this removes.
        inner.settle().await;
        let mut found = inner.memory.get_id(key.id()).await.is_some();
        if let Some(disk) = &inner.disk {
            found |= disk.remove_id(key.id())?;
        } else if let Some(l2) = &inner.l2 {
            found |= matches!(l2.get(key).await, Ok(Some(_)));
        }
        if let Some(l3) = &inner.l3 {
            let in_s3 = match l3.known_path(key)? {
                Some(_) => Ok(true),
                None => l3
                    .get_object(&l3.layout().pointer_path(&key.hex()))
                    .await
                    .map(|pointer| pointer.is_some()),
            };
            // S3 out of reach: the key's tombstone covers whatever copy is there, and the
            // removal below still clears this node's tiers.
            match in_s3 {
                Ok(in_s3) => found |= in_s3,
                Err(e) => inner.tier_failed(TierName::L3, "lookup", &e),
            }
        }
        // The caller has bumped the key's epoch already.
        inner.remove(key, false).await;
        Ok(found)
    }

    /// Publishes the epochs to the bucket now; false (and a warning) if S3 cannot take them.
    async fn publish(&self) -> bool {
        let Some(l3) = &self.inner.l3 else {
            return false;
        };
        // A successful sync leaves the bump in the shared document or, after repeated lost
        // races, in this node's own copy: either way every node reads it on its next refresh.
        match self.inner.epochs.sync(l3).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e,
                    "cannot publish the invalidation to S3 now; it holds here and the next refresh publishes it");
                false
            }
        }
    }

    /// Exchanges epochs with the bucket now (the background refresher does this every refresh
    /// interval). Without an S3 tier there is nothing to do.
    pub async fn refresh_epochs(&self) -> Result<SyncReport, TierError> {
        match &self.inner.l3 {
            Some(l3) => self.inner.epochs.sync(l3).await,
            None => Ok(SyncReport::default()),
        }
    }

    /// Repairs poisoned invalidation epochs: merges what the bucket holds (values beyond every
    /// clock dropped, as always), drops such values from this node's own epochs (an older
    /// release merged them as they came), persists the result, and with an S3 tier writes it
    /// over the shared `control/epochs.json` and this node's copy. Other nodes' copies are
    /// theirs to rewrite; every node ignores their values from the future. Returns what this
    /// node dropped, as `name=value`.
    pub async fn reset_epochs(&self) -> Result<Vec<String>, TierError> {
        let epochs = &self.inner.epochs;
        if let Some(l3) = &self.inner.l3 {
            epochs.sync(l3).await?;
        }
        let dropped = epochs.drop_beyond_clock()?;
        epochs.flush().await?;
        if let Some(l3) = &self.inner.l3 {
            let local = epochs.snapshot();
            l3.write_epochs(&local, &crate::s3::control::Expect::Anything)
                .await?;
            l3.write_node_epochs(&local).await?;
        }
        let dropped_names = (!dropped.is_empty()).then(|| dropped.join(", "));
        self.audit("epochs reset", dropped_names, Some(dropped.len() as u64))
            .await;
        Ok(dropped)
    }

    /// Rewrites every entry of the disk tier under the current key (sealed, and encrypted if
    /// the keyring says so): entries written under an old key, or before there was a key.
    /// With S3, each rewritten entry is queued for upload again, so this node's objects follow
    /// (other nodes' objects are theirs to rewrite; this node still reads them under the old
    /// keys it holds). Returns (seen, rewritten); an entry that cannot be read under any key
    /// held is left as it is and counted as neither.
    pub async fn rekey(&self) -> Result<(u64, u64), TierError> {
        let inner = &self.inner;
        let Some(disk) = inner.disk.clone() else {
            return Ok((0, 0));
        };
        let codec = disk.codec().clone();
        if codec.keys().is_none() {
            return Err(TierError::Invalid(
                "rekey needs a key: [security] key_file, or STRATA_SECURITY_KEY".into(),
            ));
        }
        inner.settle().await;
        let reader = codec.clone().accepting_unsealed();
        let ((seen, rewritten), ids) = blocking({
            let disk = disk.clone();
            move || {
                let mut ids = Vec::new();
                let done = disk.rewrite(|id, value| {
                    if codec.sealed_with_current_key(value) {
                        return None;
                    }
                    let entry = reader.decode_local(value).ok()?;
                    let sealed = codec.encode(&entry).ok()?;
                    ids.push((id, entry.model));
                    Some(sealed)
                })?;
                Ok((done, ids))
            }
        })
        .await?;
        if let Some(l3) = &inner.l3 {
            for (id, model) in &ids {
                let key = CacheKey {
                    slug: ModelSlug::new(model),
                    digest: id.to_be_bytes(),
                };
                l3.enqueue_stored(&key)?;
            }
        }
        self.audit("rekey", None, Some(rewritten)).await;
        Ok((seen, rewritten))
    }

    /// Counts the entries on this node that `selector` would invalidate: those its tiers
    /// still serve and would stop serving. Scans the disk tier (or memory without one); an
    /// estimate of the whole cache, since other nodes and S3 may hold more.
    pub async fn estimate(&self, selector: &Selector) -> Result<u64, TierError> {
        let selector = self.canonical_selector(selector);
        let now_epochs = self.inner.epochs.snapshot();
        let mut after = Epochs::clone(&now_epochs);
        // A moment later than now, so that entries written this millisecond count too.
        after.bump(&selector, Utc::now() + chrono::Duration::milliseconds(1));
        let covered = move |e: &Entry| now_epochs.admits(e) && !after.admits(e);
        match &self.inner.disk {
            Some(disk) => {
                let disk = disk.clone();
                blocking(move || {
                    let mut n = 0;
                    disk.sweep(|_, decoded, _, _| {
                        if decoded.is_ok_and(|e| covered(&e)) {
                            n += 1;
                        }
                        false
                    })?;
                    Ok(n)
                })
                .await
            }
            None => Ok(self
                .inner
                .memory
                .cache()
                .iter()
                .filter(|(_, e)| covered(e))
                .count() as u64),
        }
    }

    /// Invalidates every entry whose display key (`{model_slug}_{32 hex}`) matches a glob
    /// (`gpt-4o_*`, `*_00*`): removes the copies from L1, L2, the outbox and S3 (listing
    /// `llm-cache/`), and leaves a key tombstone per match so other nodes stop serving theirs.
    /// `affected` is the exact number of distinct keys removed.
    pub async fn invalidate_pattern(
        &self,
        pattern: &str,
        mut progress: impl FnMut(Progress),
    ) -> Result<Invalidation, TierError> {
        let inner = &self.inner;
        // Queued writes land first: none may bring back what this removes.
        inner.settle().await;
        let matcher = globset::Glob::new(pattern)
            .map_err(|e| TierError::Invalid(format!("pattern `{pattern}`: {e}")))?
            .compile_matcher();
        let mut ids: BTreeSet<String> = BTreeSet::new();
        for (id, entry) in inner.memory.cache().iter() {
            if matcher.is_match(&entry.cache_key) {
                ids.insert(entry.cache_id.clone());
                inner.memory.remove_id(*id).await;
            }
        }
        if let Some(disk) = &inner.disk {
            let (disk, m) = (disk.clone(), matcher.clone());
            let found = blocking(move || {
                let mut found = Vec::new();
                disk.sweep(|_, decoded, _, _| match decoded {
                    Ok(e) if m.is_match(&e.cache_key) => {
                        found.push(e.cache_id);
                        true
                    }
                    _ => false,
                })?;
                Ok(found)
            })
            .await?;
            ids.extend(found);
        }
        if let Some(l3) = &inner.l3 {
            for (digest, envelope) in l3.queued()? {
                if let Ok(e) = l3.decode(&envelope)
                    && matcher.is_match(&e.cache_key)
                {
                    ids.insert(e.cache_id);
                    l3.dequeue(&CacheKey {
                        slug: ModelSlug::new(&e.model),
                        digest,
                    })?;
                }
            }
        }
        // Tombstones for what this node held, before S3 is listed: should the listing or the
        // deletes fail, those keys are refused all the same, here and (once published)
        // everywhere.
        bump_keys(&inner.epochs, &ids)?;
        inner.epochs.flush().await?;
        // Whatever happens in the bucket, the tombstones written so far are published.
        let in_bucket = async {
            if let Some(l3) = &inner.l3 {
                let layout = l3.layout().clone();
                let mut doomed = Vec::new();
                let mut listed = 0;
                let mut in_s3 = BTreeSet::new();
                l3.list_pages(&layout.cache_root(), |page| {
                    listed += page.len() as u64;
                    for object in page {
                        let Some(parsed) = entry_or_metadata(&layout, &object.key) else {
                            continue;
                        };
                        if matcher.is_match(format!("{}_{}", parsed.0, parsed.1)) {
                            in_s3.insert(parsed.1);
                            doomed.push(object.key);
                        }
                    }
                    progress(Progress::Listed(listed));
                })
                .await?;
                // And for the keys only S3 held, before their objects are deleted.
                let only_in_s3: BTreeSet<String> = in_s3.difference(&ids).cloned().collect();
                bump_keys(&inner.epochs, &only_in_s3)?;
                inner.epochs.flush().await?;
                ids.extend(only_in_s3);
                for id in &ids {
                    doomed.push(layout.pointer_path(id));
                    if let Some(key) = CacheKey::parse(&format!("x_{id}")) {
                        l3.forget(&key)?;
                    }
                }
                let total = doomed.len() as u64;
                l3.delete_objects(&doomed, |n| progress(Progress::Deleted(n, total)))
                    .await?;
            }
            Ok::<(), TierError>(())
        }
        .await;
        let published = self.publish().await;
        let what = format!("keys matching {pattern}");
        self.audit("invalidate", Some(what.clone()), Some(ids.len() as u64))
            .await;
        in_bucket?;
        Ok(Invalidation {
            what,
            affected: ids.len() as u64,
            exact: true,
            published,
        })
    }

    /// Invalidates everything, everywhere (bumps the `all` epoch), and empties this node's
    /// memory, disk tier and outbox at once. Objects in S3 are left for [`TieredCache::gc`],
    /// which the `strata clear` command runs next. Returns how many entries this node held.
    pub async fn clear(&self) -> Result<Invalidation, TierError> {
        let inner = &self.inner;
        // Queued writes land first: none may bring back what this removes.
        inner.settle().await;
        inner.epochs.bump(&Selector::All)?;
        inner.epochs.flush().await?;
        let in_memory = inner.memory.cache().entry_count();
        inner.memory.cache().invalidate_all();
        let mut affected = in_memory;
        if let Some(disk) = &inner.disk {
            // With the entries go the uploads queued from them (copies already counted).
            let disk = disk.clone();
            affected = affected.max(blocking(move || disk.clear()).await?);
        }
        if let Some(l3) = &inner.l3 {
            l3.clear_index()?;
        }
        let published = self.publish().await;
        self.audit("clear", None, Some(affected)).await;
        Ok(Invalidation {
            what: Selector::All.to_string(),
            affected,
            exact: true,
            published,
        })
    }

    /// Deletes expired, invalidated and corrupt entries from L2 and, with an S3 tier, from
    /// the bucket: entry and metadata objects, and the by-hash pointer of a key left with no
    /// object, with DeleteObjects in batches of 1,000. With `dry_run`, only counts.
    pub async fn gc(
        &self,
        dry_run: bool,
        progress: impl FnMut(Progress),
    ) -> Result<GcReport, TierError> {
        self.gc_until(dry_run, progress, || false).await
    }

    /// [`TieredCache::gc`], stopping between two pages of the bucket's listing once `stop`
    /// says so ([`GcReport::stopped`]): what was deleted stays deleted and is counted and
    /// audited by this run; the next gc takes up after the last key this one handled, with
    /// the verdicts it kept, so no pointer of a deleted entry is left behind.
    pub async fn gc_until(
        &self,
        dry_run: bool,
        mut progress: impl FnMut(Progress),
        stop: impl Fn() -> bool,
    ) -> Result<GcReport, TierError> {
        let inner = &self.inner;
        // Queued writes land first: none may bring back what this removes.
        inner.settle().await;
        let mut report = GcReport {
            dry_run,
            ..GcReport::default()
        };
        let epochs = inner.epochs.snapshot();
        if let Some(disk) = &inner.disk {
            let (disk, e, ttl) = (disk.clone(), Arc::clone(&epochs), inner.ttl.clone());
            let swept = blocking(move || sweep_disk(&disk, &e, &ttl, dry_run)).await?;
            report.l2_seen = swept.0;
            report.l2_removed = swept.1;
            report.l2_bytes = swept.2;
        }
        if let Some(l3) = &inner.l3 {
            let run = GcRun {
                epochs: &epochs,
                ttl: &inner.ttl,
                dry_run,
                stop: &stop,
            };
            gc_bucket(l3, run, &mut report, &mut progress).await?;
            if !report.stopped {
                report.stale_objects = self.gc_stale_objects(l3, dry_run).await?;
            }
        }
        if !dry_run && report.stopped {
            let removed = report.l2_removed + report.s3_entries;
            self.audit("gc", Some("stopped midway".into()), Some(removed))
                .await;
        } else if !dry_run {
            report.tombstones_pruned = self.prune_tombstones().await? as u64;
            if let (Some(analytics), Some(keep)) = (&inner.analytics, inner.analytics_retention) {
                let (ids, requests) = analytics.prune(keep)?;
                report.analytics_pruned = ids + requests;
            }
            let removed = report.l2_removed + report.s3_entries;
            self.audit("gc", None, Some(removed)).await;
        }
        Ok(report)
    }
}

/// (seen, removed, bytes) of a disk sweep: expired, invalidated and undecodable entries.
fn sweep_disk(
    disk: &crate::DiskTier,
    epochs: &Epochs,
    ttl: &crate::TtlPolicy,
    dry_run: bool,
) -> Result<(u64, u64, u64), TierError> {
    let now = Utc::now();
    let mut doomed = (0, 0);
    let swept = disk.sweep(|_, decoded, bytes, _| {
        let dead = match decoded {
            Ok(e) => ttl.expired(&e, now) || !epochs.admits(&e),
            // Possibly the keys that are wrong, not the copy: left (a put replaces it).
            Err(CodecError::Unauthentic(_)) => false,
            Err(_) => true,
        };
        if dead {
            doomed.0 += 1;
            doomed.1 += bytes;
        }
        dead && !dry_run
    })?;
    Ok((swept.seen, doomed.0, doomed.1))
}

/// The model slug and cache id of an entry or metadata object's path.
fn entry_or_metadata(layout: &Layout, path: &str) -> Option<(String, String)> {
    let as_entry = match path.strip_suffix(METADATA_SUFFIX) {
        Some(stem) => format!("{stem}{ENTRY_SUFFIX}"),
        None => path.to_string(),
    };
    let parsed = layout.parse_entry_path(&as_entry)?;
    Some((parsed.slug, parsed.cache_id))
}

/// How a cache id stands in the bucket, in the scratch tree of a gc: some object of it is
/// alive, or every one seen is dead.
const ID_ALIVE: u8 = 1;
const ID_DEAD: u8 = 0;

/// The scratch trees a gc of the bucket keeps its verdicts per cache id in: a real run's
/// (kept when it is stopped, for the next to take up), and a dry run's (never taken up).
const GC_SCRATCH_TREE: &str = "l3-gc-scratch";
const GC_DRY_SCRATCH_TREE: &str = "l3-gc-dry-scratch";

/// The tree a stopped gc keeps its [`GcState`] in.
const GC_STATE_TREE: &str = "l3-gc-state";

/// Where a stopped gc of the bucket was: the listing under way (the entries, then the
/// pointers), the last key it handled there, and the metadata objects of dead entries it has
/// not listed yet (one lists right after its entry, on the next page at the latest).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct GcState {
    pointers: bool,
    after: Option<String>,
    metadata_due: Vec<String>,
}

/// What a gc of the bucket judges by, and whether it is to stop.
struct GcRun<'a, S: Fn() -> bool> {
    epochs: &'a Epochs,
    ttl: &'a crate::TtlPolicy,
    dry_run: bool,
    stop: &'a S,
}

/// Deletes dead entries from the bucket, a listing page at a time: memory holds one page, the
/// verdict per cache id waits in a scratch tree of the disk tier. A run stopped between two
/// pages has deleted whole pages and saved where it was; the next one takes up there and
/// counts nothing twice. A saved state that cannot be read starts the listing over.
async fn gc_bucket<S: Fn() -> bool>(
    l3: &S3Tier,
    run: GcRun<'_, S>,
    report: &mut GcReport,
    progress: &mut impl FnMut(Progress),
) -> Result<(), TierError> {
    let GcRun {
        epochs,
        ttl,
        dry_run,
        stop,
    } = run;
    let layout = l3.layout().clone();
    let saved = l3.saved_run::<GcState>(GC_STATE_TREE)?;
    let (ids, mut state) = if dry_run {
        let ids = l3.scratch_tree(GC_DRY_SCRATCH_TREE)?;
        ids.clear()?;
        (ids, GcState::default())
    } else {
        let ids = l3.scratch_tree(GC_SCRATCH_TREE)?;
        match saved.load()? {
            Some(state) => (ids, state),
            None => {
                ids.clear()?;
                (ids, GcState::default())
            }
        }
    };
    // Saved after every page of a real run; a dry run deletes nothing and leaves nothing.
    let save = |state: &GcState| if dry_run { Ok(()) } else { saved.save(state) };
    let now = Utc::now();
    let keyed = l3.has_keys();
    let (mut listed, mut checked, mut deleted) = (0u64, 0u64, 0u64);
    let mut metadata_due: HashSet<String> = std::mem::take(&mut state.metadata_due)
        .into_iter()
        .collect();
    if !state.pointers {
        let mut pages = l3.pages_after(&layout.cache_root(), state.after.take());
        while let Some(page) = pages.next().await? {
            listed += page.len() as u64;
            progress(Progress::Listed(listed));
            let last = page.last().map(|o| o.key.clone());
            let mut doomed: Vec<(String, u64)> = Vec::new();
            let mut entries = Vec::new();
            let mut metadata_here: HashMap<String, u64> = HashMap::new();
            let due = std::mem::take(&mut metadata_due);
            for object in page {
                if due.contains(&object.key) {
                    doomed.push((object.key, object.size));
                } else if let Some(parsed) = layout.parse_entry_path(&object.key) {
                    entries.push((object.key, object.size, parsed.cache_id));
                } else if object.key.ends_with(METADATA_SUFFIX) {
                    metadata_here.insert(object.key, object.size);
                }
            }
            let verdicts = l3
                .for_each_concurrent(entries, |(path, size, id)| async move {
                    let dead = match l3.get_object(&path).await {
                        Ok(Some(bytes)) => match l3.decode(&bytes) {
                            Ok(e) => Some(ttl.expired(&e, now) || !epochs.admits(&e)),
                            // Written by a newer release of strata (a node upgraded before
                            // this one): not this node's to judge. The checksum matched: the
                            // bytes are whole.
                            Err(TierError::Corrupt(
                                CodecError::UnknownVersion(_) | CodecError::UnknownFlags(_),
                            )) => Some(false),
                            // Not authentic: with keys, a forgery (or a key no longer held),
                            // deleted; without any, sealed by nodes that hold one, not this
                            // node's to judge.
                            Err(TierError::Corrupt(CodecError::Unauthentic(_))) => Some(keyed),
                            Err(_) => Some(true),
                        },
                        Ok(None) => None,
                        Err(e) => {
                            tracing::warn!(%path, error = %e, "gc cannot read an entry object; keeping it");
                            None
                        }
                    };
                    (path, size, id, dead)
                })
                .await;
            for (path, size, id, dead) in verdicts {
                checked += 1;
                if dead == Some(true) {
                    report.s3_entries += 1;
                    // Its metadata object goes with it: listed on this page, or first on the
                    // next.
                    let metadata = Layout::metadata_path(&path);
                    match metadata_here.get(&metadata) {
                        Some(&size) => doomed.push((metadata, size)),
                        None => {
                            metadata_due.insert(metadata);
                        }
                    }
                    doomed.push((path, size));
                    if ids.get(id.as_bytes())?.is_none() {
                        ids.insert(id.as_bytes(), &[ID_DEAD])?;
                    }
                } else {
                    ids.insert(id.as_bytes(), &[ID_ALIVE])?;
                }
            }
            progress(Progress::Checked(checked, listed));
            deleted += remove(l3, doomed, dry_run, report, deleted, progress).await?;
            state.after = last.or(state.after);
            state.metadata_due = metadata_due.iter().cloned().collect();
            save(&state)?;
            if !pages.ended() && stop() {
                report.s3_listed = listed;
                report.stopped = true;
                return Ok(());
            }
        }
        state = GcState {
            pointers: true,
            ..GcState::default()
        };
        save(&state)?;
    }
    // The pointers of keys every object of which died.
    let mut pages = l3.pages_after(&layout.pointer_root(), state.after.take());
    while let Some(page) = pages.next().await? {
        listed += page.len() as u64;
        progress(Progress::Listed(listed));
        let last = page.last().map(|o| o.key.clone());
        let mut doomed = Vec::new();
        for object in page {
            let Some(id) = layout.parse_pointer_path(&object.key) else {
                continue;
            };
            if ids.get(id.as_bytes())?.as_deref() == Some(&[ID_DEAD]) {
                if !dry_run && let Some(key) = CacheKey::parse(&format!("x_{id}")) {
                    l3.forget(&key)?;
                }
                doomed.push((object.key, object.size));
            }
        }
        deleted += remove(l3, doomed, dry_run, report, deleted, progress).await?;
        state.after = last.or(state.after);
        save(&state)?;
        if !pages.ended() && stop() {
            report.s3_listed = listed;
            report.stopped = true;
            return Ok(());
        }
    }
    ids.clear()?;
    if !dry_run {
        saved.finish()?;
    }
    report.s3_listed = listed;
    Ok(())
}

/// Deletes `doomed` (unless `dry_run`), counting objects and bytes in `report`; `before`
/// were deleted earlier in the run. Returns how many were deleted (or would be).
async fn remove(
    l3: &S3Tier,
    doomed: Vec<(String, u64)>,
    dry_run: bool,
    report: &mut GcReport,
    before: u64,
    progress: &mut impl FnMut(Progress),
) -> Result<u64, TierError> {
    if doomed.is_empty() {
        return Ok(0);
    }
    report.s3_bytes += doomed.iter().map(|(_, size)| size).sum::<u64>();
    let paths: Vec<String> = doomed.into_iter().map(|(path, _)| path).collect();
    let n = if dry_run {
        paths.len() as u64
    } else {
        l3.delete_objects(&paths, |n| {
            progress(Progress::Deleted(before + n, before + paths.len() as u64))
        })
        .await?
    };
    report.s3_objects += n;
    Ok(n)
}

async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, TierError> + Send + 'static,
) -> Result<R, TierError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TierError::Storage(format!("background task: {e}")))?
}

impl TieredCache {
    /// Deletes what nodes stopped long ago left in the bucket: their copies of the epochs not
    /// written for `forget_nodes_after` (whatever they held is in the shared document and in
    /// every node's copy, merged at every refresh since), and daily analytics documents older
    /// than the analytics retention. Never this node's own copy. Returns how many (would be)
    /// deleted.
    async fn gc_stale_objects(&self, l3: &S3Tier, dry_run: bool) -> Result<u64, TierError> {
        let inner = &self.inner;
        let now = Utc::now();
        let older = |d: Option<Duration>| {
            d.and_then(|d| chrono::Duration::from_std(d).ok())
                .and_then(|d| now.checked_sub_signed(d))
        };
        let layout = l3.layout().clone();
        let own = layout.node_epochs_path(l3.node_id());
        let mut doomed = Vec::new();
        if let Some(cutoff) = older(inner.forget_nodes_after) {
            for object in l3.list(&layout.node_epochs_root()).await? {
                if object.key != own && object.last_modified.is_some_and(|t| t < cutoff) {
                    doomed.push(object.key);
                }
            }
        }
        if let Some(cutoff) = older(inner.analytics_retention) {
            for object in l3.list(&layout.analytics_root()).await? {
                if layout
                    .parse_analytics_path(&object.key)
                    .is_some_and(|(_, day)| day < cutoff.date_naive())
                {
                    doomed.push(object.key);
                }
            }
        }
        let n = doomed.len() as u64;
        if !dry_run && !doomed.is_empty() {
            l3.delete_objects(&doomed, |_| {}).await?;
        }
        Ok(n)
    }

    /// Prunes the key tombstones older than the longest TTL (none while some TTL is `never`):
    /// every entry they could hide has expired on every node, since each node bounds entries
    /// by its TTL. The watermark travels with the epochs, so other nodes drop them too.
    async fn prune_tombstones(&self) -> Result<usize, TierError> {
        let ttl = &self.inner.ttl;
        let Some(mut longest) = ttl.default else {
            return Ok(0);
        };
        for per_model in ttl.per_model.values() {
            longest = longest.max(*per_model);
        }
        let Some(cutoff) = chrono::Duration::from_std(longest)
            .ok()
            .and_then(|d| Utc::now().checked_sub_signed(d))
            .and_then(|t| u64::try_from(t.timestamp_millis()).ok())
        else {
            return Ok(0);
        };
        let pruned = self.inner.epochs.prune_keys_before(cutoff)?;
        if pruned > 0 {
            self.inner.epochs.flush().await?;
            self.publish().await;
        }
        Ok(pruned)
    }
}

/// Refreshes the epochs from the bucket every `every`, while the cache lives.
pub(crate) fn spawn_refresher(
    cache: &TieredCache,
    every: Duration,
    known: tokio::sync::watch::Sender<bool>,
) {
    let weak = Arc::downgrade(&cache.inner);
    let every = every.max(Duration::from_millis(100));
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!("no async runtime: epochs are refreshed only by refresh_epochs()");
        known.send_replace(true);
        return;
    };
    runtime.spawn(async move {
        loop {
            let Some(inner) = weak.upgrade() else { return };
            // Lookups below L1 wait for the first attempt (`Inner::epochs_known`): released once
            // every copy is read and merged, or once the attempt failed.
            refresh_once(&inner, || {
                known.send_replace(true);
            })
            .await;
            drop(inner);
            known.send_replace(true);
            tokio::time::sleep(every).await;
        }
    });
}

async fn refresh_once(inner: &Inner, learnt: impl FnOnce()) {
    let Some(l3) = &inner.l3 else { return };
    if let Err(e) = inner.epochs.sync_then(l3, learnt).await {
        tracing::debug!(error = %e, "refreshing invalidation epochs failed; will retry");
        inner.tier_failed(TierName::L3, "refresh epochs", &e);
    }
}

/// Removes expired and invalidated entries from the disk tier every `every`.
pub(crate) fn spawn_sweeper(cache: &TieredCache, every: Duration) {
    let weak: Weak<Inner> = Arc::downgrade(&cache.inner);
    let every = every.max(Duration::from_secs(1));
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!("no async runtime: the disk tier is swept only by gc()");
        return;
    };
    runtime.spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(inner) = weak.upgrade() else { return };
            let (Some(disk), epochs) = (inner.disk.clone(), inner.epochs.snapshot()) else {
                return;
            };
            let ttl = inner.ttl.clone();
            drop(inner);
            match blocking(move || sweep_disk(&disk, &epochs, &ttl, false)).await {
                Ok((_, removed, bytes)) if removed > 0 => {
                    tracing::info!(
                        removed,
                        bytes,
                        "disk sweep removed expired and invalidated entries"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "disk sweep failed"),
            }
        }
    });
}

/// Leaves a key tombstone for each id, in one write.
fn bump_keys(epochs: &EpochStore, ids: &BTreeSet<String>) -> Result<usize, TierError> {
    let selectors: Vec<Selector> = ids.iter().cloned().map(Selector::Key).collect();
    epochs.bump_all(&selectors)
}
