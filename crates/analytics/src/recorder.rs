//! Recording lookups off the hot path, into hourly rollups kept in sled.
//!
//! A lookup hands an [`Event`] to [`Analytics::record`], which is a `try_send` into a bounded
//! channel: when the channel is full the event is dropped and counted, and the lookup goes on.
//! A background thread wakes every `poll_interval`, drains the channel without ever blocking a
//! sender (it never waits inside `recv`, so a send never has a sleeping receiver to wake), adds
//! the events into rollups per hour × model × provider, and every `persist_interval` merges them
//! into sled. Everything that reads ([`Analytics::rows`], [`Analytics::metrics_for_period`], …)
//! drains and persists first, so it sees every event recorded before the call.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use strata_core::{Entry, Scope};

use crate::counters::Outcome;
use crate::hit_marks::{self, HitMarks};
use crate::rollup::{
    DAILY_VERSION, DailyRollups, HourRow, Rollup, RowKey, age_bucket, nano_to_usd, sortable_be,
    usd_to_nano,
};
use crate::sketch::{HotKey, Sketch};
use crate::throttle::Throttle;
use crate::throttled;

/// Why analytics could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    /// The sled store failed.
    #[error("analytics store: {0}")]
    Store(#[from] sled::Error),
    /// A stored document did not parse.
    #[error("analytics document: {0}")]
    Json(#[from] serde_json::Error),
}

/// How recording behaves.
#[derive(Debug, Clone)]
pub struct AnalyticsConfig {
    /// Events the channel holds before new ones are dropped (and counted).
    pub channel_capacity: usize,
    /// How often the background thread drains the channel.
    pub poll_interval: Duration,
    /// How often drained rollups are merged into sled.
    pub persist_interval: Duration,
    /// Counters of the hot-key sketch.
    pub hot_key_capacity: usize,
    /// How many recent aggressive-profile keys are remembered to count the misses that would
    /// have hit under that profile.
    pub aggressive_window: usize,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        AnalyticsConfig {
            channel_capacity: 16_384,
            poll_interval: Duration::from_millis(50),
            persist_interval: Duration::from_secs(1),
            hot_key_capacity: 256,
            aggressive_window: 100_000,
        }
    }
}

/// One thing worth recording.
#[derive(Debug)]
pub enum Event {
    /// A lookup ended.
    Lookup {
        /// Where the answer came from.
        outcome: Outcome,
        /// The entry served (a hit) or stored (a miss); `None` when a plain `get` found nothing.
        entry: Option<Arc<Entry>>,
        /// The model, when there is no entry to say it.
        model: Option<Box<str>>,
        /// How long the lookup took, in microseconds.
        lookup_us: u32,
        /// For a miss: the digest of the request's key under the `aggressive` profile (when the
        /// cache uses a stricter one), to count misses that would have hit under it.
        aggressive: Option<u64>,
    },
    /// An entry was found past its expiry.
    Expired(Arc<Entry>),
    /// An upstream call, through the request metrics API.
    Request(Box<RequestMetric>),
}

/// One upstream call, as given to [`Analytics::record_request_metrics`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestMetric {
    /// The caller's id of the request.
    pub request_id: String,
    /// Who served it.
    pub provider: String,
    /// How long it took.
    pub response_time_ms: u64,
    /// What it cost.
    pub cost_usd: f64,
    /// When it was recorded (milliseconds since the Unix epoch).
    pub at_ms: i64,
}

/// Upstream calls over a period, per [`Analytics::metrics_for_period`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeriodMetrics {
    /// The period, in hours back from now.
    pub hours: u64,
    /// Calls recorded.
    pub requests: u64,
    /// Their total cost.
    pub cost_usd: f64,
    /// Mean response time.
    pub avg_response_time_ms: f64,
    /// Median response time.
    pub p50_response_time_ms: u64,
    /// 95th percentile response time.
    pub p95_response_time_ms: u64,
    /// The same per provider, most calls first.
    pub by_provider: Vec<ProviderMetrics>,
}

/// Upstream calls of one provider.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProviderMetrics {
    /// The provider.
    pub provider: String,
    /// Calls recorded.
    pub requests: u64,
    /// Their total cost.
    pub cost_usd: f64,
    /// Mean response time.
    pub avg_response_time_ms: f64,
}

/// Entries waiting to be freed by a recording thread; past this the recorder frees them itself.
const RETURN_CAPACITY: usize = 4096;
/// Bytes of entries (as [`Entry::weight`] counts them) the queued events may hold between them.
/// Past this an event carries the entry without its texts ([`without_texts`]): a lookup's event
/// may be all that keeps an entry alive (one the memory tier did not keep, or has evicted since),
/// and a queue of 16,384 events behind a busy recorder held 73 MiB of them in a replay of a
/// million disk-tier hits. The rollups read no text; a hot key first seen that way gets its
/// preview from a later hit.
pub const MAX_HELD_BYTES: u64 = 8 << 20;
/// Request metrics kept in memory while the store fails (about 100 bytes each); beyond this
/// the oldest are dropped and counted ([`Analytics::request_metrics_dropped`]).
pub const MAX_PENDING_REQUESTS: usize = 65_536;
/// Digests of served entries kept in memory while the store fails; beyond this a hit is not
/// noted (its entry may then be reported cold).
const MAX_PENDING_HIT_IDS: usize = 1 << 20;
/// Digests remembered as noted already, so that a hit on them writes nothing; past this the
/// set starts over (about 2 MiB), and a hit on a forgotten one notes it again (a newer time).
const MAX_MARKED: usize = 1 << 16;

