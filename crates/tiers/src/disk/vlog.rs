//! The value log: envelopes kept in append-only segment files beside sled, which holds only a
//! small pointer per entry.
//!
//! sled 0.34 stores a value of a few KB inline in its leaves, keeps the leaves it touched
//! resident far beyond its page cache, rewrites them as deltas and reclaims a segment only once
//! it is half dead: at a million entries that was 700 MiB of RSS, 2.1× the payload on disk,
//! and a disk-tier hit that paged in a whole leaf for one value (BENCHMARKS.md, "Scale").
//! Here a value is read with one positioned read into a buffer of its own size, the operating
//! system's page cache (not the process) holds what is hot, and dead records are reclaimed by
//! copying a segment's live records forward and deleting the file.
//!
//! A segment is `values/{number:016x}.vlog`; numbers come from sled's `generate_id`, so they
//! never repeat, even after every segment was deleted. A record is a 32-byte header, then the
//! envelope:
//!
//! ```text
//! 0   4   magic "SVL1"
//! 4  16   the entry's digest (big endian), checked against the key it is read for
//! 20  4   envelope length (little endian)
//! 24  4   last hit: seconds since the Unix epoch (little endian), 0 for never
//! 28  4   CRC32 of bytes 0..24 and four zero bytes
//! ```
//!
//! The last hit is the one field written after the record: a disk-tier hit writes it in place
//! (one positioned write of 4 bytes, [`ValueLog::mark_hit`]) when it holds an earlier second,
//! so a hit changes nothing in sled (at a million entries, hits that rewrote index buckets cost
//! the process 20–40 MiB and a third of a disk-tier hit: BENCHMARKS.md). The CRC leaves it out
//! (records written before it was used held zero there, so their CRC is the same): any value it
//! holds is only ever a time, read as untrusted, which eviction and the cold-entry report use and
//! nothing served depends on.
//!
//! The envelope carries its own checksum (and MAC or tag under a key); the header's CRC makes
//! a damaged header, or a pointer to the wrong place, a refusal rather than a misread.
//! Nothing here is trusted more than sled's bytes were: a record that does not check out is an
//! error the disk tier treats as a damaged entry (a miss, counted, the entry removed).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

/// The directory of the segments, inside the disk tier's.
pub(crate) const DIR: &str = "values";

const RECORD_MAGIC: [u8; 4] = *b"SVL1";
const POINTER_MAGIC: [u8; 4] = *b"SVP1";
/// Bytes of a record's header.
pub(crate) const HEADER: u64 = 32;
/// Bytes of an encoded [`Pointer`].
const POINTER_LEN: usize = 24;
/// The largest envelope a record may declare: the codec's largest payload, and some.
const MAX_RECORD: u64 = (strata_core::codec::MAX_PAYLOAD as u64) + (1 << 20);

/// Where an envelope is: segment, offset of its record, envelope length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pointer {
    pub(crate) segment: u64,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

impl Pointer {
    /// The bytes sled stores for this pointer.
    #[cfg(test)]
    pub(crate) fn encode(&self) -> [u8; POINTER_LEN] {
        let mut out = [0; POINTER_LEN];
        out[..4].copy_from_slice(&POINTER_MAGIC);
        out[4..12].copy_from_slice(&self.segment.to_le_bytes());
        out[12..20].copy_from_slice(&self.offset.to_le_bytes());
        out[20..24].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// A pointer from what sled stores; `None` for an envelope stored inline (databases
    /// written before the value log) or anything else.
    pub(crate) fn decode(stored: &[u8]) -> Option<Pointer> {
        let bytes = <&[u8; POINTER_LEN]>::try_from(stored).ok()?;
        if bytes[..4] != POINTER_MAGIC {
            return None;
        }
        let u64_at = |i: usize| {
            u64::from_le_bytes([
                bytes[i],
                bytes[i + 1],
                bytes[i + 2],
                bytes[i + 3],
                bytes[i + 4],
                bytes[i + 5],
                bytes[i + 6],
                bytes[i + 7],
            ])
        };
        Some(Pointer {
            segment: u64_at(4),
            offset: u64_at(12),
            len: u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]),
        })
    }
}

