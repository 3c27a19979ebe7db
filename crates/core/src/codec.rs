//! The envelope every stored entry travels in.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "STRA"
//! 4       1     format version (1)
//! 5       1     flags (bit 0: payload is zstd-compressed)
//! 6       2     reserved, zero
//! 8       4     uncompressed payload length, little endian
//! 12      4     CRC32 of bytes 0..12 and of the payload as stored, little endian
//! 16      ..    payload: the entry as JSON, zstd-compressed when longer than the threshold
//! ```
//!
//! The checksum covers the header too, so any single corrupted byte (indeed any burst of up to
//! 32 bits) is detected. Decoding never panics: every failure is a [`CodecError`].

use std::cell::RefCell;

use crate::entry::Entry;

/// First four bytes of every envelope.
pub const MAGIC: [u8; 4] = *b"STRA";
/// The envelope format this code writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 16;
/// Largest payload accepted when decoding.
pub const MAX_PAYLOAD: usize = 256 << 20;
const FLAG_ZSTD: u8 = 0b0000_0001;
const KNOWN_FLAGS: u8 = FLAG_ZSTD;

/// Why bytes could not be decoded into an entry (or an entry encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Fewer bytes than a header.
    #[error("envelope truncated: {len} bytes")]
    Truncated {
        /// Bytes present.
        len: usize,
    },
    /// Not an envelope.
    #[error("bad magic number")]
    BadMagic,
    /// Written by a newer (or unknown) format.
    #[error("unknown envelope version {0}")]
    UnknownVersion(u8),
    /// Flag bits this version does not define.
    #[error("unknown envelope flags {0:#04x}")]
    UnknownFlags(u8),
    /// The checksum does not match: the bytes are corrupt.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// CRC32 in the header.
        stored: u32,
        /// CRC32 of the bytes read.
        computed: u32,
    },
    /// The payload is larger than [`MAX_PAYLOAD`] or than the format can describe.
    #[error("payload of {0} bytes is too large")]
    TooLarge(usize),
    /// The payload's length disagrees with the header.
    #[error("payload length {actual} does not match header {expected}")]
    Length {
        /// Length in the header.
        expected: usize,
        /// Length found.
        actual: usize,
    },
    /// zstd failed.
    #[error("zstd: {0}")]
    Zstd(String),
    /// The payload is not a valid entry.
    #[error("entry JSON: {0}")]
    Json(String),
}

/// Encodes entries into envelopes and back, with zstd above a size threshold.
///
/// zstd contexts are created once per thread and reused: creating one costs more than
/// decompressing a typical entry.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    compress_above: usize,
    level: i32,
}

impl Default for Codec {
    fn default() -> Self {
        Codec::new(1024, 1)
    }
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

impl Codec {
    /// A codec that compresses payloads longer than `compress_above` bytes at zstd `level`.
    pub fn new(compress_above: usize, level: i32) -> Self {
        Codec {
            compress_above,
            level,
        }
    }

    /// Encodes `entry` into an envelope.
    pub fn encode(&self, entry: &Entry) -> Result<Vec<u8>, CodecError> {
        let json = serde_json::to_vec(entry).map_err(|e| CodecError::Json(e.to_string()))?;
        self.seal(&json)
    }

    /// Decodes an envelope into an entry.
    pub fn decode(&self, bytes: &[u8]) -> Result<Entry, CodecError> {
        let json = self.open(bytes)?;
        serde_json::from_slice(&json).map_err(|e| CodecError::Json(e.to_string()))
    }

    /// Wraps an arbitrary payload in an envelope.
    pub fn seal(&self, payload: &[u8]) -> Result<Vec<u8>, CodecError> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l as usize <= MAX_PAYLOAD)
            .ok_or(CodecError::TooLarge(payload.len()))?;
        let compressed;
        let (flags, stored) = if payload.len() > self.compress_above {
            compressed = self.compress(payload)?;
            (FLAG_ZSTD, compressed.as_slice())
        } else {
            (0, payload)
        };
        let mut out = Vec::with_capacity(HEADER_LEN + stored.len());
        out.extend_from_slice(&MAGIC);
        out.push(FORMAT_VERSION);
        out.push(flags);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&len.to_le_bytes());
        let crc = checksum(&out[..12], stored);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(stored);
        Ok(out)
    }

    /// Checks an envelope and returns its payload, decompressed.
    pub fn open(&self, bytes: &[u8]) -> Result<Vec<u8>, CodecError> {
        let Some((header, stored)) = bytes.split_first_chunk::<HEADER_LEN>() else {
            return Err(CodecError::Truncated { len: bytes.len() });
        };
        if header[..4] != MAGIC {
            return Err(CodecError::BadMagic);
        }
        let stored_crc = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
        let computed = checksum(&header[..12], stored);
        if stored_crc != computed {
            return Err(CodecError::Checksum {
                stored: stored_crc,
                computed,
            });
        }
        if header[4] != FORMAT_VERSION {
            return Err(CodecError::UnknownVersion(header[4]));
        }
        let flags = header[5];
        if flags & !KNOWN_FLAGS != 0 || header[6..8] != [0, 0] {
            return Err(CodecError::UnknownFlags(flags));
        }
        let expected = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        if expected > MAX_PAYLOAD {
            return Err(CodecError::TooLarge(expected));
        }
        let payload = if flags & FLAG_ZSTD != 0 {
            decompress(stored, expected)?
        } else {
            stored.to_vec()
        };
        if payload.len() != expected {
            return Err(CodecError::Length {
                expected,
                actual: payload.len(),
            });
        }
        Ok(payload)
    }

    fn compress(&self, payload: &[u8]) -> Result<Vec<u8>, CodecError> {
        COMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            let fresh = !matches!(&*slot, Some((level, _)) if *level == self.level);
            if fresh {
                let compressor = zstd::bulk::Compressor::new(self.level)
                    .map_err(|e| CodecError::Zstd(e.to_string()))?;
                *slot = Some((self.level, compressor));
            }
            match slot.as_mut() {
                Some((_, compressor)) => compressor
                    .compress(payload)
                    .map_err(|e| CodecError::Zstd(e.to_string())),
                None => Err(CodecError::Zstd("no compression context".into())),
            }
        })
    }
}

