//! The admin API, `/metrics`, the live dashboard and the operator files under `deploy/`.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tempfile::TempDir;

use super::s3_server::TestS3;
use super::upstream::FakeUpstream;
use super::{Running, admin_json, chat, chat_stream, header};

const PATH: &str = "/v1/chat/completions";

#[tokio::test]
async fn health_stats_report_and_keys_answer() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    for i in 0..5 {
        gw.post(PATH, &chat(&format!("question {i}")), &[]).await?;
    }
    gw.post(PATH, &chat("question 0"), &[]).await?;

    let health = admin_json(&gw, "/admin/health").await?;
    assert_eq!(health["status"], "ok");
    assert_eq!(
        health["tiers"]["memory"]["entries"].as_u64(),
        Some(5),
        "{health}"
    );
    assert!(health["tiers"]["disk"]["capacity"].as_u64().is_some());
    assert!(health["tiers"]["s3"].is_null());

    let stats = admin_json(&gw, "/admin/stats").await?;
    assert_eq!(stats["stats"]["lookups"], 6, "{stats}");
    assert_eq!(stats["stats"]["misses"], 5);
    assert_eq!(stats["stats"]["hits"]["l1"], 1);
    assert_eq!(stats["gateway"]["requests"], 6);

    let report = admin_json(&gw, "/admin/report?since=1h&by=model").await?;
    assert_eq!(report["requests"], 6, "{report}");
    assert_eq!(report["by_model"][0]["group"], "gpt-4o-mini");
    let response = gw
        .client
        .get(gw.url("/admin/report?by=planet"))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    // Keys, a page of two at a time: every key once.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = admin_json(&gw, &format!("/admin/keys?limit=2&cursor={cursor}")).await?;
        let keys = page["keys"].as_array().context("keys")?;
        assert!(keys.len() <= 2);
        seen.extend(
            keys.iter()
                .map(|k| k["key"].as_str().unwrap_or("").to_string()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_string(),
            None => break,
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 5, "{seen:?}");
    let page = admin_json(&gw, "/admin/keys?pattern=claude*").await?;
    assert_eq!(page["keys"].as_array().map(Vec::len), Some(0));
    let page = admin_json(&gw, "/admin/keys?pattern=gpt-4o-mini_*&limit=100").await?;
    assert_eq!(page["keys"].as_array().map(Vec::len), Some(5));
    gw.stop().await
}

#[tokio::test]
async fn invalidate_and_clear_take_answers_back_and_refuse_bad_bodies() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let (status, headers, _) = gw.post(PATH, &chat("to be taken back"), &[]).await?;
    assert_eq!(status, StatusCode::OK);
    let key = header(&headers, "x-strata-key").to_string();
    let post = |path: &'static str, body: Value| {
        let request = gw.client.post(gw.url(path)).json(&body);
        async move {
            let response = request.send().await?;
            Ok::<_, anyhow::Error>((response.status(), response.json::<Value>().await?))
        }
    };
    let (status, body) = post("/admin/invalidate", json!({"key": key})).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["affected"], 1);
    let (_, headers, _) = gw.post(PATH, &chat("to be taken back"), &[]).await?;
    assert_eq!(header(&headers, "x-strata-cache"), "MISS");

    let (status, body) = post("/admin/invalidate", json!({"model": "gpt-4o-mini"})).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, headers, _) = gw.post(PATH, &chat("to be taken back"), &[]).await?;
    assert_eq!(header(&headers, "x-strata-cache"), "MISS");

    for bad in [
        json!({}),
        json!({"model": "a", "tag": "b"}),
        json!({"planet": "mars"}),
        json!({"older_than": "soon"}),
    ] {
        let (status, body) = post("/admin/invalidate", bad.clone()).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        let reason = body["error"].as_str().unwrap_or("");
        assert!(!reason.is_empty() && !reason.contains('\n'), "{body}");
    }
    let response = gw
        .client
        .post(gw.url("/admin/invalidate"))
        .header("content-type", "application/json")
        .body("not json")
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let (status, _) = post("/admin/clear", json!({"confirm": false})).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = post("/admin/clear", json!({})).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = post("/admin/clear", json!({"confirm": true})).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, headers, _) = gw.post(PATH, &chat("to be taken back"), &[]).await?;
    assert_eq!(header(&headers, "x-strata-cache"), "MISS");
    gw.stop().await
}

