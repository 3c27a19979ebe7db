//! Normalization profiles: from an LLM request to canonical bytes.
//!
//! The canonical form is JSON with object keys sorted, numbers in one form (`1.0` and `1` are the
//! same number, written `1`), `null` members and members at their documented default left out.
//! The [`Profile`] decides what else is treated as "the same request". The writer walks the parsed
//! request once and writes canonical bytes straight into the key's hasher: no intermediate tree
//! is built.
//!
//! Keys hash (and entries store) this document with every string written length-prefixed,
//! `"` + byte length + `:` + the bytes (`{"5:model:"6:gpt-4o,…}`), instead of quoted and escaped:
//! the two forms map one to one, but the length-prefixed one costs a copy where JSON escaping
//! costs a scan of every byte, and the key is on every lookup. [`Normalizer::canonical_json`]
//! and `explain` show the JSON form.
//!
//! Message order is never changed: it carries meaning. Unknown fields are kept (canonicalized), so
//! a provider-specific parameter can never be silently merged away.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::error::RequestError;
use crate::key::{KeyWriter, Keyed, ModelSlug, Strings};
use crate::scope::Scope;

/// How much two requests may differ and still share an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Canonical JSON only: key order, number form, `null`s and documented defaults.
    Strict,
    /// Strict, plus: message text trimmed at both ends, role and model lowercased, model aliases,
    /// `temperature`/`top_p` rounded to 2 decimals, non-semantic fields (`user`, `metadata`,
    /// `stream`, …) dropped.
    #[default]
    Standard,
    /// Standard, plus: inner whitespace collapsed and message text lowercased. This can merge
    /// requests whose right answers differ (code, case-sensitive questions); opt in knowingly.
    Aggressive,
}

impl Profile {
    /// The profile's name as used in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Strict => "strict",
            Profile::Standard => "standard",
            Profile::Aggressive => "aggressive",
        }
    }

    /// The byte that stands for the profile in a key (see [`Normalizer::key`]).
    pub fn key_tag(self) -> u8 {
        match self {
            Profile::Strict => 1,
            Profile::Standard => 2,
            Profile::Aggressive => 3,
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "strict" => Ok(Profile::Strict),
            "standard" => Ok(Profile::Standard),
            "aggressive" => Ok(Profile::Aggressive),
            other => Err(format!(
                "unknown normalization profile `{other}` (expected strict, standard or aggressive)"
            )),
        }
    }
}

/// Top-level fields that do not change the answer; dropped by `standard` and `aggressive`.
///
/// `store` is not one of them: a Responses-API answer given with `store: true` has an id that
/// `previous_response_id` can continue from; one given with `store: false` has not.
pub const NON_SEMANTIC_FIELDS: &[&str] = &[
    "user",
    "metadata",
    "stream",
    "stream_options",
    "request_id",
    "idempotency_key",
    "timeout",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
];

/// Top-level fields with a documented default: a request that sets one to its default is the same
/// request as one that leaves it out, in every profile.
const DEFAULTS: &[(&str, DefaultValue)] = &[
    ("temperature", DefaultValue::Number(1.0)),
    ("top_p", DefaultValue::Number(1.0)),
    ("n", DefaultValue::Number(1.0)),
    ("presence_penalty", DefaultValue::Number(0.0)),
    ("frequency_penalty", DefaultValue::Number(0.0)),
    ("stream", DefaultValue::Bool(false)),
    ("logprobs", DefaultValue::Bool(false)),
    ("parallel_tool_calls", DefaultValue::Bool(true)),
];

#[derive(Clone, Copy)]
enum DefaultValue {
    Number(f64),
    Bool(bool),
}

impl DefaultValue {
    fn matches(self, value: &Value) -> bool {
        match (self, value) {
            (DefaultValue::Number(d), Value::Number(n)) => n.as_f64() == Some(d),
            (DefaultValue::Bool(d), Value::Bool(b)) => d == *b,
            _ => false,
        }
    }
}

/// Fields whose string value (or text parts) is message text.
///
/// Not a legacy Completions `prompt`: the model continues from its last character, so a
/// trailing space or newline changes the answer (and an array of prompts is a batch, not parts).
const TEXT_FIELDS: &[&str] = &["system", "instructions"];

/// How deeply a request may nest. serde_json's parser stops below 128 levels, so only a `Value`
/// built in code can go deeper, and the canonical writer recurses once per level.
pub const MAX_DEPTH: usize = 128;

/// Turns requests into canonical bytes and keys under one [`Profile`] and a table of model aliases.
#[derive(Debug, Clone, Default)]
pub struct Normalizer {
    profile: Profile,
    aliases: HashMap<String, String>,
}

/// What normalization did to one top-level field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldAction {
    /// In the key as given (canonicalized).
    Kept,
    /// In the key after a change.
    Transformed,
    /// Not in the key.
    Dropped,
}

/// One line of an [`Explanation`].
#[derive(Debug, Clone, Serialize)]
pub struct FieldReport {
    /// The top-level field.
    pub field: String,
    /// Whether it went into the key.
    pub action: FieldAction,
    /// How, in words.
    pub detail: String,
}

/// Which fields went into a key and how each was transformed.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The profile used.
    pub profile: Profile,
    /// The display key.
    pub key: String,
    /// The normalized model.
    pub model: String,
    /// The scope the key was derived in.
    pub scope: Scope,
    /// One report per top-level field of the request.
    pub fields: Vec<FieldReport>,
    /// The canonical request, as JSON.
    pub canonical: Box<RawValue>,
}

/// Where a value sits, which decides the rules applied to it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Anything without special rules: canonical JSON only.
    Plain,
    /// A string that is message text (or holds text parts), and which ends of the message's
    /// text it holds.
    Text(Ends),
    /// An array of messages (or Responses-API input items), and whether each must be an object
    /// with a string `role` (chat `messages`; input items need not have one).
    Messages(Roles),
    /// One message object.
    Message,
}

/// Whether the items of a [`Place::Messages`] array must be objects with a string `role`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Roles {
    Required,
    Optional,
}

/// Which ends of a message's text a string holds: a plain string holds both, the text parts of a
/// list only the start of the first and the end of the last (images and other parts are not
/// text). Only those are trimmed, so the whitespace where two text parts meet (`"sun "`,
/// `"flower"`) stays in the key.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Ends {
    start: bool,
    end: bool,
}

