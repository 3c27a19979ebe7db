//! Where L3 objects live in the bucket, and the small JSON documents that point at them.
//!
//! ```text
//! {prefix}/llm-cache/{model_slug}/{YYYY}/{MM}/{DD}/{HH}/{cache_id}.json.zst      entry (envelope)
//! {prefix}/llm-cache/{model_slug}/{YYYY}/{MM}/{DD}/{HH}/{cache_id}.metadata.json plain JSON metadata
//! {prefix}/cache-index/by-hash/{hh}/{cache_id}.json     pointer: object path, model, created, expires, size
//! {prefix}/cache-index/by-date/{YYYY-MM-DD}/{node_id}-{seq}.jsonl  manifest segment, append-only
//! {prefix}/control/epochs.json                       invalidation epochs, shared (compare-and-swap)
//! {prefix}/control/epochs/{node_id}.json             the epochs one node knows; only it writes it
//! ```
//!
//! The date in an entry's path is its `created_at` in UTC. `{hh}` is the first two hex digits of
//! the cache id, which spreads pointers over 256 folders.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Timelike, Utc};
use serde::{Deserialize, Serialize};
use strata_core::{CacheKey, Entry, ModelSlug};

/// Suffix of entry objects.
pub const ENTRY_SUFFIX: &str = ".json.zst";
/// Suffix of metadata objects.
pub const METADATA_SUFFIX: &str = ".metadata.json";

/// Object paths under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The prefix without trailing `/`; may be empty.
    prefix: String,
}

impl Layout {
    /// The layout under `prefix` (a trailing `/` is ignored; empty puts everything at the root).
    pub fn new(prefix: &str) -> Self {
        Layout {
            prefix: prefix.trim_matches('/').to_string(),
        }
    }

    /// The prefix, without trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn join(&self, rest: &str) -> String {
        if self.prefix.is_empty() {
            rest.to_string()
        } else {
            format!("{}/{rest}", self.prefix)
        }
    }

    /// The folder of a model's entries written in the hour of `at`.
    pub fn entry_dir(&self, slug: &str, at: DateTime<Utc>) -> String {
        self.join(&format!(
            "llm-cache/{slug}/{:04}/{:02}/{:02}/{:02}/",
            at.year(),
            at.month(),
            at.day(),
            at.hour()
        ))
    }

    /// The entry object of `entry`.
    pub fn entry_path(&self, entry: &Entry) -> String {
        format!(
            "{}{}{ENTRY_SUFFIX}",
            self.entry_dir(slug_of(entry).as_str(), entry.created_at),
            entry.cache_id
        )
    }

    /// The metadata object beside an entry object.
    pub fn metadata_path(entry_path: &str) -> String {
        let stem = entry_path.strip_suffix(ENTRY_SUFFIX).unwrap_or(entry_path);
        format!("{stem}{METADATA_SUFFIX}")
    }

    /// The folder holding every entry: `{prefix}/llm-cache/`.
    pub fn cache_root(&self) -> String {
        self.join("llm-cache/")
    }

    /// The folder of one model's entries, or of one model's entries on one day.
    pub fn listing_prefix(&self, slug: Option<&str>, day: Option<NaiveDate>) -> String {
        match (slug, day) {
            (None, _) => self.cache_root(),
            (Some(slug), None) => self.join(&format!("llm-cache/{slug}/")),
            (Some(slug), Some(d)) => self.join(&format!(
                "llm-cache/{slug}/{:04}/{:02}/{:02}/",
                d.year(),
                d.month(),
                d.day()
            )),
        }
    }

    /// The shared invalidation epochs.
    pub fn epochs_path(&self) -> String {
        self.join("control/epochs.json")
    }

    /// The folder of per-node copies of the epochs.
    pub fn node_epochs_root(&self) -> String {
        self.join("control/epochs/")
    }

    /// The copy of the epochs `node` keeps (only that node writes it).
    pub fn node_epochs_path(&self, node: &str) -> String {
        format!("{}{node}.json", self.node_epochs_root())
    }

    /// One node's audit trail of a UTC day: `{prefix}/control/audit/{node}/{YYYY-MM-DD}.jsonl`.
    pub fn audit_path(&self, node: &str, day: NaiveDate) -> String {
        self.join(&format!(
            "control/audit/{node}/{}.jsonl",
            day.format("%Y-%m-%d")
        ))
    }

    /// The folder of every node's analytics: `{prefix}/analytics/`.
    pub fn analytics_root(&self) -> String {
        self.join("analytics/")
    }

    /// A node's rollups of one UTC day: `{prefix}/analytics/{node_id}/{YYYY-MM-DD}.json`.
    pub fn analytics_path(&self, node: &str, day: NaiveDate) -> String {
        format!(
            "{}{node}/{}.json",
            self.analytics_root(),
            day.format("%Y-%m-%d")
        )
    }

    /// The node and day of an analytics document's path.
    pub fn parse_analytics_path(&self, path: &str) -> Option<(String, NaiveDate)> {
        let rest = path.strip_prefix(&self.analytics_root())?;
        let (node, file) = rest.split_once('/')?;
        let day = NaiveDate::parse_from_str(file.strip_suffix(".json")?, "%Y-%m-%d").ok()?;
        Some((node.to_owned(), day))
    }

    /// The folder of pointers and manifests: `{prefix}/cache-index/`.
    pub fn index_root(&self) -> String {
        self.join("cache-index/")
    }

    /// The folder holding every by-hash pointer.
    pub fn pointer_root(&self) -> String {
        self.join("cache-index/by-hash/")
    }

    /// The cache id a pointer path names, if it is one.
    pub fn parse_pointer_path(&self, path: &str) -> Option<String> {
        let rest = path.strip_prefix(&self.pointer_root())?;
        let (_, file) = rest.split_once('/')?;
        let id = file.strip_suffix(".json")?;
        (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
    }

    /// The by-hash pointer of a cache id.
    pub fn pointer_path(&self, cache_id: &str) -> String {
        let hh = cache_id.get(..2).unwrap_or("00");
        self.join(&format!("cache-index/by-hash/{hh}/{cache_id}.json"))
    }

    /// A manifest segment: what `node` uploaded in one batch, on the day of `at`.
    pub fn manifest_path(&self, at: DateTime<Utc>, node: &str, seq: u64) -> String {
        self.join(&format!(
            "cache-index/by-date/{:04}-{:02}-{:02}/{node}-{seq:08}.jsonl",
            at.year(),
            at.month(),
            at.day()
        ))
    }
}

