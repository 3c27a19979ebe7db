//! What the gateway stores as an entry's response: an upstream's JSON answer as given, or a
//! stream as its sequence of events with the JSON it adds up to where a conversion exists.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use strata_core::Tokens;

use super::route::LlmRoute;
use crate::convert::{SseEvent, anthropic, openai};

/// An answer as the gateway records it (the `response` of its entries, as JSON:
/// `{"kind": "json", "status": 200, "body": …}` or
/// `{"kind": "sse", "status": 200, "events": […], "assembled": …}`).
#[derive(Debug, Clone)]
pub enum Recorded {
    /// A JSON answer, its body byte for byte.
    Json {
        /// The upstream's status (2xx).
        status: u16,
        /// The body.
        body: Box<RawValue>,
    },
    /// A stream that reached its terminal event.
    Sse {
        /// The upstream's status (2xx).
        status: u16,
        /// Every event, in order (comments and keep-alives dropped).
        events: Vec<SseEvent>,
        /// The JSON answer the events add up to, where a conversion exists.
        assembled: Option<Box<RawValue>>,
    },
}

/// The stored form, written from borrowed parts. (A `RawValue` cannot sit in an internally
/// tagged enum: serde buffers such enums, and a buffered `RawValue` fails to read.)
#[derive(Serialize)]
struct WireOut<'a> {
    kind: &'static str,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    events: Option<&'a [SseEvent]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    assembled: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireIn {
    kind: String,
    status: u16,
    #[serde(default)]
    body: Option<Box<RawValue>>,
    #[serde(default)]
    events: Option<Vec<SseEvent>>,
    #[serde(default)]
    assembled: Option<Box<RawValue>>,
}

impl Serialize for Recorded {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let wire = match self {
            Recorded::Json { status, body } => WireOut {
                kind: "json",
                status: *status,
                body: Some(body),
                events: None,
                assembled: None,
            },
            Recorded::Sse {
                status,
                events,
                assembled,
            } => WireOut {
                kind: "sse",
                status: *status,
                body: None,
                events: Some(events),
                assembled: assembled.as_deref(),
            },
        };
        wire.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Recorded {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let wire = WireIn::deserialize(d)?;
        match (wire.kind.as_str(), wire.body, wire.events) {
            ("json", Some(body), None) => Ok(Recorded::Json {
                status: wire.status,
                body,
            }),
            ("sse", None, Some(events)) => Ok(Recorded::Sse {
                status: wire.status,
                events,
                assembled: wire.assembled,
            }),
            (kind, ..) => Err(D::Error::custom(format!(
                "not a recorded answer of kind `{kind}` with its parts"
            ))),
        }
    }
}

/// A recorded answer in the shape a client asked for.
#[derive(Debug, Clone)]
pub enum Shaped {
    /// A JSON body.
    Json(Bytes),
    /// A stream's events.
    Events(Vec<SseEvent>),
}

impl Recorded {
    /// A finished stream, with the JSON it adds up to on routes that convert.
    pub fn stream(route: LlmRoute, status: u16, events: Vec<SseEvent>) -> Recorded {
        let assembled = match route {
            LlmRoute::ChatCompletions => openai::assemble_chat(&events).ok(),
            LlmRoute::Messages => anthropic::assemble_message(&events).ok(),
            _ => None,
        }
        .and_then(|value| serde_json::value::to_raw_value(&value).ok());
        Recorded::Sse {
            status,
            events,
            assembled,
        }
    }

    /// The upstream's status (2xx).
    pub fn status(&self) -> axum::http::StatusCode {
        let status = match self {
            Recorded::Json { status, .. } | Recorded::Sse { status, .. } => *status,
        };
        axum::http::StatusCode::from_u16(status)
            .ok()
            .filter(|s| s.is_success())
            .unwrap_or(axum::http::StatusCode::OK)
    }

