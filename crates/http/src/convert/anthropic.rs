//! Anthropic Messages (`POST /v1/messages`): a stream of named events (`message_start`,
//! content blocks, `message_delta`, `message_stop`) and the `message` object it adds up to.
//!
//! Adding a stream up ([`assemble_message`]) keeps, as the SDKs' accumulators do:
//! - the message of `message_start`, every field as given (`id`, `model`, `role`, `usage`,
//!   `container`, …);
//! - each content block of `content_block_start` at its `index`, as given (unknown block
//!   types included), with its deltas added: `text_delta` to `text`, `thinking_delta` to
//!   `thinking`, `signature_delta` setting `signature`, `citations_delta` appending its
//!   citation to `citations`, and the `input_json_delta` pieces joined and parsed into
//!   `input` (an empty string meaning `{}`);
//! - `message_delta`: each field of its `delta` (`stop_reason`, `stop_sequence`, …) set on
//!   the message, each non-null field of its `usage` set in the message's usage (the counts
//!   there are totals, not increments), and any other non-null field (the beta
//!   `context_management`) set on the message.
//!
//! It drops `ping` events, `content_block_stop` (it only checks the block exists), and event
//! types it does not know, which Anthropic's versioning policy says may be added and should
//! be skipped. A delta type it does not know is an error instead: skipping it could lose
//! content. So is a tool input whose pieces do not parse as JSON.
//!
//! Sending a message as a stream ([`message_events`]) gives `message_start` with the message
//! but its content empty, `stop_reason` and `stop_sequence` (and `stop_details`, where the
//! message has it) `null`, and its usage with `output_tokens` 0 (nothing is written yet);
//! then, for each block, `content_block_start` with the block emptied (`text: ""` and
//! `citations: []`, `thinking: ""` and `signature: ""`, `input: {}`), its deltas (the whole
//! text as one `text_delta` then a `citations_delta` per citation; `thinking_delta` then
//! `signature_delta`; the whole input as one `input_json_delta`), and `content_block_stop`;
//! `redacted_thinking` and the block types without deltas (`web_search_tool_result`, …) go
//! whole in their `content_block_start`. Then `message_delta` with `stop_reason`,
//! `stop_sequence` (and `stop_details`) and the whole usage (as the API's final
//! `message_delta` now carries input and cache counts too), and `message_stop`.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use serde_json::{Map, Value, json};

use super::{
    ConvertError, SseEvent, bad_event, checked_index, error_message, in_order, parse_data, push_str,
};

/// Content blocks in one message.
const MAX_BLOCKS: usize = 1024;

/// Block types whose `input` streams as `input_json_delta` pieces.
const TOOL_BLOCKS: [&str; 3] = ["tool_use", "server_tool_use", "mcp_tool_use"];

/// The `message` JSON object a Messages stream adds up to.
///
/// The stream must start with `message_start` (`ping`s aside) and reach `message_stop`; what
/// follows it is ignored. An `error` event is [`ConvertError::Upstream`]. An event's kind is
/// its data's `type`, or its event name where the data has none.
pub fn assemble_message(events: &[SseEvent]) -> Result<Value, ConvertError> {
    let mut message: Option<Map<String, Value>> = None;
    let mut blocks: BTreeMap<usize, Block> = BTreeMap::new();
    for (n, event) in events.iter().enumerate() {
        let name = event.event.as_deref().unwrap_or("");
        let data = event.data.trim();
        if name == "error" {
            let error = serde_json::from_str::<Value>(data).ok();
            let details = error.as_ref().map(|e| e.get("error").unwrap_or(e));
            return Err(ConvertError::Upstream {
                event: n,
                message: error_message(details),
            });
        }
        let value = if data.is_empty() {
            Value::Null
        } else {
            parse_data(n, data)?
        };
        let kind = value.get("type").and_then(Value::as_str).unwrap_or(name);
        match kind {
            "error" => {
                return Err(ConvertError::Upstream {
                    event: n,
                    message: error_message(value.get("error")),
                });
            }
            "message_start" => {
                if message.is_some() {
                    return Err(bad_event(n, "a second message_start"));
                }
                message = Some(start_message(n, &value, &mut blocks)?);
            }
            "content_block_start" => {
                started(&mut message, n, kind)?;
                start_block(n, &value, &mut blocks)?;
            }
            "content_block_delta" => {
                started(&mut message, n, kind)?;
                let index = block_index(n, &value)?;
                let Some(block) = blocks.get_mut(&index) else {
                    return Err(bad_event(
                        n,
                        format!("a delta for content block {index}, which never started"),
                    ));
                };
                block.add(n, value.get("delta"))?;
            }
            "content_block_stop" => {
                started(&mut message, n, kind)?;
                let index = block_index(n, &value)?;
                if !blocks.contains_key(&index) {
                    return Err(bad_event(
                        n,
                        format!("content block {index} stops but never started"),
                    ));
                }
            }
            "message_delta" => add_message_delta(n, &value, started(&mut message, n, kind)?)?,
            "message_stop" => {
                let message = std::mem::take(started(&mut message, n, kind)?);
                return finish(n, message, blocks);
            }
            // `ping`, and event types added after this was written.
            _ => {}
        }
    }
    Err(ConvertError::Truncated {
        terminal: "message_stop",
    })
}

/// The message a `kind` event adds to, once `message_start` came.
fn started<'a>(
    message: &'a mut Option<Map<String, Value>>,
    event: usize,
    kind: &str,
) -> Result<&'a mut Map<String, Value>, ConvertError> {
    message
        .as_mut()
        .ok_or_else(|| bad_event(event, format!("{kind} before message_start")))
}