/// Why a record could not be read back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The segment is not there (deleted after its records were moved, or lost).
    #[error("value segment {0:016x} is missing")]
    Missing(u64),
    /// The bytes at the pointer are not the record it promises.
    #[error("value record damaged: {0}")]
    Damaged(String),
    /// Reading failed.
    #[error("reading a value segment: {0}")]
    Io(#[from] std::io::Error),
}

/// Where a record's last hit is, from the start of its header.
const LAST_HIT_AT: u64 = 24;

/// The CRC of a header: its first 24 bytes, then the last hit's 4 bytes as zero.
fn header_crc(header: &[u8; HEADER as usize]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[..LAST_HIT_AT as usize]);
    hasher.update(&[0; 4]);
    hasher.finalize()
}

fn record_header(id: u128, len: u32, last_hit: u32) -> [u8; HEADER as usize] {
    let mut header = [0; HEADER as usize];
    header[..4].copy_from_slice(&RECORD_MAGIC);
    header[4..20].copy_from_slice(&id.to_be_bytes());
    header[20..24].copy_from_slice(&len.to_le_bytes());
    header[24..28].copy_from_slice(&last_hit.to_le_bytes());
    let crc = header_crc(&header);
    header[28..].copy_from_slice(&crc.to_le_bytes());
    header
}

/// The digest, envelope length and last hit (seconds) a header holds, if it checks out.
fn parse_header(header: &[u8; HEADER as usize]) -> Option<(u128, u32, u32)> {
    if header[..4] != RECORD_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes([header[28], header[29], header[30], header[31]]);
    if header_crc(header) != crc {
        return None;
    }
    let id = u128::from_be_bytes(<[u8; 16]>::try_from(&header[4..20]).ok()?);
    let len = u32::from_le_bytes([header[20], header[21], header[22], header[23]]);
    let last_hit = u32::from_le_bytes([header[24], header[25], header[26], header[27]]);
    Some((id, len, last_hit))
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:016x}.vlog"))
}

/// The segment a file name is, if it is one.
fn segment_of(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".vlog")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// The segment appends go to.
struct Head {
    segment: u64,
    file: Arc<File>,
    len: u64,
}

/// The segments of one disk tier. Appends are serialized; reads are positioned and concurrent.
pub(crate) struct ValueLog {
    dir: PathBuf,
    /// Segments past this size are sealed and a new one started.
    segment_bytes: u64,
    /// Numbers for new segments (none: read only).
    db: Option<sled::Db>,
    /// Open handles, by segment; sealed segments are opened at their first read.
    files: RwLock<HashMap<u64, Arc<File>>>,
    /// Sealed segments and their lengths.
    sealed: Mutex<HashMap<u64, u64>>,
    head: Mutex<Option<Head>>,
    /// Segments sealed since the last [`ValueLog::sync`], still to be synced.
    unsynced: Mutex<Vec<Arc<File>>>,
    /// Bytes of every segment file together.
    total: AtomicU64,
}

