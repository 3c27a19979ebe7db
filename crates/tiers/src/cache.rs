//! [`TieredCache`]: the lookup path through the tiers.
//!
//! 1. Key the request ([`Normalizer`]).
//! 2. L1: a hit that answers the request (same canonical request and scope) and has not expired
//!    is served at once.
//! 3. Below L1, concurrent lookups of one key share a single chain: moka's `try_get_with` runs
//!    one initializer per key and hands its result to every waiter. The initializer looks in L2,
//!    and on a miss runs the executor and writes the entry to L2; moka stores it in L1. An
//!    executor error reaches every waiter and is never cached.
//!    With an S3 tier, the initializer looks in L3 after L2; an L3 hit is promoted into L2
//!    (and L1 by moka). A miss is written to L1 and L2 at once and queued in the S3 outbox.
//! 4. A failing tier is logged and counted, and the lookup goes on as a miss.
//! 5. On every tier a copy is served only while the invalidation epochs admit it
//!    ([`EpochStore`]); a copy they no longer admit is dropped from that tier and the lookup
//!    goes on below. Invalidation, pruning and garbage collection live in [`crate::invalidate`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_json::value::RawValue;
use strata_analytics::{
    Analytics, AnalyticsConfig, ErrorKind, Event, Outcome, Pricing, Stats, TierName,
};
use strata_core::{
    CLOCK_SKEW, CacheKey, Codec, Cost, Entry, Epochs, JsonText, Keyed, ModelSlug, Normalizer,
    Profile, RequestError, Scope, Selector, Tokens,
};

use crate::disk::DiskTier;
use crate::epochs::EpochStore;
use crate::error::TierError;
use crate::memo::KeyMemo;
use crate::memory::MemoryTier;
use crate::s3::S3Tier;
use crate::tier::{Tier, TierUsage};
use crate::writer::{Failures, Sink, Writer};

/// How long entries live: a default and per-model overrides (keyed by normalized model name).
#[derive(Debug, Clone, Default)]
pub struct TtlPolicy {
    /// TTL of models without an override; `None` keeps entries until evicted or invalidated.
    pub default: Option<Duration>,
    /// TTL per normalized model name.
    pub per_model: HashMap<String, Duration>,
}

impl TtlPolicy {
    /// The TTL of `model`.
    pub fn for_model(&self, model: &str) -> Option<Duration> {
        // Without regard to case: `strict` keeps a request's `GPT-4O`.
        let per_model = self.per_model.get(model).or_else(|| {
            model
                .chars()
                .any(char::is_uppercase)
                .then(|| self.per_model.get(&model.to_lowercase()))
                .flatten()
        });
        per_model.copied().or(self.default)
    }

    /// Whether `entry` has expired at `now`: past its own expiry, or older than this node's
    /// TTL for its model. The configuration bounds every entry's life on this node, whatever
    /// was configured where (or when) it was written: lowering a TTL shortens the entries
    /// already stored, and other nodes' too; a TTL of an entry's own may shorten it, not
    /// lengthen it past the configured one.
    pub fn expired(&self, entry: &Entry, now: chrono::DateTime<Utc>) -> bool {
        entry.is_expired_at(now)
            || self.for_model(&entry.model).is_some_and(|ttl| {
                chrono::Duration::from_std(ttl)
                    .ok()
                    .and_then(|ttl| entry.created_at.checked_add_signed(ttl))
                    .is_some_and(|end| end <= now)
            })
    }
}

/// What an executor returns: the response and what it cost.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The response, as the provider returned it.
    pub response: Box<RawValue>,
    /// The provider (`openai`, `anthropic`, …).
    pub provider: String,
    /// Token counts; read from the response's `usage` when `None`.
    pub tokens: Option<Tokens>,
    /// What the call cost in USD; priced from `config/pricing.toml` when `None` (or not a
    /// finite, non-negative amount).
    pub cost_usd: Option<f64>,
    /// How long the call took; measured around the executor when `None`.
    pub latency_ms: Option<u64>,
    /// Labels stored with the entry.
    pub tags: Vec<String>,
    /// TTL of this entry, overriding the policy; one longer than a date can hold
    /// (`Duration::MAX`) never expires.
    pub ttl: Option<Duration>,
    /// When the answer was fetched, if before it is stored: the entry then counts as written
    /// then, and an invalidation made in between refuses it (see [`Completion::fetched_at`]).
    pub fetched_at: Option<chrono::DateTime<Utc>>,
}

impl Completion {
    /// A completion holding `response` as raw JSON.
    pub fn new(response: Box<RawValue>) -> Self {
        Completion {
            response,
            provider: String::new(),
            tokens: None,
            cost_usd: None,
            latency_ms: None,
            tags: Vec::new(),
            ttl: None,
            fetched_at: None,
        }
    }

    /// A completion from a parsed response.
    pub fn from_value(response: &Value) -> Self {
        // A `Value` always serializes; the default (`null`) is never reached.
        Completion::new(serde_json::value::to_raw_value(response).unwrap_or_default())
    }

    /// Sets the provider.
    pub fn provider(mut self, provider: impl Into<String>) -> Self {
        self.provider = provider.into();
        self
    }

    /// Sets the cost in USD.
    pub fn cost_usd(mut self, cost: f64) -> Self {
        self.cost_usd = Some(cost);
        self
    }

    /// Sets the latency.
    pub fn latency_ms(mut self, latency_ms: u64) -> Self {
        self.latency_ms = Some(latency_ms);
        self
    }

    /// Sets the tags.
    pub fn tags(mut self, tags: Vec<String>) -> Self {
        self.tags = tags;
        self
    }

    /// Sets the TTL of this entry.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Says when the answer was fetched, for a [`TieredCache::put`] made later: an answer
    /// fetched before an invalidation and stored after it would otherwise be served as new.
    /// A time in the future is taken as now.
    pub fn fetched_at(mut self, at: chrono::DateTime<Utc>) -> Self {
        self.fetched_at = Some(at);
        self
    }
}

/// The answer to a lookup and where it came from.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// The entry served (or just stored, on a miss).
    pub entry: Arc<Entry>,
    /// Where it came from.
    pub outcome: Outcome,
}

impl Lookup {
    /// The response as JSON text.
    pub fn response(&self) -> &JsonText {
        &self.entry.response
    }
}

/// Builds a [`TieredCache`].
///
/// ```no_run
/// # async fn demo() -> Result<(), strata_tiers::TierError> {
/// use strata_tiers::{DiskConfig, DiskTier, TieredCache};
/// let disk = DiskTier::open(&DiskConfig::new(".strata"), Default::default())?;
/// let cache = TieredCache::builder()
///     .memory_capacity(256 << 20)
///     .disk(disk)
///     .build();
/// # Ok(()) }
/// ```
pub struct TieredCacheBuilder {
    normalizer: Normalizer,
    memory_capacity: u64,
    key_memo: u64,
    l2: Option<Arc<dyn Tier>>,
    /// Whether `l2` is `disk` (not a custom tier set after it).
    l2_is_disk: bool,
    disk: Option<DiskTier>,
    l3: Option<S3Tier>,
    ttl: TtlPolicy,
    pricing: Pricing,
    epochs: Option<EpochStore>,
    refresh_interval: Duration,
    sweep_interval: Option<Duration>,
    analytics: Option<AnalyticsConfig>,
    publish_interval: Duration,
    actor: String,
    analytics_retention: Option<Duration>,
    forget_nodes_after: Option<Duration>,
}

