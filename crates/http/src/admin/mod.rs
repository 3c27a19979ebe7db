//! The admin API under `/admin/`, and `/metrics`.
//!
//! Access needs `Authorization: Bearer {admin_token}`; with no token configured, only loopback
//! clients are answered. A bad selector or body gets a 400 with a one-line reason.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use strata_analytics::{GroupBy, ReportOptions};
use strata_core::{CacheKey, ModelSlug, Selector};
use strata_tiers::ReportSource;
use subtle::ConstantTimeEq;

use crate::gateway::Shared;
use crate::metrics::CONTENT_TYPE;

/// The live dashboard, one self-contained page.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Keys listed per page at most, and entries read per page at most.
const MAX_KEYS: usize = 1000;
const KEYS_BUDGET: usize = 20_000;

/// The admin routes (`/admin/…`) and `/metrics`, behind the admin check (`/metrics` is open:
/// its labels hold no request data).
pub fn router(shared: Arc<Shared>) -> Router {
    let admin = Router::new()
        .route("/admin", get(dashboard))
        .route("/admin/", get(dashboard))
        .route("/admin/health", get(health))
        .route("/admin/stats", get(stats))
        .route("/admin/report", get(report))
        .route("/admin/invalidate", post(invalidate))
        .route("/admin/clear", post(clear))
        .route("/admin/warm", post(warm))
        .route("/admin/keys", get(keys))
        .route("/admin/monitor", get(monitor))
        .route("/admin/audit", get(audit))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&shared),
            authorize,
        ));
    Router::new()
        .route("/metrics", get(metrics))
        .merge(admin)
        .with_state(shared)
}

/// A 400 (or other status) with a one-line reason, as JSON.
fn refuse(status: StatusCode, reason: impl std::fmt::Display) -> Response {
    let reason = reason.to_string().replace('\n', " ");
    (status, axum::Json(json!({ "error": reason }))).into_response()
}

/// Who a call of the admin API is, for the audit trail: the API, the name the caller gives in
/// `X-Strata-Actor` (if any), and where it came from.
#[derive(Debug, Clone)]
struct Actor(String);

async fn authorize(
    State(shared): State<Arc<Shared>>,
    mut request: Request,
    next: Next,
) -> Response {
    let allowed = match shared.config.admin_token.expose() {
        Some(token) => request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| bool::from(given.as_bytes().ct_eq(token.as_bytes()))),
        None => request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .is_some_and(|ConnectInfo(peer)| peer.ip().is_loopback()),
    };
    if allowed {
        if let Some(refusal) = refusal(&request, shared.config.admin_token.expose().is_none()) {
            return refusal;
        }
        let named = request
            .headers()
            .get("x-strata-actor")
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.trim()
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(64)
                    .collect::<String>()
            })
            .filter(|v| !v.is_empty());
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(peer)| peer.ip().to_string());
        let actor = match (named, peer) {
            (Some(name), Some(peer)) => format!("admin API: {name} from {peer}"),
            (Some(name), None) => format!("admin API: {name}"),
            (None, Some(peer)) => format!("admin API from {peer}"),
            (None, None) => "admin API".to_string(),
        };
        request.extensions_mut().insert(Actor(actor));
        return next.run(request).await;
    }
    let mut response = refuse(
        StatusCode::UNAUTHORIZED,
        "the admin API needs `Authorization: Bearer <admin_token>` ([server] admin_token, or STRATA_SERVER_ADMIN_TOKEN); without a token it answers loopback clients only",
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"strata admin\""),
    );
    response
}

/// Refuses what a web page elsewhere could make a browser send: a request its browser marks
/// cross-site, a POST that is not JSON (a page can send text or a form anywhere without
/// asking), and, without a token, a `Host` that is not a loopback name (DNS rebinding).
fn refusal(request: &Request, loopback_only: bool) -> Option<Response> {
    let headers = request.headers();
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if text("sec-fetch-site") == Some("cross-site") {
        return Some(refuse(
            StatusCode::FORBIDDEN,
            "the admin API does not answer cross-site requests",
        ));
    }
    if request.method() == axum::http::Method::POST
        && !text(header::CONTENT_TYPE.as_str())
            .is_some_and(|t| t.trim_start().starts_with("application/json"))
    {
        return Some(refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "admin POSTs take `Content-Type: application/json`",
        ));
    }
    if loopback_only {
        let host = text(header::HOST.as_str()).unwrap_or("");
        let name = match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        };
        let loopback = name.eq_ignore_ascii_case("localhost")
            || name
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Some(refuse(
                StatusCode::FORBIDDEN,
                "without an admin token the admin API answers requests to a loopback address only",
            ));
        }
    }
    None
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    shared.cache.memory().settle_counts().await;
    let mut response = shared.metrics.render().into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

