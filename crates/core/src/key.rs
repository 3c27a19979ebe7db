//! Cache keys: MD5 over the canonical request bytes, the scope and the key-format version.

use std::fmt;

use crate::error::RequestError;
use crate::scope::Scope;
use md5::{Digest, Md5};

/// Version of the key derivation. Bumping it makes every existing entry unreachable, which is the
/// point: keys derived by different rules must never meet.
pub const KEY_FORMAT_VERSION: u8 = 4;

/// The profile tag of keys over text that no normalizer profile produced.
pub const RAW_TEXT_TAG: u8 = 0;

/// Longest model slug kept in a display key.
const SLUG_MAX: usize = 40;

/// A model name made safe for keys and object paths: `[a-z0-9._-]{1,40}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelSlug(String);

impl ModelSlug {
    /// Lowercases `model`, replaces every other character by `-` and cuts it to 40 characters.
    /// An empty model becomes `unknown`.
    pub fn new(model: &str) -> Self {
        // Most names are slugs already (`gpt-4o-mini`, a normalized model): copied as they are.
        let kept = |b: &u8| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-');
        if !model.is_empty()
            && model.len() <= SLUG_MAX
            && model.as_bytes().iter().all(kept)
            && !only_dots(model)
        {
            return ModelSlug(model.to_owned());
        }
        ModelSlug(slugify(model))
    }

    /// The slug as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// [`ModelSlug::new`]'s rule, character by character.
fn slugify(model: &str) -> String {
    let mut slug = String::with_capacity(model.len().min(SLUG_MAX));
    for c in model.chars().take(SLUG_MAX) {
        slug.push(match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '.' | '_' | '-') => c,
            _ => '-',
        });
    }
    if slug.is_empty() {
        slug.push_str("unknown");
    }
    // A slug of dots alone (`.`, `..`) would be a dot segment in an object path, which URL
    // and path handling resolve away: its dots become `_`.
    if only_dots(&slug) {
        slug = "_".repeat(slug.len());
    }
    slug
}

fn only_dots(text: &str) -> bool {
    text.bytes().all(|b| b == b'.')
}

impl fmt::Display for ModelSlug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A cache key: the model slug for humans and paths, the 128-bit digest for lookups.
///
/// Display form: `{model_slug}_{32 hex digits}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// The slug of the request's (normalized) model.
    pub slug: ModelSlug,
    /// The MD5 digest.
    pub digest: [u8; 16],
}

impl CacheKey {
    /// The digest as one integer, the key of the memory tier.
    pub fn id(&self) -> u128 {
        u128::from_be_bytes(self.digest)
    }