/// The Messages stream (message_start … message_stop, each event named) that a `message` JSON object is sent as.
///
/// The body must be an object with a list of `content` blocks, each an object with a `type`;
/// its `type`, where it has one, must be `message`.
pub fn message_events(body: &Value) -> Result<Vec<SseEvent>, ConvertError> {
    let Value::Object(body) = body else {
        return Err(bad_body("it is not a JSON object"));
    };
    match body.get("type") {
        None | Some(Value::Null) => {}
        Some(Value::String(kind)) if kind == "message" => {}
        Some(other) => return Err(bad_body(format!("its type is {other}"))),
    }
    let Some(Value::Array(content)) = body.get("content") else {
        return Err(bad_body("it has no list of content blocks"));
    };
    if content.len() > MAX_BLOCKS {
        return Err(ConvertError::TooMany {
            what: "content block",
            index: MAX_BLOCKS as u64,
            limit: MAX_BLOCKS,
        });
    }
    let usage = body.get("usage").filter(|u| !u.is_null());
    if usage.is_some_and(|u| !u.is_object()) {
        return Err(bad_body("its usage is not an object"));
    }

    let mut start = body.clone();
    start.insert("content".into(), json!([]));
    let mut end = Map::new();
    for key in ["stop_reason", "stop_sequence", "stop_details"] {
        let value = body.get(key);
        // `stop_reason` and `stop_sequence` are always there; `stop_details` where it is.
        if value.is_some() || key != "stop_details" {
            start.insert(key.into(), Value::Null);
            end.insert(key.into(), value.cloned().unwrap_or(Value::Null));
        }
    }
    if let Some(Value::Object(usage)) = usage {
        let mut so_far = usage.clone();
        if so_far.get("output_tokens").is_some_and(Value::is_number) {
            so_far.insert("output_tokens".into(), 0.into());
        }
        start.insert("usage".into(), Value::Object(so_far));
    }

    let mut events = vec![event(
        "message_start",
        json!({"type": "message_start", "message": start}),
    )];
    for (index, block) in content.iter().enumerate() {
        block_events(index, block, &mut events)?;
    }
    let mut delta = json!({"type": "message_delta", "delta": end});
    if let (Some(usage), Value::Object(delta)) = (usage, &mut delta) {
        delta.insert("usage".into(), usage.clone());
    }
    events.push(event("message_delta", delta));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    Ok(events)
}

fn bad_body(reason: impl Into<String>) -> ConvertError {
    ConvertError::BadBody {
        expected: "message",
        reason: reason.into(),
    }
}

/// A named event whose data is `data`.
fn event(name: &str, data: Value) -> SseEvent {
    SseEvent::named(name, data.to_string())
}

/// The events of one content block, from `content_block_start` to `content_block_stop`.
fn block_events(
    index: usize,
    block: &Value,
    events: &mut Vec<SseEvent>,
) -> Result<(), ConvertError> {
    let Value::Object(block) = block else {
        return Err(bad_body(format!("content block {index} is not an object")));
    };
    let Some(kind) = block.get("type").and_then(Value::as_str) else {
        return Err(bad_body(format!("content block {index} has no type")));
    };
    let text = |key: &str| match block.get(key) {
        Some(Value::String(text)) => Ok(text.as_str()),
        _ => Err(bad_body(format!(
            "content block {index} ({kind}) has no {key}"
        ))),
    };

    let mut start = block.clone();
    let mut deltas = Vec::new();
    match kind {
        "text" => {
            let text = text("text")?;
            start.insert("text".into(), "".into());
            if !text.is_empty() {
                deltas.push(json!({"type": "text_delta", "text": text}));
            }
            if let Some(Value::Array(citations)) = block.get("citations") {
                start.insert("citations".into(), json!([]));
                for citation in citations {
                    if citation.is_null() {
                        return Err(bad_body(format!(
                            "content block {index} has a null citation"
                        )));
                    }
                    deltas.push(json!({"type": "citations_delta", "citation": citation}));
                }
            }
        }
        "thinking" => {
            let thinking = text("thinking")?;
            start.insert("thinking".into(), "".into());
            if !thinking.is_empty() {
                deltas.push(json!({"type": "thinking_delta", "thinking": thinking}));
            }
            if let Some(Value::String(signature)) = block.get("signature") {
                start.insert("signature".into(), "".into());
                if !signature.is_empty() {
                    deltas.push(json!({"type": "signature_delta", "signature": signature}));
                }
            }
        }
        _ if TOOL_BLOCKS.contains(&kind) => {
            if let Some(input) = block.get("input") {
                start.insert("input".into(), json!({}));
                if *input != json!({}) {
                    let partial_json = input.to_string();
                    deltas.push(json!({"type": "input_json_delta", "partial_json": partial_json}));
                }
            }
        }
        // `redacted_thinking`, tool results and block types without deltas go whole.
        _ => {}
    }

    events.push(event(
        "content_block_start",
        json!({"type": "content_block_start", "index": index, "content_block": start}),
    ));
    for delta in deltas {
        events.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": delta}),
        ));
    }
    events.push(event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": index}),
    ));
    Ok(())
}

/// A content block as it adds up.
#[derive(Debug)]
struct Block {
    fields: Map<String, Value>,
    /// The `input_json_delta` pieces so far, once one came.
    json: Option<String>,
}

impl Block {
    fn new(fields: Map<String, Value>) -> Block {
        Block { fields, json: None }
    }

