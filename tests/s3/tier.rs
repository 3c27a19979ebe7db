//! The S3 tier against a real S3 server (in-process s3s-fs, or the one `STRATA_TEST_S3_*` names).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use strata::core::Codec;
use strata::tiers::s3::Pointer;
use strata::tiers::{DiskConfig, DiskTier, S3Tier, Tier};
use strata::{Completion, Outcome, Scope, TieredCache};
use tempfile::TempDir;

use crate::s3_server::{Fault, TestS3};

pub(crate) fn request(text: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})
}

pub(crate) fn completion(text: &str) -> Completion {
    let response = json!({"choices": [{"message": {"role": "assistant", "content": text}}],
                          "usage": {"prompt_tokens": 12, "completion_tokens": 30}});
    Completion::from_value(&response)
        .provider("openai")
        .cost_usd(0.001)
        .latency_ms(700)
}

/// One node: a disk directory and an S3 tier on the shared bucket.
pub(crate) struct Node {
    pub(crate) cache: TieredCache,
    pub(crate) s3: S3Tier,
    pub(crate) disk: DiskTier,
}

pub(crate) async fn node(server: &TestS3, dir: &std::path::Path) -> Result<Node> {
    node_with(&server.config(), dir).await
}

pub(crate) async fn node_with(
    config: &strata::tiers::S3Config,
    dir: &std::path::Path,
) -> Result<Node> {
    let disk = DiskTier::open(&DiskConfig::new(dir), Codec::default())?;
    let s3 = S3Tier::connect(config, &disk, Codec::default()).await?;
    let cache = TieredCache::builder()
        .disk(disk.clone())
        .s3(s3.clone())
        .build();
    Ok(Node { cache, s3, disk })
}

/// Stores `n` requests `{prefix}{i}`, each answered with `answer`.
async fn put_many(cache: &TieredCache, prefix: &str, n: u64, answer: &str) -> Result<()> {
    for i in 0..n {
        let text = format!("{prefix}{i}");
        cache
            .put(&request(&text), &Scope::Global, completion(answer))
            .await?;
    }
    Ok(())
}

/// How many entry objects the test's prefix holds.
async fn entry_objects(server: &TestS3) -> Result<usize> {
    let keys = server.keys().await?;
    Ok(keys.iter().filter(|k| k.ends_with(".json.zst")).count())
}

pub(crate) async fn never() -> Result<Completion, std::io::Error> {
    Err(std::io::Error::other("the executor must not run"))
}

