//! The disk tier's index: where each stored entry's envelope is in the value log, and when the
//! entry was last used, in sled, in buckets of a two-byte prefix of its id.
//!
//! sled 0.34 splits a leaf past 16 keys and keeps, for every page it ever wrote, a page-table
//! entry, the list of its fragments and their place in its segment accounting, whether the
//! page is cached or not. A key per entry made that bookkeeping grow with the entry count: at a
//! million entries, two trees of a million keys each (the pointers and the access records)
//! held about 100 MiB beyond the page cache, and an eviction index in memory 50 MiB more. Here
//! a tree holds at most 65,536 keys, each a bucket of records sorted by the rest of the id
//! (42 bytes each: 15 to a bucket at a million entries), and nothing per entry is kept in
//! memory: eviction, compaction and the byte count read the index by cursor.
//!
//! A bucket is changed by compare-and-swap on its whole value, so two changes of the same bucket
//! never lose one another. Its records are read as untrusted: a value whose length is not a
//! whole number of records loses its trailing part, and records are sorted on reading.

use super::vlog::Pointer;

/// The sled tree the index is kept in.
pub(super) const TREE: &str = "index";

/// Bytes of the id that name the bucket.
const PREFIX: usize = 2;
/// Bytes of the id a record holds (the rest).
const SUFFIX: usize = 16 - PREFIX;
/// Bytes of one record: the id's suffix, the pointer (segment, offset, length), the last use.
const RECORD: usize = SUFFIX + 8 + 8 + 4 + 8;

/// One stored entry, as the index holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Record {
    /// Where its envelope is.
    pub(super) pointer: Pointer,
    /// When it was last stored or read (ms since the Unix epoch).
    pub(super) last_used_ms: u64,
}

impl Record {
    /// Bytes the entry counts for: its envelope and 16.
    pub(super) fn bytes(&self) -> u64 {
        u64::from(self.pointer.len) + 16
    }
}

/// The key of the bucket `id` is in.
fn bucket_of(id: u128) -> [u8; PREFIX] {
    let bytes = id.to_be_bytes();
    [bytes[0], bytes[1]]
}

/// Whether `a` and `b` are in the same bucket.
pub(super) fn same_bucket(a: u128, b: u128) -> bool {
    bucket_of(a) == bucket_of(b)
}

