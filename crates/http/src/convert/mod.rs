//! Conversions between a JSON answer and its SSE stream, for the APIs where one exists.
//!
//! The gateway records an answer in whichever shape the upstream sent it and serves it in
//! whichever shape the client asks for, so each API here has a pair of functions:
//!
//! - [`openai::assemble_chat`] and [`openai::chat_events`] for Chat Completions
//!   (`POST /v1/chat/completions`);
//! - [`anthropic::assemble_message`] and [`anthropic::message_events`] for Messages
//!   (`POST /v1/messages`).
//!
//! An `assemble_*` function adds a recorded stream up to the JSON answer the same request
//! would have got without `stream`, the way the providers' SDKs accumulate one; an `*_events`
//! function sends a JSON answer as the stream a client would have got. An answer as the API
//! sends it streams and adds up again unchanged; a stream adds up to an answer whose stream
//! adds up to the same answer.
//!
//! Both directions treat their input as untrusted: recorded events can be cut short or
//! tampered with. Anything they cannot convert faithfully (an event whose data is not JSON,
//! a missing field, a stream without its terminal event, the upstream's own error event, an
//! index past what any real answer has) is a [`ConvertError`] rather than a guess; nothing
//! here panics or allocates by an index it was given.

pub mod anthropic;
pub mod openai;

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// One server-sent event as recorded: its `event:` name (absent in OpenAI's streams) and its `data:` text
/// (several `data:` lines joined by '\n', as the SSE spec says).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SseEvent {
    /// The `event:` field; `None` for the default `message` type (all of OpenAI's events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// The `data:` field.
    pub data: String,
}

impl SseEvent {
    /// An event with data and no name, as OpenAI sends them.
    pub fn data(data: impl Into<String>) -> Self {
        SseEvent {
            event: None,
            data: data.into(),
        }
    }

    /// An event with a name and data, as Anthropic sends them.
    pub fn named(event: impl Into<String>, data: impl Into<String>) -> Self {
        SseEvent {
            event: Some(event.into()),
            data: data.into(),
        }
    }
}