impl TieredCacheBuilder {
    /// How long hit ids and request metrics are kept in the analytics store; `gc` prunes
    /// older ones. Default 90 days; `None` keeps them for ever.
    pub fn analytics_retention(mut self, keep: Option<Duration>) -> Self {
        self.analytics_retention = keep;
        self
    }

    /// After how long without a write another node's copy of the epochs is deleted by `gc`
    /// (a node stopped long ago). Default 30 days; `None` never.
    pub fn forget_nodes_after(mut self, after: Option<Duration>) -> Self {
        self.forget_nodes_after = after;
        self
    }

    /// Who the audit trail says does what this cache does (invalidations, clears, gc), unless
    /// a handle says otherwise ([`TieredCache::acting_as`]). Default: `local`.
    pub fn actor(mut self, who: impl Into<String>) -> Self {
        self.actor = who.into();
        self
    }

    /// Where the invalidation epochs live. Default: the disk tier's database when there is
    /// one (so they survive restarts), memory otherwise.
    pub fn epochs(mut self, epochs: EpochStore) -> Self {
        self.epochs = Some(epochs);
        self
    }

    /// How often epochs are exchanged with the bucket (with an S3 tier). Default 5 s: another
    /// node's invalidation stops this one serving within about that long.
    pub fn refresh_interval(mut self, every: Duration) -> Self {
        self.refresh_interval = every;
        self
    }

    /// How often a background sweep removes expired and invalidated entries from the disk
    /// tier. Default: never (call [`TieredCache::gc`]).
    pub fn sweep_interval(mut self, every: Option<Duration>) -> Self {
        self.sweep_interval = every;
        self
    }

    /// The normalizer (profile and aliases). Default: `standard`, no aliases.
    pub fn normalizer(mut self, normalizer: Normalizer) -> Self {
        self.normalizer = normalizer;
        self
    }

    /// The memory tier's bound in bytes. Default: 256 MiB.
    pub fn memory_capacity(mut self, bytes: u64) -> Self {
        self.memory_capacity = bytes;
        self
    }

    /// Bytes kept of request texts already keyed, with their keys, for
    /// [`TieredCache::key_text`]: a request sent again byte for byte skips parsing and
    /// normalization. Apart from the memory tier's bound; 0 turns it off. Default 16 MiB.
    pub fn key_memo(mut self, bytes: u64) -> Self {
        self.key_memo = bytes;
        self
    }

    /// A disk tier as L2; lifetime statistics are kept in it.
    pub fn disk(mut self, disk: DiskTier) -> Self {
        self.l2 = Some(Arc::new(disk.clone()));
        self.l2_is_disk = true;
        self.disk = Some(disk);
        self
    }

    /// Any tier as L2 (a custom store, or a fault-injecting wrapper in tests). After
    /// [`TieredCacheBuilder::disk`], the disk tier keeps the statistics and epochs and this tier
    /// holds the entries.
    pub fn l2(mut self, tier: Arc<dyn Tier>) -> Self {
        self.l2 = Some(tier);
        self.l2_is_disk = false;
        self
    }

    /// An S3 tier as L3. Writes reach it through its outbox; when the cache is built inside a
    /// tokio runtime, a background task drains the outbox.
    pub fn s3(mut self, tier: S3Tier) -> Self {
        self.l3 = Some(tier);
        self
    }

    /// The TTL policy. Default: entries never expire.
    pub fn ttl(mut self, ttl: TtlPolicy) -> Self {
        self.ttl = ttl;
        self
    }

    /// The price table used when a completion carries no cost. Default: empty.
    pub fn pricing(mut self, pricing: Pricing) -> Self {
        self.pricing = pricing;
        self
    }

    /// How lookups are recorded for reports (`None`: not at all). Recording is on by default.
    pub fn analytics(mut self, config: Option<AnalyticsConfig>) -> Self {
        self.analytics = config;
        self
    }

    /// How often this node's daily rollups are written to S3 (default one minute; `flush`
    /// writes them too).
    pub fn publish_interval(mut self, every: Duration) -> Self {
        self.publish_interval = every;
        self
    }

    /// Builds the cache.
    pub fn build(self) -> TieredCache {
        let baseline = self
            .disk
            .as_ref()
            .map(DiskTier::load_stats)
            .unwrap_or_default();
        if let Some(l3) = &self.l3 {
            l3.spawn_drainer();
        }
        let epochs = match (self.epochs, &self.disk) {
            (Some(epochs), _) => epochs,
            (None, Some(disk)) => EpochStore::open(disk).unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot load invalidation epochs; keeping them in memory");
                EpochStore::in_memory()
            }),
            (None, None) => EpochStore::in_memory(),
        };
        let analytics = self.analytics.map(|config| {
            let opened = match &self.disk {
                Some(disk) => Analytics::open(&disk.db(), config),
                None => Analytics::temporary(config),
            };
            opened.map_err(|e| {
                tracing::error!(error = %e, "cannot open the analytics store; lookups are not recorded");
            })
        });
        let aggressive = (self.normalizer.profile() != Profile::Aggressive)
            .then(|| self.normalizer.with_profile(Profile::Aggressive));
        // Without S3 there is no one else's invalidation to learn.
        let (epochs_known_tx, epochs_known) = tokio::sync::watch::channel(self.l3.is_none());
        let failures = Arc::new(Failures::default());
        // A custom L2 (not the disk tier) is written on the caller's path, as its trait allows.
        let writes_behind = match &self.l2 {
            Some(_) => self.l2_is_disk,
            None => self.l3.is_some(),
        };
        let sink = writes_behind.then(|| {
            Arc::new(Sink {
                disk: self.disk.clone().filter(|_| self.l2_is_disk),
                l3: self.l3.clone(),
                failures: Arc::clone(&failures),
            })
        });
        let writer = sink.as_ref().and_then(Writer::start);
        let audit = crate::audit::AuditLog::new(self.disk.as_ref().and_then(|disk| {
            disk.open_tree("audit")
                .map_err(|e| tracing::error!(error = %e, "cannot open the audit trail; operations are logged only"))
                .ok()
        }));
        let cache = TieredCache {
            actor: None,
            inner: Arc::new(Inner {
                actor: self.actor,
                analytics_retention: self.analytics_retention,
                forget_nodes_after: self.forget_nodes_after,
                audit,
                analytics: analytics.and_then(Result::ok),
                aggressive,
                epochs: Arc::new(epochs),
                normalizer: self.normalizer,
                memory: MemoryTier::new(self.memory_capacity),
                memo: KeyMemo::new(self.key_memo),
                l2: self.l2,
                disk: self.disk,
                l3: self.l3,
                failures: Arc::clone(&failures),
                sink,
                writer,
                baseline,
                ttl: self.ttl,
                pricing: self.pricing,
                unpriced: Mutex::default(),
                epochs_known,
                stop_waiting_for_epochs: AtomicBool::new(false),
                opened: Instant::now(),
            }),
        };
        if cache.inner.l3.is_some() {
            crate::invalidate::spawn_refresher(&cache, self.refresh_interval, epochs_known_tx);
            if cache.inner.analytics.is_some() {
                crate::reports::spawn_publisher(&cache, self.publish_interval);
            }
        }
        if let (Some(every), Some(_)) = (self.sweep_interval, &cache.inner.l2) {
            crate::invalidate::spawn_sweeper(&cache, every);
        }
        if cache.inner.disk.is_some() {
            spawn_stats_saver(&cache);
        }
        cache
    }
}

