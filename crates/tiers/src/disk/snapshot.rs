//! The eviction index's snapshot: every entry's size, last use and value-log segment, written to
//! one file when the tier closes, so that the next open reads that file instead of a million
//! access records from sled (which also pages every leaf of the `access` tree into memory).
//!
//! It is only ever read when it matches the database: the file carries a token, and the same
//! token is set in the `meta` tree once the file is durable, as the last write of the closing
//! handle. Opening takes the token out (and flushes) before anything else can write, so a
//! snapshot never stands for a database that changed after it; without the token, or when the
//! file does not hold up (magic, length, count, checksum), opening reads the access records as
//! before. The file is deleted once read.
//!
//! Format: `SSN2`, the 16-byte token, the record count (u64), the records (48 bytes each: the
//! id as 16 big-endian bytes, then last use in ms, bytes counted, segment and offset in the
//! segment (`u64::MAX`: not known), little-endian u64s), then a CRC32 of everything before it.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

/// The snapshot's file in the tier's directory.
pub(super) const FILE: &str = "slots.snapshot";
/// Where it is written before it is renamed into place.
pub(super) const TEMPORARY: &str = ".slots.snapshot.new";
/// The key in `meta` holding the token of the snapshot that matches the database.
pub(super) const META_KEY: &[u8] = b"slots-snapshot/v1";

const MAGIC: &[u8; 4] = b"SSN2";
const HEADER: u64 = 4 + 16 + 8;
const RECORD: u64 = 48;

/// One entry as the eviction index holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Record {
    pub id: u128,
    pub last_used_ms: u64,
    pub bytes: u64,
    pub segment: u64,
    pub offset: u64,
}

/// A token for a new snapshot: unique to this process and moment (it identifies, it does not
/// authenticate: whoever can write the directory can write the database too).
pub(super) fn new_token() -> [u8; 16] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    (nanos ^ (u128::from(std::process::id()) << 96)).to_be_bytes()
}

