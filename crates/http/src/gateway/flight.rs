//! Single flight for upstream calls, streams included: identical requests that arrive while an
//! upstream call is in flight join it, and each gets the events already received, then the
//! live ones, from that one call.
//!
//! A [`Flight`] is the record of one upstream call as it happens: its head (status and headers),
//! the events received so far, and how it ended. The task that makes the call writes it; every
//! request that joined reads it at its own pace through a [`watch`] channel. The call runs in a
//! task of its own, so a client that disconnects does not cancel a call that others share; a
//! stream abandoned by every client is cancelled (and never stored).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use strata_core::{Entry, Keyed, Scope};
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;

use super::record::Recorded;
use crate::convert::SseEvent;

/// The head of an upstream's 2xx answer.
#[derive(Debug, Clone)]
pub struct Head {
    /// Its status.
    pub status: StatusCode,
    /// Its headers, less hop-by-hop ones and those the gateway sets itself.
    pub headers: HeaderMap,
    /// Whether it is a stream of events.
    pub stream: bool,
}

/// An upstream's answer passed on as it came (a non-2xx, or a body that is not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    /// Its status.
    pub status: StatusCode,
    /// Its headers, less hop-by-hop ones.
    pub headers: HeaderMap,
    /// Its body.
    pub body: Bytes,
}

/// Why an upstream call gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The upstream could not be reached (502).
    Unreachable(String),
    /// It did not answer in time (504).
    TimedOut(String),
    /// It answered, then broke off, or sent more than the response limit (502).
    Cut(String),
    /// Every client left a stream before it ended.
    Abandoned,
}

impl Failure {
    /// What it says to a client.
    pub fn message(&self) -> String {
        match self {
            Failure::Unreachable(why) => format!("upstream unreachable: {why}"),
            Failure::TimedOut(why) => format!("upstream timed out: {why}"),
            Failure::Cut(why) => format!("upstream answer cut: {why}"),
            Failure::Abandoned => "every client left".into(),
        }
    }

