//! OpenAI Chat Completions (`POST /v1/chat/completions`): a stream of `chat.completion.chunk`
//! events ending with `data: [DONE]`, and the `chat.completion` object it adds up to.
//!
//! Adding a stream up ([`assemble_chat`]) keeps:
//! - the chunks' top-level fields (`id`, `created`, `model`, `system_fingerprint`,
//!   `service_tier`, and any other a server adds, such as Azure's `prompt_filter_results`):
//!   the last non-null value of each, an empty string not replacing a real one (Azure's first
//!   chunk has an empty `id` and `model`); `object` becomes `chat.completion`;
//! - the last `usage` object, from the usage chunk (`choices: []`, sent with
//!   `stream_options.include_usage`) or from any chunk with choices;
//! - each choice by its `index`: `delta.role`; `content`, `refusal`, `reasoning_content`
//!   (DeepSeek, vLLM) and `reasoning` (OpenRouter, vLLM) concatenated; `tool_calls` merged by
//!   their `index` (`id`, `type` and `function.name` set once, `function.arguments`
//!   concatenated, likewise a custom tool's `custom.input`) and listed without the index;
//!   the legacy `function_call` (name set once, arguments concatenated); `audio` (`data` and
//!   `transcript` concatenated); the last non-null `finish_reason`; `logprobs` with its
//!   `content` and `refusal` lists concatenated; other delta fields (lists appended, other
//!   values last one wins) and other choice fields (last non-null wins);
//! - `content: null` when the answer has no text but tool calls, a function call, audio or a
//!   refusal, as OpenAI returns it, and `""` for an empty answer that streamed `""`.
//!
//! It drops the chunk-only `obfuscation` padding, `usage: null`, and every `null` that only
//! says a field has nothing yet. A field that only ever streamed `null` (`refusal: null`)
//! is kept as `null`.
//!
//! Sending an answer as a stream ([`chat_events`]) gives, for each choice in turn (numbered by
//! position): a chunk with the role, `content` (`""`, or `null` where the answer's is `null`)
//! and the message's `null` fields; a chunk each for `reasoning_content`, `reasoning`,
//! `content` and `refusal`; one chunk per tool call with its whole arguments; one chunk with
//! the message's other fields whole (`function_call`, `audio`, `annotations`, …); then a chunk
//! with `finish_reason`, `logprobs` and the choice's other fields. Every chunk carries the
//! answer's `id`, `created`, `model`, `system_fingerprint` and `service_tier` (where it has
//! them) and `finish_reason: null` until the last; the first chunk also carries the answer's
//! other top-level fields. Then the usage chunk (`choices: []`) when the answer has a usage
//! object, and `[DONE]`.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::{
    ConvertError, SseEvent, bad_event, checked_index, error_message, in_order, parse_data,
    push_items, push_str,
};

/// Choices in one answer (`n`); OpenAI allows 128.
const MAX_CHOICES: usize = 128;
/// Tool calls in one message.
const MAX_TOOL_CALLS: usize = 1024;

/// Top-level fields every chunk carries, as the answer does.
const ENVELOPE: [&str; 5] = [
    "id",
    "created",
    "model",
    "system_fingerprint",
    "service_tier",
];

/// Top-level fields of a chunk that are not copied into the answer as they are.
const CHUNK_ONLY: [&str; 5] = ["object", "choices", "usage", "error", "obfuscation"];

/// Message fields streamed as pieces of text.
const TEXTS: [&str; 4] = ["reasoning_content", "reasoning", "content", "refusal"];

/// Fields of a tool call's `function` (or `custom`) whose pieces are concatenated; the other
/// fields are set by their first value.
const CALL_PIECES: [&str; 2] = ["arguments", "input"];
/// Fields of `audio` whose pieces are concatenated.
const AUDIO_PIECES: [&str; 2] = ["data", "transcript"];

/// The `chat.completion` JSON object a stream of `chat.completion.chunk` events adds up to.
///
/// The stream must reach `[DONE]`; what follows it is ignored. An event named `error` or a
/// chunk with an `error` object is [`ConvertError::Upstream`]; events with empty data
/// (keep-alives) are skipped.
pub fn assemble_chat(events: &[SseEvent]) -> Result<Value, ConvertError> {
    let mut completion = Completion::default();
    for (n, event) in events.iter().enumerate() {
        let data = event.data.trim();
        if event.event.as_deref() == Some("error") {
            let error = serde_json::from_str::<Value>(data).ok();
            let details = error.as_ref().map(|e| e.get("error").unwrap_or(e));
            return Err(ConvertError::Upstream {
                event: n,
                message: error_message(details),
            });
        }
        if data == "[DONE]" {
            return completion.finish(n);
        }
        if data.is_empty() {
            continue;
        }
        completion.add_chunk(n, &parse_data(n, data)?)?;
    }
    Err(ConvertError::Truncated { terminal: "[DONE]" })
}

/// The stream of `chat.completion.chunk` events (ending with the `[DONE]` event) that a `chat.completion` JSON object is sent as.
///
/// The body must be an object with a list of `choices`, each with a `message` object, and no
/// `error`; its `object`, where it has one, must be `chat.completion`.
pub fn chat_events(body: &Value) -> Result<Vec<SseEvent>, ConvertError> {
    let Value::Object(body) = body else {
        return Err(bad_body("it is not a JSON object"));
    };
    if body.get("error").is_some_and(|e| !e.is_null()) {
        return Err(bad_body("it is an error"));
    }
    match body.get("object") {
        None | Some(Value::Null) => {}
        Some(Value::String(object)) if object == "chat.completion" => {}
        Some(other) => return Err(bad_body(format!("its object is {other}"))),
    }
    let Some(Value::Array(choices)) = body.get("choices") else {
        return Err(bad_body("it has no list of choices"));
    };
    if body
        .get("usage")
        .is_some_and(|u| !u.is_null() && !u.is_object())
    {
        return Err(bad_body("its usage is not an object"));
    }
    if choices.len() > MAX_CHOICES {
        return Err(ConvertError::TooMany {
            what: "choice",
            index: MAX_CHOICES as u64,
            limit: MAX_CHOICES,
        });
    }

    let mut envelope = Map::new();
    for key in ENVELOPE {
        if let Some(value) = body.get(key) {
            envelope.insert(key.into(), value.clone());
        }
    }
    envelope.insert("object".into(), "chat.completion.chunk".into());
    let chunk = |choices: Vec<Value>| {
        let mut chunk = envelope.clone();
        chunk.insert("choices".into(), Value::Array(choices));
        chunk
    };

    let mut chunks = Vec::new();
    for (index, choice) in choices.iter().enumerate() {
        for piece in choice_pieces(index, choice)? {
            chunks.push(chunk(vec![piece]));
        }
    }
    if let Some(usage) = body.get("usage").filter(|u| !u.is_null()) {
        let mut last = chunk(Vec::new());
        last.insert("usage".into(), usage.clone());
        chunks.push(last);
    }
    // The answer's other top-level fields go once, in the first chunk.
    let others: Map<String, Value> = body
        .iter()
        .filter(|(key, _)| {
            !ENVELOPE.contains(&key.as_str())
                && !matches!(key.as_str(), "object" | "choices" | "usage")
        })
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    if !others.is_empty() {
        match chunks.first_mut() {
            Some(first) => first.extend(others),
            None => {
                let mut only = chunk(Vec::new());
                only.extend(others);
                chunks.push(only);
            }
        }
    }

    let mut events: Vec<SseEvent> = chunks
        .into_iter()
        .map(|chunk| SseEvent::data(Value::Object(chunk).to_string()))
        .collect();
    events.push(SseEvent::data("[DONE]"));
    Ok(events)
}