/// Writes `count` records to the snapshot file of `dir` under `token`, durably (synced, then
/// renamed into place, then the directory synced).
pub(super) fn write(
    dir: &Path,
    token: &[u8; 16],
    count: u64,
    records: impl Iterator<Item = Record>,
) -> std::io::Result<()> {
    let temporary = dir.join(TEMPORARY);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(&temporary)?;
    let mut out = BufWriter::with_capacity(1 << 18, file);
    let mut crc = crc32fast::Hasher::new();
    let mut put = |out: &mut BufWriter<std::fs::File>, bytes: &[u8]| {
        crc.update(bytes);
        out.write_all(bytes)
    };
    put(&mut out, MAGIC)?;
    put(&mut out, token)?;
    put(&mut out, &count.to_le_bytes())?;
    let mut written = 0u64;
    for record in records {
        let mut bytes = [0u8; RECORD as usize];
        bytes[..16].copy_from_slice(&record.id.to_be_bytes());
        bytes[16..24].copy_from_slice(&record.last_used_ms.to_le_bytes());
        bytes[24..32].copy_from_slice(&record.bytes.to_le_bytes());
        bytes[32..40].copy_from_slice(&record.segment.to_le_bytes());
        bytes[40..].copy_from_slice(&record.offset.to_le_bytes());
        put(&mut out, &bytes)?;
        written += 1;
    }
    if written != count {
        return Err(std::io::Error::other(format!(
            "{written} records written where {count} were announced"
        )));
    }
    out.write_all(&crc.finalize().to_le_bytes())?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    std::fs::rename(&temporary, dir.join(FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Reads the snapshot file of `dir` if it carries `token` and holds up, passing each record to
/// `each`; at most `max_count` records are accepted. Returns why not otherwise: the caller then
/// drops what `each` was given and reads the access records.
pub(super) fn read(
    dir: &Path,
    token: &[u8],
    max_count: u64,
    mut each: impl FnMut(Record),
) -> Result<u64, String> {
    let path = dir.join(FILE);
    let file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let length = file.metadata().map_err(|e| e.to_string())?.len();
    let mut input = BufReader::with_capacity(1 << 18, file);
    let mut crc = crc32fast::Hasher::new();
    let mut take = |input: &mut BufReader<std::fs::File>, bytes: &mut [u8]| {
        input
            .read_exact(bytes)
            .map_err(|e| format!("reading the snapshot: {e}"))?;
        crc.update(bytes);
        Ok::<(), String>(())
    };
    let mut header = [0u8; HEADER as usize];
    take(&mut input, &mut header)?;
    if &header[..4] != MAGIC {
        return Err("not a snapshot (magic)".into());
    }
    if &header[4..20] != token {
        return Err("a snapshot of another state of the database (token)".into());
    }
    let mut count = [0u8; 8];
    count.copy_from_slice(&header[20..]);
    let count = u64::from_le_bytes(count);
    if count > max_count {
        return Err(format!("{count} records, more than the tier can hold"));
    }
    if count
        .checked_mul(RECORD)
        .and_then(|b| b.checked_add(HEADER + 4))
        != Some(length)
    {
        return Err(format!("{length} bytes do not hold {count} records"));
    }
    let mut bytes = [0u8; RECORD as usize];
    let u64_at = |b: &[u8; RECORD as usize], at: usize| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(word)
    };
    for _ in 0..count {
        take(&mut input, &mut bytes)?;
        let mut id = [0u8; 16];
        id.copy_from_slice(&bytes[..16]);
        each(Record {
            id: u128::from_be_bytes(id),
            last_used_ms: u64_at(&bytes, 16),
            bytes: u64_at(&bytes, 24),
            segment: u64_at(&bytes, 32),
            offset: u64_at(&bytes, 40),
        });
    }
    let expected = crc.finalize();
    let mut stored = [0u8; 4];
    input
        .read_exact(&mut stored)
        .map_err(|e| format!("reading the snapshot's checksum: {e}"))?;
    if u32::from_le_bytes(stored) != expected {
        return Err("the checksum does not match".into());
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(n: u64) -> Vec<Record> {
        (0..n)
            .map(|i| Record {
                id: u128::from(i) * 0x1_0000_0001,
                last_used_ms: 1_700_000_000_000 + i,
                bytes: 100 + i,
                segment: i % 3,
                offset: if i % 5 == 0 { u64::MAX } else { i * 7 },
            })
            .collect()
    }

    fn read_all(dir: &Path, token: &[u8], max: u64) -> Result<Vec<Record>, String> {
        let mut out = Vec::new();
        read(dir, token, max, |r| out.push(r))?;
        Ok(out)
    }

    #[test]
    fn what_is_written_reads_back_under_its_token_only() {
        let dir = tempfile::tempdir().unwrap();
        let token = new_token();
        let written = records(1000);
        write(dir.path(), &token, 1000, written.iter().copied()).unwrap();
        assert!(!dir.path().join(TEMPORARY).exists());
        assert_eq!(read_all(dir.path(), &token, 1000).unwrap(), written);
        let other = new_token();
        assert!(
            read_all(dir.path(), &other, 1000)
                .unwrap_err()
                .contains("token")
        );
        // More records than the tier could hold: refused before any is read.
        assert!(
            read_all(dir.path(), &token, 999)
                .unwrap_err()
                .contains("more than")
        );
    }

    #[test]
    fn a_damaged_or_cut_snapshot_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let token = new_token();
        write(dir.path(), &token, 50, records(50).into_iter()).unwrap();
        let path = dir.path().join(FILE);
        let whole = std::fs::read(&path).unwrap();
        // A flipped bit in a record: the checksum.
        let mut flipped = whole.clone();
        flipped[HEADER as usize + 17] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert!(
            read_all(dir.path(), &token, 100)
                .unwrap_err()
                .contains("checksum")
        );
        // Cut short, or a count the length does not hold: refused before reading records.
        std::fs::write(&path, &whole[..whole.len() - 49]).unwrap();
        assert!(
            read_all(dir.path(), &token, 100)
                .unwrap_err()
                .contains("do not hold")
        );
        let mut inflated = whole.clone();
        inflated[20..28].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &inflated).unwrap();
        assert!(read_all(dir.path(), &token, u64::MAX).is_err());
        // Not a snapshot at all.
        std::fs::write(&path, b"SSN1 and then some").unwrap();
        assert!(read_all(dir.path(), &token, 100).is_err());
        // And whole again: read.
        std::fs::write(&path, &whole).unwrap();
        assert_eq!(read_all(dir.path(), &token, 100).unwrap().len(), 50);
    }
}
