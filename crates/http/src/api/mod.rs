//! Response caching for ordinary HTTP APIs, with one policy and two ways in:
//!
//! - [`CacheLayer`], a tower layer that Rust services (axum, hyper) wrap around their routes;
//! - reverse-proxy routes in `strata serve` ([`proxy`]), in front of a service in any language:
//!   the same layer around a service that forwards to the upstream.
//!
//! What a request goes through ([`ApiCache`]):
//! 1. The [`Policy`] classifies it: a read a route caches, a mutation whose rule invalidates
//!    tags after a 2xx answer, or neither (passed through untouched).
//! 2. A cached read is keyed on its route, method (`HEAD` shares `GET`'s entries), path,
//!    query, the route's `vary` headers, its body for `POST`, and its scope (a user's or a
//!    session's hashed identity; shared routes have none). Request `Cache-Control` is honoured.
//! 3. A fresh entry is a `HIT`; one past its TTL but within `stale_while_revalidate` is served
//!    `STALE` while one background call refreshes it. Otherwise the request joins the key's
//!    flight: one call to the service, whose answer every joined request shares when it may be
//!    stored (RFC 9111's rules for a shared cache), or serves stale within `stale_if_error`
//!    when the service answers 5xx or cannot be reached.
//! 4. Answers carry `ETag` (the service's, or the body's digest), `Age`, RFC 9211
//!    `Cache-Status` and `X-Cache`; `If-None-Match` / `If-Modified-Since` get a 304; bodies over
//!    `compress_min` are compressed by `Accept-Encoding` (each stored once, identity-encoded).

pub mod config;
pub mod encoding;
mod handle;
mod layer;
pub mod policy;
pub mod proxy;
pub mod stored;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use strata_core::epochs::Selector;
use strata_tiers::TieredCache;

pub use config::{HttpConfig, UpstreamConfig, WarmConfig};
pub use encoding::Encoding;
pub use layer::{CacheLayer, CacheService};
pub use policy::{InvalidateConfig, Policy, PolicyBuilder, RouteConfig, RouteScope};

use crate::error::HttpError;

/// `X-Strata-Tags`: tags a service gives its own answer (comma- or space-separated), in the
/// manner of `Surrogate-Key`. Read and removed.
pub const TAGS_HEADER: &str = "x-strata-tags";
/// `X-Cache`: `HIT`, `MISS`, `STALE` or `BYPASS`.
pub const X_CACHE: &str = "x-cache";
/// The provider name API entries record (reports group routes by it).
pub const PROVIDER: &str = strata_analytics::HTTP_PROVIDER;

/// Limits and knobs of an [`ApiCache`].
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bodies at least this long are compressed when the client accepts a coding.
    pub compress_min: usize,
    /// Largest answer stored; a longer one streams through uncached.
    pub body_limit: usize,
    /// Largest `POST` body read for a key (413 past it).
    pub request_body_limit: usize,
    /// Bytes of compressed variants kept in memory.
    pub variants_memory: u64,
    /// Bound on one call to the service, its answer read whole (the requests that joined it
    /// wait no longer; it is then a failure, which `stale_if_error` can answer).
    pub call_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            compress_min: 1024,
            body_limit: 8 << 20,
            request_body_limit: 1 << 20,
            variants_memory: 32 << 20,
            call_timeout: Duration::from_secs(60),
        }
    }
}

/// What one route did since start, for `/metrics`.
#[derive(Debug, Default)]
pub struct RouteCounters {
    /// Answered from a fresh entry.
    pub hits: AtomicU64,
    /// Answered from a stale entry (while revalidating, or because the service failed).
    pub stale: AtomicU64,
    /// Answered by the service (this request's call, or a call it joined).
    pub misses: AtomicU64,
    /// Passed through uncached (no identity, `Authorization` on an anonymous route,
    /// `no-store`, an answer too large).
    pub bypass: AtomicU64,
    /// Answers that were not stored (RFC 9111's rules, or the route's statuses).
    pub not_stored: AtomicU64,
    /// Body bytes sent from entries.
    pub bytes_served: AtomicU64,
    /// Microseconds of service time the cached answers saved (each: its call's time).
    pub saved_us: AtomicU64,
    /// Microseconds spent waiting for the service.
    pub upstream_us: AtomicU64,
    /// Entries refused as unreadable.
    pub corrupt: AtomicU64,
}

