//! `strata serve` seen from outside: the gateway in front of a fake provider on a loopback
//! port, with real tiers under a temporary directory.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use strata::Config;
use strata_http::{Gateway, Server, ServerConfig};
use tempfile::TempDir;
use tokio::sync::oneshot;

#[path = "gateway/admin.rs"]
mod admin;
#[path = "gateway/api.rs"]
mod api;
#[path = "gateway/controls.rs"]
mod controls;
#[path = "../examples/jobs_api.rs"]
mod jobs_api;
#[path = "gateway/python.rs"]
mod python;
#[path = "support/s3.rs"]
mod s3_server;
#[path = "gateway/streams.rs"]
mod streams;
#[path = "support/upstream.rs"]
mod upstream;

use upstream::FakeUpstream;

/// A gateway running in this process over a directory, in front of a fake provider.
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The fake provider.
    pub upstream: Arc<FakeUpstream>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), strata_http::HttpError>>>,
    /// The client tests send with.
    pub client: reqwest::Client,
}

impl Running {
    /// Starts a gateway with the tiers in `dir` (a config file there is read if present).
    pub async fn start(
        dir: &Path,
        upstream: Arc<FakeUpstream>,
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> Result<Running> {
        let file = dir.join("strata.toml");
        let mut config = Config::load(file.is_file().then_some(file.as_path()))?;
        config.disk.path = dir.join("cache");
        config.server.listen = "127.0.0.1:0".parse()?;
        config.server.openai_base = upstream.base();
        config.server.anthropic_base = upstream.base();
        config.server.shutdown_timeout = Duration::from_secs(10);
        tweak(&mut config.server);
        let cache = config.open_cache().await?;
        let server = Server::bind(Gateway::new(cache, config.server.clone())?).await?;
        let addr = server.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Ok(Running {
            addr,
            upstream,
            stop: Some(stop),
            task: Some(task),
            client: reqwest::Client::new(),
        })
    }

    /// A new fake provider and a gateway in front of it.
    pub async fn new(dir: &Path) -> Result<Running> {
        Running::start(dir, Arc::new(FakeUpstream::start().await?), |_| {}).await
    }

    /// The URL of a path.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POSTs JSON with extra headers; returns status, headers and body.
    pub async fn post(
        &self,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, HeaderMap, String)> {
        let mut request = self.client.post(self.url(path)).json(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await?;
        let (status, headers) = (response.status(), response.headers().clone());
        Ok((status, headers, response.text().await?))
    }

    /// Stops it gracefully, waiting for it to flush.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A chat request.
pub fn chat(text: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})
}

/// The same request, streamed.
pub fn chat_stream(text: &str) -> Value {
    let mut request = chat(text);
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    request
}

/// A chat request that offers a tool.
pub fn chat_with_tool(text: &str, stream: bool) -> Value {
    let mut request = chat(text);
    request["tools"] = json!([{"type": "function", "function": {"name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    request["stream"] = json!(stream);
    request
}

/// An Anthropic Messages request.
pub fn message(text: &str, stream: bool) -> Value {
    json!({"model": "claude-haiku-4-5", "max_tokens": 256, "stream": stream,
           "messages": [{"role": "user", "content": text}]})
}

/// The events of an SSE body: (event name, data).
pub fn events(body: &str) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    for block in body.split("\n\n") {
        let (mut name, mut data) = (None, Vec::new());
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
            }
        }
        if !data.is_empty() {
            out.push((name, data.join("\n")));
        }
    }
    out
}

/// The value of a response header.
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Polls until `check` holds (for what happens behind a response: counting, storing).
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    for _ in 0..200 {
        if check() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("never happened: {what}")
}

#[tokio::test]
async fn identical_json_requests_make_one_upstream_call_and_the_second_is_a_hit() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let request = chat("What is the capital of France?");
    let (status, first_headers, first) = gw
        .post(
            "/v1/chat/completions",
            &request,
            &[("authorization", "Bearer sk-test")],
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(header(&first_headers, "x-strata-cache"), "MISS");
    assert!(header(&first_headers, "cache-status").contains("fwd=miss; stored"));
    let key = header(&first_headers, "x-strata-key").to_string();
    assert!(key.starts_with("gpt-4o-mini_"), "{key}");
    // Credentials reach the provider; the gateway's own headers do not.
    assert_eq!(
        header(&gw.upstream.last_headers(), "authorization"),
        "Bearer sk-test"
    );

    let (status, headers, second) = gw
        .post(
            "/v1/chat/completions",
            &request,
            &[("authorization", "Bearer sk-test"), ("x-strata-ttl", "1h")],
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        gw.upstream.calls(),
        1,
        "the second request is answered from the cache"
    );
    assert_eq!(second, first, "the body, byte for byte");
    assert_eq!(header(&headers, "x-strata-cache"), "HIT");
    assert_eq!(header(&headers, "x-strata-key"), key);
    let status_line = header(&headers, "cache-status");
    assert!(status_line.starts_with("strata; hit;"), "{status_line}");
    assert!(status_line.contains("detail=l1"), "{status_line}");
    assert!(header(&headers, "age").parse::<u64>().is_ok());
    assert_eq!(header(&headers, "content-type"), "application/json");
    // Reworded only in whitespace: the same request under the standard profile.
    let (_, headers, _) = gw
        .post(
            "/v1/chat/completions",
            &chat("  What is the capital of France?\n"),
            &[("authorization", "Bearer sk-test")],
        )
        .await?;
    assert_eq!(header(&headers, "x-strata-cache"), "HIT");
    gw.stop().await
}

#[tokio::test]
async fn every_cached_route_answers_from_the_cache_the_second_time() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let cases = [
        (
            "/v1/completions",
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi"}),
        ),
        (
            "/v1/responses",
            json!({"model": "gpt-4o", "input": "Say hi"}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": "Say hi"}),
        ),
        ("/v1/messages", message("Say hi", false)),
    ];
    for (path, request) in &cases {
        let (status, _, first) = gw.post(path, request, &[]).await?;
        assert_eq!(status, StatusCode::OK, "{path}: {first}");
        let (_, headers, second) = gw.post(path, request, &[]).await?;
        assert_eq!(header(&headers, "x-strata-cache"), "HIT", "{path}");
        assert_eq!(second, first, "{path}");
        assert_eq!(gw.upstream.calls_to(path), 1, "{path}");
    }
    // The query string reaches the upstream (`?beta=true`): keyed apart.
    let (_, headers, _) = gw
        .post("/v1/messages?beta=true", &message("Say hi", false), &[])
        .await?;
    assert_eq!(header(&headers, "x-strata-cache"), "MISS");
    let (_, headers, _) = gw
        .post(
            "/v1/messages",
            &message("Say hi", false),
            &[("anthropic-beta", "x-2025")],
        )
        .await?;
    assert_eq!(
        header(&headers, "x-strata-cache"),
        "MISS",
        "a beta header: keyed apart"
    );
    // The same body on two routes is two entries.
    let (_, headers, _) = gw
        .post(
            "/v1/responses",
            &json!({"model": "text-embedding-3-small", "input": "Say hi"}),
            &[],
        )
        .await?;
    assert_eq!(header(&headers, "x-strata-cache"), "MISS");
    gw.stop().await
}

#[tokio::test]
async fn other_paths_and_uncacheable_bodies_are_forwarded_uncached() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    for _ in 0..2 {
        let response = gw
            .client
            .get(gw.url("/v1/models"))
            .header("authorization", "Bearer sk-x")
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers().get("x-strata-cache").is_none());
        let body: Value = response.json().await?;
        assert_eq!(body["data"][0]["id"], "fake-model");
    }
    assert_eq!(gw.upstream.calls_to("/v1/models"), 2, "never cached");
    // A body the normalizer cannot key (no messages): forwarded, answered, counted.
    let odd = json!({"model": "gpt-4o-mini", "prompt_only": true});
    for _ in 0..2 {
        let (_, headers, _) = gw.post("/v1/chat/completions", &odd, &[]).await?;
        assert_eq!(header(&headers, "x-strata-cache"), "BYPASS");
        assert!(header(&headers, "cache-status").contains("fwd=bypass"));
    }
    assert_eq!(gw.upstream.calls_to("/v1/chat/completions"), 2);
    // A path that would leave the upstream base's prefix.
    // (Sent raw: an HTTP client would resolve the dot segment itself.)
    let raw = raw_request(
        gw.addr,
        "GET /v1/%2e%2e/admin/stats HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    // Not JSON at all.
    let response = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .body("not json")
        .send()
        .await?;
    assert_eq!(header(response.headers(), "x-strata-cache"), "BYPASS");
    gw.stop().await
}

#[tokio::test]
async fn two_credentials_share_nothing_by_default_and_everything_when_told() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let request = chat("shared?");
    gw.post(
        "/v1/chat/completions",
        &request,
        &[("authorization", "Bearer sk-a")],
    )
    .await?;
    let (_, headers, _) = gw
        .post(
            "/v1/chat/completions",
            &request,
            &[("authorization", "Bearer sk-b")],
        )
        .await?;
    assert_eq!(
        header(&headers, "x-strata-cache"),
        "MISS",
        "another credential"
    );
    let (_, headers, _) = gw
        .post(
            "/v1/messages",
            &message("shared?", false),
            &[("x-api-key", "sk-ant-a")],
        )
        .await?;
    assert_eq!(header(&headers, "x-strata-cache"), "MISS");
    let (_, headers, _) = gw
        .post(
            "/v1/messages",
            &message("shared?", false),
            &[("x-api-key", "sk-ant-b")],
        )
        .await?;
    assert_eq!(
        header(&headers, "x-strata-cache"),
        "MISS",
        "another x-api-key"
    );
    assert_eq!(gw.upstream.calls(), 4);
    let upstream = Arc::clone(&gw.upstream);
    gw.stop().await?;

