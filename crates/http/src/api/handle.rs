//! One request through the response cache: classify, key, look up, share a call, store,
//! answer. See the module documentation of [`crate::api`].

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header,
};
use bytes::{Bytes, BytesMut};
use headers::{CacheControl, HeaderMapExt};
use http_body_util::BodyExt;
use strata_analytics::Outcome;
use strata_core::{CacheKey, Entry, Keyed, Scope};
use strata_tiers::Completion;
use tokio::sync::watch;
use tower::{Service, ServiceExt};

use super::encoding::{self, Encoding};
use super::policy::{Matched, Params, Route, RouteScope};
use super::stored::{Stored, is_entity_tag};
use super::{ApiCache, RouteCounters, TAGS_HEADER, X_CACHE, micros};

/// An error a body can give.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a flight hands to the requests that joined it: the stored answer, or `None` when the
/// answer may not be shared (not storable, too large, the call failed) and each must call
/// the service itself.
pub(super) type FlightRx = watch::Receiver<Option<Option<Arc<Fetched>>>>;

/// An answer a flight stored.
#[derive(Debug)]
pub(super) struct Fetched {
    stored: Stored,
    entry: Arc<Entry>,
}

/// What the request asks for.
#[derive(Debug, Default)]
struct Asked {
    head: bool,
    encoding: Option<Encoding>,
    no_store: bool,
    no_cache: bool,
    max_age: Option<Duration>,
    only_if_cached: bool,
    if_none_match: Option<HeaderValue>,
    if_modified_since: Option<headers::IfModifiedSince>,
}

impl Asked {
    fn of(parts: &Parts) -> Asked {
        let mut asked = Asked {
            head: parts.method == Method::HEAD,
            encoding: Some(Encoding::negotiate(&parts.headers)),
            if_none_match: parts.headers.get(header::IF_NONE_MATCH).cloned(),
            if_modified_since: parts.headers.typed_get(),
            ..Asked::default()
        };
        if let Some(cc) = parts.headers.typed_get::<CacheControl>() {
            asked.no_store = cc.no_store();
            asked.no_cache = cc.no_cache();
            asked.max_age = cc.max_age();
            asked.only_if_cached = cc.only_if_cached();
        }
        asked
    }
}

/// Why a stale answer is served.
#[derive(Debug, Clone, Copy)]
enum StaleWhy {
    Revalidating,
    /// The service answered this 5xx, or (`None`) could not be reached.
    Error(Option<StatusCode>),
}

/// What the cache did: `X-Cache`, `Cache-Status` (RFC 9211) and `Age`.
#[derive(Debug, Clone, Copy)]
enum Status {
    Hit {
        age: Duration,
        left: Duration,
    },
    Stale {
        age: Duration,
        over: Duration,
        why: StaleWhy,
    },
    Miss {
        stored: bool,
        collapsed: bool,
        fwd: &'static str,
        code: StatusCode,
        detail: Option<&'static str>,
    },
    Bypass(&'static str),
    NotCached,
}

impl Status {
    fn apply(self, headers: &mut HeaderMap) {
        let (word, status) = match self {
            Status::Hit { left, .. } => ("HIT", format!("strata; hit; ttl={}", left.as_secs())),
            Status::Stale { over, why, .. } => {
                let over = over.as_secs().max(1);
                let detail = match why {
                    StaleWhy::Revalidating => {
                        format!("strata; hit; ttl=-{over}; detail=stale-while-revalidate")
                    }
                    StaleWhy::Error(Some(code)) => format!(
                        "strata; hit; ttl=-{over}; fwd=stale; fwd-status={}; detail=stale-if-error",
                        code.as_u16()
                    ),
                    StaleWhy::Error(None) => {
                        format!("strata; hit; ttl=-{over}; fwd=stale; detail=stale-if-error")
                    }
                };
                ("STALE", detail)
            }
            Status::Miss {
                stored,
                collapsed,
                fwd,
                code,
                detail,
            } => {
                let mut s = format!("strata; fwd={fwd}; fwd-status={}", code.as_u16());
                if collapsed {
                    s.push_str("; collapsed");
                }
                if stored {
                    s.push_str("; stored");
                }
                if let Some(detail) = detail {
                    s.push_str("; detail=");
                    s.push_str(detail);
                }
                ("MISS", s)
            }
            Status::Bypass(why) => ("BYPASS", format!("strata; fwd=bypass; detail={why}")),
            Status::NotCached => (
                "MISS",
                "strata; fwd=miss; detail=only-if-cached".to_string(),
            ),
        };
        if let Ok(v) = HeaderValue::try_from(status) {
            headers.insert(HeaderName::from_static("cache-status"), v);
        }
        headers.insert(
            HeaderName::from_static(X_CACHE),
            HeaderValue::from_static(word),
        );
        if let Status::Hit { age, .. } | Status::Stale { age, .. } = self {
            headers.insert(header::AGE, HeaderValue::from(age.as_secs()));
        }
    }
}

/// A call's answer: whole, or too long to hold (streamed through, never stored).
enum Called {
    Whole {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        took: Duration,
    },
    Long(Response<Body>),
    /// The body broke off.
    Broken(BoxError),
}

/// How a flight ends: handed to the requests that joined, and the key's slot freed.
pub(super) struct Leader {
    cache: ApiCache,
    id: u128,
    tx: Option<watch::Sender<Option<Option<Arc<Fetched>>>>>,
    /// A receiver of this flight's channel: the slot is freed only while it is still this one.
    own: Option<FlightRx>,
}

impl Leader {
    fn finish(mut self, fetched: Option<Arc<Fetched>>) {
        if let Some(tx) = self.tx.take() {
            tx.send_replace(Some(fetched));
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if let Some(own) = &self.own
            && let Ok(mut flights) = self.cache.inner.flights.lock()
            && flights.get(&self.id).is_some_and(|rx| rx.same_channel(own))
        {
            flights.remove(&self.id);
        }
        // A leader dropped without an answer (its request was cancelled) closes the channel:
        // the followers call the service themselves.
    }
}

enum Joined {
    Lead(Leader),
    Follow(FlightRx),
}

/// Calls a service once it is ready, with its body made an axum body.
async fn call<S, RB>(svc: S, request: Request<Body>) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<RB>>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let response = svc.oneshot(request).await?;
    Ok(response.map(Body::new))
}

/// Reads a body up to `limit` bytes.
async fn collect(body: Body, limit: usize) -> Result<Result<Bytes, Body>, BoxError> {
    let mut body = body;
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Box::new(e) as BoxError)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buf.len() + data.len() > limit {
            let head = buf.freeze();
            let rest = futures::stream::iter([Ok::<Bytes, axum::Error>(head), Ok(data)])
                .chain(body.into_data_stream());
            return Ok(Err(Body::from_stream(rest)));
        }
        buf.extend_from_slice(&data);
    }
    Ok(Ok(buf.freeze()))
}

