//! L2: sled on local disk, bounded in bytes, least recently used out first.
//!
//! sled keeps recently used pages in memory and writes its log from its own flusher thread every
//! `flush_every_ms`, so `get` and `insert` are in-memory operations that are called directly
//! from async code; the calls that wait for the disk (`flush`, open, eviction batches) run on
//! the blocking pool. sled 0.34 is not a database to trust blindly: every value is an
//! [`strata_core::codec`] envelope with a checksum, a copy that fails to decode is removed, and
//! a directory that sled cannot open for corruption is moved aside and replaced by a new one,
//! into which what can still be read of it is salvaged ([`salvage`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use strata_analytics::{Stats, TierName};
use strata_core::{CacheKey, Codec, Entry};

use crate::error::TierError;
use crate::tier::{Tier, TierUsage};

mod index;
use index::{Index, Record};
mod salvage;
pub use salvage::Salvage;
mod vlog;
use vlog::{Pointer, ValueLog};

/// Settings of the disk tier.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// Directory of the sled database.
    pub path: PathBuf,
    /// Bound on the bytes of stored envelopes; past it the least recently used are evicted
    /// down to 90% of the bound.
    pub capacity: u64,
    /// sled's page cache, in bytes; raised to [`MIN_PAGE_CACHE`] when smaller.
    pub cache_capacity: u64,
    /// How often sled writes its log to disk, in milliseconds.
    pub flush_every_ms: u64,
}

impl DiskConfig {
    /// Defaults for a directory: 2 GiB bound, 16 MiB page cache, flush every 500 ms.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            path: path.into(),
            capacity: 2 << 30,
            cache_capacity: 16 << 20,
            flush_every_ms: 500,
        }
    }
}

/// Bytes the files under `dir` occupy (allocated blocks where the platform tells, else lengths).
fn occupied(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            occupied(&entry.path())?
        } else {
            #[cfg(unix)]
            {
                std::os::unix::fs::MetadataExt::blocks(&meta) * 512
            }
            #[cfg(not(unix))]
            {
                meta.len()
            }
        };
    }
    Ok(total)
}

/// In `meta`: the entry count and bytes the last handle saw when it closed, taken out at open
/// (a crash leaves none, and the index is counted by cursor instead).
const TOTALS_KEY: &[u8] = b"totals/v1";

/// Left in `meta` by earlier releases (the eviction index's snapshot token, the mark of sizes
/// in the access records): removed at open.
const OLD_META_KEYS: [&[u8]; 2] = [b"slots-snapshot/v1", b"sizes-in-access/v1"];

/// The eviction index's snapshot an earlier release wrote at close, deleted at open.
const OLD_SNAPSHOT_FILE: &str = "slots.snapshot";
/// The snapshot an earlier release was writing when it stopped.
const OLD_SNAPSHOT_TEMPORARY: &str = ".slots.snapshot.new";

/// The last use an access record of an earlier release holds (its first 8 bytes); 0 if
/// unreadable.
fn last_use_of(record: &[u8]) -> u64 {
    record
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes)
}

/// The size of a value-log segment for a tier of `capacity` bytes: a sixteenth of it, within
/// 64 KiB and 64 MiB, so the head segment (never compacted) is a small part of the directory.
fn segment_bytes(capacity: u64) -> u64 {
    (capacity / 16).clamp(64 << 10, 64 << 20)
}

struct Inner {
    /// The tier's directory.
    path: PathBuf,
    db: sled::Db,
    /// Where the envelopes are; `index` holds a [`Pointer`] to each.
    values: ValueLog,
    /// Set while a compaction of the value log runs.
    compacting: AtomicBool,
    index: Index,
    meta: sled::Tree,
    codec: Codec,
    capacity: u64,
    /// Set once a last hit could not be written (warned about once).
    hit_unwritable: AtomicBool,
    /// Entries the index holds.
    count: AtomicU64,
    /// Bytes they count for.
    bytes: AtomicU64,
    evicting: AtomicBool,
    /// Held shared by a put from its insert until what it adds alongside (the S3 outbox's
    /// reference to the copy) is in place, and exclusively by eviction: eviction never takes a
    /// copy whose reference is still on its way, which it would not know to hand to the outbox.
    evicting_excludes: RwLock<()>,
    evictions: AtomicU64,
    moved_aside: Option<PathBuf>,
    /// What was salvaged of the database moved aside.
    salvage: Option<Salvage>,
    /// The S3 outbox, whose references to copies here eviction must honour.
    outbox: OnceLock<sled::Tree>,
    /// Envelope bytes eviction has moved into the outbox since the S3 tier last measured it.
    outbox_growth: AtomicU64,
    /// Whether dropping the last handle saves the totals for the next open: set once they
    /// were counted (a handle that failed to open has nothing to save).
    totals_on_drop: AtomicBool,
}

/// What a [`DiskTier::sweep`] saw and removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Entries looked at.
    pub seen: u64,
    /// Entries removed.
    pub removed: u64,
    /// Bytes the removed entries held.
    pub bytes: u64,
}

/// The disk tier. Cheap to clone (clones share the database).
#[derive(Clone)]
pub struct DiskTier {
    inner: Arc<Inner>,
}

const STATS_KEY: &[u8] = b"stats/v1";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Seconds since the Unix epoch, as a record's last hit holds them (until 2106).
fn now_secs() -> u32 {
    u32::try_from(now_ms() / 1000).unwrap_or(u32::MAX)
}

fn id_of(key: &[u8]) -> Option<u128> {
    <[u8; 16]>::try_from(key).ok().map(u128::from_be_bytes)
}

impl DiskTier {
    /// Opens (or creates) the tier in `config.path`. A database that sled reports as corrupt is
    /// moved aside to `{path}.corrupt-{unix time in ms}` and a new one takes its place, with what can be read of the old one ([`DiskTier::salvage`]). A lock held
    /// by another handle is waited for, blocking the calling thread, for up to 2 s (a handle of
    /// this process that is closing releases it within that); past that, and for any other open
    /// error (permissions), the error is returned.
    ///
    /// The directory must be strata's: new or empty (it is then made strata's, readable by its
    /// owner only), marked by [`MARKER`], or a disk tier an older release wrote (sled's files
    /// only). Any other directory is refused untouched: `disk.path` pointing at a user's
    /// directory, or at `/`, must not write into it.
    pub fn open(config: &DiskConfig, codec: Codec) -> Result<Self, TierError> {
        claim_directory(&config.path)?;
        let inner = match open_inner(config, codec.clone()) {
            Ok(inner) => inner,
            Err(OpenFailure::Corrupt(reason)) => {
                only_a_database_in(&config.path)?;
                let aside = aside_path(&config.path);
                tracing::warn!(path = %config.path.display(), aside = %aside.display(), %reason,
                    "disk tier is corrupt; moving it aside and starting empty");
                std::fs::rename(&config.path, &aside).map_err(|source| TierError::Io {
                    context: format!("moving corrupt {} aside", config.path.display()),
                    source,
                })?;
                keep_latest_aside(&config.path, KEPT_ASIDE);
                claim_directory(&config.path)?;
                let salvage = match salvage::salvage(&aside, config) {
                    Ok(salvage) => {
                        tracing::warn!(
                            entries = salvage.entries,
                            uploads = salvage.uploads,
                            other = salvage.other,
                            cut_short = salvage.trees_cut_short,
                            "salvaged what could be read of the corrupt disk tier"
                        );
                        Some(salvage)
                    }
                    Err(reason) => {
                        tracing::warn!(%reason, "nothing could be salvaged of the corrupt disk tier");
                        None
                    }
                };
                let mut inner =
                    open_inner(config, codec).map_err(|f| TierError::Unavailable(f.to_string()))?;
                inner.moved_aside = Some(aside);
                inner.salvage = salvage;
                inner
            }
            Err(other) => return Err(TierError::Unavailable(other.to_string())),
        };
        owner_only(&config.path);
        Ok(DiskTier {
            inner: Arc::new(inner),
        })
    }

    /// The tier's directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Bytes the tier's directory occupies on disk (allocated blocks of its files), what sled
    /// writes beside the payload included: its log, segments not yet compacted, the access
    /// times and metadata. `capacity` bounds the payload ([`Tier::usage`]), not this.
    pub fn occupied_bytes(&self) -> std::io::Result<u64> {
        occupied(&self.inner.path)
    }

    /// Writes a small file of state kept beside the database (`epochs.json`, `node-id`):
    /// sled cannot open a database it finds corrupt at all, and these outlive it, moved aside
    /// with the rest, for the new database to take up ([`DiskTier::salvaged`]). Atomic (a
    /// temporary file renamed over the old one); best effort.
    pub fn keep_beside(&self, name: &str, bytes: &[u8]) {
        let path = self.inner.path.join(name);
        let temporary = self.inner.path.join(format!(".{name}.new"));
        let written =
            write_owner_only(&temporary, bytes).and_then(|()| std::fs::rename(&temporary, &path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot keep state beside the disk tier");
        }
    }

    /// A file [`DiskTier::keep_beside`] wrote in the database moved aside when this one was
    /// opened, if there was one.
    pub fn salvaged(&self, name: &str) -> Option<Vec<u8>> {
        let aside = self.inner.moved_aside.as_deref()?;
        std::fs::read(aside.join(name)).ok()
    }

    /// What was salvaged of a database moved aside as corrupt when this one was opened, if one
    /// was and sled could read any of it.
    pub fn salvage(&self) -> Option<Salvage> {
        self.inner.salvage
    }

    /// A file [`DiskTier::keep_beside`] wrote beside this database, if there is one.
    pub fn kept_beside(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.inner.path.join(name)).ok()
    }

    /// Whether the tier counts a copy under `key` (from its index: no envelope is read). An
    /// index that cannot be read says no.
    pub fn holds(&self, key: &CacheKey) -> bool {
        self.inner.index.get(key.id()).is_ok_and(|r| r.is_some())
    }

    /// Where a corrupt database was moved on open, if it was.
    pub fn moved_aside(&self) -> Option<&Path> {
        self.inner.moved_aside.as_deref()
    }

    /// Stores raw bytes under `key` as they are, bypassing the codec. For tools and fault tests
    /// (a corrupt copy must be detected on read).
    pub fn insert_raw(&self, key: &CacheKey, bytes: &[u8]) -> Result<(), TierError> {
        let _no_eviction = self
            .inner
            .evicting_excludes
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        self.inner.store(key.id(), bytes)
    }

    /// Stores an envelope already encoded by [`DiskTier::codec`] (and checked, when it came from
    /// elsewhere) under `key`, then evicts if the bound is passed.
    pub fn put_encoded(&self, key: &CacheKey, bytes: &[u8]) -> Result<(), TierError> {
        self.put_encoded_and(key, bytes, || ())
    }

