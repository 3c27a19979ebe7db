//! [`KeyMemo`]: keys of request texts already derived, so that a request sent again byte for
//! byte skips parsing and normalization.
//!
//! Deriving a key parses the request's JSON, walks it into its canonical form and hashes that
//! with MD5; for a 2 KB chat request that is most of a memory-tier hit. Callers that hold the
//! request as text (the Python package) send the same bytes for the same request, so the memo
//! maps `(request bytes, scope)` to the [`Keyed`] they gave. It is exact: an entry is used only
//! when its bytes and scope equal the lookup's, the fast hash only chooses where to look, and
//! the normalizer it memoizes is fixed for the cache's life. It is bounded in bytes (the request
//! and its canonical form, weighed), apart from the memory tier's bound; 0 turns it off.

use std::hash::BuildHasher;
use std::sync::Arc;

use strata_core::{Keyed, Normalizer, RequestError, Scope};

/// Fixed cost counted for each memoized request, beyond its bytes.
const OVERHEAD: usize = 160;

/// One memoized request: its text and scope, and the key they gave.
struct Memoized {
    request: Box<[u8]>,
    keyed: Arc<Keyed>,
}

/// Keys of request texts already derived, bounded in bytes.
pub(crate) struct KeyMemo {
    /// `None`: off (a capacity of 0).
    entries: Option<moka::sync::Cache<u64, Arc<Memoized>>>,
    hasher: foldhash::quality::RandomState,
}

impl KeyMemo {
    /// A memo holding up to `capacity` bytes of requests and keys.
    pub(crate) fn new(capacity: u64) -> Self {
        let entries = (capacity > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(capacity)
                .weigher(|_, m: &Arc<Memoized>| {
                    let bytes =
                        m.request.len() + m.keyed.canonical.len() + m.keyed.model.len() + OVERHEAD;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .build()
        });
        KeyMemo {
            entries,
            hasher: foldhash::quality::RandomState::default(),
        }
    }

    /// The key of `request` (JSON text) in `scope`: the memoized one if these bytes were keyed
    /// in this scope before, else derived by `normalizer` and remembered. A request that cannot
    /// be keyed is an error each time, never remembered.
    pub(crate) fn key(
        &self,
        normalizer: &Normalizer,
        request: &[u8],
        scope: &Scope,
    ) -> Result<Arc<Keyed>, RequestError> {
        let Some(entries) = &self.entries else {
            return derive(normalizer, request, scope).map(Arc::new);
        };
        let hash = self.hasher.hash_one((request, scope));
        if let Some(found) = entries.get(&hash)
            && *found.request == *request
            && found.keyed.scope == *scope
        {
            return Ok(Arc::clone(&found.keyed));
        }
        let keyed = Arc::new(derive(normalizer, request, scope)?);
        entries.insert(
            hash,
            Arc::new(Memoized {
                request: request.into(),
                keyed: Arc::clone(&keyed),
            }),
        );
        Ok(keyed)
    }

    /// Bytes held (an estimate, as moka weighs them).
    #[cfg(test)]
    fn weight(&self) -> u64 {
        self.entries.as_ref().map_or(0, |e| {
            e.run_pending_tasks();
            e.weighted_size()
        })
    }
}

fn derive(normalizer: &Normalizer, request: &[u8], scope: &Scope) -> Result<Keyed, RequestError> {
    let value: serde_json::Value =
        serde_json::from_slice(request).map_err(|e| RequestError::Json(e.to_string()))?;
    normalizer.key(&value, scope)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> Vec<u8> {
        format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{text}"}}]}}"#)
            .into_bytes()
    }

    #[test]
    fn a_memoized_key_is_the_derived_key_in_its_own_scope() {
        let normalizer = Normalizer::default();
        let memo = KeyMemo::new(1 << 20);
        let alice = Scope::User("alice".into());
        for _ in 0..3 {
            for (text, scope) in [("hi", &Scope::Global), ("hi", &alice), (" hi ", &alice)] {
                let got = memo.key(&normalizer, &request(text), scope).unwrap();
                let want = derive(&normalizer, &request(text), scope).unwrap();
                assert_eq!(got.key, want.key);
                assert_eq!(got.canonical, want.canonical);
                assert_eq!(got.scope, *scope);
            }
        }
        let global = memo
            .key(&normalizer, &request("hi"), &Scope::Global)
            .unwrap();
        let user = memo.key(&normalizer, &request("hi"), &alice).unwrap();
        assert_ne!(global.key, user.key);
    }

    #[test]
    fn malformed_requests_are_errors_every_time_and_off_means_derived() {
        let normalizer = Normalizer::default();
        for memo in [KeyMemo::new(1 << 20), KeyMemo::new(0)] {
            for _ in 0..2 {
                assert!(memo.key(&normalizer, b"{not json", &Scope::Global).is_err());
                assert!(memo.key(&normalizer, b"[1,2]", &Scope::Global).is_err());
            }
            let keyed = memo
                .key(&normalizer, &request("x"), &Scope::Global)
                .unwrap();
            assert_eq!(
                keyed.key,
                derive(&normalizer, &request("x"), &Scope::Global)
                    .unwrap()
                    .key
            );
        }
    }

    #[test]
    fn the_memo_stays_within_its_bound() {
        let normalizer = Normalizer::default();
        let memo = KeyMemo::new(64 << 10);
        for i in 0..2_000 {
            memo.key(
                &normalizer,
                &request(&format!("question {i}")),
                &Scope::Global,
            )
            .unwrap();
        }
        let weight = memo.weight();
        assert!(weight > 0 && weight <= 64 << 10, "{weight}");
    }
}
