//! A fake LLM provider on a loopback port, for the gateway's tests and bench: OpenAI- and
//! Anthropic-shaped JSON and SSE answers, with a count of its calls.
//!
//! Each answer names the call that made it (`answer #N`), so a test can tell a cached answer
//! from a new one. Request headers steer it (the gateway forwards them):
//! - `x-fake-delay-ms`: wait before answering;
//! - `x-fake-event-delay-ms`: wait before each event of a stream;
//! - `x-fake-cut-after`: end a stream after this many events, without its terminal event;
//! - `x-fake-status`: answer with this status and an error body in the provider's shape.
//!
//! A request with `tools` is answered with a call of the first tool; a chat request with
//! `reasoning_effort`, or a Messages request with `thinking`, carries reasoning.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// What the fake saw.
#[derive(Default)]
pub struct Seen {
    calls: AtomicUsize,
    by_path: Mutex<HashMap<String, usize>>,
    last_headers: Mutex<Option<HeaderMap>>,
}

/// A running fake provider.
pub struct FakeUpstream {
    /// Its address.
    pub addr: SocketAddr,
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeUpstream {
    /// Starts one on a free loopback port.
    pub async fn start() -> anyhow::Result<FakeUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Seen::default());
        let app = Router::new().fallback(answer).with_state(Arc::clone(&seen));
        let task = tokio::spawn(async move {
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeUpstream { addr, seen, task })
    }

    /// The base URL to configure (`/v1` included).
    pub fn base(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Calls so far.
    pub fn calls(&self) -> usize {
        self.seen.calls.load(Ordering::SeqCst)
    }

    /// Calls of one path so far.
    pub fn calls_to(&self, path: &str) -> usize {
        self.seen
            .by_path
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// The headers of the last call.
    pub fn last_headers(&self) -> HeaderMap {
        self.seen
            .last_headers
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_default()
    }
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

async fn answer(State(seen): State<Arc<Seen>>, request: Request) -> Response {
    let n = seen.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    *seen
        .by_path
        .lock()
        .unwrap()
        .entry(path.clone())
        .or_default() += 1;
    *seen.last_headers.lock().unwrap() = Some(parts.headers.clone());
    let headers = parts.headers;
    let body = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Some(ms) = header_u64(&headers, "x-fake-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let anthropic = path.starts_with("/v1/messages");
    if let Some(status) = header_u64(&headers, "x-fake-status") {
        let status =
            StatusCode::from_u16(status as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = if anthropic {
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": format!("fake {status} #{n}")}})
        } else {
            json!({"error": {"message": format!("fake {status} #{n}"), "type": "requests", "code": null}})
        };
        return (status, [("retry-after", "0")], axum::Json(body)).into_response();
    }
    let stream = request["stream"].as_bool().unwrap_or(false);
    let events = match path.as_str() {
        "/v1/chat/completions" => {
            let (json, events) = chat(&request, n);
            if !stream {
                return axum::Json(json).into_response();
            }
            events
        }
        "/v1/messages" => {
            let (json, events) = message(&request, n);
            if !stream {
                return axum::Json(json).into_response();
            }
            events
        }
        "/v1/responses" => {
            let text = format!("answer #{n}");
            let done = json!({"id": format!("resp_{n}"), "object": "response", "status": "completed",
                "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}],
                "usage": {"input_tokens": 11, "output_tokens": 3}});
            if !stream {
                return axum::Json(done).into_response();
            }
            vec![
                (
                    Some("response.created"),
                    json!({"type": "response.created"}).to_string(),
                ),
                (
                    Some("response.output_text.delta"),
                    json!({"type": "response.output_text.delta", "delta": text}).to_string(),
                ),
                (
                    Some("response.completed"),
                    json!({"type": "response.completed", "response": done}).to_string(),
                ),
            ]
        }
        "/v1/embeddings" => {
            return axum::Json(json!({"object": "list", "model": request["model"],
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, n as f64]}],
                "usage": {"prompt_tokens": 4, "total_tokens": 4}}))
            .into_response();
        }
        "/v1/completions" => {
            let done = json!({"id": format!("cmpl-{n}"), "object": "text_completion",
                "choices": [{"index": 0, "text": format!("answer #{n}"), "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3}});
            if !stream {
                return axum::Json(done).into_response();
            }
            vec![(None, done.to_string()), (None, "[DONE]".to_string())]
        }
        "/v1/models" => {
            return axum::Json(json!({"object": "list", "data": [{"id": "fake-model", "object": "model"}], "call": n}))
                .into_response();
        }
        _ => return (StatusCode::NOT_FOUND, "no such fake route").into_response(),
    };
    let delay = header_u64(&headers, "x-fake-event-delay-ms").map(Duration::from_millis);
    let cut = header_u64(&headers, "x-fake-cut-after").map(|n| n as usize);
    sse(events, delay, cut)
}

/// Writes events as SSE, one chunk each, with a delay before each and an optional cut.
fn sse(
    events: Vec<(Option<&'static str>, String)>,
    delay: Option<Duration>,
    cut: Option<usize>,
) -> Response {
    let count = cut.unwrap_or(usize::MAX).min(events.len());
    let stream = futures::stream::unfold(
        (events.into_iter().take(count), delay),
        |(mut it, delay)| async move {
            let (name, data) = it.next()?;
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            let mut chunk = String::new();
            if let Some(name) = name {
                chunk.push_str(&format!("event: {name}\n"));
            }
            chunk.push_str(&format!("data: {data}\n\n"));
            Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), (it, delay)))
        },
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("x-fake-upstream", "1")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn first_tool(request: &Value) -> Option<String> {
    let tool = request["tools"].as_array()?.first()?;
    tool["function"]["name"]
        .as_str()
        .or_else(|| tool["name"].as_str())
        .map(str::to_string)
}

/// An OpenAI chat completion and its stream.
fn chat(request: &Value, n: usize) -> (Value, Vec<(Option<&'static str>, String)>) {
    let (id, model, created) = (
        format!("chatcmpl-{n}"),
        request["model"].clone(),
        1_700_000_000 + n as u64,
    );
    let text = format!("answer #{n}");
    let reasoning = request
        .get("reasoning_effort")
        .map(|_| format!("thinking about #{n}"));
    let tool = first_tool(request);
    let usage = json!({"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19});
    let mut message = json!({"role": "assistant", "content": text});
    let mut finish = "stop";
    if let Some(name) = &tool {
        message["content"] = Value::Null;
        message["tool_calls"] = json!([{"id": format!("call_{n}"), "type": "function",
            "function": {"name": name, "arguments": "{\"city\": \"Paris\"}"}}]);
        finish = "tool_calls";
    }
    if let Some(r) = &reasoning {
        message["reasoning_content"] = json!(r);
    }
    let body = json!({"id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": null}],
        "usage": usage});
    let chunk = |delta: Value, finish: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]})
        .to_string()
    };
    let mut events = vec![(
        None,
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
    )];
    if let Some(r) = &reasoning {
        events.push((None, chunk(json!({"reasoning_content": r}), Value::Null)));
    }
    match &tool {
        Some(name) => {
            events.push((None, chunk(json!({"tool_calls": [{"index": 0, "id": format!("call_{n}"), "type": "function",
                "function": {"name": name, "arguments": ""}}]}), Value::Null)));
            events.push((
                None,
                chunk(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]}),
                    Value::Null,
                ),
            ));
            events.push((
                None,
                chunk(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
                    Value::Null,
                ),
            ));
        }
        None => {
            for piece in ["answer", " #", &n.to_string()] {
                events.push((None, chunk(json!({"content": piece}), Value::Null)));
            }
        }
    }
    events.push((None, chunk(json!({}), json!(finish))));
    if request["stream_options"]["include_usage"].as_bool() == Some(true) {
        events.push((
            None,
            json!({"id": id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [], "usage": usage})
            .to_string(),
        ));
    }
    events.push((None, "[DONE]".to_string()));
    (body, events)
}

