//! The envelope every stored entry travels in.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "STRA"
//! 4       1     format version (3; 2 is still read)
//! 5       1     flags (bit 0: payload is zstd-compressed; bit 1: with the built-in dictionary)
//! 6       2     reserved, zero
//! 8       4     uncompressed payload length, little endian
//! 12      4     CRC32 of bytes 0..12 and of the payload as stored, little endian
//! 16      ..    payload, zstd-compressed when longer than the threshold
//! ```
//!
//! The payload holds the entry in three sections, so that reading it back scans only the small
//! one:
//!
//! ```text
//! 0       4     length R of the canonical request, little endian
//! 4       4     length S of the response, little endian
//! 8       R     the canonical request text (UTF-8)
//! 8+R     S     the response, JSON as the provider returned it
//! 8+R+S   ..    every other field of the entry (the metadata), binary
//! ```
//!
//! The metadata, in this order (integers little endian; a string is its length as a `u32`,
//! then its UTF-8 bytes; a time is milliseconds since the Unix epoch as an `i64`):
//!
//! ```text
//! cache_id, cache_key, model, provider      4 strings
//! tokens input, output                      2 × u64
//! cost input, output, total                 3 × f64
//! latency_ms                                u64
//! created_at                                time
//! expires_at                                u8 (0: never, 1: a time follows), time
//! tags                                      u32 count, then the strings
//! scope                                     u8 (0 global, 1 namespace, 2 user, 3 session), then
//!                                           the id string unless global
//! hit_count                                 u64
//! last_accessed                             time
//! epochs                                    u32 count, then (string, u64) pairs
//! ```
//!
//! Format 2 held the metadata as one JSON object; its envelopes still decode. Reading the
//! binary form back takes a fraction of what parsing the JSON did, on every L2 and L3 hit.
//!
//! Compressed payloads use a zstd dictionary built into strata ([`DICTIONARY`]), trained on LLM
//! exchanges in this payload layout: the JSON structure every entry repeats (canonical request
//! members, response envelope, metadata names) then costs a few bytes instead of its spelling
//! out in each entry. On the example workload it takes the ratio at the default level from 1.7
//! to 2.3 (see BENCHMARKS.md). Envelopes written without it (flag bit 1 clear) still decode.
//!
//! The checksum covers the header too, so any single corrupted byte (indeed any burst of up to
//! 32 bits) is detected. Decoding never panics: every failure is a [`CodecError`].

use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::entry::{Cost, Entry, JsonText, Tokens};
use crate::scope::Scope;
use chrono::{DateTime, Utc};

use crate::keys::{KeyError, Keyring, MAC_LEN};
use zstd::zstd_safe::CParameter;

/// First four bytes of every envelope.
pub const MAGIC: [u8; 4] = *b"STRA";
/// The envelope format this code writes and reads without a key.
pub const FORMAT_VERSION: u8 = 3;
/// The envelope format written under a key ([`Keyring`]): after the header, the 16 bytes of the
/// cache id the envelope belongs to, then the body (the stored payload, or its encryption:
/// a nonce, the ciphertext and its tag), then (when authenticated, not encrypted) a 32-byte MAC
/// over the header, the cache id and the body. Header bytes 6–7 hold the key's id.
pub const FORMAT_KEYED: u8 = 4;
/// Length of the cache id after a keyed envelope's header.
const BINDING_LEN: usize = 16;
/// The previous format (JSON metadata), still decoded.
const FORMAT_JSON_METADATA: u8 = 2;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 16;
/// Largest payload accepted when decoding.
pub const MAX_PAYLOAD: usize = 256 << 20;
/// The most a compressed payload may expand by. A stored frame that declares more is refused
/// before anything is allocated for it: a few kilobytes of zstd can describe hundreds of
/// megabytes of one repeated byte. LLM exchanges compress 2–4×; a payload that compresses
/// beyond this is written uncompressed, so every envelope this codec writes it also reads.
pub const MAX_EXPANSION: usize = 64;
/// Below this, a declared payload is taken whatever its ratio (allocating it costs nothing).
const EXPANSION_FLOOR: usize = 1 << 20;
const FLAG_ZSTD: u8 = 0b0000_0001;
/// A keyed envelope carries a MAC.
const FLAG_MAC: u8 = 0b0000_0100;
/// A keyed envelope's body is encrypted (AES-256-GCM).
const FLAG_ENCRYPTED: u8 = 0b0000_1000;
const FLAG_DICTIONARY: u8 = 0b0000_0010;
const KNOWN_FLAGS: u8 = FLAG_ZSTD | FLAG_DICTIONARY;
const KNOWN_KEYED_FLAGS: u8 = KNOWN_FLAGS | FLAG_MAC | FLAG_ENCRYPTED;

/// The zstd dictionary compressed payloads are written with: 16 KiB trained by
/// `cargo run --release --example train_dictionary` on exchanges of `../shared/data` (those of
/// `examples/` left out, so benchmarks on them measure unseen data). Changing it is a format
/// change: envelopes written with one dictionary cannot be read with another (zstd checks the
/// dictionary's id and decoding fails, so a mismatch is an error, never a wrong answer).
pub static DICTIONARY: &[u8] = include_bytes!("../dict/exchanges-v1.zdict");

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
    /// The stored bytes could not be read back (a damaged or missing value-log record).
    #[error("unreadable: {0}")]
    Unreadable(String),
    /// Under a key: the envelope is not sealed (or sealed with a key not held), its MAC or tag
    /// does not match, or it says it belongs to another cache id.
    #[error("not authentic: {0}")]
    Unauthentic(String),
}

/// Encodes entries into envelopes and back, with zstd above a size threshold.
///
/// zstd contexts (with the dictionary loaded) are created once per thread and reused: creating
/// one costs more than decompressing a typical entry.
#[derive(Debug, Clone)]
pub struct Codec {
    compress_above: usize,
    level: i32,
    dictionary: bool,
    /// With keys, every envelope is sealed (a MAC, or encryption) and only sealed ones are
    /// read.
    keys: Option<std::sync::Arc<Keyring>>,
    /// Reads envelopes written without a key too (for `rekey`, over this node's own disk).
    accept_unsealed: bool,
}