pub(crate) async fn outcome(cache: &TieredCache, text: &str) -> Result<Outcome> {
    let lookup = cache
        .get_or_execute(&request(text), &Scope::Global, never)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(lookup.outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_land_at_the_documented_paths_with_pointer_and_manifest() -> Result<()> {
    let server = TestS3::start().await?;
    let dir = TempDir::new()?;
    let a = node(&server, dir.path()).await?;
    let entry = a
        .cache
        .put(&request("paths"), &Scope::Global, completion("here"))
        .await?;
    a.cache.flush().await?;

    let day = entry.created_at.format("%Y/%m/%d/%H");
    let base = format!(
        "{}/llm-cache/gpt-4o-mini/{day}/{}",
        server.prefix, entry.cache_id
    );
    let pointer_key = format!(
        "{}/cache-index/by-hash/{}/{}.json",
        server.prefix,
        &entry.cache_id[..2],
        entry.cache_id
    );
    let keys = server.keys().await?;
    let manifest_prefix = format!(
        "{}/cache-index/by-date/{}/{}-",
        server.prefix,
        entry.created_at.format("%Y-%m-%d"),
        a.s3.node_id()
    );
    ensure!(
        keys.len() == 4,
        "entry, metadata, pointer, manifest: {keys:#?}"
    );
    ensure!(keys.contains(&format!("{base}.json.zst")), "{keys:#?}");
    ensure!(keys.contains(&format!("{base}.metadata.json")), "{keys:#?}");
    ensure!(keys.contains(&pointer_key), "{keys:#?}");
    let manifest = keys
        .iter()
        .find(|k| k.starts_with(&manifest_prefix) && k.ends_with(".jsonl"))
        .context("manifest segment")?;

    // The entry object is the envelope, and decodes to the entry.
    let stored = server.object(&format!("{base}.json.zst")).await?;
    let decoded = Codec::default().decode(&stored)?;
    assert_eq!(decoded.request, entry.request);
    assert_eq!(decoded.response.get(), entry.response.get());

    // The pointer names the object, its model, size and dates.
    let pointer: Pointer = serde_json::from_slice(&server.object(&pointer_key).await?)?;
    assert_eq!(pointer.path, format!("{base}.json.zst"));
    assert_eq!(pointer.cache_key, entry.cache_key);
    assert_eq!(pointer.model, "gpt-4o-mini");
    assert_eq!(pointer.size, stored.len() as u64);
    assert_eq!(pointer.created, entry.created_at);
    assert_eq!(pointer.expires, entry.expires_at);
    assert_eq!(pointer.node, a.s3.node_id());

    // The manifest segment holds one line: the same pointer.
    let manifest_text = String::from_utf8(server.object(manifest).await?)?;
    let lines: Vec<Pointer> = manifest_text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines, vec![pointer]);

    // The metadata is plain JSON without the request or the response.
    let metadata: Value =
        serde_json::from_slice(&server.object(&format!("{base}.metadata.json")).await?)?;
    assert_eq!(metadata["cache_key"], json!(entry.cache_key));
    assert_eq!(metadata["tokens"]["output"], json!(30));
    assert_eq!(metadata["object_bytes"], json!(stored.len()));
    assert!(metadata.get("request").is_none() && metadata.get("response").is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_b_is_served_from_l3_and_promotes_into_l2_and_l1() -> Result<()> {
    let server = TestS3::start().await?;
    let (dir_a, dir_b) = (TempDir::new()?, TempDir::new()?);
    let a = node(&server, dir_a.path()).await?;
    for i in 0..5 {
        a.cache
            .put(
                &request(&format!("q{i}")),
                &Scope::Global,
                completion(&format!("a{i}")),
            )
            .await?;
    }
    a.cache.flush().await?;
    assert_eq!(a.s3.pending(), 0);

    let b = node(&server, dir_b.path()).await?;
    // B has never seen these keys: its index is empty, so each costs a pointer GET, then a GET.
    assert_eq!(b.s3.usage().entries, 0);
    assert_eq!(outcome(&b.cache, "q0").await?, Outcome::L3);
    // Promoted into L1 ...
    assert_eq!(outcome(&b.cache, "q0").await?, Outcome::L1);
    // ... and into L2.
    let keyed = b.cache.key(&request("q0"), &Scope::Global)?;
    b.cache.memory().remove_id(keyed.key.id()).await;
    assert_eq!(outcome(&b.cache, "q0").await?, Outcome::L2);
    assert!(b.disk.get(&keyed.key).await?.is_some());
    // B's index now knows where q0 lives.
    assert!(b.s3.known_path(&keyed.key)?.is_some());

    // The answer is A's, byte for byte.
    let lookup = b
        .cache
        .get_or_execute(&request("q3"), &Scope::Global, never)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(lookup.outcome, Outcome::L3);
    let a_entry = a
        .disk
        .get(&a.cache.key(&request("q3"), &Scope::Global)?.key)
        .await?;
    assert_eq!(
        Some(lookup.entry.response.get()),
        a_entry.as_ref().map(|e| e.response.get())
    );
    let stats = b.cache.stats();
    assert_eq!(stats.hits.l3, 2);
    // An unknown request is a miss after one pointer GET (a 404), and the executor runs.
    let miss = b
        .cache
        .get_or_execute(&request("new"), &Scope::Global, || async {
            Ok::<_, std::io::Error>(completion("fresh"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(miss.outcome, Outcome::Miss);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_scoped_l3_entry_is_not_served_to_another_user() -> Result<()> {
    let server = TestS3::start().await?;
    let (dir_a, dir_b) = (TempDir::new()?, TempDir::new()?);
    let a = node(&server, dir_a.path()).await?;
    let alice = Scope::User("alice".into());
    a.cache
        .put(&request("mine"), &alice, completion("secret"))
        .await?;
    a.cache.flush().await?;
    let b = node(&server, dir_b.path()).await?;
    let bob = Scope::User("bob".into());
    assert!(b.cache.get(&request("mine"), &bob).await?.is_none());
    let served = b.cache.get(&request("mine"), &alice).await?;
    assert_eq!(served.map(|l| l.outcome), Some(Outcome::L3));
    Ok(())
}

/// Two kinds of bad object: a byte flipped in transit or at rest (the checksum fails), and a
/// well-sealed envelope whose response is not JSON (what a faulty or hostile writer to the shared
/// bucket could leave). Each is refused, counted as corrupt, and the request is recomputed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_object_in_s3_is_a_counted_miss() -> Result<()> {
    let server = TestS3::start().await?;
    let (dir_a, dir_b) = (TempDir::new()?, TempDir::new()?);
    let a = node(&server, dir_a.path()).await?;
    let codec = Codec::default();
    let mut stored = Vec::new();
    for (text, spoil) in [("flipped", false), ("forged", true)] {
        let entry = a
            .cache
            .put(&request(text), &Scope::Global, completion("ok"))
            .await?;
        a.cache.flush().await?;
        let keyed = a.cache.key(&request(text), &Scope::Global)?;
        let path =
            a.s3.known_path(&keyed.key)?
                .context("indexed after upload")?;
        let mut bytes = server.object(&path).await?;
        if spoil {
            let mut payload = codec.open(&bytes)?;
            let request_len = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
            payload[8 + request_len as usize] = b'x';
            bytes = codec.seal(&payload)?;
        } else {
            let last = bytes.len() - 1;
            bytes[last] ^= 0x40;
        }
        a.s3.put_object(&path, bytes, "application/octet-stream")
            .await?;
        stored.push((text, entry));
    }

    let b = node(&server, dir_b.path()).await?;
    for (n, (text, entry)) in stored.into_iter().enumerate() {
        let lookup = b
            .cache
            .get_or_execute(&request(text), &Scope::Global, || async {
                Ok::<_, std::io::Error>(completion("recomputed"))
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(lookup.outcome, Outcome::Miss, "{text}");
        assert_ne!(lookup.entry.response.get(), entry.response.get(), "{text}");
        assert_eq!(b.cache.stats().errors.corrupt, n as u64 + 1, "{text}");
    }
    Ok(())
}

/// A process with S3 (down) in `dir` that puts `{prefix}{i}` for `i < n`, sees them queued in
/// the outbox, makes the outbox durable as sled's own flush timer would, then "crashes": the
/// cache is never closed or dropped, and its runtime (its own, so that its background drainer
/// dies with it) stops.
fn queue_then_crash(server: &TestS3, dir: &std::path::Path, prefix: &str, n: u64) -> Result<()> {
    let (config, path, prefix) = (server.config(), dir.to_path_buf(), prefix.to_string());
    std::thread::spawn(move || -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let a = runtime.block_on(async {
            let a = node_with(&config, &path).await?;
            put_many(&a.cache, &prefix, n, "x").await?;
            // Entries reach the outbox behind the caller; a crash before that loses them.
            a.cache.settle().await;
            anyhow::Ok(a)
        })?;
        assert_eq!(a.s3.pending(), n as usize);
        a.disk.flush_blocking()?;
        std::mem::forget(a);
        drop(runtime);
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the first process panicked"))?
}

/// `n` entries queued for upload by a process that crashed while the server was down (so they
/// can only be in the outbox), the server back up; returns a copy of that process's directory
/// (sled keeps one process-wide lock per directory: a copy is what a restarted process sees).
async fn queued_while_s3_was_down(server: &mut TestS3, prefix: &str, n: u64) -> Result<TempDir> {
    let dir = TempDir::new()?;
    server.stop().await?;
    queue_then_crash(server, dir.path(), prefix, n)?;
    server.restart().await?;
    let copy = TempDir::new()?;
    copy_dir(dir.path(), copy.path())?;
    Ok(copy)
}

/// Waits (up to 20 s) for `node`'s background drainer to empty its upload queue.
async fn drained(node: &Node) {
    let started = std::time::Instant::now();
    while node.s3.pending() > 0 && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_entries_from_before_a_crash_reach_s3_after_reopen() -> Result<()> {
    let mut server = TestS3::start().await?;
    if !server.can_stop() {
        return Ok(()); // needs a server it can stop: an external one over HTTPS cannot be
    }
    let copy = queued_while_s3_was_down(&mut server, "crash", 20).await?;
    let reopened = node(&server, copy.path()).await?;
    assert_eq!(reopened.s3.pending(), 20, "the outbox survived");
    // The background drainer takes it without being asked.
    drained(&reopened).await;
    assert_eq!(reopened.s3.pending(), 0);
    assert_eq!(entry_objects(&server).await?, 20);
    Ok(())
}

/// A database sled refuses (here, its settings file destroyed) is moved aside, and the upload
/// queue is salvaged from it with the entries it refers to: what was queued still reaches S3.
/// Before, the queue was lost with the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upload_queue_of_a_corrupt_disk_tier_is_salvaged_and_still_uploaded() -> Result<()> {
    let mut server = TestS3::start().await?;
    if !server.can_stop() {
        return Ok(()); // needs a server it can stop: an external one over HTTPS cannot be
    }
    let copy = queued_while_s3_was_down(&mut server, "salvaged ", 20).await?;
    std::fs::write(copy.path().join("conf"), b"\x00not sled's settings\xff")?;
    let reopened = node(&server, copy.path()).await?;
    assert!(reopened.disk.moved_aside().is_some(), "moved aside");
    let salvage = reopened.disk.salvage().context("salvaged")?;
    assert_eq!((salvage.entries, salvage.uploads), (20, 20), "{salvage:?}");
    assert_eq!(reopened.s3.pending(), 20, "the queue survived");
    drained(&reopened).await;
    assert_eq!(reopened.s3.pending(), 0);
    assert_eq!(entry_objects(&server).await?, 20);
    // And served from the salvaged copies.
    for i in 0..20 {
        let keyed = reopened
            .cache
            .key(&request(&format!("salvaged {i}")), &Scope::Global)?;
        assert!(reopened.disk.get(&keyed.key).await?.is_some(), "entry {i}");
    }
    // Moved aside beside the temporary directory, outside it: not left behind.
    if let Some(aside) = reopened.disk.moved_aside() {
        std::fs::remove_dir_all(aside)?;
    }
    Ok(())
}

/// Uploads queued by a run with S3 are kept through a later run with S3 off, even when that run
/// evicts their disk copies: they reach S3 once a run has it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_uploads_outlive_eviction_by_a_run_without_s3() -> Result<()> {
    let mut server = TestS3::start().await?;
    if !server.can_stop() {
        return Ok(()); // needs a server it can stop: an external one over HTTPS cannot be
    }
    let first = TempDir::new()?;
    server.stop().await?;
    queue_then_crash(&server, first.path(), "queued ", 5)?;

    // A run with S3 off and a small disk: its own puts evict the queued copies, oldest first.
    let second = TempDir::new()?;
    copy_dir(first.path(), second.path())?;
    let mut disk_config = DiskConfig::new(second.path());
    disk_config.capacity = 8 << 10;
    let disk = DiskTier::open(&disk_config, Codec::default())?;
    let cache = TieredCache::builder().disk(disk.clone()).build();
    let queued: Vec<_> = (0..5)
        .map(|i| cache.key(&request(&format!("queued {i}")), &Scope::Global))
        .collect::<Result<_, _>>()?;
    put_many(
        &cache,
        "later ",
        40,
        &"an answer of some length. ".repeat(12),
    )
    .await?;
    cache.settle().await;
    let started = std::time::Instant::now();
    while disk.usage().bytes > disk_config.capacity && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for keyed in &queued {
        ensure!(
            disk.get(&keyed.key).await?.is_none(),
            "the queued copy was evicted"
        );
    }
    cache.flush().await?;
    disk.flush_blocking()?;

    // A run with S3 again: every queued upload goes up.
    server.restart().await?;
    let third = TempDir::new()?;
    copy_dir(second.path(), third.path())?;
    let c = node(&server, third.path()).await?;
    assert_eq!(c.s3.pending(), 5);
    c.cache.flush().await?;
    assert_eq!(c.s3.pending(), 0);
    assert_eq!(
        entry_objects(&server).await?,
        5,
        "every queued entry reached S3"
    );
    Ok(())
}

pub(crate) fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    for item in std::fs::read_dir(from)? {
        let item = item?;
        let target = to.join(item.file_name());
        if item.file_type()?.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_dir(&item.path(), &target)?;
        } else {
            std::fs::copy(item.path(), &target)?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_s3_refusing_connections_lookups_and_puts_work_and_writes_land_later() -> Result<()> {
    let mut server = TestS3::start().await?;
    if !server.can_stop() {
        return Ok(()); // needs a server it can stop: an external one over HTTPS cannot be
    }
    let dir = TempDir::new()?;
    let mut config = server.config();
    config.breaker_threshold = 3;
    config.breaker_cool_down = Duration::from_millis(300);
    let disk = DiskTier::open(&DiskConfig::new(dir.path()), Codec::default())?;
    let s3 = S3Tier::connect(&config, &disk, Codec::default()).await?;
    let cache = TieredCache::builder().disk(disk).s3(s3.clone()).build();
    cache
        .put(&request("before"), &Scope::Global, completion("b"))
        .await?;
    cache.flush().await?;

    server.stop().await?;
    let started = std::time::Instant::now();
    for i in 0..30 {
        // Misses run the executor and are stored locally.
        let lookup = cache
            .get_or_execute(&request(&format!("down{i}")), &Scope::Global, || async {
                Ok::<_, std::io::Error>(completion("d"))
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(lookup.outcome, Outcome::Miss);
    }
    // Hits below L1 still come from L2.
    let keyed = cache.key(&request("before"), &Scope::Global)?;
    cache.memory().remove_id(keyed.key.id()).await;
    assert_eq!(outcome(&cache, "before").await?, Outcome::L2);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a refused connection fails fast: {:?}",
        started.elapsed()
    );
    assert!(s3.stats().breaker_opened >= 1, "{:?}", s3.stats());
    assert!(cache.stats().errors.l3 >= 1);
    assert!(
        cache.flush().await.is_err(),
        "flush says S3 did not take the writes"
    );
    assert_eq!(s3.pending(), 30);

    server.restart().await?;
    tokio::time::sleep(Duration::from_millis(350)).await; // the breaker's cool-down
    cache.flush().await?;
    assert_eq!(s3.pending(), 0);
    assert_eq!(entry_objects(&server).await?, 31);
    Ok(())
}

/// Removing and invalidating while S3 refuses connections: the objects stay in the bucket, but
/// neither this node nor another one serves them once S3 is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removals_made_while_s3_is_down_hold_when_it_returns() -> Result<()> {
    let mut server = TestS3::start().await?;
    if !server.can_stop() {
        return Ok(()); // needs a server it can stop: an external one over HTTPS cannot be
    }
    let (dir_a, dir_b) = (TempDir::new()?, TempDir::new()?);
    let mut config = server.config();
    config.breaker_cool_down = Duration::from_millis(300);
    let a = node_with(&config, dir_a.path()).await?;
    let texts = ["removed", "by key", "by pattern", "kept"];
    for text in texts {
        a.cache
            .put(&request(text), &Scope::Global, completion(text))
            .await?;
    }
    a.cache.flush().await?;
    assert_eq!(entry_objects(&server).await?, 4);

    server.stop().await?;
    a.cache.remove(&request("removed"), &Scope::Global).await?;
    let by_key = a.cache.key(&request("by key"), &Scope::Global)?;
    let invalidated = a
        .cache
        .invalidate(&strata::core::Selector::Key(by_key.key.hex()))
        .await?;
    assert!(!invalidated.published, "S3 is down: {invalidated:?}");
    let by_pattern = a.cache.key(&request("by pattern"), &Scope::Global)?;
    let pattern = format!("{}*", &by_pattern.key.to_string()[..20]);
    assert!(
        a.cache.invalidate_pattern(&pattern, |_| {}).await.is_err(),
        "S3 cannot be listed"
    );

    server.restart().await?;
    tokio::time::sleep(Duration::from_millis(350)).await; // the breaker's cool-down
    assert_eq!(entry_objects(&server).await?, 4, "nothing was deleted");
    // The answer a lookup gets when the executor has to run: "fresh".
    let lookup = |cache: TieredCache, text: &'static str| async move {
        cache
            .get_or_execute(&request(text), &Scope::Global, || async {
                Ok::<_, std::io::Error>(completion("fresh"))
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    };

    // Another node, once this one has published its tombstones.
    a.cache.epochs().sync(&a.s3).await?;
    let b = node(&server, dir_b.path()).await?;
    for text in ["removed", "by key", "by pattern"] {
        assert_eq!(
            lookup(b.cache.clone(), text).await?.outcome,
            Outcome::Miss,
            "{text}"
        );
    }
    assert_eq!(outcome(&b.cache, "kept").await?, Outcome::L3);

    // This node, its S3 tier in reach again (`kept` comes from there) ...
    let kept = a.cache.key(&request("kept"), &Scope::Global)?;
    a.cache.memory().remove_id(kept.key.id()).await;
    a.disk.remove(&kept.key).await?;
    assert_eq!(outcome(&a.cache, "kept").await?, Outcome::L3);
    // ... never serves the old answers (B's fresh ones may reach it through S3).
    for text in ["removed", "by key", "by pattern"] {
        let served = lookup(a.cache.clone(), text).await?;
        assert!(
            served.entry.response.get().contains("fresh"),
            "{text}: {:?} {}",
            served.outcome,
            served.entry.response.get()
        );
    }
    Ok(())
}

/// An object whose body never ends, or that says it is larger than anything strata writes: the
/// lookup is a counted miss once the operation timeout has passed (or at once), and the
/// caller's executor answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_or_oversized_object_is_a_counted_miss() -> Result<()> {
    let mut server = TestS3::start().await?;
    if !server.can_stop() {
        return Ok(()); // needs a server it can stop: an external one over HTTPS cannot be
    }
    let dir = TempDir::new()?;
    let mut config = server.config();
    config.operation_timeout = Duration::from_millis(500);
    config.breaker_threshold = 100;
    // No refresh of the epochs while the server misbehaves: the L3 errors counted below are
    // the lookups' own.
    let disk = DiskTier::open(&DiskConfig::new(dir.path()), Codec::default())?;
    let s3 = S3Tier::connect(&config, &disk, Codec::default()).await?;
    let cache = TieredCache::builder()
        .disk(disk.clone())
        .s3(s3.clone())
        .refresh_interval(Duration::from_secs(3600))
        .build();
    let a = Node { cache, s3, disk };
    for text in ["endless", "oversized"] {
        a.cache
            .put(&request(text), &Scope::Global, completion(text))
            .await?;
    }
    a.cache.flush().await?;

    for (text, fault) in [("endless", None), ("oversized", Some(1u64 << 40))] {
        let key = a.cache.key(&request(text), &Scope::Global)?;
        a.cache.memory().remove_id(key.key.id()).await;
        a.disk.remove(&key.key).await?;
        server.misbehave(Fault::Trickle(fault)).await?;
        let errors = a.cache.stats().errors.l3;
        // Without a bound on reading the body, this lookup would never end: the test fails
        // after a minute instead of hanging.
        let lookup = tokio::time::timeout(
            Duration::from_secs(60),
            a.cache
                .get_or_execute(&request(text), &Scope::Global, || async {
                    Ok::<_, std::io::Error>(completion("fresh"))
                }),
        )
        .await
        .context("the lookup never ended")?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(lookup.outcome, Outcome::Miss, "{text}");
        assert!(lookup.entry.response.get().contains("fresh"));
        assert!(a.cache.stats().errors.l3 > errors, "{text}: counted");
        server.restart().await?;
    }
    Ok(())
}

/// A node in a fresh directory, then its server's front made to misbehave with `fault`; `None`
/// where the front cannot (an external server over HTTPS).
async fn node_facing(fault: Fault) -> Result<Option<(TestS3, TempDir, Node)>> {
    let mut server = TestS3::start().await?;
    if !server.can_stop() {
        return Ok(None);
    }
    let dir = TempDir::new()?;
    let a = node(&server, dir.path()).await?;
    server.misbehave(fault).await?;
    Ok(Some((server, dir, a)))
}

/// A proxy in front of S3 refuses one upload for good (413, an HTML page, no S3 error code):
/// that entry is dropped from the outbox and counted, the rest of the queue goes up, the
/// breaker stays closed and flush succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_refused_for_good_is_dropped_and_the_rest_go_up() -> Result<()> {
    let Some((server, _dir, a)) = node_facing(Fault::RefuseBodiesOver(32 << 10)).await? else {
        return Ok(()); // needs a front that can refuse requests one by one (not over HTTPS)
    };
    // 64 KiB that zstd cannot shrink below the limit.
    let mut noise = String::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while noise.len() < 64 << 10 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.push_str(&format!("{x:016x}"));
    }
    a.cache
        .put(&request("large"), &Scope::Global, completion(&noise))
        .await?;
    put_many(&a.cache, "small", 20, "fits").await?;
    a.cache.flush().await?;
    assert_eq!(a.s3.pending(), 0);
    assert_eq!(entry_objects(&server).await?, 20);
    let stats = a.s3.stats();
    assert_eq!((stats.uploaded, stats.dropped), (20, 1), "{stats:?}");
    assert_eq!(stats.breaker_opened, 0);
    // The refused entry is still served here, from L1.
    assert_eq!(outcome(&a.cache, "large").await?, Outcome::L1);
    Ok(())
}

/// A pointer that names another key's object: that object is refused (a counted collision),
/// never remembered as this key's, and removing this key leaves it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misdirected_pointer_is_refused_and_its_object_is_left_alone() -> Result<()> {
    let server = TestS3::start().await?;
    let (dir_a, dir_b, dir_c) = (TempDir::new()?, TempDir::new()?, TempDir::new()?);
    let a = node(&server, dir_a.path()).await?;
    put_many(&a.cache, "q", 2, "answer").await?;
    a.cache.flush().await?;
    let pointer_of = |id: &str| {
        format!(
            "{}/cache-index/by-hash/{}/{id}.json",
            server.prefix,
            &id[..2]
        )
    };
    let (q0, q1) = (
        a.cache.key(&request("q0"), &Scope::Global)?.key,
        a.cache.key(&request("q1"), &Scope::Global)?.key,
    );
    // q0's pointer now says what q1's says.
    let q1_pointer = server.object(&pointer_of(&q1.hex())).await?;
    server
        .client()
        .await
        .put_object()
        .bucket(&server.bucket)
        .key(pointer_of(&q0.hex()))
        .body(aws_sdk_s3::primitives::ByteStream::from(q1_pointer))
        .send()
        .await?;

    let b = node(&server, dir_b.path()).await?;
    assert!(b.cache.get(&request("q0"), &Scope::Global).await?.is_none());
    assert_eq!(
        b.cache.stats().errors.collisions,
        1,
        "{:?}",
        b.cache.stats()
    );
    assert_eq!(b.s3.known_path(&q0)?, None);
    b.cache.remove(&request("q0"), &Scope::Global).await?;
    // q1's object is still there, and served.
    let c = node(&server, dir_c.path()).await?;
    assert_eq!(outcome(&c.cache, "q1").await?, Outcome::L3);
    Ok(())
}

/// A proxy whose body limit lets entries through but not a batch's manifest segment: the batch
/// is done without its segment instead of staying at the head of the outbox for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_refused_for_good_does_not_hold_the_outbox() -> Result<()> {
    // An entry's objects are about 1 KB each; 30 pointer lines are about 10 KB.
    let Some((server, _dir, a)) = node_facing(Fault::RefuseBodiesOver(4 << 10)).await? else {
        return Ok(()); // needs a front that can refuse requests one by one (not over HTTPS)
    };
    put_many(&a.cache, "batch", 30, "fits").await?;
    a.cache.flush().await?;
    assert_eq!(a.s3.pending(), 0);
    assert_eq!(entry_objects(&server).await?, 30);
    let keys = server.keys().await?;
    assert!(
        !keys.iter().any(|k| k.ends_with(".jsonl")),
        "no manifest segment: {keys:#?}"
    );
    assert_eq!(a.s3.stats().uploaded, 30);
    Ok(())
}

/// S3 that hangs (accepts connections, never answers) and then answers 503: lookups end in
/// misses once the configured timeout passes, puts are stored locally and queued, every failure
/// is counted, and when S3 answers again the queue drains and lookups reach L3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_s3_hanging_or_answering_503_lookups_and_puts_work_and_writes_land_later() -> Result<()>
{
    let mut server = TestS3::start().await?;
    if !server.can_stop() {
        return Ok(()); // needs a server it can take over: an external one over HTTPS cannot be
    }
    let dir_a = TempDir::new()?;
    let a = node(&server, dir_a.path()).await?;
    a.cache
        .put(&request("shared"), &Scope::Global, completion("from A"))
        .await?;
    a.cache.flush().await?;

    let dir_b = TempDir::new()?;
    let mut config = server.config();
    // Short enough to keep the test quick, long enough for a healthy loopback call on a busy
    // machine (the test suite runs in parallel on two cores).
    config.operation_timeout = Duration::from_secs(1);
    config.breaker_threshold = u32::MAX; // every lookup goes to S3 and has to give up by itself
    let b = node_with(&config, dir_b.path()).await?;
    // A bound on the whole phase, far above its timeouts, so that a hang fails the test.
    let phase = |what: &'static str| {
        move |e: tokio::time::error::Elapsed| anyhow::anyhow!("{what} still running: {e}")
    };
    for (fault, name) in [(Fault::Stall, "hang"), (Fault::Status(503), "503")] {
        server.misbehave(fault).await?;
        tokio::time::timeout(Duration::from_secs(30), async {
            for i in 0..3 {
                let text = format!("{name}-{i}");
                let lookup = b
                    .cache
                    .get_or_execute(&request(&text), &Scope::Global, || async {
                        Ok::<_, std::io::Error>(completion("executed"))
                    })
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                ensure!(
                    lookup.outcome == Outcome::Miss,
                    "{text}: {:?}",
                    lookup.outcome
                );
            }
            ensure!(
                b.cache.flush().await.is_err(),
                "flush says S3 did not take the writes"
            );
            Ok(())
        })
        .await
        .map_err(phase("lookups against a failing S3"))??;
    }
    // Each lookup's pointer GET failed, and each answer waits in the outbox.
    ensure!(
        b.cache.stats().errors.l3 >= 6,
        "{:?}",
        b.cache.stats().errors
    );
    ensure!(b.s3.pending() == 6, "{} queued", b.s3.pending());

    server.restart().await?;
    tokio::time::timeout(Duration::from_secs(30), async {
        // The drainer may be in its backoff; flush drains now.
        b.cache.flush().await?;
        ensure!(b.s3.pending() == 0);
        ensure!(entry_objects(&server).await? == 7, "A's one and B's six");
        ensure!(outcome(&b.cache, "shared").await? == Outcome::L3);
        Ok(())
    })
    .await
    .map_err(phase("the drain after S3 came back"))??;
    Ok(())
}

/// The cache queues a reference to its disk copy, not a second copy: evicting that copy from a
/// full disk tier must hand the envelope to the outbox, and a copy removed as invalid must not
/// be uploaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_uploads_outlive_disk_eviction_and_invalidated_copies_stay_local() -> Result<()> {
    let mut server = TestS3::start().await?;
    if !server.can_stop() {
        return Ok(()); // needs a server it can stop: an external one over HTTPS cannot be
    }
    let dir = TempDir::new()?;
    let mut disk_config = DiskConfig::new(dir.path());
    disk_config.capacity = 8 << 10;
    let disk = DiskTier::open(&disk_config, Codec::default())?;
    let mut config = server.config();
    config.breaker_threshold = u32::MAX; // no cool-down to wait out after the restart
    let s3 = S3Tier::connect(&config, &disk, Codec::default()).await?;
    let cache = TieredCache::builder()
        .disk(disk.clone())
        .s3(s3.clone())
        .build();
    server.stop().await?;
    put_many(
        &cache,
        "evicted ",
        40,
        &"an answer of some length. ".repeat(12),
    )
    .await?;
    cache.settle().await;
    // Eviction runs on the blocking pool; wait for it to bring the tier under its bound.
    let started = std::time::Instant::now();
    while disk.usage().bytes > disk_config.capacity && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(disk.evictions() >= 20, "evictions: {}", disk.evictions());
    assert_eq!(s3.pending(), 40);
    // One more entry, removed from disk as if found invalid before its upload.
    cache
        .put(&request("withdrawn"), &Scope::Global, completion("w"))
        .await?;
    let withdrawn = cache.key(&request("withdrawn"), &Scope::Global)?;
    cache.settle().await;
    disk.remove(&withdrawn.key).await?;
    assert_eq!(s3.pending(), 41);

    server.restart().await?;
    cache.flush().await?;
    assert_eq!(s3.pending(), 0);
    assert_eq!(
        entry_objects(&server).await?,
        40,
        "every evicted entry reached S3"
    );
    assert_eq!(s3.stats().dropped, 1, "the withdrawn one was not uploaded");
    // Each is served from S3 to a node that never had it.
    let other = TempDir::new()?;
    let b = node(&server, other.path()).await?;
    for i in [0, 17, 39] {
        assert_eq!(
            outcome(&b.cache, &format!("evicted {i}")).await?,
            Outcome::L3
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_rebuild_warm_and_gc_page_through_more_than_a_thousand_objects() -> Result<()> {
    let server = TestS3::start().await?;
    let dir = TempDir::new()?;
    let a = node(&server, dir.path()).await?;
    let n = 1100;
    put_many(&a.cache, "bulk ", n, "z").await?;
    let started = std::time::Instant::now();
    a.cache.flush().await?;
    eprintln!("drained {n} entries in {:?}", started.elapsed());
    let root = a.s3.layout().cache_root();
    let mut pages = 0;
    let listed = a.s3.list_pages(&root, |_| pages += 1).await?;
    // Entry and metadata objects: 2 per entry, over at least three pages of 1,000.
    assert_eq!(listed, 2 * n);
    assert!(pages >= 3, "{pages} pages");

    // Delete some pointers, then rebuild them and the index in a fresh directory.
    for i in 0..10 {
        let keyed = a
            .cache
            .key(&request(&format!("bulk {i}")), &Scope::Global)?;
        a.s3.client()
            .delete_object()
            .bucket(a.s3.bucket())
            .key(a.s3.layout().pointer_path(&keyed.key.hex()))
            .send()
            .await?;
    }
    let dir_b = TempDir::new()?;
    let b = node(&server, dir_b.path()).await?;
    // Stopped after every page but the last (two of pointers, three of entries), taken up
    // each time where it stopped: the counts at the end are the listing's, each object once.
    let mut seen = 0;
    let mut runs = 0;
    let report = loop {
        runs += 1;
        let report = b.s3.rebuild_index_until(|n| seen = n, || true).await?;
        if !report.stopped {
            break report;
        }
        assert!(runs < 20, "the rebuild does not move on: {report:?}");
    };
    assert!(runs >= 3, "{runs} runs");
    assert_eq!(report.listed, 2 * n);
    assert_eq!(seen, 2 * n);
    assert_eq!(report.indexed, n);
    assert_eq!(report.pointers_written, 10);
    assert_eq!(b.s3.usage().entries, n);
    // A rebuild that ran to its end leaves nothing to take up: the next starts afresh.
    let again = b.s3.rebuild_index(|_| {}).await?;
    assert_eq!(
        (again.listed, again.indexed, again.pointers_written),
        (2 * n, n, 0)
    );
    // The rebuilt pointer serves a node that has no index.
    let dir_c = TempDir::new()?;
    let c = node(&server, dir_c.path()).await?;
    assert_eq!(outcome(&c.cache, "bulk 3").await?, Outcome::L3);
    // The rebuilt index serves B with one GET.
    let keyed = b.cache.key(&request("bulk 7"), &Scope::Global)?;
    assert!(b.s3.known_path(&keyed.key)?.is_some());
    assert_eq!(outcome(&b.cache, "bulk 7").await?, Outcome::L3);

    // Warming, stopped after its first page, then run again: it takes up where it stopped,
    // and every entry is warmed exactly once.
    let dir_d = TempDir::new()?;
    let d = node(&server, dir_d.path()).await?;
    let all = |_: &strata::Entry| true;
    let first =
        d.s3.warm_until(&d.disk, None, None, all, |_| {}, || true)
            .await?;
    assert!(first.stopped, "{first:?}");
    assert!(first.warmed > 0 && first.warmed < n, "{first:?}");
    let rest = d.s3.warm(&d.disk, None, None, all, |_| {}).await?;
    assert!(!rest.stopped);
    assert_eq!(
        (rest.held, first.warmed + rest.warmed, rest.failed),
        (first.warmed, n, 0),
        "{first:?} then {rest:?}"
    );
    assert_eq!(d.disk.usage().entries, n);

    // gc, a page at a time, after everything was invalidated: every entry, its metadata
    // object and its pointer go, also where a page ends between an entry and its metadata
    // (a stray object listed first shifts the pairs by one); the stray stays.
    let stray = format!("{root}0-stray.txt");
    a.s3.put_object(&stray, b"not strata's".to_vec(), "text/plain")
        .await?;
    a.cache.invalidate(&strata::core::Selector::All).await?;
    // Stopped after every page, with a dry run (which changes nothing) between the first two
    // runs: each run counts what it deleted, and together they delete every dead object once,
    // the pointers of entries an earlier run deleted included.
    let first = a.cache.gc_until(false, |_| {}, || true).await?;
    assert!(first.stopped && first.s3_entries < n, "{first:?}");
    let dry = a.cache.gc(true, |_| {}).await?;
    assert_eq!(dry.s3_entries, n - first.s3_entries, "{dry:?}");
    let (mut entries, mut objects, mut runs) = (first.s3_entries, first.s3_objects, 1);
    loop {
        runs += 1;
        let report = a.cache.gc_until(false, |_| {}, || true).await?;
        entries += report.s3_entries;
        objects += report.s3_objects;
        if !report.stopped {
            break;
        }
        assert!(runs < 20, "gc does not move on: {report:?}");
    }
    assert!(runs >= 3, "{runs} runs");
    assert_eq!((entries, objects), (n, 3 * n));
    let left = server.keys().await?;
    assert!(left.contains(&stray), "{left:?}");
    assert!(
        !left
            .iter()
            .any(|k| k.ends_with(".json.zst") || k.ends_with(".metadata.json")),
        "{} left",
        left.len()
    );
    let pointers = a.s3.layout().pointer_root();
    assert!(
        !left.iter().any(|k| k.starts_with(&pointers)),
        "pointers left"
    );
    let again = a.cache.gc(false, |_| {}).await?;
    assert_eq!((again.s3_entries, again.s3_objects), (0, 0), "{again:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pulls_a_models_entries_into_l2() -> Result<()> {
    let server = TestS3::start().await?;
    let (dir_a, dir_b) = (TempDir::new()?, TempDir::new()?);
    let a = node(&server, dir_a.path()).await?;
    put_many(&a.cache, "w", 6, "w").await?;
    let other =
        json!({"model": "claude-3-5-haiku", "messages": [{"role": "user", "content": "w"}]});
    a.cache.put(&other, &Scope::Global, completion("c")).await?;
    a.cache.flush().await?;

    let b = node(&server, dir_b.path()).await?;
    let all = |_: &strata::Entry| true;
    let report =
        b.s3.warm(&b.disk, Some("gpt-4o-mini"), None, all, |_| {})
            .await?;
    assert_eq!((report.matched, report.warmed, report.failed), (6, 6, 0));
    assert_eq!(b.disk.usage().entries, 6);
    assert_eq!(outcome(&b.cache, "w4").await?, Outcome::L2);
    let since_future = chrono::Utc::now() + chrono::Duration::hours(2);
    let none =
        b.s3.warm(&b.disk, None, Some(since_future), all, |_| {})
            .await?;
    assert_eq!(none.matched, 0);
    // Written in this hour, but before `since`: not a match.
    let since_now = chrono::Utc::now();
    let none =
        b.s3.warm(&b.disk, None, Some(since_now), all, |_| {})
            .await?;
    assert_eq!((none.matched, none.warmed), (0, 0), "{none:?}");
    // What another node invalidated is not warmed.
    a.cache
        .invalidate(&strata::core::Selector::Model("claude-3-5-haiku".into()))
        .await?;
    b.cache.refresh_epochs().await?;
    let epochs = b.cache.epochs();
    let report =
        b.s3.warm(&b.disk, None, None, |e| epochs.admits(e), |_| {})
            .await?;
    // The six it holds already are passed over, not fetched again.
    assert_eq!(
        (
            report.matched,
            report.warmed,
            report.held,
            report.invalidated
        ),
        (7, 0, 6, 1),
        "{report:?}"
    );
    Ok(())
}

/// A bucket that does not exist answers every GET with a 404, as a missing object does; it is
/// a failure to count and warn about, not a run of quiet misses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_is_a_counted_failure_not_a_quiet_miss() -> Result<()> {
    use aws_sdk_s3::error::ProvideErrorMetadata;
    let server = TestS3::start().await?;
    let dir = TempDir::new()?;
    let mut config = server.config();
    config.bucket = format!("{}-that-does-not-exist", config.bucket);
    let n = node_with(&config, dir.path()).await?;
    let found = n.cache.get(&request("anything"), &Scope::Global).await?;
    assert!(found.is_none());
    assert!(
        n.cache.stats().errors.l3 > 0,
        "{:?}",
        n.cache.stats().errors
    );
    // Where the server names the bucket in a GET's answer (AWS, MinIO, Garage; s3s-fs answers
    // NoSuchKey), a fetch says so rather than finding nothing.
    let raw = server
        .client()
        .await
        .get_object()
        .bucket(&config.bucket)
        .key("anything")
        .send()
        .await;
    if raw.as_ref().err().and_then(|e| e.code()) == Some("NoSuchBucket") {
        let keyed = n.cache.key(&request("anything"), &Scope::Global)?;
        let fetched = n.s3.fetch(&keyed.key).await.map(|found| found.is_some());
        assert!(
            fetched
                .as_ref()
                .is_err_and(|e| e.to_string().contains("NoSuchBucket")),
            "{fetched:?}"
        );
    }
    Ok(())
}

/// An S3 failure is told in a few words (the root cause of a call without an answer, or the
/// server's code), not the kilobyte of the SDK's whole error chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_said_in_a_few_words() -> Result<()> {
    let server = TestS3::start().await?;
    let dir = TempDir::new()?;
    let free = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = free.local_addr()?.port();
    drop(free);
    let mut config = server.config();
    config.endpoint = Some(format!("http://127.0.0.1:{port}"));
    config.max_attempts = 1;
    let n = node_with(&config, dir.path()).await?;
    let keyed = n.cache.key(&request("anything"), &Scope::Global)?;
    let message = match n.s3.fetch(&keyed.key).await {
        Err(e) => e.to_string(),
        Ok(found) => anyhow::bail!("a fetch from nowhere answered {:?}", found.is_some()),
    };
    assert!(message.contains("no answer"), "{message}");
    assert!(message.len() < 300, "{} bytes: {message}", message.len());
    Ok(())
}