#[tokio::test]
async fn admin_invalidations_are_in_the_audit_trail_with_their_caller() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let response = gw
        .client
        .post(gw.url("/admin/invalidate"))
        .header("x-strata-actor", "alice")
        .json(&json!({"tag": "jobs"}))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let trail = admin_json(&gw, "/admin/audit?since=1h").await?;
    let record = &trail["records"][0];
    assert_eq!(record["action"], "invalidate", "{trail}");
    assert_eq!(record["selector"], "tag jobs");
    assert_eq!(record["who"], "admin API: alice from 127.0.0.1");
    gw.stop().await
}

#[tokio::test]
async fn with_a_token_the_admin_api_refuses_requests_without_it() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::start(dir.path(), Arc::new(FakeUpstream::start().await?), |s| {
        s.admin_token = strata::core::Secret::new("s3cret-token");
    })
    .await?;
    for path in ["/admin/health", "/admin/stats", "/admin/keys", "/admin/"] {
        let response = gw.client.get(gw.url(path)).send().await?;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
        let response = gw
            .client
            .get(gw.url(path))
            .bearer_auth("wrong")
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
        let response = gw
            .client
            .get(gw.url(path))
            .bearer_auth("s3cret-token")
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let response = gw
        .client
        .post(gw.url("/admin/clear"))
        .json(&json!({"confirm": true}))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // The LLM routes and /metrics need no admin token.
    let (status, _, _) = gw.post(PATH, &chat("hello"), &[]).await?;
    assert_eq!(status, StatusCode::OK);
    let response = gw.client.get(gw.url("/metrics")).send().await?;
    assert_eq!(response.status(), StatusCode::OK);
    gw.stop().await
}

#[tokio::test]
async fn the_admin_api_refuses_what_a_web_page_elsewhere_could_send() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    // A page can POST text anywhere without asking: not JSON, not taken.
    let response = gw
        .client
        .post(gw.url("/admin/clear"))
        .header("content-type", "text/plain")
        .body(r#"{"confirm": true}"#)
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let response = gw
        .client
        .post(gw.url("/admin/clear"))
        .header("sec-fetch-site", "cross-site")
        .json(&json!({"confirm": true}))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    // DNS rebinding: a name that is not loopback, pointed at 127.0.0.1.
    let response = gw
        .client
        .get(gw.url("/admin/stats"))
        .header("host", "attacker.example")
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let response = gw
        .client
        .get(gw.url("/admin/stats"))
        .header("host", "localhost:8080")
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    gw.stop().await
}

#[tokio::test]
async fn the_admin_api_can_listen_apart() -> Result<()> {
    let dir = TempDir::new()?;
    let free = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let gw = Running::start(dir.path(), Arc::new(FakeUpstream::start().await?), |s| {
        s.admin_listen = Some(free);
    })
    .await?;
    let response = gw.client.get(gw.url("/admin/health")).send().await?;
    assert_ne!(
        response.status(),
        StatusCode::OK,
        "not on the gateway's listener"
    );
    let response = gw
        .client
        .get(format!("http://{free}/admin/health"))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    gw.stop().await
}

