//! What an outbox value holds: the envelope to upload, or a reference to the disk tier's copy,
//! each with the number it was queued as.
//!
//! A put with S3 writes the envelope into L2 anyway; queueing a second copy of it cost a second
//! insert of a ~2 KB value into sled on the caller's path (~9 µs for such a value in a large
//! tree, ~1 µs for a small one). So the cache queues a reference, `@` and an 8-byte sequence
//! number, and the drain reads the envelope from L2. An envelope held in the outbox itself is
//! `E`, the sequence number, then the envelope (values written before the number was kept are
//! the envelope alone, `STRA…`: taken as queued first). The sequence number makes each queueing
//! distinct: a drain removes the value it uploaded only if it is still the same (compare and
//! swap), so a newer put of the same key queued meanwhile is uploaded too. It also orders the
//! queue by age, for dropping the oldest when the queue passes its bound.
//!
//! No upload is lost to L2's bound: before evicting a copy that a reference points to, the disk
//! tier swaps the reference for the envelope, keeping its number (`DiskTier::keep_for_upload`).
//! A copy removed for being invalidated, expired or corrupt takes its upload with it: it must
//! not reach S3.

use std::time::{SystemTime, UNIX_EPOCH};

const REFERENCE: u8 = b'@';
const HELD: u8 = b'E';
const PREFIX: usize = 9;

/// An outbox value, read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item<'a> {
    /// The disk tier's copy, queued as number `seq`.
    Reference {
        /// The queueing's number.
        seq: u64,
    },
    /// The envelope itself.
    Envelope {
        /// The queueing's number (0: written before numbers were kept).
        seq: u64,
        /// The envelope.
        envelope: &'a [u8],
    },
}

impl Item<'_> {
    /// The number the item was queued as: smaller is older.
    pub fn seq(&self) -> u64 {
        match self {
            Item::Reference { seq } | Item::Envelope { seq, .. } => *seq,
        }
    }
}

/// Reads an outbox value.
pub fn parse(value: &[u8]) -> Item<'_> {
    let seq = |v: &[u8]| {
        let mut n = [0; 8];
        n.copy_from_slice(&v[1..PREFIX]);
        u64::from_be_bytes(n)
    };
    match value.first() {
        Some(&REFERENCE) if value.len() == PREFIX => Item::Reference { seq: seq(value) },
        Some(&HELD) if value.len() > PREFIX => Item::Envelope {
            seq: seq(value),
            envelope: &value[PREFIX..],
        },
        _ => Item::Envelope {
            seq: 0,
            envelope: value,
        },
    }
}

/// The outbox value that refers to the disk copy, queued as number `seq`.
pub fn reference(seq: u64) -> [u8; PREFIX] {
    let mut value = [REFERENCE; PREFIX];
    value[1..].copy_from_slice(&seq.to_be_bytes());
    value
}

/// The outbox value that holds `envelope`, queued as number `seq`.
pub fn held(seq: u64, envelope: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(PREFIX + envelope.len());
    value.push(HELD);
    value.extend_from_slice(&seq.to_be_bytes());
    value.extend_from_slice(envelope);
    value
}

/// Where the envelope starts in a value [`parse`] read as [`Item::Envelope`].
pub fn envelope_offset(value: &[u8]) -> usize {
    match parse(value) {
        Item::Envelope { seq: 0, .. } => 0,
        _ => PREFIX,
    }
}

/// Whether an outbox value is a reference (and not an envelope).
pub fn is_reference(value: &[u8]) -> bool {
    matches!(parse(value), Item::Reference { .. })
}

/// Where a process starts numbering references: the clock in nanoseconds, so a restarted
/// process never reuses a number still in the outbox.
pub fn first_sequence() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_told_from_envelopes() {
        let r = reference(42);
        assert!(is_reference(&r));
        assert_eq!(parse(&r).seq(), 42);
        assert_ne!(reference(1), reference(2));
        assert!(!is_reference(b"STRA\x02\x01\x00\x00"));
        assert!(!is_reference(&[REFERENCE; 8]));
    }

    #[test]
    fn held_envelopes_keep_their_number_and_older_values_read_as_first() {
        let value = held(7, b"STRA-envelope");
        assert_eq!(
            parse(&value),
            Item::Envelope {
                seq: 7,
                envelope: b"STRA-envelope"
            }
        );
        assert_eq!(envelope_offset(&value), PREFIX);
        let older = b"STRA-older-envelope";
        assert_eq!(
            parse(older),
            Item::Envelope {
                seq: 0,
                envelope: older
            }
        );
        assert_eq!(envelope_offset(older), 0);
    }
}