    /// [`DiskTier::put_encoded`], running `also` once the copy is stored and before any
    /// eviction can take it: where the S3 outbox's reference to the copy is queued.
    pub fn put_encoded_and<T>(
        &self,
        key: &CacheKey,
        bytes: &[u8],
        also: impl FnOnce() -> T,
    ) -> Result<T, TierError> {
        let done = {
            let _no_eviction = self
                .inner
                .evicting_excludes
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            self.inner.store(key.id(), bytes)?;
            also()
        };
        self.schedule_eviction();
        self.schedule_compaction();
        Ok(done)
    }

    /// The codec entries are stored with.
    pub fn codec(&self) -> &Codec {
        &self.inner.codec
    }

    /// The database itself (analytics keep their rollups in trees of it).
    pub fn db(&self) -> sled::Db {
        self.inner.db.clone()
    }

    /// Opens another tree of the same database (the S3 tier keeps its index and outbox there,
    /// so they become durable with the entries they refer to).
    pub fn open_tree(&self, name: &str) -> Result<sled::Tree, TierError> {
        Ok(self.inner.db.open_tree(name)?)
    }

    /// The stored bytes (an envelope) under a digest, unchecked; `None` when there is none or
    /// it cannot be read back.
    pub fn raw(&self, digest: &[u8]) -> Result<Option<sled::IVec>, TierError> {
        let Some(id) = id_of(digest) else {
            return Ok(None);
        };
        Ok(match self.inner.load(id)? {
            Some((_, Ok(bytes))) => Some(sled::IVec::from(bytes)),
            Some((_, Err(e))) => {
                tracing::debug!(error = %e, "an envelope cannot be read back");
                None
            }
            None => None,
        })
    }

    /// Envelope bytes eviction has moved into the S3 outbox since the last
    /// [`DiskTier::reset_outbox_growth`].
    pub(crate) fn outbox_growth(&self) -> u64 {
        self.inner.outbox_growth.load(Relaxed)
    }

    pub(crate) fn reset_outbox_growth(&self) {
        self.inner.outbox_growth.store(0, Relaxed);
    }

    /// Has eviction move the envelope of a copy that `outbox` (the S3 tier's) refers to into
    /// `outbox` before evicting the copy. Set once; later calls are ignored.
    pub(crate) fn keep_for_upload(&self, outbox: sled::Tree) {
        let _ = self.inner.outbox.set(outbox);
    }

    /// Whether `other` is a handle on the same database.
    pub fn same_as(&self, other: &DiskTier) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// A fresh, unique number from the database.
    pub fn generate_id(&self) -> Result<u64, TierError> {
        Ok(self.inner.db.generate_id()?)
    }

    /// Walks every stored entry in key order, decoding each, and removes those `remove` says
    /// to (undecodable copies are passed as errors; removing them is up to `remove` too),
    /// unless a put has replaced the copy since it was read.
    /// Blocking: call it from the blocking pool or a command. `remove` also gets the bytes
    /// the copy holds on disk and the second of its last disk-tier hit (since the Unix epoch;
    /// 0 for never, and for a copy that cannot be read).
    pub fn sweep(
        &self,
        mut remove: impl FnMut(u128, Result<Entry, strata_core::CodecError>, u64, u32) -> bool,
    ) -> Result<Swept, TierError> {
        let mut swept = Swept::default();
        for item in self.inner.index.iter() {
            let (id, record) = item?;
            let bytes = record.bytes();
            swept.seen += 1;
            let (decoded, last_hit) = match self.inner.read_hit(id, &record.pointer) {
                Ok((envelope, last_hit)) => (self.inner.codec.decode_local(&envelope), last_hit),
                Err(e) => (Err(e), 0),
            };
            // Only the copy judged goes: one a put has replaced since it was read stays.
            if remove(id, decoded, bytes, last_hit) && self.inner.remove_exact(id, &record)? {
                swept.removed += 1;
                swept.bytes += bytes;
            }
        }
        if swept.removed > 0 {
            self.inner.compact_if_worth_it();
        }
        Ok(swept)
    }

    /// Rewrites stored envelopes: for each, `rewrite` says what to store instead (`None`:
    /// keep it). A copy a put replaced meanwhile is left alone. Returns (seen, rewritten).
    /// Blocking, like [`DiskTier::sweep`].
    pub fn rewrite(
        &self,
        mut rewrite: impl FnMut(u128, &[u8]) -> Option<Vec<u8>>,
    ) -> Result<(u64, u64), TierError> {
        let (mut seen, mut rewritten) = (0, 0);
        for item in self.inner.index.iter() {
            let (id, record) = item?;
            seen += 1;
            // A copy that cannot be read back is left for the lookup that finds it.
            let Ok(envelope) = self.inner.read(id, &record.pointer) else {
                continue;
            };
            let Some(new) = rewrite(id, &envelope) else {
                continue;
            };
            let _no_eviction_midway = self
                .inner
                .evicting_excludes
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            let pointer = self.inner.append(id, &new)?;
            if self.inner.repoint(id, &record.pointer, pointer)? {
                let grew = i64::from(pointer.len) - i64::from(record.pointer.len);
                if grew >= 0 {
                    self.inner.bytes.fetch_add(grew.unsigned_abs(), Relaxed);
                } else {
                    self.inner.bytes.fetch_sub(grew.unsigned_abs(), Relaxed);
                }
                rewritten += 1;
            }
        }
        Ok((seen, rewritten))
    }

    /// A page of stored entries in digest order, after the digest `after` (from the start
    /// when `None`): at most `limit` of those `keep` accepts, reading at most `budget` copies
    /// (copies that no longer decode are skipped). Returns them and, when the walk stopped
    /// before the end, the digest to continue after. Blocking, like [`DiskTier::sweep`].
    pub fn page(
        &self,
        after: Option<u128>,
        limit: usize,
        budget: usize,
        mut keep: impl FnMut(&Entry) -> bool,
    ) -> Result<(Vec<Entry>, Option<u128>), TierError> {
        let mut found = Vec::new();
        let (mut read, mut last) = (0, after);
        for item in self.inner.index.iter_after(after) {
            let (id, record) = item?;
            if found.len() >= limit.max(1) || read >= budget.max(1) {
                // One more is there: the caller continues after the last one read.
                return Ok((found, last));
            }
            read += 1;
            last = Some(id);
            if let Ok(envelope) = self.inner.read(id, &record.pointer)
                && let Ok(entry) = self.inner.codec.decode_local(&envelope)
                && keep(&entry)
            {
                found.push(entry);
            }
        }
        Ok((found, None))
    }

    /// Removes the entry stored under a digest, if any. Returns whether one was there.
    pub fn remove_id(&self, id: u128) -> Result<bool, TierError> {
        self.inner.forget(id)
    }

    /// Removes the copy under `key` if it is still `judged` (the same answer, made at the same
    /// time), as a lookup that refused it does: a copy a put has written since stays. A copy
    /// that no longer decodes goes too. Returns whether a copy went.
    pub fn remove_judged(&self, key: &CacheKey, judged: &Entry) -> Result<bool, TierError> {
        let _no_put_midway = self
            .inner
            .evicting_excludes
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let id = key.id();
        let Some(current) = self.inner.index.get(id)? else {
            return Ok(false);
        };
        let decoded = self
            .inner
            .read(id, &current.pointer)
            .and_then(|envelope| self.inner.codec.decode_local(&envelope));
        let same = match decoded {
            Ok(stored) => {
                stored.created_at == judged.created_at
                    && stored.response.get() == judged.response.get()
            }
            Err(_) => true,
        };
        if same {
            self.inner.remove_exact_locked(id, &current)
        } else {
            Ok(false)
        }
    }

    /// Removes every entry, and every upload to S3 queued from this disk. Returns how many
    /// entries there were. Blocks for as long as sled takes to remove them: call it off the
    /// async workers.
    pub fn clear(&self) -> Result<u64, TierError> {
        // Under the eviction lock, as every removal: a put lands wholly before the clear (and
        // goes with it) or wholly after it (and stays, with its queued upload and its place in
        // the byte count).
        let _no_put_midway = self
            .inner
            .evicting_excludes
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let n = self.inner.count.load(Relaxed);
        self.inner.index.clear()?;
        if let Some(outbox) = self.inner.outbox.get() {
            outbox.clear()?;
        }
        // No pointer refers to a segment now, and no append is under way (they hold the lock
        // this holds): every segment goes. After a crash before sled's log holds the clear, the
        // pointers it brings back find their segments gone: misses, never old answers.
        self.inner
            .values
            .remove_all()
            .map_err(|source| TierError::Io {
                context: "deleting the value log".into(),
                source,
            })?;
        self.inner.count.store(0, Relaxed);
        self.inner.bytes.store(0, Relaxed);
        Ok(n)
    }

    /// Entries evicted for space since open.
    pub fn evictions(&self) -> u64 {
        self.inner.evictions.load(Relaxed)
    }

    /// The lifetime statistics stored by the last [`DiskTier::save_stats`]: from the database,
    /// or, in a new one that replaced a database moved aside, from the copy kept beside that one.
    pub fn load_stats(&self) -> Stats {
        let stored = match self.inner.meta.get(STATS_KEY) {
            Ok(Some(bytes)) => Some(bytes.to_vec()),
            _ => self.salvaged(STATS_BESIDE),
        };
        stored
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Stores lifetime statistics, read back by [`DiskTier::load_stats`] after a restart.
    pub fn save_stats(&self, stats: &Stats) -> Result<(), TierError> {
        let bytes = serde_json::to_vec(stats).map_err(|e| TierError::Storage(e.to_string()))?;
        self.inner.meta.insert(STATS_KEY, &*bytes)?;
        self.keep_beside(STATS_BESIDE, &bytes);
        Ok(())
    }

    /// Syncs the value log, then sled's log, blocking the calling thread.
    pub fn flush_blocking(&self) -> Result<(), TierError> {
        // The envelopes before the pointers to them.
        self.inner.values.sync().map_err(|source| TierError::Io {
            context: "syncing the value log".into(),
            source,
        })?;
        self.inner.db.flush()?;
        Ok(())
    }

    fn schedule_eviction(&self) {
        let inner = &self.inner;
        if inner.bytes.load(Relaxed) <= inner.capacity || inner.evicting.swap(true, Relaxed) {
            return;
        }
        /// Holds the flag for one pass and clears it when the pass ends, and also when it never
        /// runs (a runtime shutting down drops blocking tasks it has not started): eviction is
        /// never left switched off.
        struct Pass {
            inner: Arc<Inner>,
            holds_flag: bool,
        }
        impl Drop for Pass {
            fn drop(&mut self) {
                if self.holds_flag {
                    self.inner.evicting.store(false, Relaxed);
                }
            }
        }
        let pass = Pass {
            inner: Arc::clone(inner),
            holds_flag: true,
        };
        let evict = move || {
            let mut pass = pass;
            loop {
                let evicted = match pass.inner.evict() {
                    Ok(evicted) => evicted,
                    Err(e) => {
                        tracing::warn!(error = %e, "disk tier eviction failed");
                        return;
                    }
                };
                pass.inner.evicting.store(false, Relaxed);
                pass.holds_flag = false;
                // A pass that found nothing to evict would find nothing again: the next put
                // starts another.
                if evicted == 0 {
                    break;
                }
                // Puts that found this pass running left their bytes to it: look again, unless
                // the tier is within its bound or another pass has started.
                let inner = &pass.inner;
                if inner.bytes.load(Relaxed) <= inner.capacity || inner.evicting.swap(true, Relaxed)
                {
                    break;
                }
                pass.holds_flag = true;
            }
            // What eviction removed is dead in the value log.
            pass.inner.compact_if_worth_it();
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(evict);
            }
            Err(_) => evict(),
        }
    }
}