    let shared_dir = TempDir::new()?;
    let gw = Running::start(shared_dir.path(), upstream, |s| {
        s.share_across_credentials = true
    })
    .await?;
    gw.post(
        "/v1/chat/completions",
        &request,
        &[("authorization", "Bearer sk-a")],
    )
    .await?;
    let (_, headers, _) = gw
        .post(
            "/v1/chat/completions",
            &request,
            &[("authorization", "Bearer sk-b")],
        )
        .await?;
    assert_eq!(
        header(&headers, "x-strata-cache"),
        "HIT",
        "shared across credentials"
    );
    gw.stop().await
}

#[tokio::test]
async fn errors_are_passed_on_and_never_stored() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let request = chat("rate limited?");
    for status in ["429", "500"] {
        let (got, headers, body) = gw
            .post(
                "/v1/chat/completions",
                &request,
                &[("x-fake-status", status)],
            )
            .await?;
        assert_eq!(got.as_str(), status);
        assert!(body.contains(&format!("fake {status}")), "{body}");
        assert_eq!(
            header(&headers, "retry-after"),
            "0",
            "the provider's headers pass"
        );
        assert!(header(&headers, "cache-status").contains("fwd=miss"));
        assert!(!header(&headers, "cache-status").contains("stored"));
    }
    let (status, headers, _) = gw.post("/v1/chat/completions", &request, &[]).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        header(&headers, "x-strata-cache"),
        "MISS",
        "no error was stored"
    );
    let (_, headers, _) = gw
        .post(
            "/v1/messages",
            &message("overloaded?", false),
            &[("x-fake-status", "529")],
        )
        .await?;
    assert!(!header(&headers, "cache-status").contains("stored"));
    assert_eq!(gw.upstream.calls(), 4);
    gw.stop().await
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_in_the_providers_shape_while_hits_are_served()
-> Result<()> {
    let dir = TempDir::new()?;
    let upstream = Arc::new(FakeUpstream::start().await?);
    let gw = Running::start(dir.path(), Arc::clone(&upstream), |_| {}).await?;
    let cached = chat("cached before the outage");
    gw.post("/v1/chat/completions", &cached, &[]).await?;
    gw.post("/v1/messages", &message("cached too", false), &[])
        .await?;
    gw.stop().await?;
    // The same tiers, now in front of a port nobody listens on.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?
    };
    let gw = Running::start(dir.path(), upstream, |s| {
        s.openai_base = format!("http://{dead}/v1");
        s.anthropic_base = format!("http://{dead}/v1");
    })
    .await?;
    let (status, headers, _) = gw.post("/v1/chat/completions", &cached, &[]).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&headers, "x-strata-cache"), "HIT");
    assert!(
        header(&headers, "cache-status").contains("detail=l2"),
        "from disk after the restart"
    );
    let (status, _, body) = gw.post("/v1/chat/completions", &chat("new"), &[]).await?;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let body: Value = serde_json::from_str(&body)?;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("unreachable"),
        "{body}"
    );
    let (status, _, body) = gw.post("/v1/messages", &message("new", false), &[]).await?;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let body: Value = serde_json::from_str(&body)?;
    assert_eq!(body["type"], "error", "Anthropic's shape: {body}");
    gw.stop().await
}

