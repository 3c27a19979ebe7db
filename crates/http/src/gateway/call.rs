//! The upstream call of a flight: made in a task of its own, recorded as it arrives, stored
//! when whole.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use strata_analytics::Outcome;
use strata_core::{Entry, Keyed};
use strata_tiers::Completion;

use super::Shared;
use super::controls::Controls;
use super::flight::{End, EndGuard, Failure, Flight, Head, Reply};
use super::record::Recorded;
use super::route::{LlmRoute, Terminal};
use super::upstream::{error_chain, forwarded, returned};
use crate::convert::SseEvent;

/// Everything a cached request's upstream call needs.
#[derive(Debug)]
pub struct Call {
    /// The route.
    pub route: LlmRoute,
    /// The client's headers.
    pub headers: HeaderMap,
    /// Path and query, as they came.
    pub path_and_query: String,
    /// The body, as it came.
    pub body: Bytes,
    /// Its key.
    pub keyed: Keyed,
    /// Its controls.
    pub controls: Controls,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// When the request arrived.
    pub started: Instant,
}

/// Makes the call, records its answer into the flight, and stores it when whole. Counts the
/// lookup that led it (a miss) once the call ends.
pub async fn run(shared: Arc<Shared>, flight: Arc<Flight>, call: Call) {
    let _guard = EndGuard {
        flight: Arc::clone(&flight),
        flights: Arc::clone(&shared.flights),
    };
    let route = call.route.label();
    // The epochs in force when the call starts: an invalidation made while it runs must
    // refuse its answer, not be recorded in it.
    let as_of = shared.cache.epochs().snapshot();
    let started = Instant::now();
    let end = answer(&shared, &flight, &call).await;
    let failed = match &end {
        Ok(_) => false,
        Err(End::Failed(failure)) => {
            shared.metrics.upstream_error(route);
            shared.upstream_errors.fetch_add(1, Relaxed);
            tracing::warn!(route, error = %failure.message(), "upstream call failed");
            true
        }
        Err(End::Passed(reply)) => {
            tracing::info!(
                route,
                status = reply.status.as_u16(),
                "upstream answer passed on"
            );
            true
        }
        Err(_) => true,
    };
    let took = started.elapsed();
    shared.metrics.upstream(route, took);
    let end = match end {
        Ok(recorded) => {
            let entry = if call.controls.no_store {
                None
            } else {
                let completion = completion(&recorded, &call, took);
                Some(
                    shared
                        .cache
                        .put_keyed(&call.keyed, completion, &as_of)
                        .await,
                )
            };
            shared
                .cache
                .record(&call.keyed, Outcome::Miss, entry.as_ref(), call.started);
            End::Answered {
                recorded: Arc::new(recorded),
                entry,
            }
        }
        Err(end) => {
            shared
                .cache
                .record(&call.keyed, Outcome::Miss, None, call.started);
            if failed {
                shared.cache.record_upstream_error();
            }
            end
        }
    };
    flight.end(end);
}

/// What the entry of an answer records beside it.
fn completion(recorded: &Recorded, call: &Call, took: Duration) -> Completion {
    // A `Recorded` always serializes (its JSON parts are JSON already).
    let response = serde_json::value::to_raw_value(recorded).unwrap_or_default();
    let mut completion = Completion::new(response)
        .provider(call.route.provider().name())
        .latency_ms(took.as_millis() as u64)
        .tags(call.controls.tags.clone());
    completion.tokens = Some(recorded.tokens());
    completion.ttl = call.controls.ttl;
    completion
}

/// The upstream's whole answer, or how the call ended without one.
async fn answer(shared: &Shared, flight: &Flight, call: &Call) -> Result<Recorded, End> {
    let config = &shared.config;
    let provider = call.route.provider();
    let url = shared.upstream.url(provider, &call.path_and_query);
    let request = shared
        .upstream
        .request(Method::POST, &url, forwarded(&call.headers, true))
        .body(call.body.clone());
    let response = shared.upstream.send(request).await.map_err(End::Failed)?;
    let status = response.status();
    let limit = config.response_limit.as_u64();
    if !status.is_success() {
        let headers = returned(response.headers(), false);
        let body = read_whole(response, limit, config.idle_timeout).await?;
        return Err(End::Passed(Reply {
            status,
            headers,
            body,
        }));
    }
    let stream = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
    if stream {
        flight.head(Head {
            status,
            headers: returned(response.headers(), true),
            stream: true,
        });
        let events =
            record_stream(flight, call.route, response, limit, config.idle_timeout).await?;
        return Ok(Recorded::stream(call.route, status.as_u16(), events));
    }
    let headers = returned(response.headers(), false);
    let body = read_whole(response, limit, config.idle_timeout).await?;
    match serde_json::from_slice::<&serde_json::value::RawValue>(&body) {
        Ok(raw) => {
            let body = raw.to_owned();
            flight.head(Head {
                status,
                headers: returned(&headers, true),
                stream: false,
            });
            Ok(Recorded::Json {
                status: status.as_u16(),
                body,
            })
        }
        // Not JSON: passed on as it came, not stored.
        Err(_) => Err(End::Passed(Reply {
            status,
            headers,
            body,
        })),
    }
}