use futures::StreamExt as _;

/// Headers that do not go to the service on a cached route's call: strata answers the
/// conditionals itself, and asks for an identity body it compresses itself.
const NOT_FORWARDED: [HeaderName; 6] = [
    // A range of the answer is not what the entry stores (and without its `If-Range` it
    // could splice new bytes onto an old copy): the whole answer is asked for.
    header::RANGE,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
];

impl ApiCache {
    /// Serves one request through `svc`.
    pub(super) async fn handle<S, RB>(
        &self,
        svc: S,
        request: Request<Body>,
    ) -> Result<Response<Body>, S::Error>
    where
        S: Service<Request<Body>, Response = Response<RB>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: Send,
        RB: http_body::Body<Data = Bytes> + Send + 'static,
        RB::Error: Into<BoxError>,
    {
        match self
            .inner
            .policy
            .classify(request.method(), request.uri().path())
        {
            Matched::Pass => call(svc, request).await,
            Matched::Mutation(tags) => {
                let mut response = call(svc, request).await?;
                response.headers_mut().remove(TAGS_HEADER);
                if response.status().is_success()
                    && let Err(e) = self.invalidate_tags(&tags).await
                {
                    tracing::warn!(error = %e, ?tags, "a mutation's tags could not be invalidated");
                }
                Ok(response)
            }
            Matched::Cached(route, params) => {
                let route = Arc::clone(route);
                self.cached(svc, route, params, request).await
            }
        }
    }