fn bad_body(reason: impl Into<String>) -> ConvertError {
    ConvertError::BadBody {
        expected: "chat.completion",
        reason: reason.into(),
    }
}

/// The `choices` entries of the chunks that send one choice of an answer.
fn choice_pieces(index: usize, choice: &Value) -> Result<Vec<Value>, ConvertError> {
    let Value::Object(choice) = choice else {
        return Err(bad_body(format!("choice {index} is not an object")));
    };
    let Some(Value::Object(message)) = choice.get("message") else {
        return Err(bad_body(format!("choice {index} has no message")));
    };
    let bad_field = |field: &str, what: &str| bad_body(format!("choice {index}: {field} {what}"));

    let mut deltas = Vec::new();
    let mut first = Map::new();
    let role = message.get("role").filter(|r| !r.is_null());
    first.insert(
        "role".into(),
        role.cloned().unwrap_or_else(|| "assistant".into()),
    );
    // As OpenAI does: `content: ""` (or `null`, where the answer has no text) and
    // `refusal: null` with the role; the text follows.
    let content = match message.get("content") {
        Some(Value::String(_)) => Value::from(""),
        None | Some(Value::Null) => Value::Null,
        Some(_) => return Err(bad_field("message.content", "is neither text nor null")),
    };
    first.insert("content".into(), content);
    // The message's `null` fields are said at once; the others follow with their values.
    for (key, value) in message {
        if value.is_null() || key == "refusal" {
            first.entry(key.clone()).or_insert(Value::Null);
        }
    }
    deltas.push(first);

    for key in TEXTS {
        match message.get(key) {
            Some(Value::String(text)) if key == "content" && text.is_empty() => {}
            Some(text @ Value::String(_)) => deltas.push(one(key, text.clone())),
            None | Some(Value::Null) => {}
            Some(_) => return Err(bad_field(&format!("message.{key}"), "is not text")),
        }
    }

    match message.get("tool_calls") {
        None | Some(Value::Null) => {}
        Some(Value::Array(calls)) if calls.len() > MAX_TOOL_CALLS => {
            return Err(ConvertError::TooMany {
                what: "tool call",
                index: MAX_TOOL_CALLS as u64,
                limit: MAX_TOOL_CALLS,
            });
        }
        Some(Value::Array(calls)) if calls.is_empty() => deltas.push(one("tool_calls", json!([]))),
        Some(Value::Array(calls)) => {
            for (i, call) in calls.iter().enumerate() {
                let Value::Object(call) = call else {
                    return Err(bad_field("a tool call", "is not an object"));
                };
                let mut call = call.clone();
                call.insert("index".into(), i.into());
                deltas.push(one("tool_calls", json!([call])));
            }
        }
        Some(_) => return Err(bad_field("message.tool_calls", "is not a list")),
    }

    let rest: Map<String, Value> = message
        .iter()
        .filter(|(key, value)| {
            !value.is_null() && key.as_str() != "role" && key.as_str() != "tool_calls"
        })
        .filter(|(key, _)| !TEXTS.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    if !rest.is_empty() {
        deltas.push(rest);
    }

    // Where the answer has `logprobs`, OpenAI's chunks carry the key throughout.
    let logprobs = choice.get("logprobs");
    let piece = |delta: Map<String, Value>, logprobs: Option<Value>, finish_reason: Value| {
        let mut piece = Map::new();
        piece.insert("index".into(), index.into());
        piece.insert("delta".into(), Value::Object(delta));
        if let Some(logprobs) = logprobs {
            piece.insert("logprobs".into(), logprobs);
        }
        piece.insert("finish_reason".into(), finish_reason);
        piece
    };
    let mut pieces: Vec<Value> = deltas
        .into_iter()
        .map(|delta| Value::Object(piece(delta, logprobs.map(|_| Value::Null), Value::Null)))
        .collect();
    let finish_reason = choice.get("finish_reason").cloned().unwrap_or(Value::Null);
    let mut last = piece(Map::new(), logprobs.cloned(), finish_reason);
    for (key, value) in choice {
        if !matches!(
            key.as_str(),
            "index" | "message" | "logprobs" | "finish_reason"
        ) {
            last.insert(key.clone(), value.clone());
        }
    }
    pieces.push(Value::Object(last));
    Ok(pieces)
}

/// A delta with one field.
fn one(key: &str, value: Value) -> Map<String, Value> {
    let mut delta = Map::new();
    delta.insert(key.into(), value);
    delta
}

/// A stream's answer as it adds up.
#[derive(Debug, Default)]
struct Completion {
    /// Whether any chunk came (a stream of only `[DONE]` is no answer).
    any_chunk: bool,
    /// The top-level fields but `object`, `choices` and `usage`.
    top: Map<String, Value>,
    choices: BTreeMap<usize, Choice>,
    usage: Option<Value>,
}

impl Completion {
    fn add_chunk(&mut self, event: usize, chunk: &Value) -> Result<(), ConvertError> {
        let Value::Object(chunk) = chunk else {
            return Err(bad_event(event, "the chunk is not a JSON object"));
        };
        if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
            return Err(ConvertError::Upstream {
                event,
                message: error_message(Some(error)),
            });
        }
        match chunk.get("object") {
            None | Some(Value::Null) => {}
            // Azure's first chunk (prompt filter results) has an empty object type.
            Some(Value::String(object))
                if object.is_empty() || object == "chat.completion.chunk" => {}
            Some(other) => {
                return Err(bad_event(
                    event,
                    format!("object {other} is not chat.completion.chunk"),
                ));
            }
        }
        self.any_chunk = true;

        for (key, value) in chunk {
            if CHUNK_ONLY.contains(&key.as_str()) {
                continue;
            }
            let replace = match (self.top.get(key), value) {
                (None, _) => true,
                (Some(_), Value::Null) => false,
                (Some(now), Value::String(s)) if s.is_empty() => now.is_null(),
                (Some(_), _) => true,
            };
            if replace {
                self.top.insert(key.clone(), value.clone());
            }
        }

        match chunk.get("usage") {
            None | Some(Value::Null) => {}
            Some(usage @ Value::Object(_)) => self.usage = Some(usage.clone()),
            Some(_) => return Err(bad_event(event, "usage is not an object")),
        }

        match chunk.get("choices") {
            None | Some(Value::Null) => {}
            Some(Value::Array(choices)) => {
                for choice in choices {
                    let Value::Object(choice) = choice else {
                        return Err(bad_event(event, "a choice is not an object"));
                    };
                    let index = match choice.get("index") {
                        None | Some(Value::Null) => 0,
                        Some(index) => checked_index(event, index, "choice", MAX_CHOICES)?,
                    };
                    self.choices.entry(index).or_default().add(event, choice)?;
                }
            }
            Some(_) => return Err(bad_event(event, "choices is not a list")),
        }
        Ok(())
    }

    /// The answer, once `[DONE]` (event `event`) came.
    fn finish(self, event: usize) -> Result<Value, ConvertError> {
        if !self.any_chunk {
            return Err(bad_event(event, "the stream has no chunk before [DONE]"));
        }
        let choices = in_order(self.choices).map_err(|missing| {
            bad_event(
                event,
                format!("choice {missing} never came, though a later one did"),
            )
        })?;
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(index, choice)| choice.finish(event, index))
            .collect::<Result<Vec<_>, _>>()?;
        let mut body = self.top;
        body.insert("object".into(), "chat.completion".into());
        body.insert("choices".into(), Value::Array(choices));
        if let Some(usage) = self.usage {
            body.insert("usage".into(), usage);
        }
        Ok(Value::Object(body))
    }
}