    fn add(&mut self, event: usize, delta: Option<&Value>) -> Result<(), ConvertError> {
        let Some(Value::Object(delta)) = delta else {
            return Err(bad_event(event, "content_block_delta has no delta"));
        };
        let kind = delta.get("type").and_then(Value::as_str).unwrap_or("");
        let text = |key: &str| {
            delta
                .get(key)
                .and_then(Value::as_str)
                .ok_or_else(|| bad_event(event, format!("{kind} has no {key}")))
        };
        match kind {
            "text_delta" => push_str(&mut self.fields, "text", text("text")?),
            "thinking_delta" => push_str(&mut self.fields, "thinking", text("thinking")?),
            // The signature comes whole, in one delta at the end of the block.
            "signature_delta" => {
                let signature = text("signature")?;
                self.fields.insert("signature".into(), signature.into());
            }
            "input_json_delta" => {
                let piece = text("partial_json")?;
                self.json.get_or_insert_with(String::new).push_str(piece);
            }
            "citations_delta" => {
                let Some(citation) = delta.get("citation").filter(|c| !c.is_null()) else {
                    return Err(bad_event(event, "citations_delta has no citation"));
                };
                match self.fields.get_mut("citations") {
                    Some(Value::Array(citations)) => citations.push(citation.clone()),
                    None | Some(Value::Null) => {
                        self.fields
                            .insert("citations".into(), json!([citation.clone()]));
                    }
                    Some(_) => {
                        return Err(bad_event(event, "the block's citations are not a list"));
                    }
                }
            }
            _ => {
                return Err(ConvertError::Unsupported {
                    event,
                    kind: kind.into(),
                });
            }
        }
        Ok(())
    }

    /// The block, its input parsed from its pieces where it had some.
    fn finish(mut self, index: usize) -> Result<Value, ConvertError> {
        if let Some(json) = self.json {
            let input = if json.trim().is_empty() {
                json!({})
            } else {
                serde_json::from_str(&json).map_err(|source| ConvertError::ToolInput {
                    block: index,
                    source,
                })?
            };
            self.fields.insert("input".into(), input);
        }
        Ok(Value::Object(self.fields))
    }
}

/// The message of a `message_start`; blocks already in its content (the API sends none)
/// come before the streamed ones.
fn start_message(
    event: usize,
    value: &Value,
    blocks: &mut BTreeMap<usize, Block>,
) -> Result<Map<String, Value>, ConvertError> {
    let Some(Value::Object(message)) = value.get("message") else {
        return Err(bad_event(event, "message_start has no message"));
    };
    let mut message = message.clone();
    match message.remove("content") {
        None | Some(Value::Null) => {}
        Some(Value::Array(content)) => {
            if content.len() > MAX_BLOCKS {
                return Err(ConvertError::TooMany {
                    what: "content block",
                    index: MAX_BLOCKS as u64,
                    limit: MAX_BLOCKS,
                });
            }
            for (index, block) in content.into_iter().enumerate() {
                let Value::Object(block) = block else {
                    return Err(bad_event(event, "a content block is not an object"));
                };
                blocks.insert(index, Block::new(block));
            }
        }
        Some(_) => return Err(bad_event(event, "the message's content is not a list")),
    }
    Ok(message)
}

fn block_index(event: usize, value: &Value) -> Result<usize, ConvertError> {
    let Some(index) = value.get("index") else {
        return Err(bad_event(event, "the event has no block index"));
    };
    checked_index(event, index, "content block", MAX_BLOCKS)
}

fn start_block(
    event: usize,
    value: &Value,
    blocks: &mut BTreeMap<usize, Block>,
) -> Result<(), ConvertError> {
    let index = block_index(event, value)?;
    let Some(Value::Object(block)) = value.get("content_block") else {
        return Err(bad_event(event, "content_block_start has no content_block"));
    };
    match blocks.entry(index) {
        Entry::Occupied(_) => Err(bad_event(
            event,
            format!("content block {index} starts twice"),
        )),
        Entry::Vacant(slot) => {
            slot.insert(Block::new(block.clone()));
            Ok(())
        }
    }
}

fn add_message_delta(
    event: usize,
    value: &Value,
    message: &mut Map<String, Value>,
) -> Result<(), ConvertError> {
    let Value::Object(fields) = value else {
        return Err(bad_event(event, "message_delta is not a JSON object"));
    };
    for (key, value) in fields {
        match (key.as_str(), value) {
            ("type", _) | (_, Value::Null) => {}
            ("delta", Value::Object(delta)) => {
                for (key, value) in delta {
                    message.insert(key.clone(), value.clone());
                }
            }
            // Totals so far: each replaces the message's count; a `null` one says nothing.
            ("usage", Value::Object(usage)) => {
                let counts = usage.iter().filter(|(_, count)| !count.is_null());
                if let Some(Value::Object(into)) = message.get_mut("usage") {
                    into.extend(counts.map(|(key, count)| (key.clone(), count.clone())));
                } else {
                    let counts = counts.map(|(key, count)| (key.clone(), count.clone()));
                    message.insert("usage".into(), Value::Object(counts.collect()));
                }
            }
            ("delta" | "usage", _) => {
                return Err(bad_event(
                    event,
                    format!("message_delta's {key} is not an object"),
                ));
            }
            _ => {
                message.insert(key.clone(), value.clone());
            }
        }
    }
    Ok(())
}

