//! Streams through the gateway: recorded as they pass, replayed on hits, shared while in
//! flight, converted to and from JSON, and never stored unless whole.

use std::sync::Arc;

use anyhow::Result;
use reqwest::StatusCode;
use serde_json::Value;
use tempfile::TempDir;

use super::upstream::FakeUpstream;
use super::{Running, chat_stream, chat_with_tool, events, header, message};

#[tokio::test]
async fn a_stream_miss_then_a_stream_hit_give_identical_data_payloads() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    for (path, request) in [
        ("/v1/chat/completions", chat_stream("Tell me a story")),
        ("/v1/messages", message("Tell me a story", true)),
        (
            "/v1/responses",
            serde_json::json!({"model": "gpt-4o", "input": "Tell me a story", "stream": true}),
        ),
    ] {
        let (status, headers, first) = gw.post(path, &request, &[]).await?;
        assert_eq!(status, StatusCode::OK, "{path}: {first}");
        assert_eq!(header(&headers, "content-type"), "text/event-stream");
        assert_eq!(header(&headers, "x-strata-cache"), "MISS", "{path}");
        let (_, headers, second) = gw.post(path, &request, &[]).await?;
        assert_eq!(header(&headers, "x-strata-cache"), "HIT", "{path}");
        assert_eq!(header(&headers, "content-type"), "text/event-stream");
        assert!(
            !header(&headers, "x-strata-key").is_empty(),
            "streamed hits carry the key"
        );
        let (first, second) = (events(&first), events(&second));
        assert!(first.len() >= 3, "{path}: {first:?}");
        assert_eq!(
            first, second,
            "{path}: same events, same order, same payloads"
        );
        assert_eq!(gw.upstream.calls_to(path), 1, "{path}");
    }
    // Usage from the stream's own events made it into the savings.
    let stats = super::admin_json(&gw, "/admin/stats").await?;
    assert!(
        stats["stats"]["tokens_saved"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );
    gw.stop().await
}

