//! The LLM routes the gateway caches, and what each one's streams and errors look like.

use axum::http::HeaderMap;
use serde_json::json;

use crate::convert::SseEvent;

/// Which provider's API (and upstream) a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// OpenAI's API, or any server that speaks it.
    OpenAi,
    /// Anthropic's API.
    Anthropic,
}

impl Provider {
    /// The name entries record as their provider.
    pub fn name(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
        }
    }

    /// The provider of a request to a path the gateway does not cache: Anthropic for
    /// `/v1/messages…` and for requests that carry Anthropic's headers (`anthropic-version`,
    /// `x-api-key`), OpenAI otherwise.
    pub fn of_other(path: &str, headers: &HeaderMap) -> Provider {
        if path.starts_with("/v1/messages")
            || headers.contains_key("anthropic-version")
            || headers.contains_key("x-api-key")
        {
            Provider::Anthropic
        } else {
            Provider::OpenAi
        }
    }

    /// An error body in this provider's shape, so that its SDKs read the message.
    pub fn error_body(self, kind: &str, message: &str) -> serde_json::Value {
        match self {
            Provider::OpenAi => json!({
                "error": {"message": message, "type": kind, "param": null, "code": null}
            }),
            Provider::Anthropic => json!({
                "type": "error",
                "error": {"type": kind, "message": message}
            }),
        }
    }
}

/// A route whose answers are cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LlmRoute {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/completions` (legacy).
    Completions,
    /// `POST /v1/responses`.
    Responses,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// `POST /v1/messages` (Anthropic).
    Messages,
}

/// Where a stream stands after one of its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terminal {
    /// More events follow.
    No,
    /// The answer is complete: the stream may be stored.
    Done,
    /// The upstream ended the stream with an error or an incomplete answer: passed on, never
    /// stored.
    Failed,
}

impl LlmRoute {
    /// Every cached route.
    pub const ALL: [LlmRoute; 5] = [
        LlmRoute::ChatCompletions,
        LlmRoute::Completions,
        LlmRoute::Responses,
        LlmRoute::Embeddings,
        LlmRoute::Messages,
    ];

    /// The path the route answers.
    pub fn path(self) -> &'static str {
        match self {
            LlmRoute::ChatCompletions => "/v1/chat/completions",
            LlmRoute::Completions => "/v1/completions",
            LlmRoute::Responses => "/v1/responses",
            LlmRoute::Embeddings => "/v1/embeddings",
            LlmRoute::Messages => "/v1/messages",
        }
    }

    /// The route's name in metrics and keys.
    pub fn label(self) -> &'static str {
        match self {
            LlmRoute::ChatCompletions => "chat_completions",
            LlmRoute::Completions => "completions",
            LlmRoute::Responses => "responses",
            LlmRoute::Embeddings => "embeddings",
            LlmRoute::Messages => "messages",
        }
    }

    /// Whose API it is.
    pub fn provider(self) -> Provider {
        match self {
            LlmRoute::Messages => Provider::Anthropic,
            _ => Provider::OpenAi,
        }
    }

    /// Whether a JSON answer and a stream convert into each other here, so that a stream
    /// request and a JSON request share one entry. Elsewhere they are keyed apart.
    pub fn converts(self) -> bool {
        matches!(self, LlmRoute::ChatCompletions | LlmRoute::Messages)
    }

    /// What one event of this route's streams says about the stream's end.
    pub fn terminal(self, event: &SseEvent) -> Terminal {
        let name = event.event.as_deref().unwrap_or("");
        match self {
            LlmRoute::ChatCompletions | LlmRoute::Completions | LlmRoute::Embeddings => {
                if event.data.trim() == "[DONE]" {
                    Terminal::Done
                } else if name == "error" || data_has_error(&event.data) {
                    Terminal::Failed
                } else {
                    Terminal::No
                }
            }
            LlmRoute::Responses => match name {
                "response.completed" => Terminal::Done,
                "response.failed" | "response.incomplete" | "error" => Terminal::Failed,
                // Streams without event names still carry the type in the data.
                "" => match data_type(&event.data).as_deref() {
                    Some("response.completed") => Terminal::Done,
                    Some("response.failed" | "response.incomplete" | "error") => Terminal::Failed,
                    _ => Terminal::No,
                },
                _ => Terminal::No,
            },
            LlmRoute::Messages => match name {
                "message_stop" => Terminal::Done,
                "error" => Terminal::Failed,
                _ => Terminal::No,
            },
        }
    }
}

/// Whether an event's data is a JSON object with an `error` member (how OpenAI reports an
/// error inside a stream). Only objects that start like one are parsed.
fn data_has_error(data: &str) -> bool {
    data.contains("\"error\"")
        && serde_json::from_str::<serde_json::Value>(data)
            .ok()
            .is_some_and(|v| v.get("error").is_some_and(|e| !e.is_null()))
}

fn data_type(data: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Typed {
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    serde_json::from_str::<Typed>(data).ok()?.kind
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_events_of_each_route() {
        let done = SseEvent::data("[DONE]");
        assert_eq!(LlmRoute::ChatCompletions.terminal(&done), Terminal::Done);
        assert_eq!(
            LlmRoute::ChatCompletions.terminal(&SseEvent::data(r#"{"error":{"message":"x"}}"#)),
            Terminal::Failed
        );
        assert_eq!(
            LlmRoute::ChatCompletions.terminal(&SseEvent::data(r#"{"choices":[]}"#)),
            Terminal::No
        );
        assert_eq!(
            LlmRoute::Messages.terminal(&SseEvent::named("message_stop", "{}")),
            Terminal::Done
        );
        assert_eq!(
            LlmRoute::Messages.terminal(&SseEvent::named("error", "{}")),
            Terminal::Failed
        );
        assert_eq!(
            LlmRoute::Responses.terminal(&SseEvent::named("response.completed", "{}")),
            Terminal::Done
        );
        assert_eq!(
            LlmRoute::Responses.terminal(&SseEvent::data(r#"{"type":"response.incomplete"}"#)),
            Terminal::Failed
        );
    }

    #[test]
    fn other_paths_go_to_the_provider_their_headers_say() {
        let mut headers = HeaderMap::new();
        assert_eq!(Provider::of_other("/v1/models", &headers), Provider::OpenAi);
        assert_eq!(
            Provider::of_other("/v1/messages/count_tokens", &headers),
            Provider::Anthropic
        );
        headers.insert("anthropic-version", "2023-06-01".parse().unwrap());
        assert_eq!(
            Provider::of_other("/v1/models", &headers),
            Provider::Anthropic
        );
    }
}
