//! Invalidation on every tier and across nodes, against a real S3 server (in-process s3s-fs,
//! or the one `STRATA_TEST_S3_*` names).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use serde_json::{Value, json};
use strata::core::{Codec, Selector};
use strata::tiers::s3::control::{Expect, Written};
use strata::tiers::{DiskConfig, DiskTier, EpochStore, S3Config, S3Tier};
use strata::{Completion, Outcome, Scope, TieredCache};
use tempfile::TempDir;

use crate::s3_server::{Fault, TestS3};

/// One cached exchange: what it asks, of which model, in which scope, with which tags.
#[derive(Clone)]
struct Item {
    text: &'static str,
    model: &'static str,
    scope: Scope,
    tags: &'static [&'static str],
}

fn item(text: &'static str, model: &'static str) -> Item {
    Item {
        text,
        model,
        scope: Scope::Global,
        tags: &[],
    }
}

impl Item {
    fn scoped(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    fn tagged(mut self, tags: &'static [&'static str]) -> Self {
        self.tags = tags;
        self
    }

    fn request(&self) -> Value {
        json!({"model": self.model, "messages": [{"role": "user", "content": self.text}]})
    }

    async fn put(&self, cache: &TieredCache) -> Result<String> {
        let response = json!({"choices": [{"message": {"role": "assistant", "content": "ok"}}],
                              "usage": {"prompt_tokens": 5, "completion_tokens": 5}});
        let completion = Completion::from_value(&response)
            .provider("openai")
            .tags(self.tags.iter().map(|t| t.to_string()).collect());
        let entry = cache.put(&self.request(), &self.scope, completion).await?;
        Ok(entry.cache_key.clone())
    }

    /// Where a lookup finds it now (`None`: nowhere).
    async fn found(&self, cache: &TieredCache) -> Result<Option<Outcome>> {
        Ok(cache
            .get(&self.request(), &self.scope)
            .await?
            .map(|l| l.outcome))
    }
}

async fn open_node(
    config: &S3Config,
    dir: &Path,
    refresh: Duration,
    conditional: bool,
) -> Result<TieredCache> {
    let disk = DiskTier::open(&DiskConfig::new(dir), Codec::default())?;
    let s3 = S3Tier::connect(config, &disk, Codec::default()).await?;
    let epochs = EpochStore::open(&disk)?.conditional_writes(conditional);
    Ok(TieredCache::builder()
        .disk(disk)
        .s3(s3)
        .epochs(epochs)
        .refresh_interval(refresh)
        .build())
}

async fn node(server: &TestS3, dir: &Path) -> Result<TieredCache> {
    open_node(&server.config(), dir, Duration::from_secs(5), true).await
}

/// Nothing of `hit` is served by `cache`; everything of `spared` is, from `tier`.
async fn expect_served(
    name: &str,
    cache: &TieredCache,
    hit: &[Item],
    spared: &[Item],
    tier: Outcome,
) -> Result<()> {
    for i in hit {
        let found = i.found(cache).await?;
        ensure!(
            found.is_none(),
            "{name}: {tier:?} still serves {}: {found:?}",
            i.text
        );
    }
    for i in spared {
        let found = i.found(cache).await?;
        ensure!(
            found == Some(tier),
            "{name}: {} from {tier:?}: {found:?}",
            i.text
        );
    }
    Ok(())
}

