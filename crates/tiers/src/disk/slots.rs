//! The eviction index's table: every stored entry's [`Slot`] by id, packed for millions.
//!
//! A `HashMap<u128, Slot>` lays each pair out at 48 bytes (a `u128` is 16-aligned) in a table
//! at most 7/8 full, of a power-of-two size: a million slots took a table of 2^21 pairs, 96 MiB.
//! Here the pairs sit densely in one vector (40 bytes each, no holes) and the hash table holds
//! only their positions (4 bytes each): a million slots take 40 MiB of rows and 10 MiB of
//! table. Removing a slot moves the last row into its place and points the table at the move.

use std::hash::BuildHasher;

use hashbrown::HashTable;

use super::Slot;

/// One slot with its id, the id in two halves so that the row is 8-aligned (40 bytes, not 48).
#[derive(Clone, Copy)]
struct Row {
    id: [u64; 2],
    slot: Slot,
}

impl Row {
    fn id(&self) -> u128 {
        (u128::from(self.id[0]) << 64) | u128::from(self.id[1])
    }
}

fn halves(id: u128) -> [u64; 2] {
    // The high and the low half: the casts keep exactly the bits wanted.
    [(id >> 64) as u64, id as u64]
}

/// Slots by entry id: a map with the few operations the eviction index needs.
pub(super) struct SlotTable {
    rows: Vec<Row>,
    /// Positions in `rows`, hashed by the row's id.
    index: HashTable<u32>,
    /// Seeded per process: the ids come from request digests, which a caller chooses.
    hasher: foldhash::quality::RandomState,
}

impl SlotTable {
    /// An empty table.
    pub(super) fn new() -> Self {
        SlotTable {
            rows: Vec::new(),
            index: HashTable::new(),
            hasher: foldhash::quality::RandomState::default(),
        }
    }

    fn hash(&self, id: u128) -> u64 {
        self.hasher.hash_one(id)
    }

    /// Room for `additional` more slots, made at once (growing by doubling holds the old
    /// allocation and the new together).
    pub(super) fn reserve(&mut self, additional: usize) {
        self.rows.reserve_exact(additional);
        let (rows, hasher) = (&self.rows, &self.hasher);
        self.index
            .reserve(additional, |&at| hasher.hash_one(rows[at as usize].id()));
    }

    /// Slots held.
    pub(super) fn len(&self) -> usize {
        self.rows.len()
    }

    /// Removes every slot (keeping the room).
    pub(super) fn clear(&mut self) {
        self.rows.clear();
        self.index.clear();
    }

    fn position(&self, id: u128) -> Option<usize> {
        let rows = &self.rows;
        self.index
            .find(self.hash(id), |&at| rows[at as usize].id() == id)
            .map(|&at| at as usize)
    }

    /// The slot of `id`.
    pub(super) fn get(&self, id: &u128) -> Option<&Slot> {
        let at = self.position(*id)?;
        self.rows.get(at).map(|row| &row.slot)
    }

    /// The slot of `id`, to change in place.
    pub(super) fn get_mut(&mut self, id: &u128) -> Option<&mut Slot> {
        let at = self.position(*id)?;
        self.rows.get_mut(at).map(|row| &mut row.slot)
    }

    /// Whether `id` has a slot.
    pub(super) fn contains_key(&self, id: &u128) -> bool {
        self.position(*id).is_some()
    }

    /// Sets the slot of `id`; returns the one it replaced. A table of 2^32 − 1 slots takes no
    /// more (the entry is then stored but not counted: no disk tier comes near).
    pub(super) fn insert(&mut self, id: u128, slot: Slot) -> Option<Slot> {
        if let Some(at) = self.position(id) {
            return self
                .rows
                .get_mut(at)
                .map(|row| std::mem::replace(&mut row.slot, slot));
        }
        let at = u32::try_from(self.rows.len())
            .ok()
            .filter(|&at| at < u32::MAX)?;
        let hash = self.hash(id);
        self.rows.push(Row {
            id: halves(id),
            slot,
        });
        let (rows, hasher) = (&self.rows, &self.hasher);
        self.index
            .insert_unique(hash, at, |&at| hasher.hash_one(rows[at as usize].id()));
        None
    }

