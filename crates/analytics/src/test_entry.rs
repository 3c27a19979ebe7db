//! One way to make entries for this crate's unit tests.

use strata_core::{Cost, Entry, Normalizer, Scope, Tokens};

/// An entry of model `m`, provider `p`, for a one-message request saying `text`.
pub(crate) fn entry(text: &str, cost: f64, tokens: (u64, u64), latency_ms: u64) -> Entry {
    let request =
        serde_json::json!({"model": "m", "messages": [{"role": "user", "content": text}]});
    let keyed = Normalizer::default()
        .key(&request, &Scope::Global)
        .unwrap_or_else(|e| panic!("{e}"));
    let now = chrono::Utc::now();
    Entry {
        cache_id: keyed.key.hex(),
        cache_key: keyed.key.to_string(),
        request: keyed.canonical,
        response: strata_core::JsonText::parse("1".into()).unwrap_or_else(|e| panic!("{e}")),
        model: "m".into(),
        provider: "p".into(),
        tokens: Tokens {
            input: tokens.0,
            output: tokens.1,
        },
        cost: Cost {
            input: 0.0,
            output: 0.0,
            total: cost,
        },
        latency_ms,
        created_at: now,
        expires_at: None,
        tags: vec![],
        scope: Scope::Global,
        hit_count: 0,
        last_accessed: now,
        epochs: Default::default(),
    }
}
