//! The engine seen from outside: TieredCache over real memory and disk tiers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use serde_json::{Value, json};
use strata::analytics::TierName;
use strata::core::{CacheKey, Codec, Entry, Selector};
use strata::tiers::{DiskConfig, DiskTier, Tier, TierError, TierUsage, TtlPolicy};
use strata::{Completion, Normalizer, Outcome, Scope, TieredCache};
use tempfile::TempDir;

#[path = "harness/crash.rs"]
mod crash;
#[path = "s3/hostile.rs"]
mod s3_hostile;
#[path = "s3/invalidation.rs"]
mod s3_invalidation;
#[path = "s3/outbox.rs"]
mod s3_outbox;
#[path = "support/s3.rs"]
mod s3_server;
#[path = "s3/tier.rs"]
mod s3_tier;

fn request(text: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": text}
    ], "temperature": 0.2})
}

fn response(text: &str) -> Value {
    json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
           "usage": {"prompt_tokens": 20, "completion_tokens": 10}})
}

fn completion(text: &str) -> Completion {
    Completion::from_value(&response(text))
        .provider("openai")
        .cost_usd(0.002)
        .latency_ms(900)
}

fn disk(dir: &TempDir) -> Result<DiskTier> {
    Ok(DiskTier::open(
        &DiskConfig::new(dir.path().join("l2")),
        Codec::default(),
    )?)
}

fn cache_with_disk(dir: &TempDir) -> Result<TieredCache> {
    Ok(TieredCache::builder().disk(disk(dir)?).build())
}

