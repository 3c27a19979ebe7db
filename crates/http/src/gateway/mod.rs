//! The LLM gateway: OpenAI- and Anthropic-shaped routes in front of their upstreams, answered
//! from the cache when it can, streams included.
//!
//! One request's path ([`cached`]):
//! 1. Read the body (up to `body_limit`), the controls and the identity; key the body with the
//!    engine's normalizer. A body that cannot be keyed is forwarded as it came (`BYPASS`).
//! 2. Unless `no-cache`: look the key up on every tier ([`TieredCache::find`]); a hit young
//!    enough for `max-age` is served in the shape asked for (`HIT`).
//! 3. Otherwise join the key's flight ([`flight`]): the first request starts the upstream call
//!    in a task of its own ([`call`]); later ones share it (`COALESCED`), streams included.
//! 4. The call's answer is stored when it is whole: a 2xx JSON body, or a stream that reached
//!    its terminal event. Non-2xx answers are passed on as they came and never stored.

pub mod controls;
pub mod flight;
pub mod identity;
pub mod record;
pub mod route;
pub mod upstream;

mod call;
mod respond;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use strata_analytics::Outcome;
use strata_tiers::TieredCache;
use tracing::Instrument;

use crate::config::ServerConfig;
use crate::error::HttpError;
use crate::metrics::Metrics;
use controls::{Controls, Disposition};
use flight::{Flights, Joined};
use identity::Identity;
use route::{LlmRoute, Provider};
use upstream::Upstream;

/// What every handler shares.
pub struct Shared {
    /// The cache.
    pub cache: TieredCache,
    /// The settings.
    pub config: ServerConfig,
    /// The upstream providers.
    pub upstream: Upstream,
    /// Upstream calls in flight.
    pub flights: Arc<Flights>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// The key of the credential hash.
    pub scope_key: [u8; 32],
    /// When the gateway started.
    pub started: Instant,
    /// Requests being answered now.
    pub in_flight: Arc<AtomicI64>,
    /// Requests answered since start.
    pub requests: AtomicU64,
    /// Upstream calls that failed since start.
    pub upstream_errors: AtomicU64,
    /// Set when the server begins to shut down: endless streams (the monitor) end then.
    pub closing: tokio::sync::watch::Sender<bool>,
    /// The reverse proxy of `[http]`, when it has upstreams.
    pub proxy: Option<crate::api::proxy::Proxy>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The gateway: a cache in front of the OpenAI and Anthropic APIs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    /// A gateway over `cache` with `config`. The credential hash's key is read from
    /// `scope_key_file`, else kept in the disk tier (made once), else random for this process.
    pub fn new(cache: TieredCache, config: ServerConfig) -> Result<Gateway, HttpError> {
        Gateway::with_http(cache, config, &crate::api::HttpConfig::default())
    }

    /// A gateway that also serves the reverse-proxy routes of `[http]`: its upstreams, behind
    /// the response cache with its policy.
    pub fn with_http(
        cache: TieredCache,
        config: ServerConfig,
        http: &crate::api::HttpConfig,
    ) -> Result<Gateway, HttpError> {
        let upstream = Upstream::new(&config)?;
        let scope_key = scope_key(&cache, &config)?;
        let in_flight = Arc::new(AtomicI64::new(0));
        let proxy = if http.is_empty() {
            None
        } else {
            let api =
                crate::api::ApiCache::new(cache.clone(), http.policy()?, http.limits(), scope_key);
            Some(crate::api::proxy::Proxy::new(api, &config, http)?)
        };
        let metrics = Metrics::new(
            cache.clone(),
            Arc::clone(&in_flight),
            proxy.as_ref().map(|p| p.api().clone()),
        );
        Ok(Gateway {
            shared: Arc::new(Shared {
                cache,
                config,
                upstream,
                flights: Arc::new(Flights::default()),
                metrics,
                scope_key,
                started: Instant::now(),
                in_flight,
                requests: AtomicU64::new(0),
                upstream_errors: AtomicU64::new(0),
                closing: tokio::sync::watch::Sender::new(false),
                proxy,
            }),
        })
    }

    /// What every handler shares.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The cache.
    pub fn cache(&self) -> &TieredCache {
        &self.shared.cache
    }

    /// The LLM routes (everything under `/v1/`), and the reverse-proxy routes of `[http]`
    /// for every other path.
    pub fn router(&self) -> Router {
        let router = Router::new().route("/v1/{*rest}", axum::routing::any(v1));
        let router = match &self.shared.proxy {
            Some(_) => router.fallback(proxied),
            None => router,
        };
        router.with_state(Arc::clone(&self.shared))
    }
}