impl DiskTier {
    /// Starts a compaction of the value log on the blocking pool (or runs it here outside a
    /// runtime) when dead records take enough of it ([`Inner::wants_compaction`]).
    /// At most one is running or scheduled at a time: a put that finds one under way starts
    /// none (a task per put while a compaction ran filled the blocking pool with threads, each
    /// with an allocator arena of its own: 200 MiB more at a million puts past the bound).
    fn schedule_compaction(&self) {
        if !self.inner.wants_compaction() || self.inner.compacting.swap(true, Relaxed) {
            return;
        }
        /// Clears the flag when the compaction ends, and also when it never runs (a runtime
        /// shutting down drops blocking tasks it has not started).
        struct Running(Arc<Inner>);
        impl Drop for Running {
            fn drop(&mut self) {
                self.0.compacting.store(false, Relaxed);
            }
        }
        let running = Running(Arc::clone(&self.inner));
        let compact = move || {
            let running = running;
            if let Err(e) = running.0.compact() {
                tracing::warn!(error = %e, "value log compaction failed");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(compact);
            }
            Err(_) => compact(),
        }
    }

    /// Compacts the value log now, if dead records take enough of it, blocking. Returns the
    /// records moved. For tests and tools; puts, eviction and sweeps start compactions
    /// themselves.
    pub fn compact(&self) -> Result<u64, TierError> {
        self.inner.compact()
    }

    /// Bytes of the value log's segment files together.
    pub fn value_log_bytes(&self) -> u64 {
        self.inner.values.total()
    }
}

enum OpenFailure {
    Corrupt(String),
    /// Another handle holds the database's lock: another process, or a handle of this one
    /// that is still closing (sled writes its last buffers from background threads after the
    /// `Db` is dropped, and holds the lock until they finish).
    Locked(String),
    Other(String),
}

/// How long opening waits for a lock held by a handle that is still closing.
const LOCK_WAIT: Duration = Duration::from_secs(2);

impl std::fmt::Display for OpenFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenFailure::Corrupt(s) => write!(f, "corrupt: {s}"),
            OpenFailure::Locked(s) | OpenFailure::Other(s) => f.write_str(s),
        }
    }
}

/// [`open_sled`], waiting up to [`LOCK_WAIT`] for a lock a closing handle still holds: reopening
/// a directory right after dropping the cache that used it is then not an error.
fn open_sled_waiting(config: &DiskConfig) -> Result<sled::Db, OpenFailure> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match open_sled(config) {
            Err(OpenFailure::Locked(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// The smallest page cache sled is given: with a few hundred bytes it panics while opening.
pub const MIN_PAGE_CACHE: u64 = 1 << 20;

fn open_sled(config: &DiskConfig) -> Result<sled::Db, OpenFailure> {
    let sled_config = sled::Config::new()
        .path(&config.path)
        .cache_capacity(config.cache_capacity.max(MIN_PAGE_CACHE))
        .flush_every_ms(Some(config.flush_every_ms.max(1)));
    // sled 0.34 can panic on some damaged files instead of returning an error.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || sled_config.open())) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(classify(config, e)),
        Err(_) => Err(OpenFailure::Corrupt("sled panicked while opening".into())),
    }
}

/// The tree the S3 tier keeps its outbox in.
pub(crate) const OUTBOX_TREE: &str = "l3-outbox";

/// Opens the database, then its trees, and reads the sizes and last uses eviction needs: the
/// first full read of the entries, where damage that sled's recovery let through shows up.
/// Failures at any of these steps are classified alike.
fn open_inner(config: &DiskConfig, codec: Codec) -> Result<Inner, OpenFailure> {
    let db = open_sled_waiting(config)?;
    let values = ValueLog::open(&config.path, db.clone(), segment_bytes(config.capacity))
        .map_err(|e| OpenFailure::Other(format!("opening the value log: {e}")))?;
    let load = move || -> Result<Inner, sled::Error> {
        let inner = Inner {
            values,
            compacting: AtomicBool::new(false),
            index: Index::open(&db)?,
            meta: db.open_tree("meta")?,
            path: config.path.clone(),
            db: db.clone(),
            codec,
            capacity: config.capacity,
            hit_unwritable: AtomicBool::new(false),
            count: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            evicting: AtomicBool::new(false),
            evicting_excludes: RwLock::new(()),
            evictions: AtomicU64::new(0),
            moved_aside: None,
            salvage: None,
            outbox: OnceLock::new(),
            outbox_growth: AtomicU64::new(0),
            totals_on_drop: AtomicBool::new(false),
        };
        // Uploads queued by an earlier run with S3 refer to copies here: eviction keeps them
        // for the outbox even while this run has S3 off.
        if db
            .tree_names()
            .iter()
            .any(|name| name == OUTBOX_TREE.as_bytes())
        {
            let _ = inner.outbox.set(db.open_tree(OUTBOX_TREE)?);
        }
        inner.take_up_older_index()?;
        inner.load_totals()?;
        inner.totals_on_drop.store(true, Relaxed);
        Ok(inner)
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)) {
        Ok(Ok(inner)) => Ok(inner),
        Ok(Err(e)) => Err(classify(config, e)),
        Err(_) => Err(OpenFailure::Corrupt(
            "sled panicked while reading the entries".into(),
        )),
    }
}

/// What an error of sled's while opening means for the directory.
fn classify(config: &DiskConfig, error: sled::Error) -> OpenFailure {
    match error {
        sled::Error::Corruption { at, .. } => {
            OpenFailure::Corrupt(format!("sled reports corruption at {at:?}"))
        }
        e @ (sled::Error::ReportableBug(_) | sled::Error::Unsupported(_)) => {
            OpenFailure::Corrupt(e.to_string())
        }
        // A value's file under `blobs/` is gone.
        sled::Error::Io(e) if e.kind() == std::io::ErrorKind::NotFound => {
            OpenFailure::Corrupt(format!("a file of the database is missing ({e})"))
        }
        // sled's own text ends in the Debug form of the OS error: it adds nothing here.
        sled::Error::Io(e) if e.to_string().contains("could not acquire lock") => {
            OpenFailure::Locked(format!(
                "cannot open disk tier at {}: another strata process or cache is using it",
                config.path.display()
            ))
        }
        e => OpenFailure::Other(format!(
            "cannot open disk tier at {}: {e}",
            config.path.display()
        )),
    }
}

/// Refuses to move `path` aside unless it holds only what sled writes (`conf`, `db`, `blobs/`,
/// `snap.*`): a disk path pointed at a directory of other files by mistake is left alone.
/// The file that marks a directory as a strata disk tier.
pub const MARKER: &str = "STRATA-DISK-TIER";

/// The files of state kept beside the database ([`DiskTier::keep_beside`]).
pub const KEPT_BESIDE: [&str; 6] = [
    "epochs.json",
    "node-id",
    STATS_BESIDE,
    ".epochs.json.new",
    ".node-id.new",
    ".stats.json.new",
];

/// The lifetime statistics, kept beside the database as well as in it.
const STATS_BESIDE: &str = "stats.json";

/// Makes sure `path` is a directory strata may write: creates it (owner only) when missing,
/// marks it when empty or when it holds a disk tier an older release wrote (`conf` and `db`,
/// sled's files only), and refuses anything else.
fn claim_directory(path: &Path) -> Result<(), TierError> {
    let io = |context: String| move |source| TierError::Io { context, source };
    let entries = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder
                .create(path)
                .map_err(io(format!("creating {}", path.display())))?;
            return mark(path);
        }
        Err(e) => {
            return Err(TierError::Unavailable(format!(
                "{} cannot be the disk tier's directory: {e}",
                path.display()
            )));
        }
    };
    let mut names = Vec::new();
    for item in entries {
        let name = item
            .map_err(io(format!("reading {}", path.display())))?
            .file_name();
        names.push(name.to_string_lossy().into_owned());
    }
    if names.iter().any(|n| n == MARKER) {
        return Ok(());
    }
    let sleds = |n: &String| {
        matches!(
            n.as_str(),
            "conf" | "db" | "blobs" | vlog::DIR | OLD_SNAPSHOT_FILE | OLD_SNAPSHOT_TEMPORARY
        ) || n.starts_with("snap.")
            || KEPT_BESIDE.contains(&n.as_str())
    };
    let older_tier = names.iter().any(|n| n == "conf")
        && names.iter().any(|n| n == "db")
        && names.iter().all(sleds);
    if names.is_empty() || older_tier {
        return mark(path);
    }
    let stranger = names.iter().find(|n| !sleds(n)).unwrap_or(&names[0]);
    Err(TierError::Unavailable(format!(
        "{} is not a strata disk tier (it holds `{stranger}`, which strata did not write): \
         point disk.path at a new or empty directory",
        path.display()
    )))
}

fn mark(path: &Path) -> Result<(), TierError> {
    let marker = path.join(MARKER);
    std::fs::write(
        &marker,
        "This directory is a strata disk tier (sled). strata writes here; nothing else should.\n",
    )
    .map_err(|source| TierError::Io {
        context: format!("writing {}", marker.display()),
        source,
    })
}

