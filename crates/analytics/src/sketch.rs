//! The hottest keys, in bounded memory: the Space-Saving sketch (Metwally, Agrawal, El Abbadi,
//! "Efficient computation of frequent and top-k elements in data streams", 2005).
//!
//! The sketch keeps `capacity` counters. A key already counted is incremented; a new key takes the
//! slot of the smallest counter and inherits its count as an error bound. Every key hit more than
//! `total / capacity` times is guaranteed to be in the sketch, and each count overestimates the
//! true one by at most its `error`.

use std::collections::HashMap;

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
}

/// How many characters of a request a preview keeps.
pub const PREVIEW_CHARS: usize = 72;

impl Sketch {
    /// An empty sketch of `capacity` counters (at least 1).
    pub fn new(capacity: usize) -> Self {
        Sketch {
            capacity: capacity.max(1),
            slots: HashMap::new(),
        }
    }

    /// A sketch holding `keys` (as saved by [`Sketch::top`]).
    pub fn from_keys(capacity: usize, keys: Vec<HotKey>) -> Self {
        let mut sketch = Sketch::new(capacity);
        for key in keys.into_iter().take(sketch.capacity) {
            if let Some(id) = id_of(&key.cache_key) {
                sketch.slots.insert(id, Slot { key });
            }
        }
        sketch
    }

    /// Counts one hit of `entry`. A key counted for the first time gets its preview now: the
    /// sketch keeps no entry alive (and never frees one, see `recorder`).
    pub fn hit(&mut self, id: u128, entry: &Entry) {
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.key.hits += 1;
            return;
        }
        let mut inherited = 0;
        if self.slots.len() >= self.capacity {
            let smallest = self
                .slots
                .iter()
                .min_by_key(|(_, slot)| slot.key.hits)
                .map(|(id, slot)| (*id, slot.key.hits));
            if let Some((old, hits)) = smallest {
                self.slots.remove(&old);
                inherited = hits;
            }
        }
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
    let joined = text
        .split_whitespace()
        .enumerate()
        .flat_map(|(i, word)| (i > 0).then_some(' ').into_iter().chain(word.chars()));
    let mut out = String::new();
    for (n, c) in joined.enumerate() {
        if n == PREVIEW_CHARS {
            out.push('…');
            break;
        }
        out.push(c);
    }
    out
}

/// The text of the last `content` (or `input`, `prompt`) field: a string, or the first `text`
/// part of a list.
fn last_text(canonical: &str) -> Option<&str> {
    let after = ["\"7:content:", "\"5:input:", "\"6:prompt:"]
        .iter()
        .find_map(|marker| canonical.rfind(marker).map(|at| at + marker.len()))?;
    let rest = canonical.get(after..)?;
    let rest = if rest.starts_with('"') {
        rest
    } else {
        let at = rest.find("\"4:text:")?;
        rest.get(at + "\"4:text:".len()..)?
    };
    let rest = rest.strip_prefix('"')?;
    let (len, body) = rest.split_once(':')?;
    body.get(..len.parse::<usize>().ok()?)
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
}