/// The credential hash's key: from the configured file, else kept in the disk tier.
fn scope_key(cache: &TieredCache, config: &ServerConfig) -> Result<[u8; 32], HttpError> {
    if !config.scope_key_file.as_os_str().is_empty() {
        let path = &config.scope_key_file;
        let bytes = std::fs::read(path).map_err(|source| HttpError::Io {
            context: format!("[server] scope_key_file {}", path.display()),
            source,
        })?;
        if bytes.len() < 32 {
            return Err(HttpError::Config(format!(
                "[server] scope_key_file {}: at least 32 bytes are needed",
                path.display()
            )));
        }
        return Ok(blake3::derive_key("strata gateway scope key v1", &bytes));
    }
    let fresh: [u8; 32] = rand::random();
    let Some(disk) = cache.disk() else {
        return Ok(fresh);
    };
    let tree = disk.open_tree("http")?;
    let stored = tree
        .compare_and_swap(b"scope-key", None::<&[u8]>, Some(&fresh[..]))
        .map_err(|e| HttpError::Tier(strata_tiers::TierError::Storage(e.to_string())))?;
    match stored {
        Ok(()) => Ok(fresh),
        Err(current) => current
            .current
            .and_then(|v| <[u8; 32]>::try_from(&v[..]).ok())
            .ok_or_else(|| HttpError::Config("the disk tier's scope key is unreadable".into())),
    }
}

/// Counts a request being answered while it lives.
struct InFlight(Arc<AtomicI64>);