/// `get_or_execute` with an executor that answers `text` at once.
async fn execute(
    cache: &TieredCache,
    request: &Value,
    scope: &Scope,
    text: &str,
) -> Result<strata::Lookup> {
    let answer = completion(text);
    cache
        .get_or_execute(request, scope, || async { Ok::<_, std::io::Error>(answer) })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn answer(lookup: &strata::Lookup) -> String {
    answer_of(&lookup.entry)
}

fn answer_of(entry: &strata::Entry) -> String {
    entry
        .response_as::<Value>()
        .ok()
        .and_then(|v| {
            v["choices"][0]["message"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_identical_misses_run_the_executor_once() -> Result<()> {
    let dir = TempDir::new()?;
    let cache = cache_with_disk(&dir)?;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let cache = cache.clone();
        let calls = Arc::clone(&calls);
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_execute(&request("same question"), &Scope::Global, || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, std::io::Error>(completion("one answer"))
                })
                .await
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        let lookup = task.await?.map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(answer(&lookup), "one answer");
        outcomes.push(lookup.outcome);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(outcomes.iter().filter(|o| **o == Outcome::Miss).count(), 1);
    let stats = cache.stats();
    assert_eq!(stats.lookups, 1000);
    assert_eq!(stats.misses, 1);
    assert_eq!(stats.hits.total(), 999);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_error_reaches_every_waiter_and_is_not_cached() -> Result<()> {
    let cache = TieredCache::builder().build();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let cache = cache.clone();
        let calls = Arc::clone(&calls);
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_execute(&request("flaky"), &Scope::Global, || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Err::<Completion, _>(std::io::Error::other("provider returned 503"))
                })
                .await
        }));
    }
    for task in tasks {
        let err = task.await?.err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("provider returned 503"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().errors.executor, 1);
    // Not cached: the next call runs its executor.
    let lookup = execute(&cache, &request("flaky"), &Scope::Global, "recovered").await?;
    assert_eq!(lookup.outcome, Outcome::Miss);
    assert_eq!(answer(&lookup), "recovered");
    Ok(())
}

/// A caller that waits on another's upstream call outlives any number of those calls being
/// dropped mid-way (their callers' timeouts): moka gives up after 200 and panics; the cache then
/// runs the waiting request itself.
#[tokio::test]
async fn a_waiter_outlives_any_number_of_dropped_leaders() -> Result<()> {
    let cache = TieredCache::builder().analytics(None).build();
    let question = request("asked by callers with short timeouts");
    let never = || std::future::pending::<Result<Completion, std::io::Error>>();
    let calls = AtomicUsize::new(0);
    let mut waiter = Box::pin(cache.get_or_execute(&question, &Scope::Global, || async {
        calls.fetch_add(1, Ordering::SeqCst);
        Ok::<_, std::io::Error>(completion("answered at last"))
    }));
    let mut dropped = 0;
    let mut answer_seen = None;
    for _ in 0..250 {
        // A new leader takes the slot (its upstream call never returns), then the waiter wakes
        // to find the previous leader dropped and waits on this one; then this one is dropped.
        let mut leader = Box::pin(cache.get_or_execute(&question, &Scope::Global, never));
        assert!(futures::poll!(&mut leader).is_pending());
        if let std::task::Poll::Ready(lookup) = futures::poll!(&mut waiter) {
            answer_seen = Some(lookup);
            break;
        }
        drop(leader);
        dropped += 1;
    }
    let lookup = match answer_seen {
        Some(lookup) => lookup,
        None => waiter.await,
    }
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(dropped >= 200, "only {dropped} leaders dropped");
    assert_eq!(answer(&lookup), "answered at last");
    assert_eq!(lookup.outcome, Outcome::Miss);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    Ok(())
}

async fn explode() -> Result<Completion, std::io::Error> {
    panic!("the executor panicked")
}

/// A panic in the caller's own upstream call is the caller's: it reaches them, nothing is
/// cached, and the next call runs normally.
#[tokio::test]
async fn an_executor_panic_reaches_its_caller_and_is_not_cached() -> Result<()> {
    let cache = TieredCache::builder().analytics(None).build();
    let question = request("panics upstream");
    let task = tokio::spawn({
        let (cache, question) = (cache.clone(), question.clone());
        async move {
            let lookup = cache.get_or_execute(&question, &Scope::Global, explode);
            lookup.await.is_ok()
        }
    });
    assert!(task.await.is_err_and(|e| e.is_panic()));
    let lookup = execute(&cache, &question, &Scope::Global, "fine").await?;
    assert_eq!(
        (lookup.outcome, answer(&lookup)),
        (Outcome::Miss, "fine".into())
    );
    Ok(())
}

/// A lookup's future is as large as its largest state, and a caller that spawns it or hands it
/// to `block_on` allocates and copies all of it on every call. The slow paths (single flight,
/// the S3 client, the caller's executor, the typed value's computation) are behind a box, so
/// the futures of lookups are a few kilobytes, not the tens they were with those inline.
#[tokio::test]
async fn lookup_futures_stay_small() -> Result<()> {
    const BOUND: usize = 4 << 10;
    let dir = TempDir::new()?;
    let cache = cache_with_disk(&dir)?;
    let question = request("how large is a lookup?");
    let upstream = || async {
        tokio::task::yield_now().await;
        Ok::<_, std::io::Error>(completion("small"))
    };
    let sizes = [
        (
            "get_or_execute",
            size_of_val(&cache.get_or_execute(&question, &Scope::Global, upstream)),
        ),
        ("get", size_of_val(&cache.get(&question, &Scope::Global))),
        (
            "get_or_insert_with",
            size_of_val(&cache.get_or_insert_with("user:1", None, || async {
                Ok::<_, serde_json::Error>(vec![1u8; 4])
            })),
        ),
        (
            "put",
            size_of_val(&cache.put(&question, &Scope::Global, completion("small"))),
        ),
    ];
    for (what, size) in sizes {
        assert!(size <= BOUND, "the future of {what} is {size} bytes");
    }
    // Still the same lookups.
    let lookup = execute(&cache, &question, &Scope::Global, "small").await?;
    assert_eq!(lookup.outcome, Outcome::Miss);
    let lookup = execute(&cache, &question, &Scope::Global, "other").await?;
    assert_eq!(
        (lookup.outcome, answer(&lookup)),
        (Outcome::L1, "small".into())
    );
    Ok(())
}

#[tokio::test]
async fn put_drop_reopen_is_an_l2_hit_then_an_l1_hit() -> Result<()> {
    let dir = TempDir::new()?;
    {
        let cache = cache_with_disk(&dir)?;
        cache
            .put(&request("persist me"), &Scope::Global, completion("kept"))
            .await?;
    }
    let cache = cache_with_disk(&dir)?;
    let first = cache.get(&request("persist me"), &Scope::Global).await?;
    assert_eq!(first.as_ref().map(|l| l.outcome), Some(Outcome::L2));
    assert_eq!(first.as_ref().map(answer).as_deref(), Some("kept"));
    let second = cache.get(&request("persist me"), &Scope::Global).await?;
    assert_eq!(second.map(|l| l.outcome), Some(Outcome::L1));
    // Savings recorded are the entry's own cost, per hit.
    let stats = cache.stats();
    assert!((stats.cost_saved_usd - 0.004).abs() < 1e-12);
    assert_eq!(stats.tokens_saved, 60);
    Ok(())
}

/// Entries reach the disk tier behind the caller: a put is served from below L1 at once, a
/// removal right after a put is not undone by the write landing later, and dropping the cache
/// lands every queued write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_behind_the_caller_are_seen_at_once_and_land_before_drop() -> Result<()> {
    let dir = TempDir::new()?;
    {
        let cache = cache_with_disk(&dir)?;
        for i in 0..600 {
            let text = format!("behind {i}");
            cache
                .put(&request(&text), &Scope::Global, completion(&text))
                .await?;
        }
        let seen = cache.key(&request("behind 599"), &Scope::Global)?;
        cache.memory().remove_id(seen.key.id()).await;
        let below = cache.get(&request("behind 599"), &Scope::Global).await?;
        assert_eq!(below.map(|l| l.outcome), Some(Outcome::L2));
        cache.remove(&request("behind 7"), &Scope::Global).await?;
    }
    let cache = cache_with_disk(&dir)?;
    for i in 0..600 {
        let text = format!("behind {i}");
        let found = cache.get(&request(&text), &Scope::Global).await?;
        if i == 7 {
            assert!(found.is_none(), "a removed entry came back");
        } else {
            let found = found.ok_or_else(|| anyhow::anyhow!("{text} was not written"))?;
            assert_eq!((found.outcome, answer(&found)), (Outcome::L2, text));
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_cost_that_is_no_amount_is_priced_and_the_entry_reads_back() -> Result<()> {
    let dir = TempDir::new()?;
    for (i, cost) in [f64::NAN, f64::INFINITY, -1.0].into_iter().enumerate() {
        let asked = request(&format!("costless {i}"));
        {
            let cache = TieredCache::builder()
                .disk(disk(&dir)?)
                .pricing(strata::Pricing::embedded()?)
                .build();
            let stored = cache
                .put(&asked, &Scope::Global, completion("priced").cost_usd(cost))
                .await?;
            // gpt-4o-mini's list price for 20 + 10 tokens, not the given value.
            assert!(
                stored.cost.total > 0.0 && stored.cost.total < 1e-4,
                "{cost}: {:?}",
                stored.cost
            );
        }
        let cache = cache_with_disk(&dir)?;
        let found = cache.get(&asked, &Scope::Global).await?;
        assert_eq!(found.map(|l| l.outcome), Some(Outcome::L2), "{cost}");
        assert_eq!(cache.stats().errors.corrupt, 0);
    }
    Ok(())
}

#[tokio::test]
async fn lifetime_stats_survive_a_restart() -> Result<()> {
    let dir = TempDir::new()?;
    {
        let cache = cache_with_disk(&dir)?;
        cache
            .put(&request("q"), &Scope::Global, completion("a"))
            .await?;
        cache.get(&request("q"), &Scope::Global).await?;
        cache.close().await?;
    }
    let cache = cache_with_disk(&dir)?;
    cache.get(&request("q"), &Scope::Global).await?;
    let lifetime = cache.lifetime_stats();
    assert_eq!(lifetime.hits.l1, 1);
    assert_eq!(lifetime.hits.l2, 1);
    assert_eq!(cache.stats().lookups, 1);
    Ok(())
}

#[tokio::test]
async fn a_user_scoped_entry_is_never_served_to_another_user() -> Result<()> {
    let dir = TempDir::new()?;
    let alice = Scope::User("alice".into());
    let bob = Scope::User("bob".into());
    {
        let cache = cache_with_disk(&dir)?;
        cache
            .put(&request("my balance?"), &alice, completion("alice: $10"))
            .await?;
        assert!(cache.get(&request("my balance?"), &bob).await?.is_none());
        assert!(
            cache
                .get(&request("my balance?"), &Scope::Global)
                .await?
                .is_none()
        );
        let for_bob = execute(&cache, &request("my balance?"), &bob, "bob: $3").await?;
        assert_eq!(for_bob.outcome, Outcome::Miss);
        assert_eq!(answer(&for_bob), "bob: $3");
    }
    // Also from disk, after a restart.
    let cache = cache_with_disk(&dir)?;
    let for_alice = cache.get(&request("my balance?"), &alice).await?;
    assert_eq!(
        for_alice.as_ref().map(answer).as_deref(),
        Some("alice: $10")
    );
    let for_bob = cache.get(&request("my balance?"), &bob).await?;
    assert_eq!(for_bob.as_ref().map(answer).as_deref(), Some("bob: $3"));
    let for_carol = cache
        .get(&request("my balance?"), &Scope::User("carol".into()))
        .await?;
    assert!(for_carol.is_none());
    Ok(())
}

#[tokio::test]
async fn an_entry_past_its_ttl_is_never_served_from_any_tier() -> Result<()> {
    let dir = TempDir::new()?;
    let ttl = TtlPolicy {
        default: Some(Duration::from_secs(3600)),
        per_model: [("gpt-4o-mini".to_string(), Duration::from_millis(400))].into(),
    };
    // `strict` keeps a request's own spelling of the model: the policy still applies.
    assert_eq!(
        ttl.for_model("GPT-4o-Mini"),
        Some(Duration::from_millis(400))
    );
    let build = |dir: &TempDir| -> Result<TieredCache> {
        Ok(TieredCache::builder()
            .disk(disk(dir)?)
            .ttl(ttl.clone())
            .build())
    };
    let short = request("short-lived");
    let mut long = request("long-lived");
    long["model"] = json!("gpt-4o");
    {
        let cache = build(&dir)?;
        cache
            .put(&short, &Scope::Global, completion("soon stale"))
            .await?;
        cache
            .put(&long, &Scope::Global, completion("fresh"))
            .await?;
        assert!(cache.get(&short, &Scope::Global).await?.is_some());
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(
            cache.get(&short, &Scope::Global).await?.is_none(),
            "L1 served a stale entry"
        );
        assert!(cache.get(&long, &Scope::Global).await?.is_some());
    }
    {
        let cache = build(&dir)?;
        cache
            .put(&short, &Scope::Global, completion("soon stale"))
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let cache = build(&dir)?;
    assert!(
        cache.get(&short, &Scope::Global).await?.is_none(),
        "L2 served a stale entry"
    );
    assert!(cache.stats().expired >= 1);
    assert_eq!(
        cache.get(&long, &Scope::Global).await?.map(|l| l.outcome),
        Some(Outcome::L2)
    );
    Ok(())
}

#[tokio::test]
async fn a_corrupt_copy_on_disk_is_a_counted_miss_and_is_removed() -> Result<()> {
    let dir = TempDir::new()?;
    let key = Normalizer::default()
        .key(&request("fragile"), &Scope::Global)?
        .key;
    {
        let cache = cache_with_disk(&dir)?;
        cache
            .put(&request("fragile"), &Scope::Global, completion("intact"))
            .await?;
    }
    let tier = disk(&dir)?;
    let cache = TieredCache::builder().disk(tier.clone()).build();
    let mut bytes = Codec::default().encode(&sample_entry(&request("fragile"), "intact")?)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    tier.insert_raw(&key, &bytes)?;
    assert!(
        cache
            .get(&request("fragile"), &Scope::Global)
            .await?
            .is_none()
    );
    assert_eq!(cache.stats().errors.corrupt, 1);
    assert_eq!(
        tier.get(&key).await?.map(|e| e.cache_key.clone()),
        None,
        "bad copy kept"
    );
    let fresh = execute(&cache, &request("fragile"), &Scope::Global, "recomputed").await?;
    assert_eq!(answer(&fresh), "recomputed");
    // Writes below L1 happen behind the caller; flushing lands them before the tier is
    // written to directly.
    cache.flush().await?;
    // The same through `get_or_execute`, which reads L2 before taking the single-flight slot
    // and again inside it: the corrupt copy is counted once, removed, and replaced.
    cache.memory().remove_id(key.id()).await;
    tier.insert_raw(&key, &bytes)?;
    let replaced = execute(
        &cache,
        &request("fragile"),
        &Scope::Global,
        "recomputed again",
    )
    .await?;
    assert_eq!(replaced.outcome, Outcome::Miss);
    assert_eq!(answer(&replaced), "recomputed again");
    assert_eq!(cache.stats().errors.corrupt, 2);
    cache.flush().await?;
    assert_eq!(
        tier.get(&key).await?.map(|e| answer_of(&e)),
        Some("recomputed again".to_string())
    );
    Ok(())
}

fn sample_entry(request: &Value, text: &str) -> Result<Entry> {
    let keyed = Normalizer::default().key(request, &Scope::Global)?;
    let now = chrono::Utc::now();
    Ok(Entry {
        cache_id: keyed.key.hex(),
        cache_key: keyed.key.to_string(),
        request: keyed.canonical,
        response: serde_json::value::to_raw_value(&response(text))?.into(),
        model: keyed.model,
        provider: "openai".into(),
        tokens: Default::default(),
        cost: Default::default(),
        latency_ms: 1,
        created_at: now,
        expires_at: None,
        tags: vec![],
        scope: Scope::Global,
        hit_count: 0,
        last_accessed: now,
        epochs: Default::default(),
    })
}

#[tokio::test]
async fn a_digest_collision_is_never_served() -> Result<()> {
    let dir = TempDir::new()?;
    let tier = disk(&dir)?;
    let cache = TieredCache::builder().disk(tier.clone()).build();
    // Store the entry of request B under the key of request A, as an MD5 collision would.
    let key_a = cache.key(&request("question A"), &Scope::Global)?.key;
    let entry_b = sample_entry(&request("question B"), "answer to B")?;
    tier.insert_raw(&key_a, &Codec::default().encode(&entry_b)?)?;
    assert!(
        cache
            .get(&request("question A"), &Scope::Global)
            .await?
            .is_none()
    );
    assert_eq!(cache.stats().errors.collisions, 1);
    let a = execute(
        &cache,
        &request("question A"),
        &Scope::Global,
        "answer to A",
    )
    .await?;
    assert_eq!(answer(&a), "answer to A");
    Ok(())
}

/// Wraps a tier and fails every call while `failing` is set, or panics in it while `panicking`
/// is.
struct FaultyTier {
    inner: DiskTier,
    failing: AtomicBool,
    panicking: AtomicBool,
}

impl FaultyTier {
    fn new(inner: DiskTier, failing: bool, panicking: bool) -> Arc<Self> {
        Arc::new(FaultyTier {
            inner,
            failing: AtomicBool::new(failing),
            panicking: AtomicBool::new(panicking),
        })
    }

    fn check(&self) -> Result<(), TierError> {
        if self.panicking.load(Ordering::SeqCst) {
            panic!("injected panic in a tier");
        }
        if self.failing.load(Ordering::SeqCst) {
            Err(TierError::Unavailable("injected fault".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Tier for FaultyTier {
    fn name(&self) -> TierName {
        TierName::L2
    }
    async fn get(&self, key: &CacheKey) -> Result<Option<Arc<Entry>>, TierError> {
        self.check()?;
        self.inner.get(key).await
    }
    async fn put(&self, key: &CacheKey, entry: &Arc<Entry>) -> Result<(), TierError> {
        self.check()?;
        self.inner.put(key, entry).await
    }
    async fn remove(&self, key: &CacheKey) -> Result<(), TierError> {
        self.check()?;
        self.inner.remove(key).await
    }
    async fn flush(&self) -> Result<(), TierError> {
        self.check()?;
        self.inner.flush().await
    }
    fn usage(&self) -> TierUsage {
        self.inner.usage()
    }
}

/// Runs requests through a cache whose only tier below memory fails (or panics) on every call,
/// then lets the tier work again: every request is answered, every call is a counted L2 error,
/// and once the tier works a put is served from it.
async fn degrades_then_recovers(failing: bool, panicking: bool) -> Result<()> {
    let dir = TempDir::new()?;
    let faulty = FaultyTier::new(disk(&dir)?, failing, panicking);
    // A memory tier too small to hold anything, so every lookup goes to L2.
    let cache = TieredCache::builder()
        .memory_capacity(0)
        .l2(faulty.clone())
        .build();
    for i in 0..3 {
        // The lookup (get), the answer's write (put) and a removal all meet the fault.
        let request = request(&format!("q{i}"));
        let lookup = execute(&cache, &request, &Scope::Global, "works anyway").await?;
        assert_eq!(lookup.outcome, Outcome::Miss);
        assert_eq!(answer(&lookup), "works anyway");
        cache.remove(&request, &Scope::Global).await?;
    }
    assert!(cache.stats().errors.l2 >= 6, "{:?}", cache.stats().errors);
    faulty.failing.store(false, Ordering::SeqCst);
    faulty.panicking.store(false, Ordering::SeqCst);
    cache
        .put(&request("later"), &Scope::Global, completion("stored"))
        .await?;
    cache.memory().run_pending_tasks().await;
    let found = cache.get(&request("later"), &Scope::Global).await?;
    assert_eq!(found.as_ref().map(|l| l.outcome), Some(Outcome::L2));
    assert_eq!(found.as_ref().map(answer).as_deref(), Some("stored"));
    Ok(())
}

#[tokio::test]
async fn a_failing_disk_tier_degrades_to_counted_misses() -> Result<()> {
    degrades_then_recovers(true, false).await
}

#[tokio::test]
async fn a_tier_that_panics_costs_counted_misses_not_the_callers_task() -> Result<()> {
    degrades_then_recovers(false, true).await
}

#[tokio::test]
async fn a_malformed_request_still_gets_its_answer_uncached() -> Result<()> {
    let cache = TieredCache::builder().build();
    let bad = json!({"model": "gpt-4o", "messages": "not a list"});
    for _ in 0..2 {
        let lookup = cache
            .get_or_execute(&bad, &Scope::Global, || async {
                Ok::<_, std::io::Error>(completion("answered"))
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(lookup.outcome, Outcome::Uncacheable);
        assert_eq!(answer(&lookup), "answered");
    }
    assert_eq!(cache.stats().uncacheable, 2);
    assert!(cache.get(&bad, &Scope::Global).await.is_err());
    // A failing call is a lookup too, as a cacheable request's failed miss is.
    let failed = cache
        .get_or_execute(&bad, &Scope::Global, || async {
            Err::<Completion, _>(std::io::Error::other("upstream down"))
        })
        .await;
    assert!(failed.is_err());
    let stats = cache.stats();
    assert_eq!((stats.lookups, stats.uncacheable), (3, 3));
    assert_eq!(stats.errors.executor, 1);
    Ok(())
}

/// An invalidation made while the upstream call runs refuses its answer: the callers waiting
/// on that call get it, no later lookup is served it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_during_the_upstream_call_refuses_its_answer() -> Result<()> {
    let dir = TempDir::new()?;
    let cache = cache_with_disk(&dir)?;
    let by_key = request("asked before the key was invalidated");
    let key = cache.key(&by_key, &Scope::Global)?.key;
    for (request, selector) in [
        (
            request("asked before the model was invalidated"),
            Selector::Model("gpt-4o-mini".into()),
        ),
        (by_key, Selector::Key(key.hex())),
    ] {
        let during = cache.clone();
        let lookup = cache
            .get_or_execute(&request, &Scope::Global, || async move {
                during
                    .invalidate(&selector)
                    .await
                    .map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(completion("from before"))
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(lookup.outcome, Outcome::Miss);
        assert_eq!(answer(&lookup), "from before");
        cache.settle().await;
        let again = execute(&cache, &request, &Scope::Global, "after").await?;
        assert_eq!(again.outcome, Outcome::Miss, "{}", answer(&again));
        assert_eq!(answer(&again), "after");
    }
    Ok(())
}

/// Concurrent identical misses whose answer is not kept (a TTL of zero) still run the upstream
/// call once: the waiters get the leader's answer, and nothing counts as a digest collision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_share_an_answer_that_is_not_kept() -> Result<()> {
    let cache = TieredCache::builder().build();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (cache, calls) = (cache.clone(), Arc::clone(&calls));
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_execute(&request("not kept"), &Scope::Global, || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, std::io::Error>(completion("once").ttl(Duration::ZERO))
                })
                .await
        }));
    }
    for task in tasks {
        let lookup = task.await?.map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(answer(&lookup), "once");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let stats = cache.stats();
    assert_eq!(stats.errors.collisions, 0, "{:?}", stats.errors);
    assert_eq!((stats.lookups, stats.misses), (20, 1));
    Ok(())
}

/// An L2 tier that can hold a read after taking its copy, until told to go on.
struct PausingTier {
    inner: DiskTier,
    pause: AtomicBool,
    read: tokio::sync::Notify,
    go: tokio::sync::Notify,
}

#[async_trait]
impl Tier for PausingTier {
    fn name(&self) -> TierName {
        TierName::L2
    }
    async fn get(&self, key: &CacheKey) -> Result<Option<Arc<Entry>>, TierError> {
        let found = self.inner.get(key).await;
        if self.pause.load(Ordering::SeqCst) {
            self.read.notify_one();
            self.go.notified().await;
        }
        found
    }
    async fn put(&self, key: &CacheKey, entry: &Arc<Entry>) -> Result<(), TierError> {
        self.inner.put(key, entry).await
    }
    async fn remove(&self, key: &CacheKey) -> Result<(), TierError> {
        self.inner.remove(key).await
    }
    async fn flush(&self) -> Result<(), TierError> {
        self.inner.flush().await
    }
    fn usage(&self) -> TierUsage {
        self.inner.usage()
    }
}

/// A lookup that read the disk copy before a removal and copies it into memory after it does
/// not bring the removed answer back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_read_before_a_removal_is_not_served_after_it() -> Result<()> {
    let dir = TempDir::new()?;
    let tier = Arc::new(PausingTier {
        inner: disk(&dir)?,
        pause: AtomicBool::new(false),
        read: tokio::sync::Notify::new(),
        go: tokio::sync::Notify::new(),
    });
    let cache = TieredCache::builder().l2(tier.clone()).build();
    let question = request("removed while being read");
    cache
        .put(&question, &Scope::Global, completion("removed"))
        .await?;
    cache.settle().await;
    let id = cache.key(&question, &Scope::Global)?.key.id();
    cache.memory().remove_id(id).await;
    tier.pause.store(true, Ordering::SeqCst);
    let reader = {
        let (cache, question) = (cache.clone(), question.clone());
        tokio::spawn(async move { cache.get(&question, &Scope::Global).await })
    };
    tier.read.notified().await;
    tier.pause.store(false, Ordering::SeqCst);
    cache.remove(&question, &Scope::Global).await?;
    tier.go.notify_one();
    // The reader asked before the removal: it may have its copy.
    let _ = reader.await?;
    let after = execute(&cache, &question, &Scope::Global, "asked again").await?;
    assert_eq!(after.outcome, Outcome::Miss, "{}", answer(&after));
    assert_eq!(answer(&after), "asked again");
    Ok(())
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct UserRecord {
    id: u64,
    name: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_insert_with_caches_any_serde_value() -> Result<()> {
    let dir = TempDir::new()?;
    let calls = Arc::new(AtomicUsize::new(0));
    let load = |calls: Arc<AtomicUsize>| async move {
        calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok::<_, anyhow::Error>(UserRecord {
            id: 7,
            name: "Ada".into(),
        })
    };
    {
        let cache = cache_with_disk(&dir)?;
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let cache = cache.clone();
            let calls = Arc::clone(&calls);
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_insert_with("user:7", Some(Duration::from_secs(60)), || load(calls))
                    .await
            }));
        }
        for task in tasks {
            let user = task.await?.map_err(|e| anyhow::anyhow!("{e}"))?;
            assert_eq!(user.name, "Ada");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
    let cache = cache_with_disk(&dir)?;
    let again: UserRecord = cache
        .get_or_insert_with("user:7", None, || load(Arc::clone(&calls)))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(again.id, 7);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "served from disk, not recomputed"
    );
    assert_eq!(cache.stats().hits.l2, 1);
    Ok(())
}

/// A typed value stored in another shape (its type changed between releases) is not the
/// caller's error: it is refused as a corrupt copy, computed afresh and replaced in every tier,
/// and the call counts as one lookup and one miss, not as a hit and a miss. Concurrent callers
/// that meet it get the new value too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_value_of_another_shape_is_recomputed_and_counted_once() -> Result<()> {
    let dir = TempDir::new()?;
    let ada = UserRecord {
        id: 9,
        name: "Ada".into(),
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let load = |calls: Arc<AtomicUsize>| async move {
        calls.fetch_add(1, Ordering::SeqCst);
        Ok::<_, anyhow::Error>(UserRecord {
            id: 9,
            name: "Ada".into(),
        })
    };
    {
        let cache = cache_with_disk(&dir)?;
        let old: Vec<String> = cache
            .get_or_insert_with("user:9", None, || async {
                Ok::<_, serde_json::Error>(vec!["Ada".to_string()])
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(old, ["Ada"]);
        let user: UserRecord = cache
            .get_or_insert_with("user:9", None, || load(Arc::clone(&calls)))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(user, ada);
        let stats = cache.stats();
        assert_eq!(
            (stats.lookups, stats.misses, stats.hits.total()),
            (2, 2, 0),
            "{stats:?}"
        );
        assert_eq!(stats.errors.corrupt, 1);
        assert_eq!(stats.cost_saved_usd, 0.0);
        let user: UserRecord = cache
            .get_or_insert_with("user:9", None, || load(Arc::clone(&calls)))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(user, ada);
        assert_eq!(cache.stats().hits.l1, 1);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
    // The disk holds the new shape: after a restart it is an L2 hit, not another refusal.
    let cache = cache_with_disk(&dir)?;
    let user: UserRecord = cache
        .get_or_insert_with("user:9", None, || load(Arc::clone(&calls)))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(user, ada);
    assert_eq!(
        (cache.stats().hits.l2, cache.stats().errors.corrupt),
        (1, 0)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Many callers at once over an old shape on disk: each gets the new value.
    let cache = {
        drop(cache);
        let cache = cache_with_disk(&dir)?;
        cache
            .get_or_insert_with("user:10", None, || async {
                Ok::<_, serde_json::Error>("an old shape".to_string())
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        cache.close().await?;
        cache_with_disk(&dir)?
    };
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (cache, calls) = (cache.clone(), Arc::clone(&calls));
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_insert_with("user:10", None, || load(calls))
                .await
        }));
    }
    for task in tasks {
        let user = task.await?.map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(user, ada);
    }
    let stats = cache.stats();
    assert_eq!((stats.lookups, stats.hits.total() + stats.misses), (8, 8));
    assert!(stats.errors.corrupt >= 1, "{stats:?}");
    Ok(())
}

/// A library `put` of an answer fetched before an invalidation, stored after it, was served as
/// new. Told when the answer was fetched, the cache refuses it.
#[tokio::test]
async fn an_answer_fetched_before_an_invalidation_and_put_after_it_is_not_served() -> Result<()> {
    let dir = TempDir::new()?;
    let cache = cache_with_disk(&dir)?;
    let fetched = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    cache
        .invalidate(&Selector::Model("gpt-4o-mini".into()))
        .await?;
    tokio::time::sleep(Duration::from_millis(5)).await;
    cache
        .put(
            &request("stale by the time it is stored"),
            &Scope::Global,
            completion("old answer").fetched_at(fetched),
        )
        .await?;
    assert!(
        cache
            .get(&request("stale by the time it is stored"), &Scope::Global)
            .await?
            .is_none(),
        "fetched before the invalidation: refused"
    );
    // Fetched after it: served.
    cache
        .put(
            &request("fresh"),
            &Scope::Global,
            completion("new answer").fetched_at(chrono::Utc::now()),
        )
        .await?;
    assert!(
        cache
            .get(&request("fresh"), &Scope::Global)
            .await?
            .is_some()
    );
    Ok(())
}

/// `disk.path` pointing at a directory of someone else's files wrote into it (a user's file
/// named `db` was overwritten; `disk.path = "/"` wrote into `/`). Such a directory is refused
/// untouched; a new one is strata's, marked, and readable by its owner only.
#[test]
fn a_directory_that_is_not_a_disk_tier_is_refused_untouched() -> Result<()> {
    let dir = TempDir::new()?;
    std::fs::write(dir.path().join("db"), "my own database")?;
    std::fs::write(dir.path().join("notes.txt"), "my notes")?;
    let refused = DiskTier::open(&DiskConfig::new(dir.path()), Codec::default());
    let error = refused
        .err()
        .context("a user's directory was opened")?
        .to_string();
    assert!(error.contains("not a strata disk tier"), "{error}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("db"))?,
        "my own database"
    );
    assert_eq!(std::fs::read_dir(dir.path())?.count(), 2, "nothing written");

    let fresh = dir.path().join("fresh");
    let tier = DiskTier::open(&DiskConfig::new(&fresh), Codec::default())?;
    assert!(fresh.join(strata::tiers::disk::MARKER).is_file());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode =
            |p: &std::path::Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode(&fresh)?, 0o700, "the directory is its owner's only");
        assert_eq!(mode(&fresh.join("db"))?, 0o600, "and so are sled's files");
        // And the state kept beside the database, written after the tier opened.
        tier.keep_beside("epochs.json", b"{}");
        assert_eq!(
            mode(&fresh.join("epochs.json"))?,
            0o600,
            "and what is kept beside"
        );
    }
    drop(tier);
    // A tier written before the marker existed (sled's files only) still opens.
    std::fs::remove_file(fresh.join(strata::tiers::disk::MARKER))?;
    std::thread::sleep(Duration::from_millis(200));
    let reopened = DiskTier::open(&DiskConfig::new(&fresh), Codec::default());
    assert!(reopened.is_ok(), "{:?}", reopened.err());
    Ok(())
}

/// Every invalidation, clear, gc and epochs reset goes into the audit trail, with who did it,
/// and the trail survives a restart.
#[tokio::test]
async fn the_audit_trail_records_every_taking_back_with_who() -> Result<()> {
    let dir = TempDir::new()?;
    {
        let disk = disk(&dir)?;
        let cache = TieredCache::builder()
            .epochs(strata::tiers::EpochStore::open(&disk)?)
            .disk(disk)
            .actor("ops-bot")
            .build();
        execute(&cache, &request("audited"), &Scope::Global, "an answer").await?;
        cache
            .invalidate(&Selector::Model("gpt-4o-mini".into()))
            .await?;
        let key = cache
            .key(&request("audited"), &Scope::Global)?
            .key
            .to_string();
        cache
            .acting_as("alice")
            .invalidate(&Selector::Key(key))
            .await?;
        cache.invalidate_pattern("gpt-4o-mini_*", |_| {}).await?;
        cache.gc(true, |_| {}).await?;
        cache.gc(false, |_| {}).await?;
        cache.clear().await?;
        cache.reset_epochs().await?;
        cache.close().await?;
    }
    let cache = cache_with_disk(&dir)?;
    let trail = cache.audit_trail(None)?;
    let seen: Vec<(&str, &str)> = trail
        .iter()
        .map(|r| (r.action.as_str(), r.who.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("invalidate", "ops-bot"),
            ("invalidate", "alice"),
            ("invalidate", "ops-bot"),
            ("gc", "ops-bot"),
            ("clear", "ops-bot"),
            ("epochs reset", "ops-bot"),
        ],
        "a dry-run gc changes nothing and is not recorded"
    );
    assert_eq!(trail[0].selector.as_deref(), Some("model gpt-4o-mini"));
    assert_eq!(
        trail[0].affected, None,
        "an epoch selector touches no entry"
    );
    assert_eq!(trail[1].affected, Some(1));
    assert!(trail.iter().all(|r| r.node == "local"));
    let later = cache.audit_trail(Some(chrono::Utc::now() + chrono::Duration::hours(1)))?;
    assert!(later.is_empty());
    Ok(())
}

/// Keys rotate without a flush: a node holding the new key and the old one reads what the old
/// one sealed; `rekey` rewrites it under the new one, after which the old key can go. Entries
/// written before there was a key are rewritten too.
#[tokio::test]
async fn keys_rotate_and_rekey_rewrites_entries_under_the_current_key() -> Result<()> {
    let key = |b: u8| strata::core::Key::from_material(&[b; 48]).expect("key");
    let ring = |current: u8, old: &[u8]| {
        Arc::new(strata::core::Keyring::new(
            key(current),
            old.iter().map(|b| key(*b)).collect(),
            true,
        ))
    };
    let dir = TempDir::new()?;
    let open = |codec: Codec| -> Result<TieredCache> {
        let disk = DiskTier::open(&DiskConfig::new(dir.path().join("l2")), codec)?;
        Ok(TieredCache::builder().disk(disk).build())
    };
    {
        let before_keys = open(Codec::default())?;
        execute(
            &before_keys,
            &request("from before keys"),
            &Scope::Global,
            "a",
        )
        .await?;
        before_keys.close().await?;
    }
    {
        let first = open(Codec::default().with_keys(ring(1, &[])))?;
        assert!(
            first.rekey().await? == (1, 1),
            "the unsealed entry is sealed"
        );
        execute(&first, &request("under key 1"), &Scope::Global, "b").await?;
        first.close().await?;
    }
    {
        let rotated = open(Codec::default().with_keys(ring(2, &[1])))?;
        for text in ["from before keys", "under key 1"] {
            let found = rotated.get(&request(text), &Scope::Global).await?;
            assert_eq!(found.map(|l| l.outcome), Some(Outcome::L2), "{text}");
        }
        assert_eq!(rotated.rekey().await?, (2, 2));
        assert_eq!(rotated.rekey().await?, (2, 0), "nothing left to rewrite");
        rotated.close().await?;
    }
    let only_new = open(Codec::default().with_keys(ring(2, &[])))?;
    for text in ["from before keys", "under key 1"] {
        let found = only_new.get(&request(text), &Scope::Global).await?;
        assert_eq!(found.map(|l| l.outcome), Some(Outcome::L2), "{text}");
    }
    let stranger = {
        only_new.close().await?;
        open(Codec::default().with_keys(ring(3, &[])))?
    };
    assert!(
        stranger
            .get(&request("under key 1"), &Scope::Global)
            .await?
            .is_none(),
        "another key reads nothing"
    );
    Ok(())
}

/// Lowering a TTL in the configuration did not shorten the entries already stored (nor other
/// nodes' entries): the node's TTL now bounds every entry it reads, and an entry's own TTL can
/// shorten it, not lengthen it past the configured one.
#[tokio::test]
async fn a_lowered_ttl_shortens_the_entries_already_stored() -> Result<()> {
    let dir = TempDir::new()?;
    let with_ttl = |ttl: Option<Duration>| -> Result<TieredCache> {
        Ok(TieredCache::builder()
            .disk(disk(&dir)?)
            .ttl(TtlPolicy {
                default: ttl,
                per_model: Default::default(),
            })
            .build())
    };
    {
        let week = with_ttl(Some(Duration::from_secs(7 * 86400)))?;
        execute(&week, &request("kept a week"), &Scope::Global, "a").await?;
        week.put(
            &request("asked for a month"),
            &Scope::Global,
            completion("b").ttl(Duration::from_secs(30 * 86400)),
        )
        .await?;
        week.close().await?;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    {
        let still_a_week = with_ttl(Some(Duration::from_secs(7 * 86400)))?;
        assert!(
            still_a_week
                .get(&request("kept a week"), &Scope::Global)
                .await?
                .is_some()
        );
        still_a_week.close().await?;
    }
    let one_second = with_ttl(Some(Duration::from_secs(1)))?;
    for text in ["kept a week", "asked for a month"] {
        assert!(
            one_second
                .get(&request(text), &Scope::Global)
                .await?
                .is_none(),
            "{text}: older than this node's TTL"
        );
    }
    assert!(one_second.stats().expired >= 2);
    Ok(())
}

/// Key tombstones were never pruned. gc prunes those older than the longest TTL: every entry
/// they could hide has expired (each node bounds entries by its TTL).
#[tokio::test]
async fn gc_prunes_key_tombstones_older_than_the_longest_ttl() -> Result<()> {
    let dir = TempDir::new()?;
    let disk = disk(&dir)?;
    let cache = TieredCache::builder()
        .epochs(strata::tiers::EpochStore::open(&disk)?)
        .disk(disk)
        .ttl(TtlPolicy {
            default: Some(Duration::from_secs(1)),
            per_model: Default::default(),
        })
        .build();
    execute(&cache, &request("to forget"), &Scope::Global, "a").await?;
    let key = cache
        .key(&request("to forget"), &Scope::Global)?
        .key
        .to_string();
    cache.invalidate(&Selector::Key(key)).await?;
    assert_eq!(cache.epochs().snapshot().key.len(), 1);
    let report = cache.gc(false, |_| {}).await?;
    assert_eq!(report.tombstones_pruned, 0, "younger than the TTL: kept");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let report = cache.gc(false, |_| {}).await?;
    assert_eq!(report.tombstones_pruned, 1);
    assert!(cache.epochs().snapshot().key.is_empty());
    assert!(
        cache
            .get(&request("to forget"), &Scope::Global)
            .await?
            .is_none()
    );
    Ok(())
}

/// `analytics.hit_ids` and `analytics.requests` grew for ever; gc prunes them past the
/// retention.
#[tokio::test]
async fn gc_prunes_analytics_records_past_their_retention() -> Result<()> {
    let dir = TempDir::new()?;
    let cache = TieredCache::builder()
        .disk(disk(&dir)?)
        .analytics_retention(Some(Duration::from_millis(200)))
        .build();
    execute(&cache, &request("hit me"), &Scope::Global, "a").await?;
    execute(&cache, &request("hit me"), &Scope::Global, "a").await?;
    cache.record_request_metrics("r-1", "openai", 120, 0.001);
    let id = cache.key(&request("hit me"), &Scope::Global)?.key.id();
    let analytics = cache.analytics().context("analytics")?;
    analytics.flush()?;
    assert!(analytics.was_hit(id)?);
    assert_eq!(cache.metrics_for_period(1)?.requests, 1);
    let kept = cache.gc(false, |_| {}).await?;
    assert_eq!(kept.analytics_pruned, 0, "younger than the retention");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pruned = cache.gc(false, |_| {}).await?;
    assert_eq!(pruned.analytics_pruned, 2, "one hit id, one request metric");
    assert!(!analytics.was_hit(id)?);
    assert_eq!(cache.metrics_for_period(1)?.requests, 0);
    Ok(())
}