impl Ends {
    const BOTH: Ends = Ends {
        start: true,
        end: true,
    };

    /// The positions of the first and the last text part of `parts`.
    fn text_span(parts: &[Value]) -> (Option<usize>, Option<usize>) {
        let is_text = |part: &Value| match part {
            Value::String(_) => true,
            part => part.get("text").is_some_and(Value::is_string),
        };
        (
            parts.iter().position(is_text),
            parts.iter().rposition(is_text),
        )
    }

    /// The ends that part `i` holds, in a list whose text parts span `span`.
    fn of_part(self, i: usize, span: (Option<usize>, Option<usize>)) -> Ends {
        Ends {
            start: self.start && span.0 == Some(i),
            end: self.end && span.1 == Some(i),
        }
    }
}

impl Normalizer {
    /// A normalizer for `profile` with no model aliases.
    pub fn new(profile: Profile) -> Self {
        Normalizer {
            profile,
            aliases: HashMap::new(),
        }
    }

    /// Adds model aliases (`from` → `to`), applied by `standard` and `aggressive` after lowercasing.
    pub fn with_aliases<I, K, V>(mut self, aliases: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        for (from, to) in aliases {
            self.aliases
                .insert(from.as_ref().to_lowercase(), to.as_ref().to_lowercase());
        }
        self
    }

    /// The same normalizer (aliases included) under another profile.
    pub fn with_profile(&self, profile: Profile) -> Normalizer {
        Normalizer {
            profile,
            aliases: self.aliases.clone(),
        }
    }

    /// The profile in use.
    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// Derives the key of a request given as JSON text.
    pub fn key_str(&self, request: &str, scope: &Scope) -> Result<Keyed, RequestError> {
        let value: Value =
            serde_json::from_str(request).map_err(|e| RequestError::Json(e.to_string()))?;
        self.key(&value, scope)
    }

    /// Derives the key of a request: canonical bytes, hashed with MD5 as they are written, then
    /// the scope, the profile and the key-format version. The profile is in the key because
    /// one canonical text means different requests under different profiles: `aggressive`'s
    /// `"is x?"` stands for `"Is  X?"` too, which a `strict` reader asking `"is x?"` must not get.
    pub fn key(&self, request: &Value, scope: &Scope) -> Result<Keyed, RequestError> {
        let mut out = KeyWriter::new(4096);
        let model = self.write_canonical(request, &mut out)?;
        let (key, canonical) = out.finish(ModelSlug::new(&model), scope, self.profile.key_tag());
        Ok(Keyed {
            key,
            canonical,
            model,
            scope: scope.clone(),
        })
    }

    /// The canonical form of `request` as JSON text: what the key covers, in the form people read
    /// (the key itself hashes the same document with length-prefixed strings, see [`Keyed`]).
    pub fn canonical_json(&self, request: &Value) -> Result<String, RequestError> {
        let mut out = KeyWriter::with_strings(4096, Strings::Json);
        self.write_canonical(request, &mut out)?;
        Ok(out.written().to_string())
    }

    /// Writes the canonical form of `request` into `out` and returns the normalized model.
    fn write_canonical(
        &self,
        request: &Value,
        out: &mut KeyWriter,
    ) -> Result<String, RequestError> {
        let map = validate(request)?;
        let model = self.model_of(map)?;
        out.push_byte(b'{');
        let mut first = true;
        for (name, value) in sorted(map).iter() {
            let action = self.top_level(name, value);
            if let TopLevel::Drop(_) = action {
                continue;
            }
            if !first {
                out.push_byte(b',');
            }
            first = false;
            write_str(out, name);
            out.push_byte(b':');
            match action {
                TopLevel::Model => write_str(out, &model),
                TopLevel::Rounded(x) => {
                    self.write_value(out, &Value::from(x), Place::Plain, 1);
                }
                _ => {
                    self.write_value(out, value, place_of(name), 1);
                }
            }
        }
        out.push_byte(b'}');
        if let Some(malformed) = out.malformed.take() {
            return Err(malformed);
        }
        if out.too_deep {
            return Err(RequestError::TooDeep { limit: MAX_DEPTH });
        }
        Ok(model)
    }

    /// Says which fields of `request` go into its key and how each is transformed.
    pub fn explain(&self, request: &Value, scope: &Scope) -> Result<Explanation, RequestError> {
        let keyed = self.key(request, scope)?;
        let map = validate(request)?;
        let mut fields = Vec::new();
        for (name, value) in sorted(map).iter() {
            let (action, detail) = match self.top_level(name, value) {
                TopLevel::Drop(why) => (FieldAction::Dropped, why.to_string()),
                TopLevel::Model if keyed.model != value.as_str().unwrap_or_default() => (
                    FieldAction::Transformed,
                    format!("model normalized to `{}` (lowercase, aliases)", keyed.model),
                ),
                TopLevel::Model => (FieldAction::Kept, "already normalized".to_string()),
                TopLevel::Rounded(x) => (
                    FieldAction::Transformed,
                    format!("rounded to 2 decimals: {x}"),
                ),
                TopLevel::Keep => {
                    let why = if KNOWN_FIELDS.contains(&name.as_str()) {
                        "kept"
                    } else {
                        "unknown field, kept (canonical JSON)"
                    };
                    let place = place_of(name);
                    let action = if place != Place::Plain && self.profile != Profile::Strict {
                        FieldAction::Transformed
                    } else {
                        FieldAction::Kept
                    };
                    (action, self.describe(name, value, place, why))
                }
            };
            fields.push(FieldReport {
                field: name.to_string(),
                action,
                detail,
            });
        }
        Ok(Explanation {
            profile: self.profile,
            key: keyed.key.to_string(),
            model: keyed.model,
            scope: scope.clone(),
            fields,
            canonical: RawValue::from_string(self.canonical_json(request)?)
                .map_err(|e| RequestError::Json(e.to_string()))?,
        })
    }

    fn describe(&self, name: &str, value: &Value, place: Place, why: &'static str) -> String {
        let text_rule = match self.profile {
            Profile::Strict => "text as given",
            Profile::Standard => "text trimmed at both ends",
            Profile::Aggressive => "text trimmed, inner whitespace collapsed, lowercased",
        };
        match place {
            Place::Messages(_) => {
                let n = value.as_array().map_or(1, Vec::len);
                let roles = if self.profile == Profile::Strict {
                    "roles as given"
                } else {
                    "roles lowercased"
                };
                format!("{n} message(s), order kept; {text_rule}; {roles}")
            }
            Place::Text(_) => text_rule.to_string(),
            _ if name == "tools" || name == "functions" => {
                let n = value.as_array().map_or(1, Vec::len);
                format!("{n} tool definition(s), canonical JSON")
            }
            _ => why.to_string(),
        }
    }