    async fn cached<S, RB>(
        &self,
        svc: S,
        route: Arc<Route>,
        params: Params,
        request: Request<Body>,
    ) -> Result<Response<Body>, S::Error>
    where
        S: Service<Request<Body>, Response = Response<RB>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: Send,
        RB: http_body::Body<Data = Bytes> + Send + 'static,
        RB::Error: Into<BoxError>,
    {
        let started = Instant::now();
        let counters = &route.counters;
        let (parts, body) = request.into_parts();
        let asked = Asked::of(&parts);
        let scope = match self.scope_of(&route, &parts.headers) {
            Ok(scope) => scope,
            Err(why) => return self.bypass(svc, &route, parts, body, why).await,
        };
        if asked.no_store {
            return self.bypass(svc, &route, parts, body, "no-store").await;
        }
        let body = if parts.method == Method::POST {
            match collect(body, self.inner.limits.request_body_limit).await {
                Ok(Ok(bytes)) => Some(bytes),
                Ok(Err(_)) => {
                    return Ok(plain(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "request body over the cache's limit",
                    ));
                }
                Err(_) => {
                    return Ok(plain(
                        StatusCode::BAD_REQUEST,
                        "the request body could not be read",
                    ));
                }
            }
        } else {
            None
        };
        let keyed = key(&route, &parts, body.as_ref(), scope);
        let mut stale: Option<(Arc<Entry>, Stored)> = None;
        let mut fwd = "miss";
        if asked.no_cache {
            fwd = "request";
        } else if let Some(lookup) = self.inner.cache.find(&keyed).await {
            match Stored::from_json(lookup.entry.response.get()) {
                Err(e) => {
                    counters.corrupt.fetch_add(1, Relaxed);
                    tracing::warn!(route = %route.name, error = %e, "an unreadable API entry: a miss");
                }
                Ok(stored) => {
                    let age = age_of(&lookup.entry);
                    let young_enough = asked.max_age.is_none_or(|max| age <= max);
                    if age < route.ttl && young_enough {
                        self.served(
                            &route,
                            &keyed,
                            &lookup.entry,
                            lookup.outcome,
                            false,
                            started,
                        );
                        let status = Status::Hit {
                            age,
                            left: route.ttl - age,
                        };
                        return Ok(self.answer(
                            &route,
                            &asked,
                            Some(&lookup.entry),
                            &stored,
                            status,
                        ));
                    }
                    let over = age.saturating_sub(route.ttl);
                    if !young_enough {
                        fwd = "stale";
                    } else if over < route.stale_while_revalidate {
                        self.served(&route, &keyed, &lookup.entry, lookup.outcome, true, started);
                        self.revalidate(
                            svc,
                            &route,
                            &params,
                            &parts,
                            body,
                            &keyed,
                            lookup.entry.created_at,
                        );
                        let why = StaleWhy::Revalidating;
                        let status = Status::Stale { age, over, why };
                        return Ok(self.answer(
                            &route,
                            &asked,
                            Some(&lookup.entry),
                            &stored,
                            status,
                        ));
                    } else {
                        fwd = "stale";
                        if over < route.stale_if_error {
                            stale = Some((lookup.entry, stored));
                        }
                    }
                }
            }
        }
        if asked.only_if_cached {
            self.inner
                .cache
                .record(&keyed, Outcome::Miss, None, started);
            counters.misses.fetch_add(1, Relaxed);
            let mut response = plain(
                StatusCode::GATEWAY_TIMEOUT,
                "only-if-cached: nothing cached",
            );
            Status::NotCached.apply(response.headers_mut());
            return Ok(response);
        }
        let leader = match self.join(keyed.key.id()) {
            Joined::Lead(leader) => Some(leader),
            Joined::Follow(mut rx) => {
                let landed = rx
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|v| v.clone())
                    .flatten()
                    // An invalidation made while the call ran (a mutation that answered since)
                    // refuses its answer here too: this request then calls on its own.
                    .filter(|f| self.inner.cache.epochs().admits(&f.entry));
                if let Some(fetched) = landed {
                    self.inner.cache.record(
                        &keyed,
                        Outcome::Coalesced,
                        Some(&fetched.entry),
                        started,
                    );
                    counters.misses.fetch_add(1, Relaxed);
                    let status = Status::Miss {
                        stored: true,
                        collapsed: true,
                        fwd,
                        code: fetched.stored.status,
                        detail: None,
                    };
                    return Ok(self.answer(
                        &route,
                        &asked,
                        Some(&fetched.entry),
                        &fetched.stored,
                        status,
                    ));
                }
                // Not shareable: this request calls the service itself, outside any flight.
                None
            }
        };
        let as_of = self.inner.cache.epochs().snapshot();
        let fetched_at = chrono::Utc::now();
        let upstream = upstream_request(&parts, body.clone().map_or_else(Body::empty, Body::from));
        let called = match self.call_service(svc, upstream, counters).await {
            Ok(called) => called,
            Err(e) => {
                return match stale {
                    Some((entry, stored)) => Ok(
                        self.serve_stale(&route, &asked, &keyed, &entry, &stored, None, started)
                    ),
                    None => Err(e),
                };
            }
        };
        let (status, headers, bytes, took) = match called {
            Called::Whole {
                status,
                headers,
                body,
                took,
            } => (status, headers, body, took),
            Called::Long(response) => {
                counters.bypass.fetch_add(1, Relaxed);
                let mut response = response;
                for name in crate::gateway::upstream::HOP_BY_HOP {
                    response.headers_mut().remove(name);
                }
                response.headers_mut().remove(TAGS_HEADER);
                Status::Bypass("too-large").apply(response.headers_mut());
                return Ok(response);
            }
            Called::Broken(e) => {
                tracing::warn!(route = %route.name, error = %e, "the service's answer broke off");
                if let Some((entry, stored)) = stale {
                    return Ok(
                        self.serve_stale(&route, &asked, &keyed, &entry, &stored, None, started)
                    );
                }
                return Ok(plain(
                    StatusCode::BAD_GATEWAY,
                    "the service's answer broke off",
                ));
            }
        };
        if status.is_server_error()
            && let Some((entry, stored)) = stale
        {
            return Ok(self.serve_stale(
                &route,
                &asked,
                &keyed,
                &entry,
                &stored,
                Some(status),
                started,
            ));
        }
        counters.misses.fetch_add(1, Relaxed);
        match storable(&route, status, &headers) {
            Ok(()) => {
                let stored = Stored::new(status, &headers, bytes);
                let entry = self
                    .store(
                        &route, &params, &keyed, &stored, &headers, took, fetched_at, &as_of,
                    )
                    .await;
                self.inner
                    .cache
                    .record(&keyed, Outcome::Miss, Some(&entry), started);
                let fetched = Arc::new(Fetched { stored, entry });
                if let Some(leader) = leader {
                    leader.finish(Some(Arc::clone(&fetched)));
                }
                let status = Status::Miss {
                    stored: true,
                    collapsed: false,
                    fwd,
                    code: status,
                    detail: None,
                };
                let mut response = self.answer(
                    &route,
                    &asked,
                    Some(&fetched.entry),
                    &fetched.stored,
                    status,
                );
                // A per-user route stores an answer without its cookies; this request, whose
                // call it was, gets them.
                for cookie in headers.get_all(header::SET_COOKIE) {
                    response
                        .headers_mut()
                        .append(header::SET_COOKIE, cookie.clone());
                }
                Ok(response)
            }
            Err(why) => {
                if let Some(leader) = leader {
                    leader.finish(None);
                }
                counters.not_stored.fetch_add(1, Relaxed);
                self.inner
                    .cache
                    .record(&keyed, Outcome::Miss, None, started);
                let passed = Stored::passing(status, &headers, bytes);
                let status = Status::Miss {
                    stored: false,
                    collapsed: false,
                    fwd,
                    code: status,
                    detail: Some(why),
                };
                Ok(self.answer(&route, &asked, None, &passed, status))
            }
        }
    }

    /// Counts an answer served from an entry (fresh, or `stale`): for the reports and the
    /// route's counters, with the service time it saved.
    fn served(
        &self,
        route: &Route,
        keyed: &Keyed,
        entry: &Arc<Entry>,
        outcome: Outcome,
        stale: bool,
        started: Instant,
    ) {
        self.inner
            .cache
            .record(keyed, outcome, Some(entry), started);
        let counters = &route.counters;
        let counter = if stale {
            &counters.stale
        } else {
            &counters.hits
        };
        counter.fetch_add(1, Relaxed);
        counters
            .saved_us
            .fetch_add(entry.latency_ms.saturating_mul(1000), Relaxed);
    }

    /// Answers with a stale entry because the service failed.
    #[allow(clippy::too_many_arguments)]
    fn serve_stale(
        &self,
        route: &Route,
        asked: &Asked,
        keyed: &Keyed,
        entry: &Arc<Entry>,
        stored: &Stored,
        code: Option<StatusCode>,
        started: Instant,
    ) -> Response<Body> {
        self.served(route, keyed, entry, Outcome::L1, true, started);
        let age = age_of(entry);
        let over = age.saturating_sub(route.ttl);
        let status = Status::Stale {
            age,
            over,
            why: StaleWhy::Error(code),
        };
        self.answer(route, asked, Some(entry), stored, status)
    }

    /// A request the route cannot cache: passed through, marked.
    async fn bypass<S, RB>(
        &self,
        svc: S,
        route: &Route,
        parts: Parts,
        body: Body,
        why: &'static str,
    ) -> Result<Response<Body>, S::Error>
    where
        S: Service<Request<Body>, Response = Response<RB>>,
        RB: http_body::Body<Data = Bytes> + Send + 'static,
        RB::Error: Into<BoxError>,
    {
        route.counters.bypass.fetch_add(1, Relaxed);
        let mut response = call(svc, Request::from_parts(parts, body)).await?;
        response.headers_mut().remove(TAGS_HEADER);
        Status::Bypass(why).apply(response.headers_mut());
        Ok(response)
    }

    /// Takes the key's slot, or joins the flight that holds it.
    fn join(&self, id: u128) -> Joined {
        let Ok(mut flights) = self.inner.flights.lock() else {
            // A poisoned registry: no sharing, each request calls alone.
            return Joined::Lead(Leader {
                cache: self.clone(),
                id: 0,
                tx: None,
                own: None,
            });
        };
        if let Some(rx) = flights.get(&id)
            && rx.has_changed().is_ok()
        {
            return Joined::Follow(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        flights.insert(id, rx.clone());
        Joined::Lead(Leader {
            cache: self.clone(),
            id,
            tx: Some(tx),
            own: Some(rx),
        })
    }

    /// Calls the service and reads its answer (up to `body_limit`).
    async fn call_service<S, RB>(
        &self,
        svc: S,
        request: Request<Body>,
        counters: &RouteCounters,
    ) -> Result<Called, S::Error>
    where
        S: Service<Request<Body>, Response = Response<RB>>,
        RB: http_body::Body<Data = Bytes> + Send + 'static,
        RB::Error: Into<BoxError>,
    {
        let started = Instant::now();
        let limit = self.inner.limits.body_limit;
        // Bounded: requests that joined the call wait on it, and a refresh holds the key's slot.
        let whole = tokio::time::timeout(self.inner.limits.call_timeout, async {
            let response = call(svc, request).await?;
            let (parts, body) = response.into_parts();
            Ok(match collect(body, limit).await {
                Ok(Ok(body)) => Called::Whole {
                    status: parts.status,
                    headers: parts.headers,
                    body,
                    took: started.elapsed(),
                },
                Ok(Err(body)) => Called::Long(Response::from_parts(parts, body)),
                Err(e) => Called::Broken(e),
            })
        })
        .await;
        let called = match whole {
            Ok(called) => called?,
            Err(_) => Called::Broken(
                format!(
                    "the service did not answer within {:?} (call_timeout)",
                    self.inner.limits.call_timeout
                )
                .into(),
            ),
        };
        counters
            .upstream_us
            .fetch_add(micros(started.elapsed()), Relaxed);
        Ok(called)
    }

    /// Stores an answer (and hands back its entry).
    #[allow(clippy::too_many_arguments)]
    async fn store(
        &self,
        route: &Route,
        params: &Params,
        keyed: &Keyed,
        stored: &Stored,
        headers: &HeaderMap,
        took: Duration,
        fetched_at: chrono::DateTime<chrono::Utc>,
        as_of: &strata_core::Epochs,
    ) -> Arc<Entry> {
        let mut tags: Vec<String> = route.tags.iter().map(|t| t.expand(params)).collect();
        tags.extend(service_tags(headers));
        tags.sort();
        tags.dedup();
        let completion = Completion::from_value(&stored.to_json())
            .provider(super::PROVIDER)
            .cost_usd(0.0)
            .latency_ms(u64::try_from(took.as_millis()).unwrap_or(u64::MAX))
            .tags(tags)
            .ttl(route.keep_for())
            .fetched_at(fetched_at);
        let entry = self.inner.cache.entry_for(keyed, completion, as_of).await;
        self.inner.cache.store_entry(keyed, &entry).await;
        entry
    }

    /// Starts one background call that refreshes a stale entry, unless one is running.
    #[allow(clippy::too_many_arguments)]
    fn revalidate<S, RB>(
        &self,
        svc: S,
        route: &Arc<Route>,
        params: &Params,
        parts: &Parts,
        body: Option<Bytes>,
        keyed: &Keyed,
        stale_created: chrono::DateTime<chrono::Utc>,
    ) where
        S: Service<Request<Body>, Response = Response<RB>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: Send,
        RB: http_body::Body<Data = Bytes> + Send + 'static,
        RB::Error: Into<BoxError>,
    {
        let cache = self.clone();
        let route = Arc::clone(route);
        let params = params.clone();
        let keyed = keyed.clone();
        let request = upstream_request(parts, body.map_or_else(Body::empty, Body::from));
        // The slot is taken here, before the task starts: of the stale requests that arrive
        // together, one refreshes and the others find the slot taken.
        let Joined::Lead(leader) = self.join(keyed.key.id()) else {
            return;
        };
        let seen = stale_created;
        tokio::spawn(async move {
            // A refresh that ended between this request's lookup and now stored a newer copy.
            if cache
                .inner
                .cache
                .find_in_memory(&keyed)
                .await
                .is_some_and(|entry| entry.created_at > seen)
            {
                return;
            }
            let as_of = cache.inner.cache.epochs().snapshot();
            let fetched_at = chrono::Utc::now();
            let Ok(Called::Whole {
                status,
                headers,
                body,
                took,
            }) = cache.call_service(svc, request, &route.counters).await
            else {
                leader.finish(None);
                return;
            };
            if storable(&route, status, &headers).is_ok() {
                let stored = Stored::new(status, &headers, body);
                let entry = cache
                    .store(
                        &route, &params, &keyed, &stored, &headers, took, fetched_at, &as_of,
                    )
                    .await;
                leader.finish(Some(Arc::new(Fetched { stored, entry })));
            } else {
                leader.finish(None);
            }
        });
    }

    /// The scope of a request on a route, or why it cannot be cached.
    fn scope_of(&self, route: &Route, headers: &HeaderMap) -> Result<Scope, &'static str> {
        let hashed = |kind: &str, value: &[u8]| {
            let mut hasher = blake3::Hasher::new_keyed(&self.inner.scope_key);
            hasher.update(kind.as_bytes());
            hasher.update(&[0]);
            hasher.update(value);
            hasher.finalize().to_hex()[..32].to_string()
        };
        match route.scope {
            RouteScope::Public => Ok(Scope::Global),
            RouteScope::Anonymous if headers.contains_key(header::AUTHORIZATION) => {
                Err("authorization")
            }
            RouteScope::Anonymous => Ok(Scope::Global),
            RouteScope::User => match headers.get(&route.user_header) {
                Some(v) if !v.is_empty() => Ok(Scope::User(hashed("user", v.as_bytes()))),
                _ => Err("no-user"),
            },
            RouteScope::Session => {
                let from_header = headers
                    .get(&route.session_header)
                    .filter(|v| !v.is_empty())
                    .map(|v| v.as_bytes().to_vec());
                let from_cookie = || {
                    let name = route.session_cookie.as_deref()?;
                    headers
                        .get_all(header::COOKIE)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .flat_map(|v| v.split(';'))
                        .find_map(|pair| {
                            let (k, v) = pair.trim().split_once('=')?;
                            (k == name && !v.is_empty()).then(|| v.as_bytes().to_vec())
                        })
                };
                match from_header.or_else(from_cookie) {
                    Some(id) => Ok(Scope::Session(hashed("session", &id))),
                    None => Err("no-session"),
                }
            }
        }
    }

    /// The answer to send: `stored` in the coding asked for, with the cache's headers, or a
    /// bodiless 304 when the request's validators match.
    fn answer(
        &self,
        route: &Route,
        asked: &Asked,
        entry: Option<&Arc<Entry>>,
        stored: &Stored,
        status: Status,
    ) -> Response<Body> {
        let mut headers = stored.headers.clone();
        let compressible = encoding::compressible(&stored.headers)
            && !stored.headers.contains_key(header::CONTENT_ENCODING)
            && !stored.headers.contains_key(header::CONTENT_RANGE)
            && stored.status != StatusCode::PARTIAL_CONTENT;
        let coding = match asked.encoding {
            Some(e) if compressible && stored.body.len() >= self.inner.limits.compress_min => e,
            _ => Encoding::Identity,
        };
        let (body, etag, coded) = match coding {
            Encoding::Identity => (stored.body.clone(), stored.etag.clone(), false),
            coding => match self.variant(entry, coding, &stored.body) {
                Some(body) => (body, variant_etag(&stored.etag, coding), true),
                None => (stored.body.clone(), stored.etag.clone(), false),
            },
        };
        // An answer passed through keeps the service's own `Vary` (a cache downstream needs
        // it), with the route's names added.
        let passed: Vec<String> = if entry.is_none() {
            stored
                .headers
                .get_all(header::VARY)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|n| n.trim().to_ascii_lowercase())
                .filter(|n| !n.is_empty())
                .collect()
        } else {
            Vec::new()
        };
        let mut vary: Vec<&str> = passed.iter().map(String::as_str).collect();
        for name in route.vary.iter().map(HeaderName::as_str) {
            if !vary.contains(&name) {
                vary.push(name);
            }
        }
        if compressible && !vary.contains(&"accept-encoding") {
            vary.push("accept-encoding");
        }
        if !vary.is_empty()
            && let Ok(v) = HeaderValue::try_from(vary.join(", "))
        {
            headers.insert(header::VARY, v);
        }
        if entry.is_some()
            && let Ok(v) = HeaderValue::try_from(route.cache_control.as_str())
        {
            headers.insert(header::CACHE_CONTROL, v);
        }
        headers.insert(header::ETAG, etag.clone());
        status.apply(&mut headers);
        let validated = stored.status.is_success()
            && not_modified(
                asked,
                &[&etag, &stored.etag],
                headers.get(header::LAST_MODIFIED),
            );
        if validated {
            let mut out = HeaderMap::new();
            for name in [
                header::ETAG,
                header::CACHE_CONTROL,
                header::VARY,
                header::LAST_MODIFIED,
                header::EXPIRES,
                header::CONTENT_LOCATION,
                header::AGE,
                header::HeaderName::from_static("cache-status"),
                HeaderName::from_static(X_CACHE),
            ] {
                if let Some(v) = headers.get(&name) {
                    out.insert(name, v.clone());
                }
            }
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            *response.headers_mut() = out;
            return response;
        }
        if coded {
            headers.insert(
                header::CONTENT_ENCODING,
                HeaderValue::from_static(coding.token()),
            );
        }
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        if entry.is_some() && matches!(status, Status::Hit { .. } | Status::Stale { .. }) {
            route
                .counters
                .bytes_served
                .fetch_add(body.len() as u64, Relaxed);
        }
        let body = if asked.head || stored.status == StatusCode::NO_CONTENT {
            Body::empty()
        } else {
            Body::from(body)
        };
        let mut response = Response::new(body);
        *response.status_mut() = stored.status;
        *response.headers_mut() = headers;
        response
    }

    /// A stored body in a coding: from the variants kept in memory, else compressed now (and
    /// kept). `None` if compressing failed (the identity body is sent).
    fn variant(&self, entry: Option<&Arc<Entry>>, coding: Encoding, body: &Bytes) -> Option<Bytes> {
        let Some(entry) = entry else {
            return coding.encode(body).ok();
        };
        let key = (
            u128::from_str_radix(&entry.cache_id, 16).unwrap_or(0),
            entry.created_at.timestamp_millis(),
            coding,
        );
        if let Some(found) = self.inner.variants.get(&key) {
            return Some(found);
        }
        let coded = coding.encode(body).ok()?;
        self.inner.variants.insert(key, coded.clone());
        Some(coded)
    }
}

