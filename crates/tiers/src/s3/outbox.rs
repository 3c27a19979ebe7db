//! What an outbox value holds: the envelope to upload, or a reference to the disk tier's copy.
//!
//! A put with S3 writes the envelope into L2 anyway; queueing a second copy of it cost a second
//! insert of a ~2 KB value into sled on the caller's path (~9 µs for such a value in a large
//! tree, ~1 µs for a small one). So the cache queues a reference, `@` and an 8-byte sequence
//! number, and the drain reads the envelope from L2. Envelopes begin with `STRA`, so the two
//! never mix up. The sequence number makes each queueing distinct: a drain removes the value
//! it uploaded only if it is still the same (compare and swap), so a newer put of the same key
//! queued meanwhile is uploaded too.
//!
//! No upload is lost to L2's bound: before evicting a copy that a reference points to, the disk
//! tier swaps the reference for the envelope (`DiskTier::keep_for_upload`). A copy removed for
//! being invalidated, expired or corrupt takes its upload with it: it must not reach S3.

use std::time::{SystemTime, UNIX_EPOCH};

const TAG: u8 = b'@';

/// The outbox value that refers to the disk copy, queued as number `seq`.
pub fn reference(seq: u64) -> [u8; 9] {
    let mut value = [TAG; 9];
    value[1..].copy_from_slice(&seq.to_be_bytes());
    value
}

/// Whether an outbox value is a reference (and not an envelope).
pub fn is_reference(value: &[u8]) -> bool {
    value.len() == 9 && value[0] == TAG
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
        assert_ne!(reference(1), reference(2));
        assert!(!is_reference(b"STRA\x02\x01\x00\x00"));
        assert!(!is_reference(&[TAG; 8]));
    }
}
