//! The hottest keys, in bounded memory: the Space-Saving sketch (Metwally, Agrawal, El Abbadi,
//! "Efficient computation of frequent and top-k elements in data streams", 2005).
//!
//! The sketch keeps `capacity` counters. A key already counted is incremented; a new key takes the
//! slot of the smallest counter and inherits its count as an error bound. Every key hit more than
//! `total / capacity` times is guaranteed to be in the sketch, and each count overestimates the
//! true one by at most its `error`.
//!
//! The counters are also ordered by count, so that finding the smallest is a logarithmic step, not
//! a scan: when more keys are hit than there are counters, every hit of a key not counted takes a
//! slot.

use std::collections::{BTreeSet, HashMap};

use memchr::memmem;
use serde::{Deserialize, Serialize};
use strata_core::Entry;

/// One of the hottest keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotKey {
    /// The display key, `{model_slug}_{32 hex}`.
    pub cache_key: String,
    /// The model.
    pub model: String,
    /// The start of the request's last message, for people to recognise it.
    pub preview: String,
    /// Hits counted (an overestimate by at most `error`).
    pub hits: u64,
    /// The most `hits` can overestimate by.
    pub error: u64,
}

#[derive(Debug)]
struct Slot {
    key: HotKey,
}

/// A Space-Saving sketch of hits per key.
#[derive(Debug)]
pub struct Sketch {
    capacity: usize,
    slots: HashMap<u128, Slot>,
    /// `(hits, id)` of every slot: the first is the one a new key takes.
    by_hits: BTreeSet<(u64, u128)>,
}

/// How many characters of a request a preview keeps.
pub const PREVIEW_CHARS: usize = 72;

impl Sketch {
    /// An empty sketch of `capacity` counters (at least 1).
    pub fn new(capacity: usize) -> Self {
        Sketch {
            capacity: capacity.max(1),
            slots: HashMap::new(),
            by_hits: BTreeSet::new(),
        }
    }

    /// A sketch holding `keys` (as saved by [`Sketch::top`]).
    pub fn from_keys(capacity: usize, keys: Vec<HotKey>) -> Self {
        let mut sketch = Sketch::new(capacity);
        for key in keys.into_iter().take(sketch.capacity) {
            if let Some(id) = id_of(&key.cache_key)
                && !sketch.slots.contains_key(&id)
            {
                sketch.by_hits.insert((key.hits, id));
                sketch.slots.insert(id, Slot { key });
            }
        }
        sketch
    }

    /// Counts one hit of `entry`. A key counted for the first time gets its preview now: the
    /// sketch keeps no entry alive (and never frees one, see `recorder`).
    pub fn hit(&mut self, id: u128, entry: &Entry) {
        if let Some(slot) = self.slots.get_mut(&id) {
            self.by_hits.remove(&(slot.key.hits, id));
            slot.key.hits += 1;
            // First counted from an event that carried no request text (see `recorder`).
            if slot.key.preview.is_empty() && !entry.request.is_empty() {
                slot.key.preview = preview(&entry.request);
            }
            self.by_hits.insert((slot.key.hits, id));
            return;
        }
        let mut inherited = 0;
        if self.slots.len() >= self.capacity
            && let Some((hits, old)) = self.by_hits.pop_first()
        {
            self.slots.remove(&old);
            inherited = hits;
        }
        self.by_hits.insert((inherited + 1, id));
        self.slots.insert(
            id,
            Slot {
                key: HotKey {
                    cache_key: entry.cache_key.clone(),
                    model: entry.model.clone(),
                    preview: preview(&entry.request),
                    hits: inherited + 1,
                    error: inherited,
                },
            },
        );
    }

    /// The `n` keys with the most hits, most first.
    pub fn top(&self, n: usize) -> Vec<HotKey> {
        let mut keys: Vec<&Slot> = self.slots.values().collect();
        keys.sort_by(|a, b| {
            b.key
                .hits
                .cmp(&a.key.hits)
                .then_with(|| a.key.cache_key.cmp(&b.key.cache_key))
        });
        keys.into_iter()
            .take(n)
            .map(|slot| slot.key.clone())
            .collect()
    }