/// The slug an entry is filed under: the one in its display key.
pub fn slug_of(entry: &Entry) -> ModelSlug {
    CacheKey::parse(&entry.cache_key)
        .map(|k| k.slug)
        .unwrap_or_else(|| ModelSlug::new(&entry.model))
}

/// What an entry object's path says about it, read back from a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedPath {
    /// The model slug.
    pub slug: String,
    /// The cache id (32 hex digits).
    pub cache_id: String,
    /// The start of the hour the entry was written in.
    pub hour: DateTime<Utc>,
}

impl ParsedPath {
    /// The cache key this path holds.
    pub fn key(&self) -> Option<CacheKey> {
        CacheKey::parse(&format!("{}_{}", self.slug, self.cache_id))
    }
}

impl Layout {
    /// Parses an entry object's path; `None` for anything else (metadata, stray objects).
    pub fn parse_entry_path(&self, path: &str) -> Option<ParsedPath> {
        let rest = path.strip_prefix(&self.cache_root())?;
        let mut parts = rest.split('/');
        let slug = parts.next()?;
        let year: i32 = parts.next()?.parse().ok()?;
        let month: u32 = parts.next()?.parse().ok()?;
        let day: u32 = parts.next()?.parse().ok()?;
        let hour: u32 = parts.next()?.parse().ok()?;
        let file = parts.next()?;
        if parts.next().is_some() {
            return None;
        }
        let cache_id = file.strip_suffix(ENTRY_SUFFIX)?;
        if cache_id.len() != 32 || !cache_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let hour = Utc
            .with_ymd_and_hms(year, month, day, hour, 0, 0)
            .single()?;
        let parsed = ParsedPath {
            slug: slug.to_string(),
            cache_id: cache_id.to_ascii_lowercase(),
            hour,
        };
        parsed.key().map(|_| parsed)
    }
}

/// A by-hash pointer, also one line of a manifest segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pointer {
    /// The cache id.
    pub cache_id: String,
    /// The display key.
    pub cache_key: String,
    /// The entry object's path.
    pub path: String,
    /// The normalized model.
    pub model: String,
    /// When the entry was written.
    pub created: DateTime<Utc>,
    /// When it stops being served, if ever.
    #[serde(default)]
    pub expires: Option<DateTime<Utc>>,
    /// Bytes of the entry object.
    pub size: u64,
    /// The node that uploaded it.
    #[serde(default)]
    pub node: String,
}

impl Pointer {
    /// The pointer to `entry`, stored at `path` with `size` bytes by `node`.
    pub fn of(entry: &Entry, path: String, size: u64, node: &str) -> Self {
        Pointer {
            cache_id: entry.cache_id.clone(),
            cache_key: entry.cache_key.clone(),
            path,
            model: entry.model.clone(),
            created: entry.created_at,
            expires: entry.expires_at,
            size,
            node: node.to_string(),
        }
    }
}

/// The metadata object: every field of the entry but the request and the response, plus the
/// sizes, for people browsing the bucket.
#[derive(Debug, Serialize)]
pub struct MetadataDoc<'a> {
    /// The cache id.
    pub cache_id: &'a str,
    /// The display key.
    pub cache_key: &'a str,
    /// The normalized model.
    pub model: &'a str,
    /// The provider.
    pub provider: &'a str,
    /// Tokens of the original call.
    pub tokens: strata_core::Tokens,
    /// Cost of the original call.
    pub cost: strata_core::Cost,
    /// Latency of the original call.
    pub latency_ms: u64,
    /// When the entry was written.
    pub created_at: DateTime<Utc>,
    /// When it expires.
    pub expires_at: Option<DateTime<Utc>>,
    /// Tags.
    pub tags: &'a [String],
    /// Scope kind (`global`, `namespace`, `user`, `session`); the id is not repeated here.
    pub scope: &'static str,
    /// Bytes of the canonical request.
    pub request_bytes: usize,
    /// Bytes of the response JSON.
    pub response_bytes: usize,
    /// Bytes of the entry object.
    pub object_bytes: u64,
}