/// The key of a request on a route: its method (`HEAD` as `GET`), path, query (sorted by
/// name, repeated names kept in order), the route's `vary` headers, a `POST` body's digest,
/// each length-prefixed, under the scope.
fn key(route: &Route, parts: &Parts, body: Option<&Bytes>, scope: Scope) -> Keyed {
    fn field(out: &mut String, text: &str) {
        use std::fmt::Write;
        let _ = write!(out, "{}:", text.len());
        out.push_str(text);
        out.push('\n');
    }
    let mut canonical = String::with_capacity(96);
    canonical.push_str("strata-http/1\n");
    let method = if parts.method == Method::HEAD {
        "GET"
    } else {
        parts.method.as_str()
    };
    field(&mut canonical, method);
    field(&mut canonical, parts.uri.path());
    match parts.uri.query() {
        None | Some("") => field(&mut canonical, ""),
        Some(query) => {
            let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
            pairs.sort_by_key(|p| p.split_once('=').map_or(*p, |(name, _)| name));
            field(&mut canonical, &pairs.join("&"));
        }
    }
    for name in &route.vary {
        let values: Vec<&[u8]> = parts
            .headers
            .get_all(name)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        field(&mut canonical, name.as_str());
        field(
            &mut canonical,
            &String::from_utf8_lossy(&values.join(&b", "[..])),
        );
    }
    if let Some(body) = body {
        field(&mut canonical, blake3::hash(body).to_hex().as_str());
    }
    let key = CacheKey::derive(route.slug.clone(), &scope, &canonical);
    Keyed {
        key,
        canonical,
        model: route.name.clone(),
        scope,
    }
}