/// How often the lifetime statistics are written while lookups change them.
const STATS_SAVE_INTERVAL: Duration = Duration::from_secs(1);

/// Writes the lifetime statistics into the disk tier every [`STATS_SAVE_INTERVAL`] while they
/// change, as close and drop do: a process that is killed (`kill -9`, a crash) loses at most the
/// last interval of them, like the rest of what sled had not written yet.
fn spawn_stats_saver(cache: &TieredCache) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let weak = Arc::downgrade(&cache.inner);
    runtime.spawn(async move {
        let mut saved = Stats::default();
        loop {
            tokio::time::sleep(STATS_SAVE_INTERVAL).await;
            let Some(inner) = weak.upgrade() else { return };
            let now = inner.failures.counters.snapshot();
            if now != saved
                && let Some(disk) = &inner.disk
            {
                match disk.save_stats(&inner.baseline.merged(&now)) {
                    Ok(()) => saved = now,
                    Err(e) => inner.tier_failed(TierName::L2, "save statistics", &e),
                }
            }
        }
    });
}

/// The tiered cache: memory, then disk, then the executor. Cheap to clone.
#[derive(Clone)]
pub struct TieredCache {
    pub(crate) inner: Arc<Inner>,
    /// Who this handle acts for in the audit trail (`None`: the cache's actor).
    pub(crate) actor: Option<Arc<str>>,
}

pub(crate) struct Inner {
    /// Who the audit trail says acts, by default.
    pub(crate) actor: String,
    /// How long `gc` keeps hit ids and request metrics.
    pub(crate) analytics_retention: Option<Duration>,
    /// After how long `gc` deletes a silent node's copy of the epochs.
    pub(crate) forget_nodes_after: Option<Duration>,
    pub(crate) audit: crate::audit::AuditLog,
    pub(crate) normalizer: Normalizer,
    pub(crate) memory: MemoryTier,
    /// Keys of request texts already derived ([`TieredCache::key_text`]).
    memo: KeyMemo,
    pub(crate) l2: Option<Arc<dyn Tier>>,
    pub(crate) disk: Option<DiskTier>,
    pub(crate) l3: Option<S3Tier>,
    /// The counters, and the throttled warnings about failing tiers (shared with the writer).
    pub(crate) failures: Arc<Failures>,
    /// Writes entries to the disk tier and the S3 outbox (`None`: a custom L2, written
    /// through its trait).
    sink: Option<Arc<Sink>>,
    /// Runs the sink off the caller's path (`None`: no sink, or no thread could start).
    writer: Option<Writer>,
    baseline: Stats,
    pub(crate) ttl: TtlPolicy,
    pricing: Pricing,
    pub(crate) epochs: Arc<EpochStore>,
    pub(crate) analytics: Option<Analytics>,
    /// The `aggressive` profile, to count misses that would have hit under it (`None` when the
    /// cache uses it already).
    aggressive: Option<Normalizer>,
    /// Models already warned about for having no price.
    unpriced: Mutex<HashSet<String>>,
    /// Whether the first refresh of the invalidation epochs from S3 since open has been tried.
    epochs_known: tokio::sync::watch::Receiver<bool>,
    /// Set when that refresh took longer than [`FIRST_REFRESH_WAIT`]: lookups stop waiting.
    stop_waiting_for_epochs: AtomicBool,
    /// When the cache was built: the wait for the first refresh ends [`FIRST_REFRESH_WAIT`] later.
    opened: Instant,
}

/// How many unpriced models are warned about, each once, per process.
const MAX_UNPRICED_WARNINGS: usize = 256;

/// How long a lookup below L1 waits for the first refresh of the epochs (which S3's own
/// timeouts bound, normally well within this).
const FIRST_REFRESH_WAIT: Duration = Duration::from_secs(10);

impl Drop for Inner {
    fn drop(&mut self) {
        // Writes what is queued, then stops the recorder after a last persist, before the disk
        // tier's final flush.
        drop(self.writer.take());
        drop(self.analytics.take());
        if let Some(disk) = &self.disk {
            let total = self.baseline.merged(&self.failures.counters.snapshot());
            if let Err(e) = disk.save_stats(&total).and_then(|()| disk.flush_blocking()) {
                tracing::warn!(error = %e, "flushing the disk tier on drop failed");
            }
        }
    }
}

enum Verdict {
    Serve,
    Expired,
    Invalidated,
    Collision,
}

const KV_MODEL: &str = "kv";

/// The key memo's default bound: 16 MiB.
pub const DEFAULT_KEY_MEMO: u64 = 16 << 20;

impl TieredCache {
    /// A builder with the defaults: standard profile, 256 MiB memory, no L2.
    pub fn builder() -> TieredCacheBuilder {
        TieredCacheBuilder {
            normalizer: Normalizer::default(),
            memory_capacity: 256 << 20,
            key_memo: DEFAULT_KEY_MEMO,
            l2: None,
            l2_is_disk: false,
            disk: None,
            l3: None,
            ttl: TtlPolicy::default(),
            pricing: Pricing::default(),
            epochs: None,
            refresh_interval: Duration::from_secs(5),
            sweep_interval: None,
            analytics: Some(AnalyticsConfig::default()),
            publish_interval: Duration::from_secs(60),
            actor: "local".into(),
            analytics_retention: Some(Duration::from_secs(90 * 86400)),
            forget_nodes_after: Some(Duration::from_secs(30 * 86400)),
        }
    }

    /// The normalizer in use.
    pub fn normalizer(&self) -> &Normalizer {
        &self.inner.normalizer
    }

    /// The memory tier.
    pub fn memory(&self) -> &MemoryTier {
        &self.inner.memory
    }

    /// The L2 tier, if any.
    pub fn l2(&self) -> Option<&Arc<dyn Tier>> {
        self.inner.l2.as_ref()
    }

    /// The S3 tier, if any.
    pub fn l3(&self) -> Option<&S3Tier> {
        self.inner.l3.as_ref()
    }

    /// The disk tier, if L2 is one.
    pub fn disk(&self) -> Option<&DiskTier> {
        self.inner.disk.as_ref()
    }

    /// Keys a request under the cache's normalizer.
    pub fn key(&self, request: &Value, scope: &Scope) -> Result<Keyed, RequestError> {
        self.inner.normalizer.key(request, scope)
    }

    /// The key of a request given as JSON text, remembered by its bytes: the same text in the
    /// same scope again is keyed without being parsed or normalized (the key memo, bounded by
    /// [`TieredCacheBuilder::key_memo`]). Equal to [`TieredCache::key`] of the parsed text.
    pub fn key_text(&self, request: &[u8], scope: &Scope) -> Result<Arc<Keyed>, RequestError> {
        self.inner.memo.key(&self.inner.normalizer, request, scope)
    }

    /// This process's counters.
    pub fn stats(&self) -> Stats {
        self.inner.failures.counters.snapshot()
    }

    /// Counters over the cache's whole life: what the disk tier stored at the last close, plus
    /// this process.
    pub fn lifetime_stats(&self) -> Stats {
        self.inner.baseline.merged(&self.stats())
    }

    /// Usage of L1 and L2.
    pub fn usage(&self) -> (TierUsage, Option<TierUsage>) {
        (
            self.inner.memory.usage(),
            self.inner.l2.as_ref().map(|t| t.usage()),
        )
    }