/// The message, once `message_stop` (event `event`) came.
fn finish(
    event: usize,
    mut message: Map<String, Value>,
    blocks: BTreeMap<usize, Block>,
) -> Result<Value, ConvertError> {
    let blocks = in_order(blocks).map_err(|missing| {
        bad_event(
            event,
            format!("content block {missing} never started, though a later one did"),
        )
    })?;
    let content = blocks
        .into_iter()
        .enumerate()
        .map(|(index, block)| block.finish(index))
        .collect::<Result<Vec<_>, _>>()?;
    message.insert("content".into(), Value::Array(content));
    Ok(Value::Object(message))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{mangled, mutations, sse};
    use super::*;

    /// Both ways: the stream of a body adds up to the body, and the stream of what a stream
    /// adds up to adds up to the same again.
    fn assert_round_trip(body: &Value) {
        let events = message_events(body).unwrap();
        assert_eq!(
            &assemble_message(&events).unwrap(),
            body,
            "events: {events:#?}"
        );
    }

    fn assert_stream_round_trip(events: &[SseEvent]) -> Value {
        let body = assemble_message(events).unwrap();
        let again = assemble_message(&message_events(&body).unwrap()).unwrap();
        assert_eq!(again, body);
        body
    }

    fn named(name: &str, data: Value) -> SseEvent {
        SseEvent::named(name, data.to_string())
    }

    fn start() -> SseEvent {
        named(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-5", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        )
    }

    fn stop() -> SseEvent {
        named("message_stop", json!({"type": "message_stop"}))
    }

    // The basic streaming request of Anthropic's streaming guide.
    const TEXT_STREAM: &str = r#"
event: message_start
data: {"type": "message_start", "message": {"id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant", "content": [], "model": "claude-opus-4-6", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 25, "output_tokens": 1}}}

event: content_block_start
data: {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}}

event: content_block_stop
data: {"type": "content_block_stop", "index": 0}

event: message_delta
data: {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence":null}, "usage": {"output_tokens": 15}}

event: message_stop
data: {"type": "message_stop"}
"#;

    // The streaming guide's tool use: text, then a tool_use whose input comes in pieces.
    const TOOL_STREAM: &str = r#"
event: message_start
data: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-opus-4-6","stop_sequence":null,"usage":{"input_tokens":472,"output_tokens":2},"content":[],"stop_reason":null}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Okay"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":", let's check the weather for San Francisco, CA:"}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"location\":"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":" \"San"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":" Francisc"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"o,"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":" CA\""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":", "}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"\"unit\": \"fah"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"renheit\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}
"#;

    // The extended thinking guide's stream: a thinking block with its signature, then text.
    const THINKING_STREAM: &str = r#"
event: message_start
data: {"type": "message_start", "message": {"id": "msg_01...", "type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-5", "stop_reason": null, "stop_sequence": null}}

event: content_block_start
data: {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "I need to find the GCD of 1071 and 462 using the Euclidean algorithm.\n\n1071 = 2 × 462 + 147"}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "\n462 = 3 × 147 + 21\n147 = 7 × 21 + 0\n\nSo GCD(1071, 462) = 21"}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds..."}}

event: content_block_stop
data: {"type": "content_block_stop", "index": 0}

event: content_block_start
data: {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "The greatest common divisor of 1071 and 462 is **21**."}}

event: content_block_stop
data: {"type": "content_block_stop", "index": 1}

event: message_delta
data: {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}}