impl ValueLog {
    /// Opens the segments under `{tier}/values` (creating the directory, owner only). No
    /// segment is read: their lengths come from the directory. Appends always start a new
    /// segment, so a record cut short by a crash stays at the end of its file.
    pub(crate) fn open(tier: &Path, db: sled::Db, segment_bytes: u64) -> std::io::Result<Self> {
        let dir = tier.join(DIR);
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&dir)?;
        let mut sealed = HashMap::new();
        let mut total = 0;
        for item in std::fs::read_dir(&dir)? {
            let item = item?;
            let Some(segment) = segment_of(&item.file_name().to_string_lossy()) else {
                continue;
            };
            let len = item.metadata()?.len();
            total += len;
            sealed.insert(segment, len);
        }
        Ok(ValueLog {
            dir,
            segment_bytes,
            db: Some(db),
            files: RwLock::new(HashMap::new()),
            sealed: Mutex::new(sealed),
            head: Mutex::new(None),
            unsynced: Mutex::new(Vec::new()),
            total: AtomicU64::new(total),
        })
    }

    /// Opens the segments of a directory moved aside, to read them only.
    pub(crate) fn read_only(tier: &Path) -> Self {
        let dir = tier.join(DIR);
        ValueLog {
            dir,
            segment_bytes: u64::MAX,
            db: None,
            files: RwLock::new(HashMap::new()),
            sealed: Mutex::new(HashMap::new()),
            head: Mutex::new(None),
            unsynced: Mutex::new(Vec::new()),
            total: AtomicU64::new(0),
        }
    }

    /// Bytes of every segment file together.
    pub(crate) fn total(&self) -> u64 {
        self.total.load(Relaxed)
    }

    /// The size past which a segment is sealed.
    pub(crate) fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    /// Appends `envelope` as the record of `id`, never hit; returns where it is.
    pub(crate) fn append(&self, id: u128, envelope: &[u8]) -> std::io::Result<Pointer> {
        self.append_hit(id, envelope, 0)
    }

    /// Appends `envelope` as the record of `id`, last hit at `last_hit` (seconds; compaction
    /// carries it over); returns where it is.
    pub(crate) fn append_hit(
        &self,
        id: u128,
        envelope: &[u8],
        last_hit: u32,
    ) -> std::io::Result<Pointer> {
        let len = u32::try_from(envelope.len())
            .ok()
            .filter(|&len| u64::from(len) <= MAX_RECORD)
            .ok_or_else(|| std::io::Error::other("value too large for the value log"))?;
        let mut record = Vec::with_capacity(HEADER as usize + envelope.len());
        record.extend_from_slice(&record_header(id, len, last_hit));
        record.extend_from_slice(envelope);
        let mut head = self.head.lock().unwrap_or_else(PoisonError::into_inner);
        let full = head
            .as_ref()
            .is_some_and(|h| h.len > 0 && h.len + record.len() as u64 > self.segment_bytes);
        if head.is_none() || full {
            self.start_segment(&mut head)?;
        }
        let Some(h) = head.as_mut() else {
            return Err(std::io::Error::other("no value segment to append to"));
        };
        let offset = h.len;
        if let Err(e) = h.file.write_all_at(&record, offset) {
            // What was written of it is dead bytes at the end; the next append goes past them.
            if let Ok(meta) = h.file.metadata() {
                let len = meta.len().max(h.len);
                self.total.fetch_add(len - h.len, Relaxed);
                h.len = len;
            }
            return Err(e);
        }
        h.len += record.len() as u64;
        self.total.fetch_add(record.len() as u64, Relaxed);
        Ok(Pointer {
            segment: h.segment,
            offset,
            len,
        })
    }

    /// Seals the head (if any) and creates a new one.
    fn start_segment(&self, head: &mut Option<Head>) -> std::io::Result<()> {
        self.seal(head);
        let Some(db) = &self.db else {
            return Err(std::io::Error::other("a value log opened to read only"));
        };
        let segment = db.generate_id().map_err(std::io::Error::other)?;
        let path = segment_path(&self.dir, segment);
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create_new(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = Arc::new(options.open(&path)?);
        self.files
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(segment, Arc::clone(&file));
        *head = Some(Head {
            segment,
            file,
            len: 0,
        });
        Ok(())
    }

    fn seal(&self, head: &mut Option<Head>) {
        if let Some(old) = head.take() {
            self.sealed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(old.segment, old.len);
            self.unsynced
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(old.file);
        }
    }

    /// Seals the head: the next append starts a new segment, and the old head can be compacted.
    pub(crate) fn rotate(&self) {
        let mut head = self.head.lock().unwrap_or_else(PoisonError::into_inner);
        self.seal(&mut head);
    }

    /// Writes what was appended to disk: the segments sealed since the last sync and the head.
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        let sealed =
            std::mem::take(&mut *self.unsynced.lock().unwrap_or_else(PoisonError::into_inner));
        for file in sealed {
            file.sync_data()?;
        }
        let head = self
            .head
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|h| Arc::clone(&h.file));
        if let Some(file) = head {
            file.sync_data()?;
        }
        Ok(())
    }

    fn file(&self, segment: u64) -> Result<Arc<File>, ReadError> {
        if let Some(file) = self
            .files
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&segment)
        {
            return Ok(Arc::clone(file));
        }
        // Opened to write as well, for the last hits (`mark_hit`), unless the log is read only.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(self.db.is_some())
            .open(segment_path(&self.dir, segment));
        let file = match opened {
            Ok(file) => Arc::new(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ReadError::Missing(segment));
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Arc::clone(
            self.files
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(segment)
                .or_insert(file),
        ))
    }

    /// The envelope `pointer` refers to, checked to be the record of `id` with that length.
    /// The buffer is allocated only once the header vouches for its length, which is checked
    /// against the file's.
    pub(crate) fn read(&self, id: u128, pointer: &Pointer) -> Result<Vec<u8>, ReadError> {
        self.read_hit(id, pointer).map(|(envelope, _)| envelope)
    }

    /// [`ValueLog::read`], with the record's last hit (seconds since the epoch, 0 for never).
    pub(crate) fn read_hit(
        &self,
        id: u128,
        pointer: &Pointer,
    ) -> Result<(Vec<u8>, u32), ReadError> {
        let (file, last_hit) = self.checked_header(id, pointer)?;
        let len = pointer.len;
        let start = pointer.offset + HEADER;
        if u64::from(len) > MAX_RECORD
            || (len > 1 << 20 && start + u64::from(len) > file.metadata()?.len())
        {
            return Err(ReadError::Damaged("record longer than its segment".into()));
        }
        let mut envelope = vec![0; len as usize];
        file.read_exact_at(&mut envelope, start)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    ReadError::Damaged("the record is cut short".into())
                }
                _ => ReadError::Io(e),
            })?;
        Ok((envelope, last_hit))
    }

    /// The last hit (seconds since the epoch, 0 for never) of the record of `id` at `pointer`,
    /// read from its header alone.
    pub(crate) fn last_hit(&self, id: u128, pointer: &Pointer) -> Result<u32, ReadError> {
        self.checked_header(id, pointer)
            .map(|(_, last_hit)| last_hit)
    }

    /// The segment `pointer` is in and the last hit of the record there, once its header
    /// checks out as the record of `id` with the pointer's length.
    fn checked_header(&self, id: u128, pointer: &Pointer) -> Result<(Arc<File>, u32), ReadError> {
        let file = self.file(pointer.segment)?;
        let mut header = [0; HEADER as usize];
        file.read_exact_at(&mut header, pointer.offset)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    ReadError::Damaged("the pointer is past the end of its segment".into())
                }
                _ => ReadError::Io(e),
            })?;
        let Some((stored_id, len, last_hit)) = parse_header(&header) else {
            return Err(ReadError::Damaged("bad record header".into()));
        };
        if stored_id != id || len != pointer.len {
            return Err(ReadError::Damaged(
                "the record is not the one the pointer names".into(),
            ));
        }
        Ok((file, last_hit))
    }

    /// Writes `seconds` as the last hit of the record at `pointer`, in place: 4 bytes, outside
    /// the header's CRC. The caller has just read that record's header through `pointer`. A
    /// log opened to read only ([`ValueLog::read_only`]) writes nothing.
    pub(crate) fn mark_hit(&self, pointer: &Pointer, seconds: u32) -> Result<(), ReadError> {
        if self.db.is_none() {
            return Ok(());
        }
        let file = self.file(pointer.segment)?;
        file.write_all_at(&seconds.to_le_bytes(), pointer.offset + LAST_HIT_AT)?;
        Ok(())
    }

    /// Sealed segments with their lengths.
    pub(crate) fn sealed(&self) -> Vec<(u64, u64)> {
        self.sealed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(&s, &l)| (s, l))
            .collect()
    }

    /// Reads the record headers of a sealed segment in order, calling `each` with the
    /// pointer and digest of each. Stops at the end, or at a record cut short at the end (a
    /// crash mid-append). Returns `false` if a header does not check out before the end: the
    /// segment's later records cannot be found, and it must not be deleted.
    pub(crate) fn scan(
        &self,
        segment: u64,
        mut each: impl FnMut(Pointer, u128) -> std::io::Result<()>,
    ) -> std::io::Result<bool> {
        let file = match self.file(segment) {
            Ok(file) => file,
            Err(ReadError::Io(e)) => return Err(e),
            Err(_) => return Ok(true),
        };
        let size = file.metadata()?.len();
        let mut offset = 0u64;
        let mut header = [0; HEADER as usize];
        // Positioned reads of the headers alone: the handle is shared, its cursor is not used.
        while offset + HEADER <= size {
            file.read_exact_at(&mut header, offset)?;
            let Some((id, len, _)) = parse_header(&header) else {
                return Ok(false);
            };
            let end = offset + HEADER + u64::from(len);
            if end > size {
                // Cut short by a crash: the last record, never pointed to as complete.
                return Ok(true);
            }
            each(
                Pointer {
                    segment,
                    offset,
                    len,
                },
                id,
            )?;
            offset = end;
        }
        Ok(true)
    }

    /// Deletes a sealed segment.
    pub(crate) fn remove(&self, segment: u64) -> std::io::Result<()> {
        let len = self
            .sealed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&segment);
        self.files
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&segment);
        if let Some(len) = len {
            self.total.fetch_sub(len.min(self.total()), Relaxed);
        }
        match std::fs::remove_file(segment_path(&self.dir, segment)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Deletes every segment, the head included: for a clear, once no pointer refers to any.
    pub(crate) fn remove_all(&self) -> std::io::Result<()> {
        self.rotate();
        for (segment, _) in self.sealed() {
            self.remove(segment)?;
        }
        self.unsynced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(dir: &Path, segment_bytes: u64) -> ValueLog {
        let db = sled::Config::new()
            .path(dir.join("db"))
            .open()
            .unwrap_or_else(|e| panic!("{e}"));
        ValueLog::open(dir, db, segment_bytes).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A log in `dir` holding "first" as the record of 1 and "second" as that of 2.
    fn two_records(dir: &Path) -> (ValueLog, Pointer, Pointer) {
        let values = log(dir, 1 << 20);
        let a = values.append(1, b"first").unwrap_or_else(|e| panic!("{e}"));
        let b = values
            .append(2, b"second")
            .unwrap_or_else(|e| panic!("{e}"));
        (values, a, b)
    }

    /// The last hit is written in place, outside the CRC: a record keeps reading back whatever
    /// it holds there, its neighbours are untouched, and a header written before the field was
    /// used (its CRC over 28 bytes, the last four zero) checks out as one never hit.
    #[test]
    fn a_last_hit_is_written_in_place_outside_the_crc() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let (values, a, b) = two_records(dir.path());
        assert_eq!(values.last_hit(1, &a).ok(), Some(0));
        for seconds in [1_700_000_000, u32::MAX, 5] {
            values
                .mark_hit(&a, seconds)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                values.read_hit(1, &a).ok(),
                Some((b"first".to_vec(), seconds))
            );
            assert_eq!(values.last_hit(1, &a).ok(), Some(seconds));
            assert_eq!(values.read_hit(2, &b).ok(), Some((b"second".to_vec(), 0)));
        }
        // The last hit of another record's pointer is refused like its envelope.
        assert!(matches!(values.last_hit(2, &a), Err(ReadError::Damaged(_))));
        let mut earlier = [0u8; HEADER as usize];
        earlier[..4].copy_from_slice(&RECORD_MAGIC);
        earlier[4..20].copy_from_slice(&7u128.to_be_bytes());
        earlier[20..24].copy_from_slice(&100u32.to_le_bytes());
        let crc = crc32fast::hash(&earlier[..28]);
        earlier[28..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(earlier, record_header(7, 100, 0));
        assert_eq!(parse_header(&earlier), Some((7, 100, 0)));
        // Read only, nothing is written.
        let read_only = ValueLog::read_only(dir.path());
        read_only.mark_hit(&b, 9).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(values.last_hit(2, &b).ok(), Some(0));
    }

    #[test]
    fn a_record_reads_back_only_for_its_own_digest_and_length() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let (values, a, b) = two_records(dir.path());
        assert_eq!(values.read(1, &a).ok(), Some(b"first".to_vec()));
        assert_eq!(values.read(2, &b).ok(), Some(b"second".to_vec()));
        assert_eq!(Pointer::decode(&a.encode()), Some(a));
        // Another key's record, a wrong length, a wrong offset, past the end: refused.
        assert!(matches!(values.read(2, &a), Err(ReadError::Damaged(_))));
        let longer = Pointer {
            len: a.len + 1,
            ..a
        };
        assert!(matches!(
            values.read(1, &longer),
            Err(ReadError::Damaged(_))
        ));
        let inside = Pointer {
            offset: a.offset + 1,
            ..a
        };
        assert!(matches!(
            values.read(1, &inside),
            Err(ReadError::Damaged(_))
        ));
        let past = Pointer {
            offset: 1 << 30,
            ..a
        };
        assert!(matches!(values.read(1, &past), Err(ReadError::Damaged(_))));
        let gone = Pointer {
            segment: a.segment + 100,
            ..a
        };
        assert!(matches!(values.read(1, &gone), Err(ReadError::Missing(_))));
        // An envelope stored inline is not a pointer.
        assert_eq!(Pointer::decode(b"STRA and the rest of an envelope"), None);
    }

    #[test]
    fn a_forged_length_allocates_nothing_and_a_flipped_header_bit_is_refused() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let values = log(dir.path(), 1 << 20);
        let a = values
            .append(7, &[1; 100])
            .unwrap_or_else(|e| panic!("{e}"));
        values.rotate();
        let path = segment_path(&dir.path().join(DIR), a.segment);
        // A header, CRC and all, that declares 200 MiB in a file of a few bytes.
        let mut bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
        bytes[..HEADER as usize].copy_from_slice(&record_header(7, 200 << 20, 0));
        std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("{e}"));
        let values = log_reopened(dir.path(), values);
        let forged = Pointer {
            len: 200 << 20,
            ..a
        };
        assert!(matches!(
            values.read(7, &forged),
            Err(ReadError::Damaged(_))
        ));
        // One bit of the header flipped.
        bytes[..HEADER as usize].copy_from_slice(&record_header(7, 100, 0));
        bytes[10] ^= 0x04;
        std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(values.read(7, &a), Err(ReadError::Damaged(_))));
    }

    fn log_reopened(dir: &Path, old: ValueLog) -> ValueLog {
        let ValueLog { db, .. } = old;
        let Some(db) = db else { panic!("writable") };
        ValueLog::open(dir, db, 1 << 20).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_scan_stops_at_a_record_cut_short_and_refuses_a_damaged_header() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let values = log(dir.path(), 1 << 20);
        let pointers: Vec<Pointer> = (0..5u128)
            .map(|i| {
                values
                    .append(i, &vec![i as u8; 1000])
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        values.rotate();
        let segment = pointers[0].segment;
        let path = segment_path(&dir.path().join(DIR), segment);
        // A crash mid-append: half a record at the end.
        let mut bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
        bytes.extend_from_slice(&record_header(9, 1000, 0));
        bytes.extend_from_slice(&[9; 500]);
        std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("{e}"));
        let values = log_reopened(dir.path(), values);
        let mut seen = Vec::new();
        let complete = values
            .scan(segment, |pointer, id| {
                seen.push((pointer, id));
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(complete);
        let expected: Vec<(Pointer, u128)> = pointers.iter().copied().zip(0..5u128).collect();
        assert_eq!(seen, expected);
        // A damaged header in the middle: the walk cannot go on, and says so.
        bytes[pointers[2].offset as usize + 5] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("{e}"));
        let mut seen = 0;
        let complete = values
            .scan(segment, |_, _| {
                seen += 1;
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!complete);
        assert_eq!(seen, 2);
    }

    #[test]
    fn segments_are_sealed_at_their_size_and_numbered_never_twice() {
        let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        let values = log(dir.path(), 4096);
        let pointers: Vec<Pointer> = (0..10u128)
            .map(|i| {
                values
                    .append(i, &[0; 1000])
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        let mut segments: Vec<u64> = pointers.iter().map(|p| p.segment).collect();
        segments.dedup();
        assert!(segments.len() >= 3, "{segments:?}");
        assert_eq!(values.total(), 10 * (1000 + HEADER));
        values.remove_all().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(values.total(), 0);
        let after = values.append(0, b"x").unwrap_or_else(|e| panic!("{e}"));
        assert!(segments.iter().all(|&s| s < after.segment));
    }
}