/// One route's counters, read at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSnapshot {
    /// The route's name.
    pub route: String,
    /// See [`RouteCounters`].
    pub hits: u64,
    /// See [`RouteCounters`].
    pub stale: u64,
    /// See [`RouteCounters`].
    pub misses: u64,
    /// See [`RouteCounters`].
    pub bypass: u64,
    /// See [`RouteCounters`].
    pub not_stored: u64,
    /// See [`RouteCounters`].
    pub bytes_served: u64,
    /// See [`RouteCounters`].
    pub saved_us: u64,
    /// See [`RouteCounters`].
    pub upstream_us: u64,
    /// See [`RouteCounters`].
    pub corrupt: u64,
}

/// The response cache: a [`TieredCache`], a [`Policy`], and what requests in flight share.
/// Cheap to clone; every clone is the same cache.
#[derive(Clone)]
pub struct ApiCache {
    inner: Arc<Inner>,
}

struct Inner {
    cache: TieredCache,
    policy: Policy,
    limits: Limits,
    scope_key: [u8; 32],
    flights: Mutex<HashMap<u128, handle::FlightRx>>,
    variants: moka::sync::Cache<(u128, i64, Encoding), Bytes>,
}

impl std::fmt::Debug for ApiCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiCache")
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

impl ApiCache {
    /// A response cache over `cache` with `policy`. `scope_key` keys the hash that turns a
    /// user's or session's identity into its scope (at least 32 random bytes; the gateway
    /// keeps one in the disk tier).
    pub fn new(
        cache: TieredCache,
        policy: Policy,
        limits: Limits,
        scope_key: [u8; 32],
    ) -> ApiCache {
        let variants = moka::sync::Cache::builder()
            .max_capacity(limits.variants_memory)
            .weigher(|_, v: &Bytes| u32::try_from(v.len() + 64).unwrap_or(u32::MAX))
            .build();
        ApiCache {
            inner: Arc::new(Inner {
                cache,
                policy,
                limits,
                scope_key: blake3::derive_key("strata api scope key v1", &scope_key),
                flights: Mutex::new(HashMap::new()),
                variants,
            }),
        }
    }

    /// The tower layer that caches a service's answers by this cache's policy.
    pub fn layer(&self) -> CacheLayer {
        CacheLayer::new(self.clone())
    }

    /// The engine.
    pub fn cache(&self) -> &TieredCache {
        &self.inner.cache
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// Invalidates every entry carrying one of `tags` (or a tag below one: `jobs` covers
    /// `jobs:42`), on every node that shares the bucket. For a service's own code, after a
    /// change its mutation rules do not describe.
    pub async fn invalidate_tags<I, T>(&self, tags: I) -> Result<(), HttpError>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        for tag in tags {
            self.inner
                .cache
                .invalidate(&Selector::Tag(tag.as_ref().to_string()))
                .await?;
        }
        Ok(())
    }

    /// Every route's counters.
    pub fn route_counters(&self) -> Vec<RouteSnapshot> {
        let mut out: Vec<RouteSnapshot> = self
            .inner
            .policy
            .routes()
            .iter()
            .map(|r| (r.name.clone(), &r.counters))
            .map(|(route, c)| RouteSnapshot {
                route,
                hits: c.hits.load(Relaxed),
                stale: c.stale.load(Relaxed),
                misses: c.misses.load(Relaxed),
                bypass: c.bypass.load(Relaxed),
                not_stored: c.not_stored.load(Relaxed),
                bytes_served: c.bytes_served.load(Relaxed),
                saved_us: c.saved_us.load(Relaxed),
                upstream_us: c.upstream_us.load(Relaxed),
                corrupt: c.corrupt.load(Relaxed),
            })
            .collect();
        out.sort_by(|a, b| a.route.cmp(&b.route));
        out
    }

    /// Identical requests whose service call is in flight now.
    pub fn flights_in_progress(&self) -> usize {
        self.inner.flights.lock().map(|f| f.len()).unwrap_or(0)
    }
}

/// Saturating microseconds.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
