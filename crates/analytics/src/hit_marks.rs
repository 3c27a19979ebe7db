//! Which entries were ever served as a hit, each with the time it was last marked: what the
//! cold-entry report asks, pruned by age.
//!
//! One sled key per two-byte prefix of the digest (at most 65,536 keys), whose value holds the
//! marks of that prefix sorted by the rest of the digest: 14 bytes of digest and the mark's
//! time, 22 bytes a mark. A key per digest, as earlier releases kept in `analytics.hit_ids`,
//! made a million sled keys for a million entries hit, and sled 0.34 keeps a page in memory for
//! every 16 keys or so of a tree: tens of MiB that grew with every distinct hit. Those marks are
//! read where they are and moved into buckets a batch at a time ([`HitMarks::take_up_legacy`]).
//!
//! A bucket is outside data like any other on disk: a value whose length is not a whole number
//! of marks is read up to its last whole mark, and never panics.

use sled::IVec;

/// The tree of buckets.
pub(crate) const TREE: &str = "analytics.hit_marks";
/// The tree of earlier releases: one key per digest (16 bytes, big endian), its value the
/// time it was marked (8 bytes, big endian milliseconds; older ones hold nothing).
pub(crate) const LEGACY_TREE: &str = "analytics.hit_ids";
/// Marks of the legacy tree moved into buckets per call of [`HitMarks::take_up_legacy`].
pub(crate) const LEGACY_BATCH: usize = 4096;

/// Bytes of a digest after the bucket's prefix.
const SUFFIX: usize = 14;
/// Bytes of one mark: the digest's suffix, then its time (i64 milliseconds, big endian).
const MARK: usize = SUFFIX + 8;

/// The bucket a digest's mark is kept in.
pub(crate) fn bucket_of(id: u128) -> [u8; 2] {
    let bytes = id.to_be_bytes();
    [bytes[0], bytes[1]]
}

fn suffix_of(id: u128) -> [u8; SUFFIX] {
    let mut suffix = [0; SUFFIX];
    suffix.copy_from_slice(&id.to_be_bytes()[2..]);
    suffix
}

/// The marks of a bucket's value, in its order: (suffix, time); a trailing part shorter than a
/// mark is not read.
fn marks(value: &[u8]) -> impl Iterator<Item = (&[u8], i64)> {
    value.chunks_exact(MARK).map(|mark| {
        let (suffix, at) = mark.split_at(SUFFIX);
        let at = <[u8; 8]>::try_from(at).map_or(0, i64::from_be_bytes);
        (suffix, at)
    })
}

/// Whether a bucket's value holds a mark for `suffix` (binary search: buckets are written
/// sorted; a bucket that is not is read as one that lacks the mark, never misread as another).
fn holds(value: &[u8], suffix: &[u8; SUFFIX]) -> bool {
    let count = value.len() / MARK;
    let (mut low, mut high) = (0, count);
    while low < high {
        let middle = low + (high - low) / 2;
        let at = middle * MARK;
        match value.get(at..at + SUFFIX) {
            Some(found) => match found.cmp(suffix.as_slice()) {
                std::cmp::Ordering::Less => low = middle + 1,
                std::cmp::Ordering::Greater => high = middle,
                std::cmp::Ordering::Equal => return true,
            },
            None => return false,
        }
    }
    false
}

/// `old` with the marks of `added` (suffix, time) set: a digest already there takes the newer
/// time. Sorted by suffix, one mark per suffix, whatever order `old` was in.
fn merged(old: Option<&[u8]>, added: impl IntoIterator<Item = ([u8; SUFFIX], i64)>) -> Vec<u8> {
    let mut all: Vec<([u8; SUFFIX], i64)> = old
        .map(|value| {
            marks(value)
                .filter_map(|(suffix, at)| Some((<[u8; SUFFIX]>::try_from(suffix).ok()?, at)))
                .collect()
        })
        .unwrap_or_default();
    all.extend(added);
    // Newest first within a suffix, so that the dedup keeps the newest time.
    all.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    all.dedup_by(|later, first| later.0 == first.0);
    encode(&all)
}