impl<'a> MetadataDoc<'a> {
    /// The metadata of `entry`, whose object holds `object_bytes`.
    pub fn of(entry: &'a Entry, object_bytes: u64) -> Self {
        MetadataDoc {
            cache_id: &entry.cache_id,
            cache_key: &entry.cache_key,
            model: &entry.model,
            provider: &entry.provider,
            tokens: entry.tokens,
            cost: entry.cost,
            latency_ms: entry.latency_ms,
            created_at: entry.created_at,
            expires_at: entry.expires_at,
            tags: &entry.tags,
            scope: entry.scope.kind(),
            request_bytes: entry.request.len(),
            response_bytes: entry.response.get().len(),
            object_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Fuzz-style: any object name, under the prefix or not, is parsed or refused, never a
        /// panic; any bytes read as a pointer (a manifest line is one) or a control file
        /// likewise, and under a key no such bytes open as a control document.
        #[test]
        fn fuzz_object_names_and_documents_never_panic(
            tail in "\\PC{0,80}|[a-z0-9/._-]{0,80}",
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        ) {
            let layout = Layout::new("strata");
            for path in [
                tail.clone(),
                format!("strata/llm-cache/{tail}"),
                format!("strata/cache-index/by-hash/{tail}"),
                format!("strata/analytics/{tail}"),
            ] {
                let _ = layout.parse_entry_path(&path);
                let _ = layout.parse_pointer_path(&path);
                let _ = layout.parse_analytics_path(&path);
            }
            let _ = serde_json::from_slice::<Pointer>(&bytes);
            let _ = serde_json::from_slice::<strata_core::Epochs>(&bytes);
            let _ = serde_json::from_str::<Pointer>(&tail);
            let _ = serde_json::from_str::<strata_core::Epochs>(&tail);
            // Under a key, a control document of any bytes, at any path, is refused.
            let key = strata_core::Key::from_material(&[7; 40])
                .unwrap_or_else(|e| panic!("{e}"));
            let keys = strata_core::Keyring::new(key, Vec::new(), false);
            proptest::prop_assert!(keys.open_document(&tail, &bytes).is_err());
            let mut with_json = br#"{"all": 1}"#.to_vec();
            with_json.extend_from_slice(&bytes);
            proptest::prop_assert!(keys.open_document("strata/control/epochs.json", &with_json).is_err());
        }
    }

    #[test]
    fn paths_follow_the_documented_layout() {
        let at = Utc
            .with_ymd_and_hms(2026, 3, 7, 9, 41, 5)
            .single()
            .unwrap_or_default();
        for (prefix, root) in [("strata", "strata/"), ("strata/", "strata/"), ("", "")] {
            let l = Layout::new(prefix);
            assert_eq!(
                l.entry_dir("gpt-4o", at),
                format!("{root}llm-cache/gpt-4o/2026/03/07/09/")
            );
            assert_eq!(
                l.pointer_path("ab0123456789abcdef0123456789abcd"),
                format!("{root}cache-index/by-hash/ab/ab0123456789abcdef0123456789abcd.json")
            );
            assert_eq!(
                l.manifest_path(at, "node1", 12),
                format!("{root}cache-index/by-date/2026-03-07/node1-00000012.jsonl")
            );
        }
        assert_eq!(
            Layout::metadata_path("p/llm-cache/m/2026/03/07/09/x.json.zst"),
            "p/llm-cache/m/2026/03/07/09/x.metadata.json"
        );
    }

    #[test]
    fn entry_paths_parse_back() {
        let l = Layout::new("strata");
        let id = "0123456789abcdef0123456789abcdef";
        let path = format!("strata/llm-cache/gpt-4o-mini/2026/11/23/17/{id}.json.zst");
        let parsed = l.parse_entry_path(&path);
        assert_eq!(
            parsed
                .as_ref()
                .map(|p| (p.slug.as_str(), p.cache_id.as_str())),
            Some(("gpt-4o-mini", id))
        );
        assert_eq!(
            parsed.and_then(|p| p.key()).map(|k| k.to_string()),
            Some(format!("gpt-4o-mini_{id}"))
        );
        for bad in [
            format!("strata/llm-cache/gpt-4o-mini/2026/11/23/17/{id}.metadata.json"),
            format!("strata/llm-cache/gpt-4o-mini/2026/13/23/17/{id}.json.zst"),
            format!("other/llm-cache/gpt-4o-mini/2026/11/23/17/{id}.json.zst"),
            "strata/llm-cache/gpt-4o-mini/2026/11/23/17/short.json.zst".to_string(),
        ] {
            assert_eq!(l.parse_entry_path(&bad), None, "{bad}");
        }
    }
}