/// Makes the tier's directory and files readable by their owner only: cached answers are the
/// prompts and responses of whoever used the cache. Best effort (a failure is logged).
fn owner_only(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let set = |p: &Path, mode: u32| {
            if let Err(e) = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)) {
                tracing::debug!(path = %p.display(), error = %e, "cannot restrict permissions");
            }
        };
        set(path, 0o700);
        if let Ok(entries) = std::fs::read_dir(path) {
            for item in entries.flatten() {
                let kind = item.file_type();
                let mode = if kind.is_ok_and(|k| k.is_dir()) {
                    0o700
                } else {
                    0o600
                };
                set(&item.path(), mode);
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Copies the files and directories of `from` whose names `keep` accepts (and everything under
/// such a directory) into a new directory `to`, readable by its owner only.
fn copy_files(from: &Path, to: &Path, keep: &dyn Fn(&str) -> bool) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(to)?;
    for item in std::fs::read_dir(from)? {
        let item = item?;
        let name = item.file_name();
        if !keep(&name.to_string_lossy()) {
            continue;
        }
        if item.file_type()?.is_dir() {
            copy_files(&item.path(), &to.join(&name), &|_| true)?;
        } else {
            std::fs::copy(item.path(), to.join(&name))?;
        }
    }
    Ok(())
}

/// Writes `bytes` to a new file at `path` that only its owner can read (created so: it never
/// exists with wider permissions, not even for a moment).
fn write_owner_only(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(bytes)
}

fn only_a_database_in(path: &Path) -> Result<(), TierError> {
    let io = |source| TierError::Io {
        context: format!("reading {}", path.display()),
        source,
    };
    for item in std::fs::read_dir(path).map_err(io)? {
        let name = item.map_err(io)?.file_name();
        let name = name.to_string_lossy();
        if !matches!(
            name.as_ref(),
            "conf"
                | "db"
                | "blobs"
                | vlog::DIR
                | MARKER
                | OLD_SNAPSHOT_FILE
                | OLD_SNAPSHOT_TEMPORARY
        ) && !name.starts_with("snap.")
            && !KEPT_BESIDE.contains(&name.as_ref())
        {
            return Err(TierError::Unavailable(format!(
                "{} cannot be opened as a disk tier and holds `{name}`, which sled did not \
                 write: leaving it as it is (point disk.path at a directory of its own)",
                path.display()
            )));
        }
    }
    Ok(())
}

/// How many directories moved aside are kept (the newest).
const KEPT_ASIDE: usize = 3;

/// Deletes all but the `keep` newest directories moved aside from `path` (`{path}.corrupt-{t}`).
fn keep_latest_aside(path: &Path, keep: usize) {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let prefix = format!("{}.corrupt-", name.to_string_lossy());
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let Ok(items) = std::fs::read_dir(parent) else {
        return;
    };
    let mut aside: Vec<(u64, PathBuf)> = items
        .flatten()
        .filter_map(|item| {
            let file = item.file_name();
            let time = file.to_string_lossy().strip_prefix(&prefix)?.parse().ok()?;
            Some((time, item.path()))
        })
        .collect();
    aside.sort();
    let excess = aside.len().saturating_sub(keep);
    for (_, old) in aside.into_iter().take(excess) {
        tracing::info!(path = %old.display(), "removing an old directory moved aside");
        if let Err(e) = std::fs::remove_dir_all(&old) {
            tracing::warn!(path = %old.display(), error = %e, "cannot remove an old directory moved aside");
        }
    }
}

/// A new name to move `path` aside to: `{path}.corrupt-{unix time in ms}`, a later one if that
/// is taken.
fn aside_path(path: &Path) -> PathBuf {
    let mut time = now_ms();
    loop {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".corrupt-{time}"));
        let aside = PathBuf::from(name);
        if !aside.exists() {
            return aside;
        }
        time += 1;
    }
}

impl Drop for Inner {
    /// The last handle is gone: nothing can change the index any more. The last uses held in
    /// memory are written, and the totals saved for the next open.
    fn drop(&mut self) {
        if !self.totals_on_drop.load(Relaxed) {
            return;
        }
        if let Err(e) = self.save_totals() {
            tracing::warn!(error = %e, "cannot save the disk tier's totals; the next open counts the index");
        }
    }
}

impl Inner {
    /// Moves the records of an earlier release's trees into the index: `entries` (an id's
    /// pointer, or its envelope inline before the value log) and `access` (its last use first).
    /// Streamed in id order, a bucket at a time; an envelope stored inline is appended to the
    /// value log. The old trees are dropped once the index and the value log are on disk: a
    /// crash before that takes them up again, and records already moved are replaced by the
    /// same.
    fn take_up_older_index(&self) -> Result<(), sled::Error> {
        let names = self.db.tree_names();
        let has = |name: &str| names.iter().any(|n| n == name.as_bytes());
        if !has("entries") && !has("access") {
            return Ok(());
        }
        let entries = self.db.open_tree("entries")?;
        let access = self.db.open_tree("access")?;
        let now = now_ms();
        let mut bucket: Vec<(u128, Record)> = Vec::new();
        let mut moved = 0u64;
        for item in entries.iter() {
            let (key, stored) = item?;
            let Some(id) = id_of(&key) else { continue };
            let pointer = match Pointer::decode(&stored) {
                Some(pointer) => pointer,
                None => self.values.append(id, &stored).map_err(sled::Error::Io)?,
            };
            let last_used_ms = access.get(&key)?.map_or(now, |r| last_use_of(&r));
            if bucket
                .first()
                .is_some_and(|(first, _)| !index::same_bucket(*first, id))
            {
                self.index.put_all(&bucket)?;
                bucket.clear();
            }
            bucket.push((
                id,
                Record {
                    pointer,
                    last_used_ms,
                },
            ));
            moved += 1;
        }
        self.index.put_all(&bucket)?;
        self.values.sync().map_err(sled::Error::Io)?;
        self.db.flush()?;
        self.db.drop_tree("entries")?;
        self.db.drop_tree("access")?;
        self.db.flush()?;
        tracing::info!(
            entries = moved,
            "disk tier: the entries of an earlier release moved into the bucketed index"
        );
        Ok(())
    }

    /// Sets the entry count and bytes: from the totals the last handle saved when it closed,
    /// taken out of `meta` durably before anything else writes; without them (a crash, an
    /// earlier release), by counting the index by cursor.
    fn load_totals(&self) -> Result<(), sled::Error> {
        for file in [OLD_SNAPSHOT_FILE, OLD_SNAPSHOT_TEMPORARY] {
            let _ = std::fs::remove_file(self.path.join(file));
        }
        for key in OLD_META_KEYS {
            self.meta.remove(key)?;
        }
        let saved = self.meta.remove(TOTALS_KEY)?;
        let saved = saved.as_deref().and_then(|v| {
            let count = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
            let bytes = u64::from_le_bytes(v.get(8..16)?.try_into().ok()?);
            (v.len() == 16).then_some((count, bytes))
        });
        let (count, bytes) = match saved {
            Some(totals) => {
                self.db.flush()?;
                totals
            }
            None => {
                let (mut count, mut bytes) = (0u64, 0u64);
                for item in self.index.iter() {
                    let (_, record) = item?;
                    count += 1;
                    bytes += record.bytes();
                }
                (count, bytes)
            }
        };
        self.count.store(count, Relaxed);
        self.bytes.store(bytes, Relaxed);
        Ok(())
    }

    /// Writes the totals, as the last write of the last handle, for the next open to take up.
    fn save_totals(&self) -> Result<(), TierError> {
        let mut totals = [0u8; 16];
        totals[..8].copy_from_slice(&self.count.load(Relaxed).to_le_bytes());
        totals[8..].copy_from_slice(&self.bytes.load(Relaxed).to_le_bytes());
        self.meta.insert(TOTALS_KEY, &totals)?;
        self.db.flush()?;
        Ok(())
    }

    /// The envelope `pointer` points to, for `id`.
    fn read(&self, id: u128, pointer: &Pointer) -> Result<Vec<u8>, strata_core::CodecError> {
        self.read_hit(id, pointer).map(|(envelope, _)| envelope)
    }

    /// [`Inner::read`], with the record's last hit (seconds, 0 for never).
    fn read_hit(
        &self,
        id: u128,
        pointer: &Pointer,
    ) -> Result<(Vec<u8>, u32), strata_core::CodecError> {
        self.values
            .read_hit(id, pointer)
            .map_err(|e| strata_core::CodecError::Unreadable(e.to_string()))
    }

    /// The record of `id` and the envelope it points to. A read that fails because a
    /// compaction moved the record (and deleted its segment) meanwhile is retried at the new
    /// place; one that fails with the pointer unchanged is the copy's damage.
    #[allow(clippy::type_complexity)]
    fn load(
        &self,
        id: u128,
    ) -> Result<Option<(Record, Result<Vec<u8>, strata_core::CodecError>)>, TierError> {
        Ok(self
            .load_hit(id)?
            .map(|(record, read)| (record, read.map(|(envelope, _)| envelope))))
    }

    /// [`Inner::load`], with the record's last hit (seconds, 0 for never).
    #[allow(clippy::type_complexity)]
    fn load_hit(
        &self,
        id: u128,
    ) -> Result<Option<(Record, Result<(Vec<u8>, u32), strata_core::CodecError>)>, TierError> {
        let mut record = self.index.get(id)?;
        for _ in 0..4 {
            let Some(current) = record else {
                return Ok(None);
            };
            match self.read_hit(id, &current.pointer) {
                Ok(read) => return Ok(Some((current, Ok(read)))),
                Err(e) => {
                    let now = self.index.get(id)?;
                    if now.map(|r| r.pointer) == Some(current.pointer) {
                        return Ok(Some((current, Err(e))));
                    }
                    record = now;
                }
            }
        }
        Ok(record.map(|current| {
            let read = self.read_hit(id, &current.pointer);
            (current, read)
        }))
    }

    /// Appends an envelope to the value log.
    fn append(&self, id: u128, envelope: &[u8]) -> Result<Pointer, TierError> {
        self.values
            .append(id, envelope)
            .map_err(|source| TierError::Io {
                context: "appending to the value log".into(),
                source,
            })
    }

    fn store(&self, id: u128, bytes: &[u8]) -> Result<(), TierError> {
        let pointer = self.append(id, bytes)?;
        let record = Record {
            pointer,
            last_used_ms: now_ms(),
        };
        let (old, _) = self.index.update(id, |_| Some(record))?;
        self.bytes.fetch_add(record.bytes(), Relaxed);
        match old {
            Some(old) => {
                self.bytes.fetch_sub(old.bytes(), Relaxed);
            }
            None => {
                self.count.fetch_add(1, Relaxed);
            }
        }
        Ok(())
    }

    /// Points `id` at `new` if it still points at `old` (a put may have replaced it), keeping
    /// its last use. Returns whether it did.
    fn repoint(&self, id: u128, old: &Pointer, new: Pointer) -> Result<bool, TierError> {
        let (_, now) = self.index.update(id, |record| match record {
            Some(record) if record.pointer == *old => Some(Record {
                pointer: new,
                ..record
            }),
            other => other,
        })?;
        Ok(now.is_some_and(|r| r.pointer == new))
    }