fn encode(marks: &[([u8; SUFFIX], i64)]) -> Vec<u8> {
    let mut value = Vec::with_capacity(marks.len() * MARK);
    for (suffix, at) in marks {
        value.extend_from_slice(suffix);
        value.extend_from_slice(&at.to_be_bytes());
    }
    value
}

/// The marks a writer sets: a bucket's key and its value before and after.
pub(crate) struct Swap {
    /// The bucket's key.
    pub key: [u8; 2],
    /// Its value as read (the write applies only if it still holds it).
    pub old: Option<IVec>,
    /// Its value to write (`None`: remove it).
    pub new: Option<Vec<u8>>,
}

/// The hit marks of one analytics store.
pub(crate) struct HitMarks {
    tree: sled::Tree,
    legacy: sled::Tree,
}

impl HitMarks {
    /// The marks in `db`'s trees.
    pub(crate) fn open(db: &sled::Db) -> sled::Result<Self> {
        Ok(HitMarks {
            tree: db.open_tree(TREE)?,
            legacy: db.open_tree(LEGACY_TREE)?,
        })
    }

    /// Whether `id` was marked, in a bucket or still in the legacy tree.
    pub(crate) fn contains(&self, id: u128) -> sled::Result<bool> {
        if let Some(value) = self.tree.get(bucket_of(id))?
            && holds(&value, &suffix_of(id))
        {
            return Ok(true);
        }
        self.legacy.contains_key(id.to_be_bytes())
    }

    /// The write that marks `ids` (all of one bucket) at `at_ms`, against the bucket as it is
    /// now. The caller applies it with [`HitMarks::apply`] and asks again if that fails.
    pub(crate) fn mark(&self, ids: &[u128], at_ms: i64) -> sled::Result<Option<Swap>> {
        let Some(&first) = ids.first() else {
            return Ok(None);
        };
        let key = bucket_of(first);
        let old = self.tree.get(key)?;
        let added = ids
            .iter()
            .filter(|id| bucket_of(**id) == key)
            .map(|id| (suffix_of(*id), at_ms));
        let new = merged(old.as_deref(), added);
        Ok(Some(Swap {
            key,
            old,
            new: Some(new),
        }))
    }

    /// Writes `swap` if its bucket still holds what it was read as; `false` if it does not
    /// (another writer came first: read again).
    pub(crate) fn apply(&self, swap: Swap) -> sled::Result<bool> {
        let done = self
            .tree
            .compare_and_swap(swap.key, swap.old, swap.new)?
            .is_ok();
        Ok(done)
    }

    /// Removes the marks older than `cutoff_ms` from every bucket and from the legacy tree,
    /// streaming both; returns how many. `write` applies each bucket's change (and may fail it,
    /// as a full disk does).
    pub(crate) fn prune(
        &self,
        cutoff_ms: i64,
        now_ms: i64,
        mut write: impl FnMut(&Self, Swap) -> sled::Result<bool>,
    ) -> sled::Result<u64> {
        let mut removed = 0;
        for item in self.tree.iter() {
            let (key, _) = item?;
            let Ok(key) = <[u8; 2]>::try_from(key.as_ref()) else {
                // Not a bucket of ours: nothing reads it, so it goes.
                self.tree.remove(key)?;
                continue;
            };
            loop {
                let Some(old) = self.tree.get(key)? else {
                    break;
                };
                let all: Vec<([u8; SUFFIX], i64)> = marks(&old)
                    .filter_map(|(s, at)| Some((<[u8; SUFFIX]>::try_from(s).ok()?, at)))
                    .collect();
                let kept: Vec<_> = all.iter().copied().filter(|m| m.1 >= cutoff_ms).collect();
                if kept.len() == all.len() && old.len() == all.len() * MARK {
                    break;
                }
                let new = (!kept.is_empty()).then(|| encode(&kept));
                let gone = (all.len() - kept.len()) as u64;
                let swap = Swap {
                    key,
                    old: Some(old),
                    new,
                };
                if write(self, swap)? {
                    removed += gone;
                    break;
                }
            }
        }
        for item in self.legacy.iter() {
            let (key, value) = item?;
            match <[u8; 8]>::try_from(value.as_ref()).map(i64::from_be_bytes) {
                Ok(at) if at < cutoff_ms => {
                    self.legacy.remove(&key)?;
                    removed += 1;
                }
                Ok(_) => {}
                Err(_) => {
                    // Marked before times were kept: it counts from now.
                    self.legacy.insert(&key, &now_ms.to_be_bytes())?;
                }
            }
        }
        Ok(removed)
    }