const TREE_ROLLUPS: &str = "analytics.hourly";
const TREE_REQUESTS: &str = "analytics.requests";
const TREE_META: &str = "analytics.meta";
const META_HOT_KEYS: &[u8] = b"hot_keys";
const META_DROPPED: &[u8] = b"dropped";

struct Trees {
    rollups: sled::Tree,
    hit_marks: HitMarks,
    requests: sled::Tree,
    meta: sled::Tree,
}

#[derive(Default)]
struct AggressiveWindow {
    /// Aggressive-profile digest → the digest of the entry it was seen with.
    seen: HashMap<u64, u64>,
}

struct State {
    pending: HashMap<RowKey, Rollup>,
    session: BTreeMap<RowKey, Rollup>,
    sketch: Sketch,
    new_hit_ids: Vec<u128>,
    marked: HashSet<u128>,
    aggressive: AggressiveWindow,
    /// Request metrics waiting to be written, oldest first; at most [`MAX_PENDING_REQUESTS`].
    requests: VecDeque<RequestMetric>,
    /// Request metrics dropped past that bound.
    requests_dropped: u64,
    dirty_days: BTreeSet<NaiveDate>,
    request_seq: u64,
    dropped_stored: u64,
    last_persist: Instant,
}

struct Shared {
    rx: Mutex<Receiver<Event>>,
    /// Entries this thread held last, on their way back to the recording threads.
    returned: crossbeam_channel::Sender<Arc<Entry>>,
    state: Mutex<State>,
    trees: Trees,
    dropped: AtomicU64,
    /// Bytes of entries the queued events hold ([`MAX_HELD_BYTES`]).
    held: AtomicU64,
    config: AnalyticsConfig,
    /// Warnings about failed persists: one per [`WARN_EVERY`](crate::WARN_EVERY).
    persist_warnings: Throttle,
    /// Writes a persist may still make before they fail (tests inject store failures).
    #[cfg(test)]
    writes_left: std::sync::atomic::AtomicI64,
}