/// A text field as it adds up: never streamed, only streamed `null`, or text.
#[derive(Debug, Default)]
enum Text {
    #[default]
    Absent,
    Null,
    Streamed(String),
}

impl Text {
    fn add(&mut self, piece: &Value) -> Result<(), ()> {
        match (&mut *self, piece) {
            (Text::Absent, Value::Null) => *self = Text::Null,
            (_, Value::Null) => {}
            (Text::Streamed(text), Value::String(s)) => text.push_str(s),
            (_, Value::String(s)) => *self = Text::Streamed(s.clone()),
            _ => return Err(()),
        }
        Ok(())
    }

    fn has_text(&self) -> bool {
        matches!(self, Text::Streamed(text) if !text.is_empty())
    }

    fn into_value(self) -> Option<Value> {
        match self {
            Text::Absent => None,
            Text::Null => Some(Value::Null),
            Text::Streamed(text) => Some(Value::String(text)),
        }
    }
}

/// The message's text fields (see [`TEXTS`]).
#[derive(Debug, Default)]
struct Texts {
    reasoning_content: Text,
    reasoning: Text,
    content: Text,
    refusal: Text,
}

impl Texts {
    fn field(&mut self, key: &str) -> Option<&mut Text> {
        match key {
            "reasoning_content" => Some(&mut self.reasoning_content),
            "reasoning" => Some(&mut self.reasoning),
            "content" => Some(&mut self.content),
            "refusal" => Some(&mut self.refusal),
            _ => None,
        }
    }
}

/// One choice as it adds up.
#[derive(Debug, Default)]
struct Choice {
    role: Option<Value>,
    texts: Texts,
    /// The tool calls by their index, once a delta had a list of them.
    tool_calls: Option<BTreeMap<usize, Map<String, Value>>>,
    /// Whether a delta had `tool_calls: null`.
    tool_calls_null: bool,
    /// The message's other fields: `function_call`, `audio`, `annotations`, ….
    other: Map<String, Value>,
    finish_reason: Value,
    logprobs: Option<Value>,
    /// The choice's other fields (`native_finish_reason`, `content_filter_results`, …).
    extra: Map<String, Value>,
}