    /// Looks a request up without running anything: L1, then L2 (promoting a hit into L1).
    pub async fn get(
        &self,
        request: &Value,
        scope: &Scope,
    ) -> Result<Option<Lookup>, RequestError> {
        let keyed = self.key(request, scope)?;
        Ok(self.get_keyed(&keyed).await)
    }

    /// [`TieredCache::get`] for a request already keyed.
    pub async fn get_keyed(&self, keyed: &Keyed) -> Option<Lookup> {
        let started = Instant::now();
        let found = self.find(keyed).await;
        match &found {
            Some(lookup) => self.record(keyed, lookup.outcome, Some(&lookup.entry), started),
            None => self.record(keyed, Outcome::Miss, None, started),
        }
        found
    }

    /// Looks a keyed request up, L1 then L2 then L3 (promoting a hit into the tiers above it),
    /// and counts nothing: for a caller that runs its own single flight and says what each
    /// lookup came to with [`TieredCache::record`] (the HTTP gateway, whose streams are shared
    /// while they arrive). Every copy is verified as a lookup's is: an entry served answers the
    /// request byte for byte, has not expired, and no invalidation has passed it.
    pub async fn find(&self, keyed: &Keyed) -> Option<Lookup> {
        let inner = &self.inner;
        if let Some(entry) = inner.l1(keyed).await {
            return Some(Lookup {
                entry,
                outcome: Outcome::L1,
            });
        }
        let (entry, outcome) = inner.lookup_below(keyed).await?;
        inner
            .memory
            .insert_id(keyed.key.id(), Arc::clone(&entry))
            .await;
        Some(Lookup { entry, outcome })
    }

    /// The memory tier's copy of a keyed request, if it may be served; nothing below it is
    /// read, and nothing is counted. A caller with its own single flight asks this after it has
    /// taken a key's slot: an answer stored between its lookup and then is found here.
    pub async fn find_in_memory(&self, keyed: &Keyed) -> Option<Arc<Entry>> {
        self.inner.l1(keyed).await
    }

    /// Counts one lookup of `keyed` that came to `outcome`, serving `entry` (none on a miss that
    /// stored nothing), for the statistics and the reports, as the cache's own lookups are
    /// counted. `started` is when the lookup began (its time goes into the reports). For callers
    /// of [`TieredCache::find`]; a miss whose upstream call failed is also
    /// [`TieredCache::record_upstream_error`].
    pub fn record(
        &self,
        keyed: &Keyed,
        outcome: Outcome,
        entry: Option<&Arc<Entry>>,
        started: Instant,
    ) {
        self.inner
            .failures
            .counters
            .record(outcome, entry.map(|e| &**e));
        self.inner.note(outcome, entry, keyed, started, None);
    }

    /// Counts a request for `model` that could not be keyed, answered uncached
    /// ([`Outcome::Uncacheable`]).
    pub fn record_uncacheable(&self, model: &str, scope: &Scope, started: Instant) {
        let keyed = Keyed {
            key: CacheKey {
                slug: ModelSlug::new(model),
                digest: [0; 16],
            },
            canonical: String::new(),
            model: model.to_string(),
            scope: scope.clone(),
        };
        self.inner
            .failures
            .counters
            .record(Outcome::Uncacheable, None);
        self.inner
            .note(Outcome::Uncacheable, None, &keyed, started, None);
    }

    /// Counts an upstream call that failed (what the cache counts as an executor error).
    pub fn record_upstream_error(&self) {
        self.inner.failures.counters.record_executor_error();
    }

    /// The entry a completion for a request already keyed makes, with the invalidation epochs
    /// `as_of` when its upstream call started (from
    /// [`EpochStore::snapshot`](crate::EpochStore::snapshot)): an invalidation made while the
    /// call ran refuses its answer instead of being recorded in it. Nothing is stored yet:
    /// [`TieredCache::store_entry`] does, so that a caller can hand the answer on first.
    pub async fn entry_for(
        &self,
        keyed: &Keyed,
        completion: Completion,
        as_of: &Epochs,
    ) -> Arc<Entry> {
        self.inner.epochs_known().await;
        let mut entry = self.inner.build_entry(keyed, completion, Duration::ZERO);
        entry.epochs = as_of.stamp(&entry);
        Arc::new(entry)
    }

    /// Stores an entry made by [`TieredCache::entry_for`] in L1 and below, as
    /// [`TieredCache::put`] does.
    pub async fn store_entry(&self, keyed: &Keyed, entry: &Arc<Entry>) {
        self.inner.store(&keyed.key, entry).await;
    }

    /// Stores a completion for a request in L1 and L2, replacing what was there.
    pub async fn put(
        &self,
        request: &Value,
        scope: &Scope,
        completion: Completion,
    ) -> Result<Arc<Entry>, RequestError> {
        let keyed = self.key(request, scope)?;
        Ok(self.put_keyed(&keyed, completion).await)
    }

    /// [`TieredCache::put`] for a request already keyed.
    pub async fn put_keyed(&self, keyed: &Keyed, completion: Completion) -> Arc<Entry> {
        // The entry records the epochs in force: those of other nodes too, or a refresh learning
        // of an older invalidation would refuse it as soon as it is stored.
        self.inner.epochs_known().await;
        let entry = Arc::new(self.inner.build_entry(keyed, completion, Duration::ZERO));
        self.inner.store(&keyed.key, &entry).await;
        entry
    }

    /// Serves a request from the cache, or runs `executor` once and caches its answer.
    ///
    /// Concurrent calls for the same request run `executor` once between them; if it fails,
    /// every one of them gets its error and nothing is cached. A request that cannot be keyed
    /// (malformed) is not an error here: `executor` runs and its answer is returned uncached
    /// ([`Outcome::Uncacheable`]).
    pub async fn get_or_execute<F, Fut, E>(
        &self,
        request: &Value,
        scope: &Scope,
        executor: F,
    ) -> Result<Lookup, Arc<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Completion, E>>,
        E: Send + Sync + 'static,
    {
        let inner = &self.inner;
        let started = Instant::now();
        let keyed = match self.key(request, scope) {
            Ok(keyed) => keyed,
            Err(err) => {
                tracing::debug!(%err, "request cannot be keyed; running it uncached");
                let keyed = uncacheable(request, scope);
                let started = Instant::now();
                let completion = match executor().await {
                    Ok(completion) => completion,
                    Err(e) => {
                        // Counted as a lookup, as a cacheable request's failed miss is.
                        inner.failures.counters.record_executor_error();
                        inner.failures.counters.record(Outcome::Uncacheable, None);
                        inner.note(Outcome::Uncacheable, None, &keyed, started, None);
                        return Err(Arc::new(e));
                    }
                };
                let entry = Arc::new(inner.build_entry(&keyed, completion, started.elapsed()));
                inner
                    .failures
                    .counters
                    .record(Outcome::Uncacheable, Some(&entry));
                inner.note(Outcome::Uncacheable, Some(&entry), &keyed, started, None);
                return Ok(Lookup {
                    entry,
                    outcome: Outcome::Uncacheable,
                });
            }
        };
        let keyed_ref = &keyed;
        let fill = move || async move {
            // The epochs in force when the call starts: an invalidation made while it runs
            // must refuse its answer, not be recorded in it.
            let as_of = inner.epochs.snapshot();
            let started = Instant::now();
            let completion = executor().await?;
            let mut entry = inner.build_entry(keyed_ref, completion, started.elapsed());
            entry.epochs = as_of.stamp(&entry);
            Ok(entry)
        };
        let result = self
            .resolve(&keyed, &mut Some(fill), |_| Some(()))
            .await
            .map(|(lookup, _)| lookup);
        if inner.analytics.is_some() {
            let (outcome, entry) = match &result {
                Ok(lookup) => (lookup.outcome, Some(&lookup.entry)),
                Err(_) => (Outcome::Miss, None),
            };
            // Only a miss pays for a second key: it has just waited for an upstream call.
            let aggressive = match (outcome, &inner.aggressive) {
                (Outcome::Miss, Some(normalizer)) => normalizer
                    .key(request, scope)
                    .ok()
                    .map(|k| k.key.id() as u64),
                _ => None,
            };
            inner.note(outcome, entry, &keyed, started, aggressive);
        }
        result
    }