/// A metric's value in the text format (the sample with these labels, or without any).
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|line| {
            line.starts_with(name_and_labels) && line[name_and_labels.len()..].starts_with(' ')
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_counters_move() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let metrics = || async {
        let text = gw
            .client
            .get(gw.url("/metrics"))
            .send()
            .await?
            .text()
            .await?;
        Ok::<_, anyhow::Error>(text)
    };
    let before = metrics().await?;
    assert_eq!(
        sample(&before, "strata_misses_total"),
        Some(0.0),
        "{before}"
    );
    gw.post(PATH, &chat("count me"), &[]).await?;
    gw.post(PATH, &chat("count me"), &[]).await?;
    gw.post(PATH, &chat_stream("count me too"), &[]).await?;
    let after = metrics().await?;
    let check = |name: &str, expected: f64| {
        assert_eq!(sample(&after, name), Some(expected), "{name}\n{after}");
    };
    check(
        r#"strata_requests_total{route="chat_completions",result="miss"}"#,
        2.0,
    );
    check(
        r#"strata_requests_total{route="chat_completions",result="hit"}"#,
        1.0,
    );
    check(r#"strata_hits_total{tier="l1"}"#, 1.0);
    check("strata_misses_total", 2.0);
    check(r#"strata_tier_errors_total{tier="l2"}"#, 0.0);
    check("strata_outbox_depth", 0.0);
    check("strata_s3_breaker_open", 0.0);
    assert!(
        sample(&after, "strata_saved_usd_total").unwrap_or(0.0) > 0.0,
        "{after}"
    );
    assert!(sample(&after, "strata_saved_tokens_total").unwrap_or(0.0) > 0.0);
    assert!(sample(&after, "strata_memory_bytes").unwrap_or(0.0) > 0.0);
    assert!(
        sample(
            &after,
            r#"strata_lookup_duration_seconds_count{route="chat_completions"}"#
        )
        .unwrap_or(0.0)
            >= 3.0,
        "{after}"
    );
    assert!(
        sample(
            &after,
            r#"strata_upstream_duration_seconds_count{route="chat_completions"}"#
        )
        .unwrap_or(0.0)
            >= 2.0
    );
    gw.stop().await
}

#[tokio::test]
async fn the_monitor_streams_one_snapshot_a_second() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    gw.post(PATH, &chat("watch me"), &[]).await?;
    let mut response = gw.client.get(gw.url("/admin/monitor")).send().await?;
    assert_eq!(
        header(response.headers(), "content-type"),
        "text/event-stream"
    );
    let started = std::time::Instant::now();
    let mut text = String::new();
    while text.matches("event: snapshot").count() < 2 {
        let Some(chunk) = response.chunk().await? else {
            bail!("the monitor ended: {text}")
        };
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(900),
        "a second apart"
    );
    let first = super::events(&text);
    let snapshot: Value = serde_json::from_str(&first[0].1)?;
    assert_eq!(snapshot["stats"]["misses"], 1, "{snapshot}");
    assert!(snapshot["tiers"]["memory"]["bytes"].as_u64().unwrap_or(0) > 0);
    gw.stop().await
}

/// The Chromium binary (Debian's `chromium`; scripts/test installs it).
fn chromium() -> Result<std::path::PathBuf> {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = std::process::Command::new("which").arg(name).output()
            && out.status.success()
        {
            return Ok(String::from_utf8(out.stdout)?.trim().into());
        }
    }
    bail!("no Chromium found: install Debian's `chromium` package (scripts/test does)")
}

#[tokio::test]
async fn the_dashboard_shows_live_numbers_in_a_headless_browser() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    gw.post(PATH, &chat("dashboard"), &[]).await?;
    gw.post(PATH, &chat("dashboard"), &[]).await?;
    let page = gw
        .client
        .get(gw.url("/admin/"))
        .send()
        .await?
        .text()
        .await?;
    for fetch in ["src=\"http", "href=\"http", "@import", "url(http"] {
        assert!(!page.contains(fetch), "{fetch}: the page is self-contained");
    }
    let profile = TempDir::new()?;
    let browser = chromium()?;
    let url = gw.url("/admin/");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=3000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .output()
    })
    .await??;
    let dom = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let snapshots = dom
        .split("data-snapshots=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(snapshots >= 1, "the page read the monitor: {dom}");
    assert!(
        dom.contains("50"),
        "the hit rate (50%) is on the page: {dom}"
    );
    for id in [
        "hit-rate",
        "requests",
        "cost-saved",
        "tier-memory",
        "tier-disk",
        "tier-s3",
        "errors",
        "status",
    ] {
        assert!(dom.contains(&format!("id=\"{id}\"")), "{id} missing");
    }
    gw.stop().await
}

