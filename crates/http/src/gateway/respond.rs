//! Writing answers: hits in the shape asked for, a flight's answer (live, for streams), and
//! requests forwarded uncached.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use futures::StreamExt;
use strata_tiers::Lookup;

use super::call::Call;
use super::controls::Disposition;
use super::flight::{End, Progress, Subscription};
use super::record::{Recorded, Shaped, encode_events};
use super::route::{LlmRoute, Provider};
use super::upstream::{forwarded, returned};
use super::{Shared, age_of, content_type, error};

/// A hit, in the shape the request asked for; `None` when the entry cannot be served in it
/// (no conversion on this route), which the caller treats as a miss.
pub fn hit(call: &Call, lookup: &Lookup, key: &str) -> Option<Response> {
    let recorded: Recorded = serde_json::from_str(lookup.entry.response.get()).ok()?;
    let shaped = recorded.shaped(call.route, call.stream)?;
    let ttl = lookup
        .entry
        .expires_at
        .and_then(|at| (at - chrono::Utc::now()).to_std().ok());
    let disposition = Disposition::Hit {
        tier: lookup.outcome,
        age: age_of(&lookup.entry),
        ttl,
    };
    Some(shaped_response(
        recorded.status(),
        HeaderMap::new(),
        shaped,
        disposition,
        key,
    ))
}