/// How long ago an entry was written.
fn age_of(entry: &Entry) -> Duration {
    (chrono::Utc::now() - entry.created_at)
        .to_std()
        .unwrap_or_default()
}

/// The request a cached route sends the service: `GET` for `HEAD` (the entry needs the
/// body), without validators (strata answers them) and asking for an identity body.
fn upstream_request(parts: &Parts, body: Body) -> Request<Body> {
    let mut request = Request::new(body);
    *request.method_mut() = if parts.method == Method::HEAD {
        Method::GET
    } else {
        parts.method.clone()
    };
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    // What a router put there (axum's path parameters) goes on to the service.
    *request.extensions_mut() = parts.extensions.clone();
    let headers = request.headers_mut();
    for (name, value) in &parts.headers {
        if !NOT_FORWARDED.contains(name) && name != header::ACCEPT_ENCODING {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    request
}

/// A short plain-text answer of the cache's own.
fn plain(status: StatusCode, message: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::from(message));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Whether an answer may be stored for a route (RFC 9111 §3 and §3.5 for a shared cache, and
/// the route's statuses); the reason, as a token, when not.
fn storable(route: &Route, status: StatusCode, headers: &HeaderMap) -> Result<(), &'static str> {
    if !route.statuses.contains(&status.as_u16()) {
        return Err("status");
    }
    if headers.len() > super::stored::MAX_HEADERS {
        return Err("headers");
    }
    // Read by hand: directive names are case-insensitive, and a value a parser refuses whole
    // (`private, max-age=-1`) must still say `private`.
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(text) = value.to_str() else {
            return Err("cache-control");
        };
        for directive in text.split(',') {
            let name = directive.split('=').next().unwrap_or("").trim();
            if name.eq_ignore_ascii_case("no-store") {
                return Err("no-store");
            }
            if name.eq_ignore_ascii_case("private") && route.scope.shared() {
                return Err("private");
            }
        }
    }
    if route.scope.shared() && headers.contains_key(header::SET_COOKIE) {
        return Err("set-cookie");
    }
    if headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return Err("content-encoding");
    }
    for value in headers.get_all(header::VARY) {
        let Ok(text) = value.to_str() else {
            return Err("vary");
        };
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let known = name.eq_ignore_ascii_case("accept-encoding")
                || route
                    .vary
                    .iter()
                    .any(|v| v.as_str().eq_ignore_ascii_case(name));
            if !known {
                return Err("vary");
            }
        }
    }
    Ok(())
}