    fn model_of(&self, map: &Map<String, Value>) -> Result<String, RequestError> {
        let model = match map.get("model") {
            Some(Value::String(m)) => m,
            Some(_) => {
                return Err(RequestError::WrongType {
                    field: "model".into(),
                    expected: "a string",
                });
            }
            None => return Err(RequestError::MissingField { field: "model" }),
        };
        Ok(self.model_name(model))
    }

    /// The model name as entries of this normalizer record it: as given under `strict`;
    /// trimmed, lowercased and resolved through the aliases otherwise. Selectors that name a
    /// model (invalidation, reports) go through this so `GPT-4o` finds `gpt-4o`'s entries.
    pub fn model_name(&self, model: &str) -> String {
        if self.profile == Profile::Strict {
            return model.to_string();
        }
        let lower = model.trim().to_lowercase();
        self.aliases.get(&lower).cloned().unwrap_or(lower)
    }

    fn top_level(&self, name: &str, value: &Value) -> TopLevel {
        if value.is_null() {
            return TopLevel::Drop("null is the same as absent");
        }
        let relaxed = self.profile != Profile::Strict;
        if relaxed && NON_SEMANTIC_FIELDS.contains(&name) {
            return TopLevel::Drop("non-semantic field");
        }
        if name == "model" {
            return TopLevel::Model;
        }
        let rounded = match (name, value) {
            ("temperature" | "top_p", Value::Number(n)) if relaxed => {
                // A value too large to round (out of range anyway) is kept as it is.
                n.as_f64()
                    .map(|x| (x * 100.0).round() / 100.0)
                    .filter(|x| x.is_finite())
            }
            _ => None,
        };
        let effective = rounded.map(Value::from);
        let effective = effective.as_ref().unwrap_or(value);
        if let Some((_, default)) = DEFAULTS.iter().find(|(field, _)| *field == name)
            && default.matches(effective)
        {
            return TopLevel::Drop("equals the documented default");
        }
        match rounded {
            Some(x) if Some(x) != value.as_f64() => TopLevel::Rounded(x),
            _ => TopLevel::Keep,
        }
    }

    /// Writes `value` canonically; returns whether it is a message (`Place::Message`) with a
    /// string `role`.
    fn write_value(&self, out: &mut KeyWriter, value: &Value, place: Place, depth: usize) -> bool {
        if depth > MAX_DEPTH {
            out.too_deep = true;
            return false;
        }
        match value {
            Value::Null => out.push("null"),
            Value::Bool(true) => out.push("true"),
            Value::Bool(false) => out.push("false"),
            Value::Number(n) => write_number(out, n),
            Value::String(s) => match place {
                Place::Text(ends) => self.write_text(out, s, ends),
                // A bare string `input` (Responses API) is the message text.
                Place::Messages(_) => self.write_text(out, s, Ends::BOTH),
                _ => write_str(out, s),
            },
            Value::Array(items) => {
                let span = match place {
                    Place::Text(_) => Ends::text_span(items),
                    _ => (None, None),
                };
                out.push_byte(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_byte(b',');
                    }
                    let inner = match place {
                        Place::Messages(_) => Place::Message,
                        Place::Text(ends) => Place::Text(ends.of_part(i, span)),
                        _ => Place::Plain,
                    };
                    let has_role = self.write_value(out, item, inner, depth + 1);
                    if place == Place::Messages(Roles::Required) && !has_role {
                        malformed_message(out, i, item);
                    }
                }
                out.push_byte(b']');
            }
            Value::Object(map) => return self.write_object(out, map, place, depth),
        }
        false
    }

    /// Writes an object canonically; returns whether it is a message with a string `role`.
    fn write_object(
        &self,
        out: &mut KeyWriter,
        map: &Map<String, Value>,
        place: Place,
        depth: usize,
    ) -> bool {
        out.push_byte(b'{');
        let mut first = true;
        let mut has_role = false;
        for (name, value) in sorted(map).iter() {
            // In messages (and their parts), `null` members are the same as absent ones.
            if value.is_null() && place != Place::Plain {
                continue;
            }
            if !first {
                out.push_byte(b',');
            }
            first = false;
            write_str(out, name);
            out.push_byte(b':');
            if place == Place::Message && name == "role" {
                has_role = value.is_string();
            }
            let inner = match (place, name.as_str()) {
                (Place::Message, "content") => Place::Text(Ends::BOTH),
                (Place::Text(ends), "text") => Place::Text(ends),
                (Place::Message, "role") if self.profile != Profile::Strict => {
                    if let Value::String(role) = value {
                        let role = role.trim();
                        if role.bytes().any(|b| !b.is_ascii_lowercase()) {
                            write_str(out, &role.to_lowercase());
                        } else {
                            write_str(out, role);
                        }
                        continue;
                    }
                    Place::Plain
                }
                _ => Place::Plain,
            };
            self.write_value(out, value, inner, depth + 1);
        }
        out.push_byte(b'}');
        has_role
    }

    /// Writes message text: trimmed at the `ends` of the message it holds (standard), with its
    /// inner whitespace also collapsed to one space and lowercased (aggressive).
    fn write_text(&self, out: &mut KeyWriter, text: &str, ends: Ends) {
        let trimmed = match (ends.start, ends.end) {
            (true, true) => text.trim(),
            (true, false) => text.trim_start(),
            (false, true) => text.trim_end(),
            (false, false) => text,
        };
        match self.profile {
            Profile::Strict => write_str(out, text),
            Profile::Standard => write_str(out, trimmed),
            Profile::Aggressive => {
                // Whitespace left at an inner end becomes one space, like inner whitespace.
                let lead = trimmed.starts_with(char::is_whitespace);
                let trail = trimmed.ends_with(char::is_whitespace);
                let mut collapsed = String::with_capacity(trimmed.len());
                for word in trimmed.split_whitespace() {
                    if lead || !collapsed.is_empty() {
                        collapsed.push(' ');
                    }
                    collapsed.extend(word.chars().flat_map(char::to_lowercase));
                }
                if trail {
                    collapsed.push(' ');
                }
                write_str(out, &collapsed);
            }
        }
    }
}