    /// The status a client gets for it.
    pub fn status(&self) -> StatusCode {
        match self {
            Failure::TimedOut(_) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// How an upstream call ended.
#[derive(Debug, Clone)]
pub enum End {
    /// With a whole answer, stored (`entry`) or not (`no-store`).
    Answered {
        /// The answer.
        recorded: Arc<Recorded>,
        /// The entry it was stored as.
        entry: Option<Arc<Entry>>,
        /// Whether it was found in memory after all (stored between the request's lookup and
        /// its flight): no upstream call was made.
        found: bool,
    },
    /// A stream that ended with the upstream's own error or incomplete event: passed on
    /// whole, never stored.
    Unstored,
    /// With an answer passed on as it came, not stored.
    Passed(Reply),
    /// Without an answer.
    Failed(Failure),
}

/// The record of one upstream call, as far as it has come.
#[derive(Debug, Default)]
pub struct Progress {
    /// Set once the upstream answered 2xx.
    pub head: Option<Head>,
    /// A stream's events so far.
    pub events: Vec<SseEvent>,
    /// Set once the call ended.
    pub end: Option<End>,
}

/// One upstream call and the requests that share it.
#[derive(Debug)]
pub struct Flight {
    id: u128,
    canonical: String,
    scope: Scope,
    progress: watch::Sender<Progress>,
    subscribers: AtomicUsize,
    cancel_when_abandoned: bool,
    stores: bool,
    task: Mutex<TaskSlot>,
}

#[derive(Debug, Default)]
struct TaskSlot {
    handle: Option<AbortHandle>,
    abandoned: bool,
    /// The answer is whole and being stored: leaving no longer cancels the call.
    committed: bool,
}

impl Flight {
    /// Sets the head of a 2xx answer.
    pub fn head(&self, head: Head) {
        self.progress.send_modify(|p| p.head = Some(head));
    }

    /// Adds a stream's event.
    pub fn event(&self, event: SseEvent) {
        self.progress.send_modify(|p| p.events.push(event));
    }

    /// Ends the call (the first end wins).
    pub fn end(&self, end: End) {
        self.progress.send_if_modified(|p| {
            if p.end.is_some() {
                return false;
            }
            p.end = Some(end);
            true
        });
    }

    /// A receiver of the call's progress.
    pub fn watch(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// The entry the call stored, once it has ended with one (it may still be on its way to
    /// the tiers below memory).
    pub fn stored_entry(&self) -> Option<Arc<Entry>> {
        match &self.progress.borrow().end {
            Some(End::Answered {
                entry: Some(entry), ..
            }) => Some(Arc::clone(entry)),
            _ => None,
        }
    }

    /// Whether the call has ended.
    pub fn ended(&self) -> bool {
        self.progress.borrow().end.is_some()
    }

    /// Whether the request that leads the call stores its answer (not `no-store`).
    pub fn stores(&self) -> bool {
        self.stores
    }

    /// Says the answer is whole: from now on the call finishes and stores it even if every
    /// client leaves (a client that stops reading at the terminal event is not abandoning it).
    pub fn commit(&self) {
        lock(&self.task).committed = true;
    }

    /// Hands the flight the task making its call, so that a stream every client left can be
    /// cancelled.
    pub fn run_by(&self, handle: AbortHandle) {
        let mut slot = lock(&self.task);
        if slot.abandoned {
            handle.abort();
        }
        slot.handle = Some(handle);
    }
}

/// What joining a key's flight came to.
pub enum Joined {
    /// No call was in flight: this request makes it (and must start its task).
    Led(Subscription),
    /// A call was in flight: this request shares it.
    Followed(Subscription),
}

/// A request's share of a flight; leaving (dropping it) may cancel an abandoned stream.
#[derive(Debug)]
pub struct Subscription {
    flight: Arc<Flight>,
    flights: Arc<Flights>,
}

impl Subscription {
    /// The flight.
    pub fn flight(&self) -> &Arc<Flight> {
        &self.flight
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.flights.leave(&self.flight);
    }
}

/// The calls in flight, by key.
#[derive(Debug, Default)]
pub struct Flights {
    map: Mutex<HashMap<u128, Arc<Flight>>>,
    /// Woken whenever a flight finishes (for shutdown, which waits for them).
    finished: Notify,
}

impl Flights {
    /// Joins the call in flight for `keyed`, or registers a new one that this request leads. A
    /// call in flight for another request with the same digest (an MD5 collision) is not
    /// joined: this request leads a call of its own, outside the registry.
    /// `stores` says whether a call this request leads stores its answer.
    pub fn join(
        self: &Arc<Self>,
        keyed: &Keyed,
        cancel_when_abandoned: bool,
        stores: bool,
    ) -> Joined {
        let id = keyed.key.id();
        let mut map = lock(&self.map);
        if let Some(flight) = map.get(&id) {
            if flight.canonical == keyed.canonical && flight.scope == keyed.scope {
                flight.subscribers.fetch_add(1, Relaxed);
                return Joined::Followed(Subscription {
                    flight: Arc::clone(flight),
                    flights: Arc::clone(self),
                });
            }
            drop(map);
            return Joined::Led(self.solo(keyed, cancel_when_abandoned, stores));
        }
        let subscription = self.solo(keyed, cancel_when_abandoned, stores);
        map.insert(id, Arc::clone(&subscription.flight));
        Joined::Led(subscription)
    }

    fn solo(self: &Arc<Self>, keyed: &Keyed, cancel: bool, stores: bool) -> Subscription {
        let flight = Arc::new(Flight {
            id: keyed.key.id(),
            canonical: keyed.canonical.clone(),
            scope: keyed.scope.clone(),
            progress: watch::Sender::new(Progress::default()),
            subscribers: AtomicUsize::new(1),
            cancel_when_abandoned: cancel,
            stores,
            task: Mutex::new(TaskSlot::default()),
        });
        Subscription {
            flight,
            flights: Arc::clone(self),
        }
    }

    /// Takes a flight out of the registry once its answer is stored (later requests find the
    /// entry instead).
    pub fn finish(&self, flight: &Arc<Flight>) {
        let mut map = lock(&self.map);
        if map.get(&flight.id).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(&flight.id);
        }
        drop(map);
        self.finished.notify_waiters();
    }

    fn leave(&self, flight: &Arc<Flight>) {
        let mut map = lock(&self.map);
        let left = flight.subscribers.fetch_sub(1, Relaxed) - 1;
        if left > 0 || !flight.cancel_when_abandoned || flight.ended() {
            return;
        }
        // Every client left a stream still arriving: nobody is served by finishing it, and a
        // stream nobody read to its end is not stored.
        let mut slot = lock(&flight.task);
        if slot.committed {
            return;
        }
        slot.abandoned = true;
        if map.get(&flight.id).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(&flight.id);
        }
        drop(map);
        if let Some(handle) = slot.handle.take() {
            handle.abort();
        }
        drop(slot);
        flight.end(End::Failed(Failure::Abandoned));
        self.finished.notify_waiters();
    }

    /// Calls in flight.
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    /// Whether no call is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until no call is in flight, for at most `deadline`; returns whether none is.
    pub async fn wait_idle(&self, deadline: Duration) -> bool {
        let wait = async {
            loop {
                let finished = self.finished.notified();
                if self.is_empty() {
                    return;
                }
                finished.await;
            }
        };
        tokio::time::timeout(deadline, wait).await.is_ok()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_core::Normalizer;

    fn keyed(text: &str) -> Keyed {
        Normalizer::default()
            .key(
                &serde_json::json!({"model": "m", "messages": [{"role": "user", "content": text}]}),
                &Scope::Global,
            )
            .unwrap()
    }

    #[test]
    fn the_second_request_follows_and_a_finished_flight_is_gone() {
        let flights = Arc::new(Flights::default());
        let k = keyed("a");
        let Joined::Led(lead) = flights.join(&k, true, true) else {
            panic!("first joins as leader")
        };
        let Joined::Followed(follow) = flights.join(&k, true, true) else {
            panic!("second follows")
        };
        assert!(Arc::ptr_eq(lead.flight(), follow.flight()));
        assert_eq!(flights.len(), 1);
        flights.finish(lead.flight());
        assert!(flights.is_empty());
        assert!(matches!(flights.join(&k, true, true), Joined::Led(_)));
    }

    #[test]
    fn a_stream_every_client_left_is_cancelled_and_forgotten() {
        let flights = Arc::new(Flights::default());
        let k = keyed("a");
        let Joined::Led(lead) = flights.join(&k, true, true) else {
            panic!()
        };
        let Joined::Followed(follow) = flights.join(&k, true, true) else {
            panic!()
        };
        let flight = Arc::clone(lead.flight());
        drop(lead);
        assert!(!flight.ended(), "one client is still there");
        drop(follow);
        assert!(matches!(
            flight.watch().borrow().end,
            Some(End::Failed(Failure::Abandoned))
        ));
        assert!(flights.is_empty());
    }

    #[test]
    fn a_stream_whole_before_every_client_left_is_kept() {
        let flights = Arc::new(Flights::default());
        let Joined::Led(lead) = flights.join(&keyed("a"), true, true) else {
            panic!()
        };
        let flight = Arc::clone(lead.flight());
        flight.commit();
        drop(lead);
        assert!(!flight.ended(), "being stored: not cancelled");
        assert_eq!(flights.len(), 1);
    }

    #[test]
    fn a_json_call_every_client_left_goes_on() {
        let flights = Arc::new(Flights::default());
        let Joined::Led(lead) = flights.join(&keyed("a"), false, true) else {
            panic!()
        };
        let flight = Arc::clone(lead.flight());
        drop(lead);
        assert!(!flight.ended());
        assert_eq!(flights.len(), 1);
    }
}