    /// The typed cache for any serde value (API responses, user records): returns the value
    /// stored under `key`, or runs `f`, stores its value for `ttl` (the default TTL when `None`)
    /// and returns it. Concurrent calls for one key run `f` once.
    pub async fn get_or_insert_with<T, F, Fut, E>(
        &self,
        key: &str,
        ttl: Option<Duration>,
        f: F,
    ) -> Result<T, Arc<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<serde_json::Error> + Send + Sync + 'static,
    {
        self.get_or_insert_tagged(key, ttl, Vec::new(), f).await
    }

    /// [`TieredCache::get_or_insert_with`], the value stored with `tags` (which
    /// `invalidate --tag` reaches).
    pub async fn get_or_insert_tagged<T, F, Fut, E>(
        &self,
        key: &str,
        ttl: Option<Duration>,
        tags: Vec<String>,
        f: F,
    ) -> Result<T, Arc<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<serde_json::Error> + Send + Sync + 'static,
    {
        let inner = &self.inner;
        let keyed = kv_key(key);
        let keyed_ref = &keyed;
        let fill = move || async move {
            // As in `get_or_execute`: an invalidation made while `f` runs refuses its value.
            let as_of = inner.epochs.snapshot();
            let started = Instant::now();
            let value = f().await?;
            let raw = serde_json::value::to_raw_value(&value)?;
            let mut completion = Completion::new(raw).provider(KV_MODEL).tags(tags);
            completion.ttl = ttl;
            let mut entry = inner.build_entry(keyed_ref, completion, started.elapsed());
            entry.epochs = as_of.stamp(&entry);
            Ok(entry)
        };
        let started = Instant::now();
        // A stored value of another shape (the type changed between releases) is refused and
        // computed afresh.
        let resolved = self
            .resolve(&keyed, &mut Some(fill), |entry| {
                entry.response_as::<T>().ok()
            })
            .await;
        match &resolved {
            Ok((lookup, _)) => {
                inner.note(lookup.outcome, Some(&lookup.entry), &keyed, started, None)
            }
            Err(_) => inner.note(Outcome::Miss, None, &keyed, started, None),
        }
        match resolved? {
            (_, Some(value)) => Ok(value),
            // `T` does not read back what it wrote: its error, not a cached wrong value.
            (lookup, None) => lookup
                .entry
                .response_as::<T>()
                .map_err(|e| Arc::new(E::from(e))),
        }
    }

    /// Removes the entry of a request from every tier, leaving a key tombstone (as
    /// `invalidate` of the key does) so that no copy read before the removal is served after it.
    pub async fn remove(&self, request: &Value, scope: &Scope) -> Result<(), RequestError> {
        let keyed = self.key(request, scope)?;
        self.inner.remove(&keyed.key, true).await;
        Ok(())
    }

    /// Makes every write so far durable and stores the lifetime statistics and the analytics
    /// rollups; with an S3 tier, uploads the outbox and this node's daily rollups too. If S3
    /// cannot take them, the error says so and they stay queued (durably) for the next try.
    pub async fn flush(&self) -> Result<(), TierError> {
        self.flush_uploading(false).await
    }

    /// [`TieredCache::flush`]; with `bounded`, the upload of the outbox gets `[s3]
    /// close_timeout` (what is left stays queued).
    async fn flush_uploading(&self, bounded: bool) -> Result<(), TierError> {
        self.inner.settle().await;
        if let Some(analytics) = &self.inner.analytics {
            analytics.flush()?;
        }
        if let Some(disk) = &self.inner.disk {
            disk.save_stats(&self.lifetime_stats())?;
        }
        if let Some(l2) = &self.inner.l2 {
            l2.flush().await?;
        }
        if let Some(l3) = &self.inner.l3 {
            if bounded {
                l3.drain_for_close().await?;
            } else {
                l3.drain().await?;
            }
            self.publish_analytics(&[]).await?;
        }
        Ok(())
    }

    /// Waits until every entry stored so far has been written below L1 (to the disk tier and
    /// the S3 outbox, which writer threads do behind the callers). Lookups see such entries
    /// before that anyway; this is for reading or changing the tiers directly. Not durable
    /// until [`TieredCache::flush`].
    pub async fn settle(&self) {
        self.inner.settle().await;
    }

    /// Flushes (the upload of the outbox within `[s3] close_timeout`: what is left stays queued
    /// for the next run), then releases this handle. The database closes when the last clone is
    /// dropped.
    pub async fn close(self) -> Result<(), TierError> {
        // At exit the uploads get `[s3] close_timeout`; what is left stays queued.
        self.flush_uploading(true).await
    }

    /// Serves `keyed` from the first tier with a copy that answers it, or runs `fill` once
    /// between concurrent callers and stores its entry; counts the lookup once, by what it
    /// returns.
    ///
    /// `accept` turns the entry served into what the caller uses. A copy it cannot use (a typed
    /// value stored in another shape) is refused as a corrupt copy is: counted, removed from
    /// every tier and computed afresh, and the call counts as one miss. The value is `None` only
    /// when `accept` refuses a fresh entry too.
    async fn resolve<F, Fut, E, V>(
        &self,
        keyed: &Keyed,
        fill: &mut Option<F>,
        accept: impl Fn(&Entry) -> Option<V>,
    ) -> Result<(Lookup, Option<V>), Arc<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Entry, E>>,
        E: Send + Sync + 'static,
    {
        let inner = &self.inner;
        let counters = &inner.failures.counters;
        let found = async {
            let lookup = self.find_or_fill(keyed, fill).await?;
            let value = accept(&lookup.entry);
            let Some(fill) = fill.take_if(|_| value.is_none() && lookup.outcome.is_hit()) else {
                return Ok((lookup, value));
            };
            counters.record_error(TierName::L1, ErrorKind::Corrupt);
            // Not a removal others race with: no tombstone.
            inner.remove(&keyed.key, false).await;
            let lookup = Box::pin(inner.fill_and_store(keyed, fill)).await?;
            let value = accept(&lookup.entry);
            Ok::<_, Arc<E>>((lookup, value))
        }
        .await;
        match &found {
            Ok((lookup, _)) => counters.record(lookup.outcome, Some(&lookup.entry)),
            Err(_) => counters.record(Outcome::Miss, None),
        }
        found
    }