/// Fields of the supported request shapes that `explain` reports as known.
const KNOWN_FIELDS: &[&str] = &[
    "messages",
    "input",
    "system",
    "instructions",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stop",
    "stop_sequences",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "response_format",
    "text",
    "reasoning",
    "reasoning_effort",
    "thinking",
    "modalities",
];

enum TopLevel {
    Drop(&'static str),
    Model,
    Rounded(f64),
    Keep,
}

fn place_of(top_level_field: &str) -> Place {
    match top_level_field {
        "messages" => Place::Messages(Roles::Required),
        "input" => Place::Messages(Roles::Optional),
        f if TEXT_FIELDS.contains(&f) => Place::Text(Ends::BOTH),
        _ => Place::Plain,
    }
}

fn validate(request: &Value) -> Result<&Map<String, Value>, RequestError> {
    let map = match request {
        Value::Object(map) => map,
        other => {
            return Err(RequestError::NotAnObject {
                found: json_type(other),
            });
        }
    };
    // `null` is the same as absent, here as in the key.
    let field = |name: &str| map.get(name).filter(|value| !value.is_null());
    match (field("messages"), field("input"), field("prompt")) {
        // Each message is checked as it is written (`Roles::Required`): one pass over them.
        (Some(Value::Array(_)), _, _) => {}
        (Some(_), _, _) => {
            return Err(RequestError::WrongType {
                field: "messages".into(),
                expected: "an array",
            });
        }
        (None, Some(Value::String(_) | Value::Array(_)), _) => {}
        (None, Some(_), _) => {
            return Err(RequestError::WrongType {
                field: "input".into(),
                expected: "a string or an array",
            });
        }
        (None, None, Some(_)) => {}
        (None, None, None) => {
            return Err(RequestError::MissingField {
                field: "messages (or input)",
            });
        }
    }
    Ok(map)
}

/// Records that chat message `i` is not an object with a string `role` (the first such only).
#[cold]
fn malformed_message(out: &mut KeyWriter, i: usize, message: &Value) {
    if out.malformed.is_none() {
        let (field, expected) = if message.is_object() {
            (format!("messages[{i}].role"), "a string")
        } else {
            (format!("messages[{i}]"), "an object")
        };
        out.malformed = Some(RequestError::WrongType { field, expected });
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Whether serde_json's `Map` keeps its members in byte order of their names: it does unless
/// some crate in the build turns on serde_json's `preserve_order` feature, which makes it keep
/// them in insertion order. Asked once of a two-member map.
fn maps_are_sorted() -> bool {
    static SORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SORTED.get_or_init(|| {
        let mut probe = Map::new();
        probe.insert("b".into(), Value::Null);
        probe.insert("a".into(), Value::Null);
        probe.keys().map(String::as_str).eq(["a", "b"])
    })
}

/// The members of `map` in byte order of their names, without allocating when already sorted.
fn sorted(map: &Map<String, Value>) -> Sorted<'_> {
    let in_order = maps_are_sorted()
        || map
            .keys()
            .zip(map.keys().skip(1))
            .all(|(a, b)| a.as_bytes() < b.as_bytes());
    if in_order {
        Sorted::InOrder(map)
    } else {
        let mut members: Vec<_> = map.iter().collect();
        members.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        Sorted::Collected(members)
    }
}

enum Sorted<'a> {
    InOrder(&'a Map<String, Value>),
    Collected(Vec<(&'a String, &'a Value)>),
}

impl<'a> Sorted<'a> {
    fn iter(&self) -> SortedIter<'a, '_> {
        match self {
            Sorted::InOrder(map) => SortedIter::InOrder(map.iter()),
            Sorted::Collected(members) => SortedIter::Collected(members.iter()),
        }
    }
}

enum SortedIter<'a, 'b> {
    InOrder(serde_json::map::Iter<'a>),
    Collected(std::slice::Iter<'b, (&'a String, &'a Value)>),
}

impl<'a> Iterator for SortedIter<'a, '_> {
    type Item = (&'a String, &'a Value);
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            SortedIter::InOrder(it) => it.next(),
            SortedIter::Collected(it) => it.next().copied(),
        }
    }
}

/// Numbers in one form: integers as integers (also when given as `2.0`), others in the shortest
/// form that reads back to the same `f64`.
fn write_number(out: &mut KeyWriter, n: &serde_json::Number) {
    let mut ints = itoa::Buffer::new();
    if let Some(u) = n.as_u64() {
        out.push(ints.format(u));
    } else if let Some(i) = n.as_i64() {
        out.push(ints.format(i));
    } else if let Some(f) = n.as_f64() {
        // Whole floats in the range of the integers serde_json parses, written as those integers
        // (`1e16` as `10000000000000000`); `u64::MAX as f64` is 2^64 itself, one past the range.
        if f.fract() == 0.0 && f >= i64::MIN as f64 && f < 0.0 {
            out.push(ints.format(f as i64));
        } else if f.fract() == 0.0 && (0.0..u64::MAX as f64).contains(&f) {
            out.push(ints.format(f as u64));
        } else {
            // Shortest form that reads back to the same f64; parsed JSON numbers are finite.
            out.push(ryu::Buffer::new().format_finite(f));
        }
    }
}

/// Writes `s` as a string: length-prefixed (`"5:hello`) for keys, or as a JSON string in which
/// only `"`, `\\` and control characters are escaped.
///
/// Request text is long and rarely needs escaping, so the scan takes sixteen bytes at a time into
/// a bit mask of the bytes to escape, copies the clean runs between them whole and never looks at
/// a byte twice. Escapes are ASCII, so every cut falls on a character boundary.
pub(crate) fn write_str(out: &mut KeyWriter, s: &str) {
    out.push_byte(b'"');
    if out.strings() == Strings::LengthPrefixed {
        out.push(itoa::Buffer::new().format(s.len()));
        out.push_byte(b':');
        out.push(s);
        return;
    }
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut base = 0;
    let mut chunks = bytes.chunks_exact(16);
    for chunk in chunks.by_ref() {
        let mut mask = <&[u8; 16]>::try_from(chunk).map_or(0, escape_mask16);
        while mask != 0 {
            let at = base + mask.trailing_zeros() as usize;
            out.push(&s[start..at]);
            push_escape(out, bytes[at]);
            start = at + 1;
            mask &= mask - 1;
        }
        base += 16;
    }
    for (at, &b) in chunks.remainder().iter().enumerate() {
        if needs_escape(b) {
            out.push(&s[start..base + at]);
            push_escape(out, b);
            start = base + at + 1;
        }
    }
    out.push(&s[start..]);
    out.push_byte(b'"');
}

/// Whether JSON requires `b` escaped: below 0x20, a quote or a backslash.
#[inline(always)]
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// One bit per byte of `chunk` that [`needs_escape`]: three SSE2 compares and a move-mask.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn escape_mask16(chunk: &[u8; 16]) -> u32 {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128, _mm_set_epi64x,
        _mm_set1_epi8,
    };
    let (lo, hi) = chunk.split_at(8);
    let word = |half: &[u8]| <[u8; 8]>::try_from(half).map_or(0, i64::from_le_bytes);
    // SAFETY: these intrinsics only need SSE2, which every x86_64 CPU has (it is part of the
    // target's baseline); they read and write no memory.
    unsafe {
        let v = _mm_set_epi64x(word(hi), word(lo));
        let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
        let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
        // v <= 0x1f exactly when min(v, 0x1f) == v (unsigned).
        let control = _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1f)), v);
        _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), control)) as u32
    }
}