event: message_stop
data: {"type": "message_stop"}
"#;

    #[test]
    fn a_text_stream_adds_up() {
        let body = assert_stream_round_trip(&sse(TEXT_STREAM));
        assert_eq!(
            body,
            json!({
                "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
                "type": "message",
                "role": "assistant",
                "content": [{"type": "text", "text": "Hello!"}],
                "model": "claude-opus-4-6",
                "stop_reason": "end_turn",
                "stop_sequence": null,
                "usage": {"input_tokens": 25, "output_tokens": 15}
            })
        );
    }

    #[test]
    fn a_tool_use_with_split_input_adds_up() {
        let body = assert_stream_round_trip(&sse(TOOL_STREAM));
        assert_eq!(
            body["content"],
            json!([
                {"type": "text", "text": "Okay, let's check the weather for San Francisco, CA:"},
                {"type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather", "input": {"location": "San Francisco, CA", "unit": "fahrenheit"}}
            ])
        );
        assert_eq!(body["stop_reason"], "tool_use");
        assert_eq!(
            body["usage"],
            json!({"input_tokens": 472, "output_tokens": 89})
        );
    }

    #[test]
    fn thinking_with_its_signature_adds_up() {
        let body = assert_stream_round_trip(&sse(THINKING_STREAM));
        assert_eq!(
            body["content"],
            json!([
                {"type": "thinking", "thinking": "I need to find the GCD of 1071 and 462 using the Euclidean algorithm.\n\n1071 = 2 × 462 + 147\n462 = 3 × 147 + 21\n147 = 7 × 21 + 0\n\nSo GCD(1071, 462) = 21", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds..."},
                {"type": "text", "text": "The greatest common divisor of 1071 and 462 is **21**."}
            ])
        );
        // No usage in this example's events: none is made up.
        assert!(body.get("usage").is_none());
    }

    #[test]
    fn an_empty_tool_input_is_an_empty_object() {
        let events = [
            start(),
            named(
                "content_block_start",
                json!({"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"toolu_1","name":"get_time","input":{}}}),
            ),
            named(
                "content_block_delta",
                json!({"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":""}}),
            ),
            named(
                "content_block_stop",
                json!({"type":"content_block_stop","index":0}),
            ),
            named(
                "message_delta",
                json!({"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":12}}),
            ),
            stop(),
        ];
        let body = assert_stream_round_trip(&events);
        assert_eq!(body.pointer("/content/0/input"), Some(&json!({})));
    }

    #[test]
    fn server_tools_results_and_citations_add_up() {
        let citation = json!({"type": "web_search_result_location", "cited_text": "Claude Shannon was born on April 30, 1916, in Petoskey, Michigan", "url": "https://en.wikipedia.org/wiki/Claude_Shannon", "title": "Claude Shannon - Wikipedia", "encrypted_index": "Eo8BCioIAhgBIiQyYjQ0OWJmZi1lNm.."});
        let results = json!({"type": "web_search_tool_result", "tool_use_id": "srvtoolu_014hJH82Qum7Td6UV8gDXThB", "content": [{"type": "web_search_result", "title": "Claude Shannon - Wikipedia", "url": "https://en.wikipedia.org/wiki/Claude_Shannon", "encrypted_content": "EqgfCioIARgBIiQ3YTAwMjY1Mi1mZjM5LTQ1NGUtODgxNC1kNjNjNTk1ZWI3Y...", "page_age": "April 30, 2025"}]});
        let events = [
            start(),
            named(
                "content_block_start",
                json!({"type":"content_block_start","index":0,"content_block":{"type":"server_tool_use","id":"srvtoolu_014hJH82Qum7Td6UV8gDXThB","name":"web_search","input":{}}}),
            ),
            named(
                "content_block_delta",
                json!({"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"query\": \"claude"}}),
            ),
            named(
                "content_block_delta",
                json!({"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":" shannon birth date\"}"}}),
            ),
            named(
                "content_block_stop",
                json!({"type":"content_block_stop","index":0}),
            ),
            named(
                "content_block_start",
                json!({"type":"content_block_start","index":1,"content_block":results}),
            ),
            named(
                "content_block_stop",
                json!({"type":"content_block_stop","index":1}),
            ),
            named(
                "content_block_start",
                json!({"type":"content_block_start","index":2,"content_block":{"type":"text","text":"","citations":[]}}),
            ),
            named(
                "content_block_delta",
                json!({"type":"content_block_delta","index":2,"delta":{"type":"citations_delta","citation":citation}}),
            ),
            named(
                "content_block_delta",
                json!({"type":"content_block_delta","index":2,"delta":{"type":"text_delta","text":"Claude Shannon was born on April 30, 1916"}}),
            ),
            named(
                "content_block_stop",
                json!({"type":"content_block_stop","index":2}),
            ),
            named(
                "message_delta",
                json!({"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":10,"cache_creation_input_tokens":null,"cache_read_input_tokens":0,"output_tokens":510,"server_tool_use":{"web_search_requests":1}}}),
            ),
            stop(),
        ];
        let body = assert_stream_round_trip(&events);
        assert_eq!(
            body["content"],
            json!([
                {"type": "server_tool_use", "id": "srvtoolu_014hJH82Qum7Td6UV8gDXThB", "name": "web_search", "input": {"query": "claude shannon birth date"}},
                results,
                {"type": "text", "text": "Claude Shannon was born on April 30, 1916", "citations": [citation]}
            ])
        );
        // The final counts replace the first ones; a null count leaves what was there.
        assert_eq!(
            body["usage"],
            json!({"input_tokens": 10, "cache_read_input_tokens": 0, "output_tokens": 510, "server_tool_use": {"web_search_requests": 1}})
        );
    }

    #[test]
    fn a_citation_creates_the_list_when_the_block_has_none() {
        let events = [
            start(),
            named(
                "content_block_start",
                json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
            ),
            named(
                "content_block_delta",
                json!({"type":"content_block_delta","index":0,"delta":{"type":"citations_delta","citation":{"type":"char_location","cited_text":"x","document_index":0,"start_char_index":0,"end_char_index":1}}}),
            ),
            named(
                "message_delta",
                json!({"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":3}}),
            ),
            stop(),
        ];
        let body = assemble_message(&events).unwrap();
        assert_eq!(
            body.pointer("/content/0/citations/0/cited_text"),
            Some(&json!("x"))
        );
    }

    #[test]
    fn redacted_thinking_and_unknown_blocks_are_kept_as_given() {
        let redacted = json!({"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpPkNRj2YfWXGmKDxH4mPnZ5sQ7vB9URj2pLmN3kF8/dW5hR7xJ0aP1oLs9yTcMnKVf2wRpEGjH9XZaBt4UvDcPrQ..."});
        let future = json!({"type": "some_future_block", "payload": {"a": [1, 2]}});
        let events = [
            start(),
            named(
                "content_block_start",
                json!({"type":"content_block_start","index":0,"content_block":redacted}),
            ),
            named(
                "content_block_stop",
                json!({"type":"content_block_stop","index":0}),
            ),
            named(
                "content_block_start",
                json!({"type":"content_block_start","index":1,"content_block":future}),
            ),
            named(
                "content_block_stop",
                json!({"type":"content_block_stop","index":1}),
            ),
            named(
                "some_future_event",
                json!({"type":"some_future_event","x":1}),
            ),
            named(
                "message_delta",
                json!({"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":7}}),
            ),
            stop(),
        ];
        let body = assert_stream_round_trip(&events);
        assert_eq!(body["content"], json!([redacted, future]));
        // Sent as a stream, both go whole in their content_block_start, with no delta.
        let names: Vec<_> = message_events(&body)
            .unwrap()
            .into_iter()
            .filter_map(|e| e.event)
            .collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_stop",
                "content_block_start",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
    }

    #[test]
    fn events_without_names_or_types_are_read_either_way() {
        // A relay that drops the event names: the data's type says what each is.
        let unnamed: Vec<SseEvent> = sse(TEXT_STREAM)
            .into_iter()
            .map(|e| SseEvent::data(e.data))
            .collect();
        assert_eq!(
            assemble_message(&unnamed).unwrap(),
            assemble_message(&sse(TEXT_STREAM)).unwrap()
        );
        // And a message_stop with empty data is still the end.
        let mut bare = sse(TEXT_STREAM);
        bare.pop();
        bare.push(SseEvent::named("message_stop", ""));
        assert!(assemble_message(&bare).is_ok());
    }

    #[test]
    fn message_delta_sets_its_fields_and_merges_usage() {
        let events = [
            named(
                "message_start",
                json!({"type":"message_start","message":{"id":"msg_2","type":"message","role":"assistant","content":[],"model":"claude-haiku-4-5","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":849,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":10,"service_tier":"standard"}}}),
            ),
            named(
                "content_block_start",
                json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
            ),
            named(
                "content_block_delta",
                json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"1, 2"}}),
            ),
            named(
                "content_block_stop",
                json!({"type":"content_block_stop","index":0}),
            ),
            named(
                "message_delta",
                json!({"type":"message_delta","delta":{"stop_reason":"stop_sequence","stop_sequence":"3","stop_details":null},"usage":{"input_tokens":849,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":47},"context_management":{"applied_edits":[]}}),
            ),
            stop(),
        ];
        let body = assert_stream_round_trip(&events);
        assert_eq!(body["stop_reason"], "stop_sequence");
        assert_eq!(body["stop_sequence"], "3");
        assert_eq!(body["stop_details"], Value::Null);
        assert_eq!(body["context_management"], json!({"applied_edits": []}));
        assert_eq!(
            body["usage"],
            json!({"input_tokens": 849, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}, "output_tokens": 47, "service_tier": "standard"})
        );
    }

    // Errors.

    #[test]
    fn a_stream_without_message_stop_is_truncated() {
        for cut in [0, 1, 5, 7] {
            let events = &sse(TEXT_STREAM)[..cut];
            assert!(
                matches!(
                    assemble_message(events),
                    Err(ConvertError::Truncated {
                        terminal: "message_stop"
                    })
                ),
                "{cut}"
            );
        }
    }

    #[test]
    fn an_error_event_is_an_upstream_error() {
        let mut events = sse(TEXT_STREAM);
        events.insert(
            4,
            SseEvent::named("error", r#"{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}"#),
        );
        let error = assemble_message(&events).unwrap_err();
        assert!(
            matches!(&error, ConvertError::Upstream { event: 4, message } if message == "overloaded_error: Overloaded"),
            "{error}"
        );
        // Unnamed, its type says so.
        let unnamed = [
            start(),
            SseEvent::data(
                r#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#,
            ),
        ];
        assert!(matches!(
            assemble_message(&unnamed),
            Err(ConvertError::Upstream { event: 1, .. })
        ));
        // Named, whatever its data.
        let garbled = [start(), SseEvent::named("error", "<html>")];
        assert!(matches!(
            assemble_message(&garbled),
            Err(ConvertError::Upstream { event: 1, .. })
        ));
    }

    #[test]
    fn data_that_is_not_json_is_an_error() {
        let mut events = sse(TEXT_STREAM);
        events[3].data.truncate(30);
        assert!(matches!(
            assemble_message(&events),
            Err(ConvertError::NotJson { event: 3, .. })
        ));
    }

    #[test]
    fn huge_or_bad_block_indices_are_errors() {
        let huge = [
            start(),
            named(
                "content_block_start",
                json!({"type":"content_block_start","index":1_000_000_000u64,"content_block":{"type":"text","text":""}}),
            ),
            stop(),
        ];
        assert!(matches!(
            assemble_message(&huge),
            Err(ConvertError::TooMany {
                what: "content block",
                index: 1_000_000_000,
                limit: 1024
            })
        ));
        for index in [json!(-1), json!("0"), json!(null), json!(0.5)] {
            let bad = [
                start(),
                named(
                    "content_block_start",
                    json!({"type":"content_block_start","index":index,"content_block":{"type":"text","text":""}}),
                ),
                stop(),
            ];
            assert!(
                matches!(
                    assemble_message(&bad),
                    Err(ConvertError::BadEvent { event: 1, .. })
                ),
                "{index}"
            );
        }
        let many: Vec<Value> = (0..1025)
            .map(|_| json!({"type": "text", "text": ""}))
            .collect();
        let crowded = [
            named(
                "message_start",
                json!({"type":"message_start","message":{"content":many}}),
            ),
            stop(),
        ];
        assert!(matches!(
            assemble_message(&crowded),
            Err(ConvertError::TooMany { .. })
        ));
    }

    #[test]
    fn events_out_of_order_are_errors() {
        let text_start = named(
            "content_block_start",
            json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
        );
        let text_delta = named(
            "content_block_delta",
            json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"}}),
        );
        let gap_start = named(
            "content_block_start",
            json!({"type":"content_block_start","index":2,"content_block":{"type":"text","text":""}}),
        );
        let cases: [(&str, Vec<SseEvent>, usize); 6] = [
            (
                "a delta before message_start",
                vec![text_delta.clone(), stop()],
                0,
            ),
            ("message_stop before message_start", vec![stop()], 0),
            ("a second message_start", vec![start(), start(), stop()], 1),
            (
                "a delta for a block never started",
                vec![start(), text_delta.clone(), stop()],
                1,
            ),
            (
                "a block started twice",
                vec![start(), text_start.clone(), text_start.clone(), stop()],
                2,
            ),
            (
                "a skipped block",
                vec![start(), text_start.clone(), gap_start, stop()],
                3,
            ),
        ];
        for (what, events, at) in cases {
            let error = assemble_message(&events).unwrap_err();
            assert!(
                matches!(error, ConvertError::BadEvent { event, .. } if event == at),
                "{what}: {error}"
            );
        }
        let stop_unknown = [
            start(),
            named(
                "content_block_stop",
                json!({"type":"content_block_stop","index":0}),
            ),
            stop(),
        ];
        assert!(matches!(
            assemble_message(&stop_unknown),
            Err(ConvertError::BadEvent { event: 1, .. })
        ));
    }

    #[test]
    fn malformed_events_are_errors() {
        let no_message = [
            named("message_start", json!({"type":"message_start"})),
            stop(),
        ];
        assert!(matches!(
            assemble_message(&no_message),
            Err(ConvertError::BadEvent { event: 0, .. })
        ));
        let block = named(
            "content_block_start",
            json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
        );
        for (what, event) in [
            (
                "no content block",
                named(
                    "content_block_start",
                    json!({"type":"content_block_start","index":1}),
                ),
            ),
            (
                "no index",
                named(
                    "content_block_delta",
                    json!({"type":"content_block_delta","delta":{"type":"text_delta","text":"x"}}),
                ),
            ),
            (
                "no delta",
                named(
                    "content_block_delta",
                    json!({"type":"content_block_delta","index":0}),
                ),
            ),
            (
                "a text_delta without text",
                named(
                    "content_block_delta",
                    json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":5}}),
                ),
            ),
            (
                "an input_json_delta without partial_json",
                named(
                    "content_block_delta",
                    json!({"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta"}}),
                ),
            ),
            (
                "a citations_delta without a citation",
                named(
                    "content_block_delta",
                    json!({"type":"content_block_delta","index":0,"delta":{"type":"citations_delta"}}),
                ),
            ),
            (
                "a message_delta whose usage is a number",
                named(
                    "message_delta",
                    json!({"type":"message_delta","delta":{},"usage":5}),
                ),
            ),
            (
                "a message_delta that is a list",
                SseEvent::named("message_delta", "[1]"),
            ),
        ] {
            let events = [start(), block.clone(), event, stop()];
            assert!(
                matches!(
                    assemble_message(&events),
                    Err(ConvertError::BadEvent { event: 2, .. })
                ),
                "{what}"
            );
        }
    }

    #[test]
    fn an_unknown_delta_type_is_unsupported() {
        let events = [
            start(),
            named(
                "content_block_start",
                json!({"type":"content_block_start","index":0,"content_block":{"type":"compaction","content":""}}),
            ),
            named(
                "content_block_delta",
                json!({"type":"content_block_delta","index":0,"delta":{"type":"compaction_delta","content":"summary"}}),
            ),
            stop(),
        ];
        assert!(matches!(
            assemble_message(&events),
            Err(ConvertError::Unsupported { event: 2, kind }) if kind == "compaction_delta"
        ));
    }

    #[test]
    fn a_tool_input_that_is_not_json_is_an_error() {
        let mut events = sse(TOOL_STREAM);
        // Cut the input short: `{"location": "San Francisco, CA", "unit": "fah` and no more.
        events.remove(15);
        assert!(matches!(
            assemble_message(&events),
            Err(ConvertError::ToolInput { block: 1, .. })
        ));
    }

    // JSON answers sent as streams.

    fn tool_body() -> Value {
        json!({
            "id": "msg_01Aq9w938a90dw8q",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [
                {"type": "thinking", "thinking": "The user wants the weather; I'll call the tool.", "signature": "WaUjzkypQ2mUEVM36O2TxuC06KN8xyfbJwyem2dw3URve/op91XWHOEBLLqIOMfFG/UvLEczmEsUjavL...."},
                {"type": "text", "text": "I'll check the current weather in Paris for you."},
                {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather", "input": {"location": "Paris, France", "unit": "celsius", "days": [1, 2]}}
            ],
            "stop_reason": "tool_use",
            "stop_sequence": null,
            "usage": {"input_tokens": 2095, "output_tokens": 503, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1024, "service_tier": "standard"}
        })
    }

    #[test]
    fn a_message_streams_as_anthropic_does() {
        let events = message_events(&tool_body()).unwrap();
        let names: Vec<&str> = events.iter().filter_map(|e| e.event.as_deref()).collect();
        assert_eq!(names.len(), events.len(), "every event is named");
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        let data: Vec<Value> = events
            .iter()
            .map(|e| serde_json::from_str(&e.data).unwrap())
            .collect();
        for (name, data) in names.iter().zip(&data) {
            assert_eq!(data["type"], *name);
        }
        assert_eq!(
            data[0]["message"],
            json!({
                "id": "msg_01Aq9w938a90dw8q", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 2095, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1024, "service_tier": "standard"}
            })
        );
        assert_eq!(
            data[1]["content_block"],
            json!({"type": "thinking", "thinking": "", "signature": ""})
        );
        assert_eq!(data[2]["delta"]["type"], "thinking_delta");
        assert_eq!(data[3]["delta"]["type"], "signature_delta");
        assert_eq!(
            data[5]["content_block"],
            json!({"type": "text", "text": ""})
        );
        assert_eq!(
            data[6]["delta"],
            json!({"type": "text_delta", "text": "I'll check the current weather in Paris for you."})
        );
        assert_eq!(
            data[8]["content_block"],
            json!({"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather", "input": {}})
        );
        assert_eq!(data[9]["delta"]["type"], "input_json_delta");
        assert_eq!(
            serde_json::from_str::<Value>(data[9]["delta"]["partial_json"].as_str().unwrap())
                .unwrap(),
            tool_body()["content"][2]["input"]
        );
        assert_eq!(data[9]["index"], 2);
        assert_eq!(
            data[11],
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": tool_body()["usage"]})
        );
        assert_eq!(data[12], json!({"type": "message_stop"}));
    }

    /// Web search: a server tool, its results, cited text; a container; stop details.
    fn search_body() -> Value {
        json!({
            "id": "msg_3", "type": "message", "role": "assistant", "model": "claude-opus-4-1",
            "content": [
                {"type": "text", "text": "I'll search."},
                {"type": "server_tool_use", "id": "srvtoolu_01", "name": "web_search", "input": {"query": "claude shannon birth date"}},
                {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_01", "content": [{"type": "web_search_result", "title": "Claude Shannon - Wikipedia", "url": "https://en.wikipedia.org/wiki/Claude_Shannon", "encrypted_content": "EqgfCioIARgBIiQ3YTAw...", "page_age": "April 30, 2025"}]},
                {"type": "text", "text": "Claude Shannon was born on April 30, 1916, in Petoskey, Michigan", "citations": [{"type": "web_search_result_location", "url": "https://en.wikipedia.org/wiki/Claude_Shannon", "title": "Claude Shannon - Wikipedia", "encrypted_index": "Eo8BCioIAhgBIiQyYjQ0OWJmZi1lNm..", "cited_text": "Claude Shannon was born on April 30, 1916, in Petoskey, Michigan"}]},
                {"type": "text", "text": "", "citations": []},
                {"type": "text", "text": "Done.", "citations": null}
            ],
            "container": {"id": "container_1", "expires_at": "2025-06-01T00:00:00Z"},
            "stop_reason": "end_turn", "stop_sequence": null, "stop_details": null,
            "usage": {"input_tokens": 6039, "output_tokens": 931, "server_tool_use": {"web_search_requests": 1}, "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}}
        })
    }

    #[test]
    fn messages_round_trip_through_their_streams() {
        let bodies = [
            tool_body(),
            // The Messages reference example.
            json!({
                "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
                "content": [{"type": "text", "text": "Hi! My name is Claude."}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 2095, "output_tokens": 503}
            }),
            // A stop sequence, an empty text, a redacted thinking block, a tool with no input.
            json!({
                "id": "msg_2", "type": "message", "role": "assistant", "model": "claude-3-7-sonnet-20250219",
                "content": [
                    {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpP..."},
                    {"type": "text", "text": ""},
                    {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}}
                ],
                "stop_reason": "stop_sequence", "stop_sequence": "\n\nHuman:",
                "usage": {"input_tokens": 12, "output_tokens": 6, "cache_creation_input_tokens": null, "cache_read_input_tokens": null}
            }),
            search_body(),
            // A thinking block with no signature field, and one whose thinking was omitted.
            json!({
                "id": "msg_4", "type": "message", "role": "assistant", "model": "m",
                "content": [
                    {"type": "thinking", "thinking": "hmm"},
                    {"type": "thinking", "thinking": "", "signature": "sig"}
                ],
                "stop_reason": "max_tokens", "stop_sequence": null,
                "usage": {"input_tokens": 1, "output_tokens": 2}
            }),
            // No usage at all.
            json!({
                "id": "msg_5", "type": "message", "role": "assistant", "model": "m",
                "content": [], "stop_reason": "refusal", "stop_sequence": null
            }),
        ];
        for body in &bodies {
            assert_round_trip(body);
        }
    }

    #[test]
    fn bodies_that_are_not_messages_are_errors() {
        let many: Vec<Value> = (0..1025)
            .map(|_| json!({"type": "text", "text": "x"}))
            .collect();
        for body in [
            json!("message"),
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            json!({"type": "message"}),
            json!({"type": "message", "content": "text"}),
            json!({"type": "message", "content": [1]}),
            json!({"type": "message", "content": [{"text": "no type"}]}),
            json!({"type": "message", "content": [{"type": "text"}]}),
            json!({"type": "message", "content": [{"type": "thinking", "thinking": null}]}),
        ] {
            assert!(
                matches!(message_events(&body), Err(ConvertError::BadBody { .. })),
                "{body}"
            );
        }
        assert!(matches!(
            message_events(&json!({"content": many})),
            Err(ConvertError::TooMany {
                what: "content block",
                ..
            })
        ));
    }

    // Hostile input.

    #[test]
    fn mangled_streams_never_panic() {
        let (mut runs, mut assembled) = (0, 0);
        for stream in [sse(TEXT_STREAM), sse(TOOL_STREAM), sse(THINKING_STREAM)] {
            for events in mangled(&stream) {
                runs += 1;
                if let Ok(body) = assemble_message(&events) {
                    assembled += 1;
                    if let Ok(events) = message_events(&body) {
                        assert_eq!(assemble_message(&events).unwrap(), body);
                    }
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
        for mutation in [tool_body(), search_body()].iter().flat_map(mutations) {
            runs += 1;
            if let Ok(events) = message_events(&mutation) {
                // What streams adds up, to the body or (where it lacks `stop_reason`
                // or `stop_sequence`) to its normal form, which round-trips.
                let body = assemble_message(&events).unwrap();
                assert_eq!(
                    assemble_message(&message_events(&body).unwrap()).unwrap(),
                    body
                );
            }
        }
        assert!(runs > 200, "{runs}");
    }
}