#[tokio::test]
async fn a_slow_upstream_is_a_504() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::start(dir.path(), Arc::new(FakeUpstream::start().await?), |s| {
        s.first_byte_timeout = Duration::from_millis(200);
    })
    .await?;
    let (status, _, body) = gw
        .post(
            "/v1/chat/completions",
            &chat("slow"),
            &[("x-fake-delay-ms", "1500")],
        )
        .await?;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    gw.stop().await
}

#[tokio::test]
async fn a_body_past_the_limit_is_a_413() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::start(dir.path(), Arc::new(FakeUpstream::start().await?), |s| {
        s.body_limit = bytesize_kib(1);
    })
    .await?;
    let (status, _, _) = gw
        .post("/v1/chat/completions", &chat(&"x".repeat(4096)), &[])
        .await?;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(gw.upstream.calls(), 0);
    gw.stop().await
}

fn bytesize_kib(n: u64) -> strata_http::config::ByteSize {
    strata_http::config::ByteSize::kib(n)
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_call_in_flight_and_loses_no_entry() -> Result<()> {
    let dir = TempDir::new()?;
    let upstream = Arc::new(FakeUpstream::start().await?);
    let gw = Running::start(dir.path(), Arc::clone(&upstream), |_| {}).await?;
    let slow = chat("answered while shutting down");
    let (client, url) = (gw.client.clone(), gw.url("/v1/chat/completions"));
    let body = slow.clone();
    let in_flight = tokio::spawn(async move {
        client
            .post(url)
            .header("x-fake-delay-ms", "700")
            .json(&body)
            .send()
            .await?
            .text()
            .await
    });
    eventually("the call reached the provider", || upstream.calls() == 1).await?;
    gw.stop().await?;
    let answer = in_flight.await??;
    assert!(
        answer.contains("answer #1"),
        "the request in flight was answered: {answer}"
    );

    let gw = Running::start(dir.path(), Arc::clone(&upstream), |_| {}).await?;
    let (_, headers, again) = gw.post("/v1/chat/completions", &slow, &[]).await?;
    assert_eq!(header(&headers, "x-strata-cache"), "HIT");
    assert!(
        header(&headers, "cache-status").contains("detail=l2"),
        "stored on disk"
    );
    assert_eq!(again, answer);
    assert_eq!(upstream.calls(), 1);
    gw.stop().await
}

/// Sends bytes as they are and reads the answer to its end.
async fn raw_request(addr: SocketAddr, request: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// The JSON an admin endpoint answers (200 or an error).
pub async fn admin_json(gw: &Running, path: &str) -> Result<Value> {
    let response = gw.client.get(gw.url(path)).send().await?;
    let status = response.status();
    let text = response.text().await?;
    if status != StatusCode::OK {
        bail!("{path}: {status} {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("{path}: {text}"))
}