/// One bit per byte of `chunk` that [`needs_escape`].
#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn escape_mask16(chunk: &[u8; 16]) -> u32 {
    chunk
        .iter()
        .enumerate()
        .fold(0, |mask, (i, &b)| mask | (u32::from(needs_escape(b)) << i))
}

fn push_escape(out: &mut KeyWriter, b: u8) {
    match b {
        b'"' => out.push("\\\""),
        b'\\' => out.push("\\\\"),
        b'\n' => out.push("\\n"),
        b'\r' => out.push("\\r"),
        b'\t' => out.push("\\t"),
        0x08 => out.push("\\b"),
        0x0c => out.push("\\f"),
        _ => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push("\\u00");
            out.push_byte(HEX[usize::from(b >> 4)]);
            out.push_byte(HEX[usize::from(b & 0xf)]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn key(profile: Profile, request: &Value) -> String {
        Normalizer::new(profile)
            .key(request, &Scope::Global)
            .map(|k| k.key.to_string())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn canonical(profile: Profile, request: &Value) -> String {
        Normalizer::new(profile)
            .canonical_json(request)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn canonical_text(profile: Profile, request: &Value) -> String {
        let keyed = Normalizer::new(profile)
            .key(request, &Scope::Global)
            .unwrap_or_else(|e| panic!("{e}"));
        keyed.canonical
    }

    #[test]
    fn numbers_defaults_and_nulls_have_one_form() {
        let base = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10});
        let mut variant = base.clone();
        variant["max_tokens"] = json!(10.0);
        variant["temperature"] = json!(1.0);
        variant["n"] = json!(1);
        variant["seed"] = Value::Null;
        variant["messages"][0]["name"] = Value::Null;
        for profile in [Profile::Strict, Profile::Standard, Profile::Aggressive] {
            assert_eq!(key(profile, &base), key(profile, &variant), "{profile}");
        }
        assert_eq!(
            canonical(Profile::Strict, &base),
            r#"{"max_tokens":10,"messages":[{"content":"hi","role":"user"}],"model":"m"}"#
        );
        assert_eq!(
            canonical_text(Profile::Strict, &base),
            r#"{"10:max_tokens:10,"8:messages:[{"7:content:"2:hi,"4:role:"4:user}],"5:model:"1:m}"#
        );
    }

    #[test]
    fn standard_drops_non_semantic_fields_and_strict_keeps_them() {
        let base = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let mut variant = base.clone();
        variant["user"] = json!("alice");
        variant["metadata"] = json!({"trace": "abc"});
        variant["stream"] = json!(true);
        assert_eq!(
            key(Profile::Standard, &base),
            key(Profile::Standard, &variant)
        );
        assert_ne!(key(Profile::Strict, &base), key(Profile::Strict, &variant));
        // `store` decides whether the answer's id can be continued from: it stays.
        let mut stored = base.clone();
        stored["store"] = json!(true);
        assert_ne!(
            key(Profile::Standard, &base),
            key(Profile::Standard, &stored)
        );
    }

    #[test]
    fn a_legacy_prompt_keeps_its_ends() {
        let a = json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Q: Capital of France?\nA: "});
        let b = json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Q: Capital of France?\nA:"});
        for profile in [Profile::Standard, Profile::Aggressive] {
            assert_ne!(key(profile, &a), key(profile, &b), "{profile:?}");
        }
        // `system` and `instructions` are message text, trimmed.
        let c = json!({"model": "m", "instructions": " be brief ", "input": "hi"});
        let d = json!({"model": "m", "instructions": "be brief", "input": "hi"});
        assert_eq!(key(Profile::Standard, &c), key(Profile::Standard, &d));
    }

    #[test]
    fn a_request_nested_deeper_than_the_limit_is_an_error_not_a_crash() {
        let n = Normalizer::default();
        // As deep as serde_json parses (127 levels: the request object and 126 more).
        let mut deep = json!("bottom");
        for _ in 0..MAX_DEPTH - 2 {
            deep = json!([deep]);
        }
        let ok = json!({"model": "m", "input": "hi", "x": deep.clone()});
        assert!(serde_json::from_str::<Value>(&ok.to_string()).is_ok());
        assert!(n.key(&ok, &Scope::Global).is_ok());
        let too_deep = json!({"model": "m", "input": "hi", "x": [[deep]]});
        assert!(serde_json::from_str::<Value>(&too_deep.to_string()).is_err());
        assert!(matches!(
            n.key(&too_deep, &Scope::Global),
            Err(RequestError::TooDeep { limit: MAX_DEPTH })
        ));
        // Far deeper than any stack would take: still an error. (Built by hand: `json!` copies
        // a value by serializing it, recursively.)
        let mut abyss = Value::from(0);
        for _ in 0..200_000 {
            abyss = Value::Array(vec![abyss]);
        }
        let Value::Object(mut request) = json!({"model": "m", "input": "hi"}) else {
            unreachable!()
        };
        request.insert("x".into(), abyss);
        let abyss = Value::Object(request);
        assert!(n.key(&abyss, &Scope::Global).is_err());
        assert!(n.canonical_json(&abyss).is_err());
        std::mem::forget(abyss); // serde_json drops a `Value` recursively
    }

    #[test]
    fn standard_lowercases_model_and_role_and_applies_aliases() {
        let n = Normalizer::new(Profile::Standard).with_aliases([("gpt-4o-2024-08-06", "gpt-4o")]);
        let a =
            json!({"model": "GPT-4o-2024-08-06", "messages": [{"role": "User", "content": "hi"}]});
        let b = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
        let ka = n.key(&a, &Scope::Global).map(|k| k.key).ok();
        let kb = n.key(&b, &Scope::Global).map(|k| k.key).ok();
        assert!(ka.is_some());
        assert_eq!(ka, kb);
        assert!(ka.is_some_and(|k| k.to_string().starts_with("gpt-4o_")));
    }

    #[test]
    fn temperature_is_rounded_to_two_decimals_in_standard_only() {
        let a = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.701});
        let b = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.7});
        assert_eq!(key(Profile::Standard, &a), key(Profile::Standard, &b));
        assert_ne!(key(Profile::Strict, &a), key(Profile::Strict, &b));
    }

    #[test]
    fn anthropic_and_responses_shapes_are_normalized() {
        let a = json!({"model": "claude-sonnet-4-5", "system": " Be brief. ", "max_tokens": 100,
                       "messages": [{"role": "user", "content": [{"type": "text", "text": " hi "}]}]});
        let b = json!({"model": "claude-sonnet-4-5", "system": "Be brief.", "max_tokens": 100,
                       "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]});
        assert_eq!(key(Profile::Standard, &a), key(Profile::Standard, &b));
        assert_ne!(key(Profile::Strict, &a), key(Profile::Strict, &b));
        let r1 = json!({"model": "gpt-4o", "input": "  hello ", "instructions": "x "});
        let r2 = json!({"model": "gpt-4o", "input": "hello", "instructions": "x"});
        assert_eq!(key(Profile::Standard, &r1), key(Profile::Standard, &r2));
    }

    #[test]
    fn aggressive_collapses_whitespace_and_case() {
        let a = json!({"model": "m", "messages": [{"role": "user", "content": "What  is\n2+2?"}]});
        let b = json!({"model": "m", "messages": [{"role": "user", "content": "what is 2+2?"}]});
        assert_eq!(key(Profile::Aggressive, &a), key(Profile::Aggressive, &b));
        assert_ne!(key(Profile::Standard, &a), key(Profile::Standard, &b));
    }

    #[test]
    fn text_is_trimmed_at_the_ends_of_a_message_not_between_its_parts() {
        let parts = |texts: &[&str]| {
            let parts: Vec<Value> = texts
                .iter()
                .map(|t| json!({"type": "text", "text": t}))
                .collect();
            json!({"model": "m", "system": parts.clone(),
                   "messages": [{"role": "user", "content": parts}]})
        };
        // "sun flower" and "sunflower" are different questions, in every profile.
        let spaced = parts(&["One word or two? sun ", "flower"]);
        let joined = parts(&["One word or two? sun", "flower"]);
        for profile in [Profile::Strict, Profile::Standard, Profile::Aggressive] {
            assert_ne!(key(profile, &spaced), key(profile, &joined), "{profile}");
        }
        // The message's own ends are trimmed, as for a plain string.
        let padded = parts(&["  One word or two? sun ", "flower \n"]);
        assert_eq!(
            key(Profile::Standard, &padded),
            key(Profile::Standard, &spaced)
        );
        assert_ne!(key(Profile::Strict, &padded), key(Profile::Strict, &spaced));
        // Aggressive collapses the whitespace between parts as it does inside one.
        let wide = parts(&["one WORD or two?  sun\t ", "  flower"]);
        let one = parts(&["One word or two? sun ", " flower"]);
        assert_eq!(
            key(Profile::Aggressive, &wide),
            key(Profile::Aggressive, &one)
        );
        assert_eq!(
            canonical(Profile::Aggressive, &wide),
            canonical(Profile::Aggressive, &one)
        );
        let blank = parts(&["a", " \n ", "b"]);
        assert!(canonical(Profile::Aggressive, &blank).contains(r#""text":" ""#));
        // An image is not text: the text before it still ends the message's text.
        let image = json!({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}});
        let with_image = |text: &str| {
            json!({"model": "m", "messages": [{"role": "user",
                   "content": [{"type": "text", "text": text}, image.clone()]}]})
        };
        assert_eq!(
            key(Profile::Standard, &with_image("Describe this: ")),
            key(Profile::Standard, &with_image("Describe this:"))
        );
    }

    #[test]
    fn one_canonical_text_under_two_profiles_is_two_keys() {
        // Canonical under aggressive, and a request of its own under strict: an answer stored
        // for "Is  PASSWORD123 ..." (aggressive) must not reach a strict reader of the lowercase.
        let asked =
            json!({"model": "m", "messages": [{"role": "user", "content": "is x equal to x?"}]});
        let shouted =
            json!({"model": "m", "messages": [{"role": "user", "content": "Is  X equal to x?"}]});
        assert_eq!(
            canonical(Profile::Aggressive, &shouted),
            canonical(Profile::Strict, &asked)
        );
        assert_ne!(
            key(Profile::Aggressive, &shouted),
            key(Profile::Strict, &asked)
        );
        assert_ne!(key(Profile::Standard, &asked), key(Profile::Strict, &asked));
    }

    #[test]
    fn whole_numbers_have_one_form_up_to_two_to_the_64() {
        let with = |seed: Value| json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": seed});
        let same = [
            (json!(1e16), json!(10_000_000_000_000_000_u64)),
            (json!(9.5e15), json!(9_500_000_000_000_000_u64)),
            (json!(-9.5e15), json!(-9_500_000_000_000_000_i64)),
            (json!(1.8e19), json!(18_000_000_000_000_000_000_u64)),
        ];
        for (float, int) in same {
            for profile in [Profile::Strict, Profile::Standard] {
                assert_eq!(
                    canonical(profile, &with(float.clone())),
                    canonical(profile, &with(int.clone())),
                    "{float} {int}"
                );
            }
        }
        // 2^64 and beyond are no integers serde_json reads: they keep their float form.
        assert!(canonical(Profile::Strict, &with(json!(1.8446744073709552e19))).contains("e19"));
    }

    #[test]
    fn an_out_of_range_temperature_is_kept_not_turned_into_null() {
        let with = |t: f64| json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": t});
        assert_ne!(
            key(Profile::Standard, &with(1e307)),
            key(Profile::Standard, &with(1e308))
        );
        assert!(!canonical(Profile::Standard, &with(1e308)).contains("null"));
    }

    #[test]
    fn null_shape_fields_are_absent_ones() {
        let a = json!({"model": "m", "messages": null, "input": "x"});
        let b = json!({"model": "m", "input": "x"});
        assert_eq!(key(Profile::Standard, &a), key(Profile::Standard, &b));
        let c = json!({"model": "m", "input": null, "prompt": "x"});
        let d = json!({"model": "m", "prompt": "x"});
        assert_eq!(key(Profile::Strict, &c), key(Profile::Strict, &d));
    }

    #[test]
    fn message_order_and_unknown_fields_matter() {
        let m1 = json!({"role": "user", "content": "a"});
        let m2 = json!({"role": "user", "content": "b"});
        let a = json!({"model": "m", "messages": [m1, m2]});
        let b = json!({"model": "m", "messages": [m2, m1]});
        assert_ne!(key(Profile::Aggressive, &a), key(Profile::Aggressive, &b));
        let mut c = a.clone();
        c["x_provider_knob"] = json!({"depth": 3});
        let mut d = a.clone();
        d["x_provider_knob"] = json!({"depth": 4});
        assert_ne!(key(Profile::Aggressive, &a), key(Profile::Aggressive, &c));
        assert_ne!(key(Profile::Aggressive, &c), key(Profile::Aggressive, &d));
    }

    #[test]
    fn malformed_requests_are_typed_errors() {
        let n = Normalizer::default();
        let cases = [
            json!([1, 2]),
            json!({"messages": []}),
            json!({"model": 3, "messages": []}),
            json!({"model": "m"}),
            json!({"model": "m", "messages": {}}),
            json!({"model": "m", "messages": ["hi"]}),
            json!({"model": "m", "messages": [{"content": "hi"}]}),
            json!({"model": "m", "input": 5}),
            json!({"model": "m", "prompt": null}),
            json!({"model": "m", "messages": null, "input": null}),
        ];
        for case in cases {
            assert!(n.key(&case, &Scope::Global).is_err(), "{case}");
        }
        assert!(matches!(
            n.key_str("{not json", &Scope::Global),
            Err(RequestError::Json(_))
        ));
        // Each chat message must be an object with a string role; the first that is not is
        // named. Responses-API input items need no role.
        let user = json!({"role": "user", "content": "hi"});
        for (messages, field, expected) in [
            (json!([user, "hi"]), "messages[1]", "an object"),
            (
                json!([user, {"content": "hi"}]),
                "messages[1].role",
                "a string",
            ),
            (json!([{"role": null}, 7]), "messages[0].role", "a string"),
            (
                json!([user, user, {"role": 3}]),
                "messages[2].role",
                "a string",
            ),
        ] {
            for profile in [Profile::Strict, Profile::Standard, Profile::Aggressive] {
                let request = json!({"model": "m", "messages": messages});
                match Normalizer::new(profile).key(&request, &Scope::Global) {
                    Err(RequestError::WrongType {
                        field: f,
                        expected: e,
                    }) => {
                        assert_eq!((f.as_str(), e), (field, expected), "{request}");
                    }
                    other => panic!("{request}: {other:?}"),
                }
            }
        }
        let input =
            json!({"model": "m", "input": [user, {"type": "function_call_output", "output": "4"}]});
        assert!(n.key(&input, &Scope::Global).is_ok());
    }

    #[test]
    fn explain_names_every_field() {
        let request = json!({"model": "GPT-4o", "messages": [{"role": "user", "content": " hi "}],
                             "user": "u1", "temperature": 0.333, "seed": 7, "tools": [], "x": 1});
        let explanation = Normalizer::default()
            .explain(&request, &Scope::Global)
            .unwrap_or_else(|e| panic!("{e}"));
        let action = |f: &str| {
            explanation
                .fields
                .iter()
                .find(|r| r.field == f)
                .map(|r| r.action)
        };
        assert_eq!(action("user"), Some(FieldAction::Dropped));
        assert_eq!(action("model"), Some(FieldAction::Transformed));
        assert_eq!(action("temperature"), Some(FieldAction::Transformed));
        assert_eq!(action("messages"), Some(FieldAction::Transformed));
        assert_eq!(action("seed"), Some(FieldAction::Kept));
        assert_eq!(action("x"), Some(FieldAction::Kept));
        assert_eq!(explanation.fields.len(), 7);
    }

    /// A generated request with the fields that matter, written out by hand so that key order
    /// and whitespace of the JSON text can vary.
    #[derive(Debug, Clone)]
    struct Req {
        model: String,
        messages: Vec<(String, String)>,
        temperature: Option<f64>,
        seed: Option<u64>,
        tools: Vec<String>,
        extra: Option<i64>,
    }

    impl Req {
        fn fields(&self) -> Vec<(String, Value)> {
            let mut fields = vec![
                ("model".to_string(), json!(self.model)),
                (
                    "messages".to_string(),
                    Value::Array(
                        self.messages
                            .iter()
                            .map(|(role, content)| json!({"role": role, "content": content}))
                            .collect(),
                    ),
                ),
            ];
            if let Some(t) = self.temperature {
                fields.push(("temperature".into(), json!(t)));
            }
            if let Some(s) = self.seed {
                fields.push(("seed".into(), json!(s)));
            }
            if !self.tools.is_empty() {
                let tools: Vec<Value> = self
                    .tools
                    .iter()
                    .map(|name| json!({"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}))
                    .collect();
                fields.push(("tools".into(), Value::Array(tools)));
            }
            if let Some(x) = self.extra {
                fields.push(("x_vendor_param".into(), json!(x)));
            }
            fields
        }

        fn value(&self) -> Value {
            Value::Object(self.fields().into_iter().collect())
        }

        /// JSON text with the top-level members in the order given by `order` (a permutation seed).
        fn text_in_order(&self, rotate: usize) -> String {
            let mut fields = self.fields();
            let len = fields.len();
            fields.rotate_left(rotate % len);
            fields.reverse();
            let members: Vec<String> = fields
                .into_iter()
                .map(|(k, v)| format!("{} : {}", json!(k), v))
                .collect();
            format!("{{ {} }}", members.join(" ,\n "))
        }
    }

    fn text() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9 ,.?\"\\\\\n\u{2028}é]{1,40}"
            .prop_filter("has a non-space character", |s| !s.trim().is_empty())
    }

    fn req() -> impl Strategy<Value = Req> {
        (
            prop::sample::select(vec![
                "gpt-4o",
                "gpt-4o-mini",
                "claude-sonnet-4-5",
                "llama-3.1-70b",
            ]),
            prop::collection::vec(
                (
                    prop::sample::select(vec!["system", "user", "assistant"]),
                    text(),
                ),
                1..5,
            ),
            prop::option::of((0u32..200).prop_map(|t| f64::from(t) / 100.0)),
            prop::option::of(any::<u64>()),
            prop::collection::vec("[a-z_]{1,12}", 0..3),
            prop::option::of(any::<i64>()),
        )
            .prop_map(|(model, messages, temperature, seed, tools, extra)| Req {
                model: model.to_string(),
                messages: messages
                    .into_iter()
                    .map(|(r, c)| (r.to_string(), c))
                    .collect(),
                temperature,
                seed,
                tools,
                extra,
            })
    }

    fn profile() -> impl Strategy<Value = Profile> {
        prop::sample::select(vec![
            Profile::Strict,
            Profile::Standard,
            Profile::Aggressive,
        ])
    }

    fn key_of(profile: Profile, request: &Value, scope: &Scope) -> crate::key::CacheKey {
        match Normalizer::new(profile).key(request, scope) {
            Ok(keyed) => keyed.key,
            Err(e) => panic!("generated request rejected: {e}"),
        }
    }

    /// Any JSON value, nested up to `depth` levels, with the member names requests use mixed
    /// into arbitrary ones.
    fn any_json(depth: u32) -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            "\\PC{0,12}".prop_map(Value::from),
        ];
        let name = prop_oneof![
            Just("model".to_string()),
            Just("messages".to_string()),
            Just("role".to_string()),
            Just("content".to_string()),
            Just("input".to_string()),
            Just("system".to_string()),
            Just("temperature".to_string()),
            Just("tools".to_string()),
            Just("text".to_string()),
            Just("type".to_string()),
            "\\PC{0,8}",
        ];
        leaf.prop_recursive(depth, 256, 8, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((name.clone(), inner), 0..6)
                    .prop_map(|members| Value::Object(members.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Fuzz-style: the normalizer keys or refuses any JSON, under every profile, and never
        /// panics; what it keys, it keys the same way twice.
        #[test]
        fn fuzz_any_json_is_keyed_or_refused_never_a_panic(
            value in any_json(6),
            model in prop_oneof![Just(None), "\\PC{0,12}".prop_map(Some)],
        ) {
            let mut value = value;
            if let (Some(model), Some(object)) = (model, value.as_object_mut()) {
                object.insert("model".into(), Value::from(model));
            }
            for profile in [Profile::Strict, Profile::Standard, Profile::Aggressive] {
                let normalizer = Normalizer::new(profile);
                let first = normalizer.key(&value, &Scope::Global);
                let _ = normalizer.explain(&value, &Scope::Global);
                if let (Ok(a), Ok(b)) = (first, normalizer.key(&value, &Scope::Global)) {
                    prop_assert_eq!(a.key, b.key);
                }
            }
        }

        #[test]
        fn strings_are_escaped_exactly_as_serde_json_does(s in any::<String>(), ascii in "[ -~\n\t\"\\\\\u{0}-\u{1f}]{0,64}") {
            for text in [&s, &ascii] {
                let mut out = KeyWriter::with_strings(0, Strings::Json);
                write_str(&mut out, text);
                prop_assert_eq!(Some(out.written().to_string()), serde_json::to_string(text).ok());
            }
        }

        #[test]
        fn normalization_is_idempotent(r in req(), profile in profile()) {
            let once = canonical(profile, &r.value());
            let reparsed: Value = serde_json::from_str(&once).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(canonical(profile, &reparsed), once);
            prop_assert_eq!(canonical_text(profile, &reparsed), canonical_text(profile, &r.value()));
        }

        #[test]
        fn key_is_insensitive_to_member_order(r in req(), profile in profile(), a in 0usize..8, b in 0usize..8) {
            let n = Normalizer::new(profile);
            let ka = n.key_str(&r.text_in_order(a), &Scope::Global).map(|k| k.key);
            let kb = n.key_str(&r.text_in_order(b), &Scope::Global).map(|k| k.key);
            prop_assert!(ka.is_ok());
            prop_assert_eq!(ka, kb);
        }

        #[test]
        fn semantic_differences_give_different_keys(r in req(), profile in profile(), which in 0usize..8, word in "[a-z]{1,8}") {
            let mut other = r.clone();
            let mut scope = Scope::Global;
            match which {
                0 => other.messages[0].1.push_str(&format!(" {word}")),
                1 => {
                    let role = &mut other.messages[0].0;
                    *role = if role == "user" { "assistant".into() } else { "user".into() };
                }
                2 => other.model.push_str("-next"),
                3 => other.temperature = Some(other.temperature.map_or(0.5, |t| if t == 0.5 { 0.6 } else { 0.5 })),
                4 => other.tools.push(format!("{word}_tool")),
                5 => other.seed = Some(other.seed.map_or(1, |s| s.wrapping_add(1))),
                6 => scope = Scope::User(word.clone()),
                _ => other.extra = Some(other.extra.map_or(1, |x| x.wrapping_add(1))),
            }
            prop_assert_ne!(
                key_of(profile, &r.value(), &Scope::Global),
                key_of(profile, &other.value(), &scope)
            );
        }

        #[test]
        fn standard_merges_whitespace_at_the_ends_and_strict_does_not(
            r in req(), pad in "[ \n\t]{1,4}", index in 0usize..5
        ) {
            let mut padded = r.clone();
            let i = index % padded.messages.len();
            padded.messages[i].1 = format!("{pad}{}{pad}", padded.messages[i].1);
            prop_assert_eq!(
                key_of(Profile::Standard, &r.value(), &Scope::Global),
                key_of(Profile::Standard, &padded.value(), &Scope::Global)
            );
            prop_assert_ne!(
                key_of(Profile::Strict, &r.value(), &Scope::Global),
                key_of(Profile::Strict, &padded.value(), &Scope::Global)
            );
        }
    }
}
