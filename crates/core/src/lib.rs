//! strata-core: everything about a cache entry that does not depend on where it is stored.
//!
//! - [`normalize`]: the request model and the normalization profiles that turn an LLM request
//!   (OpenAI Chat Completions, Anthropic Messages or Responses-API shape) into canonical bytes.
//! - [`key`]: cache keys, the MD5 of the canonical bytes together with the [`Scope`] and the
//!   key-format version.
//! - [`entry`]: the stored [`Entry`] (request, response, cost, tokens, expiry, …).
//! - [`epochs`]: invalidation [`Epochs`] and [`Selector`]s: O(1) bulk invalidation.
//! - [`codec`]: the versioned, checksummed [`Envelope`](codec) that entries travel in on disk and
//!   in object storage.
//!
//! ```
//! use strata_core::{Normalizer, Profile, Scope};
//! let normalizer = Normalizer::new(Profile::Standard);
//! let request = serde_json::json!({
//!     "model": "GPT-4o-mini",
//!     "messages": [{"role": "user", "content": "  What is 2+2?  "}],
//! });
//! let keyed = normalizer.key(&request, &Scope::Global).unwrap();
//! assert!(keyed.key.to_string().starts_with("gpt-4o-mini_"));
//! ```

pub mod codec;
pub mod entry;
pub mod epochs;
pub mod error;
pub mod key;
pub mod keys;
pub mod normalize;
pub mod scope;
pub mod secret;

pub use codec::{Codec, CodecError};
pub use entry::{Cost, Entry, JsonText, Tokens};
pub use epochs::{CLOCK_SKEW, Epochs, Selector};
pub use error::RequestError;
pub use key::{CacheKey, KEY_FORMAT_VERSION, Keyed, ModelSlug};
pub use keys::{Key, KeyError, Keyring};
pub use normalize::{Explanation, FieldAction, FieldReport, Normalizer, Profile};
pub use scope::Scope;
pub use secret::Secret;