/// Reads a body whole, up to `limit` bytes, with at most `idle` between two chunks.
async fn read_whole(
    mut response: reqwest::Response,
    limit: u64,
    idle: Duration,
) -> Result<Bytes, End> {
    let mut body = Vec::new();
    loop {
        match tokio::time::timeout(idle, response.chunk()).await {
            Err(_) => {
                return Err(cut(format!(
                    "no data for {}",
                    humantime::format_duration(idle)
                )));
            }
            Ok(Err(e)) => return Err(cut(error_chain(&e))),
            Ok(Ok(None)) => return Ok(Bytes::from(body)),
            Ok(Ok(Some(chunk))) => {
                if (body.len() + chunk.len()) as u64 > limit {
                    return Err(cut(format!(
                        "the answer is over the limit of {limit} bytes"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
        }
    }
}

fn cut(why: String) -> End {
    End::Failed(Failure::Cut(why))
}

/// Passes a stream's events into the flight as they arrive, until the terminal event; returns
/// them all. A stream that ends before it (cut, idle too long, over the limit) is a failure,
/// and one whose last event is the upstream's own error ends the flight unstored.
async fn record_stream(
    flight: &Flight,
    route: LlmRoute,
    response: reqwest::Response,
    limit: u64,
    idle: Duration,
) -> Result<Vec<SseEvent>, End> {
    let mut received = 0u64;
    let bytes = response.bytes_stream().map(move |chunk| {
        let chunk = chunk.map_err(|e| error_chain(&e))?;
        received += chunk.len() as u64;
        if received > limit {
            return Err(format!("the stream is over the limit of {limit} bytes"));
        }
        Ok::<_, String>(chunk)
    });
    let mut events = bytes.eventsource();
    let mut recorded = Vec::new();
    loop {
        let next = match tokio::time::timeout(idle, events.next()).await {
            Err(_) => {
                return Err(cut(format!(
                    "no event for {}",
                    humantime::format_duration(idle)
                )));
            }
            Ok(None) => return Err(cut("the stream ended before its last event".into())),
            Ok(Some(Err(e))) => return Err(cut(e.to_string())),
            Ok(Some(Ok(event))) => event,
        };
        let event = SseEvent {
            event: (next.event != "message").then_some(next.event),
            data: next.data,
        };
        let terminal = route.terminal(&event);
        recorded.push(event.clone());
        flight.event(event);
        match terminal {
            Terminal::No => {}
            Terminal::Done => return Ok(recorded),
            Terminal::Failed => return Err(End::Unstored),
        }
    }
}

/// Ends a flight with an entry found stored after all (see `lookup_or_call`); false when the
/// entry is not the gateway's to read.
pub fn end_with_entry(shared: &Shared, flight: &Arc<Flight>, entry: &Arc<Entry>) -> bool {
    let Ok(recorded) = serde_json::from_str::<Recorded>(entry.response.get()) else {
        return false;
    };
    flight.end(End::Answered {
        recorded: Arc::new(recorded),
        entry: Some(Arc::clone(entry)),
    });
    shared.flights.finish(flight);
    true
}

/// Counts a request that joined a flight once the flight ends, whether or not its client is
/// still there: a coalesced hit that saved what the entry cost, or a miss if no answer came.
pub fn count_follower(shared: &Arc<Shared>, keyed: &Keyed, flight: &Arc<Flight>, started: Instant) {
    let (shared, keyed, mut watch) = (Arc::clone(shared), keyed.clone(), flight.watch());
    tokio::spawn(async move {
        let entry = match watch.wait_for(|p| p.end.is_some()).await {
            Ok(progress) => match &progress.end {
                Some(End::Answered { entry, .. }) => Some(entry.clone()),
                _ => None,
            },
            Err(_) => None,
        };
        match entry {
            Some(entry) => shared
                .cache
                .record(&keyed, Outcome::Coalesced, entry.as_ref(), started),
            None => shared.cache.record(&keyed, Outcome::Miss, None, started),
        }
    });
}