    /// The digest as 32 lowercase hex digits: the entry's `cache_id`.
    pub fn hex(&self) -> String {
        let mut out = String::with_capacity(32);
        for b in self.digest {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        out
    }

    /// Whether `text` is this key's digest as 32 lowercase hex digits (an entry's `cache_id`),
    /// compared without building the text.
    pub fn hex_matches(&self, text: &str) -> bool {
        let bytes = text.as_bytes();
        bytes.len() == 32
            && self.digest.iter().enumerate().all(|(i, b)| {
                bytes[2 * i] == HEX[usize::from(b >> 4)]
                    && bytes[2 * i + 1] == HEX[usize::from(b & 0xf)]
            })
    }

    /// Whether `text` is this key's display form, `{model_slug}_{32 hex}` (an entry's
    /// `cache_key`), compared without building it.
    pub fn display_matches(&self, text: &str) -> bool {
        text.strip_prefix(self.slug.as_str())
            .and_then(|rest| rest.strip_prefix('_'))
            .is_some_and(|hex| self.hex_matches(hex))
    }

    /// Derives the key of canonical text that no normalizer profile produced (the typed
    /// cache's `{"kv": key}`).
    pub fn derive(slug: ModelSlug, scope: &Scope, canonical: &str) -> Self {
        let mut writer = KeyWriter::new(canonical.len());
        writer.push(canonical);
        writer.finish(slug, scope, RAW_TEXT_TAG).0
    }

    /// Parses a display key `{model_slug}_{32 hex}`.
    pub fn parse(s: &str) -> Option<Self> {
        let (slug, hex) = s.rsplit_once('_')?;
        if hex.len() != 32 || slug.is_empty() || ModelSlug::new(slug).as_str() != slug {
            return None;
        }
        let mut digest = [0u8; 16];
        for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
            let hi = (chunk[0] as char).to_digit(16)?;
            let lo = (chunk[1] as char).to_digit(16)?;
            digest[i] = (hi * 16 + lo) as u8;
        }
        Some(CacheKey {
            slug: ModelSlug(slug.to_string()),
            digest,
        })
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Hashes canonical text as it is written.
///
/// The writer keeps the canonical text (a hit is served only if it equals the stored one) and
/// hands it to MD5 in whole blocks while it grows, so the hasher never copies into its own block
/// buffer and the text is hashed while it is still in the CPU's first-level cache. The hash
/// covers the canonical bytes, then the scope and the key-format version: the variable-length
/// part comes first so that it starts on a block boundary.
pub(crate) struct KeyWriter {
    buf: String,
    hashed: usize,
    hasher: Md5,
    strings: Strings,
    /// Set when the request nests too deeply; what was written is then meaningless.
    pub(crate) too_deep: bool,
    /// The first malformed part met while writing (a chat message that is not an object, or
    /// has no string role); what was written is then meaningless.
    pub(crate) malformed: Option<RequestError>,
}

/// How the canonical writer writes strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Strings {
    /// `"` then the length in bytes, `:` and the bytes as they are: the form keys hash and entries
    /// store. It needs no escaping, so writing it costs a copy.
    LengthPrefixed,
    /// Quoted and escaped as JSON: the form `explain` shows people.
    Json,
}

/// Unhashed bytes the writer collects before it hands them to MD5 (a multiple of its 64-byte
/// block, and small enough to stay in the first-level cache).
const CHUNK: usize = 1024;

impl KeyWriter {
    /// A writer with room for `capacity` canonical bytes, writing strings in the form keys use.
    pub(crate) fn new(capacity: usize) -> Self {
        Self::with_strings(capacity, Strings::LengthPrefixed)
    }

    /// A writer with room for `capacity` canonical bytes, writing strings as `strings` says.
    pub(crate) fn with_strings(capacity: usize, strings: Strings) -> Self {
        KeyWriter {
            buf: String::with_capacity(capacity),
            hashed: 0,
            hasher: Md5::new(),
            strings,
            too_deep: false,
            malformed: None,
        }
    }

    /// How this writer writes strings.
    #[inline]
    pub(crate) fn strings(&self) -> Strings {
        self.strings
    }

    /// Appends `text` to the canonical form.
    #[inline]
    pub(crate) fn push(&mut self, text: &str) {
        self.buf.push_str(text);
        if self.buf.len() - self.hashed >= CHUNK {
            self.hash_blocks();
        }
    }

    /// Appends one ASCII character to the canonical form.
    #[inline]
    pub(crate) fn push_byte(&mut self, byte: u8) {
        self.buf.push(char::from(byte));
    }

    #[cold]
    fn hash_blocks(&mut self) {
        let ready = (self.buf.len() - self.hashed) & !63;
        if let Some(blocks) = self.buf.as_bytes().get(self.hashed..self.hashed + ready) {
            self.hasher.update(blocks);
        }
        self.hashed += ready;
    }

    /// The canonical text written so far.
    pub(crate) fn written(&self) -> &str {
        &self.buf
    }