    /// [`TieredCache::resolve`] before `accept` and the count: L1, the disk, then the slow paths.
    async fn find_or_fill<F, Fut, E>(
        &self,
        keyed: &Keyed,
        fill: &mut Option<F>,
    ) -> Result<Lookup, Arc<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Entry, E>>,
        E: Send + Sync + 'static,
    {
        let inner = &self.inner;
        let id = keyed.key.id();
        if let Some(entry) = inner.memory.get_id(id).await {
            match inner.verdict(&entry, keyed) {
                Verdict::Serve => {
                    return Ok(Lookup {
                        entry,
                        outcome: Outcome::L1,
                    });
                }
                Verdict::Expired => {
                    inner.expired(&entry);
                    inner.memory.remove_id(id).await;
                }
                Verdict::Invalidated => {
                    inner.failures.counters.record_invalidated();
                    inner.memory.remove_id(id).await;
                }
                Verdict::Collision => {
                    inner
                        .failures
                        .counters
                        .record_error(TierName::L1, ErrorKind::Collision);
                    if let Some(fill) = fill.take() {
                        return Box::pin(inner.fill_and_store(keyed, fill)).await;
                    }
                }
            }
        }
        // A copy on disk is a local read: it is served without taking the single-flight slot,
        // which only the slow paths (S3, the executor) need.
        if let Some(entry) = inner.servable_l2(keyed).await {
            inner.memory.insert_id(id, Arc::clone(&entry)).await;
            return Ok(Lookup {
                entry,
                outcome: Outcome::L2,
            });
        }
        // On the heap: the slow paths' futures (moka's single flight, the S3 client's, the
        // caller's executor) come to tens of kilobytes, and inline they would make every hit's
        // future that large, copied on every call.
        Box::pin(self.find_below_or_fill(keyed, fill)).await
    }

    /// [`TieredCache::find_or_fill`] past L1 and the disk: S3 or the executor, behind single flight.
    async fn find_below_or_fill<F, Fut, E>(
        &self,
        keyed: &Keyed,
        fill: &mut Option<F>,
    ) -> Result<Lookup, Arc<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Entry, E>>,
        E: Send + Sync + 'static,
    {
        let inner = &self.inner;
        let id = keyed.key.id();
        let mut led = None;
        let waited_from = Utc::now().timestamp_millis();
        let init = inner.load_or_fill(keyed, fill, &mut led);
        let single_flight = AssertUnwindSafe(inner.memory.cache().try_get_with(id, init));
        let result = match futures::FutureExt::catch_unwind(single_flight).await {
            Ok(result) => result,
            // This call's own upstream call panicked: the caller's panic, passed on.
            Err(panic) if led.is_some() => std::panic::resume_unwind(panic),
            // moka gives up (panics) when the calls this one waited on were dropped mid-way 200
            // times in a row (callers' timeouts, say). This request still gets its answer.
            Err(panic) => match fill.take() {
                Some(fill) => {
                    tracing::warn!(
                        key = %keyed.key,
                        reason = panic_message(panic.as_ref()),
                        "single flight gave up waiting; running the request on its own"
                    );
                    return inner.fill_and_store(keyed, fill).await;
                }
                None => std::panic::resume_unwind(panic),
            },
        };
        match (result, led) {
            (Ok(entry), Some(outcome)) => Ok(Lookup { entry, outcome }),
            (Ok(entry), None) => {
                let verdict = inner.verdict(&entry, keyed);
                // Made while this call waited for it: the answer to this very request, which the
                // leading caller got too, though a TTL of zero or an invalidation made during
                // the upstream call keeps it from being served to anyone later.
                let shared = entry.created_at.timestamp_millis() >= waited_from
                    && matches!(verdict, Verdict::Expired | Verdict::Invalidated);
                // Served as it is, this call keeps its executor: `resolve` may still need it.
                let served = shared || matches!(verdict, Verdict::Serve);
                match (verdict, fill.take_if(|_| !served)) {
                    (Verdict::Serve, _) | (_, None) => Ok(Lookup {
                        entry,
                        outcome: Outcome::Coalesced,
                    }),
                    // Another lookup with the same digest but a different request filled the
                    // slot.
                    (Verdict::Collision, Some(fill)) => {
                        inner
                            .failures
                            .counters
                            .record_error(TierName::L1, ErrorKind::Collision);
                        inner.fill_and_store(keyed, fill).await
                    }
                    // An older copy, expired or invalidated since: refused, as in L1.
                    (Verdict::Expired, Some(fill)) => {
                        inner.expired(&entry);
                        inner.memory.remove_id(id).await;
                        inner.fill_and_store(keyed, fill).await
                    }
                    (Verdict::Invalidated, Some(fill)) => {
                        inner.failures.counters.record_invalidated();
                        inner.memory.remove_id(id).await;
                        inner.fill_and_store(keyed, fill).await
                    }
                }
            }
            (Err(e), led) => {
                if led == Some(Outcome::Miss) {
                    inner.failures.counters.record_executor_error();
                }
                Err(e)
            }
        }
    }
}