/// Payloads longer than this are compressed by default.
pub const DEFAULT_COMPRESS_ABOVE: usize = 1024;
/// The default zstd level: a fast one, whose entries decode faster than at any positive level
/// (BENCHMARKS.md).
pub const DEFAULT_LEVEL: i32 = -1;

impl Default for Codec {
    fn default() -> Self {
        Codec::new(DEFAULT_COMPRESS_ABOVE, DEFAULT_LEVEL)
    }
}

/// The shortest match zstd looks for at the fast (negative) levels, which store literals raw:
/// there a match of 5 or 6 bytes saves a byte or two and costs a sequence to decode. On the
/// example entries 7 (zstd's default is 5) decodes about a fifth faster for a ratio of 2.3
/// instead of 2.6 (`examples/codec_levels.rs` sweeps both settings; numbers in BENCHMARKS.md).
pub const FAST_MIN_MATCH: u32 = 7;
/// log2 of the match table's size at the fast levels: 14 instead of zstd's 13 for inputs this
/// small gets back most of the ratio a minimum match of 7 gives up.
pub const FAST_HASH_LOG: u32 = 14;

/// A compression context of one thread, for one level, with or without the dictionary.
type CompressorSlot = Option<((i32, bool), zstd::bulk::Compressor<'static>)>;

thread_local! {
    static COMPRESSOR: RefCell<CompressorSlot> = const { RefCell::new(None) };
    /// Decompression contexts: `[without, with]` the dictionary.
    static DECOMPRESSORS: RefCell<[Option<zstd::bulk::Decompressor<'static>>; 2]> =
        const { RefCell::new([None, None]) };
    /// Where payloads are decompressed before their sections are copied out: a decode then
    /// allocates only what the entry keeps.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A scratch buffer grown past this by a large payload is given back after use.
const SCRATCH_KEPT: usize = 1 << 20;

impl Codec {
    /// A codec that compresses payloads longer than `compress_above` bytes at zstd `level`,
    /// with the built-in dictionary.
    pub fn new(compress_above: usize, level: i32) -> Self {
        Codec {
            compress_above,
            level,
            dictionary: true,
            keys: None,
            accept_unsealed: false,
        }
    }

    /// The same codec sealing every envelope under `keys` (authenticated, and encrypted if the
    /// keyring says so), and reading only envelopes sealed under one of them.
    pub fn with_keys(mut self, keys: std::sync::Arc<Keyring>) -> Self {
        self.keys = Some(keys);
        self
    }

    /// The keys, if any.
    pub fn keys(&self) -> Option<&Keyring> {
        self.keys.as_deref()
    }

    /// Whether `bytes` is an envelope sealed under this codec's current key (and so needs no
    /// rewriting by `rekey`). Checks the header only.
    pub fn sealed_with_current_key(&self, bytes: &[u8]) -> bool {
        let Some(keys) = &self.keys else {
            return false;
        };
        let encrypted = bytes.get(5).is_some_and(|f| f & FLAG_ENCRYPTED != 0);
        bytes.get(4) == Some(&FORMAT_KEYED)
            && bytes.get(6..8) == Some(&keys.current().id().to_le_bytes()[..])
            && encrypted == keys.encrypts()
    }

    /// The same codec, also reading envelopes written without a key: for `rekey`, which
    /// rewrites a node's own entries under its key.
    pub fn accepting_unsealed(mut self) -> Self {
        self.accept_unsealed = true;
        self
    }

    /// The same codec, compressing with the built-in dictionary or without it. Decoding reads
    /// both kinds whatever this says.
    pub fn with_dictionary(mut self, dictionary: bool) -> Self {
        self.dictionary = dictionary;
        self
    }

    /// Encodes `entry` into an envelope.
    pub fn encode(&self, entry: &Entry) -> Result<Vec<u8>, CodecError> {
        let request = entry.request.as_bytes();
        let response = entry.response.get().as_bytes();
        let too_large = |n: usize| u32::try_from(n).map_err(|_| CodecError::TooLarge(n));
        let mut payload = Vec::with_capacity(8 + request.len() + response.len() + 512);
        payload.extend_from_slice(&too_large(request.len())?.to_le_bytes());
        payload.extend_from_slice(&too_large(response.len())?.to_le_bytes());
        payload.extend_from_slice(request);
        payload.extend_from_slice(response);
        write_metadata(&mut payload, entry)?;
        let binding = cache_id_bytes(&entry.cache_id).unwrap_or_default();
        self.seal_bound(&payload, binding)
    }

    /// Decodes an envelope into an entry, checking that its response is JSON: for envelopes
    /// read from storage other nodes write to.
    pub fn decode(&self, bytes: &[u8]) -> Result<Entry, CodecError> {
        self.decode_checking(bytes, true)
    }

    /// Decodes an envelope this node wrote (into its own disk tier), whose response was checked
    /// as JSON before it was written: the checksum vouches for the bytes, and the response is
    /// not parsed again ([`JsonText`]). Everything else is checked as [`Codec::decode`] does.
    pub fn decode_local(&self, bytes: &[u8]) -> Result<Entry, CodecError> {
        self.decode_checking(bytes, false)
    }

    fn decode_checking(&self, bytes: &[u8], check_response: bool) -> Result<Entry, CodecError> {
        let mut binding = None;
        let entry = self.open_with(bytes, &mut binding, |version, payload| {
            Self::entry_of(version, payload, check_response)
        })?;
        // A sealed envelope names its entry: one moved to another key's place is refused.
        if let Some(bound) = binding
            && cache_id_bytes(&entry.cache_id) != Some(bound)
        {
            return Err(CodecError::Unauthentic(
                "sealed for another cache id".into(),
            ));
        }
        Ok(entry)
    }

    /// Reads an entry out of a payload (the layout is in the module's documentation).
    fn entry_of(version: u8, payload: &[u8], check_response: bool) -> Result<Entry, CodecError> {
        let length = |at: usize| {
            payload
                .get(at..at + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(|b| u32::from_le_bytes(b) as usize)
        };
        let sections = length(0).zip(length(4)).and_then(|(r, s)| {
            let request = payload.get(8..8 + r)?;
            let response = payload.get(8 + r..8 + r + s)?;
            let metadata = payload.get(8 + r + s..)?;
            Some((request, response, metadata))
        });
        let Some((request, response, metadata)) = sections else {
            return Err(CodecError::Json("sections overrun the payload".into()));
        };
        let text = |bytes: &[u8], what: &str| {
            utf8(bytes)
                .map(str::to_owned)
                .map_err(|e| CodecError::Json(format!("{what}: {e}")))
        };
        let request = text(request, "request")?;
        let response = text(response, "response")?;
        let response = if check_response {
            JsonText::parse(response).map_err(|e| CodecError::Json(format!("response: {e}")))?
        } else {
            JsonText::checked_when_written(response)
        };
        if version == FORMAT_JSON_METADATA {
            let mut entry: Entry =
                serde_json::from_slice(metadata).map_err(|e| CodecError::Json(e.to_string()))?;
            entry.request = request;
            entry.response = response;
            Ok(entry)
        } else {
            read_metadata(metadata, request, response)
        }
    }

    /// Wraps an arbitrary payload in an envelope (under a key, bound to no cache id).
    pub fn seal(&self, payload: &[u8]) -> Result<Vec<u8>, CodecError> {
        self.seal_bound(payload, [0; BINDING_LEN])
    }

    /// Wraps a payload in an envelope; under a key, bound to the cache id `binding`.
    fn seal_bound(
        &self,
        payload: &[u8],
        binding: [u8; BINDING_LEN],
    ) -> Result<Vec<u8>, CodecError> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l as usize <= MAX_PAYLOAD)
            .ok_or(CodecError::TooLarge(payload.len()))?;
        let compressed;
        let (flags, stored) = if payload.len() > self.compress_above {
            compressed = self.compress(payload)?;
            if expansion_allowed(compressed.len()) < payload.len() {
                (0, payload)
            } else {
                let dictionary = if self.dictionary { FLAG_DICTIONARY } else { 0 };
                (FLAG_ZSTD | dictionary, compressed.as_slice())
            }
        } else {
            (0, payload)
        };
        let Some(keys) = &self.keys else {
            let mut out = Vec::with_capacity(HEADER_LEN + stored.len());
            out.extend_from_slice(&MAGIC);
            out.push(FORMAT_VERSION);
            out.push(flags);
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&len.to_le_bytes());
            let crc = checksum(&out[..12], stored);
            out.extend_from_slice(&crc.to_le_bytes());
            out.extend_from_slice(stored);
            return Ok(out);
        };
        let key = keys.current();
        let flags = flags
            | if keys.encrypts() {
                FLAG_ENCRYPTED
            } else {
                FLAG_MAC
            };
        let mut head = Vec::with_capacity(12 + BINDING_LEN);
        head.extend_from_slice(&MAGIC);
        head.push(FORMAT_KEYED);
        head.push(flags);
        head.extend_from_slice(&key.id().to_le_bytes());
        head.extend_from_slice(&len.to_le_bytes());
        head.extend_from_slice(&binding);
        let mut rest = if keys.encrypts() {
            key.encrypt(stored, &head)
        } else {
            stored.to_vec()
        };
        if !keys.encrypts() {
            let mac = key.mac(&[&head, &rest]);
            rest.extend_from_slice(&mac);
        }
        let mut out = Vec::with_capacity(HEADER_LEN + BINDING_LEN + rest.len());
        out.extend_from_slice(&head[..12]);
        let mut after = Vec::with_capacity(BINDING_LEN + rest.len());
        after.extend_from_slice(&binding);
        after.extend_from_slice(&rest);
        let crc = checksum(&out[..12], &after);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&after);
        Ok(out)
    }

    /// Checks an envelope and returns its payload, decompressed.
    pub fn open(&self, bytes: &[u8]) -> Result<Vec<u8>, CodecError> {
        self.open_with(bytes, &mut None, |_, payload| Ok(payload.to_vec()))
    }

    /// Checks an envelope and hands its format version and payload to `read`: the stored bytes
    /// themselves when they are not compressed, else this thread's scratch buffer.
    fn open_with<T>(
        &self,
        bytes: &[u8],
        binding: &mut Option<[u8; BINDING_LEN]>,
        read: impl FnOnce(u8, &[u8]) -> Result<T, CodecError>,
    ) -> Result<T, CodecError> {
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
        let version = header[4];
        if version != FORMAT_VERSION && version != FORMAT_JSON_METADATA && version != FORMAT_KEYED {
            return Err(CodecError::UnknownVersion(version));
        }
        let flags = header[5];
        let dictionary_without_zstd = flags & FLAG_DICTIONARY != 0 && flags & FLAG_ZSTD == 0;
        let opened;
        let stored = if version == FORMAT_KEYED {
            let sealing = flags & (FLAG_MAC | FLAG_ENCRYPTED);
            if flags & !KNOWN_KEYED_FLAGS != 0
                || dictionary_without_zstd
                || sealing == 0
                || sealing == FLAG_MAC | FLAG_ENCRYPTED
            {
                return Err(CodecError::UnknownFlags(flags));
            }
            let (bound, body) = self.unseal(header, stored, flags)?;
            *binding = Some(bound);
            opened = body;
            opened.as_slice()
        } else {
            if flags & !KNOWN_FLAGS != 0 || dictionary_without_zstd || header[6..8] != [0, 0] {
                return Err(CodecError::UnknownFlags(flags));
            }
            if self.keys.is_some() && !self.accept_unsealed {
                return Err(CodecError::Unauthentic(
                    "written without a key, and this node requires one".into(),
                ));
            }
            stored
        };
        let expected = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        if expected > MAX_PAYLOAD {
            return Err(CodecError::TooLarge(expected));
        }
        let length_checked = |payload: &[u8]| {
            if payload.len() == expected {
                read(version, payload)
            } else {
                Err(CodecError::Length {
                    expected,
                    actual: payload.len(),
                })
            }
        };
        if flags & FLAG_ZSTD == 0 {
            return length_checked(stored);
        }
        if expected > expansion_allowed(stored.len()) {
            return Err(CodecError::TooLarge(expected));
        }
        SCRATCH.with(|cell| {
            // Taken out of the cell, so that a `read` that decodes again cannot find it
            // borrowed; it goes back unless a large payload grew it.
            let mut scratch = std::mem::take(&mut *cell.borrow_mut());
            let result = decompress(stored, expected, flags & FLAG_DICTIONARY != 0, &mut scratch)
                .and_then(|()| length_checked(&scratch));
            if scratch.capacity() <= SCRATCH_KEPT {
                *cell.borrow_mut() = scratch;
            }
            result
        })
    }

    /// Checks a keyed envelope's MAC, or decrypts its body, under the key its header names:
    /// returns the cache id it is bound to and the stored payload.
    fn unseal(
        &self,
        header: &[u8; HEADER_LEN],
        rest: &[u8],
        flags: u8,
    ) -> Result<([u8; BINDING_LEN], Vec<u8>), CodecError> {
        let Some(keys) = &self.keys else {
            return Err(CodecError::Unauthentic(
                "sealed with a key, and this node holds none".into(),
            ));
        };
        let Some((bound, body)) = rest.split_first_chunk::<BINDING_LEN>() else {
            return Err(CodecError::Truncated { len: rest.len() });
        };
        let id = u16::from_le_bytes([header[6], header[7]]);
        let mut head = Vec::with_capacity(12 + BINDING_LEN);
        head.extend_from_slice(&header[..12]);
        head.extend_from_slice(bound);
        let mut keys = keys.with_id(id).peekable();
        if keys.peek().is_none() {
            return Err(CodecError::Unauthentic(
                KeyError::UnknownKey(id).to_string(),
            ));
        }
        for key in keys {
            if flags & FLAG_ENCRYPTED != 0 {
                if let Ok(plain) = key.decrypt(body, &head) {
                    return Ok((*bound, plain));
                }
            } else if let Some((stored, mac)) = body.split_last_chunk::<MAC_LEN>()
                && key.verify(&[&head, stored], mac)
            {
                return Ok((*bound, stored.to_vec()));
            }
        }
        Err(CodecError::Unauthentic(KeyError::Forged.to_string()))
    }

    fn compress(&self, payload: &[u8]) -> Result<Vec<u8>, CodecError> {
        let wanted = (self.level, self.dictionary);
        COMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            let fresh = !matches!(&*slot, Some((made, _)) if *made == wanted);
            if fresh {
                let dictionary = if self.dictionary { DICTIONARY } else { &[] };
                let mut compressor =
                    zstd::bulk::Compressor::with_dictionary(self.level, dictionary)
                        .map_err(|e| CodecError::Zstd(e.to_string()))?;
                if self.level < 0 {
                    for parameter in [
                        CParameter::MinMatch(FAST_MIN_MATCH),
                        CParameter::HashLog(FAST_HASH_LOG),
                    ] {
                        compressor
                            .set_parameter(parameter)
                            .map_err(|e| CodecError::Zstd(e.to_string()))?;
                    }
                }
                *slot = Some((wanted, compressor));
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

/// Writes every field of an [`Entry`] but the request and the response: the payload's
/// metadata section (the layout is in the module's documentation).
fn write_metadata(out: &mut Vec<u8>, entry: &Entry) -> Result<(), CodecError> {
    fn count(n: usize) -> Result<[u8; 4], CodecError> {
        u32::try_from(n)
            .map(u32::to_le_bytes)
            .map_err(|_| CodecError::TooLarge(n))
    }
    fn string(out: &mut Vec<u8>, s: &str) -> Result<(), CodecError> {
        out.extend_from_slice(&count(s.len())?);
        out.extend_from_slice(s.as_bytes());
        Ok(())
    }
    fn time(out: &mut Vec<u8>, t: DateTime<Utc>) {
        out.extend_from_slice(&t.timestamp_millis().to_le_bytes());
    }
    for s in [
        &entry.cache_id,
        &entry.cache_key,
        &entry.model,
        &entry.provider,
    ] {
        string(out, s)?;
    }
    out.extend_from_slice(&entry.tokens.input.to_le_bytes());
    out.extend_from_slice(&entry.tokens.output.to_le_bytes());
    for c in [entry.cost.input, entry.cost.output, entry.cost.total] {
        out.extend_from_slice(&c.to_le_bytes());
    }
    out.extend_from_slice(&entry.latency_ms.to_le_bytes());
    time(out, entry.created_at);
    match entry.expires_at {
        Some(at) => {
            out.push(1);
            time(out, at);
        }
        None => out.push(0),
    }
    out.extend_from_slice(&count(entry.tags.len())?);
    for tag in &entry.tags {
        string(out, tag)?;
    }
    match &entry.scope {
        Scope::Global => out.push(0),
        Scope::Namespace(id) | Scope::User(id) | Scope::Session(id) => {
            out.push(match &entry.scope {
                Scope::Namespace(_) => 1,
                Scope::User(_) => 2,
                _ => 3,
            });
            string(out, id)?;
        }
    }
    out.extend_from_slice(&entry.hit_count.to_le_bytes());
    time(out, entry.last_accessed);
    out.extend_from_slice(&count(entry.epochs.len())?);
    for (name, epoch) in &entry.epochs {
        string(out, name)?;
        out.extend_from_slice(&epoch.to_le_bytes());
    }
    Ok(())
}

/// Reads the metadata section back into an entry around `request` and `response`. Every length
/// is checked against the bytes left, and the section must end where the entry does.
fn read_metadata(bytes: &[u8], request: String, response: JsonText) -> Result<Entry, CodecError> {
    let mut r = Reader { bytes };
    let cache_id = r.string("cache_id")?;
    let cache_key = r.string("cache_key")?;
    let model = r.string("model")?;
    let provider = r.string("provider")?;
    let tokens = Tokens {
        input: r.u64("tokens")?,
        output: r.u64("tokens")?,
    };
    let cost = Cost {
        input: r.f64("cost")?,
        output: r.f64("cost")?,
        total: r.f64("cost")?,
    };
    let latency_ms = r.u64("latency_ms")?;
    let created_at = r.time("created_at")?;
    let expires_at = match r.u8("expires_at")? {
        0 => None,
        1 => Some(r.time("expires_at")?),
        other => return Err(r.bad("expires_at", other)),
    };
    let tags = (0..r.u32("tags")?)
        .map(|_| r.string("tags"))
        .collect::<Result<_, _>>()?;
    let scope = match r.u8("scope")? {
        0 => Scope::Global,
        1 => Scope::Namespace(r.string("scope")?),
        2 => Scope::User(r.string("scope")?),
        3 => Scope::Session(r.string("scope")?),
        other => return Err(r.bad("scope", other)),
    };
    let hit_count = r.u64("hit_count")?;
    let last_accessed = r.time("last_accessed")?;
    let mut epochs = BTreeMap::new();
    for _ in 0..r.u32("epochs")? {
        let name = r.string("epochs")?;
        epochs.insert(name, r.u64("epochs")?);
    }
    if !r.bytes.is_empty() {
        return Err(CodecError::Json(format!(
            "metadata: {} bytes after the last field",
            r.bytes.len()
        )));
    }
    Ok(Entry {
        cache_id,
        cache_key,
        request,
        response,
        model,
        provider,
        tokens,
        cost,
        latency_ms,
        created_at,
        expires_at,
        tags,
        scope,
        hit_count,
        last_accessed,
        epochs,
    })
}

/// A cursor over the metadata section.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self, field: &str) -> Result<[u8; N], CodecError> {
        let Some((head, rest)) = self.bytes.split_first_chunk::<N>() else {
            return Err(CodecError::Json(format!("metadata: truncated at {field}")));
        };
        self.bytes = rest;
        Ok(*head)
    }

    fn u8(&mut self, field: &str) -> Result<u8, CodecError> {
        self.take::<1>(field).map(|[b]| b)
    }

    fn u32(&mut self, field: &str) -> Result<u32, CodecError> {
        self.take(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &str) -> Result<u64, CodecError> {
        self.take(field).map(u64::from_le_bytes)
    }

    fn f64(&mut self, field: &str) -> Result<f64, CodecError> {
        self.take(field).map(f64::from_le_bytes)
    }

    fn time(&mut self, field: &str) -> Result<DateTime<Utc>, CodecError> {
        let millis = self.take(field).map(i64::from_le_bytes)?;
        DateTime::from_timestamp_millis(millis)
            .ok_or_else(|| CodecError::Json(format!("metadata: {field} out of range")))
    }

    fn string(&mut self, field: &str) -> Result<String, CodecError> {
        let len = self.u32(field)? as usize;
        let Some((text, rest)) = self.bytes.split_at_checked(len) else {
            return Err(CodecError::Json(format!("metadata: truncated at {field}")));
        };
        self.bytes = rest;
        utf8(text)
            .map(str::to_owned)
            .map_err(|e| CodecError::Json(format!("metadata: {field}: {e}")))
    }

    fn bad(&self, field: &str, tag: u8) -> CodecError {
        CodecError::Json(format!("metadata: {field}: unknown tag {tag}"))
    }
}

/// `bytes` as text: checked with SIMD (the request and the response are kilobytes, and every
/// read checks them), and checked again by the standard library only when they are not UTF-8,
/// for an error that says where.
fn utf8(bytes: &[u8]) -> Result<&str, std::str::Utf8Error> {
    simdutf8::basic::from_utf8(bytes).or_else(|_| std::str::from_utf8(bytes))
}

/// The 16 bytes of a cache id written as 32 hex digits.
fn cache_id_bytes(hex: &str) -> Option<[u8; BINDING_LEN]> {
    let mut out = [0; BINDING_LEN];
    if hex.len() != 2 * BINDING_LEN {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The largest payload `stored` compressed bytes may declare ([`MAX_EXPANSION`]).
fn expansion_allowed(stored: usize) -> usize {
    stored.saturating_mul(MAX_EXPANSION).max(EXPANSION_FLOOR)
}

/// Decompresses `stored` into `out`, cleared first and given room for at least `expected` bytes
/// (a frame that holds more than that room is an error; the caller checks the exact length).
fn decompress(
    stored: &[u8],
    expected: usize,
    dictionary: bool,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    out.clear();
    out.reserve(expected);
    DECOMPRESSORS.with(|cell| {
        let mut slots = cell.borrow_mut();
        let slot = &mut slots[usize::from(dictionary)];
        if slot.is_none() {
            let made = if dictionary {
                zstd::bulk::Decompressor::with_dictionary(DICTIONARY)
            } else {
                zstd::bulk::Decompressor::new()
            };
            *slot = Some(made.map_err(|e| CodecError::Zstd(e.to_string()))?);
        }
        match slot.as_mut() {
            Some(d) => d
                .decompress_to_buffer(stored, out)
                .map(|_| ())
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

    fn keyed(byte: u8, old: &[u8], encrypt: bool) -> Codec {
        let key = |b: u8| crate::Key::from_material(&[b; 40]).unwrap();
        let ring = crate::Keyring::new(key(byte), old.iter().map(|b| key(*b)).collect(), encrypt);
        Codec::default().with_keys(std::sync::Arc::new(ring))
    }

    #[test]
    fn under_a_key_envelopes_are_sealed_and_only_sealed_ones_are_read() {
        for encrypt in [false, true] {
            let codec = keyed(1, &[], encrypt);
            let entry = entry("sealed answer");
            let sealed = codec.encode(&entry).unwrap();
            assert_eq!(sealed[4], FORMAT_KEYED);
            assert_eq!(codec.decode(&sealed).unwrap().response, entry.response);
            assert_eq!(codec.decode_local(&sealed).unwrap().request, entry.request);
            assert!(codec.sealed_with_current_key(&sealed));
            let text_in_clear = sealed.windows(13).any(|w| w == b"sealed answer");
            assert_eq!(text_in_clear, !encrypt, "only encryption hides the text");
            // Every byte changed, with the checksum made right again, is refused.
            for at in HEADER_LEN..sealed.len() {
                let mut forged = sealed.clone();
                forged[at] ^= 0x01;
                let crc = checksum(&forged[..12], &forged[HEADER_LEN..]);
                forged[12..16].copy_from_slice(&crc.to_le_bytes());
                assert!(codec.decode(&forged).is_err(), "{encrypt}: byte {at}");
            }
            // Without a key, unsealed envelopes are refused; a keyless node reads none.
            assert!(matches!(
                codec.decode(&Codec::default().encode(&entry).unwrap()),
                Err(CodecError::Unauthentic(_))
            ));
            assert!(
                codec
                    .clone()
                    .accepting_unsealed()
                    .decode(&Codec::default().encode(&entry).unwrap())
                    .is_ok()
            );
            assert!(matches!(
                Codec::default().decode(&sealed),
                Err(CodecError::Unauthentic(_))
            ));
            // Another key: refused. An old key still held: read.
            assert!(keyed(2, &[], encrypt).decode(&sealed).is_err());
            let rotated = keyed(2, &[1], encrypt);
            assert!(rotated.decode(&sealed).is_ok());
            assert!(!rotated.sealed_with_current_key(&sealed));
        }
    }

    #[test]
    fn a_sealed_envelope_names_its_entry() {
        // Sealed by the key holder for one cache id, the payload of another entry (its own
        // cache id inside) is refused: the envelope says whose it is.
        let codec = keyed(1, &[], false);
        let mut other = entry("other");
        other.cache_id = "0".repeat(32);
        let payload = codec.open(&codec.encode(&other).unwrap()).unwrap();
        let wrong = codec
            .seal_bound(&payload, cache_id_bytes(&entry("x").cache_id).unwrap())
            .unwrap();
        assert!(matches!(
            codec.decode(&wrong),
            Err(CodecError::Unauthentic(_))
        ));
    }

    #[test]
    fn a_small_frame_declaring_a_huge_payload_is_refused_before_allocating_it() {
        // What a hostile writer makes: 128 MiB of one byte, a few kilobytes of zstd, sealed
        // with a valid checksum.
        let huge = vec![b'a'; 128 << 20];
        let frame = zstd::bulk::compress(&huge, 1).unwrap();
        assert!(frame.len() < 64 << 10, "{}", frame.len());
        let mut envelope = Vec::new();
        envelope.extend_from_slice(&MAGIC);
        envelope.push(FORMAT_VERSION);
        envelope.push(FLAG_ZSTD);
        envelope.extend_from_slice(&[0, 0]);
        envelope.extend_from_slice(&(huge.len() as u32).to_le_bytes());
        let crc = checksum(&envelope[..12], &frame);
        envelope.extend_from_slice(&crc.to_le_bytes());
        envelope.extend_from_slice(&frame);
        let codec = Codec::default();
        assert!(matches!(codec.open(&envelope), Err(CodecError::TooLarge(n)) if n == huge.len()));
        // The codec itself writes such a payload uncompressed, and reads it back.
        let sealed = codec.seal(&huge[..4 << 20]).unwrap();
        assert_eq!(sealed[5] & FLAG_ZSTD, 0);
        assert_eq!(codec.open(&sealed).unwrap().len(), 4 << 20);
    }
    use crate::{Normalizer, Scope, Tokens};
    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;
    use serde_json::json;

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
            request: keyed.canonical.clone(),
            response: serde_json::value::to_raw_value(&response)
                .unwrap_or_else(|e| panic!("{e}"))
                .into(),
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

    /// Recomputes an envelope's checksum after a test changed its header.
    fn reseal(envelope: &mut [u8]) {
        let crc = checksum(&envelope[..12], &envelope[16..]);
        envelope[12..16].copy_from_slice(&crc.to_le_bytes());
    }

    fn assert_same(a: &Entry, b: &Entry) {
        assert_eq!(serde_json::to_string(a).ok(), serde_json::to_string(b).ok());
    }

    #[test]
    fn fast_level_settings_shape_the_frame_and_frames_without_them_still_decode() {
        let e = entry(&"an answer that repeats itself, more or less. ".repeat(60));
        let codec = Codec::default();
        let ours = codec.encode(&e).unwrap_or_else(|err| panic!("{err}"));
        let payload = codec.open(&ours).unwrap_or_else(|err| panic!("{err}"));
        // The same payload at the same level, with zstd's own match settings: what the codec
        // wrote before it asked for longer matches.
        let theirs = zstd::bulk::Compressor::with_dictionary(DEFAULT_LEVEL, DICTIONARY)
            .and_then(|mut c| c.compress(&payload))
            .unwrap_or_else(|err| panic!("{err}"));
        assert_ne!(
            ours[HEADER_LEN..],
            theirs[..],
            "the fast-level settings changed nothing"
        );
        let mut older = ours[..HEADER_LEN].to_vec();
        older.extend_from_slice(&theirs);
        reseal(&mut older);
        let back = codec.decode(&older).unwrap_or_else(|err| panic!("{err}"));
        assert_same(&e, &back);
    }

    #[test]
    fn a_length_field_that_disagrees_with_the_frame_is_an_error() {
        let codec = Codec::default();
        let e = entry(&"a compressible answer. ".repeat(100));
        let bytes = codec.encode(&e).unwrap_or_else(|err| panic!("{err}"));
        let stated = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        for claimed in [stated - 1, stated + 1, stated * 4, 0] {
            let mut forged = bytes.clone();
            forged[8..12].copy_from_slice(&claimed.to_le_bytes());
            reseal(&mut forged);
            assert!(
                matches!(
                    codec.decode(&forged),
                    Err(CodecError::Length { .. } | CodecError::Zstd(_))
                ),
                "claimed {claimed} of {stated}"
            );
            // The buffer the refused frame was decompressed into serves the next decode.
            let back = codec.decode(&bytes).unwrap_or_else(|err| panic!("{err}"));
            assert_same(&e, &back);
        }
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
            assert_eq!(back.request, e.request);
            let request =
                json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]});
            let keyed = Normalizer::default()
                .key(&request, &Scope::User("u1".into()))
                .unwrap_or_else(|err| panic!("{err}"));
            assert!(back.answers(&keyed));
        }
    }

    #[test]
    fn reads_entries_written_with_or_without_the_dictionary() {
        let e = entry(&"an answer that repeats itself, more or less. ".repeat(60));
        let with = Codec::default()
            .encode(&e)
            .unwrap_or_else(|err| panic!("{err}"));
        let without = Codec::default()
            .with_dictionary(false)
            .encode(&e)
            .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(with[5], FLAG_ZSTD | FLAG_DICTIONARY);
        assert_eq!(without[5], FLAG_ZSTD);
        for bytes in [&with, &without] {
            for reader in [Codec::default(), Codec::default().with_dictionary(false)] {
                let back = reader.decode(bytes).unwrap_or_else(|err| panic!("{err}"));
                assert_same(&e, &back);
            }
        }
        // The dictionary flag on a payload that is not compressed is no format this writes.
        let mut plain = Codec::new(usize::MAX, 1)
            .encode(&e)
            .unwrap_or_else(|err| panic!("{err}"));
        plain[5] = FLAG_DICTIONARY;
        reseal(&mut plain);
        assert_eq!(
            Codec::default().decode(&plain).err(),
            Some(CodecError::UnknownFlags(FLAG_DICTIONARY))
        );
        // A dictionary flag cleared (checksum fixed up): zstd refuses the frame, no panic.
        let mut cleared = with.clone();
        cleared[5] = FLAG_ZSTD;
        reseal(&mut cleared);
        assert!(matches!(
            Codec::default().decode(&cleared),
            Err(CodecError::Zstd(_))
        ));
    }

    #[test]
    fn every_scope_and_optional_field_round_trips_through_the_binary_metadata() {
        let codec = Codec::default();
        let scopes = [
            Scope::Global,
            Scope::Namespace("team-search".into()),
            Scope::User("ü-ser with spaces".into()),
            Scope::Session(String::new()),
        ];
        for (n, scope) in scopes.into_iter().enumerate() {
            let mut e = entry(&"x".repeat(n * 700));
            e.scope = scope;
            e.expires_at = (n % 2 == 0).then(|| e.created_at + chrono::Duration::hours(1));
            e.tags = (0..n).map(|i| format!("tag:{i}")).collect();
            e.epochs = (0..n)
                .map(|i| (format!("user:{i}"), i as u64 * 7))
                .collect();
            e.cost.total = 0.1 + 0.2; // not a round number in binary
            e.hit_count = u64::MAX;
            let bytes = codec.encode(&e).unwrap_or_else(|err| panic!("{err}"));
            assert_eq!(bytes[4], FORMAT_VERSION);
            let back = codec.decode(&bytes).unwrap_or_else(|err| panic!("{err}"));
            assert_same(&e, &back);
            assert_eq!(back.scope, e.scope);
            assert_eq!(back.cost.total.to_bits(), e.cost.total.to_bits());
        }
    }

    #[test]
    fn format_2_envelopes_with_json_metadata_still_decode() {
        let e = entry(&"an answer written by the previous release. ".repeat(40));
        let mut payload = Vec::new();
        payload.extend_from_slice(&(e.request.len() as u32).to_le_bytes());
        payload.extend_from_slice(&(e.response.get().len() as u32).to_le_bytes());
        payload.extend_from_slice(e.request.as_bytes());
        payload.extend_from_slice(e.response.get().as_bytes());
        let mut metadata = serde_json::to_value(&e).unwrap_or_else(|err| panic!("{err}"));
        if let Some(fields) = metadata.as_object_mut() {
            fields.remove("request");
            fields.remove("response");
        }
        serde_json::to_writer(&mut payload, &metadata).unwrap_or_else(|err| panic!("{err}"));
        let mut bytes = Codec::default()
            .seal(&payload)
            .unwrap_or_else(|err| panic!("{err}"));
        bytes[4] = FORMAT_JSON_METADATA;
        reseal(&mut bytes);
        let back = Codec::default()
            .decode(&bytes)
            .unwrap_or_else(|err| panic!("{err}"));
        assert_same(&e, &back);
        // The same payload read as format 3 is refused, not misread.
        bytes[4] = FORMAT_VERSION;
        reseal(&mut bytes);
        assert!(matches!(
            Codec::default().decode(&bytes),
            Err(CodecError::Json(_))
        ));
    }

    #[test]
    fn the_dictionary_makes_entries_smaller() {
        let e = entry(&"The answer, in a few sentences of plain text. ".repeat(40));
        let size = |codec: Codec| codec.encode(&e).map(|b| b.len()).unwrap_or(usize::MAX);
        let level = DEFAULT_LEVEL;
        assert!(
            size(Codec::default()) < size(Codec::new(1024, level).with_dictionary(false)),
            "dictionary did not help"
        );
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
                    assert!(
                        codec.decode_local(&bad).is_err(),
                        "byte {i} ^ {flip:#x} decoded as a local copy"
                    );
                }
            }
            for len in 0..bytes.len() {
                assert!(
                    codec.decode(&bytes[..len]).is_err(),
                    "truncated to {len} decoded"
                );
                assert!(
                    codec.decode_local(&bytes[..len]).is_err(),
                    "truncated to {len} decoded as a local copy"
                );
            }
        }
    }

    #[test]
    fn only_envelopes_from_elsewhere_have_their_response_parsed_again() {
        let codec = Codec::default();
        let e = entry(&"an answer long enough to be compressed. ".repeat(40));
        let bytes = codec.encode(&e).unwrap_or_else(|err| panic!("{err}"));
        let local = codec
            .decode_local(&bytes)
            .unwrap_or_else(|err| panic!("{err}"));
        assert_same(&e, &local);
        assert_eq!(local.response, e.response);
        // A well-sealed envelope whose response is not JSON: no corruption the checksum can see,
        // but what a faulty or hostile writer to a shared bucket could leave.
        let mut payload = codec.open(&bytes).unwrap_or_else(|err| panic!("{err}"));
        let request_len = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
        payload[8 + request_len as usize] = b'x';
        let forged = codec.seal(&payload).unwrap_or_else(|err| panic!("{err}"));
        assert!(
            matches!(codec.decode(&forged), Err(CodecError::Json(m)) if m.starts_with("response")),
            "a response that is not JSON was decoded"
        );
        // This node's own disk is trusted to hold what this node wrote (it checked the JSON).
        let trusted = codec
            .decode_local(&forged)
            .unwrap_or_else(|err| panic!("{err}"));
        assert!(trusted.response.get().starts_with('x'));
    }

    #[test]
    fn json_text_is_checked_and_serializes_as_the_value_itself() {
        assert!(JsonText::parse("{\"a\": [1, 2]".into()).is_err());
        assert!(JsonText::parse("".into()).is_err());
        let text = JsonText::parse("{\"a\": [1, 2]}".into()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(text.get(), "{\"a\": [1, 2]}");
        assert_eq!(text.to_string(), text.get());
        let wrapped = serde_json::to_string(&[&text]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(wrapped, "[{\"a\": [1, 2]}]");
        let back: Vec<JsonText> = serde_json::from_str(&wrapped).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, vec![text]);
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
        reseal(&mut newer);
        assert_eq!(
            codec.decode(&newer).err(),
            Some(CodecError::UnknownVersion(9))
        );
        assert!(matches!(
            codec.decode(&codec.seal(b"[]").unwrap_or_default()),
            Err(CodecError::Json(_))
        ));
    }

    #[test]
    fn text_that_is_not_utf8_is_an_error_that_says_where() {
        // Long enough for the vectorized check; the checksum is valid, so only the UTF-8 check
        // stands between the bytes and a `String`.
        let codec = Codec::default();
        let mut entry = entry(&"long answer ".repeat(40));
        entry.request = format!("{{\"q\":\"{}\"}}", "long question ".repeat(40));
        let envelope = codec.encode(&entry).unwrap_or_else(|e| panic!("{e}"));
        let payload = codec.open(&envelope).unwrap_or_else(|e| panic!("{e}"));
        let request_len = entry.request.len();
        for (at, section) in [(8 + 300, "request"), (8 + request_len + 200, "response")] {
            let mut bad = payload.clone();
            bad[at] = 0xff;
            let sealed = codec.seal(&bad).unwrap_or_else(|e| panic!("{e}"));
            for decoded in [codec.decode(&sealed), codec.decode_local(&sealed)] {
                match decoded {
                    Err(CodecError::Json(message)) => {
                        assert!(message.starts_with(section), "{message}");
                        let offset = at - 8 - if section == "request" { 0 } else { request_len };
                        assert!(
                            message.contains(&format!(
                                "utf-8 sequence of 1 bytes from index {offset}"
                            )),
                            "{message}"
                        );
                    }
                    other => panic!("{section}: {other:?}"),
                }
            }
        }
        // The same bytes without the fault decode to the entry.
        let resealed = codec.seal(&payload).unwrap_or_else(|e| panic!("{e}"));
        assert_same(
            &codec.decode(&resealed).unwrap_or_else(|e| panic!("{e}")),
            &entry,
        );
    }

    proptest! {
        #[test]
        fn arbitrary_metadata_sections_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = read_metadata(&bytes, String::new(), JsonText::null());
        }

        /// Fuzz-style: any payload behind a valid header and checksum (what a hostile writer
        /// to the bucket can make) decodes to an entry or an error, never a panic.
        #[test]
        fn fuzz_sealed_arbitrary_payloads_never_panic(
            payload in prop::collection::vec(any::<u8>(), 0..2048),
            compressed in any::<bool>(),
        ) {
            let codec = Codec::default();
            let sealed = if compressed {
                codec.seal(&payload)
            } else {
                Codec { compress_above: usize::MAX, ..Codec::default() }.seal(&payload)
            };
            if let Ok(sealed) = sealed {
                let _ = codec.decode(&sealed);
                let _ = codec.decode_local(&sealed);
            }
        }

        /// Fuzz-style: under a key, any body behind a keyed header with a right checksum (what
        /// a writer to the bucket without the key can make) is refused, never a panic, never
        /// an entry, sealed or encrypted.
        #[test]
        fn fuzz_keyed_envelopes_of_arbitrary_bodies_are_refused(
            body in prop::collection::vec(any::<u8>(), 0..2048),
            encrypt in any::<bool>(),
        ) {
            let codec = keyed(3, &[], encrypt);
            let sealed = codec.encode(&entry("keyed")).unwrap_or_else(|e| panic!("{e}"));
            let mut forged = sealed[..HEADER_LEN].to_vec();
            forged.extend_from_slice(&body);
            let crc = checksum(&forged[..12], &forged[HEADER_LEN..]);
            forged[12..16].copy_from_slice(&crc.to_le_bytes());
            prop_assert!(codec.decode(&forged).is_err());
            prop_assert!(codec.decode_local(&forged).is_err());
        }

        /// Fuzz-style: a real entry's payload with bytes changed, cut or added, resealed with a
        /// valid checksum, never panics the decoder; what decodes is well formed.
        #[test]
        fn fuzz_mutated_entries_resealed_never_panic(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            cut in any::<prop::sample::Index>(),
            cut_it in any::<bool>(),
            tail in prop::collection::vec(any::<u8>(), 0..16),
        ) {
            let codec = Codec::default();
            let sealed = codec.encode(&entry("fuzzed")).unwrap_or_else(|e| panic!("{e}"));
            let mut payload = codec.open(&sealed).unwrap_or_else(|e| panic!("{e}"));
            for (at, byte) in edits {
                let i = at.index(payload.len());
                payload[i] = byte;
            }
            if cut_it {
                payload.truncate(cut.index(payload.len() + 1));
            }
            payload.extend_from_slice(&tail);
            let resealed = codec.seal(&payload).unwrap_or_else(|e| panic!("{e}"));
            for entry in [codec.decode(&resealed), codec.decode_local(&resealed)]
                .into_iter()
                .flatten()
            {
                prop_assert!(entry.request.len() <= payload.len());
            }
        }

        #[test]
        fn fuzz_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let codec = Codec::default();
            let _ = codec.decode(&bytes);
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = codec.decode(&with_magic);
        }
    }
}