#[tokio::test]
async fn warm_pulls_another_nodes_answers_from_s3() -> Result<()> {
    let s3 = TestS3::start().await?;
    let upstream = Arc::new(FakeUpstream::start().await?);
    let (a, b) = (TempDir::new()?, TempDir::new()?);
    for dir in [&a, &b] {
        std::fs::write(
            dir.path().join("strata.toml"),
            s3.config_toml(&dir.path().join("cache")),
        )?;
    }
    let share = |s: &mut strata_http::ServerConfig| s.share_across_credentials = true;
    let node_a = Running::start(a.path(), Arc::clone(&upstream), share).await?;
    let request = chat("shared through the bucket");
    node_a.post(PATH, &request, &[]).await?;
    node_a.stop().await?;
    assert!(
        s3.keys().await?.iter().any(|k| k.ends_with(".json.zst")),
        "node A's close uploaded its entry"
    );

    let node_b = Running::start(b.path(), Arc::clone(&upstream), share).await?;
    let response = node_b
        .client
        .post(node_b.url("/admin/warm"))
        .json(&json!({"model": "gpt-4o-mini", "since": "1h"}))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let warmed: Value = response.json().await?;
    assert_eq!(warmed["warmed"], 1, "{warmed}");
    let (_, headers, body) = node_b.post(PATH, &request, &[]).await?;
    assert_eq!(header(&headers, "x-strata-cache"), "HIT");
    assert!(
        header(&headers, "cache-status").contains("detail=l2"),
        "warmed into disk"
    );
    assert!(body.contains("answer #1"));
    assert_eq!(upstream.calls(), 1);
    let health = admin_json(&node_b, "/admin/health").await?;
    assert_eq!(health["tiers"]["s3"]["breaker_open"], false, "{health}");
    node_b.stop().await
}

#[tokio::test]
async fn the_alert_rules_pass_promtool_and_name_only_exported_metrics() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = root.join("deploy/prometheus/strata-rules.yml");
    let tests = root.join("deploy/prometheus/strata-rules.test.yml");
    for args in [vec!["check", "rules"], vec!["test", "rules"]] {
        let file = if args[0] == "check" { &rules } else { &tests };
        let output = std::process::Command::new("promtool")
            .args(&args)
            .arg(file)
            .current_dir(root.join("deploy/prometheus"))
            .output()
            .context("promtool (Debian's `prometheus` package; scripts/test installs it)")?;
        assert!(
            output.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Every strata_* series the rules and the dashboard use is one /metrics exports.
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    gw.post(PATH, &chat("metrics"), &[]).await?;
    let exported = gw
        .client
        .get(gw.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let names: std::collections::BTreeSet<&str> = exported
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let used = std::fs::read_to_string(&rules)?
        + &std::fs::read_to_string(root.join("deploy/grafana/strata-dashboard.json"))?;
    let mut missing = Vec::new();
    for word in used.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("strata_") && !names.contains(word) && !is_recorded(&used, word) {
            missing.push(word.to_string());
        }
    }
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "not exported: {missing:?}\nexported: {names:?}"
    );
    gw.stop().await
}

/// Whether a name is a recording rule's (`record: name`) rather than an exported series.
fn is_recorded(rules: &str, name: &str) -> bool {
    rules.contains(&format!("record: {name}")) || rules.contains(&format!(":{name}:"))
}
