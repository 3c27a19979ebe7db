//! The stored entry: one LLM exchange with what it cost.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::key::Keyed;
use crate::scope::Scope;

/// Token counts of the original call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    /// Prompt (input) tokens.
    pub input: u64,
    /// Completion (output) tokens.
    pub output: u64,
}

impl Tokens {
    /// Input plus output tokens.
    pub fn total(&self) -> u64 {
        self.input + self.output
    }
}

/// Cost of the original call in USD.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// Cost of the input tokens.
    pub input: f64,
    /// Cost of the output tokens.
    pub output: f64,
    /// What the call cost in all (may exceed input + output when the caller says so).
    pub total: f64,
}

/// One cached answer, as stored in every tier.
///
/// `request` is the canonical text the key was derived from, compared byte for byte before an
/// entry is served ([`Entry::answers`]); `response` is raw JSON text, handed back exactly as the
/// provider returned it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// The 32 hex digits of the key's digest.
    pub cache_id: String,
    /// The display key, `{model_slug}_{32 hex}`.
    pub cache_key: String,
    /// The canonical request the key was derived from ([`Keyed::canonical`]).
    #[serde(default)]
    pub request: String,
    /// The response, as given.
    #[serde(default = "JsonText::null")]
    pub response: JsonText,
    /// The normalized model.
    pub model: String,
    /// Who served the original call (`openai`, `anthropic`, …).
    pub provider: String,
    /// Tokens of the original call.
    pub tokens: Tokens,
    /// Cost of the original call.
    pub cost: Cost,
    /// How long the original call took.
    pub latency_ms: u64,
    /// When the entry was written.
    #[serde(with = "chrono::serde::ts_milliseconds")]
    pub created_at: DateTime<Utc>,
    /// When the entry stops being served; `None` for never.
    #[serde(with = "chrono::serde::ts_milliseconds_option", default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// Caller-given labels (`jobs:42`, `team:search`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Who may see the entry; part of the key.
    pub scope: Scope,
    /// Hits counted on the copy this entry was read from.
    #[serde(default)]
    pub hit_count: u64,
    /// Last time this copy was written or read into a tier.
    #[serde(with = "chrono::serde::ts_milliseconds")]
    pub last_accessed: DateTime<Utc>,
    /// Invalidation epochs in force when the entry was written.
    #[serde(default)]
    pub epochs: BTreeMap<String, u64>,
}

/// One JSON value as text, handed back exactly as it was given.
///
/// The text is checked to be JSON where it enters the cache: an executor hands it over as a
/// [`RawValue`], and [`Codec::decode`](crate::Codec::decode) parses what it reads from storage
/// other nodes share. A copy read back from this node's own disk is not parsed again
/// ([`Codec::decode_local`](crate::Codec::decode_local)): its checksum vouches that it is the text
/// written, and checking it again took a tenth of an L2 hit.
#[derive(Clone, PartialEq, Eq)]
pub struct JsonText(Box<str>);

impl JsonText {
    /// `null`.
    pub fn null() -> Self {
        JsonText("null".into())
    }

    /// Checks that `text` is one JSON value and keeps it as it is.
    pub fn parse(text: String) -> serde_json::Result<Self> {
        RawValue::from_string(text).map(JsonText::from)
    }

    /// Text written as JSON by this node (see the type's documentation); not parsed again.
    pub(crate) fn checked_when_written(text: String) -> Self {
        JsonText(text.into_boxed_str())
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        &self.0
    }
}

impl From<Box<RawValue>> for JsonText {
    fn from(raw: Box<RawValue>) -> Self {
        JsonText(raw.into())
    }
}

impl fmt::Display for JsonText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for JsonText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("JsonText")
            .field(&format_args!("{}", &self.0))
            .finish()
    }
}

/// Written as the JSON value itself (not as a string), as a [`RawValue`] is.
impl Serialize for JsonText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw: &RawValue = serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(deserializer).map(JsonText::from)
    }
}

/// Bytes an entry held in the memory tier costs beyond its texts: the `Entry` itself in its
/// `Arc`, moka's node, key and queue links, and the allocator's header on each of its ten or so
/// allocations. Measured, not derived: with 256 here, the resident memory of a replay grew by
/// 1.125 bytes per byte of memory-tier bound (144 MiB from a 128 MiB bound to 256 MiB, ShareGPT
/// entries of 4.5 KB on average), about 560 bytes per entry more than the tier counted.
pub const HELD_BESIDE_TEXTS: usize = 800;

impl Entry {
    /// Whether this entry is the answer to `keyed`: same canonical request, byte for byte, and same
    /// scope. A digest collision, accidental or crafted, fails this check and becomes a miss.
    ///
    /// The names an entry is invalidated by must be the key's too: its model, its cache id and
    /// its display key. An entry from a shared bucket that says another model or key (to slip
    /// past `invalidate --model`, `--key` or `--pattern`) answers nothing.
    pub fn answers(&self, keyed: &Keyed) -> bool {
        self.request == keyed.canonical
            && self.scope == keyed.scope
            && self.model == keyed.model
            && keyed.key.hex_matches(&self.cache_id)
            && keyed.key.display_matches(&self.cache_key)
    }

    /// Whether the entry says it was written later than `latest` (now plus the clock skew
    /// allowed between nodes): no node wrote it so, and a forged date in the future would
    /// outlive every age-based invalidation.
    pub fn written_after(&self, latest: DateTime<Utc>) -> bool {
        self.created_at > latest
    }

    /// Whether the entry has expired at `now`.
    pub fn is_expired_at(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Approximate bytes the entry holds in memory: what the memory tier weighs. Its texts,
    /// plus [`HELD_BESIDE_TEXTS`] for what holds them.
    pub fn weight(&self) -> u32 {
        let text = self.request.len()
            + self.response.get().len()
            + self.cache_id.len()
            + self.cache_key.len()
            + self.model.len()
            + self.provider.len()
            + self.tags.iter().map(|t| t.len() + 24).sum::<usize>()
            + self.epochs.keys().map(|k| k.len() + 48).sum::<usize>();
        u32::try_from(text + HELD_BESIDE_TEXTS).unwrap_or(u32::MAX)
    }

    /// Parses the response into `T`.
    pub fn response_as<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_str(self.response.get())
    }
}

impl Tokens {
    /// Reads token counts from a response's `usage` object: OpenAI (`prompt_tokens`,
    /// `completion_tokens`) or Anthropic / Responses API (`input_tokens`, `output_tokens`).
    /// Missing counts are zero.
    pub fn from_response(response: &RawValue) -> Tokens {
        #[derive(Deserialize)]
        struct Usage {
            #[serde(alias = "input_tokens", default)]
            prompt_tokens: u64,
            #[serde(alias = "output_tokens", default)]
            completion_tokens: u64,
        }
        #[derive(Deserialize)]
        struct WithUsage {
            usage: Option<Usage>,
        }
        match serde_json::from_str::<WithUsage>(response.get()) {
            Ok(WithUsage { usage: Some(u) }) => Tokens {
                input: u.prompt_tokens,
                output: u.completion_tokens,
            },
            _ => Tokens::default(),
        }
    }
}