    /// Notes a hit on the copy `record` points to, whose header said it was last hit at
    /// `last_hit` (seconds): when that is an earlier second, the current one is written in
    /// place in the record's header ([`ValueLog::mark_hit`]). Nothing is written to sled: the
    /// index keeps the last use eviction last wrote, and eviction reads the header of a copy it
    /// is about to take. A write that fails loses a last use, never a lookup (warned once).
    fn touch(&self, record: &Record, last_hit: u32) {
        let now = now_secs();
        if last_hit >= now {
            return;
        }
        if let Err(e) = self.values.mark_hit(&record.pointer, now)
            && !self.hit_unwritable.swap(true, Relaxed)
        {
            tracing::warn!(error = %e, "cannot write a last hit to the disk tier's value log; eviction will see older uses");
        }
    }

    /// Removes whatever copy is stored under `id`. Holds `evicting_excludes` for writing, like
    /// [`Inner::remove_exact`]. Returns whether there was one.
    fn forget(&self, id: u128) -> Result<bool, TierError> {
        let _no_put_midway = self
            .evicting_excludes
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let (old, _) = self.index.update(id, |_| None)?;
        if let Some(old) = &old {
            self.uncount(old);
        }
        Ok(old.is_some())
    }

    /// Removes least recently used entries until the tier holds at most 90% of its bound.
    /// Returns how many went. Nothing per entry is held: three walks of the index by cursor
    /// find the range of last uses, then the bytes in each of [`AGE_BINS`] spans of it, then
    /// evict the oldest spans' entries (least recently used to within a span's width).
    fn evict(&self) -> Result<u64, TierError> {
        const AGE_BINS: usize = 4096;
        let target = self.capacity / 10 * 9;
        let total = self.bytes.load(Relaxed);
        if total <= self.capacity {
            return Ok(0);
        }
        let to_free = total.saturating_sub(target);
        let (mut oldest, mut newest) = (u64::MAX, 0);
        for item in self.index.iter() {
            let (_, record) = item?;
            oldest = oldest.min(record.last_used_ms);
            newest = newest.max(record.last_used_ms);
        }
        if oldest > newest {
            return Ok(0);
        }
        let span = u128::from(newest - oldest) + 1;
        let bin = |ms: u64| {
            let at = u128::from(ms.saturating_sub(oldest)) * AGE_BINS as u128 / span;
            usize::try_from(at).map_or(AGE_BINS - 1, |at| at.min(AGE_BINS - 1))
        };
        let mut by_bin = vec![0u64; AGE_BINS];
        for item in self.index.iter() {
            let (_, record) = item?;
            if let Some(bytes) = by_bin.get_mut(bin(record.last_used_ms)) {
                *bytes += record.bytes();
            }
        }
        // Every entry of the bins before `cut` goes, and of bin `cut` enough to free the rest.
        let (mut cut, mut older) = (0, 0u64);
        while let Some(&bytes) = by_bin.get(cut) {
            if older + bytes >= to_free {
                break;
            }
            older += bytes;
            cut += 1;
        }
        let from_cut = to_free.saturating_sub(older);
        let (mut freed_at_cut, mut evicted) = (0u64, 0);
        for item in self.index.iter() {
            let (id, record) = item?;
            let at = bin(record.last_used_ms);
            if at > cut || (at == cut && freed_at_cut >= from_cut) {
                continue;
            }
            if self.evict_one(id, record.last_used_ms)? {
                self.evictions.fetch_add(1, Relaxed);
                evicted += 1;
                if at == cut {
                    freed_at_cut += record.bytes();
                }
            }
        }
        Ok(evicted)
    }

    /// Evicts one copy, judged least recently used when it was last used at `judged_ms` (by
    /// the index); first, if the S3 outbox refers to it, hands the envelope to the outbox. A
    /// copy rewritten since it was judged (a pass takes a while) stays, and so does one whose
    /// record says it was hit since: its last hit is then written to the index, where the next
    /// pass judges it. Returns whether the copy went.
    fn evict_one(&self, id: u128, judged_ms: u64) -> Result<bool, TierError> {
        let _no_put_midway = self
            .evicting_excludes
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(current) = self.index.get(id)? else {
            return Ok(false);
        };
        if current.last_used_ms > judged_ms {
            return Ok(false);
        }
        // A header that cannot be read leaves the copy judged by the index (the lookup that
        // reaches it finds the damage).
        if let Ok(last_hit) = self.values.last_hit(id, &current.pointer)
            && last_hit != 0
        {
            // Within its second, the hit may have come after the judged use: it is spared.
            // A hit later than now (a forged or skewed clock's) counts as now.
            let hit_ms = (u64::from(last_hit) * 1000 + 999).min(now_ms().max(judged_ms + 1));
            if hit_ms > judged_ms {
                self.index.set_last_uses(&mut [(id, hit_ms)])?;
                return Ok(false);
            }
        }
        let key = id.to_be_bytes();
        if let Some(outbox) = self.outbox.get() {
            // Re-read after a failed swap: a newer reference replaced the one read.
            for _ in 0..8 {
                match outbox.get(key)? {
                    Some(queued) if crate::s3::outbox::is_reference(&queued) => {
                        // The envelope keeps the reference's number: its place in the queue's
                        // age order.
                        let seq = crate::s3::outbox::parse(&queued).seq();
                        // A copy that cannot be read back has nothing to hand over.
                        let Ok(envelope) = self.read(id, &current.pointer) else {
                            break;
                        };
                        let held = crate::s3::outbox::held(seq, &envelope);
                        if outbox
                            .compare_and_swap(key, Some(&queued), Some(held))?
                            .is_ok()
                        {
                            self.outbox_growth.fetch_add(envelope.len() as u64, Relaxed);
                            break;
                        }
                    }
                    _ => break,
                }
            }
        }
        self.remove_exact_locked(id, &current)
    }

    /// Removes the copy under `id` if it still is `current` (the same pointer), with its place
    /// in the counts; a copy a put has written since `current` was read stays. Returns whether
    /// the copy went.
    fn remove_exact(&self, id: u128, current: &Record) -> Result<bool, TierError> {
        let _no_put_midway = self
            .evicting_excludes
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.remove_exact_locked(id, current)
    }

    /// Whether dead records (removed, evicted or replaced entries) take enough of the value
    /// log to compact it: its files hold more than 1.25× the live envelopes, plus two
    /// segments (the head, never compacted, and the one being filled by a compaction).
    fn wants_compaction(&self) -> bool {
        let total = self.values.total();
        let live = self.bytes.load(Relaxed);
        total > live + live / 4 + 2 * self.values.segment_bytes()
    }

    /// [`Inner::compact`] unless one is running or there is too little dead to bother;
    /// failures are logged (a compaction that failed leaves every record where it was).
    fn compact_if_worth_it(&self) {
        if !self.wants_compaction() || self.compacting.swap(true, Relaxed) {
            return;
        }
        if let Err(e) = self.compact() {
            tracing::warn!(error = %e, "value log compaction failed");
        }
        self.compacting.store(false, Relaxed);
    }

    /// Compacts the sealed segments with the least live data first, until dead records no
    /// longer take enough of the log ([`Inner::wants_compaction`]). Returns the records moved.
    /// What each segment holds live is counted by a walk of the index.
    fn compact(&self) -> Result<u64, TierError> {
        let mut live: HashMap<u64, u64> = HashMap::new();
        for item in self.index.iter() {
            let (_, record) = item?;
            *live.entry(record.pointer.segment).or_default() +=
                u64::from(record.pointer.len) + vlog::HEADER;
        }
        let mut segments: Vec<(u128, u64)> = self
            .values
            .sealed()
            .into_iter()
            .map(|(segment, len)| {
                let held = live.get(&segment).copied().unwrap_or(0);
                (u128::from(held) * 1000 / u128::from(len.max(1)), segment)
            })
            .collect();
        drop(live);
        segments.sort_unstable();
        let mut moved = 0;
        for (_, segment) in segments {
            if !self.wants_compaction() {
                break;
            }
            moved += self.compact_segment(segment)?;
        }
        Ok(moved)
    }

    /// Moves the records of `segment` that a pointer still refers to into the head, then,
    /// once the new places are on disk and sled's log holds the pointers to them, deletes the
    /// segment. Which records are live is read from the index. A segment whose records cannot
    /// all be walked (a damaged header) is left in place.
    fn compact_segment(&self, segment: u64) -> Result<u64, TierError> {
        let io = |context: &str| {
            let context = format!("{context} value segment {segment:016x}");
            move |source| TierError::Io { context, source }
        };
        let mut moved = 0;
        let complete = self
            .values
            .scan(segment, |pointer, id| {
                let stored = self.index.get(id).map_err(std::io::Error::other)?;
                if stored.map(|r| r.pointer) != Some(pointer) {
                    return Ok(());
                }
                let (envelope, last_hit) = match self.values.read_hit(id, &pointer) {
                    Ok(read) => read,
                    Err(e) => {
                        // Left behind: the lookup that reaches it finds it gone, a miss.
                        tracing::warn!(error = %e, "a damaged record is not moved by compaction");
                        return Ok(());
                    }
                };
                // As eviction: no put lands between the append and the swap.
                let _no_put_midway = self
                    .evicting_excludes
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                let new = self.values.append_hit(id, &envelope, last_hit)?;
                if self
                    .repoint(id, &pointer, new)
                    .map_err(std::io::Error::other)?
                {
                    moved += 1;
                }
                Ok(())
            })
            .map_err(io("compacting"))?;
        if !complete {
            tracing::warn!(segment = %format!("{segment:016x}"),
                "a value segment has a damaged record header; it is kept, not compacted");
            return Ok(moved);
        }
        self.values.sync().map_err(io("syncing before deleting"))?;
        self.db.flush()?;
        self.values.remove(segment).map_err(io("deleting"))?;
        Ok(moved)
    }

    /// [`Inner::remove_exact`] for a caller that holds `evicting_excludes` for writing: no put
    /// can land between the read of `current` and its removal.
    fn remove_exact_locked(&self, id: u128, current: &Record) -> Result<bool, TierError> {
        let (old, now) = self.index.update(id, |record| match record {
            Some(record) if record.pointer == current.pointer => None,
            other => other,
        })?;
        let Some(old) = old.filter(|old| old.pointer == current.pointer && now.is_none()) else {
            return Ok(false);
        };
        self.uncount(&old);
        Ok(true)
    }

    /// Takes the record `old` of `id`, just removed from the index, out of the counts.
    fn uncount(&self, old: &Record) {
        self.count.fetch_sub(1, Relaxed);
        self.bytes.fetch_sub(old.bytes(), Relaxed);
    }
}

#[async_trait]
impl Tier for DiskTier {
    fn name(&self) -> TierName {
        TierName::L2
    }