impl Inner {
    /// Hands a lookup's outcome to the analytics recorder (never blocks).
    fn note(
        &self,
        outcome: Outcome,
        entry: Option<&Arc<Entry>>,
        keyed: &Keyed,
        started: Instant,
        aggressive: Option<u64>,
    ) {
        if let Some(analytics) = &self.analytics {
            analytics.record(Event::Lookup {
                outcome,
                entry: entry.cloned(),
                model: entry.is_none().then(|| keyed.model.as_str().into()),
                lookup_us: u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX),
                aggressive,
            });
        }
    }

    /// Counts an entry found past its expiry, and records its age (for TTL suggestions).
    fn expired(&self, entry: &Arc<Entry>) {
        self.failures.counters.record_expired();
        if let Some(analytics) = &self.analytics {
            analytics.record(Event::Expired(Arc::clone(entry)));
        }
    }

    fn verdict(&self, entry: &Entry, keyed: &Keyed) -> Verdict {
        let now = Utc::now();
        // A date beyond every node's clock is no answer this cache wrote: refused as another
        // request's is.
        if !entry.answers(keyed) || entry.written_after(now + CLOCK_SKEW) {
            Verdict::Collision
        } else if self.ttl.expired(entry, now) {
            Verdict::Expired
        } else if !self.epochs.admits(entry) {
            Verdict::Invalidated
        } else {
            Verdict::Serve
        }
    }

    async fn l1(&self, keyed: &Keyed) -> Option<Arc<Entry>> {
        let entry = self.memory.get_id(keyed.key.id()).await?;
        match self.verdict(&entry, keyed) {
            Verdict::Serve => Some(entry),
            Verdict::Expired => {
                self.expired(&entry);
                self.memory.remove_id(keyed.key.id()).await;
                None
            }
            Verdict::Invalidated => {
                self.failures.counters.record_invalidated();
                self.memory.remove_id(keyed.key.id()).await;
                None
            }
            Verdict::Collision => {
                self.failures
                    .counters
                    .record_error(TierName::L1, ErrorKind::Collision);
                None
            }
        }
    }

    /// The initializer shared by concurrent lookups of one key: L2, then the executor.
    async fn load_or_fill<F, Fut, E>(
        &self,
        keyed: &Keyed,
        fill: &mut Option<F>,
        led: &mut Option<Outcome>,
    ) -> Result<Arc<Entry>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Entry, E>>,
    {
        if let Some((entry, outcome)) = self.lookup_below(keyed).await {
            *led = Some(outcome);
            return Ok(entry);
        }
        *led = Some(Outcome::Miss);
        let Some(fill) = fill.take() else {
            // moka polls only the initializer of the call that created it, once, and the
            // slot is filled before the call: it cannot be empty here.
            unreachable!("single-flight initializer polled without its executor");
        };
        let entry = Arc::new(fill().await?);
        self.store_below(&keyed.key, &entry).await;
        self.failures.counters.record_put();
        Ok(entry)
    }

    async fn fill_and_store<F, Fut, E>(&self, keyed: &Keyed, fill: F) -> Result<Lookup, Arc<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Entry, E>>,
    {
        let entry = match fill().await {
            Ok(entry) => Arc::new(entry),
            Err(e) => {
                self.failures.counters.record_executor_error();
                return Err(Arc::new(e));
            }
        };
        self.store(&keyed.key, &entry).await;
        Ok(Lookup {
            entry,
            outcome: Outcome::Miss,
        })
    }

    /// Waits until the epochs have been refreshed from S3 once since open (tried, whatever the
    /// outcome; bounded by [`FIRST_REFRESH_WAIT`]). Until then a copy on disk or in S3 may be one
    /// that another node invalidated while this process was not running: a process that served
    /// from its disk at once would serve it.
    pub(crate) async fn epochs_known(&self) {
        if *self.epochs_known.borrow() || self.stop_waiting_for_epochs.load(Relaxed) {
            return;
        }
        let mut known = self.epochs_known.clone();
        // One deadline for every lookup, counted from open.
        let left = FIRST_REFRESH_WAIT.saturating_sub(self.opened.elapsed());
        let waited = tokio::time::timeout(left, known.wait_for(|k| *k)).await;
        if waited.is_err() && !self.stop_waiting_for_epochs.swap(true, Relaxed) {
            tracing::warn!(
                "the invalidation epochs could not be fetched from S3 in time; serving with the ones this node knows"
            );
        }
    }

    /// The L2 copy of `key`: the one queued for writing if there is one, else the tier's.
    async fn l2_get(
        &self,
        l2: &Arc<dyn Tier>,
        key: &CacheKey,
    ) -> Result<Option<Arc<Entry>>, TierError> {
        if let Some(entry) = self.writer.as_ref().and_then(|w| w.pending(key.id())) {
            return Ok(Some(entry));
        }
        guarded(l2.get(key)).await
    }

    /// Waits until every entry queued for writing below L1 has been written: what removes or
    /// reads the tiers' contents wholesale calls it first.
    pub(crate) async fn settle(&self) {
        if let Some(writer) = &self.writer {
            writer.settle().await;
        }
    }

    /// L2, then L3: the first copy that answers the request. An L3 hit is promoted into L2.
    async fn lookup_below(&self, keyed: &Keyed) -> Option<(Arc<Entry>, Outcome)> {
        self.epochs_known().await;
        if let Some(found) = self.lookup_l2(keyed).await {
            return Some(found);
        }
        // On the heap, as in `resolve`: the S3 client's future is large.
        Box::pin(self.lookup_l3(keyed)).await
    }

    async fn lookup_l3(&self, keyed: &Keyed) -> Option<(Arc<Entry>, Outcome)> {
        let l3 = self.l3.as_ref()?;
        if !l3.available() {
            return None;
        }
        match guarded(l3.fetch(&keyed.key)).await {
            Ok(Some((entry, bytes))) => match self.verdict(&entry, keyed) {
                Verdict::Serve => {
                    let entry = Arc::new(entry);
                    self.promote_to_l2(&keyed.key, &entry, &bytes).await;
                    return Some((entry, Outcome::L3));
                }
                Verdict::Expired => self.expired(&Arc::new(entry)),
                Verdict::Invalidated => {
                    // The objects stay for `gc`; this node stops pointing at them.
                    self.failures.counters.record_invalidated();
                    let forgot = catch_unwind(AssertUnwindSafe(|| l3.forget(&keyed.key)));
                    if let Err(e) = forgot.unwrap_or_else(|panic| Err(panicked(panic.as_ref()))) {
                        self.tier_failed(TierName::L3, "forget", &e);
                    }
                }
                Verdict::Collision => {
                    self.failures
                        .counters
                        .record_error(TierName::L3, ErrorKind::Collision);
                }
            },
            // Skipped, as when `available` said no: not a failure of its own.
            Ok(None) | Err(TierError::CircuitOpen) => {}
            Err(TierError::Corrupt(_)) => {
                self.failures
                    .counters
                    .record_error(TierName::L3, ErrorKind::Corrupt);
            }
            Err(e) => self.tier_failed(TierName::L3, "get", &e),
        }
        None
    }

    async fn promote_to_l2(&self, key: &CacheKey, entry: &Arc<Entry>, envelope: &[u8]) {
        // The disk tier, when it is L2 (not when a custom L2 replaced it).
        let disk = self.sink.as_ref().and_then(|sink| sink.disk.as_ref());
        let result = match (disk, &self.l2) {
            // The envelope was just verified: store it as it is, without encoding it again.
            (Some(disk), _) => catch_unwind(AssertUnwindSafe(|| disk.put_encoded(key, envelope)))
                .unwrap_or_else(|panic| Err(panicked(panic.as_ref()))),
            (None, Some(l2)) => guarded(l2.put(key, entry)).await,
            (None, None) => Ok(()),
        };
        if let Err(e) = result {
            self.tier_failed(TierName::L2, "promote", &e);
        }
    }

    /// The L2 copy of `keyed` if it may be served as it is. Anything else (no copy, expired,
    /// invalidated, a collision, a failing tier) is left to [`Inner::lookup_l2`], which the
    /// single-flight initializer runs next and which counts it; only a corrupt copy, which the
    /// read has just removed, is counted here.
    async fn servable_l2(&self, keyed: &Keyed) -> Option<Arc<Entry>> {
        let l2 = self.l2.as_ref()?;
        self.epochs_known().await;
        match self.l2_get(l2, &keyed.key).await {
            Ok(Some(entry)) => {
                matches!(self.verdict(&entry, keyed), Verdict::Serve).then_some(entry)
            }
            Ok(None) => None,
            Err(TierError::Corrupt(_)) => {
                self.failures
                    .counters
                    .record_error(l2.name(), ErrorKind::Corrupt);
                None
            }
            Err(_) => None,
        }
    }

    async fn lookup_l2(&self, keyed: &Keyed) -> Option<(Arc<Entry>, Outcome)> {
        let l2 = self.l2.as_ref()?;
        match self.l2_get(l2, &keyed.key).await {
            Ok(Some(entry)) => match self.verdict(&entry, keyed) {
                Verdict::Serve => return Some((entry, Outcome::L2)),
                Verdict::Expired | Verdict::Invalidated => {
                    if self.ttl.expired(&entry, Utc::now()) {
                        self.expired(&entry);
                    } else {
                        self.failures.counters.record_invalidated();
                    }
                    // Still queued for writing, it would land after the removal below.
                    if let Some(writer) = &self.writer {
                        writer.forget_entry(&keyed.key, &entry);
                    }
                    // Only the copy judged: a put of the same key that landed since stays.
                    let removed = match self.sink.as_ref().and_then(|s| s.disk.as_ref()) {
                        Some(disk) => disk.remove_judged(&keyed.key, &entry).map(|_| ()),
                        None => guarded(l2.remove(&keyed.key)).await,
                    };
                    if let Err(e) = removed {
                        self.tier_failed(l2.name(), "remove", &e);
                    }
                }
                Verdict::Collision => {
                    self.failures
                        .counters
                        .record_error(l2.name(), ErrorKind::Collision);
                }
            },
            Ok(None) => {}
            Err(TierError::Corrupt(_)) => {
                self.failures
                    .counters
                    .record_error(l2.name(), ErrorKind::Corrupt);
            }
            Err(e) => self.tier_failed(l2.name(), "get", &e),
        }
        None
    }

    async fn store_below(&self, key: &CacheKey, entry: &Arc<Entry>) {
        if let Some(writer) = &self.writer {
            return writer.store(key, entry).await;
        }
        if let Some(sink) = &self.sink {
            return sink.store_guarded(key, entry);
        }
        // A custom L2 (not the disk tier), written through its trait.
        if let Some(l2) = &self.l2
            && let Err(e) = guarded(l2.put(key, entry)).await
        {
            self.tier_failed(l2.name(), "put", &e);
        }
        if let Some(l3) = &self.l3 {
            let queued = Codec::default()
                .encode(entry)
                .map_err(TierError::Corrupt)
                .and_then(|envelope| {
                    catch_unwind(AssertUnwindSafe(|| l3.enqueue(key, &envelope)))
                        .unwrap_or_else(|panic| Err(panicked(panic.as_ref())))
                });
            if let Err(e) = queued {
                self.tier_failed(TierName::L3, "enqueue", &e);
            }
        }
    }

    async fn store(&self, key: &CacheKey, entry: &Arc<Entry>) {
        self.memory.insert_id(key.id(), Arc::clone(entry)).await;
        self.store_below(key, entry).await;
        self.failures.counters.record_put();
    }

    /// Removes `key`'s copies from every tier; first, with `tombstone`, bumps the key's epoch
    /// (a caller that has just bumped it passes false).
    pub(crate) async fn remove(&self, key: &CacheKey, tombstone: bool) {
        // A key tombstone first, as `invalidate --key` leaves: a lookup that read a copy before
        // the removal and writes it back into L1 or L2 after it, or a copy left in the bucket
        // when S3 refuses the deletes, is refused on every tier, here now and elsewhere once
        // the epochs are next published.
        if tombstone {
            let bumped = match self.epochs.bump(&Selector::Key(key.hex())) {
                Ok(_) => self.epochs.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = bumped {
                tracing::error!(error = %e, "cannot record the removal's tombstone");
            }
        }
        // A queued write of this key would otherwise land after the removal.
        self.settle().await;
        if let Some(writer) = &self.writer {
            writer.forget(key.id());
        }
        self.memory.remove_id(key.id()).await;
        if let Some(l2) = &self.l2
            && let Err(e) = guarded(l2.remove(key)).await
        {
            self.tier_failed(l2.name(), "remove", &e);
        }
        if let Some(l3) = &self.l3
            && let Err(e) = guarded(l3.remove(key)).await
        {
            self.tier_failed(TierName::L3, "remove", &e);
        }
    }

    /// Says once per model that its answers are counted as saving nothing: an unpriced model
    /// otherwise looks like a free one in every report.
    fn warn_unpriced(&self, model: &str) {
        if model == KV_MODEL {
            return;
        }
        // Model names come from callers: remember (and warn about) a bounded number of them.
        let first = match self.unpriced.lock() {
            Ok(mut seen) if seen.len() < MAX_UNPRICED_WARNINGS => seen.insert(model.to_string()),
            _ => false,
        };
        if first {
            tracing::warn!(
                model,
                "no price for this model in the price table and no cost given: its hits count as saving $0 (add it to pricing.toml)"
            );
        }
    }

    pub(crate) fn tier_failed(&self, tier: TierName, op: &str, error: &TierError) {
        self.failures.tier_failed(tier, op, error);
    }

    fn build_entry(&self, keyed: &Keyed, completion: Completion, measured: Duration) -> Entry {
        let tokens = completion
            .tokens
            .unwrap_or_else(|| Tokens::from_response(&completion.response));
        let priced = self.pricing.cost(&keyed.model, tokens);
        // A cost that is no amount of money (NaN, infinite, negative) is unknown: priced instead.
        let given = completion.cost_usd.filter(|c| c.is_finite() && *c >= 0.0);
        let cost = match (given, priced) {
            (Some(total), Some(p)) if p.total > 0.0 => Cost {
                input: total * p.input / p.total,
                output: total * p.output / p.total,
                total,
            },
            (Some(total), _) => Cost {
                input: 0.0,
                output: 0.0,
                total,
            },
            (None, Some(p)) => p,
            (None, None) => {
                self.warn_unpriced(&keyed.model);
                Cost::default()
            }
        };
        // Milliseconds, as every stored copy keeps it: the entry handed back equals the one
        // read back later.
        let now = Utc::now();
        let now = chrono::DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now);
        // An answer fetched earlier counts as written then (never later than now).
        let now = completion
            .fetched_at
            .and_then(|at| chrono::DateTime::from_timestamp_millis(at.timestamp_millis()))
            .map_or(now, |at| at.min(now));
        let fetched_ms = completion
            .fetched_at
            .map(|_| u64::try_from(now.timestamp_millis()).unwrap_or(0));
        let ttl = completion.ttl.or_else(|| self.ttl.for_model(&keyed.model));
        let mut entry = Entry {
            cache_id: keyed.key.hex(),
            cache_key: keyed.key.to_string(),
            request: keyed.canonical.clone(),
            response: completion.response.into(),
            model: keyed.model.clone(),
            provider: completion.provider,
            tokens,
            cost,
            latency_ms: completion.latency_ms.unwrap_or(measured.as_millis() as u64),
            created_at: now,
            // A TTL past what a date can hold (`1000000y`) is "never".
            expires_at: ttl
                .and_then(|t| chrono::Duration::from_std(t).ok())
                .and_then(|t| now.checked_add_signed(t)),
            tags: completion.tags,
            scope: keyed.scope.clone(),
            hit_count: 0,
            last_accessed: now,
            epochs: Default::default(),
        };
        entry.epochs = match fetched_ms {
            Some(at) => self.epochs.snapshot().stamp_as_of(&entry, at),
            None => self.epochs.stamp(&entry),
        };
        entry
    }
}

