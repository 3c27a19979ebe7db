//! strata: a tiered cache for LLM responses — memory (moka), local disk (sled) and, shared by
//! every machine, S3-compatible object storage — that tells you what it saved.
//!
//! This crate is the facade: it re-exports the pieces and adds configuration and replay.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use strata::{Completion, Config, Scope};
//! let cache = strata::Config::load_default()?.open_cache().await?;
//! let request = serde_json::json!({
//!     "model": "gpt-4o-mini",
//!     "messages": [{"role": "user", "content": "What is the capital of France?"}],
//! });
//! let lookup = cache
//!     .get_or_execute(&request, &Scope::Global, || async {
//!         // Call the LLM here; this runs only on a miss.
//!         let response = serde_json::json!({"choices": [{"message": {"role": "assistant", "content": "Paris."}}],
//!                                           "usage": {"prompt_tokens": 14, "completion_tokens": 2}});
//!         Ok::<_, std::io::Error>(Completion::from_value(&response).provider("openai"))
//!     })
//!     .await?;
//! println!("{:?}: {}", lookup.outcome, lookup.response());
//! cache.close().await?;
//! # Ok(()) }
//! ```

/// The README's Rust examples, compiled as doctests so that they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub mod config;
pub mod replay;

pub use config::Config;
pub use strata_analytics::{self as analytics, Outcome, Pricing, Stats};
pub use strata_core::{self as core, CacheKey, Entry, Normalizer, Profile, Scope};
pub use strata_http::{self as http, Gateway};
pub use strata_tiers::{self as tiers, Completion, Lookup, TieredCache};

/// Errors of the facade: configuration, opening tiers, reading workloads.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad or missing configuration value; the message names it.
    #[error("configuration: {0}")]
    Config(String),
    /// A price table could not be read.
    #[error(transparent)]
    Pricing(#[from] strata_analytics::PricingError),
    /// A tier could not be opened or flushed.
    #[error(transparent)]
    Tier(#[from] strata_tiers::TierError),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}