    async fn get(&self, key: &CacheKey) -> Result<Option<Arc<Entry>>, TierError> {
        let id = key.id();
        let Some((stored, read)) = self.inner.load_hit(id)? else {
            return Ok(None);
        };
        let decoded = read.and_then(|(envelope, last_hit)| {
            let entry = self.inner.codec.decode_local(&envelope)?;
            Ok((entry, last_hit))
        });
        match decoded {
            Ok((entry, last_hit)) => {
                self.inner.touch(&stored, last_hit);
                Ok(Some(Arc::new(entry)))
            }
            // Sealed under a key this node does not hold, or not sealed while it requires a
            // key: refused, never served, but left in place: the keys may be what is wrong
            // (a node started without its key must not wipe its disk), and a put replaces it.
            Err(e @ strata_core::CodecError::Unauthentic(_)) => {
                tracing::warn!(key = %key, error = %e, "entry on disk not authentic under this node's keys; refused");
                Err(TierError::Corrupt(e))
            }
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "corrupt entry on disk; removing it");
                self.inner.remove_exact(id, &stored)?;
                Err(TierError::Corrupt(e))
            }
        }
    }

    async fn put(&self, key: &CacheKey, entry: &Arc<Entry>) -> Result<(), TierError> {
        let bytes = self.inner.codec.encode(entry)?;
        self.put_encoded(key, &bytes)
    }

    async fn remove(&self, key: &CacheKey) -> Result<(), TierError> {
        self.inner.forget(key.id()).map(|_| ())
    }

    async fn flush(&self) -> Result<(), TierError> {
        let tier = self.clone();
        tokio::task::spawn_blocking(move || tier.flush_blocking())
            .await
            .map_err(|e| TierError::Storage(format!("flush task: {e}")))?
    }

    fn usage(&self) -> TierUsage {
        TierUsage {
            entries: self.inner.count.load(Relaxed),
            bytes: self.inner.bytes.load(Relaxed),
            capacity: Some(self.inner.capacity),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;
    use strata_core::{Normalizer, Scope};

    /// The entry count and bytes of the index, counted by a walk.
    pub(crate) fn counted(tier: &DiskTier) -> (u64, u64) {
        tier.inner.index.iter().fold((0, 0), |(n, bytes), item| {
            let (_, record) = item.unwrap_or_else(|e| panic!("{e}"));
            (n + 1, bytes + record.bytes())
        })
    }

    /// The last use of `id`: the index's, or the end of the second of its record's last hit.
    fn last_use(tier: &DiskTier, id: u128) -> Option<u64> {
        let record = tier.inner.index.get(id).unwrap_or_else(|e| panic!("{e}"))?;
        let hit = tier
            .inner
            .values
            .last_hit(id, &record.pointer)
            .unwrap_or_else(|e| panic!("{e}"));
        let hit_ms = if hit == 0 {
            0
        } else {
            u64::from(hit) * 1000 + 999
        };
        Some(record.last_used_ms.max(hit_ms))
    }

    /// A distinct entry per `i`, with a response too long to store uncompressed.
    pub(crate) fn entry(i: usize) -> (CacheKey, Arc<Entry>) {
        let request = json!({"model": "m", "messages": [{"role": "user", "content": format!("question {i}")}]});
        let keyed = Normalizer::default()
            .key(&request, &Scope::Global)
            .unwrap_or_else(|e| panic!("{e}"));
        let now = chrono::Utc::now();
        let text = format!(
            "answer {i} {}",
            "padding that does not compress well ".repeat(4)
        );
        let entry = Entry {
            cache_id: keyed.key.hex(),
            cache_key: keyed.key.to_string(),
            request: keyed.canonical,
            response: serde_json::value::to_raw_value(&text)
                .unwrap_or_else(|e| panic!("{e}"))
                .into(),
            model: "m".into(),
            provider: "p".into(),
            tokens: Default::default(),
            cost: Default::default(),
            latency_ms: 0,
            created_at: now,
            expires_at: None,
            tags: vec![],
            scope: Scope::Global,
            hit_count: 0,
            last_accessed: now,
            epochs: Default::default(),
        };
        (keyed.key, Arc::new(entry))
    }

    /// The value log holds what the tier counts, within its stated slack, however much was
    /// written, evicted and overwritten; every copy still counted reads back, before and after
    /// a reopen, and nothing removed does.
    #[test]
    fn compaction_keeps_the_value_log_near_what_is_held_and_loses_nothing_held() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let mut config = DiskConfig::new(dir.path().join("l2"));
        config.capacity = 1 << 20;
        let codec = Codec::default();
        let check = |tier: &DiskTier| {
            let (total, held) = (tier.value_log_bytes(), tier.usage().bytes);
            let slack = 2 * segment_bytes(config.capacity);
            assert!(
                total <= held + held / 4 + slack + held.div_ceil(16),
                "value log {total} bytes for {held} held"
            );
            let mut read = 0;
            for i in 0..6000 {
                let (key, e) = entry(i);
                if tier.holds(&key) {
                    let Ok(Some((_, Ok(bytes)))) = tier.inner.load(key.id()) else {
                        panic!("entry {i} is counted but does not read back")
                    };
                    let stored = codec.decode_local(&bytes).unwrap_or_else(|e| panic!("{e}"));
                    assert_eq!(stored.response.get(), e.response.get(), "entry {i}");
                    read += 1;
                }
            }
            assert_eq!(read, tier.usage().entries);
            assert!(read > 100, "{read}");
        };
        {
            let tier = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
            // Written, then half of them overwritten: six megabytes through a one-megabyte tier.
            for i in (0..6000).chain((3000..6000).step_by(2)) {
                let (key, e) = entry(i);
                let envelope = codec.encode(&e).unwrap_or_else(|e| panic!("{e}"));
                tier.put_encoded(&key, &envelope)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            assert!(tier.evictions() > 0);
            tier.compact().unwrap_or_else(|e| panic!("{e}"));
            check(&tier);
            tier.flush_blocking().unwrap_or_else(|e| panic!("{e}"));
        }
        let tier = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
        check(&tier);
        // A clear leaves no segment behind.
        tier.clear().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tier.value_log_bytes(), 0);
    }

    /// Puts racing a clear land wholly before it or wholly after it: afterwards the byte count
    /// and the slots match what sled holds.
    #[test]
    fn puts_during_a_clear_keep_the_byte_count_true() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let tier = DiskTier::open(&DiskConfig::new(dir.path().join("l2")), Codec::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let codec = Codec::default();
        let envelopes = |range: std::ops::Range<usize>| -> Vec<_> {
            range
                .map(|i| {
                    let (key, e) = entry(i);
                    (key, codec.encode(&e).unwrap_or_else(|e| panic!("{e}")))
                })
                .collect()
        };
        // Enough entries that the clear (sled removes them one by one) takes a while.
        for (key, envelope) in envelopes(0..3000) {
            tier.put_encoded(&key, &envelope)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let later = envelopes(3000..6000);
        let started = Arc::new(std::sync::Barrier::new(2));
        let writer = {
            let (tier, started) = (tier.clone(), Arc::clone(&started));
            std::thread::spawn(move || {
                started.wait();
                for (key, envelope) in &later {
                    tier.put_encoded(key, envelope)
                        .unwrap_or_else(|e| panic!("{e}"));
                }
            })
        };
        started.wait();
        tier.clear().unwrap_or_else(|e| panic!("{e}"));
        writer
            .join()
            .unwrap_or_else(|_| panic!("the writer panicked"));
        assert_eq!((tier.usage().entries, tier.usage().bytes), counted(&tier));
    }

    /// A lookup that refused a copy removes that copy, not one a put wrote since.
    #[tokio::test]
    async fn a_refused_copy_goes_but_a_newer_one_stays() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let tier = DiskTier::open(&DiskConfig::new(dir.path().join("l2")), Codec::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let (key, old) = entry(0);
        tier.put(&key, &old).await.unwrap_or_else(|e| panic!("{e}"));
        let judged = tier.get(&key).await.ok().flatten();
        let judged = judged.unwrap_or_else(|| panic!("no copy"));
        let mut newer = (*old).clone();
        newer.response = serde_json::value::to_raw_value("a newer answer")
            .unwrap_or_else(|e| panic!("{e}"))
            .into();
        tier.put(&key, &Arc::new(newer))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let went = tier.remove_judged(&key, &judged);
        assert!(
            !went.unwrap_or_else(|e| panic!("{e}")),
            "the newer copy went"
        );
        let kept = tier.get(&key).await.ok().flatten();
        assert_eq!(
            kept.map(|e| e.response.get().to_string()).as_deref(),
            Some("\"a newer answer\"")
        );
        let judged = tier.get(&key).await.ok().flatten();
        let judged = judged.unwrap_or_else(|| panic!("no copy"));
        let went = tier.remove_judged(&key, &judged);
        assert!(
            went.unwrap_or_else(|e| panic!("{e}")),
            "the judged copy stayed"
        );
        assert!(matches!(tier.get(&key).await, Ok(None)));
    }

    /// A pass judges every copy's last use first and evicts afterwards: a copy used in between
    /// stays.
    #[tokio::test]
    async fn a_copy_used_after_an_eviction_pass_judged_it_stays() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let tier = DiskTier::open(&DiskConfig::new(dir.path().join("l2")), Codec::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let (key, e) = entry(0);
        tier.put(&key, &e).await.unwrap_or_else(|e| panic!("{e}"));
        let judged = last_use(&tier, key.id()).unwrap_or_else(|| panic!("no record"));
        std::thread::sleep(Duration::from_millis(2));
        assert!(matches!(tier.get(&key).await, Ok(Some(_))));
        let evicted = tier.inner.evict_one(key.id(), judged);
        assert!(
            !evicted.unwrap_or_else(|e| panic!("{e}")),
            "a used copy went"
        );
        // The hit, read from the copy's record, is now the index's last use: the next pass
        // judges the copy by it.
        let indexed = tier
            .inner
            .index
            .get(key.id())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(indexed.is_some_and(|r| r.last_used_ms > judged));
        assert!(matches!(tier.get(&key).await, Ok(Some(_))));
        let judged = last_use(&tier, key.id());
        let evicted = tier.inner.evict_one(key.id(), judged.unwrap_or(0));
        assert!(
            evicted.unwrap_or_else(|e| panic!("{e}")),
            "an unused copy stayed"
        );
    }

    #[tokio::test]
    async fn stays_within_its_byte_bound_and_evicts_the_least_recently_used() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let mut config = DiskConfig::new(dir.path().join("l2"));
        config.capacity = 64 << 10;
        let tier = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
        let (hot_key, hot) = entry(0);
        tier.put(&hot_key, &hot)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for i in 1..400 {
            let (key, e) = entry(i);
            tier.put(&key, &e).await.unwrap_or_else(|e| panic!("{e}"));
            // Keep entry 0 recently used.
            assert!(
                matches!(tier.get(&hot_key).await, Ok(Some(_))),
                "hot entry evicted at {i}"
            );
            std::thread::sleep(Duration::from_millis(1));
            tier.inner.evict().unwrap_or_else(|e| panic!("{e}"));
            assert!(tier.usage().bytes <= config.capacity, "{:?}", tier.usage());
        }
        assert!(tier.evictions() > 0);
        assert!(
            matches!(tier.get(&entry(1).0).await, Ok(None)),
            "oldest entry kept"
        );
    }

    #[test]
    fn a_sweep_leaves_a_copy_written_after_it_judged_the_old_one() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let tier = DiskTier::open(&DiskConfig::new(dir.path().join("l2")), Codec::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let (key, old) = entry(0);
        let codec = Codec::default();
        let encode = |e: &Entry| codec.encode(e).unwrap_or_else(|e| panic!("{e}"));
        tier.put_encoded(&key, &encode(&old))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut fresh = (*old).clone();
        fresh.hit_count = 7;
        let fresh_bytes = encode(&fresh);
        // The sweep condemns the copy it read; a put replaces that copy before it is removed.
        let swept = tier
            .sweep(|_, decoded, _, _| {
                let judged = decoded.unwrap_or_else(|e| panic!("{e}"));
                tier.put_encoded(&key, &fresh_bytes)
                    .unwrap_or_else(|e| panic!("{e}"));
                judged.hit_count == 0
            })
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((swept.seen, swept.removed), (1, 0));
        let kept = tier.raw(&key.digest).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            kept.as_deref(),
            Some(fresh_bytes.as_slice()),
            "the new copy was swept"
        );
        assert_eq!(tier.usage().entries, 1);
        assert_eq!(tier.usage().bytes, fresh_bytes.len() as u64 + 16);
        // Once nothing replaces it, the judged copy does go.
        let swept = tier
            .sweep(|_, _, _, _| true)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(swept.removed, 1);
        assert_eq!((tier.usage().entries, tier.usage().bytes), (0, 0));
    }

    #[test]
    fn an_eviction_pass_that_never_runs_does_not_switch_eviction_off() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let mut config = DiskConfig::new(dir.path().join("l2"));
        config.capacity = 4 << 10;
        let tier = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
        // A runtime that has shut down drops the blocking tasks it is handed.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let handle = runtime.handle().clone();
        runtime.shutdown_timeout(Duration::ZERO);
        let entered = handle.enter();
        for i in 0..20 {
            let (key, e) = entry(i);
            let bytes = Codec::default().encode(&e).unwrap_or_default();
            tier.put_encoded(&key, &bytes)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        drop(entered);
        assert!(
            !tier.inner.evicting.load(Relaxed),
            "eviction left switched off by a pass that never ran"
        );
        // Outside any runtime the next put evicts on its own thread.
        let (key, e) = entry(20);
        let bytes = Codec::default().encode(&e).unwrap_or_default();
        tier.put_encoded(&key, &bytes)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(tier.usage().bytes <= config.capacity, "{:?}", tier.usage());
    }

    #[test]
    fn a_corrupt_directory_is_moved_aside_and_replaced() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let config = DiskConfig::new(dir.path().join("l2"));
        {
            let tier = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
            let (key, e) = entry(1);
            tier.insert_raw(&key, &Codec::default().encode(&e).unwrap_or_default())
                .unwrap_or_else(|e| panic!("{e}"));
            let stats = Stats {
                lookups: 42,
                misses: 2,
                ..Stats::default()
            };
            tier.save_stats(&stats).unwrap_or_else(|e| panic!("{e}"));
            tier.flush_blocking().unwrap_or_else(|e| panic!("{e}"));
        }
        std::fs::write(
            config.path.join("conf"),
            b"\x00garbage that is not a sled config\xff",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let tier = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
        let aside = tier.moved_aside().map(Path::to_path_buf);
        assert!(aside.as_ref().is_some_and(|p| p.exists()), "{aside:?}");
        // Left as it was found, for whoever wants to look; the salvage's copy is gone.
        let garbage = aside
            .as_ref()
            .map(|p| std::fs::read(p.join("conf")).unwrap_or_default());
        assert_eq!(
            garbage.as_deref(),
            Some(&b"\x00garbage that is not a sled config\xff"[..])
        );
        let leftovers = std::fs::read_dir(dir.path()).map_or(0, |d| d.count());
        assert_eq!(leftovers, 2, "the new tier and the one moved aside");
        // What sled could read of it, salvaged: the entry.
        assert_eq!(tier.usage().entries, 1);
        assert_eq!(tier.salvage().map(|s| s.entries), Some(1));
        // The lifetime statistics outlive the database, as the epochs and the node id do.
        let stats = tier.load_stats();
        assert_eq!((stats.lookups, stats.misses), (42, 2));
    }

    #[test]
    fn at_most_three_directories_moved_aside_are_kept() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let config = DiskConfig::new(dir.path().join("l2"));
        for round in 0..5 {
            drop(DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}")));
            std::thread::sleep(std::time::Duration::from_millis(100));
            std::fs::write(config.path.join("conf"), b"\x00garbage\xff")
                .unwrap_or_else(|e| panic!("{e}"));
            let tier = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
            assert!(tier.moved_aside().is_some(), "round {round}");
        }
        let aside = std::fs::read_dir(dir.path())
            .unwrap_or_else(|e| panic!("{e}"))
            .filter(|i| {
                i.as_ref()
                    .is_ok_and(|i| i.file_name().to_string_lossy().contains(".corrupt-"))
            })
            .count();
        assert_eq!(aside, KEPT_ASIDE);
    }

    #[test]
    fn closing_saves_the_totals_and_opening_counts_the_index_without_them() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let config = DiskConfig::new(dir.path().join("l2"));
        let open = || DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
        let put = |tier: &DiskTier, range: std::ops::Range<usize>| {
            for i in range {
                let (key, _) = entry(i);
                tier.insert_raw(&key, &vec![7; 100 + i])
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        };
        let totals_of = |tier: &DiskTier| {
            tier.inner
                .meta
                .get(TOTALS_KEY)
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let first = {
            let tier = open();
            put(&tier, 0..40);
            tier.usage()
        };
        assert_eq!(
            (first.entries, first.bytes),
            (40, (0..40).map(|i| 116 + i).sum())
        );
        {
            let tier = open();
            // Taken from the totals, which are gone from `meta` until the next close.
            assert_eq!(tier.usage(), first);
            assert!(totals_of(&tier).is_none());
            put(&tier, 30..60);
            // A handle that stops without closing saves no totals.
            tier.inner.totals_on_drop.store(false, Relaxed);
        }
        let second = {
            let tier = open();
            assert!(totals_of(&tier).is_none());
            assert_eq!(
                (tier.usage().entries, tier.usage().bytes),
                (60, (0..60).map(|i| 116 + i).sum())
            );
            assert_eq!((tier.usage().entries, tier.usage().bytes), counted(&tier));
            tier.usage()
        };
        // Totals that are not 16 bytes are not believed: the index is counted.
        {
            let tier = open();
            tier.inner.totals_on_drop.store(false, Relaxed);
            tier.inner
                .meta
                .insert(TOTALS_KEY, &[1u8; 15])
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(open().usage(), second);
    }

    #[test]
    fn an_older_database_is_moved_into_the_index() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let config = DiskConfig::new(dir.path().join("l2"));
        let envelope = |i: usize| vec![i as u8; 100 + i];
        let long_ago = 1_000_000;
        {
            let tier = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
            // As a release before the index left it: a pointer into the value log, or the
            // envelope inline, under each id; an access record of 24 bytes or of the last use
            // alone, or none; the mark of sizes and a snapshot token in `meta`.
            let entries = tier.open_tree("entries").unwrap_or_else(|e| panic!("{e}"));
            let access = tier.open_tree("access").unwrap_or_else(|e| panic!("{e}"));
            for i in 0..50 {
                let (key, _) = entry(i);
                let id = key.id().to_be_bytes();
                if i % 2 == 0 {
                    let pointer = tier
                        .inner
                        .append(key.id(), &envelope(i))
                        .unwrap_or_else(|e| panic!("{e}"));
                    entries.insert(id, &pointer.encode()).map(drop)
                } else {
                    entries.insert(id, envelope(i)).map(drop)
                }
                .unwrap_or_else(|e| panic!("{e}"));
                let used = (long_ago + i as u64).to_le_bytes();
                match i % 3 {
                    0 => access.insert(id, &used).map(drop),
                    1 => access.insert(id, [&used[..], &[0; 16]].concat()).map(drop),
                    _ => Ok(()),
                }
                .unwrap_or_else(|e| panic!("{e}"));
            }
            for key in OLD_META_KEYS {
                tier.inner
                    .meta
                    .insert(key, &[1u8])
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            tier.inner.values.sync().unwrap_or_else(|e| panic!("{e}"));
            tier.inner.db.flush().unwrap_or_else(|e| panic!("{e}"));
            // Closed as an older release closes: no totals.
            tier.inner.totals_on_drop.store(false, Relaxed);
        }
        let tier = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (tier.usage().entries, tier.usage().bytes),
            (50, (0..50).map(|i| 116 + i as u64).sum())
        );
        let names = tier.inner.db.tree_names();
        assert!(!names.iter().any(|n| n == b"entries" || n == b"access"));
        for key in OLD_META_KEYS {
            assert!(tier.inner.meta.get(key).is_ok_and(|v| v.is_none()));
        }
        for i in 0..50 {
            let (key, _) = entry(i);
            match tier.inner.load(key.id()) {
                Ok(Some((record, Ok(bytes)))) => {
                    assert_eq!(bytes, envelope(i), "entry {i}");
                    // The last use carried over, where there was one.
                    if i % 3 != 2 {
                        assert_eq!(record.last_used_ms, long_ago + i as u64, "entry {i}");
                    } else {
                        assert!(record.last_used_ms > long_ago + 1000, "entry {i}");
                    }
                }
                other => panic!("entry {i}: {:?}", other.map(|o| o.is_some())),
            }
        }
    }

    #[test]
    fn a_record_pointing_at_another_entrys_envelope_is_never_served_as_it() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let tier = DiskTier::open(&DiskConfig::new(dir.path().join("l2")), Codec::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let (one, _) = entry(1);
        let (two, _) = entry(2);
        tier.insert_raw(&one, b"the first answer")
            .unwrap_or_else(|e| panic!("{e}"));
        tier.insert_raw(&two, b"the second, longer answer")
            .unwrap_or_else(|e| panic!("{e}"));
        let other = tier
            .inner
            .index
            .get(two.id())
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no record"));
        // The first key's record made to point at the second key's envelope, then past the
        // end of its segment: read as damage, never as the other answer.
        for pointer in [
            other.pointer,
            Pointer {
                offset: 1 << 30,
                ..other.pointer
            },
        ] {
            tier.inner
                .index
                .update(one.id(), |r| r.map(|r| Record { pointer, ..r }))
                .unwrap_or_else(|e| panic!("{e}"));
            match tier.inner.load(one.id()) {
                Ok(Some((_, Err(_)))) => {}
                Ok(Some((_, Ok(read)))) => panic!("served {:?}", String::from_utf8_lossy(&read)),
                other => panic!("{:?}", other.map(|o| o.is_some())),
            }
        }
        match tier.inner.load(two.id()) {
            Ok(Some((_, Ok(read)))) => assert_eq!(read, b"the second, longer answer"),
            other => panic!("{:?}", other.map(|o| o.is_some())),
        }
    }

    /// A lookup writes nothing to sled: its hit goes into its record's header, in place, once
    /// per second at most, and is there after a reopen and after compaction moved the record.
    #[test]
    fn a_lookup_writes_only_its_records_last_hit_which_outlives_a_close_and_compaction() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let config = DiskConfig::new(dir.path().join("l2"));
        let (key, _) = entry(1);
        let record_of = |tier: &DiskTier| {
            tier.inner
                .index
                .get(key.id())
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("no record"))
        };
        let hit_of = |tier: &DiskTier| {
            let record = record_of(tier);
            match tier.inner.load_hit(key.id()) {
                Ok(Some((_, Ok((envelope, last_hit))))) => {
                    assert_eq!(envelope, b"x");
                    (record, last_hit)
                }
                other => panic!("{:?}", other.map(|o| o.is_some())),
            }
        };
        let hit = {
            let tier = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
            tier.insert_raw(&key, b"x")
                .unwrap_or_else(|e| panic!("{e}"));
            let (stored, never) = hit_of(&tier);
            assert_eq!(never, 0, "a copy no lookup read has no last hit");
            for _ in 0..3 {
                let (_, last_hit) = hit_of(&tier);
                tier.inner.touch(&stored, last_hit);
            }
            let (record, hit) = hit_of(&tier);
            assert_eq!(record, stored, "a lookup wrote its index record");
            assert!(
                hit >= now_secs().saturating_sub(1) && hit <= now_secs(),
                "{hit}"
            );
            let used = last_use(&tier, key.id()).unwrap_or_else(|| panic!("no record"));
            assert!(stored.last_used_ms < used);
            hit
        };
        let tier = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(hit_of(&tier).1, hit, "the last hit did not outlive a close");
        let before = record_of(&tier).pointer;
        tier.inner
            .compact_segment(before.segment)
            .unwrap_or_else(|e| panic!("{e}"));
        let (moved, carried) = hit_of(&tier);
        assert_ne!(moved.pointer, before, "compaction did not move the record");
        assert_eq!(carried, hit, "compaction lost the last hit");
    }

    #[test]
    fn damage_in_an_entry_is_found_by_the_lookup_that_reads_it_never_served() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let config = DiskConfig::new(dir.path().join("l2"));
        // Each run appends to a segment of its own.
        for i in 0..3 {
            let tier = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
            let (key, _) = entry(i);
            tier.insert_raw(&key, &vec![i as u8; 400 << 10])
                .unwrap_or_else(|e| panic!("{e}"));
            tier.flush_blocking().unwrap_or_else(|e| panic!("{e}"));
        }
        // The oldest segment (numbered in writing order), lost.
        let oldest = std::fs::read_dir(config.path.join(vlog::DIR))
            .unwrap_or_else(|e| panic!("{e}"))
            .filter_map(|item| item.ok().map(|i| i.path()))
            .min();
        let Some(oldest) = oldest else {
            panic!("no value segment written")
        };
        std::fs::remove_file(&oldest).unwrap_or_else(|e| panic!("{e}"));
        // Opening reads the access records, not the entries: it does not meet the damage.
        let tier = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
        assert!(tier.moved_aside().is_none());
        assert_eq!(tier.usage().entries, 3);
        // What the lost segment held is an error when read, never a value; the others read
        // back as written.
        let mut failed = Vec::new();
        for i in 0..3 {
            let (key, _) = entry(i);
            match tier.inner.load(key.id()) {
                Ok(Some((_, Ok(bytes)))) => assert_eq!(bytes, vec![i as u8; 400 << 10]),
                Ok(Some((_, Err(_)))) => failed.push(i),
                other => panic!("entry {i}: {:?}", other.map(|o| o.is_some())),
            }
        }
        assert_eq!(failed, [0], "the damage is met when read, and only there");
        // A lookup refuses it and removes it.
        let (key, _) = entry(0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(rt.block_on(tier.get(&key)).is_err());
        assert_eq!(tier.usage().entries, 2);
    }

    /// Flips one bit of the file at `path`, at byte `at` (its middle when `None`).
    fn flip_bit(path: &Path, at: Option<usize>) {
        let mut bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{e}"));
        let at = at.unwrap_or(bytes.len() / 2);
        bytes[at] ^= 0x10;
        std::fs::write(path, &bytes).unwrap_or_else(|e| panic!("{e}"));
    }

    /// How many of the 400 entries of [`entry`] the tier serves; each one served is right.
    async fn served_of_400(tier: &DiskTier) -> u64 {
        let mut served = 0;
        for i in 0..400 {
            let (key, e) = entry(i);
            if let Ok(Some(found)) = tier.get(&key).await {
                assert_eq!(found.response.get(), e.response.get(), "entry {i}");
                assert_eq!(found.cache_id, e.cache_id, "entry {i}");
                served += 1;
            }
        }
        served
    }

    /// A flipped bit in sled's file had the whole tier moved aside: 0 of 400 entries served,
    /// the upload queue and the statistics gone with it. Wherever the bit lands now, what sled
    /// can read back is served (in place, or salvaged from the copy moved aside), and nothing
    /// served is wrong.
    #[tokio::test]
    async fn a_flipped_bit_loses_at_most_what_it_touched_and_never_serves_it() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let config = DiskConfig::new(dir.path().join("l2"));
        // Written over four runs, so that sled's snapshot covers part of the file.
        for run in 0..4 {
            let tier = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
            for i in run * 100..(run + 1) * 100 {
                let (key, e) = entry(i);
                tier.put(&key, &e).await.unwrap_or_else(|e| panic!("{e}"));
            }
            tier.flush_blocking().unwrap_or_else(|e| panic!("{e}"));
        }
        let pristine = dir.path().join("pristine");
        copy_files(&config.path, &pristine, &|_| true).unwrap_or_else(|e| panic!("{e}"));
        let size = std::fs::metadata(pristine.join("db")).map_or(0, |m| m.len()) as usize;
        // At a quarter, half and three quarters of the file: sled refuses the database for
        // some of these and opens it, short of what the bit cut off, for others.
        let (mut salvaged_at, mut opened_at) = (0, 0);
        // sled's file holds pointers and access records now, in its first part; the rest is
        // space sled set aside.
        for at in [size / 16, size / 8, size * 3 / 4] {
            let _ = std::fs::remove_dir_all(&config.path);
            copy_files(&pristine, &config.path, &|_| true).unwrap_or_else(|e| panic!("{e}"));
            flip_bit(&config.path.join("db"), Some(at));
            let tier = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
            let served = served_of_400(&tier).await;
            assert!(
                served >= 100,
                "a bit at {at} of {size}: {served} of 400 served (moved aside: {:?})",
                tier.moved_aside()
            );
            assert_eq!(
                tier.usage().entries,
                served,
                "counted as held: what is served"
            );
            match tier.salvage() {
                Some(salvage) => {
                    assert_eq!(salvage.entries, served, "a bit at {at}: salvaged, served");
                    salvaged_at += 1;
                }
                None => {
                    assert!(tier.moved_aside().is_none(), "a bit at {at}");
                    opened_at += 1;
                }
            }
        }
        // Both ways of meeting the damage were taken (where the bit lands is deterministic).
        assert!(
            salvaged_at > 0 && opened_at > 0,
            "{salvaged_at} {opened_at}"
        );

        // A bit flipped in the value log costs the one entry whose record it lands in.
        let _ = std::fs::remove_dir_all(&config.path);
        copy_files(&pristine, &config.path, &|_| true).unwrap_or_else(|e| panic!("{e}"));
        let segment = std::fs::read_dir(config.path.join(vlog::DIR))
            .unwrap_or_else(|e| panic!("{e}"))
            .filter_map(|item| item.ok().map(|i| i.path()))
            .min();
        let Some(segment) = segment else {
            panic!("no value segment written")
        };
        flip_bit(&segment, None);
        let tier = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
        let served = served_of_400(&tier).await;
        assert_eq!(served, 399, "a bit in a value segment");
        assert_eq!(tier.usage().entries, 399, "the damaged one is removed");
        let _ = std::fs::remove_dir_all(&pristine);
    }

    #[test]
    fn a_directory_of_other_files_is_never_moved_aside() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("project");
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(path.join("conf"), b"[server]\nport = 80\n")
            .unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(path.join("notes.txt"), b"mine").unwrap_or_else(|e| panic!("{e}"));
        let refused = DiskTier::open(&DiskConfig::new(&path), Codec::default()).map(|_| ());
        let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("not a strata disk tier"), "{message}");
        assert!(path.join("notes.txt").exists());
        let siblings = std::fs::read_dir(dir.path())
            .map(Iterator::count)
            .unwrap_or(0);
        assert_eq!(siblings, 1, "something was moved next to it");
    }

    #[test]
    fn a_tiny_page_cache_opens_the_same_database() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let mut config = DiskConfig::new(dir.path().join("l2"));
        let (key, e) = entry(1);
        {
            let tier = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
            tier.insert_raw(&key, &Codec::default().encode(&e).unwrap_or_default())
                .unwrap_or_else(|e| panic!("{e}"));
            tier.flush_blocking().unwrap_or_else(|e| panic!("{e}"));
        }
        config.cache_capacity = 100;
        let tier = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
        assert!(tier.moved_aside().is_none());
        assert!(tier.raw(&key.digest).ok().flatten().is_some());
    }

    #[test]
    fn opening_waits_for_a_handle_that_is_closing_and_names_one_that_is_not() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let config = DiskConfig::new(dir.path().join("l2"));
        let (key, e) = entry(1);
        let first = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
        first
            .insert_raw(&key, &Codec::default().encode(&e).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
        // Held for the whole wait: opening fails, and says why.
        let started = Instant::now();
        let refused = DiskTier::open(&config, Codec::default()).map(|_| ());
        assert!(started.elapsed() >= LOCK_WAIT);
        let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("is using it"), "{message}");
        // Closed while the second open waits: it gets the database, with the entry.
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let _ = first.flush_blocking();
            drop(first);
        });
        let second = DiskTier::open(&config, Codec::default()).unwrap_or_else(|e| panic!("{e}"));
        assert!(second.raw(&key.digest).ok().flatten().is_some());
        let _ = closer.join();
    }
}