/// Each tier's state: sizes, the S3 breaker and the outbox.
async fn tiers(shared: &Shared) -> Value {
    // moka counts what it holds in its housekeeping: bring the counts up to date first.
    shared.cache.memory().settle_counts().await;
    let (memory, disk) = shared.cache.usage();
    let s3 = shared.cache.l3().map(|l3| {
        let stats = l3.stats();
        json!({
            "breaker_open": l3.breaker_open(),
            "outbox": stats.pending,
            "outbox_bytes": stats.outbox_bytes,
            "parked": stats.parked,
            "dropped_for_space": stats.dropped_for_space,
            "uploaded": stats.uploaded,
            "upload_failures": stats.upload_failures,
            "dropped": stats.dropped,
            "node_id": l3.node_id(),
        })
    });
    json!({
        "memory": {"entries": memory.entries, "bytes": memory.bytes, "capacity": memory.capacity},
        "disk": disk.map(|d| json!({"entries": d.entries, "bytes": d.bytes, "capacity": d.capacity})),
        "s3": s3,
    })
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let tiers = tiers(&shared).await;
    let degraded = tiers["s3"]["breaker_open"].as_bool() == Some(true);
    let status = if degraded { "degraded" } else { "ok" };
    axum::Json(json!({
        "status": status,
        "uptime_s": shared.started.elapsed().as_secs(),
        "in_flight": shared.flights.len(),
        "tiers": tiers,
    }))
    .into_response()
}

/// One snapshot of the counters: what `/admin/stats` answers and `/admin/monitor` sends.
async fn snapshot(shared: &Shared) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let stats = shared.cache.stats();
    json!({
        "at": Utc::now(),
        "uptime_s": shared.started.elapsed().as_secs(),
        "hit_rate": stats.hit_rate(),
        "stats": stats,
        "lifetime": shared.cache.lifetime_stats(),
        "tiers": tiers(shared).await,
        "gateway": {
            "requests": shared.requests.load(Relaxed),
            "in_flight": shared.in_flight.load(Relaxed),
            "upstream_errors": shared.upstream_errors.load(Relaxed),
            "calls_in_flight": shared.flights.len(),
        },
    })
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(snapshot(&shared).await).into_response()
}