/// Recording and reading of analytics for one cache. Dropping it stops the background thread
/// after a last drain and persist.
pub struct Analytics {
    tx: SyncSender<Event>,
    /// Entries to free on a recording thread (see [`Shared::drain`]).
    returned: crossbeam_channel::Receiver<Arc<Entry>>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Analytics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Analytics")
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Analytics {
    /// Records into the trees `analytics.*` of `db` (the disk tier's database), where rollups
    /// survive restarts, and starts the background thread.
    pub fn open(db: &sled::Db, config: AnalyticsConfig) -> Result<Self, AnalyticsError> {
        let trees = Trees {
            rollups: db.open_tree(TREE_ROLLUPS)?,
            hit_marks: HitMarks::open(db)?,
            requests: db.open_tree(TREE_REQUESTS)?,
            meta: db.open_tree(TREE_META)?,
        };
        let hot_keys: Vec<HotKey> = match trees.meta.get(META_HOT_KEYS)? {
            Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            None => Vec::new(),
        };
        let dropped_stored = match trees.meta.get(META_DROPPED)? {
            Some(bytes) => <[u8; 8]>::try_from(bytes.as_ref()).map_or(0, u64::from_be_bytes),
            None => 0,
        };
        let (tx, rx) = sync_channel(config.channel_capacity.max(1));
        let (returned_tx, returned) = crossbeam_channel::bounded(RETURN_CAPACITY);
        let state = State {
            pending: HashMap::new(),
            session: BTreeMap::new(),
            sketch: Sketch::from_keys(config.hot_key_capacity, hot_keys),
            new_hit_ids: Vec::new(),
            marked: HashSet::new(),
            aggressive: AggressiveWindow::default(),
            requests: VecDeque::new(),
            requests_dropped: 0,
            dirty_days: BTreeSet::new(),
            request_seq: 0,
            dropped_stored,
            last_persist: Instant::now(),
        };
        let shared = Arc::new(Shared {
            rx: Mutex::new(rx),
            returned: returned_tx,
            state: Mutex::new(state),
            trees,
            dropped: AtomicU64::new(0),
            held: AtomicU64::new(0),
            config,
            persist_warnings: Throttle::default(),
            #[cfg(test)]
            writes_left: std::sync::atomic::AtomicI64::new(i64::MAX),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let worker = {
            let shared = Arc::clone(&shared);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("strata-analytics".into())
                .spawn(move || shared.run(&stop))
                .map_err(|e| AnalyticsError::Store(sled::Error::Io(e)))?
        };
        Ok(Analytics {
            tx,
            returned,
            shared,
            stop,
            worker: Some(worker),
        })
    }

    /// Records into a temporary sled database, gone when the process ends (for a cache with no
    /// disk tier).
    pub fn temporary(config: AnalyticsConfig) -> Result<Self, AnalyticsError> {
        let db = sled::Config::new().temporary(true).open()?;
        Analytics::open(&db, config)
    }

    /// Hands an event to the background thread; never blocks. A full channel drops the event
    /// and counts it ([`Analytics::dropped`]).
    pub fn record(&self, event: Event) {
        let event = self.within_budget(event);
        if let Err(TrySendError::Full(event) | TrySendError::Disconnected(event)) =
            self.tx.try_send(event)
        {
            self.shared.held.fetch_sub(held_by(&event), Relaxed);
            self.shared.dropped.fetch_add(1, Relaxed);
        }
        // At most one entry comes back per event; taking two keeps the queue short.
        for _ in 0..2 {
            if self.returned.try_recv().is_err() {
                break;
            }
        }
    }

    /// `event`, counted against [`MAX_HELD_BYTES`]; with its entry's texts left out if the
    /// queued events already hold that much.
    fn within_budget(&self, mut event: Event) -> Event {
        let held = &self.shared.held;
        if let Event::Lookup { entry: Some(e), .. } | Event::Expired(e) = &mut event {
            let weight = u64::from(e.weight());
            if held.fetch_add(weight, Relaxed) + weight > MAX_HELD_BYTES {
                held.fetch_sub(weight, Relaxed);
                *e = Arc::new(without_texts(e));
                held.fetch_add(u64::from(e.weight()), Relaxed);
            }
        }
        event
    }

    /// Events dropped by this process because the channel was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Relaxed)
    }

    /// Events dropped over the store's lifetime (every process that used it).
    pub fn dropped_total(&self) -> u64 {
        lock(&self.shared.state).dropped_stored + self.dropped()
    }

    /// Request metrics this process dropped because more than [`MAX_PENDING_REQUESTS`] were
    /// waiting for a store that failed.
    pub fn request_metrics_dropped(&self) -> u64 {
        lock(&self.shared.state).requests_dropped
    }

    /// The seeds' request metrics API: records one upstream call (off the hot path).
    pub fn record_request_metrics(
        &self,
        request_id: &str,
        provider: &str,
        response_time_ms: u64,
        cost_usd: f64,
    ) {
        self.record(Event::Request(Box::new(RequestMetric {
            request_id: request_id.to_owned(),
            provider: provider.to_owned(),
            response_time_ms,
            cost_usd,
            at_ms: Utc::now().timestamp_millis(),
        })));
    }

    /// The seeds' request metrics API: upstream calls recorded over the last `hours` hours.
    pub fn metrics_for_period(&self, hours: u64) -> Result<PeriodMetrics, AnalyticsError> {
        self.flush()?;
        let since_ms = Utc::now().timestamp_millis() - (hours as i64).saturating_mul(3_600_000);
        let mut times = Vec::new();
        let mut total_nano = 0;
        let mut by_provider: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
        for item in self
            .shared
            .trees
            .requests
            .range(sortable_be(since_ms).to_vec()..)
        {
            let (_, value) = item?;
            let metric: RequestMetric = serde_json::from_slice(&value)?;
            let cost = usd_to_nano(metric.cost_usd);
            times.push(metric.response_time_ms);
            total_nano += cost;
            let slot = by_provider.entry(metric.provider).or_default();
            slot.0 += 1;
            slot.1 += cost;
            slot.2 += metric.response_time_ms;
        }
        times.sort_unstable();
        let quantile = |q: f64| -> u64 {
            if times.is_empty() {
                0
            } else {
                let i = ((times.len() - 1) as f64 * q).round() as usize;
                times[i.min(times.len() - 1)]
            }
        };
        let mean = |sum: u64, n: u64| if n == 0 { 0.0 } else { sum as f64 / n as f64 };
        let mut providers: Vec<ProviderMetrics> = by_provider
            .into_iter()
            .map(|(provider, (n, cost, ms))| ProviderMetrics {
                provider,
                requests: n,
                cost_usd: nano_to_usd(cost),
                avg_response_time_ms: mean(ms, n),
            })
            .collect();
        providers.sort_by_key(|p| std::cmp::Reverse(p.requests));
        Ok(PeriodMetrics {
            hours,
            requests: times.len() as u64,
            cost_usd: nano_to_usd(total_nano),
            avg_response_time_ms: mean(times.iter().sum(), times.len() as u64),
            p50_response_time_ms: quantile(0.5),
            p95_response_time_ms: quantile(0.95),
            by_provider: providers,
        })
    }

    /// Drains the channel and merges everything recorded so far into sled.
    pub fn flush(&self) -> Result<(), AnalyticsError> {
        self.shared.drain_and_persist()
    }

    /// Stored rows whose hour starts in `[since, until)`, oldest first (after a flush).
    pub fn rows(
        &self,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) -> Result<Vec<HourRow>, AnalyticsError> {
        self.flush()?;
        let from = since.map_or(i64::MIN, RowKey::hour_of);
        let to = until.map_or(i64::MAX, |t| {
            RowKey::hour_of(t - chrono::Duration::nanoseconds(1))
        });
        let mut rows = Vec::new();
        for item in self
            .shared
            .trees
            .rollups
            .range(sortable_be(from).to_vec()..)
        {
            let (key, value) = item?;
            let Some(key) = RowKey::decode(&key) else {
                continue;
            };
            if key.hour > to {
                break;
            }
            rows.push(HourRow {
                key,
                rollup: serde_json::from_slice(&value)?,
            });
        }
        Ok(rows)
    }

    /// This process's rows (since the cache was opened), oldest first.
    pub fn session_rows(&self) -> Vec<HourRow> {
        self.shared.drain();
        lock(&self.shared.state)
            .session
            .iter()
            .map(|(key, rollup)| HourRow {
                key: key.clone(),
                rollup: rollup.clone(),
            })
            .collect()
    }

    /// The `n` hottest keys over the store's lifetime.
    pub fn hot_keys(&self, n: usize) -> Vec<HotKey> {
        self.shared.drain();
        lock(&self.shared.state).sketch.top(n)
    }

    /// Whether the entry with this digest was ever served as a hit from the memory tier or S3
    /// (for cold-entry reports; a disk-tier hit is kept in the disk tier's record instead).
    pub fn was_hit(&self, id: u128) -> Result<bool, AnalyticsError> {
        if lock(&self.shared.state).marked.contains(&id) {
            return Ok(true);
        }
        Ok(self.shared.trees.hit_marks.contains(id)?)
    }

    /// Drops what grows with every distinct key and request for ever: hit ids and request
    /// metrics older than `age`. A hit id counts from the last time this process or an
    /// earlier one marked it (ids stored before times were kept count from now). Returns
    /// (hit ids, request metrics) removed.
    pub fn prune(&self, age: std::time::Duration) -> Result<(u64, u64), AnalyticsError> {
        self.flush()?;
        let now = Utc::now().timestamp_millis();
        let cutoff = now.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX));
        let trees = &self.shared.trees;
        let ids = trees
            .hit_marks
            .prune(cutoff, now, |marks, swap| self.shared.swap(marks, swap))?;
        // Streamed: sled's iterators go on over a tree that changes under them.
        let mut requests = 0;
        for key in trees.requests.range(..sortable_be(cutoff).to_vec()).keys() {
            trees.requests.remove(key?)?;
            requests += 1;
        }
        // Ids hit again from now on are marked (and timed) afresh.
        lock(&self.shared.state).marked.clear();
        Ok((ids, requests))
    }