#[tokio::test]
async fn chat_json_and_stream_convert_into_each_other_with_tool_calls() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    // JSON first, then the same request streamed: served from the JSON entry as a stream.
    let (_, _, json_first) = gw
        .post(
            "/v1/chat/completions",
            &chat_with_tool("weather in Paris?", false),
            &[],
        )
        .await?;
    let json_first: Value = serde_json::from_str(&json_first)?;
    let (status, headers, streamed) = gw
        .post(
            "/v1/chat/completions",
            &chat_with_tool("weather in Paris?", true),
            &[],
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&headers, "x-strata-cache"), "HIT");
    assert_eq!(header(&headers, "content-type"), "text/event-stream");
    let streamed = events(&streamed);
    assert_eq!(streamed.last().map(|e| e.1.as_str()), Some("[DONE]"));
    let arguments: String = streamed
        .iter()
        .filter_map(|(_, data)| serde_json::from_str::<Value>(data).ok())
        .filter_map(|chunk| {
            chunk["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    let expected = json_first["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(arguments, expected, "the tool call's arguments, streamed");
    assert_eq!(gw.upstream.calls(), 1);

    // A stream first, then the same request as JSON: served from the stream's assembled form.
    let (_, _, stream_first) = gw
        .post(
            "/v1/chat/completions",
            &chat_with_tool("weather in Rome?", true),
            &[],
        )
        .await?;
    let (_, headers, json_second) = gw
        .post(
            "/v1/chat/completions",
            &chat_with_tool("weather in Rome?", false),
            &[],
        )
        .await?;
    assert_eq!(header(&headers, "x-strata-cache"), "HIT");
    assert_eq!(header(&headers, "content-type"), "application/json");
    let json_second: Value = serde_json::from_str(&json_second)?;
    let call = &json_second["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "weather");
    assert_eq!(call["function"]["arguments"], "{\"city\": \"Paris\"}");
    assert_eq!(json_second["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(json_second["object"], "chat.completion");
    assert!(events(&stream_first).len() > 3);
    assert_eq!(gw.upstream.calls(), 2);

    // Reasoning survives both ways.
    let mut reasoning = chat_stream("think first");
    reasoning["reasoning_effort"] = "high".into();
    gw.post("/v1/chat/completions", &reasoning, &[]).await?;
    reasoning["stream"] = false.into();
    let (_, headers, body) = gw.post("/v1/chat/completions", &reasoning, &[]).await?;
    assert_eq!(header(&headers, "x-strata-cache"), "HIT");
    let body: Value = serde_json::from_str(&body)?;
    assert_eq!(
        body["choices"][0]["message"]["reasoning_content"],
        "thinking about #3"
    );
    assert_eq!(body["usage"]["completion_tokens"], 7);
    gw.stop().await
}

#[tokio::test]
async fn anthropic_json_and_stream_convert_into_each_other_with_tools_and_thinking() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let with_tool = |stream: bool| {
        let mut request = message("weather in Oslo?", stream);
        request["tools"] =
            serde_json::json!([{"name": "weather", "input_schema": {"type": "object"}}]);
        request["thinking"] = serde_json::json!({"type": "enabled", "budget_tokens": 1024});
        request
    };
    let (_, _, json_first) = gw.post("/v1/messages", &with_tool(false), &[]).await?;
    let json_first: Value = serde_json::from_str(&json_first)?;
    let (_, headers, streamed) = gw.post("/v1/messages", &with_tool(true), &[]).await?;
    assert_eq!(header(&headers, "x-strata-cache"), "HIT");
    let streamed = events(&streamed);
    let names: Vec<&str> = streamed.iter().filter_map(|e| e.0.as_deref()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    let partial: String = streamed
        .iter()
        .filter_map(|(_, data)| serde_json::from_str::<Value>(data).ok())
        .filter_map(|e| e["delta"]["partial_json"].as_str().map(str::to_string))
        .collect();
    let input: Value = serde_json::from_str(&partial)?;
    assert_eq!(
        input, json_first["content"][2]["input"],
        "tool input, streamed"
    );
    assert!(
        streamed.iter().any(|(_, d)| d.contains("thinking_delta")),
        "thinking, streamed"
    );

    let (_, _, _) = gw
        .post("/v1/messages", &message("stream first", true), &[])
        .await?;
    let (_, headers, json) = gw
        .post("/v1/messages", &message("stream first", false), &[])
        .await?;
    assert_eq!(header(&headers, "x-strata-cache"), "HIT");
    let json: Value = serde_json::from_str(&json)?;
    assert_eq!(json["type"], "message");
    assert_eq!(json["content"][0]["text"], "answer #2");
    assert_eq!(json["usage"]["output_tokens"], 9);
    assert_eq!(gw.upstream.calls(), 2);
    gw.stop().await
}

#[tokio::test]
async fn responses_streams_and_json_are_keyed_apart() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let json = serde_json::json!({"model": "gpt-4o", "input": "hello"});
    let mut stream = json.clone();
    stream["stream"] = true.into();
    gw.post("/v1/responses", &json, &[]).await?;
    let (_, headers, _) = gw.post("/v1/responses", &stream, &[]).await?;
    assert_eq!(
        header(&headers, "x-strata-cache"),
        "MISS",
        "no conversion: its own entry"
    );
    let (_, headers, _) = gw.post("/v1/responses", &stream, &[]).await?;
    assert_eq!(header(&headers, "x-strata-cache"), "HIT");
    gw.stop().await
}

#[tokio::test]
async fn a_hundred_identical_streams_in_flight_make_one_upstream_call() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let request = chat_stream("one call for all");
    let mut clients = Vec::new();
    for i in 0..100 {
        let (client, url, body) = (
            gw.client.clone(),
            gw.url("/v1/chat/completions"),
            request.clone(),
        );
        clients.push(tokio::spawn(async move {
            // Some arrive before the first event, some in the middle of the stream.
            tokio::time::sleep(std::time::Duration::from_millis(i * 4)).await;
            let response = client
                .post(url)
                .header("x-fake-event-delay-ms", "60")
                .json(&body)
                .send()
                .await?;
            let cache = header(response.headers(), "x-strata-cache").to_string();
            Ok::<_, anyhow::Error>((cache, response.text().await?))
        }));
    }
    let mut bodies = Vec::new();
    let mut coalesced = 0;
    for client in clients {
        let (cache, body) = client.await??;
        coalesced += usize::from(cache == "COALESCED");
        bodies.push(events(&body));
    }
    assert_eq!(gw.upstream.calls(), 1, "one upstream call for 100 clients");
    assert!(
        coalesced >= 50,
        "most joined the call in flight: {coalesced}"
    );
    let first = &bodies[0];
    assert_eq!(
        first.last().map(|e| e.1.as_str()),
        Some("[DONE]"),
        "complete"
    );
    for body in &bodies {
        assert_eq!(body, first, "every client got the same complete sequence");
    }
    // Every request is counted once: the leader a miss, each follower a coalesced hit (the
    // few that arrived after the call ended, an L1 hit).
    let mut counted = 0;
    for _ in 0..200 {
        let stats = super::admin_json(&gw, "/admin/stats").await?;
        let n = |k: &str| stats["stats"]["hits"][k].as_u64().unwrap_or(0);
        assert_eq!(stats["stats"]["misses"], 1, "{stats}");
        counted = n("coalesced") + n("l1") + 1;
        if counted == 100 {
            assert_eq!(n("coalesced") as usize, coalesced, "{stats}");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(counted, 100);
    gw.stop().await
}

#[tokio::test]
async fn identical_json_requests_in_flight_share_one_upstream_call() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let request = super::chat("one JSON call for all");
    let mut clients = Vec::new();
    for _ in 0..20 {
        let (client, url, body) = (
            gw.client.clone(),
            gw.url("/v1/chat/completions"),
            request.clone(),
        );
        clients.push(tokio::spawn(async move {
            let response = client
                .post(url)
                .header("x-fake-delay-ms", "300")
                .json(&body)
                .send()
                .await?;
            let cache = header(response.headers(), "x-strata-cache").to_string();
            Ok::<_, anyhow::Error>((cache, response.text().await?))
        }));
    }
    let mut answers = Vec::new();
    for client in clients {
        answers.push(client.await??);
    }
    assert_eq!(gw.upstream.calls(), 1);
    assert_eq!(answers.iter().filter(|(c, _)| c == "MISS").count(), 1);
    assert_eq!(answers.iter().filter(|(c, _)| c == "COALESCED").count(), 19);
    assert!(answers.iter().all(|(_, body)| body == &answers[0].1));
    gw.stop().await
}

#[tokio::test]
async fn a_cut_stream_reaches_the_client_cut_and_is_not_stored() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let request = chat_stream("cut me off");
    let response = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .header("x-fake-cut-after", "3")
        .json(&request)
        .send()
        .await?;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the head was sent before the cut"
    );
    // The body ends in an error, as the upstream's did, not in a clean end without `[DONE]`.
    assert!(
        response.text().await.is_err(),
        "the client sees the stream cut"
    );
    let (_, headers, body) = gw.post("/v1/chat/completions", &request, &[]).await?;
    assert_eq!(
        header(&headers, "x-strata-cache"),
        "MISS",
        "the cut stream was not stored"
    );
    assert!(body.contains("[DONE]"));
    assert_eq!(gw.upstream.calls(), 2);
    gw.stop().await
}

#[tokio::test]
async fn a_stream_every_client_left_is_not_stored() -> Result<()> {
    let dir = TempDir::new()?;
    let upstream = Arc::new(FakeUpstream::start().await?);
    let gw = Running::start(dir.path(), Arc::clone(&upstream), |_| {}).await?;
    let request = chat_stream("nobody waits for me");
    let mut response = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .header("x-fake-event-delay-ms", "200")
        .json(&request)
        .send()
        .await?;
    let first = response.chunk().await?;
    assert!(first.is_some());
    drop(response);
    // The call is cancelled, not left running for nobody, and counted as a miss.
    for _ in 0..200 {
        let health = super::admin_json(&gw, "/admin/health").await?;
        if health["in_flight"] == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let stats = super::admin_json(&gw, "/admin/stats").await?;
    assert_eq!(stats["stats"]["misses"], 1, "{stats}");
    assert_eq!(stats["gateway"]["calls_in_flight"], 0, "{stats}");
    assert_eq!(upstream.calls(), 1);
    let (_, headers, body) = gw.post("/v1/chat/completions", &request, &[]).await?;
    assert_eq!(
        header(&headers, "x-strata-cache"),
        "MISS",
        "nothing was stored"
    );
    assert!(body.contains("[DONE]"));
    assert_eq!(upstream.calls(), 2);
    gw.stop().await
}