/// Invalidates with `selector` (or a pattern) on node A, then checks, tier by tier, that
/// nothing `hit` covers is served and everything in `spared` still is: from A's L1; from A's
/// L2 after a restart (the epochs must survive it); from L3 on a node B with its own disk.
async fn check_selector(
    name: &str,
    selector: Option<Selector>,
    pattern: Option<&str>,
    hit: &[Item],
    spared: &[Item],
) -> Result<()> {
    let server = TestS3::start().await?;
    let (dir_a, dir_b) = (TempDir::new()?, TempDir::new()?);
    let a = node(&server, dir_a.path()).await?;
    for i in hit.iter().chain(spared) {
        i.put(&a).await?;
    }
    if matches!(selector, Some(Selector::OlderThan(_))) {
        // The spared entries must be younger than the cut-off: written a while after the others.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        for i in spared {
            i.put(&a).await?;
        }
    }
    a.flush().await?;
    let done = match (&selector, pattern) {
        (Some(s), _) => a.invalidate(s).await?,
        (None, Some(p)) => a.invalidate_pattern(p, |_| {}).await?,
        (None, None) => a.clear().await?,
    };
    ensure!(done.published, "{name}: not published to the bucket");
    if done.exact {
        ensure!(
            done.affected == hit.len() as u64,
            "{name}: affected {} of {}",
            done.affected,
            hit.len()
        );
    }

    // A copy of A's disk as the invalidation left it, to check L2 after a restart without the
    // lazy removals the L1 checks below make.
    a.flush().await?;
    let dir_a2 = TempDir::new()?;
    crate::s3_tier::copy_dir(dir_a.path(), dir_a2.path())?;

    expect_served(name, &a, hit, spared, Outcome::L1).await?;
    a.close().await?;

    let a = node(&server, dir_a2.path()).await?;
    if !matches!(
        (&selector, pattern),
        (Some(Selector::Key(_)), _) | (None, Some(_)) | (None, None)
    ) {
        // Bulk selectors leave the copies in L2: the restored epochs alone must stop them.
        ensure!(
            a.disk().map(|d| strata::tiers::Tier::usage(d).entries)
                == Some((hit.len() + spared.len()) as u64),
            "{name}: L2 copies were removed eagerly"
        );
    }
    expect_served(name, &a, hit, spared, Outcome::L2).await?;
    a.close().await?;

    let b = node(&server, dir_b.path()).await?;
    b.refresh_epochs().await?;
    expect_served(name, &b, hit, spared, Outcome::L3).await?;
    b.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_model_on_every_tier() -> Result<()> {
    check_selector(
        "model",
        Some(Selector::Model("GPT-4o".into())),
        None,
        &[item("m1", "gpt-4o"), item("m2", "gpt-4o")],
        &[item("m3", "claude-3-5-haiku"), item("m4", "gpt-4o-mini")],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_user_and_by_session_on_every_tier() -> Result<()> {
    let alice = Scope::User("alice".into());
    let bob = Scope::User("bob".into());
    check_selector(
        "user",
        Some(Selector::User("alice".into())),
        None,
        &[item("u1", "gpt-4o").scoped(alice.clone())],
        &[item("u1", "gpt-4o").scoped(bob), item("u1", "gpt-4o")],
    )
    .await?;
    check_selector(
        "session",
        Some(Selector::Session("s1".into())),
        None,
        &[item("s", "gpt-4o").scoped(Scope::Session("s1".into()))],
        &[
            item("s", "gpt-4o").scoped(Scope::Session("s2".into())),
            item("s", "gpt-4o").scoped(alice),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_hierarchical_tag_on_every_tier() -> Result<()> {
    check_selector(
        "tag",
        Some(Selector::Tag("jobs".into())),
        None,
        &[
            item("t1", "gpt-4o").tagged(&["jobs:42"]),
            item("t2", "gpt-4o").tagged(&["team:search", "jobs"]),
        ],
        &[
            item("t3", "gpt-4o").tagged(&["jobsx"]),
            item("t4", "gpt-4o").tagged(&["team:jobs"]),
            item("t5", "gpt-4o"),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_age_on_every_tier() -> Result<()> {
    check_selector(
        "older-than",
        Some(Selector::OlderThan(Duration::from_millis(600))),
        None,
        &[item("old1", "gpt-4o"), item("old2", "claude-3-5-haiku")],
        &[item("young1", "gpt-4o"), item("young2", "claude-3-5-haiku")],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_key_by_pattern_and_clear_on_every_tier() -> Result<()> {
    // The display key is only known once stored: derive it with a throwaway cache.
    let probe = TieredCache::builder().build();
    let k = item("k1", "gpt-4o").put(&probe).await?;
    check_selector(
        "key",
        Some(Selector::Key(k)),
        None,
        &[item("k1", "gpt-4o")],
        &[item("k2", "gpt-4o"), item("k1", "gpt-4o-mini")],
    )
    .await?;
    check_selector(
        "pattern",
        None,
        Some("claude-*_*"),
        &[item("p1", "claude-3-5-haiku"), item("p2", "claude-3-opus")],
        &[item("p1", "gpt-4o"), item("p3", "gpt-4o-mini")],
    )
    .await?;
    check_selector(
        "clear",
        None,
        None,
        &[item("c1", "gpt-4o"), item("c2", "claude-3-5-haiku")],
        &[],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_nodes_model_invalidation_reaches_l1_and_l2_within_the_refresh_interval()
-> Result<()> {
    let server = TestS3::start().await?;
    let (dir_a, dir_b) = (TempDir::new()?, TempDir::new()?);
    let refresh = Duration::from_secs(1);
    let a = open_node(&server.config(), dir_a.path(), refresh, true).await?;
    let b = open_node(&server.config(), dir_b.path(), refresh, true).await?;
    let gone = [item("x1", "gpt-4o"), item("x2", "gpt-4o")];
    let kept = [item("x1", "claude-3-5-haiku"), item("x3", "gpt-4o-mini")];
    for i in gone.iter().chain(&kept) {
        i.put(&a).await?;
    }
    a.flush().await?;
    ensure!(gone[0].found(&a).await? == Some(Outcome::L1));

    let done = b.invalidate(&Selector::Model("gpt-4o".into())).await?;
    ensure!(done.published, "B could not publish");
    let started = Instant::now();
    // A's L1 holds one entry and its L2 the other (dropped from memory): both must stop.
    a.memory()
        .remove_id(a.key(&gone[1].request(), &Scope::Global)?.key.id())
        .await;
    loop {
        let served = gone[0].found(&a).await?.is_some();
        if !served {
            break;
        }
        ensure!(
            started.elapsed() <= refresh + Duration::from_secs(1),
            "A still serves B's invalidated model after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(
        gone[1].found(&a).await?.is_none(),
        "A's L2 copy is still served"
    );
    for i in &kept {
        ensure!(
            i.found(&a).await?.is_some(),
            "{} was not invalidated",
            i.text
        );
    }
    a.close().await?;
    b.close().await?;
    Ok(())
}

/// Node A, on a server that will misbehave, holding `gone` (a gpt-4o entry) and `kept` (a
/// claude one) in S3; it neither refreshes on its own nor lets the breaker open.
async fn node_with_two_items(server: &TestS3, dir: &Path) -> Result<(TieredCache, Item, Item)> {
    let mut config = server.config();
    config.breaker_threshold = 100;
    let a = open_node(&config, dir, Duration::from_secs(3600), true).await?;
    let (gone, kept) = (item("p1", "gpt-4o"), item("p2", "claude-3-5-haiku"));
    gone.put(&a).await?;
    kept.put(&a).await?;
    a.flush().await?;
    Ok((a, gone, kept))
}

/// A node B opened on `dir` has learnt that `gone` is invalidated, and still serves `kept`.
async fn another_node_learnt_it(
    server: &TestS3,
    dir: &Path,
    gone: &Item,
    kept: &Item,
) -> Result<()> {
    let b = node(server, dir).await?;
    b.refresh_epochs().await?;
    ensure!(
        gone.found(&b).await?.is_none(),
        "B serves what A invalidated"
    );
    ensure!(kept.found(&b).await? == Some(Outcome::L3));
    Ok(())
}

/// A store that refuses conditional writes: the shared document cannot be written, but the
/// node's own copy carries the bump to the other nodes, so it counts as published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_conditional_writes_a_bump_still_reaches_other_nodes() -> Result<()> {
    let mut server = TestS3::start().await?;
    if !server.can_stop() {
        return Ok(()); // needs a front that can refuse requests one by one (not over HTTPS)
    }
    let (dir_a, dir_b) = (TempDir::new()?, TempDir::new()?);
    let (a, gone, kept) = node_with_two_items(&server, dir_a.path()).await?;
    server.misbehave(Fault::RefuseConditionalWrites).await?;
    let done = a.invalidate(&Selector::Model("gpt-4o".into())).await?;
    ensure!(done.published, "the node copy publishes it");
    let sync = a.refresh_epochs().await?;
    ensure!(
        !sync.published,
        "the shared document was not written: {sync:?}"
    );
    another_node_learnt_it(&server, dir_b.path(), &gone, &kept).await
}

/// An invalidation by pattern whose deletes S3 refuses fails, but the tombstones it wrote are
/// published all the same: another node stops serving the matched keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_whose_deletes_fail_still_publishes_its_tombstones() -> Result<()> {
    let mut server = TestS3::start().await?;
    if !server.can_stop() {
        return Ok(()); // needs a front that can refuse requests one by one (not over HTTPS)
    }
    let (dir_a, dir_b) = (TempDir::new()?, TempDir::new()?);
    let (a, gone, kept) = node_with_two_items(&server, dir_a.path()).await?;
    server.misbehave(Fault::RefuseDeletes).await?;
    ensure!(
        a.invalidate_pattern("gpt-4o_*", |_| {}).await.is_err(),
        "the deletes failed"
    );
    another_node_learnt_it(&server, dir_b.path(), &gone, &kept).await
}

/// A node that was not running when another invalidated learns of it before it serves anything
/// from its disk: its first lookups wait for the first refresh of the epochs, however long the
/// refresh interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_opened_after_another_invalidated_never_serves_its_old_copy() -> Result<()> {
    let server = TestS3::start().await?;
    let (dir_a, dir_b) = (TempDir::new()?, TempDir::new()?);
    let long = Duration::from_secs(3600);
    let gone = item("y1", "gpt-4o");
    let kept = item("y2", "gpt-4o-mini");
    let a = open_node(&server.config(), dir_a.path(), long, true).await?;
    gone.put(&a).await?;
    kept.put(&a).await?;
    a.close().await?;

    let b = open_node(&server.config(), dir_b.path(), long, true).await?;
    let done = b.invalidate(&Selector::Model("gpt-4o".into())).await?;
    ensure!(done.published, "B could not publish");
    b.close().await?;

    let a = open_node(&server.config(), dir_a.path(), long, true).await?;
    // A put first: its entry must record B's invalidation, or learning of it refuses the entry.
    let fresh = item("y3", "gpt-4o");
    fresh.put(&a).await?;
    a.refresh_epochs().await?;
    ensure!(
        fresh.found(&a).await? == Some(Outcome::L1),
        "an answer stored after B's invalidation was refused"
    );
    ensure!(
        gone.found(&a).await?.is_none(),
        "A served from its disk what B had invalidated while A was closed"
    );
    ensure!(kept.found(&a).await? == Some(Outcome::L2));
    a.close().await?;
    Ok(())
}

/// Two nodes bump different epochs at the same moment, five times over: no bump is lost.
async fn concurrent_bumps(conditional: bool) -> Result<()> {
    let server = TestS3::start().await?;
    let (dir_a, dir_b, dir_c) = (TempDir::new()?, TempDir::new()?, TempDir::new()?);
    let slow = Duration::from_secs(3600);
    let a = open_node(&server.config(), dir_a.path(), slow, conditional).await?;
    let b = open_node(&server.config(), dir_b.path(), slow, conditional).await?;
    let mut models = Vec::new();
    for round in 0..5 {
        let (ma, mb) = (format!("a-model-{round}"), format!("b-model-{round}"));
        let (sa, sb) = (Selector::Model(ma.clone()), Selector::Model(mb.clone()));
        let (ra, rb) = tokio::join!(a.invalidate(&sa), b.invalidate(&sb));
        ra?;
        rb?;
        models.extend([ma, mb]);
    }
    // A third node that never invalidated anything learns every bump.
    let c = open_node(&server.config(), dir_c.path(), slow, conditional).await?;
    c.refresh_epochs().await?;
    a.refresh_epochs().await?;
    for (name, cache) in [("a", &a), ("c", &c)] {
        let epochs = cache.epochs().snapshot();
        for m in &models {
            ensure!(
                epochs.model.contains_key(m),
                "node {name} lost {m} (conditional writes {conditional}): {epochs:?}"
            );
        }
    }
    // After the refreshes the shared document itself holds them all.
    let s3 = c.l3().cloned().ok_or_else(|| anyhow::anyhow!("no L3"))?;
    let (shared, _) = s3.read_epochs().await?.unwrap_or_default();
    for m in &models {
        ensure!(
            shared.model.contains_key(m),
            "epochs.json lacks {m}: {shared:?}"
        );
    }
    for cache in [a, b, c] {
        cache.close().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bumps_from_two_nodes_both_hold_with_compare_and_swap() -> Result<()> {
    concurrent_bumps(true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bumps_from_two_nodes_both_hold_without_conditional_writes() -> Result<()> {
    concurrent_bumps(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_document_is_written_with_compare_and_swap() -> Result<()> {
    let server = TestS3::start().await?;
    let dir = TempDir::new()?;
    let cache = node(&server, dir.path()).await?;
    let s3 = cache
        .l3()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no L3"))?;
    cache.invalidate(&Selector::Model("m".into())).await?;
    let (doc, etag) = s3.read_epochs().await?.unwrap_or_default();
    let etag = etag.ok_or_else(|| anyhow::anyhow!("no ETag"))?;
    // A server that ignores the conditions (Garage) cannot show a conflict; strata does not
    // depend on them there (`concurrent_bumps_from_two_nodes_both_hold_without_conditional_writes`).
    let refuses = server.refuses_failed_conditions().await?;
    ensure!(
        refuses || !server.is_local(),
        "s3s-fs refuses failed conditions"
    );
    if refuses {
        ensure!(
            s3.write_epochs(&doc, &Expect::Absent).await? == Written::Conflict,
            "If-None-Match: * overwrote an existing document"
        );
        ensure!(
            s3.write_epochs(&doc, &Expect::ETag("\"stale\"".into()))
                .await?
                == Written::Conflict,
            "a stale ETag was accepted"
        );
    } else {
        eprintln!("this server ignores failed conditions on PutObject: no conflict to check");
    }
    ensure!(s3.write_epochs(&doc, &Expect::ETag(etag)).await? == Written::Done);
    cache.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_after_an_invalidation_deletes_the_objects() -> Result<()> {
    let server = TestS3::start().await?;
    let dir = TempDir::new()?;
    let cache = node(&server, dir.path()).await?;
    let gone = [
        item("g1", "gpt-4o"),
        item("g2", "gpt-4o"),
        item("g3", "gpt-4o"),
    ];
    let kept = [
        item("g1", "claude-3-5-haiku"),
        item("g2", "claude-3-5-haiku"),
    ];
    for i in gone.iter().chain(&kept) {
        i.put(&cache).await?;
    }
    cache.flush().await?;
    let objects = |keys: &[String], what: &str| keys.iter().filter(|k| k.contains(what)).count();
    let before = server.keys().await?;
    ensure!(objects(&before, ".json.zst") == 5 && objects(&before, "/by-hash/") == 5);

    cache.invalidate(&Selector::Model("gpt-4o".into())).await?;
    // Listed again: the invalidation wrote control/ objects.
    let before = server.keys().await?;
    let dry = cache.gc(true, |_| {}).await?;
    ensure!(dry.s3_entries == 3 && dry.s3_objects == 9, "{dry:?}");
    ensure!(dry.l2_removed == 3, "{dry:?}");
    ensure!(
        server.keys().await? == before,
        "a dry run deleted something"
    );

    let report = cache.gc(false, |_| {}).await?;
    ensure!(report.s3_objects == 9 && report.s3_bytes > 0, "{report:?}");
    ensure!(report.l2_removed == 3 && report.l2_bytes > 0, "{report:?}");
    let after = server.keys().await?;
    ensure!(objects(&after, "/llm-cache/gpt-4o/") == 0, "{after:#?}");
    ensure!(
        objects(&after, "/llm-cache/claude-3-5-haiku/") == 4,
        "{after:#?}"
    );
    ensure!(objects(&after, "/by-hash/") == 2, "{after:#?}");
    for i in &kept {
        ensure!(i.found(&cache).await?.is_some());
    }
    // Nothing is left to collect.
    let again = cache.gc(false, |_| {}).await?;
    ensure!(again.s3_objects == 0 && again.l2_removed == 0, "{again:?}");
    cache.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_keeps_objects_written_by_a_newer_format() -> Result<()> {
    let server = TestS3::start().await?;
    let dir = TempDir::new()?;
    let cache = node(&server, dir.path()).await?;
    item("n1", "gpt-4o").put(&cache).await?;
    cache.flush().await?;
    let path = server
        .keys()
        .await?
        .into_iter()
        .find(|k| k.ends_with(".json.zst"))
        .ok_or_else(|| anyhow::anyhow!("no entry object"))?;
    let original = server.object(&path).await?;
    let s3 = cache.l3().ok_or_else(|| anyhow::anyhow!("no S3 tier"))?;
    // The same envelope as a later release could label it, with a checksum that matches: a
    // version this one does not know, or a flag it does not know.
    for (at, value) in [(4, 99), (5, 0x80)] {
        let mut bytes = original.clone();
        bytes[at] = value;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&bytes[..12]);
        crc.update(&bytes[16..]);
        bytes[12..16].copy_from_slice(&crc.finalize().to_le_bytes());
        s3.put_object(&path, bytes, "application/octet-stream")
            .await?;
        let report = cache.gc(false, |_| {}).await?;
        ensure!(
            report.s3_entries == 0 && report.s3_objects == 0,
            "byte {at}: {report:?}"
        );
        ensure!(
            server.keys().await?.contains(&path),
            "gc deleted an entry of a newer format (byte {at})"
        );
    }
    cache.close().await?;
    Ok(())
}