/// An Anthropic message and its stream.
fn message(request: &Value, n: usize) -> (Value, Vec<(Option<&'static str>, String)>) {
    let id = format!("msg_{n}");
    let text = format!("answer #{n}");
    let mut content = Vec::new();
    if request.get("thinking").is_some() {
        content.push(json!({"type": "thinking", "thinking": format!("thinking about #{n}"), "signature": format!("sig{n}")}));
    }
    content.push(json!({"type": "text", "text": text}));
    let tool = first_tool(request);
    let mut stop = "end_turn";
    if let Some(name) = &tool {
        content.push(json!({"type": "tool_use", "id": format!("toolu_{n}"), "name": name, "input": {"city": "Paris"}}));
        stop = "tool_use";
    }
    let body = json!({"id": id, "type": "message", "role": "assistant", "model": request["model"],
        "content": content, "stop_reason": stop, "stop_sequence": null,
        "usage": {"input_tokens": 21, "output_tokens": 9}});
    let mut events = vec![(Some("message_start"), json!({"type": "message_start", "message": {
        "id": id, "type": "message", "role": "assistant", "model": request["model"], "content": [],
        "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 21, "output_tokens": 1}}}).to_string())];
    events.push((Some("ping"), json!({"type": "ping"}).to_string()));
    for (i, block) in content.iter().enumerate() {
        let (start, deltas) = match block["type"].as_str() {
            Some("thinking") => (
                json!({"type": "thinking", "thinking": ""}),
                vec![
                    json!({"type": "thinking_delta", "thinking": block["thinking"]}),
                    json!({"type": "signature_delta", "signature": block["signature"]}),
                ],
            ),
            Some("tool_use") => (
                json!({"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}),
                vec![
                    json!({"type": "input_json_delta", "partial_json": "{\"city\": "}),
                    json!({"type": "input_json_delta", "partial_json": "\"Paris\"}"}),
                ],
            ),
            _ => (
                json!({"type": "text", "text": ""}),
                vec![
                    json!({"type": "text_delta", "text": "answer"}),
                    json!({"type": "text_delta", "text": format!(" #{n}")}),
                ],
            ),
        };
        events.push((
            Some("content_block_start"),
            json!({"type": "content_block_start", "index": i, "content_block": start}).to_string(),
        ));
        for delta in deltas {
            events.push((
                Some("content_block_delta"),
                json!({"type": "content_block_delta", "index": i, "delta": delta}).to_string(),
            ));
        }
        events.push((
            Some("content_block_stop"),
            json!({"type": "content_block_stop", "index": i}).to_string(),
        ));
    }
    events.push((
        Some("message_delta"),
        json!({"type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": 9}})
        .to_string(),
    ));
    events.push((
        Some("message_stop"),
        json!({"type": "message_stop"}).to_string(),
    ));
    (body, events)
}
