//! Per-request controls: each `Cache-Control` directive and each `X-Strata-*` header has its
//! effect.

use std::time::Duration;

use anyhow::Result;
use reqwest::StatusCode;
use serde_json::json;
use tempfile::TempDir;

use super::{Running, chat, header};

const PATH: &str = "/v1/chat/completions";

#[tokio::test]
async fn no_store_answers_and_stores_nothing() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let request = chat("do not keep this");
    let (status, headers, _) = gw
        .post(PATH, &request, &[("cache-control", "no-store")])
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        header(&headers, "cache-status"),
        format!(
            "strata; fwd=miss; key=\"{}\"",
            header(&headers, "x-strata-key")
        )
    );
    let (_, headers, _) = gw.post(PATH, &request, &[]).await?;
    assert_eq!(
        header(&headers, "x-strata-cache"),
        "MISS",
        "nothing was stored"
    );
    assert_eq!(gw.upstream.calls(), 2);
    gw.stop().await
}

#[tokio::test]
async fn no_cache_refreshes_and_stores_the_new_answer() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let request = chat("refresh me");
    let (_, _, first) = gw.post(PATH, &request, &[]).await?;
    let (_, headers, refreshed) = gw
        .post(PATH, &request, &[("cache-control", "no-cache")])
        .await?;
    assert_eq!(header(&headers, "x-strata-cache"), "REFRESH");
    assert!(header(&headers, "cache-status").contains("fwd=request; stored"));
    assert_ne!(refreshed, first, "a new upstream answer");
    assert!(refreshed.contains("answer #2"));
    let (_, headers, hit) = gw.post(PATH, &request, &[]).await?;
    assert_eq!(header(&headers, "x-strata-cache"), "HIT");
    assert_eq!(hit, refreshed, "the refreshed answer replaced the old one");
    assert_eq!(gw.upstream.calls(), 2);
    gw.stop().await
}

#[tokio::test]
async fn max_age_serves_only_entries_young_enough() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let request = chat("how old?");
    gw.post(PATH, &request, &[]).await?;
    let (_, headers, _) = gw
        .post(PATH, &request, &[("cache-control", "max-age=3600")])
        .await?;
    assert_eq!(header(&headers, "x-strata-cache"), "HIT");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, headers, body) = gw
        .post(PATH, &request, &[("cache-control", "max-age=1")])
        .await?;
    assert_eq!(
        header(&headers, "x-strata-cache"),
        "REFRESH",
        "older than a second"
    );
    assert!(header(&headers, "cache-status").contains("fwd=stale"));
    assert!(body.contains("answer #2"));
    assert_eq!(gw.upstream.calls(), 2);
    gw.stop().await
}

#[tokio::test]
async fn only_if_cached_is_a_504_on_a_miss_without_calling_upstream() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let request = chat("only from the cache");
    let (status, headers, _) = gw
        .post(PATH, &request, &[("cache-control", "only-if-cached")])
        .await?;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(header(&headers, "x-strata-cache"), "MISS");
    assert_eq!(gw.upstream.calls(), 0);
    gw.post(PATH, &request, &[]).await?;
    let (status, headers, _) = gw
        .post(PATH, &request, &[("cache-control", "only-if-cached")])
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&headers, "x-strata-cache"), "HIT");
    assert_eq!(gw.upstream.calls(), 1);
    gw.stop().await
}

#[tokio::test]
async fn x_strata_ttl_sets_the_entrys_lifetime() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let request = chat("short-lived");
    gw.post(PATH, &request, &[("x-strata-ttl", "1")]).await?;
    let (_, headers, _) = gw.post(PATH, &request, &[]).await?;
    assert_eq!(header(&headers, "x-strata-cache"), "HIT");
    assert!(
        header(&headers, "cache-status").contains("ttl=0")
            || header(&headers, "cache-status").contains("ttl=1")
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (_, headers, _) = gw.post(PATH, &request, &[]).await?;
    assert_eq!(header(&headers, "x-strata-cache"), "MISS", "expired");
    let (status, _, body) = gw.post(PATH, &request, &[("x-strata-ttl", "soon")]).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("x-strata-ttl"), "{body}");
    gw.stop().await
}

#[tokio::test]
async fn x_strata_tags_are_invalidated_through_the_admin_api() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let (job, other) = (chat("job 42's summary"), chat("untagged"));
    gw.post(PATH, &job, &[("x-strata-tags", "jobs:42, team:search")])
        .await?;
    gw.post(PATH, &other, &[]).await?;
    let response = gw
        .client
        .post(gw.url("/admin/invalidate"))
        .json(&json!({"tag": "jobs"}))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let (_, headers, _) = gw.post(PATH, &job, &[]).await?;
    assert_eq!(
        header(&headers, "x-strata-cache"),
        "MISS",
        "`jobs` covers `jobs:42`"
    );
    let (_, headers, _) = gw.post(PATH, &other, &[]).await?;
    assert_eq!(
        header(&headers, "x-strata-cache"),
        "HIT",
        "untagged entry stays"
    );
    gw.stop().await
}

#[tokio::test]
async fn scope_headers_narrow_who_shares_an_answer() -> Result<()> {
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let request = chat("my own answer");
    let alice = [("x-strata-user", "alice")];
    gw.post(PATH, &request, &alice).await?;
    let (_, headers, _) = gw.post(PATH, &request, &alice).await?;
    assert_eq!(header(&headers, "x-strata-cache"), "HIT");
    let (_, headers, _) = gw.post(PATH, &request, &[("x-strata-user", "bob")]).await?;
    assert_eq!(header(&headers, "x-strata-cache"), "MISS", "another user");
    let (_, headers, _) = gw.post(PATH, &request, &[]).await?;
    assert_eq!(header(&headers, "x-strata-cache"), "MISS", "no user");
    let s1 = [("x-strata-user", "alice"), ("x-strata-session", "s1")];
    gw.post(PATH, &request, &s1).await?;
    let (_, headers, _) = gw
        .post(
            PATH,
            &request,
            &[("x-strata-user", "carol"), ("x-strata-session", "s1")],
        )
        .await?;
    assert_eq!(
        header(&headers, "x-strata-cache"),
        "MISS",
        "same session, other user"
    );
    let ns = [("x-strata-namespace", "team-a")];
    gw.post(PATH, &request, &ns).await?;
    let (_, headers, _) = gw
        .post(PATH, &request, &[("x-strata-namespace", "team-b")])
        .await?;
    assert_eq!(
        header(&headers, "x-strata-cache"),
        "MISS",
        "another namespace"
    );

    // Invalidation by user reaches the user's entries only.
    let response = gw
        .client
        .post(gw.url("/admin/invalidate"))
        .json(&json!({"user": "alice"}))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let (_, headers, _) = gw.post(PATH, &request, &alice).await?;
    assert_eq!(
        header(&headers, "x-strata-cache"),
        "MISS",
        "alice's entry is gone"
    );
    let (_, headers, _) = gw.post(PATH, &request, &[("x-strata-user", "bob")]).await?;
    assert_eq!(header(&headers, "x-strata-cache"), "HIT", "bob's stays");
    gw.stop().await
}