    /// Hashes what is left, then `scope`, the `profile` tag (which normalization produced the
    /// text: [`crate::Profile::key_tag`], or [`RAW_TEXT_TAG`]) and the key-format version, and
    /// returns the key and the canonical text.
    pub(crate) fn finish(
        mut self,
        slug: ModelSlug,
        scope: &Scope,
        profile: u8,
    ) -> (CacheKey, String) {
        if let Some(rest) = self.buf.as_bytes().get(self.hashed..) {
            self.hasher.update(rest);
        }
        scope.feed(|bytes| self.hasher.update(bytes));
        self.hasher.update([profile, KEY_FORMAT_VERSION]);
        let key = CacheKey {
            slug,
            digest: self.hasher.finalize().into(),
        };
        (key, self.buf)
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{}", self.slug, self.hex())
    }
}

/// A request ready for the cache: its key, its canonical bytes and the scope it was keyed in.
///
/// A stored entry answers a `Keyed` request only if both its canonical request and its scope are
/// equal to these, byte for byte (see [`crate::Entry::answers`]).
#[derive(Debug, Clone)]
pub struct Keyed {
    /// The derived key.
    pub key: CacheKey,
    /// The canonical request: valid, canonical JSON (by construction of the writer, so it is
    /// not parsed again on the hot path).
    pub canonical: String,
    /// The normalized model name (after lowercasing and aliases).
    pub model: String,
    /// The scope the key was derived in.
    pub scope: Scope,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slug_is_path_safe_and_bounded() {
        assert_eq!(
            ModelSlug::new("GPT-4o/Mini:Latest").as_str(),
            "gpt-4o-mini-latest"
        );
        assert_eq!(ModelSlug::new("").as_str(), "unknown");
        assert_eq!(ModelSlug::new(&"x".repeat(100)).as_str().len(), 40);
        // Never a dot segment of a path.
        assert_eq!(ModelSlug::new(".").as_str(), "_");
        assert_eq!(ModelSlug::new("..").as_str(), "__");
        assert_eq!(ModelSlug::new("...").as_str(), "___");
        assert_eq!(ModelSlug::new("o1..").as_str(), "o1..");
    }

    proptest::proptest! {
        #[test]
        fn names_that_are_slugs_already_are_kept_by_the_same_rule(
            model in "[a-z0-9._-]{0,45}|[a-zA-Z0-9 ./:_-]{0,45}|\\PC{0,45}"
        ) {
            proptest::prop_assert_eq!(ModelSlug::new(&model).0, slugify(&model));
        }
    }

    #[test]
    fn display_key_round_trips() {
        let key = CacheKey::derive(ModelSlug::new("gpt-4o"), &Scope::Global, "{}");
        let shown = key.to_string();
        assert!(shown.starts_with("gpt-4o_"));
        assert_eq!(shown.len(), "gpt-4o_".len() + 32);
        assert_eq!(CacheKey::parse(&shown), Some(key));
        assert_eq!(CacheKey::parse("gpt-4o_xyz"), None);
    }

    #[test]
    fn writing_in_pieces_hashes_like_one_md5_over_bytes_scope_and_version() {
        let canonical: String = (0..3000u32)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let scope = Scope::User("u".into());
        let mut whole = Md5::new();
        whole.update(&canonical);
        scope.feed(|bytes| whole.update(bytes));
        whole.update([7, KEY_FORMAT_VERSION]);
        let expected: [u8; 16] = whole.finalize().into();
        for piece in [1, 7, 63, 64, 65, 200, 1000, 3000] {
            let mut writer = KeyWriter::new(16);
            for chunk in canonical.as_bytes().chunks(piece) {
                if let [byte] = chunk {
                    writer.push_byte(*byte);
                } else {
                    writer.push(std::str::from_utf8(chunk).unwrap_or_default());
                }
            }
            let (key, text) = writer.finish(ModelSlug::new("m"), &scope, 7);
            assert_eq!(key.digest, expected, "pieces of {piece}");
            assert_eq!(text, canonical);
        }
    }

    #[test]
    fn scope_and_version_are_in_the_key() {
        let slug = ModelSlug::new("m");
        let a = CacheKey::derive(slug.clone(), &Scope::User("a".into()), "{}");
        let b = CacheKey::derive(slug.clone(), &Scope::User("b".into()), "{}");
        let s = CacheKey::derive(slug.clone(), &Scope::Session("a".into()), "{}");
        let g = CacheKey::derive(slug, &Scope::Global, "{}");
        assert_ne!(a, b);
        assert_ne!(a, s);
        assert_ne!(a, g);
    }
}
