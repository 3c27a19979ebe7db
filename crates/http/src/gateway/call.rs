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
use strata_core::Keyed;
use strata_tiers::Completion;

use super::Shared;
use super::controls::Controls;
use super::flight::{End, Failure, Flight, Head, Reply};
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

/// Runs a flight's call: first a last look in memory (an answer stored between the request's
/// lookup and its flight is served without calling upstream), then the upstream call,
/// recorded into the flight as it arrives and stored when whole. The lookup that led the call
/// is counted once it ends, whatever the way.
pub async fn run(shared: Arc<Shared>, flight: Arc<Flight>, call: Call, look_again: bool) {
    let mut guard = CallGuard {
        shared,
        flight,
        call,
        counted: false,
    };
    guard.run(look_again).await;
}

/// A flight's call, which ends its flight and counts its lookup however it stops: done, or
/// cancelled (every client left a stream), or panicked.
struct CallGuard {
    shared: Arc<Shared>,
    flight: Arc<Flight>,
    call: Call,
    counted: bool,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.flight.ended() {
            self.flight.end(End::Failed(Failure::Cut(
                "the gateway stopped the call".into(),
            )));
        }
        if !self.counted {
            let call = &self.call;
            self.shared
                .cache
                .record(&call.keyed, Outcome::Miss, None, call.started);
        }
        self.shared.flights.finish(&self.flight);
    }
}

impl CallGuard {
    async fn run(&mut self, look_again: bool) {
        let (shared, flight, call) = (&self.shared, &self.flight, &self.call);
        if look_again
            && let Some(entry) = shared.cache.find_in_memory(&call.keyed).await
            && let Ok(recorded) = serde_json::from_str::<Recorded>(entry.response.get())
            && recorded.shaped(call.route, call.stream).is_some()
        {
            shared
                .cache
                .record(&call.keyed, Outcome::L1, Some(&entry), call.started);
            self.counted = true;
            flight.end(End::Answered {
                recorded: Arc::new(recorded),
                entry: Some(entry),
                found: true,
            });
            return;
        }
        let route = call.route.label();
        // The epochs in force when the call starts: an invalidation made while it runs must
        // refuse its answer, not be recorded in it.
        let as_of = shared.cache.epochs().snapshot();
        let started = Instant::now();
        let end = answer(shared, flight, call).await;
        let took = started.elapsed();
        shared.metrics.upstream(route, took);
        let (end, entry) = match end {
            Ok(recorded) => {
                let entry = if call.controls.no_store {
                    None
                } else {
                    let completion = completion(&recorded, call, took);
                    Some(
                        shared
                            .cache
                            .entry_for(&call.keyed, completion, &as_of)
                            .await,
                    )
                };
                shared
                    .cache
                    .record(&call.keyed, Outcome::Miss, entry.as_ref(), call.started);
                let end = End::Answered {
                    recorded: Arc::new(recorded),
                    entry: entry.clone(),
                    found: false,
                };
                (end, entry)
            }
            Err(end) => {
                match &end {
                    End::Failed(failure) => {
                        shared.metrics.upstream_error(route);
                        shared.upstream_errors.fetch_add(1, Relaxed);
                        tracing::warn!(route, error = %failure.message(), "upstream call failed");
                    }
                    End::Passed(reply) => {
                        tracing::info!(
                            route,
                            status = reply.status.as_u16(),
                            "upstream answer passed on"
                        );
                    }
                    _ => {}
                }
                shared
                    .cache
                    .record(&call.keyed, Outcome::Miss, None, call.started);
                shared.cache.record_upstream_error();
                (end, None)
            }
        };
        self.counted = true;
        // The answer goes to the requests waiting for it first, then into the tiers. The flight
        // stays in the registry until the entry is stored (the guard takes it out), so a request
        // arriving meanwhile joins the ended flight rather than calling upstream again.
        flight.end(end);
        if let Some(entry) = entry {
            // The requests just woken run first: storing can wait a moment, they need not.
            tokio::task::yield_now().await;
            shared.cache.store_entry(&call.keyed, &entry).await;
        }
    }
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
        let headers = returned(response.headers(), false, true);
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
            headers: returned(response.headers(), true, true),
            stream: true,
        });
        let events =
            record_stream(flight, call.route, response, limit, config.idle_timeout).await?;
        return Ok(Recorded::stream(call.route, status.as_u16(), events));
    }
    let headers = returned(response.headers(), false, true);
    let body = read_whole(response, limit, config.idle_timeout).await?;
    match serde_json::from_slice::<&serde_json::value::RawValue>(&body) {
        // A Responses-API answer still running in the background, or cut short, is not the
        // answer: passed on, not stored (as its stream's `response.incomplete` is not).
        Ok(raw) if call.route == LlmRoute::Responses && !completed_response(raw.get()) => {
            Err(End::Passed(Reply {
                status,
                headers,
                body,
            }))
        }
        Ok(raw) => {
            let body = raw.to_owned();
            flight.head(Head {
                status,
                headers: returned(&headers, true, true),
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

/// Whether a Responses-API body is a completed response (`status` absent or `completed`).
fn completed_response(body: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Status<'a> {
        #[serde(borrow)]
        status: Option<&'a str>,
    }
    serde_json::from_str::<Status>(body)
        .map(|s| s.status.is_none_or(|s| s == "completed"))
        .unwrap_or(false)
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
    // The idle bound is on bytes, not events: keep-alive comments (which the event parser
    // drops) show that a slow upstream is still there.
    let chunks = futures::stream::unfold(
        (response.bytes_stream(), 0u64, false),
        move |(mut upstream, received, failed)| async move {
            if failed {
                return None;
            }
            let next = match tokio::time::timeout(idle, upstream.next()).await {
                Err(_) => Err(format!("no data for {}", humantime::format_duration(idle))),
                Ok(None) => return None,
                Ok(Some(Err(e))) => Err(error_chain(&e)),
                Ok(Some(Ok(chunk))) => {
                    let received = received + chunk.len() as u64;
                    if received > limit {
                        Err(format!("the stream is over the limit of {limit} bytes"))
                    } else {
                        return Some((Ok(chunk), (upstream, received, false)));
                    }
                }
            };
            Some((next, (upstream, received, true)))
        },
    );
    let mut events = Box::pin(chunks).eventsource();
    let mut recorded = Vec::new();
    loop {
        let next = match events.next().await {
            None => return Err(cut("the stream ended before its last event".into())),
            Some(Err(e)) => return Err(cut(e.to_string())),
            Some(Ok(event)) => event,
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
            Terminal::Done => {
                flight.commit();
                return Ok(recorded);
            }
            Terminal::Failed => return Err(End::Unstored),
        }
    }
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