    /// Days with rows recorded since the last call, for publishing daily documents.
    pub fn take_dirty_days(&self) -> Vec<NaiveDate> {
        self.shared.drain();
        std::mem::take(&mut lock(&self.shared.state).dirty_days)
            .into_iter()
            .collect()
    }

    /// Marks a day as changed again (its publication failed and must be retried).
    pub fn mark_dirty(&self, day: NaiveDate) {
        lock(&self.shared.state).dirty_days.insert(day);
    }

    /// This node's document for one UTC day, as published to S3.
    pub fn daily(&self, node_id: &str, date: NaiveDate) -> Result<DailyRollups, AnalyticsError> {
        let start = date.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
        let rows = self.rows(Some(start), Some(start + chrono::Duration::days(1)))?;
        Ok(DailyRollups {
            version: DAILY_VERSION,
            node_id: node_id.to_owned(),
            date,
            written_at: Utc::now(),
            rows,
            hot_keys: self.hot_keys(50),
            dropped: self.dropped_total(),
        })
    }
}

impl Drop for Analytics {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(worker) = self.worker.take() {
            worker.thread().unpark();
            let _ = worker.join();
        }
    }
}

impl Shared {
    fn run(&self, stop: &AtomicBool) {
        loop {
            std::thread::park_timeout(self.config.poll_interval);
            let stopping = stop.load(Relaxed);
            self.drain();
            let due = lock(&self.state).last_persist.elapsed() >= self.config.persist_interval;
            if (due || stopping)
                && let Err(e) = self.drain_and_persist()
            {
                if stopping {
                    tracing::warn!(error = %e, "persisting analytics at close failed");
                } else {
                    throttled!(
                        self.persist_warnings,
                        error = %e,
                        "persisting analytics failed; will retry"
                    );
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// Moves every queued event into the in-memory rollups.
    fn drain(&self) {
        let rx = lock(&self.rx);
        let mut state = lock(&self.state);
        let now = Utc::now();
        // Empty or disconnected: either way, nothing more to take now.
        while let Ok(event) = rx.try_recv() {
            self.held.fetch_sub(held_by(&event), Relaxed);
            if let Some(entry) = state.apply(event, now, &self.config)
                && Arc::strong_count(&entry) == 1
            {
                // The last reference (the tiers let go of the entry meanwhile): send it back
                // to be freed by the threads that record, which allocated it. glibc frees a
                // block on the arena of the thread that allocated it, under that arena's lock:
                // freeing every served entry here made each lookup wait on this thread's frees.
                // A full return queue: free it here after all.
                let _ = self.returned.try_send(entry);
            }
        }
    }

    /// Drains the channel and writes what is pending into the trees. Each rollup, hit id and
    /// request metric leaves the pending state once sled has taken it, so a write that fails
    /// part-way keeps the rest for the next attempt and adds nothing twice. A failed attempt
    /// counts as one: the thread retries a persist interval later, not at every poll.
    ///
    /// sled 0.34 keeps its first I/O error (a full disk) for the rest of the process: from then
    /// on every attempt fails, what is pending stays in memory (bounded) and is lost at close,
    /// with a warning, as are writes sled had taken but not yet flushed.
    fn drain_and_persist(&self) -> Result<(), AnalyticsError> {
        self.drain();
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        state.last_persist = Instant::now();
        let trees = &self.trees;
        let keys: Vec<RowKey> = state.pending.keys().cloned().collect();
        for key in keys {
            let Some(delta) = state.pending.get(&key) else {
                continue;
            };
            let encoded = key.encode();
            let mut total: Rollup = match trees.rollups.get(&encoded)? {
                Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
                None => Rollup::default(),
            };
            total.add(delta);
            self.insert(&trees.rollups, encoded, serde_json::to_vec(&total)?)?;
            state.pending.remove(&key);
        }
        // Each id with the time it was (last) marked as hit, for pruning by age; one write per
        // bucket, taken from the end so that what is written leaves and the rest waits.
        let now_ms = Utc::now().timestamp_millis();
        state.new_hit_ids.sort_unstable();
        while let Some(&last) = state.new_hit_ids.last() {
            let bucket = hit_marks::bucket_of(last);
            let start = state
                .new_hit_ids
                .partition_point(|id| hit_marks::bucket_of(*id) < bucket);
            loop {
                let Some(swap) = trees.hit_marks.mark(&state.new_hit_ids[start..], now_ms)? else {
                    break;
                };
                if self.swap(&trees.hit_marks, swap)? {
                    break;
                }
            }
            state.new_hit_ids.truncate(start);
        }
        if trees.hit_marks.has_legacy() {
            trees
                .hit_marks
                .take_up_legacy(now_ms, |marks, swap| self.swap(marks, swap))?;
        }
        while let Some(metric) = state.requests.front() {
            let seq = state.request_seq + 1;
            let mut key = sortable_be(metric.at_ms).to_vec();
            key.extend_from_slice(&seq.to_be_bytes());
            key.extend_from_slice(&std::process::id().to_be_bytes());
            self.insert(&trees.requests, key, serde_json::to_vec(metric)?)?;
            state.request_seq = seq;
            state.requests.pop_front();
        }
        let capacity = self.config.hot_key_capacity;
        let hot = state.sketch.top(capacity);
        self.insert(&trees.meta, META_HOT_KEYS, serde_json::to_vec(&hot)?)?;
        let dropped = state.dropped_stored + self.dropped.load(Relaxed);
        self.insert(&trees.meta, META_DROPPED, &dropped.to_be_bytes())?;
        Ok(())
    }

    /// One bucket write of hit marks, as [`Shared::insert`] counts writes; `false` when the
    /// bucket changed since it was read.
    fn swap(&self, marks: &HitMarks, swap: hit_marks::Swap) -> sled::Result<bool> {
        self.count_write()?;
        marks.apply(swap)
    }

    /// Counts one write against `writes_left` (tests inject write failures with it: a write
    /// past the count fails).
    fn count_write(&self) -> sled::Result<()> {
        #[cfg(test)]
        if self
            .writes_left
            .fetch_update(Relaxed, Relaxed, |n| (n > 0).then(|| n - 1))
            .is_err()
        {
            let injected = std::io::Error::other("injected write failure");
            return Err(sled::Error::Io(injected));
        }
        Ok(())
    }

    /// One write of a persist.
    fn insert(
        &self,
        tree: &sled::Tree,
        key: impl AsRef<[u8]>,
        value: impl Into<sled::IVec>,
    ) -> Result<(), AnalyticsError> {
        self.count_write()?;
        tree.insert(key, value)?;
        Ok(())
    }
}

/// Bytes of entry `event` holds, as counted against [`MAX_HELD_BYTES`].
fn held_by(event: &Event) -> u64 {
    match event {
        Event::Lookup { entry: Some(e), .. } | Event::Expired(e) => u64::from(e.weight()),
        _ => 0,
    }
}

/// `e` without its request and response texts, tags and epochs: all the rollups, the hot keys
/// (but for the preview) and the TTL ages read of an entry.
fn without_texts(e: &Entry) -> Entry {
    Entry {
        cache_id: e.cache_id.clone(),
        cache_key: e.cache_key.clone(),
        request: String::new(),
        response: strata_core::JsonText::null(),
        model: e.model.clone(),
        provider: e.provider.clone(),
        tokens: e.tokens,
        cost: e.cost,
        latency_ms: e.latency_ms,
        created_at: e.created_at,
        expires_at: e.expires_at,
        tags: Vec::new(),
        scope: e.scope.clone(),
        hit_count: e.hit_count,
        last_accessed: e.last_accessed,
        epochs: BTreeMap::new(),
    }
}

fn scope_index(scope: &Scope) -> usize {
    match scope {
        Scope::Global => 0,
        Scope::Namespace(_) => 1,
        Scope::User(_) => 2,
        Scope::Session(_) => 3,
    }
}

fn id_of(entry: &Entry) -> Option<u128> {
    u128::from_str_radix(&entry.cache_id, 16).ok()
}

fn age_ms(entry: &Entry, now: DateTime<Utc>) -> u64 {
    (now - entry.created_at).num_milliseconds().max(0) as u64
}

impl State {
    fn row(&mut self, key: RowKey) -> (&mut Rollup, &mut Rollup) {
        self.dirty_days.insert(key.day());
        let session = self.session.entry(key.clone()).or_default();
        let pending = self.pending.entry(key).or_default();
        (pending, session)
    }

    /// Folds one event into the rollups; hands back the entry it carried, if any.
    fn apply(
        &mut self,
        event: Event,
        now: DateTime<Utc>,
        config: &AnalyticsConfig,
    ) -> Option<Arc<Entry>> {
        let hour = RowKey::hour_of(now);
        match event {
            Event::Lookup {
                outcome,
                entry,
                model,
                lookup_us,
                aggressive,
            } => {
                let key = match (&entry, model) {
                    (Some(e), _) => RowKey {
                        hour,
                        model: e.model.clone(),
                        provider: e.provider.clone(),
                    },
                    (None, model) => RowKey {
                        hour,
                        model: model.map(String::from).unwrap_or_default(),
                        provider: String::new(),
                    },
                };
                let would_hit = match (&entry, aggressive) {
                    (Some(e), Some(digest)) => {
                        self.aggressive_check(e, digest, config.aggressive_window)
                    }
                    _ => false,
                };
                if outcome.is_hit()
                    && let Some(e) = &entry
                    && let Some(id) = id_of(e)
                {
                    self.sketch.hit(id, e);
                    if self.marked.len() >= MAX_MARKED {
                        self.marked.clear();
                    }
                    // A disk-tier hit is written in the copy's record by the disk tier (its
                    // last hit): marking it here too would rewrite a bucket of this tree per
                    // distinct entry hit, which at a million entries cost the process tens of
                    // MiB and the lookups a third of their time (BENCHMARKS.md).
                    if outcome != Outcome::L2
                        && self.new_hit_ids.len() < MAX_PENDING_HIT_IDS
                        && self.marked.insert(id)
                    {
                        self.new_hit_ids.push(id);
                    }
                }
                let (pending, session) = self.row(key);
                for rollup in [pending, session] {
                    rollup.lookups += 1;
                    match outcome {
                        Outcome::L1 => rollup.l1 += 1,
                        Outcome::L2 => rollup.l2 += 1,
                        Outcome::L3 => rollup.l3 += 1,
                        Outcome::Coalesced => rollup.coalesced += 1,
                        Outcome::Miss => rollup.misses += 1,
                        Outcome::Uncacheable => rollup.uncacheable += 1,
                    }
                    let Some(e) = &entry else { continue };
                    rollup.scopes[scope_index(&e.scope)] += 1;
                    let cost = usd_to_nano(e.cost.total);
                    if outcome.is_hit() {
                        rollup.cost_saved_nano = rollup.cost_saved_nano.saturating_add(cost);
                        rollup.input_tokens_saved =
                            rollup.input_tokens_saved.saturating_add(e.tokens.input);
                        rollup.output_tokens_saved =
                            rollup.output_tokens_saved.saturating_add(e.tokens.output);
                        rollup.latency_saved_ms =
                            rollup.latency_saved_ms.saturating_add(e.latency_ms);
                        rollup.hit_lookup_us =
                            rollup.hit_lookup_us.saturating_add(u64::from(lookup_us));
                        rollup.hit_ages[age_bucket(age_ms(e, now))] += 1;
                    } else {
                        rollup.cost_spent_nano = rollup.cost_spent_nano.saturating_add(cost);
                    }
                    if would_hit {
                        rollup.aggressive_would_hit += 1;
                        rollup.aggressive_would_save_nano =
                            rollup.aggressive_would_save_nano.saturating_add(cost);
                    }
                }
                entry
            }
            Event::Expired(e) => {
                let key = RowKey {
                    hour,
                    model: e.model.clone(),
                    provider: e.provider.clone(),
                };
                let bucket = age_bucket(age_ms(&e, now));
                let (pending, session) = self.row(key);
                for rollup in [pending, session] {
                    rollup.expired += 1;
                    rollup.expired_ages[bucket] += 1;
                }
                Some(e)
            }
            Event::Request(metric) => {
                if self.requests.len() >= MAX_PENDING_REQUESTS {
                    // The store has been failing for a while: keep the newest, count the
                    // oldest as dropped.
                    self.requests.pop_front();
                    self.requests_dropped += 1;
                }
                self.requests.push_back(*metric);
                None
            }
        }
    }

    /// Remembers a miss's aggressive-profile digest; returns whether a different entry was seen
    /// with the same one (so this request would have hit under `aggressive`).
    fn aggressive_check(&mut self, entry: &Entry, digest: u64, window: usize) -> bool {
        let Some(own) = id_of(entry) else {
            return false;
        };
        let own = own as u64;
        if self.aggressive.seen.len() >= window.max(1) {
            self.aggressive.seen.clear();
        }
        match self.aggressive.seen.insert(digest, own) {
            Some(other) => other != own,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_entry;

    fn entry(text: &str, cost: f64) -> Arc<Entry> {
        Arc::new(test_entry::entry(text, cost, (10, 5), 700))
    }

    /// A recorder whose thread does not drain on its own within a test: only readers drain.
    fn undrained() -> Result<Analytics, AnalyticsError> {
        Analytics::temporary(AnalyticsConfig {
            poll_interval: Duration::from_secs(3600),
            ..AnalyticsConfig::default()
        })
    }

    fn hit(e: &Arc<Entry>) -> Event {
        Event::Lookup {
            outcome: Outcome::L1,
            entry: Some(Arc::clone(e)),
            model: None,
            lookup_us: 9,
            aggressive: None,
        }
    }

    #[test]
    fn entries_the_recorder_held_last_are_freed_by_a_recording_thread() -> Result<(), AnalyticsError>
    {
        let analytics = undrained()?;
        let e = entry("x", 0.25);
        let watch = Arc::downgrade(&e);
        analytics.record(hit(&e));
        drop(e);
        analytics.flush()?;
        // Counted, and not freed on the recorder's thread: it waits in the return queue.
        assert_eq!(analytics.session_rows()[0].rollup.l1, 1);
        assert!(watch.upgrade().is_some(), "freed by the recorder's thread");
        analytics.record(Event::Request(Box::new(RequestMetric {
            request_id: "r".into(),
            provider: "openai".into(),
            response_time_ms: 1,
            cost_usd: 0.0,
            at_ms: 0,
        })));
        assert!(watch.upgrade().is_none(), "the next record frees it");
        Ok(())
    }

    /// Queued events hold at most [`MAX_HELD_BYTES`] of whole entries; past that they carry the
    /// entries without their texts. Every hit is still counted with its savings, nothing stays
    /// counted as held once drained, and a hot key first seen without its text gets its preview
    /// from a later hit.
    #[test]
    fn queued_events_hold_a_bounded_weight_of_entries_and_lose_no_count()
    -> Result<(), AnalyticsError> {
        let analytics = undrained()?;
        let long = "word ".repeat(20_000);
        let entries: Vec<Arc<Entry>> = (0..200)
            .map(|i| entry(&format!("question {i}: {long}"), 0.25))
            .collect();
        for e in &entries {
            analytics.record(hit(e));
        }
        // The events not drained yet that hold an entry whole are its second reference.
        let whole: Vec<&Arc<Entry>> = entries
            .iter()
            .filter(|e| Arc::strong_count(e) > 1)
            .collect();
        let held: u64 = whole.iter().map(|e| u64::from(e.weight())).sum();
        assert!(
            !whole.is_empty() && whole.len() < entries.len(),
            "{} whole",
            whole.len()
        );
        assert!(
            held <= MAX_HELD_BYTES,
            "{held} bytes of whole entries queued"
        );
        let rows = analytics.session_rows();
        assert_eq!(rows.iter().map(|r| r.rollup.l1).sum::<u64>(), 200);
        assert_eq!(
            rows.iter().map(|r| r.rollup.cost_saved_nano).sum::<u64>(),
            200 * usd_to_nano(0.25)
        );
        assert_eq!(
            rows.iter()
                .map(|r| r.rollup.input_tokens_saved)
                .sum::<u64>(),
            200 * 10
        );
        assert_eq!(analytics.shared.held.load(Relaxed), 0);
        let last = &entries[199];
        let preview_of = |analytics: &Analytics| {
            analytics
                .hot_keys(256)
                .into_iter()
                .find(|k| k.cache_key == last.cache_key)
                .map(|k| k.preview)
        };
        assert_eq!(preview_of(&analytics).as_deref(), Some(""));
        analytics.record(hit(last));
        let preview = preview_of(&analytics).unwrap_or_default();
        assert!(preview.starts_with("question 199"), "{preview:?}");
        Ok(())
    }

    /// A disk-tier hit is counted but not marked: the disk tier keeps it in the copy's record.
    /// A hit from memory or S3 is marked.
    #[test]
    fn hits_from_memory_and_s3_are_marked_and_disk_tier_hits_are_not() -> Result<(), AnalyticsError>
    {
        let analytics = undrained()?;
        let id_of = |e: &Arc<Entry>| u128::from_str_radix(&e.cache_id, 16).unwrap_or(0);
        let entries = [entry("l1", 0.25), entry("l2", 0.25), entry("l3", 0.25)];
        for (e, outcome) in entries.iter().zip([Outcome::L1, Outcome::L2, Outcome::L3]) {
            analytics.record(Event::Lookup {
                outcome,
                entry: Some(Arc::clone(e)),
                model: None,
                lookup_us: 9,
                aggressive: None,
            });
        }
        analytics.flush()?;
        let marked: Vec<bool> = entries
            .iter()
            .map(|e| analytics.was_hit(id_of(e)))
            .collect::<Result<_, _>>()?;
        assert_eq!(marked, [true, false, true]);
        assert_eq!(analytics.shared.trees.hit_marks.count()?.1, 2);
        let rows = analytics.rows(None, None)?;
        let r = &rows[0].rollup;
        assert_eq!((r.l1, r.l2, r.l3), (1, 1, 1));
        Ok(())
    }

    #[test]
    fn rollups_and_hot_keys_persist_across_reopen() -> Result<(), AnalyticsError> {
        let dir = tempfile::tempdir().map_err(|e| AnalyticsError::Store(e.into()))?;
        let e = entry("x", 0.25);
        {
            let db = sled::open(dir.path())?;
            let analytics = Analytics::open(&db, AnalyticsConfig::default())?;
            for _ in 0..3 {
                analytics.record(hit(&e));
            }
            analytics.record(Event::Expired(Arc::clone(&e)));
            // Dropping persists what is still queued.
        }
        // sled's background threads hold the directory's lock for a moment after the drop
        // (longer on a loaded machine); the disk tier waits for it the same way.
        let started = Instant::now();
        let db = loop {
            match sled::open(dir.path()) {
                Ok(db) => break db,
                Err(_) if started.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let analytics = Analytics::open(&db, AnalyticsConfig::default())?;
        let rows = analytics.rows(None, None)?;
        assert_eq!(rows.len(), 1);
        let r = &rows[0].rollup;
        assert_eq!((r.lookups, r.l1, r.expired), (3, 3, 1));
        assert_eq!(r.cost_saved_nano, 750_000_000);
        assert_eq!(r.latency_saved_ms, 2_100);
        assert_eq!(r.hit_ages[0], 3);
        assert_eq!(analytics.hot_keys(1)[0].hits, 3);
        assert!(analytics.was_hit(u128::from_str_radix(&e.cache_id, 16).unwrap_or(0))?);
        assert!(
            analytics.session_rows().is_empty(),
            "a new process starts a new session"
        );
        Ok(())
    }

    #[test]
    fn a_full_channel_drops_and_counts_and_never_blocks() -> Result<(), AnalyticsError> {
        let config = AnalyticsConfig {
            channel_capacity: 4,
            poll_interval: Duration::from_secs(3600),
            ..AnalyticsConfig::default()
        };
        let analytics = Analytics::temporary(config)?;
        let e = entry("y", 0.0);
        for _ in 0..10 {
            analytics.record(hit(&e));
        }
        assert_eq!(analytics.dropped(), 6);
        let rows = analytics.rows(None, None)?;
        assert_eq!(rows[0].rollup.lookups, 4);
        assert_eq!(analytics.dropped_total(), 6);
        Ok(())
    }

    fn metric(id: usize) -> Event {
        Event::Request(Box::new(RequestMetric {
            request_id: format!("r{id}"),
            provider: "openai".into(),
            response_time_ms: 100,
            cost_usd: 0.01,
            at_ms: Utc::now().timestamp_millis(),
        }))
    }

    #[test]
    fn a_persist_that_fails_part_way_loses_nothing_and_adds_nothing_twice()
    -> Result<(), AnalyticsError> {
        let a = entry("a", 0.25);
        let mut other = test_entry::entry("b", 0.5, (1, 1), 100);
        other.provider = "q".into();
        let b = Arc::new(other);
        // A persist here makes 10 writes: 2 rollups, 2 hit ids, 4 request metrics, 2 of meta.
        // Let the store fail after each number of them in turn (a full disk that clears).
        for fail_after in 0..10 {
            let analytics = undrained()?;
            for _ in 0..3 {
                analytics.record(hit(&a));
                analytics.record(hit(&b));
            }
            for id in 0..4 {
                analytics.record(metric(id));
            }
            analytics.shared.writes_left.store(fail_after, Relaxed);
            assert!(analytics.flush().is_err(), "after {fail_after} writes");
            assert!(analytics.flush().is_err(), "failing again changes nothing");
            analytics.shared.writes_left.store(i64::MAX, Relaxed);
            analytics.flush()?;

            let rows = analytics.rows(None, None)?;
            assert_eq!(rows.len(), 2, "after {fail_after} writes");
            for row in &rows {
                let counts = (row.rollup.lookups, row.rollup.l1);
                assert_eq!(counts, (3, 3), "after {fail_after} writes");
            }
            for e in [&a, &b] {
                let id = u128::from_str_radix(&e.cache_id, 16).unwrap_or(0);
                let stored = analytics.shared.trees.hit_marks.contains(id)?;
                assert!(stored, "after {fail_after} writes");
            }
            let metrics = analytics.metrics_for_period(24)?.requests;
            assert_eq!(metrics, 4, "after {fail_after} writes");
        }
        Ok(())
    }

    #[test]
    fn request_metrics_waiting_for_a_failing_store_are_bounded_and_counted()
    -> Result<(), AnalyticsError> {
        let analytics = undrained()?;
        analytics.shared.writes_left.store(0, Relaxed);
        let total = MAX_PENDING_REQUESTS + 1_000;
        for id in 0..total {
            analytics.record(metric(id));
            if id % 8_192 == 0 {
                // Drained into memory; the persist fails and keeps them.
                assert!(analytics.flush().is_err());
            }
        }
        assert!(analytics.flush().is_err());
        assert_eq!(
            lock(&analytics.shared.state).requests.len(),
            MAX_PENDING_REQUESTS
        );
        assert_eq!(analytics.request_metrics_dropped(), 1_000);
        assert_eq!(analytics.dropped_total(), 0, "the channel never filled");
        analytics.shared.writes_left.store(i64::MAX, Relaxed);
        let m = analytics.metrics_for_period(24)?;
        assert_eq!(m.requests, MAX_PENDING_REQUESTS as u64);
        Ok(())
    }

    #[test]
    fn request_metrics_over_a_period() -> Result<(), AnalyticsError> {
        let analytics = Analytics::temporary(AnalyticsConfig::default())?;
        analytics.record_request_metrics("r1", "openai", 100, 0.01);
        analytics.record_request_metrics("r2", "openai", 300, 0.02);
        analytics.record_request_metrics("r3", "anthropic", 200, 0.5);
        let m = analytics.metrics_for_period(24)?;
        assert_eq!(m.requests, 3);
        assert!((m.cost_usd - 0.53).abs() < 1e-9);
        assert!((m.avg_response_time_ms - 200.0).abs() < 1e-9);
        assert_eq!(m.p50_response_time_ms, 200);
        assert_eq!(m.by_provider[0].provider, "openai");
        assert_eq!(m.by_provider[0].requests, 2);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(analytics.metrics_for_period(0)?.requests, 0);
        Ok(())
    }
}