    /// Keys counted.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no key is counted.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// Merges hot keys from several nodes: counts of the same key add up; the `n` largest are kept.
pub fn merge_hot_keys(lists: impl IntoIterator<Item = Vec<HotKey>>, n: usize) -> Vec<HotKey> {
    let mut by_key: HashMap<String, HotKey> = HashMap::new();
    for key in lists.into_iter().flatten() {
        match by_key.get_mut(&key.cache_key) {
            Some(have) => {
                have.hits = have.hits.saturating_add(key.hits);
                have.error = have.error.saturating_add(key.error);
            }
            None => {
                by_key.insert(key.cache_key.clone(), key);
            }
        }
    }
    let mut all: Vec<HotKey> = by_key.into_values().collect();
    all.sort_by(|a, b| {
        b.hits
            .cmp(&a.hits)
            .then_with(|| a.cache_key.cmp(&b.cache_key))
    });
    all.truncate(n);
    all
}

/// The digest of a display key (`{slug}_{32 hex}`).
fn id_of(cache_key: &str) -> Option<u128> {
    let (_, hex) = cache_key.rsplit_once('_')?;
    u128::from_str_radix(hex, 16).ok()
}

/// The start of the last message's text of a canonical request (the length-prefixed form that
/// entries store, `"7:content:"5:hello`), on one line.
pub fn preview(canonical: &str) -> String {
    let text = last_text(canonical).unwrap_or(canonical);
    // The words joined by single spaces, cut after PREVIEW_CHARS characters.
    let mut out = String::with_capacity(PREVIEW_CHARS + 8);
    let (mut written, mut space) = (0, false);
    for c in text.chars() {
        if c.is_whitespace() {
            space = written > 0;
            continue;
        }
        for c in [' ', c].into_iter().skip(usize::from(!space)) {
            if written == PREVIEW_CHARS {
                out.push('…');
                return out;
            }
            out.push(c);
            written += 1;
        }
        space = false;
    }
    out
}

/// The text of the last `content` member (with none, of the last `input`, then `prompt`): a
/// string, or the first `text` part of a list. One pass forward over the request's tokens that
/// steps over each string by its length, so the text itself (most of a request) is not scanned,
/// and a marker written inside some text is not taken for a member.
fn last_text(canonical: &str) -> Option<&str> {
    const NAMES: [&str; 3] = ["content", "input", "prompt"];
    let bytes = canonical.as_bytes();
    let mut after = [None; NAMES.len()];
    let mut at = 0;
    while let Some(&b) = bytes.get(at) {
        if b != b'"' {
            at += 1;
            continue;
        }
        let (string, end) = string_at(canonical, at)?;
        if bytes.get(end) == Some(&b':')
            && let Some(i) = NAMES.iter().position(|name| *name == string)
        {
            after[i] = Some(end + 1);
        }
        at = end;
    }
    let rest = canonical.get(after.into_iter().flatten().next()?..)?;
    let value = if rest.starts_with('"') {
        0
    } else {
        memmem::find(rest.as_bytes(), b"\"4:text:")? + "\"4:text:".len()
    };
    string_at(rest, value).map(|(text, _)| text)
}

/// The length-prefixed string (`"5:hello`) that starts at byte `at` of `s`, and where it ends.
fn string_at(s: &str, at: usize) -> Option<(&str, usize)> {
    let rest = s.get(at..)?.strip_prefix('"')?;
    let (len, body) = rest.split_once(':')?;
    let start = s.len() - body.len();
    let end = start.checked_add(len.parse().ok()?)?;
    Some((s.get(start..end)?, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_entry;
    use std::sync::Arc;
    use strata_core::{Normalizer, Scope};

    fn entry(text: &str) -> (u128, Arc<Entry>) {
        let e = test_entry::entry(text, 0.0, (0, 0), 0);
        let id = u128::from_str_radix(&e.cache_id, 16).unwrap_or_else(|e| panic!("{e}"));
        (id, Arc::new(e))
    }

    #[test]
    fn heavy_hitters_survive_a_stream_of_one_off_keys() {
        let mut sketch = Sketch::new(8);
        let hot: Vec<_> = (0..3).map(|i| entry(&format!("hot {i}"))).collect();
        for round in 0..200 {
            for (i, (id, e)) in hot.iter().enumerate() {
                for _ in 0..=i {
                    sketch.hit(*id, e);
                }
            }
            let (id, e) = entry(&format!("cold {round}"));
            sketch.hit(id, &e);
        }
        assert!(sketch.len() <= 8);
        let top = sketch.top(3);
        let names: Vec<&str> = top.iter().map(|k| k.preview.as_str()).collect();
        assert_eq!(names, ["hot 2", "hot 1", "hot 0"]);
        assert!(top[0].hits >= 600 && top[0].hits - top[0].error <= 600);
        let saved = Sketch::from_keys(8, top.clone()).top(3);
        assert_eq!(saved, top);
    }

    #[test]
    fn merged_counts_add_up_per_key() {
        let a = HotKey {
            cache_key: "m_00000000000000000000000000000001".into(),
            model: "m".into(),
            preview: "x".into(),
            hits: 5,
            error: 0,
        };
        let mut b = a.clone();
        b.hits = 7;
        let mut c = a.clone();
        c.cache_key = "m_00000000000000000000000000000002".into();
        c.hits = 9;
        let merged = merge_hot_keys([vec![a], vec![b, c]], 10);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].hits, 12);
        assert_eq!(merged[1].hits, 9);
    }

    #[test]
    fn previews_are_short_single_lines() {
        let long = format!("  first line\n{}", "word ".repeat(40));
        let request =
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": long}]});
        let keyed = Normalizer::new(strata_core::Profile::Strict)
            .key(&request, &Scope::Global)
            .unwrap_or_else(|e| panic!("{e}"));
        let p = preview(&keyed.canonical);
        assert!(p.starts_with("first line word"));
        assert!(p.chars().count() <= PREVIEW_CHARS + 1);
        assert!(!p.contains('\n'));
    }

    fn canonical_of(request: &serde_json::Value) -> String {
        Normalizer::default()
            .key(request, &Scope::Global)
            .unwrap_or_else(|e| panic!("{e}"))
            .canonical
    }

    #[test]
    fn the_preview_is_the_last_messages_text_even_when_a_text_looks_like_a_member() {
        // The user's text holds what a `content` member looks like in the canonical form.
        let request = serde_json::json!({"model": "m", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "quote \"7:content:\"5:wrong here"}]},
        ], "temperature": 0.5});
        assert_eq!(
            preview(&canonical_of(&request)),
            "quote \"7:content:\"5:wrong here"
        );
        let request = serde_json::json!({"model": "m", "input": "  only   input\n"});
        assert_eq!(preview(&canonical_of(&request)), "only input");
        // Text that is no canonical request at all (a typed value's key) is shown as it is.
        assert_eq!(preview("user:\"42  and more"), "user:\"42 and more");
    }

    /// The words of `text` joined by single spaces, cut after [`PREVIEW_CHARS`] characters: the
    /// definition the preview's single pass must agree with.
    fn joined_words(text: &str) -> String {
        let joined: Vec<char> = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .collect();
        let mut out: String = joined.iter().take(PREVIEW_CHARS).collect();
        if joined.len() > PREVIEW_CHARS {
            out.push('…');
        }
        out
    }

    proptest::proptest! {
        #[test]
        fn previews_join_words_by_single_spaces_and_cut_at_the_limit(
            text in "[ a-zé\t\n\u{3000}]{0,200}"
        ) {
            let request = serde_json::json!({"model": "m", "messages": [
                {"role": "user", "content": text.clone()},
            ]});
            // What the canonical form keeps of the text (the default profile trims its ends).
            let expected = joined_words(&text);
            proptest::prop_assert_eq!(preview(&canonical_of(&request)), expected);
        }
    }
}