fn decompress(stored: &[u8], expected: usize) -> Result<Vec<u8>, CodecError> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot =
                Some(zstd::bulk::Decompressor::new().map_err(|e| CodecError::Zstd(e.to_string()))?);
        }
        match slot.as_mut() {
            Some(d) => d
                .decompress(stored, expected)
                .map_err(|e| CodecError::Zstd(e.to_string())),
            None => Err(CodecError::Zstd("no decompression context".into())),
        }
    })
}

fn checksum(header: &[u8], stored: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(header);
    hasher.update(stored);
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Normalizer, Scope, Tokens};
    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;
    use serde_json::json;
    use serde_json::value::RawValue;

    fn entry(response_text: &str) -> Entry {
        let request =
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]});
        let keyed = Normalizer::default()
            .key(&request, &Scope::User("u1".into()))
            .unwrap_or_else(|e| panic!("{e}"));
        let response =
            json!({"choices": [{"message": {"role": "assistant", "content": response_text}}]});
        let created = Utc
            .timestamp_millis_opt(1_767_225_600_000)
            .single()
            .unwrap_or_default();
        Entry {
            cache_id: keyed.key.hex(),
            cache_key: keyed.key.to_string(),
            request: RawValue::from_string(keyed.canonical.clone())
                .unwrap_or_else(|e| panic!("{e}")),
            response: serde_json::value::to_raw_value(&response).unwrap_or_else(|e| panic!("{e}")),
            model: keyed.model.clone(),
            provider: "openai".into(),
            tokens: Tokens {
                input: 12,
                output: 40,
            },
            cost: crate::Cost {
                input: 0.000_001_8,
                output: 0.000_024,
                total: 0.000_025_8,
            },
            latency_ms: 812,
            created_at: created,
            expires_at: Some(created + chrono::Duration::days(7)),
            tags: vec!["jobs:42".into()],
            scope: keyed.scope.clone(),
            hit_count: 3,
            last_accessed: created,
            epochs: [("model:gpt-4o-mini".to_string(), 2)].into_iter().collect(),
        }
    }

    fn assert_same(a: &Entry, b: &Entry) {
        assert_eq!(serde_json::to_string(a).ok(), serde_json::to_string(b).ok());
    }

    #[test]
    fn round_trips_small_and_compressed_entries() {
        let codec = Codec::default();
        for text in ["short", &"a long answer with some repetition. ".repeat(200)] {
            let e = entry(text);
            let bytes = codec.encode(&e).unwrap_or_else(|err| panic!("{err}"));
            let compressed = bytes[5] & FLAG_ZSTD != 0;
            assert_eq!(compressed, text.len() > 1000);
            let back = codec.decode(&bytes).unwrap_or_else(|err| panic!("{err}"));
            assert_same(&e, &back);
            assert_eq!(back.request.get(), e.request.get());
            assert!(
                back.answers(
                    &Normalizer::default()
                        .key(
                            &serde_json::from_str(e.request.get()).unwrap_or_default(),
                            &Scope::User("u1".into())
                        )
                        .unwrap_or_else(|err| panic!("{err}"))
                )
            );
        }
    }

    #[test]
    fn every_single_byte_corruption_is_an_error() {
        let codec = Codec::default();
        for text in ["short", &"compressible text ".repeat(100)] {
            let bytes = codec
                .encode(&entry(text))
                .unwrap_or_else(|err| panic!("{err}"));
            for i in 0..bytes.len() {
                for flip in [0x01u8, 0x80, 0xff, 0x5a] {
                    let mut bad = bytes.clone();
                    bad[i] ^= flip;
                    assert!(codec.decode(&bad).is_err(), "byte {i} ^ {flip:#x} decoded");
                }
            }
            for len in 0..bytes.len() {
                assert!(
                    codec.decode(&bytes[..len]).is_err(),
                    "truncated to {len} decoded"
                );
            }
        }
    }

    #[test]
    fn typed_errors_name_the_problem() {
        let codec = Codec::default();
        let good = codec
            .encode(&entry("x"))
            .unwrap_or_else(|err| panic!("{err}"));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(codec.decode(&bad).err(), Some(CodecError::BadMagic));
        assert!(matches!(
            codec.decode(&good[..3]),
            Err(CodecError::Truncated { len: 3 })
        ));
        let mut newer = codec.seal(b"{}").unwrap_or_else(|err| panic!("{err}"));
        newer[4] = 9;
        let crc = checksum(&newer[..12], &newer[16..]);
        newer[12..16].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            codec.decode(&newer).err(),
            Some(CodecError::UnknownVersion(9))
        );
        assert!(matches!(
            codec.decode(&codec.seal(b"[]").unwrap_or_default()),
            Err(CodecError::Json(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let codec = Codec::default();
            let _ = codec.decode(&bytes);
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = codec.decode(&with_magic);
        }
    }
}