/// `GET /admin/monitor`: one snapshot a second, as server-sent events.
async fn monitor(State(shared): State<Arc<Shared>>) -> Response {
    let mut closing = shared.closing.subscribe();
    let closed = async move {
        let _ = closing.wait_for(|c| *c).await;
    };
    let ticks =
        futures::StreamExt::take_until(tokio_stream_interval(Duration::from_secs(1)), closed);
    let stream = futures::StreamExt::then(ticks, move |()| {
        let shared = Arc::clone(&shared);
        async move {
            let data = snapshot(&shared).await.to_string();
            Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(format!(
                "event: snapshot\ndata: {data}\n\n"
            )))
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// A stream that yields at once, then every `every`.
fn tokio_stream_interval(every: Duration) -> impl futures::Stream<Item = ()> {
    futures::stream::unfold(None::<tokio::time::Interval>, move |interval| async move {
        let mut interval = interval.unwrap_or_else(|| {
            let mut i = tokio::time::interval(every);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            i
        });
        interval.tick().await;
        Some(((), Some(interval)))
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportQuery {
    since: Option<String>,
    until: Option<String>,
    by: Option<String>,
    top: Option<usize>,
    all_nodes: Option<bool>,
}

/// A `since` parameter ([`parse_time`]), or the 400 that says what is wrong with it.
fn since_of(text: Option<&str>) -> Result<Option<DateTime<Utc>>, Box<Response>> {
    text.map(|t| parse_time(t, false))
        .transpose()
        .map_err(|reason| Box::new(refuse(StatusCode::BAD_REQUEST, format!("since {reason}"))))
}

/// A time given as RFC 3339, a day (`2026-11-24`, to its end for `until`), or a duration ago.
fn parse_time(text: &str, end_of_day: bool) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(day) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        let day = if end_of_day {
            day.succ_opt()
        } else {
            Some(day)
        };
        if let Some(t) = day.and_then(|d| d.and_hms_opt(0, 0, 0)) {
            return Ok(t.and_utc());
        }
    }
    humantime::parse_duration(text)
        .ok()
        .and_then(|ago| chrono::Duration::from_std(ago).ok())
        .and_then(|ago| Utc::now().checked_sub_signed(ago))
        .ok_or_else(|| {
            format!("`{text}`: expected an RFC 3339 time, YYYY-MM-DD or a duration such as 7d")
        })
}

async fn report(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<ReportQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "query: expected since, until, by (model|provider|day|hour), top, all_nodes",
        );
    };
    let options = (|| {
        let since = query
            .since
            .as_deref()
            .map(|t| parse_time(t, false))
            .transpose()?;
        let until = query
            .until
            .as_deref()
            .map(|t| parse_time(t, true))
            .transpose()?;
        if let (Some(s), Some(u)) = (since, until)
            && s >= u
        {
            return Err("since is not before until: the period is empty".to_string());
        }
        let group_by = match &query.by {
            Some(by) => by.parse::<GroupBy>().map_err(|e| format!("by: {e}"))?,
            None => GroupBy::default(),
        };
        Ok::<_, String>(ReportOptions {
            since,
            until,
            group_by,
            top: query.top.unwrap_or(10).min(1000),
        })
    })();
    let options = match options {
        Ok(o) => o,
        Err(reason) => return refuse(StatusCode::BAD_REQUEST, reason),
    };
    let source = ReportSource {
        all_nodes: query.all_nodes.unwrap_or(false),
        cold_after: None,
    };
    match shared.cache.report(&options, &source).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// `POST /admin/invalidate`: one selector.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidateBody {
    model: Option<String>,
    user: Option<String>,
    session: Option<String>,
    namespace: Option<String>,
    tag: Option<String>,
    key: Option<String>,
    pattern: Option<String>,
    older_than: Option<String>,
}

#[derive(Debug)]
enum What {
    Selector(Selector),
    Pattern(String),
}

impl InvalidateBody {
    fn what(self) -> Result<What, String> {
        let mut given = Vec::new();
        let nonempty = |name: &str, v: String| {
            if v.trim().is_empty() {
                Err(format!("{name} is empty"))
            } else {
                Ok(v)
            }
        };
        if let Some(v) = self.model {
            given.push(What::Selector(Selector::Model(nonempty("model", v)?)));
        }
        if let Some(v) = self.user {
            given.push(What::Selector(Selector::User(nonempty("user", v)?)));
        }
        if let Some(v) = self.session {
            given.push(What::Selector(Selector::Session(nonempty("session", v)?)));
        }
        if let Some(v) = self.namespace {
            given.push(What::Selector(Selector::Namespace(nonempty(
                "namespace",
                v,
            )?)));
        }
        if let Some(v) = self.tag {
            given.push(What::Selector(Selector::Tag(nonempty("tag", v)?)));
        }
        if let Some(v) = self.key {
            let key = CacheKey::parse(&v)
                .or_else(|| CacheKey::parse(&format!("x_{v}")))
                .ok_or_else(|| {
                    format!("key `{v}`: expected a display key (model_32hex) or 32 hex digits")
                })?;
            given.push(What::Selector(Selector::Key(key.hex())));
        }
        if let Some(v) = self.pattern {
            globset::Glob::new(&v).map_err(|e| format!("pattern `{v}`: {e}"))?;
            given.push(What::Pattern(v));
        }
        if let Some(v) = self.older_than {
            let age =
                humantime::parse_duration(&v).map_err(|e| format!("older_than `{v}`: {e}"))?;
            given.push(What::Selector(Selector::OlderThan(age)));
        }
        match given.len() {
            1 => given.pop().ok_or_else(|| "no selector".to_string()),
            0 => Err("give one selector: model, user, session, namespace, tag, key, pattern or older_than".into()),
            _ => Err("give one selector per call".into()),
        }
    }
}

/// The body of a POST as `T`, or a 400 that says what is wrong with it.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Box<Response>> {
    serde_json::from_slice(bytes)
        .map_err(|e| Box::new(refuse(StatusCode::BAD_REQUEST, format!("body: {e}"))))
}

async fn invalidate(
    State(shared): State<Arc<Shared>>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    bytes: axum::body::Bytes,
) -> Response {
    let what = match body::<InvalidateBody>(&bytes).map(InvalidateBody::what) {
        Ok(Ok(what)) => what,
        Ok(Err(reason)) => return refuse(StatusCode::BAD_REQUEST, reason),
        Err(response) => return *response,
    };
    let cache = &shared.cache.acting_as(actor);
    let done = match &what {
        What::Pattern(glob) => cache.invalidate_pattern(glob, |_| {}).await,
        What::Selector(selector) => {
            let estimate = if matches!(selector, Selector::Key(_)) {
                None
            } else {
                cache.estimate(selector).await.ok()
            };
            cache.invalidate(selector).await.map(|mut inv| {
                if let Some(n) = estimate {
                    inv.affected = n;
                }
                inv
            })
        }
    };
    match done {
        Ok(inv) => {
            tracing::info!(what = %inv.what, affected = inv.affected, "invalidated through the admin API");
            axum::Json(json!({
                "invalidated": inv.what,
                "affected": inv.affected,
                "exact": inv.exact,
                "published": inv.published,
            }))
            .into_response()
        }
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClearBody {
    confirm: bool,
}

async fn clear(
    State(shared): State<Arc<Shared>>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    bytes: axum::body::Bytes,
) -> Response {
    match body::<ClearBody>(&bytes) {
        Ok(ClearBody { confirm: true }) => {}
        Ok(_) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "clear empties every tier: send {\"confirm\": true}",
            );
        }
        Err(response) => return *response,
    }
    match shared.cache.acting_as(actor).clear().await {
        Ok(inv) => {
            tracing::warn!(entries = inv.affected, "cleared through the admin API");
            axum::Json(json!({"cleared": inv.affected, "published": inv.published})).into_response()
        }
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WarmBody {
    model: Option<String>,
    since: Option<String>,
    /// API URLs to fetch through the response cache (paths, or `{"url", "headers"}`).
    urls: Option<Vec<WarmUrl>>,
}

/// A URL to warm: a path, or a path with headers.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum WarmUrl {
    Path(String),
    With(crate::api::WarmConfig),
}

async fn warm(State(shared): State<Arc<Shared>>, bytes: axum::body::Bytes) -> Response {
    let request = match body::<WarmBody>(&bytes) {
        Ok(b) => b,
        Err(response) => return *response,
    };
    if let Some(urls) = request.urls {
        if request.model.is_some() || request.since.is_some() {
            return refuse(
                StatusCode::BAD_REQUEST,
                "`urls` warms API routes; `model` and `since` warm LLM entries from S3: one at a time",
            );
        }
        let Some(proxy) = &shared.proxy else {
            return refuse(
                StatusCode::CONFLICT,
                "no [[http.upstreams]] to warm URLs through",
            );
        };
        let urls: Vec<crate::api::WarmConfig> = urls
            .into_iter()
            .map(|u| match u {
                WarmUrl::Path(url) => crate::api::WarmConfig {
                    url,
                    headers: Default::default(),
                },
                WarmUrl::With(config) => config,
            })
            .collect();
        let outcome = proxy.warm(&urls, true).await;
        return axum::Json(outcome).into_response();
    }
    let since = match since_of(request.since.as_deref()) {
        Ok(s) => s,
        Err(response) => return *response,
    };
    let cache = &shared.cache;
    let (Some(l3), Some(disk)) = (cache.l3(), cache.disk()) else {
        return refuse(
            StatusCode::CONFLICT,
            "warm pulls entries from S3 into the disk tier: enable both",
        );
    };
    if let Err(e) = cache.refresh_epochs().await {
        tracing::warn!(error = %e, "invalidations from other nodes unknown; warming with this node's");
    }
    let slug = request
        .model
        .as_deref()
        .map(|m| ModelSlug::new(&cache.normalizer().model_name(m)));
    let epochs = cache.epochs();
    let report = l3
        .warm(
            disk,
            slug.as_ref().map(ModelSlug::as_str),
            since,
            |entry| epochs.admits(entry),
            |_| {},
        )
        .await;
    match report {
        Ok(r) => axum::Json(json!({
            "matched": r.matched, "warmed": r.warmed, "held": r.held, "expired": r.expired,
            "invalidated": r.invalidated, "failed": r.failed,
        }))
        .into_response(),
        Err(e) => refuse(StatusCode::BAD_GATEWAY, e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    since: Option<String>,
}

/// `GET /admin/audit?since=7d`: this node's audit trail, oldest first.
async fn audit(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return refuse(StatusCode::BAD_REQUEST, "query: expected since");
    };
    let since = match since_of(query.since.as_deref()) {
        Ok(s) => s,
        Err(response) => return *response,
    };
    match shared.cache.audit_trail(since) {
        Ok(trail) => axum::Json(json!({ "records": trail })).into_response(),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysQuery {
    pattern: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /admin/keys`: the disk tier's entries in digest order, a page at a time.
async fn keys(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<KeysQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "query: expected pattern, limit, cursor",
        );
    };
    let matcher = match query.pattern.as_deref().filter(|p| !p.is_empty()) {
        Some(p) => match globset::Glob::new(p) {
            Ok(g) => Some(g.compile_matcher()),
            Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("pattern `{p}`: {e}")),
        },
        None => None,
    };
    let after = match query.cursor.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => match u128::from_str_radix(c, 16) {
            Ok(id) if c.len() == 32 => Some(id),
            _ => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    format!("cursor `{c}`: not a cursor"),
                );
            }
        },
        None => None,
    };
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_KEYS);
    let Some(disk) = shared.cache.disk().cloned() else {
        return axum::Json(json!({"keys": [], "next_cursor": null})).into_response();
    };
    let page = tokio::task::spawn_blocking(move || {
        disk.page(after, limit, KEYS_BUDGET, |entry| {
            matcher
                .as_ref()
                .is_none_or(|m| m.is_match(&entry.cache_key))
        })
    })
    .await;
    match page {
        Ok(Ok((entries, next))) => {
            let keys: Vec<Value> = entries
                .iter()
                .map(|e| {
                    json!({
                        "key": e.cache_key, "model": e.model, "provider": e.provider,
                        "scope": e.scope.kind(), "created_at": e.created_at,
                        "expires_at": e.expires_at, "tags": e.tags,
                        "bytes": e.weight(), "cost_usd": e.cost.total,
                    })
                })
                .collect();
            axum::Json(json!({
                "keys": keys,
                "next_cursor": next.map(|id| format!("{id:032x}")),
            }))
            .into_response()
        }
        Ok(Err(e)) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_selector_per_call() {
        let parse = |text: &str| {
            serde_json::from_str::<InvalidateBody>(text)
                .map_err(|e| e.to_string())
                .and_then(InvalidateBody::what)
        };
        assert!(matches!(
            parse(r#"{"model": "gpt-4o"}"#),
            Ok(What::Selector(Selector::Model(m))) if m == "gpt-4o"
        ));
        assert!(matches!(
            parse(r#"{"older_than": "3d"}"#),
            Ok(What::Selector(Selector::OlderThan(d))) if d.as_secs() == 3 * 86400
        ));
        assert!(parse("{}").unwrap_err().contains("give one selector"));
        assert!(parse(r#"{"model": "a", "tag": "b"}"#).is_err());
        assert!(parse(r#"{"key": "nope"}"#).unwrap_err().contains("key"));
        assert!(parse(r#"{"modle": "a"}"#).is_err());
        assert!(parse(r#"{"pattern": "a[" }"#).is_err());
    }

    #[test]
    fn times_are_read_in_three_forms() {
        assert!(parse_time("2026-11-24T12:00:00Z", false).is_ok());
        let day_end = parse_time("2026-11-24", true).unwrap();
        assert_eq!(day_end.to_rfc3339(), "2026-11-25T00:00:00+00:00");
        assert!(parse_time("2h", false).unwrap() < Utc::now());
        assert!(parse_time("yesterday-ish", false).is_err());
    }
}