/// Why a conversion failed; the gateway then answers 502 with this message or keys the shapes apart.
///
/// Events are numbered from 0 in the order given.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// An event's data is neither JSON nor a sentinel the API defines (`[DONE]`).
    #[error("event {event}: its data is not JSON: {source}")]
    NotJson {
        /// Which event.
        event: usize,
        /// What the parser said.
        #[source]
        source: serde_json::Error,
    },
    /// An event that does not fit its stream: a field missing or of the wrong type, or an
    /// event out of order (a delta for a block that never started, a second `message_start`).
    #[error("event {event}: {reason}")]
    BadEvent {
        /// Which event.
        event: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A delta type this conversion does not know how to add up; adding it up anyhow could
    /// lose or garble content, so the stream is not converted.
    #[error("event {event}: unsupported delta type {kind:?}")]
    Unsupported {
        /// Which event.
        event: usize,
        /// The delta's `type`.
        kind: String,
    },
    /// An index (of a choice, a content block, a tool call) or a count past the limit set for
    /// it, far beyond what any real answer has.
    #[error("{what} {index} is past the limit of {limit}")]
    TooMany {
        /// What is counted: "choice", "content block", "tool call".
        what: &'static str,
        /// The index given.
        index: u64,
        /// The number allowed.
        limit: usize,
    },
    /// The stream carries the upstream's own error (an `error` event, or an OpenAI chunk with
    /// an `error` object).
    #[error("event {event}: the upstream sent an error: {message}")]
    Upstream {
        /// Which event.
        event: usize,
        /// The error's type and message, as the upstream gave them.
        message: String,
    },
    /// The stream ended before its terminal event.
    #[error("the stream ended without its terminal event ({terminal})")]
    Truncated {
        /// The terminal event expected: `[DONE]` or `message_stop`.
        terminal: &'static str,
    },
    /// A tool's input, its `partial_json` pieces joined, is not JSON (a stream cut short, or
    /// fine-grained tool streaming passing on what the model wrote).
    #[error("content block {block}: its tool input is not JSON: {source}")]
    ToolInput {
        /// Which content block.
        block: usize,
        /// What the parser said.
        #[source]
        source: serde_json::Error,
    },
    /// A JSON answer that is not the object the conversion expects.
    #[error("the body is not a {expected}: {reason}")]
    BadBody {
        /// The object expected: "chat.completion" or "message".
        expected: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Parses one event's data.
fn parse_data(event: usize, data: &str) -> Result<Value, ConvertError> {
    serde_json::from_str(data).map_err(|source| ConvertError::NotJson { event, source })
}

fn bad_event(event: usize, reason: impl Into<String>) -> ConvertError {
    ConvertError::BadEvent {
        event,
        reason: reason.into(),
    }
}

/// An index as the stream gives it, checked against `limit` before anything is sized by it.
fn checked_index(
    event: usize,
    value: &Value,
    what: &'static str,
    limit: usize,
) -> Result<usize, ConvertError> {
    let index = value
        .as_u64()
        .ok_or_else(|| bad_event(event, format!("the {what} index {value} is not an index")))?;
    match usize::try_from(index) {
        Ok(i) if i < limit => Ok(i),
        _ => Err(ConvertError::TooMany { what, index, limit }),
    }
}

/// The items of an index-keyed map in order, or the first index that has none (a stream
/// that skipped one).
fn in_order<T>(items: BTreeMap<usize, T>) -> Result<Vec<T>, usize> {
    items
        .into_iter()
        .enumerate()
        .map(|(position, (index, item))| {
            if index == position {
                Ok(item)
            } else {
                Err(position)
            }
        })
        .collect()
}

/// A provider's error object as one line: its type and message where it has them.
fn error_message(error: Option<&Value>) -> String {
    let Some(error) = error else {
        return "(no details)".into();
    };
    let text = |key: &str| error.get(key).and_then(Value::as_str);
    match (text("type"), text("message")) {
        (Some(kind), Some(message)) => format!("{kind}: {message}"),
        (None, Some(message)) => message.into(),
        _ => match error {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        },
    }
}

/// Appends a string to the string at `key`, or puts it there if there is none.
fn push_str(map: &mut Map<String, Value>, key: &str, piece: &str) {
    match map.get_mut(key) {
        Some(Value::String(s)) => s.push_str(piece),
        _ => {
            map.insert(key.into(), Value::String(piece.into()));
        }
    }
}

/// Appends the items of a list to the list at `key`, or puts it there if there is none.
fn push_items(map: &mut Map<String, Value>, key: &str, items: &[Value]) {
    match map.get_mut(key) {
        Some(Value::Array(list)) => list.extend_from_slice(items),
        _ => {
            map.insert(key.into(), Value::Array(items.to_vec()));
        }
    }
}

/// What the tests of both APIs share.
#[cfg(test)]
mod test_support {
    use serde_json::{Value, json};

    use super::SseEvent;

    /// Copies of `value` with one node (any object member or list item, at any depth)
    /// replaced by a hostile value, or removed.
    pub fn mutations(value: &Value) -> Vec<Value> {
        // `None` stands for removing the node.
        let hostile = [
            Some(Value::Null),
            Some(json!(-1)),
            Some(json!(1_000_000_000u64)),
            Some(json!(u64::MAX)),
            Some(json!(0.5)),
            Some(json!("x")),
            Some(json!([])),
            Some(json!([null])),
            Some(json!({})),
            None,
        ];
        let mut out = Vec::new();
        match value {
            Value::Object(map) => {
                for key in map.keys() {
                    for with in &hostile {
                        let mut copy = map.clone();
                        match with {
                            Some(with) => copy.insert(key.clone(), with.clone()),
                            None => copy.remove(key),
                        };
                        out.push(Value::Object(copy));
                    }
                    for inner in mutations(&map[key]) {
                        let mut copy = map.clone();
                        copy.insert(key.clone(), inner);
                        out.push(Value::Object(copy));
                    }
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    for with in &hostile {
                        let mut copy = items.clone();
                        match with {
                            Some(with) => copy[i] = with.clone(),
                            None => {
                                copy.remove(i);
                            }
                        }
                        out.push(Value::Array(copy));
                    }
                    for inner in mutations(item) {
                        let mut copy = items.clone();
                        copy[i] = inner;
                        out.push(Value::Array(copy));
                    }
                }
            }
            _ => {}
        }
        out
    }

    /// Streams like `events` but mangled: each event in turn cut short at every character,
    /// dropped, or its JSON data mutated (see [`mutations`]).
    pub fn mangled(events: &[SseEvent]) -> Vec<Vec<SseEvent>> {
        let mut out = Vec::new();
        for (i, event) in events.iter().enumerate() {
            let with = |data: String| {
                let mut copy = events.to_vec();
                copy[i].data = data;
                copy
            };
            for (cut, _) in event.data.char_indices() {
                out.push(with(event.data[..cut].to_string()));
            }
            let mut dropped = events.to_vec();
            dropped.remove(i);
            out.push(dropped);
            if let Ok(value) = serde_json::from_str::<Value>(&event.data) {
                for mutation in mutations(&value) {
                    out.push(with(mutation.to_string()));
                }
            }
        }
        out
    }

    /// Events from SSE wire text, as a client's parser reads them: blank lines end events,
    /// `event:` names one, `data:` lines are joined by '\n', comments are skipped.
    pub fn sse(text: &str) -> Vec<SseEvent> {
        let mut events = Vec::new();
        let (mut name, mut data): (Option<String>, Option<String>) = (None, None);
        for line in text.lines().chain([""]) {
            let line = line.trim_start();
            if line.is_empty() {
                if let Some(data) = data.take() {
                    events.push(SseEvent {
                        event: name.take(),
                        data,
                    });
                }
                name = None;
            } else if let Some(value) = line.strip_prefix("event:") {
                name = Some(value.trim().to_string());
            } else if let Some(value) = line.strip_prefix("data:") {
                let value = value.strip_prefix(' ').unwrap_or(value);
                match &mut data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => data = Some(value.to_string()),
                }
            }
        }
        events
    }

    #[test]
    fn the_test_parser_reads_sse() {
        let events = sse("event: a\ndata: 1\ndata: 2\n\n: comment\ndata: [DONE]\n");
        assert_eq!(
            events,
            [SseEvent::named("a", "1\n2"), SseEvent::data("[DONE]")]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_stored_as_the_gateway_records_them() {
        let unnamed = serde_json::to_string(&SseEvent::data("[DONE]")).unwrap();
        assert_eq!(unnamed, r#"{"data":"[DONE]"}"#);
        let named = SseEvent::named("message_stop", r#"{"type":"message_stop"}"#);
        let text = serde_json::to_string(&named).unwrap();
        assert_eq!(serde_json::from_str::<SseEvent>(&text).unwrap(), named);
        assert_eq!(
            serde_json::from_str::<SseEvent>(r#"{"data":"x"}"#).unwrap(),
            SseEvent::data("x")
        );
    }

    #[test]
    fn errors_say_what_went_wrong() {
        let messages = [
            (
                ConvertError::TooMany {
                    what: "choice",
                    index: 1_000_000_000,
                    limit: 128,
                },
                "choice 1000000000 is past the limit of 128",
            ),
            (
                ConvertError::Truncated { terminal: "[DONE]" },
                "the stream ended without its terminal event ([DONE])",
            ),
            (
                ConvertError::Upstream {
                    event: 3,
                    message: "overloaded_error: Overloaded".into(),
                },
                "event 3: the upstream sent an error: overloaded_error: Overloaded",
            ),
        ];
        for (error, message) in messages {
            assert_eq!(error.to_string(), message);
        }
        let not_json = parse_data(2, "{").unwrap_err();
        assert!(
            not_json
                .to_string()
                .starts_with("event 2: its data is not JSON: ")
        );
        assert!(std::error::Error::source(&not_json).is_some());
    }

    #[test]
    fn indices_are_checked_before_use() {
        assert_eq!(checked_index(0, &Value::from(3), "x", 4).unwrap(), 3);
        assert!(matches!(
            checked_index(0, &Value::from(4), "x", 4),
            Err(ConvertError::TooMany { index: 4, .. })
        ));
        assert!(matches!(
            checked_index(0, &Value::from(u64::MAX), "x", 4),
            Err(ConvertError::TooMany { .. })
        ));
        for bad in [
            Value::from(-1),
            Value::from(0.0),
            Value::from("1"),
            Value::Null,
        ] {
            assert!(matches!(
                checked_index(5, &bad, "x", 4),
                Err(ConvertError::BadEvent { event: 5, .. })
            ));
        }
    }

    #[test]
    fn items_come_in_order_or_name_the_gap() {
        let items = BTreeMap::from([(0, 'a'), (1, 'b'), (2, 'c')]);
        assert_eq!(in_order(items), Ok(vec!['a', 'b', 'c']));
        assert_eq!(in_order(BTreeMap::from([(0, 'a'), (2, 'c')])), Err(1));
        assert_eq!(in_order(BTreeMap::from([(1, 'b')])), Err(0));
        assert_eq!(in_order(BTreeMap::<usize, char>::new()), Ok(vec![]));
    }

    #[test]
    fn provider_errors_read_as_one_line() {
        let openai = serde_json::json!({"message": "Rate limit reached", "type": "requests", "param": null, "code": "rate_limit_exceeded"});
        assert_eq!(error_message(Some(&openai)), "requests: Rate limit reached");
        assert_eq!(
            error_message(Some(&serde_json::json!({"message": "m"}))),
            "m"
        );
        assert_eq!(error_message(Some(&Value::from("plain"))), "plain");
        assert_eq!(
            error_message(Some(&serde_json::json!({"code": 5}))),
            r#"{"code":5}"#
        );
        assert_eq!(error_message(None), "(no details)");
    }
}