impl Choice {
    fn add(&mut self, event: usize, choice: &Map<String, Value>) -> Result<(), ConvertError> {
        for (key, value) in choice {
            match key.as_str() {
                // `message` has no place in a chunk; the answer's message is built from deltas.
                "index" | "message" => {}
                "delta" => match value {
                    Value::Object(delta) => self.add_delta(event, delta)?,
                    Value::Null => {}
                    _ => return Err(bad_event(event, "a delta is not an object")),
                },
                "finish_reason" => {
                    if !value.is_null() {
                        self.finish_reason = value.clone();
                    }
                }
                "logprobs" => add_logprobs(&mut self.logprobs, value),
                _ => {
                    if !value.is_null() || !self.extra.contains_key(key) {
                        self.extra.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        Ok(())
    }

    fn add_delta(&mut self, event: usize, delta: &Map<String, Value>) -> Result<(), ConvertError> {
        for (key, value) in delta {
            if let Some(text) = self.texts.field(key) {
                text.add(value)
                    .map_err(|()| bad_event(event, format!("delta.{key} is not text")))?;
                continue;
            }
            match key.as_str() {
                "role" => {
                    if !value.is_null() {
                        self.role = Some(value.clone());
                    }
                }
                "tool_calls" => self.add_tool_calls(event, value)?,
                _ => add_other(&mut self.other, key, value),
            }
        }
        Ok(())
    }

    fn add_tool_calls(&mut self, event: usize, value: &Value) -> Result<(), ConvertError> {
        let deltas = match value {
            Value::Null => {
                self.tool_calls_null = true;
                return Ok(());
            }
            Value::Array(deltas) => deltas,
            _ => return Err(bad_event(event, "delta.tool_calls is not a list")),
        };
        let calls = self.tool_calls.get_or_insert_with(BTreeMap::new);
        for delta in deltas {
            let Value::Object(delta) = delta else {
                return Err(bad_event(event, "a tool call delta is not an object"));
            };
            let index = match delta.get("index") {
                None | Some(Value::Null) => unindexed(calls, delta),
                Some(index) => checked_index(event, index, "tool call", MAX_TOOL_CALLS)?,
            };
            // A call without an index can be one past the last.
            if index >= MAX_TOOL_CALLS {
                return Err(ConvertError::TooMany {
                    what: "tool call",
                    index: index as u64,
                    limit: MAX_TOOL_CALLS,
                });
            }
            add_pieces(calls.entry(index).or_default(), delta, &CALL_PIECES);
        }
        Ok(())
    }

    fn finish(self, event: usize, index: usize) -> Result<Value, ConvertError> {
        let calls = match self.tool_calls {
            None => None,
            Some(calls) => Some(in_order(calls).map_err(|missing| {
                bad_event(
                    event,
                    format!(
                        "choice {index}: tool call {missing} never came, though a later one did"
                    ),
                )
            })?),
        };
        let calls_something = calls.as_ref().is_some_and(|calls| !calls.is_empty())
            || ["function_call", "audio"]
                .iter()
                .any(|key| self.other.get(*key).is_some_and(|v| !v.is_null()));

        let Texts {
            reasoning_content,
            reasoning,
            content,
            refusal,
        } = self.texts;
        // OpenAI's answers have `content: null` beside tool calls or a refusal, though the
        // stream sent `""` with the role.
        let content = if content.has_text() {
            content.into_value()
        } else if calls_something || refusal.has_text() {
            None
        } else {
            content.into_value()
        };

        let mut message = Map::new();
        message.insert(
            "role".into(),
            self.role.unwrap_or_else(|| "assistant".into()),
        );
        message.insert("content".into(), content.unwrap_or(Value::Null));
        for (key, text) in [
            ("refusal", refusal),
            ("reasoning_content", reasoning_content),
            ("reasoning", reasoning),
        ] {
            if let Some(value) = text.into_value() {
                message.insert(key.into(), value);
            }
        }
        if let Some(calls) = calls {
            let calls = calls
                .into_iter()
                .map(|call| Value::Object(complete_call(call)));
            message.insert("tool_calls".into(), Value::Array(calls.collect()));
        } else if self.tool_calls_null {
            message.insert("tool_calls".into(), Value::Null);
        }
        for (key, value) in self.other {
            message.entry(key).or_insert(value);
        }

        let mut choice = Map::new();
        choice.insert("index".into(), index.into());
        choice.insert("message".into(), Value::Object(message));
        if let Some(logprobs) = self.logprobs {
            choice.insert("logprobs".into(), logprobs);
        }
        choice.insert("finish_reason".into(), self.finish_reason);
        for (key, value) in self.extra {
            choice.entry(key).or_insert(value);
        }
        Ok(Value::Object(choice))
    }
}

/// The index of a tool call delta that has none (some OpenAI-compatible servers send each call
/// whole without one): the call with its `id`, a new call for a new `id`, or else the last call.
fn unindexed(calls: &BTreeMap<usize, Map<String, Value>>, delta: &Map<String, Value>) -> usize {
    let last = calls.keys().next_back().copied();
    let id = delta
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty());
    match id {
        Some(id) => calls
            .iter()
            .find(|(_, call)| call.get("id").and_then(Value::as_str) == Some(id))
            .map(|(index, _)| *index)
            .unwrap_or_else(|| last.map_or(0, |last| last + 1)),
        None => last.unwrap_or(0),
    }
}

/// A tool call with the fields its JSON form always has: a `type`, and `arguments` in its
/// `function` (a call whose arguments never streamed has none).
fn complete_call(mut call: Map<String, Value>) -> Map<String, Value> {
    if let Some(Value::Object(function)) = call.get_mut("function") {
        function
            .entry("arguments")
            .or_insert_with(|| Value::from(""));
    }
    if call.get("type").is_none_or(Value::is_null) && call.contains_key("function") {
        call.insert("type".into(), "function".into());
    }
    call
}

/// Adds a delta's fields to an object that adds up from pieces: the `pieces` fields'
/// strings are concatenated, objects are added up the same way, and any other field keeps its
/// first value (an empty string or `null` counting as none yet).
fn add_pieces(into: &mut Map<String, Value>, delta: &Map<String, Value>, pieces: &[&str]) {
    for (key, value) in delta {
        if key == "index" {
            continue;
        }
        match value {
            Value::Null => {
                into.entry(key.clone()).or_insert(Value::Null);
            }
            Value::String(piece) if pieces.contains(&key.as_str()) => push_str(into, key, piece),
            Value::Object(fields) => {
                if let Some(Value::Object(inner)) = into.get_mut(key) {
                    add_pieces(inner, fields, pieces);
                } else if unset(into.get(key)) {
                    into.insert(key.clone(), value.clone());
                }
            }
            _ => {
                if unset(into.get(key)) {
                    into.insert(key.clone(), value.clone());
                }
            }
        }
    }
}

fn unset(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(_) => false,
    }
}

/// Adds a delta field that is not one of the texts or the tool calls.
fn add_other(other: &mut Map<String, Value>, key: &str, value: &Value) {
    let pieces: &[&str] = match key {
        "function_call" => &CALL_PIECES,
        "audio" => &AUDIO_PIECES,
        _ => &[],
    };
    match value {
        Value::Null => {
            other.entry(key).or_insert(Value::Null);
        }
        Value::Array(items) => push_items(other, key, items),
        Value::Object(fields) if !pieces.is_empty() => {
            if let Some(Value::Object(into)) = other.get_mut(key) {
                add_pieces(into, fields, pieces);
            } else {
                other.insert(key.into(), value.clone());
            }
        }
        _ => {
            other.insert(key.into(), value.clone());
        }
    }
}

/// Adds a chunk's `logprobs` to the choice's: their lists (`content`, `refusal`) concatenated.
fn add_logprobs(into: &mut Option<Value>, value: &Value) {
    if let (Some(Value::Object(into)), Value::Object(fields)) = (into.as_mut(), value) {
        for (key, value) in fields {
            match value {
                Value::Array(items) => push_items(into, key, items),
                Value::Null => {
                    into.entry(key.clone()).or_insert(Value::Null);
                }
                _ => {
                    into.insert(key.clone(), value.clone());
                }
            }
        }
        return;
    }
    // A `null` states the field; anything else replaces only a `null`.
    let replace = match into {
        None => true,
        Some(Value::Null) => !value.is_null(),
        Some(_) => false,
    };
    if replace {
        *into = Some(value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{mangled, mutations, sse};
    use super::*;

    /// A chunk of the `chatcmpl-123` answer (OpenAI's streaming example) with these choices.
    fn chunk(choices: Value) -> SseEvent {
        SseEvent::data(
            json!({
                "id": "chatcmpl-123",
                "object": "chat.completion.chunk",
                "created": 1694268190,
                "model": "gpt-4o-mini",
                "system_fingerprint": "fp_44709d6fcb",
                "choices": choices,
            })
            .to_string(),
        )
    }

    fn done() -> SseEvent {
        SseEvent::data("[DONE]")
    }

    /// Both ways: the stream of a body adds up to the body, and the stream of what a stream
    /// adds up to adds up to the same again.
    fn assert_round_trip(body: &Value) {
        let events = chat_events(body).unwrap();
        assert_eq!(
            &assemble_chat(&events).unwrap(),
            body,
            "events: {events:#?}"
        );
    }

    fn assert_stream_round_trip(events: &[SseEvent]) -> Value {
        let body = assemble_chat(events).unwrap();
        let again = assemble_chat(&chat_events(&body).unwrap()).unwrap();
        assert_eq!(again, body);
        body
    }

    // A text answer as OpenAI streams it, with `stream_options.include_usage`: the role chunk
    // with `content: ""`, the text, the finish, then the usage chunk with no choices.
    const TEXT_STREAM: &str = r#"
data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_1827dd0c55","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"wl1L4ubkZC2"}

data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_1827dd0c55","choices":[{"index":0,"delta":{"content":"The"},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"MKXxbHEqGM"}

data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_1827dd0c55","choices":[{"index":0,"delta":{"content":" planet"},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"RXhSL9"}

data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_1827dd0c55","choices":[{"index":0,"delta":{"content":" is Saturn."},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"x"}

data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_1827dd0c55","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null,"obfuscation":"yz"}

data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_1827dd0c55","choices":[],"usage":{"prompt_tokens":22,"completion_tokens":6,"total_tokens":28,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"obfuscation":"abc"}

data: [DONE]
"#;

    #[test]
    fn a_text_stream_with_a_usage_chunk_adds_up() {
        let body = assemble_chat(&sse(TEXT_STREAM)).unwrap();
        assert_eq!(
            body,
            json!({
                "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
                "object": "chat.completion",
                "created": 1741570283,
                "model": "gpt-4o-2024-08-06",
                "service_tier": "default",
                "system_fingerprint": "fp_1827dd0c55",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": "The planet is Saturn.", "refusal": null},
                    "logprobs": null,
                    "finish_reason": "stop"
                }],
                "usage": {
                    "prompt_tokens": 22, "completion_tokens": 6, "total_tokens": 28,
                    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
                }
            })
        );
        assert_stream_round_trip(&sse(TEXT_STREAM));
    }