/// The key of a typed value stored with [`TieredCache::get_or_insert_with`].
fn kv_key(key: &str) -> Keyed {
    // The canonical text of `{"kv": key}`, strings length-prefixed as the normalizer writes them.
    let canonical = format!("{{\"2:kv:\"{}:{key}}}", key.len());
    let digest_key = CacheKey::derive(ModelSlug::new(KV_MODEL), &Scope::Global, &canonical);
    Keyed {
        key: digest_key,
        canonical,
        model: KV_MODEL.to_string(),
        scope: Scope::Global,
    }
}

/// A stand-in key for a request that cannot be keyed: never stored, only reported.
fn uncacheable(request: &Value, scope: &Scope) -> Keyed {
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string();
    Keyed {
        key: CacheKey {
            slug: ModelSlug::new(&model),
            digest: [0; 16],
        },
        canonical: request.to_string(),
        model,
        scope: scope.clone(),
    }
}

/// Awaits a tier call, turning a panic inside it into a storage error: a tier's bug, or a store
/// that panics on bytes it cannot read, costs the lookup a counted miss instead of the caller's
/// task. The tiers keep no state a half-done call could leave inconsistent for the next one:
/// sled's locks do not poison, and every other lock here recovers from poisoning.
async fn guarded<T>(call: impl Future<Output = Result<T, TierError>>) -> Result<T, TierError> {
    use futures::FutureExt;
    AssertUnwindSafe(call)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| Err(panicked(panic.as_ref())))
}

/// The error a panic inside a tier becomes.
fn panicked(panic: &(dyn std::any::Any + Send)) -> TierError {
    TierError::Storage(format!("the tier panicked: {}", panic_message(panic)))
}

/// The message a panic carries, if it is text.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}