/// The record in `chunk` (a record's bytes, its id's suffix first).
fn record_of(chunk: &[u8]) -> Option<Record> {
    let u64_at = |i: usize| {
        chunk
            .get(i..i + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    let len = chunk
        .get(SUFFIX + 16..SUFFIX + 20)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)?;
    Some(Record {
        pointer: Pointer {
            segment: u64_at(SUFFIX)?,
            offset: u64_at(SUFFIX + 8)?,
            len,
        },
        last_used_ms: u64_at(SUFFIX + 20)?,
    })
}

/// The records of a bucket value, by id, sorted; a trailing part shorter than a record is
/// dropped, and of two records of one id the later is kept.
fn decode(bucket: &[u8], value: &[u8]) -> Vec<(u128, Record)> {
    let mut records: Vec<(u128, Record)> = value
        .chunks_exact(RECORD)
        .filter_map(|chunk| {
            let mut id = [0u8; 16];
            id[..PREFIX].copy_from_slice(bucket.get(..PREFIX)?);
            id[PREFIX..].copy_from_slice(chunk.get(..SUFFIX)?);
            let record = record_of(chunk)?;
            Some((u128::from_be_bytes(id), record))
        })
        .collect();
    if !records.is_sorted_by_key(|(id, _)| *id) {
        records.sort_by_key(|(id, _)| *id);
    }
    // Keep the last of equal ids (a forged or damaged bucket may repeat one).
    records.dedup_by(|later, earlier| {
        if later.0 == earlier.0 {
            *earlier = *later;
            true
        } else {
            false
        }
    });
    records
}

/// The value of a bucket holding `records` (sorted by id, all in the bucket).
fn encode(records: &[(u128, Record)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.len() * RECORD);
    for (id, record) in records {
        out.extend_from_slice(&id.to_be_bytes()[PREFIX..]);
        out.extend_from_slice(&record.pointer.segment.to_le_bytes());
        out.extend_from_slice(&record.pointer.offset.to_le_bytes());
        out.extend_from_slice(&record.pointer.len.to_le_bytes());
        out.extend_from_slice(&record.last_used_ms.to_le_bytes());
    }
    out
}

/// The index: a sled tree of buckets.
#[derive(Clone)]
pub(super) struct Index {
    tree: sled::Tree,
}

impl Index {
    /// The index of the database `db`.
    pub(super) fn open(db: &sled::Db) -> sled::Result<Self> {
        Ok(Index {
            tree: db.open_tree(TREE)?,
        })
    }

    /// The record of `id`.
    pub(super) fn get(&self, id: u128) -> sled::Result<Option<Record>> {
        let bucket = bucket_of(id);
        let Some(value) = self.tree.get(bucket)? else {
            return Ok(None);
        };
        // Read in place, without decoding the bucket: of two records of the id (a damaged or
        // forged bucket), the later, as `decode` keeps.
        let suffix = &id.to_be_bytes()[PREFIX..];
        Ok(value
            .chunks_exact(RECORD)
            .rev()
            .find(|chunk| chunk.get(..SUFFIX) == Some(suffix))
            .and_then(record_of))
    }

    /// Changes `bucket` to what `change` makes of its records (sorted by id; `change` returns
    /// false to leave it as it is), by compare-and-swap of its whole value: `change` runs again
    /// on the new records when another change of the bucket came between.
    fn change_bucket(
        &self,
        bucket: [u8; PREFIX],
        mut change: impl FnMut(&mut Vec<(u128, Record)>) -> bool,
    ) -> sled::Result<()> {
        let mut current = self.tree.get(bucket)?;
        loop {
            let mut records = current
                .as_deref()
                .map(|value| decode(&bucket, value))
                .unwrap_or_default();
            if !change(&mut records) {
                return Ok(());
            }
            let value = (!records.is_empty()).then(|| encode(&records));
            match self.tree.compare_and_swap(bucket, current, value)? {
                Ok(()) => return Ok(()),
                Err(swap) => current = swap.current,
            }
        }
    }

    /// Changes the bucket of `id` to hold what `change` makes of its record (`None`: none),
    /// atomically: `change` may be called again when another change of the bucket came
    /// between. Returns the record before and after.
    pub(super) fn update(
        &self,
        id: u128,
        mut change: impl FnMut(Option<Record>) -> Option<Record>,
    ) -> sled::Result<(Option<Record>, Option<Record>)> {
        let (mut old, mut new) = (None, None);
        self.change_bucket(bucket_of(id), |records| {
            let at = records.binary_search_by_key(&id, |(at, _)| *at);
            old = at.ok().and_then(|at| records.get(at)).map(|(_, r)| *r);
            new = change(old);
            if old == new {
                return false;
            }
            match (at, new) {
                (Ok(at), Some(record)) => {
                    if let Some(slot) = records.get_mut(at) {
                        slot.1 = record;
                    }
                }
                (Ok(at), None) => {
                    records.remove(at);
                }
                (Err(at), Some(record)) => records.insert(at, (id, record)),
                (Err(_), None) => {}
            }
            true
        })?;
        Ok((old, new))
    }

    /// Adds `records` (sorted by id, all of one bucket) to their bucket, replacing records
    /// of the same ids: for bulk loads (migrating an older database, salvage).
    pub(super) fn put_all(&self, records: &[(u128, Record)]) -> sled::Result<()> {
        let Some((first, _)) = records.first() else {
            return Ok(());
        };
        let bucket = bucket_of(*first);
        self.change_bucket(bucket, |merged| {
            for (id, record) in records {
                if bucket_of(*id) != bucket {
                    continue;
                }
                match merged.binary_search_by_key(id, |(at, _)| *at) {
                    Ok(at) => {
                        if let Some(slot) = merged.get_mut(at) {
                            slot.1 = *record;
                        }
                    }
                    Err(at) => merged.insert(at, (*id, *record)),
                }
            }
            true
        })
    }

    /// Sets the last use of each `(id, ms)` that has a record, unless it was used later: one
    /// write per bucket. `uses` is sorted here.
    pub(super) fn set_last_uses(&self, uses: &mut [(u128, u64)]) -> sled::Result<()> {
        uses.sort_unstable();
        for group in uses.chunk_by(|a, b| bucket_of(a.0) == bucket_of(b.0)) {
            let Some((first, _)) = group.first() else {
                continue;
            };
            self.change_bucket(bucket_of(*first), |records| {
                let mut changed = false;
                for (id, ms) in group {
                    if let Ok(at) = records.binary_search_by_key(id, |(at, _)| *at)
                        && let Some(slot) = records.get_mut(at)
                        && slot.1.last_used_ms < *ms
                    {
                        slot.1.last_used_ms = *ms;
                        changed = true;
                    }
                }
                changed
            })?;
        }
        Ok(())
    }

    /// Every record, in id order, after `after` (from the start when `None`), read bucket by
    /// bucket: a walk holds one bucket in memory, and sees changes made meanwhile in buckets
    /// it has not reached yet.
    pub(super) fn iter_after(&self, after: Option<u128>) -> Iter {
        let start = after.map_or([0; PREFIX], bucket_of);
        Iter {
            buckets: self.tree.range(start..),
            current: Vec::new().into_iter(),
            after,
        }
    }

    /// Every record, in id order ([`Index::iter_after`] from the start).
    pub(super) fn iter(&self) -> Iter {
        self.iter_after(None)
    }

    /// Removes every record.
    pub(super) fn clear(&self) -> sled::Result<()> {
        self.tree.clear()
    }
}

/// A walk of the index ([`Index::iter_after`]).
pub(super) struct Iter {
    buckets: sled::Iter,
    current: std::vec::IntoIter<(u128, Record)>,
    after: Option<u128>,
}

impl Iterator for Iter {
    type Item = sled::Result<(u128, Record)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((id, record)) = self.current.next() {
                if self.after.is_some_and(|after| id <= after) {
                    continue;
                }
                return Some(Ok((id, record)));
            }
            let (bucket, value) = match self.buckets.next()? {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e)),
            };
            if bucket.len() != PREFIX {
                continue;
            }
            self.current = decode(&bucket, &value).into_iter();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn record(n: u64) -> Record {
        Record {
            pointer: Pointer {
                segment: n % 7,
                offset: n.wrapping_mul(3),
                len: (n % 1000) as u32,
            },
            last_used_ms: n,
        }
    }

    /// Ids that share buckets and differ in either part.
    fn id(k: u8) -> u128 {
        (u128::from(k % 3) << 120) | (u128::from(k) << 40) | u128::from(k / 5)
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(u8, u64),
        Remove(u8),
        Touch(Vec<(u8, u64)>),
        PutAll(u8, Vec<(u8, u64)>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (any::<u8>(), any::<u64>()).prop_map(|(k, v)| Op::Set(k, v)),
            4 => any::<u8>().prop_map(Op::Remove),
            2 => proptest::collection::vec((any::<u8>(), any::<u64>()), 0..20).prop_map(Op::Touch),
            1 => (any::<u8>(), proptest::collection::vec((any::<u8>(), any::<u64>()), 0..10))
                .prop_map(|(b, v)| Op::PutAll(b, v)),
        ]
    }

    proptest! {
        /// Whatever sequence of changes, the index holds what a map given the same holds, and
        /// walks it in id order from any point.
        #[test]
        fn the_index_holds_what_a_map_holds(ops in proptest::collection::vec(op(), 0..120)) {
            let db = sled::Config::new().temporary(true).open().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let index = Index::open(&db).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut model: BTreeMap<u128, Record> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Set(k, v) => {
                        let (old, new) = index.update(id(k), |_| Some(record(v))).map_err(|e| TestCaseError::fail(e.to_string()))?;
                        prop_assert_eq!(old, model.insert(id(k), record(v)));
                        prop_assert_eq!(new, Some(record(v)));
                    }
                    Op::Remove(k) => {
                        let (old, new) = index.update(id(k), |_| None).map_err(|e| TestCaseError::fail(e.to_string()))?;
                        prop_assert_eq!(old, model.remove(&id(k)));
                        prop_assert_eq!(new, None);
                    }
                    Op::Touch(uses) => {
                        let mut uses: Vec<(u128, u64)> = uses.into_iter().map(|(k, ms)| (id(k), ms)).collect();
                        for (i, ms) in &uses {
                            if let Some(r) = model.get_mut(i) {
                                r.last_used_ms = r.last_used_ms.max(*ms);
                            }
                        }
                        index.set_last_uses(&mut uses).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    }
                    Op::PutAll(b, list) => {
                        // Records of one bucket, sorted, as a bulk load gives them.
                        let list: Vec<(u128, Record)> = list
                            .into_iter()
                            .map(|(k, v)| (id(k) & !(u128::MAX << 120) | u128::from(b % 3) << 120, record(v)))
                            .collect::<BTreeMap<_, _>>()
                            .into_iter()
                            .collect();
                        for (i, r) in &list {
                            model.insert(*i, *r);
                        }
                        index.put_all(&list).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    }
                }
            }
            for k in 0..=255u8 {
                prop_assert_eq!(index.get(id(k)).map_err(|e| TestCaseError::fail(e.to_string()))?, model.get(&id(k)).copied());
            }
            let walked: Vec<(u128, Record)> = index.iter().collect::<Result<_, _>>().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let expected: Vec<(u128, Record)> = model.iter().map(|(i, r)| (*i, *r)).collect();
            prop_assert_eq!(&walked, &expected);
            if let Some((mid, _)) = expected.get(expected.len() / 2) {
                let rest: Vec<(u128, Record)> = index.iter_after(Some(*mid)).collect::<Result<_, _>>().map_err(|e| TestCaseError::fail(e.to_string()))?;
                let expected_rest: Vec<(u128, Record)> = model.range(mid + 1..).map(|(i, r)| (*i, *r)).collect();
                prop_assert_eq!(rest, expected_rest);
            }
        }
    }

    /// A bucket value that is not whole records, unsorted and repeating an id (damage, or a
    /// forged file) is read as the whole records it holds, in order, one per id.
    #[test]
    fn a_damaged_bucket_is_read_as_its_whole_records() {
        let bucket = [0u8, 7];
        let at = |low: u128| (7u128 << 112) | low;
        let mut value = encode(&[(at(5), record(5))]);
        value.extend(encode(&[(at(2), record(2))]));
        value.extend(encode(&[(at(5), record(9))]));
        value.extend_from_slice(&[1, 2, 3]);
        let read = decode(&bucket, &value);
        assert_eq!(read, vec![(at(2), record(2)), (at(5), record(9))]);
    }
}