impl InFlight {
    fn new(counter: &Arc<AtomicI64>) -> Self {
        counter.fetch_add(1, Relaxed);
        InFlight(Arc::clone(counter))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

async fn v1(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let path = request.uri().path();
    let route = LlmRoute::ALL.into_iter().find(|r| r.path() == path);
    shared.requests.fetch_add(1, Relaxed);
    let _in_flight = InFlight::new(&shared.in_flight);
    if has_dot_segment(path) {
        // The upstream URL would resolve it, and could leave the base's path prefix.
        shared.metrics.request("passthrough", "error");
        let provider = Provider::of_other(path, request.headers());
        return error(
            provider,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "a path with `.` or `..` segments",
        );
    }
    match route {
        Some(route) if request.method() == Method::POST => {
            let span = tracing::info_span!(
                "request",
                route = route.label(),
                key = tracing::field::Empty
            );
            cached(shared, route, request).instrument(span).await
        }
        _ => respond::passthrough(shared, request).await,
    }
}

/// A request for the reverse proxy.
async fn proxied(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    shared.requests.fetch_add(1, Relaxed);
    let _in_flight = InFlight::new(&shared.in_flight);
    match &shared.proxy {
        Some(proxy) => proxy.serve(request).await,
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Whether a path has a `.` or `..` segment, written plainly or percent-encoded (which URL
/// parsers resolve alike).
pub(crate) fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|segment| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    })
}

/// An error in the provider's shape.
pub fn error(provider: Provider, status: StatusCode, kind: &str, message: &str) -> Response {
    let body = provider.error_body(kind, message);
    (status, axum::Json(body)).into_response()
}

/// One request to a cached route.
async fn cached(shared: Arc<Shared>, route: LlmRoute, request: Request) -> Response {
    let started = Instant::now();
    let provider = route.provider();
    let (parts, body) = request.into_parts();
    let body = match read_body(body, shared.config.body_limit.as_u64()).await {
        Ok(body) => body,
        Err(status) => {
            shared.metrics.request(route.label(), "error");
            let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!(
                    "request body over the gateway's limit of {}",
                    shared.config.body_limit
                )
            } else {
                "the request body could not be read".to_string()
            };
            return error(provider, status, "invalid_request_error", &message);
        }
    };
    let bad_request = |message: String| {
        shared.metrics.request(route.label(), "error");
        error(
            provider,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &message,
        )
    };
    let controls = match Controls::from_headers(&parts.headers) {
        Ok(c) => c,
        Err(message) => return bad_request(message),
    };
    let identity = match Identity::from_headers(
        &parts.headers,
        &shared.scope_key,
        shared.config.share_across_credentials,
    ) {
        Ok(i) => i,
        Err(message) => return bad_request(message),
    };
    let mut parsed: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let stream = parsed
        .as_ref()
        .and_then(|v| v.get("stream"))
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let context = identity::upstream_context(parts.uri.query(), &parts.headers, &shared.scope_key);
    let keyed = parsed.as_mut().and_then(|doc| {
        identity
            .into_key_document(route, doc, stream, &context)
            .then(|| shared.cache.key(doc, &identity.scope).ok())
            .flatten()
    });
    let Some(keyed) = keyed else {
        let model = parsed
            .as_ref()
            .and_then(|v| v.get("model"))
            .and_then(serde_json::Value::as_str)
            .unwrap_or("unknown");
        shared
            .cache
            .record_uncacheable(model, &identity.scope, started);
        tracing::info!(outcome = "uncacheable", "forwarded uncached");
        return respond::forward(&shared, route, &parts, body, Disposition::Bypass).await;
    };
    drop(parsed);
    let display_key = keyed.key.to_string();
    tracing::Span::current().record("key", display_key.as_str());
    let call = call::Call {
        route,
        headers: parts.headers,
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or(route.path().to_string(), |p| p.to_string()),
        body,
        keyed,
        controls,
        stream,
        started,
    };
    lookup_or_call(shared, call, display_key).await
}

/// Steps 2 and 3 of a cached request: the lookup, then the flight.
async fn lookup_or_call(shared: Arc<Shared>, call: call::Call, key: String) -> Response {
    let route = call.route;
    let mut refresh = call.controls.no_cache.then_some("request");
    if !call.controls.no_cache
        && let Some(lookup) = shared.cache.find(&call.keyed).await
    {
        let age = age_of(&lookup.entry);
        if call.controls.max_age.is_none_or(|max| age <= max) {
            if let Some(response) = respond::hit(&call, &lookup, &key) {
                shared.cache.record(
                    &call.keyed,
                    lookup.outcome,
                    Some(&lookup.entry),
                    call.started,
                );
                shared.metrics.request(route.label(), "hit");
                shared.metrics.lookup(route.label(), call.started.elapsed());
                tracing::info!(outcome = ?lookup.outcome, us = call.started.elapsed().as_micros() as u64, "hit");
                return response;
            }
        } else {
            refresh = Some("stale");
        }
    }
    if call.controls.only_if_cached {
        shared
            .cache
            .record(&call.keyed, Outcome::Miss, None, call.started);
        shared.metrics.request(route.label(), "miss");
        let mut response = error(
            route.provider(),
            StatusCode::GATEWAY_TIMEOUT,
            "not_cached",
            "only-if-cached: no cached answer",
        );
        Disposition::NotCached.apply(Some(&key), response.headers_mut());
        return response;
    }
    shared.metrics.lookup(route.label(), call.started.elapsed());
    let stores = !call.controls.no_store;
    let (response, disposition) = match shared.flights.join(&call.keyed, call.stream, stores) {
        Joined::Followed(subscription) => {
            // The call has ended and stored its answer, which is on its way to the tiers: a
            // hit, as a lookup a moment later finds it.
            if let Some(entry) = subscription
                .flight()
                .stored_entry()
                .filter(|e| !e.is_expired_at(chrono::Utc::now()))
                .filter(|e| shared.cache.epochs().admits(e))
            {
                let lookup = strata_tiers::Lookup {
                    entry,
                    outcome: Outcome::L1,
                };
                if let Some(response) = respond::hit(&call, &lookup, &key) {
                    shared.cache.record(
                        &call.keyed,
                        Outcome::L1,
                        Some(&lookup.entry),
                        call.started,
                    );
                    shared.metrics.request(route.label(), "hit");
                    return response;
                }
            }
            call::count_follower(&shared, &call.keyed, subscription.flight(), call.started);
            // The call is the leader's: its controls decide what is stored.
            let stored = subscription.flight().stores();
            tracing::info!(outcome = "coalesced", "joined a call in flight");
            let (route, stream) = (call.route, call.stream);
            let disposition = Disposition::Coalesced { stored };
            respond::from_flight(subscription, route, stream, disposition, &key).await
        }
        Joined::Led(subscription) => {
            let disposition = match refresh {
                Some(why) => Disposition::Refresh {
                    stored: stores,
                    why,
                },
                None => Disposition::Miss { stored: stores },
            };
            tracing::info!(outcome = disposition.result(), "calling upstream");
            let (route, stream) = (call.route, call.stream);
            // The task starts at once: a flight in the registry always has its call running.
            let flight = Arc::clone(subscription.flight());
            let look_again = refresh.is_none();
            let task = tokio::spawn(call::run(Arc::clone(&shared), flight, call, look_again));
            subscription.flight().run_by(task.abort_handle());
            respond::from_flight(subscription, route, stream, disposition, &key).await
        }
    };
    shared.metrics.request(route.label(), disposition.result());
    response
}

/// How long ago an entry was written.
fn age_of(entry: &strata_core::Entry) -> std::time::Duration {
    (chrono::Utc::now() - entry.created_at)
        .to_std()
        .unwrap_or_default()
}

/// Reads a body whole, up to `limit` bytes: 413 past it, 400 if it cannot be read.
async fn read_body(body: Body, limit: u64) -> Result<Bytes, StatusCode> {
    use http_body_util::BodyExt;
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(StatusCode::PAYLOAD_TOO_LARGE),
        Err(_) => Err(StatusCode::BAD_REQUEST),
    }
}

/// The headers of a response the gateway writes itself.
fn content_type(headers: &mut HeaderMap, stream: bool) {
    let value = if stream {
        "text/event-stream"
    } else {
        "application/json"
    };
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static(value),
    );
    if stream {
        headers.insert(
            axum::http::header::CACHE_CONTROL,
            axum::http::HeaderValue::from_static("no-cache"),
        );
    }
}