    #[test]
    fn the_docs_minimal_stream_adds_up() {
        // OpenAI's reference example: no usage, no service tier.
        let events = [
            chunk(
                json!([{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]),
            ),
            chunk(
                json!([{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}]),
            ),
            chunk(
                json!([{"index":0,"delta":{"content":"!"},"logprobs":null,"finish_reason":null}]),
            ),
            chunk(json!([{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}])),
            done(),
        ];
        let body = assemble_chat(&events).unwrap();
        assert_eq!(
            body,
            json!({
                "id": "chatcmpl-123", "object": "chat.completion", "created": 1694268190,
                "model": "gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "logprobs": null, "finish_reason": "stop"}]
            })
        );
        assert!(body.get("usage").is_none());
        assert_stream_round_trip(&events);
    }

    // A tool call whose arguments come in pieces, as the function-calling guide shows them
    // (the SDK's view, every absent field `null`), ending with `finish_reason: tool_calls`.
    #[test]
    fn a_tool_call_with_split_arguments_adds_up() {
        let call = |id: Value, name: Value, arguments: &str, kind: Value| json!([{"index":0,"delta":{"tool_calls":[{"index":0,"id":id,"function":{"arguments":arguments,"name":name},"type":kind}]},"logprobs":null,"finish_reason":null}]);
        let mut events = vec![chunk(
            json!([{"index":0,"delta":{"role":"assistant","content":null,"refusal":null,"tool_calls":[{"index":0,"id":"call_DdmO9pD3xa9XTPNJ32zg2hcA","function":{"arguments":"","name":"get_weather"},"type":"function"}]},"logprobs":null,"finish_reason":null}]),
        )];
        for piece in ["{\"", "location", "\":\"", "Paris", ",", " France", "\"}"] {
            events.push(chunk(call(Value::Null, Value::Null, piece, Value::Null)));
        }
        events.push(chunk(
            json!([{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}]),
        ));
        events.push(done());
        let body = assemble_chat(&events).unwrap();
        assert_eq!(
            body.pointer("/choices/0"),
            Some(&json!({
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": null,
                    "refusal": null,
                    "tool_calls": [{
                        "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris, France\"}"}
                    }]
                },
                "logprobs": null,
                "finish_reason": "tool_calls"
            }))
        );
        assert_stream_round_trip(&events);
    }

    #[test]
    fn parallel_tool_calls_are_merged_by_their_index() {
        let args = |index: u64, piece: &str| json!([{"index":0,"delta":{"tool_calls":[{"index":index,"function":{"arguments":piece}}]},"logprobs":null,"finish_reason":null}]);
        let start = |index: u64, id: &str| json!([{"index":0,"delta":{"tool_calls":[{"index":index,"id":id,"type":"function","function":{"name":"get_weather","arguments":""}}]},"logprobs":null,"finish_reason":null}]);
        let events = [
            chunk(
                json!([{"index":0,"delta":{"role":"assistant","content":null},"logprobs":null,"finish_reason":null}]),
            ),
            chunk(start(0, "call_12345xyz")),
            chunk(args(0, "{\"location\":")),
            chunk(args(0, "\"Paris, France\"}")),
            chunk(start(1, "call_67890abc")),
            // The second call's arguments and a late piece of the first, interleaved.
            chunk(args(1, "{\"location\":\"Bogotá, ")),
            chunk(args(1, "Colombia\"}")),
            chunk(
                json!([{"index":0,"delta":{"tool_calls":[{"index":2,"id":"call_99999","type":"function","function":{"name":"send_email","arguments":"{\"to\":\"bob@email.com\",\"body\":\"Hi\"}"}}]},"logprobs":null,"finish_reason":null}]),
            ),
            chunk(json!([{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}])),
            done(),
        ];
        let body = assemble_chat(&events).unwrap();
        assert_eq!(
            body.pointer("/choices/0/message/tool_calls"),
            Some(&json!([
                {"id": "call_12345xyz", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris, France\"}"}},
                {"id": "call_67890abc", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Bogotá, Colombia\"}"}},
                {"id": "call_99999", "type": "function", "function": {"name": "send_email", "arguments": "{\"to\":\"bob@email.com\",\"body\":\"Hi\"}"}}
            ]))
        );
        assert_eq!(
            body.pointer("/choices/0/message/content"),
            Some(&Value::Null)
        );
        assert_stream_round_trip(&events);
    }

    #[test]
    fn a_repeated_tool_call_id_and_name_are_set_once() {
        // Some OpenAI-compatible servers repeat the id and name in every piece.
        let piece = |arguments: &str| json!([{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":arguments}}]},"finish_reason":null}]);
        let events = [chunk(piece("{\"a\":")), chunk(piece("1}")), done()];
        let body = assemble_chat(&events).unwrap();
        assert_eq!(
            body.pointer("/choices/0/message/tool_calls/0"),
            Some(
                &json!({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}})
            )
        );
    }

    #[test]
    fn tool_calls_without_an_index_are_told_apart_by_their_id() {
        // Gemini's OpenAI-compatible API sends each call whole, without an index.
        let call = |id: &str, name: &str| json!([{"index":0,"delta":{"role":"assistant","tool_calls":[{"id":id,"type":"function","function":{"name":name,"arguments":"{}"}}]},"finish_reason":null}]);
        let events = [chunk(call("a", "f")), chunk(call("b", "g")), done()];
        let body = assemble_chat(&events).unwrap();
        let calls = body.pointer("/choices/0/message/tool_calls").unwrap();
        assert_eq!(calls.as_array().unwrap().len(), 2);
        assert_eq!(calls.pointer("/1/function/name"), Some(&json!("g")));
    }

    // DeepSeek's reasoner: `reasoning_content` pieces, then `content` pieces, and the usage on
    // the last chunk with choices.
    const DEEPSEEK_STREAM: &str = r#"
data: {"id":"1f6334b7-7c05-4d17-9d93-0dbdc2f0e6f8","object":"chat.completion.chunk","created":1737685080,"model":"deepseek-reasoner","system_fingerprint":"fp_7e73fd9a08","choices":[{"index":0,"delta":{"role":"assistant","content":null,"reasoning_content":""},"logprobs":null,"finish_reason":null}]}

data: {"id":"1f6334b7-7c05-4d17-9d93-0dbdc2f0e6f8","object":"chat.completion.chunk","created":1737685080,"model":"deepseek-reasoner","system_fingerprint":"fp_7e73fd9a08","choices":[{"index":0,"delta":{"content":null,"reasoning_content":"Okay, the user"},"logprobs":null,"finish_reason":null}]}

data: {"id":"1f6334b7-7c05-4d17-9d93-0dbdc2f0e6f8","object":"chat.completion.chunk","created":1737685080,"model":"deepseek-reasoner","system_fingerprint":"fp_7e73fd9a08","choices":[{"index":0,"delta":{"content":null,"reasoning_content":" said hi."},"logprobs":null,"finish_reason":null}]}

data: {"id":"1f6334b7-7c05-4d17-9d93-0dbdc2f0e6f8","object":"chat.completion.chunk","created":1737685080,"model":"deepseek-reasoner","system_fingerprint":"fp_7e73fd9a08","choices":[{"index":0,"delta":{"content":"Hello","reasoning_content":null},"logprobs":null,"finish_reason":null}]}

data: {"id":"1f6334b7-7c05-4d17-9d93-0dbdc2f0e6f8","object":"chat.completion.chunk","created":1737685080,"model":"deepseek-reasoner","system_fingerprint":"fp_7e73fd9a08","choices":[{"index":0,"delta":{"content":"!","reasoning_content":null},"logprobs":null,"finish_reason":null}]}

data: {"id":"1f6334b7-7c05-4d17-9d93-0dbdc2f0e6f8","object":"chat.completion.chunk","created":1737685080,"model":"deepseek-reasoner","system_fingerprint":"fp_7e73fd9a08","choices":[{"index":0,"delta":{"content":"","reasoning_content":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":13,"completion_tokens":40,"total_tokens":53,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":36},"prompt_cache_hit_tokens":0,"prompt_cache_miss_tokens":13}}

data: [DONE]
"#;

    #[test]
    fn reasoning_content_and_usage_on_the_last_chunk_add_up() {
        let body = assert_stream_round_trip(&sse(DEEPSEEK_STREAM));
        assert_eq!(
            body.pointer("/choices/0/message"),
            Some(&json!({
                "role": "assistant",
                "content": "Hello!",
                "reasoning_content": "Okay, the user said hi."
            }))
        );
        assert_eq!(
            body.pointer("/usage/completion_tokens_details/reasoning_tokens"),
            Some(&json!(36))
        );
        assert_eq!(
            body.pointer("/choices/0/finish_reason"),
            Some(&json!("stop"))
        );
    }

    #[test]
    fn openrouter_reasoning_and_its_details_add_up() {
        let events = [
            chunk(
                json!([{"index":0,"delta":{"role":"assistant","content":"","reasoning":"Let me","reasoning_details":[{"type":"reasoning.text","text":"Let me","index":0}]},"finish_reason":null,"native_finish_reason":null}]),
            ),
            chunk(
                json!([{"index":0,"delta":{"content":"","reasoning":" think."},"finish_reason":null,"native_finish_reason":null}]),
            ),
            chunk(
                json!([{"index":0,"delta":{"content":"42","reasoning_details":[{"type":"reasoning.encrypted","data":"xyz","index":1}]},"finish_reason":null,"native_finish_reason":null}]),
            ),
            chunk(
                json!([{"index":0,"delta":{"content":""},"finish_reason":"stop","native_finish_reason":"STOP"}]),
            ),
            done(),
        ];
        let body = assert_stream_round_trip(&events);
        assert_eq!(
            body.pointer("/choices/0"),
            Some(&json!({
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "42",
                    "reasoning": "Let me think.",
                    "reasoning_details": [
                        {"type": "reasoning.text", "text": "Let me", "index": 0},
                        {"type": "reasoning.encrypted", "data": "xyz", "index": 1}
                    ]
                },
                "finish_reason": "stop",
                "native_finish_reason": "STOP"
            }))
        );
    }

    #[test]
    fn several_choices_add_up_by_their_index() {
        let events = [
            chunk(
                json!([{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null},{"index":1,"delta":{"role":"assistant","content":""},"finish_reason":null}]),
            ),
            chunk(json!([{"index":1,"delta":{"content":"Bonjour"},"finish_reason":null}])),
            chunk(json!([{"index":0,"delta":{"content":"Hello"},"finish_reason":null}])),
            chunk(json!([{"index":0,"delta":{},"finish_reason":"stop"}])),
            chunk(json!([{"index":1,"delta":{"content":" !"},"finish_reason":"length"}])),
            done(),
        ];
        let body = assert_stream_round_trip(&events);
        assert_eq!(
            body["choices"],
            json!([
                {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"},
                {"index": 1, "message": {"role": "assistant", "content": "Bonjour !"}, "finish_reason": "length"}
            ])
        );
    }

    #[test]
    fn logprobs_lists_are_concatenated() {
        let token = |t: &str, lp: f64| json!({"token": t, "logprob": lp, "bytes": t.as_bytes(), "top_logprobs": []});
        let events = [
            chunk(
                json!([{"index":0,"delta":{"role":"assistant","content":""},"logprobs":{"content":[],"refusal":null},"finish_reason":null}]),
            ),
            chunk(
                json!([{"index":0,"delta":{"content":"Hello"},"logprobs":{"content":[token("Hello", -0.31725305)],"refusal":null},"finish_reason":null}]),
            ),
            chunk(
                json!([{"index":0,"delta":{"content":"!"},"logprobs":{"content":[token("!", -0.02380986)],"refusal":null},"finish_reason":null}]),
            ),
            chunk(json!([{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}])),
            done(),
        ];
        let body = assert_stream_round_trip(&events);
        assert_eq!(
            body.pointer("/choices/0/logprobs"),
            Some(
                &json!({"content": [token("Hello", -0.31725305), token("!", -0.02380986)], "refusal": null})
            )
        );
    }

    #[test]
    fn a_refusal_leaves_content_null() {
        let events = [
            chunk(
                json!([{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]),
            ),
            chunk(
                json!([{"index":0,"delta":{"refusal":"I'm sorry, "},"logprobs":null,"finish_reason":null}]),
            ),
            chunk(
                json!([{"index":0,"delta":{"refusal":"I can't help with that."},"logprobs":null,"finish_reason":null}]),
            ),
            chunk(json!([{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}])),
            done(),
        ];
        let body = assert_stream_round_trip(&events);
        assert_eq!(
            body.pointer("/choices/0/message"),
            Some(
                &json!({"role": "assistant", "content": null, "refusal": "I'm sorry, I can't help with that."})
            )
        );
    }

    #[test]
    fn an_empty_answer_keeps_its_empty_content() {
        let events = [
            chunk(
                json!([{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]),
            ),
            chunk(json!([{"index":0,"delta":{},"finish_reason":"length"}])),
            done(),
        ];
        let body = assert_stream_round_trip(&events);
        assert_eq!(body.pointer("/choices/0/message/content"), Some(&json!("")));
    }

    #[test]
    fn a_legacy_function_call_adds_up() {
        let events = [
            chunk(
                json!([{"index":0,"delta":{"role":"assistant","content":null,"function_call":{"name":"get_weather","arguments":""}},"finish_reason":null}]),
            ),
            chunk(
                json!([{"index":0,"delta":{"function_call":{"arguments":"{\"city\":"}},"finish_reason":null}]),
            ),
            chunk(
                json!([{"index":0,"delta":{"function_call":{"arguments":"\"Oslo\"}"}},"finish_reason":null}]),
            ),
            chunk(json!([{"index":0,"delta":{},"finish_reason":"function_call"}])),
            done(),
        ];
        let body = assert_stream_round_trip(&events);
        assert_eq!(
            body.pointer("/choices/0/message"),
            Some(
                &json!({"role": "assistant", "content": null, "function_call": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}})
            )
        );
    }

    #[test]
    fn audio_pieces_add_up() {
        let events = [
            chunk(
                json!([{"index":0,"delta":{"role":"assistant","content":null,"audio":{"id":"audio_1","transcript":"Hel"}},"finish_reason":null}]),
            ),
            chunk(
                json!([{"index":0,"delta":{"audio":{"transcript":"lo","data":"UklG"}},"finish_reason":null}]),
            ),
            chunk(
                json!([{"index":0,"delta":{"audio":{"data":"RiQA","expires_at":1729018505}},"finish_reason":null}]),
            ),
            chunk(json!([{"index":0,"delta":{},"finish_reason":"stop"}])),
            done(),
        ];
        let body = assert_stream_round_trip(&events);
        assert_eq!(
            body.pointer("/choices/0/message"),
            Some(
                &json!({"role": "assistant", "content": null, "audio": {"id": "audio_1", "transcript": "Hello", "data": "UklGRiQA", "expires_at": 1729018505}})
            )
        );
    }

    #[test]
    fn azure_prompt_filter_chunk_and_empty_fields_do_not_override() {
        // Azure OpenAI's first chunk: no choices, empty id, model and object.
        let first = json!({"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]});
        let events = [
            SseEvent::data(first.to_string()),
            chunk(
                json!([{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null,"content_filter_results":{}}]),
            ),
            chunk(
                json!([{"index":0,"delta":{},"finish_reason":"stop","content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]),
            ),
            done(),
        ];
        let body = assert_stream_round_trip(&events);
        assert_eq!(body["id"], "chatcmpl-123");
        assert_eq!(body["model"], "gpt-4o-mini");
        assert_eq!(body["created"], 1694268190);
        assert_eq!(
            body["prompt_filter_results"],
            first["prompt_filter_results"]
        );
        assert_eq!(
            body.pointer("/choices/0/content_filter_results/hate/severity"),
            Some(&json!("safe"))
        );
    }

    #[test]
    fn keep_alives_and_what_follows_done_are_skipped() {
        let mut events = sse(TEXT_STREAM);
        events.insert(1, SseEvent::data(""));
        events.push(SseEvent::data("not json, but after [DONE]"));
        assert_eq!(
            assemble_chat(&events).unwrap(),
            assemble_chat(&sse(TEXT_STREAM)).unwrap()
        );
    }

    // Errors.

    #[test]
    fn a_stream_without_done_is_truncated() {
        let mut events = sse(TEXT_STREAM);
        events.pop();
        assert!(matches!(
            assemble_chat(&events),
            Err(ConvertError::Truncated { terminal: "[DONE]" })
        ));
        assert!(matches!(
            assemble_chat(&[]),
            Err(ConvertError::Truncated { .. })
        ));
    }

    #[test]
    fn a_stream_of_only_done_is_no_answer() {
        assert!(matches!(
            assemble_chat(&[done()]),
            Err(ConvertError::BadEvent { event: 0, .. })
        ));
    }

    #[test]
    fn an_error_chunk_is_an_upstream_error() {
        let events = [
            chunk(
                json!([{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]),
            ),
            SseEvent::data(
                r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#,
            ),
            done(),
        ];
        let error = assemble_chat(&events).unwrap_err();
        assert!(
            matches!(&error, ConvertError::Upstream { event: 1, message } if message == "server_error: The server had an error while processing your request."),
            "{error}"
        );
        // An `error` event name is one too, whatever its data.
        let named = [SseEvent::named("error", "overloaded"), done()];
        assert!(matches!(
            assemble_chat(&named),
            Err(ConvertError::Upstream { event: 0, .. })
        ));
        // A null `error` is none.
        let fine = [
            chunk(json!([{"index":0,"delta":{"content":"x"}}])),
            SseEvent::data(r#"{"error":null,"choices":[]}"#),
            done(),
        ];
        assert!(assemble_chat(&fine).is_ok());
    }

    #[test]
    fn data_that_is_not_json_is_an_error() {
        let events = [
            chunk(json!([{"index":0,"delta":{"content":"Hi"}}])),
            SseEvent::data("{\"id\":\"chatcmpl-123\",\"choices\":[{\"ind"),
            done(),
        ];
        assert!(matches!(
            assemble_chat(&events),
            Err(ConvertError::NotJson { event: 1, .. })
        ));
    }

    #[test]
    fn huge_indices_are_errors_not_allocations() {
        let huge_choice = [
            chunk(json!([{"index":1_000_000_000u64,"delta":{"content":"x"}}])),
            done(),
        ];
        assert!(matches!(
            assemble_chat(&huge_choice),
            Err(ConvertError::TooMany {
                what: "choice",
                index: 1_000_000_000,
                limit: 128
            })
        ));
        let huge_call = [
            chunk(
                json!([{"index":0,"delta":{"tool_calls":[{"index":u64::MAX,"function":{"arguments":"{}"}}]}}]),
            ),
            done(),
        ];
        assert!(matches!(
            assemble_chat(&huge_call),
            Err(ConvertError::TooMany {
                what: "tool call",
                limit: 1024,
                ..
            })
        ));
        let just_past = [
            chunk(json!([{"index":128,"delta":{"content":"x"}}])),
            done(),
        ];
        assert!(matches!(
            assemble_chat(&just_past),
            Err(ConvertError::TooMany { .. })
        ));
        for index in [json!(-1), json!(1.5), json!("0"), json!(1e300)] {
            let bad = [
                chunk(json!([{"index":index,"delta":{"content":"x"}}])),
                done(),
            ];
            assert!(
                matches!(
                    assemble_chat(&bad),
                    Err(ConvertError::BadEvent { event: 0, .. })
                ),
                "{index}"
            );
        }
    }

    #[test]
    fn skipped_indices_are_errors() {
        let skipped_choice = [
            chunk(json!([{"index":1,"delta":{"content":"x"},"finish_reason":"stop"}])),
            done(),
        ];
        assert!(matches!(
            assemble_chat(&skipped_choice),
            Err(ConvertError::BadEvent { event: 1, .. })
        ));
        let skipped_call = [
            chunk(
                json!([{"index":0,"delta":{"tool_calls":[{"index":1,"id":"c","function":{"name":"f","arguments":"{}"}}]}}]),
            ),
            done(),
        ];
        assert!(matches!(
            assemble_chat(&skipped_call),
            Err(ConvertError::BadEvent { event: 1, .. })
        ));
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for data in [
            r#"[1, 2]"#,
            r#"{"object":"chat.completion","choices":[]}"#,
            r#"{"object":"response.output_text.delta"}"#,
            r#"{"choices":{"index":0}}"#,
            r#"{"choices":[7]}"#,
            r#"{"choices":[{"index":0,"delta":"text"}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":7}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":{"index":0}}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":["x"]}}]}"#,
            r#"{"choices":[],"usage":12}"#,
        ] {
            let events = [SseEvent::data(data), done()];
            assert!(
                matches!(
                    assemble_chat(&events),
                    Err(ConvertError::BadEvent { event: 0, .. })
                ),
                "{data}"
            );
        }
    }

    // JSON answers sent as streams.

    /// OpenAI's reference `chat.completion`.
    fn text_body() -> Value {
        json!({
            "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
            "object": "chat.completion",
            "created": 1741569952,
            "model": "gpt-4.1-2025-04-14",
            "choices": [{
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello! How can I assist you today?",
                    "refusal": null,
                    "annotations": []
                },
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": {
                "prompt_tokens": 19,
                "completion_tokens": 10,
                "total_tokens": 29,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
            },
            "service_tier": "default",
            "system_fingerprint": "fp_50cad350e4"
        })
    }

    fn tool_calls_body() -> Value {
        json!({
            "id": "chatcmpl-abc123",
            "object": "chat.completion",
            "created": 1699896916,
            "model": "gpt-4o-mini",
            "choices": [{
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": null,
                    "refusal": null,
                    "tool_calls": [
                        {"id": "call_abc123", "type": "function", "function": {"name": "get_current_weather", "arguments": "{\n\"location\": \"Boston, MA\"\n}"}},
                        {"id": "call_def456", "type": "function", "function": {"name": "get_current_time", "arguments": "{\"tz\":\"America/New_York\"}"}}
                    ],
                    "annotations": []
                },
                "logprobs": null,
                "finish_reason": "tool_calls"
            }],
            "usage": {"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99},
            "system_fingerprint": null
        })
    }

    #[test]
    fn a_text_answer_streams_as_openai_does() {
        let events = chat_events(&text_body()).unwrap();
        assert_eq!(events.last(), Some(&done()));
        assert!(events.iter().all(|e| e.event.is_none()));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(&e.data).unwrap())
            .collect();
        for chunk in &chunks {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["id"], "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT");
            assert_eq!(chunk["created"], 1741569952);
            assert_eq!(chunk["model"], "gpt-4.1-2025-04-14");
            assert_eq!(chunk["system_fingerprint"], "fp_50cad350e4");
            assert_eq!(chunk["service_tier"], "default");
        }
        assert_eq!(
            chunks[0]["choices"],
            json!([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null}, "logprobs": null, "finish_reason": null}])
        );
        assert_eq!(
            chunks[1]["choices"][0]["delta"],
            json!({"content": "Hello! How can I assist you today?"})
        );
        let finish = &chunks[chunks.len() - 2];
        assert_eq!(
            finish["choices"],
            json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}])
        );
        let usage = &chunks[chunks.len() - 1];
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"], text_body()["usage"]);
    }

    #[test]
    fn a_tool_call_answer_streams_one_chunk_per_call() {
        let events = chat_events(&tool_calls_body()).unwrap();
        let deltas: Vec<Value> = events
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(&e.data).ok())
            .filter_map(|c| c.pointer("/choices/0/delta").cloned())
            .collect();
        assert_eq!(
            deltas[0],
            json!({"role": "assistant", "content": null, "refusal": null})
        );
        assert_eq!(
            deltas[1],
            json!({"tool_calls": [{"index": 0, "id": "call_abc123", "type": "function", "function": {"name": "get_current_weather", "arguments": "{\n\"location\": \"Boston, MA\"\n}"}}]})
        );
        assert_eq!(deltas[2]["tool_calls"][0]["index"], 1);
    }

    #[test]
    fn answers_round_trip_through_their_streams() {
        let bodies = [
            text_body(),
            tool_calls_body(),
            // Reasoning, usage with details, no system fingerprint.
            json!({
                "id": "930c60df-bf64-41c9-a88e-3ec75f81e00e", "object": "chat.completion", "created": 1705651092, "model": "deepseek-reasoner",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!", "reasoning_content": "The user greets me."}, "logprobs": null, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 16, "completion_tokens": 10, "total_tokens": 26, "prompt_cache_hit_tokens": 0, "prompt_cache_miss_tokens": 16, "completion_tokens_details": {"reasoning_tokens": 5}}
            }),
            // OpenRouter's `reasoning`, with a null `reasoning_content` beside it.
            json!({
                "id": "gen-1", "object": "chat.completion", "created": 1, "model": "x/y", "provider": "Z",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "4", "reasoning": "2+2", "reasoning_content": null, "reasoning_details": [{"type": "reasoning.text", "text": "2+2"}]}, "finish_reason": "stop", "native_finish_reason": "stop"}]
            }),
            // A refusal.
            json!({
                "id": "c", "object": "chat.completion", "created": 2, "model": "gpt-4o",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "refusal": "I can't help with that."}, "logprobs": null, "finish_reason": "stop"}]
            }),
            // Several choices, logprobs.
            json!({
                "id": "c", "object": "chat.completion", "created": 3, "model": "gpt-4o",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "Hi", "refusal": null}, "logprobs": {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}], "refusal": null}, "finish_reason": "stop"},
                    {"index": 1, "message": {"role": "assistant", "content": "Hello", "refusal": null}, "logprobs": {"content": [{"token": "Hello", "logprob": -0.2, "bytes": [72, 101, 108, 108, 111], "top_logprobs": []}], "refusal": null}, "finish_reason": "length"}
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
            }),
            // A legacy function call, audio, an empty answer.
            json!({
                "id": "c", "object": "chat.completion", "created": 4, "model": "gpt-3.5-turbo-0613",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "function_call": {"name": "f", "arguments": "{}"}}, "finish_reason": "function_call"}]
            }),
            json!({
                "id": "c", "object": "chat.completion", "created": 5, "model": "gpt-4o-audio-preview",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "refusal": null, "audio": {"id": "audio_abc", "data": "UklGRiQA", "expires_at": 1729018505, "transcript": "Yes."}}, "finish_reason": "stop"}]
            }),
            json!({
                "id": "c", "object": "chat.completion", "created": 6, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "length"}]
            }),
            // No choices, only usage; Azure's extra fields.
            json!({
                "id": "c", "object": "chat.completion", "created": 7, "model": "m", "choices": [],
                "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}
            }),
            json!({
                "id": "c", "object": "chat.completion", "created": 8, "model": "gpt-4o",
                "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop", "content_filter_results": {"hate": {"filtered": false, "severity": "safe"}}}]
            }),
        ];
        for body in &bodies {
            assert_round_trip(body);
        }
    }

    #[test]
    fn bodies_that_are_not_chat_completions_are_errors() {
        let too_many: Vec<Value> = (0..129)
            .map(|i| json!({"index": i, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}))
            .collect();
        let many_calls: Vec<Value> = (0..1025)
            .map(|i| json!({"id": format!("c{i}"), "type": "function", "function": {"name": "f", "arguments": "{}"}}))
            .collect();
        for body in [
            json!([1]),
            json!({"error": {"message": "bad", "type": "invalid_request_error"}}),
            json!({"object": "chat.completion.chunk", "choices": []}),
            json!({"object": "chat.completion"}),
            json!({"choices": [1]}),
            json!({"choices": [{"index": 0}]}),
            json!({"choices": [{"index": 0, "message": {"content": ["parts"]}}]}),
            json!({"choices": [{"index": 0, "message": {"content": "x", "tool_calls": "f"}}]}),
            json!({"choices": [{"index": 0, "message": {"content": "x", "tool_calls": [1]}}]}),
            json!({"choices": [{"index": 0, "message": {"content": "x", "reasoning": 1}}]}),
        ] {
            assert!(
                matches!(chat_events(&body), Err(ConvertError::BadBody { .. })),
                "{body}"
            );
        }
        assert!(matches!(
            chat_events(&json!({"choices": too_many})),
            Err(ConvertError::TooMany { what: "choice", .. })
        ));
        assert!(matches!(
            chat_events(
                &json!({"choices": [{"message": {"content": null, "tool_calls": many_calls}}]})
            ),
            Err(ConvertError::TooMany {
                what: "tool call",
                ..
            })
        ));
    }

    // Hostile input.

    #[test]
    fn mangled_streams_never_panic() {
        let mut tools = vec![chunk(
            json!([{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":"{\"a\""}}]},"logprobs":{"content":[],"refusal":null},"finish_reason":null}]),
        )];
        tools.push(chunk(json!([{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}},{"index":1,"id":"call_2","function":{"name":"g"}}],"function_call":{"name":"h"},"audio":{"data":"x"}},"finish_reason":"tool_calls"}])));
        tools.push(done());
        let (mut runs, mut assembled) = (0, 0);
        for stream in [sse(TEXT_STREAM), sse(DEEPSEEK_STREAM), tools] {
            for events in mangled(&stream) {
                runs += 1;
                if let Ok(body) = assemble_chat(&events) {
                    assembled += 1;
                    // Whatever a stream adds up to streams and adds up again.
                    let again = assemble_chat(&chat_events(&body).unwrap()).unwrap();
                    assert_eq!(again, body);
                }
            }
        }
        assert!(
            runs > 1000 && assembled > 0 && assembled < runs,
            "{assembled} of {runs}"
        );
    }

    #[test]
    fn mangled_bodies_never_panic() {
        let mut runs = 0;
        for body in [text_body(), tool_calls_body()] {
            for mutation in mutations(&body) {
                runs += 1;
                if let Ok(events) = chat_events(&mutation) {
                    // What streams adds up, to the body or (where the body lacks a field
                    // the JSON form always has, or numbers its choices oddly) to its normal
                    // form, which round-trips.
                    let body = assemble_chat(&events).unwrap();
                    assert_eq!(assemble_chat(&chat_events(&body).unwrap()).unwrap(), body);
                }
            }
        }
        assert!(runs > 500, "{runs}");
    }
}