/// Tags a service gave its answer in `X-Strata-Tags` (at most 32, each 1 to 128 printable
/// characters; others are dropped).
fn service_tags(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(TAGS_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ' ']))
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.len() <= 128 && !t.chars().any(char::is_control))
        .take(32)
        .map(String::from)
        .collect()
}

/// The entity tag of a body in a coding: the identity tag with the coding inside its quotes
/// (`"abc"` → `"abc-gzip"`), so no cache downstream takes one variant for another.
fn variant_etag(etag: &HeaderValue, coding: Encoding) -> HeaderValue {
    let text = etag.as_bytes();
    let (weak, opaque) = match text.strip_prefix(b"W/") {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let inner = &opaque[1..opaque.len().saturating_sub(1).max(1)];
    let mut out = Vec::with_capacity(text.len() + 6);
    if weak {
        out.extend_from_slice(b"W/");
    }
    out.push(b'"');
    out.extend_from_slice(inner);
    out.push(b'-');
    out.extend_from_slice(coding.token().as_bytes());
    out.push(b'"');
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| etag.clone())
}

/// Whether the request's validators match (RFC 9110 §13.1.2 and §13.1.3): `If-None-Match`
/// by weak comparison against any of `etags`, else `If-Modified-Since` against
/// `Last-Modified`.
fn not_modified(
    asked: &Asked,
    etags: &[&HeaderValue],
    last_modified: Option<&HeaderValue>,
) -> bool {
    let opaque = |tag: &[u8]| -> Vec<u8> { tag.strip_prefix(b"W/").unwrap_or(tag).to_vec() };
    if let Some(condition) = &asked.if_none_match {
        let Ok(text) = condition.to_str() else {
            return false;
        };
        if text.trim() == "*" {
            return true;
        }
        return text
            .split(',')
            .map(|t| t.trim().as_bytes())
            .filter(|t| is_entity_tag(t))
            .any(|t| etags.iter().any(|e| opaque(e.as_bytes()) == opaque(t)));
    }
    let (Some(since), Some(modified)) = (&asked.if_modified_since, last_modified) else {
        return false;
    };
    let Ok(modified) = modified.to_str() else {
        return false;
    };
    let Ok(modified) = httpdate::parse_http_date(modified) else {
        return false;
    };
    !since.is_modified(modified)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Limits, Policy};
    use axum::routing::get;
    use std::sync::atomic::AtomicU64;

    fn app(calls: Arc<AtomicU64>) -> axum::Router {
        axum::Router::new().route(
            "/health",
            get(move || {
                let calls = Arc::clone(&calls);
                async move {
                    calls.fetch_add(1, Relaxed);
                    (
                        [(header::CONTENT_TYPE, "application/json")],
                        "{\"ok\":true}",
                    )
                }
            }),
        )
    }

    async fn send(
        svc: &mut (
                 impl Service<Request<Body>, Response = Response<Body>, Error = std::convert::Infallible>
                 + Clone
             ),
        path: &str,
    ) -> Response<Body> {
        let request = Request::builder().uri(path).body(Body::empty()).unwrap();
        svc.clone().oneshot(request).await.unwrap()
    }

    fn layered(
        api: &ApiCache,
        calls: &Arc<AtomicU64>,
    ) -> impl Service<Request<Body>, Response = Response<Body>, Error = std::convert::Infallible> + Clone
    {
        let echo_calls = Arc::clone(calls);
        let app = app(Arc::clone(calls)).route(
            "/search",
            axum::routing::post(move |body: Bytes| {
                let calls = Arc::clone(&echo_calls);
                async move {
                    calls.fetch_add(1, Relaxed);
                    body
                }
            }),
        );
        tower::Layer::layer(&api.layer(), app)
    }

    fn policy() -> Policy {
        Policy::builder()
            .route("/health", Duration::from_secs(30), |r| {
                r.scope(RouteScope::Public)
            })
            .route("/search", Duration::from_secs(30), |r| r.methods(&["POST"]))
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn a_post_route_is_keyed_on_its_body() {
        let api = ApiCache::new(
            strata_tiers::TieredCache::builder().build(),
            policy(),
            Limits::default(),
            [7; 32],
        );
        let calls = Arc::new(AtomicU64::new(0));
        let svc = layered(&api, &calls);
        let post = |body: &'static str| {
            Request::builder()
                .method(Method::POST)
                .uri("/search")
                .body(Body::from(body))
                .unwrap()
        };
        let words = |r: &Response<Body>| r.headers()[X_CACHE].to_str().unwrap().to_string();
        assert_eq!(
            words(&svc.clone().oneshot(post("a")).await.unwrap()),
            "MISS"
        );
        assert_eq!(
            words(&svc.clone().oneshot(post("b")).await.unwrap()),
            "MISS"
        );
        let again = svc.clone().oneshot(post("a")).await.unwrap();
        assert_eq!(words(&again), "HIT");
        assert_eq!(again.into_body().collect().await.unwrap().to_bytes(), "a");
        assert_eq!(calls.load(Relaxed), 2);
    }

    #[tokio::test]
    async fn a_forged_or_corrupt_entry_is_a_counted_miss() {
        let cache = strata_tiers::TieredCache::builder().build();
        let api = ApiCache::new(cache.clone(), policy(), Limits::default(), [7; 32]);
        let calls = Arc::new(AtomicU64::new(0));
        let mut svc = layered(&api, &calls);
        send(&mut svc, "/health").await;
        // Replace the entry with one that would plant a cookie.
        let route = Arc::clone(&api.policy().routes()[0]);
        let (parts, _) = Request::builder()
            .uri("/health")
            .body(())
            .unwrap()
            .into_parts();
        let keyed = key(&route, &parts, None, Scope::Global);
        let forged = serde_json::json!({"v": 1, "status": 200, "headers": [["set-cookie", "session=evil"]], "etag": "\"x\"", "body": "evil"});
        let entry = cache
            .entry_for(
                &keyed,
                Completion::from_value(&forged).ttl(Duration::from_secs(30)),
                &cache.epochs().snapshot(),
            )
            .await;
        cache.store_entry(&keyed, &entry).await;
        let answer = send(&mut svc, "/health").await;
        assert_eq!(answer.headers()[X_CACHE], "MISS");
        assert!(answer.headers().get(header::SET_COOKIE).is_none());
        assert_eq!(
            answer.into_body().collect().await.unwrap().to_bytes(),
            "{\"ok\":true}"
        );
        assert_eq!(route.counters.corrupt.load(Relaxed), 1);
        assert_eq!(calls.load(Relaxed), 2);
        assert_eq!(send(&mut svc, "/health").await.headers()[X_CACHE], "HIT");
    }

    #[tokio::test]
    async fn directives_are_read_in_any_case_and_a_slow_service_is_bounded() {
        let policy = Policy::builder()
            .route("/private", Duration::from_secs(30), |r| {
                r.scope(RouteScope::Public)
            })
            .route("/slow", Duration::from_secs(30), |r| {
                r.scope(RouteScope::Public)
            })
            .build()
            .unwrap();
        let limits = Limits {
            call_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let api = ApiCache::new(
            strata_tiers::TieredCache::builder().build(),
            policy,
            limits,
            [7; 32],
        );
        let app = axum::Router::new()
            .route(
                "/private",
                get(|| async { ([(header::CACHE_CONTROL, "Private, max-age=-1")], "mine") }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }),
            );
        let mut svc = tower::Layer::layer(&api.layer(), app);
        for _ in 0..2 {
            let answer = send(&mut svc, "/private").await;
            assert_eq!(answer.headers()[X_CACHE], "MISS");
            assert!(
                answer.headers()["cache-status"]
                    .to_str()
                    .unwrap()
                    .contains("detail=private")
            );
        }
        let started = Instant::now();
        let answer = send(&mut svc, "/slow").await;
        assert_eq!(answer.status(), StatusCode::BAD_GATEWAY);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(api.flights_in_progress(), 0, "the key's slot is free again");
    }

    #[tokio::test]
    async fn a_repeated_get_is_a_hit() {
        let cache = strata_tiers::TieredCache::builder().build();
        let policy = Policy::builder()
            .route("/health", Duration::from_secs(30), |r| {
                r.scope(RouteScope::Public)
            })
            .build()
            .unwrap();
        let api = ApiCache::new(cache.clone(), policy, Limits::default(), [7; 32]);
        let calls = Arc::new(AtomicU64::new(0));
        let mut svc = tower::Layer::layer(&api.layer(), app(Arc::clone(&calls)));
        let first = send(&mut svc, "/health").await;
        assert_eq!(first.headers()[X_CACHE], "MISS");
        let second = send(&mut svc, "/health").await;
        assert_eq!(
            second.headers()[X_CACHE],
            "HIT",
            "{:?} {:?}",
            second.headers(),
            cache.stats()
        );
        assert_eq!(calls.load(Relaxed), 1);
    }
}