fn shaped_response(
    status: StatusCode,
    upstream_headers: HeaderMap,
    shaped: Shaped,
    disposition: Disposition,
    key: &str,
) -> Response {
    let (stream, body) = match shaped {
        Shaped::Json(bytes) => (false, Body::from(bytes)),
        Shaped::Events(events) => (true, Body::from(encode_events(&events))),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = upstream_headers;
    content_type(response.headers_mut(), stream);
    disposition.apply(Some(key), response.headers_mut());
    response
}

/// The answer of a flight this request leads or joined: a live stream when the upstream
/// streams and the client wants a stream, else the whole answer once the call ends. Returns
/// it with what the cache did, as its headers say.
pub async fn from_flight(
    subscription: Subscription,
    route: LlmRoute,
    stream: bool,
    disposition: Disposition,
    key: &str,
) -> (Response, Disposition) {
    let mut watch = subscription.flight().watch();
    let live = match watch
        .wait_for(|p| p.end.is_some() || p.head.as_ref().is_some_and(|h| h.stream))
        .await
    {
        Ok(progress) => progress.end.is_none() && stream,
        Err(_) => false,
    };
    if live {
        let head = watch.borrow().head.clone();
        let mut response = Response::new(live_events(subscription));
        if let Some(head) = head {
            *response.status_mut() = head.status;
            *response.headers_mut() = head.headers;
        }
        content_type(response.headers_mut(), true);
        disposition.apply(Some(key), response.headers_mut());
        return (response, disposition);
    }
    let ended = watch.wait_for(|p| p.end.is_some()).await;
    let Ok(progress) = ended else {
        let response = error(
            route.provider(),
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "the upstream call was lost",
        );
        return (response, disposition);
    };
    answer_of(&progress, route, stream, disposition, key)
}

/// What the cache did, once the call has ended: whether the answer was stored, and for a
/// leader whose call found the answer in memory after all, a hit.
fn settled(disposition: Disposition, end: Option<&End>) -> Disposition {
    let entry = match end {
        Some(End::Answered { entry, found, .. }) => {
            if let (true, Disposition::Miss { .. }, Some(entry)) = (found, disposition, entry) {
                return Disposition::Hit {
                    tier: strata_analytics::Outcome::L1,
                    age: age_of(entry),
                    ttl: entry
                        .expires_at
                        .and_then(|at| (at - chrono::Utc::now()).to_std().ok()),
                };
            }
            entry.as_ref()
        }
        _ => None,
    };
    let stored = entry.is_some();
    match disposition {
        Disposition::Miss { .. } => Disposition::Miss { stored },
        Disposition::Coalesced { .. } => Disposition::Coalesced { stored },
        Disposition::Refresh { why, .. } => Disposition::Refresh { stored, why },
        other => other,
    }
}

/// The response to a request whose flight has ended.
fn answer_of(
    progress: &Progress,
    route: LlmRoute,
    stream: bool,
    disposition: Disposition,
    key: &str,
) -> (Response, Disposition) {
    let provider = route.provider();
    let disposition = settled(disposition, progress.end.as_ref());
    let headers = progress
        .head
        .as_ref()
        .map(|h| h.headers.clone())
        .unwrap_or_default();
    let mut response = match &progress.end {
        Some(End::Answered { recorded, .. }) => match recorded.shaped(route, stream) {
            Some(shaped) => {
                let response =
                    shaped_response(recorded.status(), headers, shaped, disposition, key);
                return (response, disposition);
            }
            None => error(
                provider,
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "the upstream's answer cannot be converted to the shape asked for",
            ),
        },
        // The upstream's own error event ended the stream: passed on as it came.
        Some(End::Unstored) if stream => shaped_response(
            StatusCode::OK,
            headers,
            Shaped::Events(progress.events.clone()),
            disposition,
            key,
        ),
        Some(End::Unstored) => error(
            provider,
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "the upstream ended its stream with an error",
        ),
        Some(End::Passed(reply)) => {
            let mut response = Response::new(Body::from(reply.body.clone()));
            *response.status_mut() = reply.status;
            *response.headers_mut() = reply.headers.clone();
            response
        }
        Some(End::Failed(failure)) => error(
            provider,
            failure.status(),
            "upstream_error",
            &failure.message(),
        ),
        None => error(
            provider,
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "the upstream call was lost",
        ),
    };
    disposition.apply(Some(key), response.headers_mut());
    (response, disposition)
}

/// A flight's events as they arrive: those received so far, then the live ones. A stream the
/// upstream cut ends the response with an error, so the client sees it cut too.
fn live_events(subscription: Subscription) -> Body {
    let watch = subscription.flight().watch();
    let state = Some((subscription, watch, 0usize));
    let stream = futures::stream::unfold(state, |state| async move {
        let (subscription, mut watch, next) = state?;
        loop {
            enum Step {
                Send(Bytes, usize),
                Done,
                Cut,
                Wait,
            }
            let step = {
                let progress = watch.borrow_and_update();
                if next < progress.events.len() {
                    Step::Send(
                        encode_events(&progress.events[next..]),
                        progress.events.len(),
                    )
                } else {
                    match &progress.end {
                        None => Step::Wait,
                        Some(End::Answered { .. } | End::Unstored) => Step::Done,
                        Some(End::Passed(_) | End::Failed(_)) => Step::Cut,
                    }
                }
            };
            match step {
                Step::Send(bytes, upto) => {
                    return Some((Ok(bytes), Some((subscription, watch, upto))));
                }
                Step::Done => return None,
                Step::Cut => {
                    return Some((Err(std::io::Error::other("upstream stream cut")), None));
                }
                Step::Wait => {
                    if watch.changed().await.is_err() {
                        return Some((Err(std::io::Error::other("upstream call lost")), None));
                    }
                }
            }
        }
    });
    Body::from_stream(stream)
}

/// Forwards a cached route's request uncached (its body already read), streaming the answer
/// back.
pub async fn forward(
    shared: &Shared,
    route: LlmRoute,
    parts: &Parts,
    body: Bytes,
    disposition: Disposition,
) -> Response {
    let provider = route.provider();
    let path = parts
        .uri
        .path_and_query()
        .map_or(route.path(), |p| p.as_str());
    let url = shared.upstream.url(provider, path);
    let request = shared
        .upstream
        .request(Method::POST, &url, forwarded(&parts.headers, false))
        .body(body);
    shared.metrics.request(route.label(), disposition.result());
    let mut response = send_streaming(shared, provider, route.label(), request).await;
    disposition.apply(None, response.headers_mut());
    response
}

/// Forwards a request to a path the gateway does not cache, both bodies streamed.
pub async fn passthrough(shared: Arc<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let provider = Provider::of_other(parts.uri.path(), &parts.headers);
    let path = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |p| p.as_str());
    let url = shared.upstream.url(provider, path);
    let body = reqwest::Body::wrap_stream(body.into_data_stream());
    let request = shared
        .upstream
        .request(parts.method, &url, forwarded(&parts.headers, false))
        .body(body);
    shared.metrics.request("passthrough", "forwarded");
    send_streaming(&shared, provider, "passthrough", request).await
}

async fn send_streaming(
    shared: &Shared,
    provider: Provider,
    route: &'static str,
    request: reqwest::RequestBuilder,
) -> Response {
    match shared.upstream.send(request).await {
        Ok(upstream) => {
            let status = upstream.status();
            let headers = returned(upstream.headers(), false, false);
            let body = upstream
                .bytes_stream()
                .map(|chunk| chunk.map_err(std::io::Error::other));
            let mut response = Response::new(Body::from_stream(body));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            response
        }
        Err(failure) => {
            shared.metrics.upstream_error(route);
            shared
                .upstream_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            error(
                provider,
                failure.status(),
                "upstream_error",
                &failure.message(),
            )
        }
    }
}