    /// Moves up to [`LEGACY_BATCH`] marks of the legacy tree into buckets, with their times (a
    /// mark without one takes `now_ms`); returns how many it moved. A mark leaves the legacy
    /// tree only once its bucket holds it.
    pub(crate) fn take_up_legacy(
        &self,
        now_ms: i64,
        mut write: impl FnMut(&Self, Swap) -> sled::Result<bool>,
    ) -> sled::Result<usize> {
        let mut batch: Vec<(u128, i64, IVec)> = Vec::new();
        for item in self.legacy.iter().take(LEGACY_BATCH) {
            let (key, value) = item?;
            let at = <[u8; 8]>::try_from(value.as_ref()).map_or(now_ms, i64::from_be_bytes);
            match <[u8; 16]>::try_from(key.as_ref()) {
                Ok(id) => batch.push((u128::from_be_bytes(id), at, key)),
                // Not a digest: nothing could ever ask for it.
                Err(_) => {
                    self.legacy.remove(key)?;
                }
            }
        }
        let moved = batch.len();
        // The legacy tree is in key order, so each bucket's marks are one run of the batch.
        for run in batch.chunk_by(|a, b| bucket_of(a.0) == bucket_of(b.0)) {
            let Some(first) = run.first() else {
                continue;
            };
            let key = bucket_of(first.0);
            loop {
                let old = self.tree.get(key)?;
                let added = run.iter().map(|(id, at, _)| (suffix_of(*id), *at));
                let new = merged(old.as_deref(), added);
                let swap = Swap {
                    key,
                    old,
                    new: Some(new),
                };
                if write(self, swap)? {
                    break;
                }
            }
            for (_, _, legacy_key) in run {
                self.legacy.remove(legacy_key)?;
            }
        }
        Ok(moved)
    }

    /// Whether the legacy tree still holds marks.
    pub(crate) fn has_legacy(&self) -> bool {
        !self.legacy.is_empty()
    }

    /// Buckets and marks held (a scan; for tests and reports).
    #[cfg(test)]
    pub(crate) fn count(&self) -> sled::Result<(usize, usize)> {
        let mut buckets = 0;
        let mut total = 0;
        for item in self.tree.iter() {
            let (_, value) = item?;
            buckets += 1;
            total += value.len() / MARK;
        }
        Ok((buckets, total))
    }