    /// Removes the slot of `id` and returns it.
    pub(super) fn remove(&mut self, id: &u128) -> Option<Slot> {
        let hash = self.hash(*id);
        let rows = &self.rows;
        let found = self
            .index
            .find_entry(hash, |&at| rows[at as usize].id() == *id)
            .ok()?;
        let (at, _) = found.remove();
        let at = at as usize;
        let removed = self.rows.swap_remove(at);
        // The last row moved into the hole: its position in the table follows it.
        if let Some(moved) = self.rows.get(at) {
            let from = self.rows.len() as u32;
            let hash = self.hash(moved.id());
            if let Some(position) = self.index.find_mut(hash, |&p| p == from) {
                *position = at as u32;
            }
        }
        Some(removed.slot)
    }

    /// Every slot with its id, in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u128, &Slot)> {
        self.rows.iter().map(|row| (row.id(), &row.slot))
    }

    /// Every slot, in no particular order.
    pub(super) fn values(&self) -> impl Iterator<Item = &Slot> {
        self.rows.iter().map(|row| &row.slot)
    }
}

/// `table[&id]`: the slot of `id`, which must be there (tests).
impl std::ops::Index<&u128> for SlotTable {
    type Output = Slot;

    fn index(&self, id: &u128) -> &Slot {
        self.get(id)
            .unwrap_or_else(|| panic!("no slot for {id:032x}"))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn slot(n: u64) -> Slot {
        Slot::placed(n, n % 100_000 + 16, n % 7, n % 1000 * 3)
    }

    #[test]
    fn a_row_is_forty_bytes() {
        assert_eq!(std::mem::size_of::<Row>(), 40);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u64),
        Remove(u8),
        Touch(u8, u64),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (any::<u8>(), any::<u64>()).prop_map(|(k, v)| Op::Insert(k, v)),
            6 => any::<u8>().prop_map(Op::Remove),
            3 => (any::<u8>(), any::<u64>()).prop_map(|(k, v)| Op::Touch(k, v)),
            1 => Just(Op::Clear),
        ]
    }

    /// Ids that differ in either half, and in both.
    fn id(k: u8) -> u128 {
        let k = u128::from(k);
        (k % 16) << 64 | (k / 16) | k << 120
    }

    proptest! {
        /// After any sequence of inserts, removals (each moving the last row), changes in
        /// place and clears, the table holds exactly what a `HashMap` given the same holds.
        #[test]
        fn the_table_holds_what_a_hash_map_holds(ops in proptest::collection::vec(op(), 0..400)) {
            let mut table = SlotTable::new();
            let mut model: HashMap<u128, (u64, u64)> = HashMap::new();
            let seen = |s: &Slot| (s.last_used_ms, s.bytes());
            for op in ops {
                match op {
                    Op::Insert(k, v) => {
                        let old = table.insert(id(k), slot(v)).map(|s| seen(&s));
                        prop_assert_eq!(old, model.insert(id(k), seen(&slot(v))));
                    }
                    Op::Remove(k) => {
                        let old = table.remove(&id(k)).map(|s| seen(&s));
                        prop_assert_eq!(old, model.remove(&id(k)));
                    }
                    Op::Touch(k, v) => {
                        if let Some(s) = table.get_mut(&id(k)) {
                            s.last_used_ms = v;
                        }
                        if let Some(m) = model.get_mut(&id(k)) {
                            m.0 = v;
                        }
                    }
                    Op::Clear => {
                        table.clear();
                        model.clear();
                    }
                }
                prop_assert_eq!(table.len(), model.len());
            }
            for k in 0..=255u8 {
                prop_assert_eq!(table.get(&id(k)).map(seen), model.get(&id(k)).copied());
                prop_assert_eq!(table.contains_key(&id(k)), model.contains_key(&id(k)));
            }
            let mut listed: Vec<(u128, (u64, u64))> = table.iter().map(|(i, s)| (i, seen(s))).collect();
            listed.sort_unstable();
            let mut expected: Vec<(u128, (u64, u64))> = model.into_iter().collect();
            expected.sort_unstable();
            prop_assert_eq!(listed, expected);
        }
    }
}