    /// The answer as a client that does (`stream`) or does not want a stream gets it; `None`
    /// when no conversion exists on this route (or the recorded answer does not convert).
    pub fn shaped(&self, route: LlmRoute, stream: bool) -> Option<Shaped> {
        match (self, stream) {
            (Recorded::Json { body, .. }, false) => {
                Some(Shaped::Json(Bytes::copy_from_slice(body.get().as_bytes())))
            }
            (Recorded::Sse { events, .. }, true) => Some(Shaped::Events(events.clone())),
            (Recorded::Sse { assembled, .. }, false) => assembled
                .as_ref()
                .map(|body| Shaped::Json(Bytes::copy_from_slice(body.get().as_bytes()))),
            (Recorded::Json { body, .. }, true) => {
                let value: serde_json::Value = serde_json::from_str(body.get()).ok()?;
                let events = match route {
                    LlmRoute::ChatCompletions => openai::chat_events(&value).ok()?,
                    LlmRoute::Messages => anthropic::message_events(&value).ok()?,
                    _ => return None,
                };
                Some(Shaped::Events(events))
            }
        }
    }

    /// The tokens of the original call: the body's `usage`, or the stream's (OpenAI's usage
    /// chunk, Anthropic's `message_start` and `message_delta`, the Responses API's
    /// `response.completed`).
    pub fn tokens(&self) -> Tokens {
        match self {
            Recorded::Json { body, .. } => Tokens::from_response(body),
            Recorded::Sse {
                assembled: Some(body),
                ..
            } => Tokens::from_response(body),
            Recorded::Sse { events, .. } => events
                .iter()
                .rev()
                .find_map(|e| usage_in_event(&e.data))
                .unwrap_or_default(),
        }
    }
}

/// Token counts in one event's data: a top-level `usage`, or the `usage` of a `response`.
fn usage_in_event(data: &str) -> Option<Tokens> {
    if !data.contains("\"usage\"") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(data).ok()?;
    let usage = value
        .get("usage")
        .filter(|u| u.is_object())
        .or_else(|| value.get("response")?.get("usage"))?;
    let count = |names: [&str; 2]| {
        names
            .iter()
            .find_map(|n| usage.get(*n).and_then(serde_json::Value::as_u64))
            .unwrap_or(0)
    };
    Some(Tokens {
        input: count(["prompt_tokens", "input_tokens"]),
        output: count(["completion_tokens", "output_tokens"]),
    })
}

/// Writes events as the SSE wire format: `event:` when named, one `data:` line per line of the
/// data, a blank line after each.
pub fn encode_events(events: &[SseEvent]) -> Bytes {
    let mut out = BytesMut::with_capacity(events.iter().map(|e| e.data.len() + 16).sum());
    for event in events {
        if let Some(name) = &event.event {
            out.put_slice(b"event: ");
            out.put_slice(name.as_bytes());
            out.put_u8(b'\n');
        }
        for line in event.data.split('\n') {
            out.put_slice(b"data: ");
            out.put_slice(line.as_bytes());
            out.put_u8(b'\n');
        }
        out.put_u8(b'\n');
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_written_as_sse() {
        let bytes = encode_events(&[
            SseEvent::named("message_stop", "{}"),
            SseEvent::data("a\nb"),
        ]);
        assert_eq!(
            bytes,
            "event: message_stop\ndata: {}\n\ndata: a\ndata: b\n\n"
        );
    }

    #[test]
    fn a_recorded_answer_round_trips_as_json_text() {
        let recorded = Recorded::stream(
            LlmRoute::Responses,
            200,
            vec![SseEvent::named(
                "response.completed",
                r#"{"type":"response.completed","response":{"usage":{"input_tokens":3,"output_tokens":4}}}"#,
            )],
        );
        let text = serde_json::to_string(&recorded).unwrap();
        let back: Recorded = serde_json::from_str(&text).unwrap();
        assert_eq!(
            back.tokens(),
            Tokens {
                input: 3,
                output: 4
            }
        );
        assert!(back.shaped(LlmRoute::Responses, false).is_none());
        assert!(matches!(
            back.shaped(LlmRoute::Responses, true),
            Some(Shaped::Events(e)) if e.len() == 1
        ));
    }

    #[test]
    fn a_json_body_is_served_byte_for_byte() {
        let body = r#"{"b": 1,  "a": [2]}"#;
        let recorded = Recorded::Json {
            status: 200,
            body: RawValue::from_string(body.into()).unwrap(),
        };
        match recorded.shaped(LlmRoute::Embeddings, false) {
            Some(Shaped::Json(bytes)) => assert_eq!(bytes, body),
            other => panic!("{other:?}"),
        }
        assert!(recorded.shaped(LlmRoute::Embeddings, true).is_none());
    }
}