    /// The legacy tree, for tests that write what an earlier release wrote.
    #[cfg(test)]
    pub(crate) fn legacy(&self) -> &sled::Tree {
        &self.legacy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn db() -> sled::Db {
        sled::Config::new()
            .temporary(true)
            .open()
            .unwrap_or_else(|e| panic!("temporary sled: {e}"))
    }

    fn apply(marks: &HitMarks, swap: Swap) -> sled::Result<bool> {
        marks.apply(swap)
    }

    fn mark_all(marks: &HitMarks, ids: &[u128], at: i64) -> sled::Result<()> {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        for run in ids.chunk_by(|a, b| bucket_of(*a) == bucket_of(*b)) {
            loop {
                let Some(swap) = marks.mark(run, at)? else {
                    break;
                };
                if marks.apply(swap)? {
                    break;
                }
            }
        }
        Ok(())
    }

    proptest! {
        /// Marking and pruning agree with a map of digest to newest time; digests share
        /// buckets often (the top bytes drawn from a few values).
        #[test]
        fn buckets_agree_with_a_map(
            steps in prop::collection::vec(
                (0u128..4, any::<u64>(), 0i64..100, any::<bool>()),
                1..200,
            ),
        ) {
            let db = db();
            let marks = HitMarks::open(&db)?;
            let mut model: BTreeMap<u128, i64> = BTreeMap::new();
            for (top, low, at, prune) in steps {
                let id = (top << 120) | u128::from(low);
                if prune {
                    let before = model.len();
                    model.retain(|_, t| *t >= at);
                    let removed = marks.prune(at, 0, apply)?;
                    prop_assert_eq!(removed, (before - model.len()) as u64);
                } else {
                    mark_all(&marks, &[id], at)?;
                    let t = model.entry(id).or_insert(at);
                    *t = (*t).max(at);
                }
                prop_assert_eq!(marks.contains(id)?, model.contains_key(&id));
            }
            for id in model.keys() {
                prop_assert!(marks.contains(*id)?);
            }
            prop_assert_eq!(marks.count()?.1, model.len());
        }
    }

    #[test]
    fn a_million_digests_make_at_most_65536_keys() -> sled::Result<()> {
        let db = db();
        let marks = HitMarks::open(&db)?;
        let ids: Vec<u128> = (0..200_000u128)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835))
            .collect();
        mark_all(&marks, &ids, 7)?;
        let (buckets, total) = marks.count()?;
        assert_eq!(total, ids.len());
        assert!(buckets <= 65_536, "{buckets} keys");
        assert!(
            ids.iter()
                .take(1000)
                .all(|id| marks.contains(*id).unwrap_or(false))
        );
        assert!(!marks.contains(12345)?);
        Ok(())
    }

    #[test]
    fn a_damaged_bucket_is_read_up_to_its_last_whole_mark_and_never_misread() -> sled::Result<()> {
        let db = db();
        let marks = HitMarks::open(&db)?;
        let ids = [1u128, 2, 3];
        mark_all(&marks, &ids, 5)?;
        let key = bucket_of(1);
        let mut value = marks.tree.get(key)?.map(|v| v.to_vec()).unwrap_or_default();
        value.truncate(value.len() - 3);
        marks.tree.insert(key, value)?;
        assert!(marks.contains(1)? && marks.contains(2)?);
        assert!(!marks.contains(3)?, "its mark was cut short");
        // Unsorted garbage of whole marks: never a panic, never a mark it does not hold.
        marks.tree.insert(key, vec![0xAB; MARK * 3])?;
        assert!(!marks.contains(1)?);
        // Marking again repairs the bucket.
        mark_all(&marks, &ids, 6)?;
        assert!(ids.iter().all(|id| marks.contains(*id).unwrap_or(false)));
        assert_eq!(
            marks.prune(6, 0, apply)?,
            1,
            "the garbage mark of time 0xABAB…, negative"
        );
        Ok(())
    }

    #[test]
    fn marks_of_an_earlier_release_are_read_pruned_and_taken_up() -> sled::Result<()> {
        let db = db();
        let marks = HitMarks::open(&db)?;
        let legacy: Vec<u128> = (0..(LEGACY_BATCH as u128 + 10)).map(|i| i << 100).collect();
        for (i, id) in legacy.iter().enumerate() {
            let value: Vec<u8> = if i == 0 {
                Vec::new()
            } else {
                100i64.to_be_bytes().to_vec()
            };
            marks.legacy().insert(id.to_be_bytes(), value)?;
        }
        assert!(
            marks.contains(legacy[5])?,
            "read where an earlier release wrote it"
        );
        assert_eq!(marks.take_up_legacy(500, apply)?, LEGACY_BATCH);
        assert!(marks.has_legacy());
        assert_eq!(marks.take_up_legacy(500, apply)?, 10);
        assert!(!marks.has_legacy());
        assert!(legacy.iter().all(|id| marks.contains(*id).unwrap_or(false)));
        // Taken up with their times: the one without a time took 500.
        assert_eq!(marks.prune(200, 0, apply)?, legacy.len() as u64 - 1);
        assert!(marks.contains(legacy[0])?);
        Ok(())
    }
}
