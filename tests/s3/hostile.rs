//! A hostile bucket: whoever can write to it must not be able to make a node serve a forged
//! answer, nor stop every node from serving anything. Each test reproduces a finding made with
//! the `strata` command before the checks existed.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use chrono::Utc;
use strata::core::{Codec, Entry, Epochs, Selector};
use strata::{Outcome, Scope};
use tempfile::TempDir;

use crate::s3_server::TestS3;
use crate::s3_tier::{Node, completion, node, outcome, request};

/// Node A stores `text`'s answer and uploads it; returns the object's path and the entry.
async fn uploaded(a: &Node, text: &str) -> Result<(String, Entry)> {
    let entry = a
        .cache
        .put(
            &request(text),
            &Scope::Global,
            completion("the real answer"),
        )
        .await?;
    a.cache.flush().await?;
    let keyed = a.cache.key(&request(text), &Scope::Global)?;
    let path =
        a.s3.known_path(&keyed.key)?
            .context("indexed after upload")?;
    Ok((path, Entry::clone(&entry)))
}

/// Writes `forged` over the object at `path`, sealed as a node would seal it.
async fn plant(a: &Node, path: &str, forged: &Entry) -> Result<()> {
    let bytes = Codec::default().encode(forged)?;
    a.s3.put_object(path, bytes, "application/octet-stream")
        .await?;
    Ok(())
}

fn forged_answer(entry: &Entry) -> Entry {
    let mut forged = entry.clone();
    forged.response = strata::core::JsonText::parse(
        r#"{"choices":[{"message":{"role":"assistant","content":"FORGED"}}]}"#.into(),
    )
    .expect("JSON");
    forged
}

/// Looks `text` up on `node`, running an executor on a miss; returns the outcome and whether
/// the forged answer was served.
async fn served_forgery(node: &Node, text: &str) -> Result<(Outcome, bool)> {
    let lookup = node
        .cache
        .get_or_execute(&request(text), &Scope::Global, || async {
            Ok::<_, std::io::Error>(completion("recomputed"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((
        lookup.outcome,
        lookup.entry.response.get().contains("FORGED"),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_recording_epochs_from_the_future_is_never_served() -> Result<()> {
    let server = TestS3::start().await?;
    let (dir_a, dir_b, dir_c) = (TempDir::new()?, TempDir::new()?, TempDir::new()?);
    let a = node(&server, dir_a.path()).await?;
    let (path, entry) = uploaded(&a, "plant here").await?;
    let mut forged = forged_answer(&entry);
    // "Every epoch = u64::MAX": no invalidation could ever pass it.
    forged.epochs = BTreeMap::from([
        ("all".to_string(), u64::MAX),
        ("model:gpt-4o-mini".to_string(), u64::MAX),
        (format!("key:{}", entry.cache_id), u64::MAX),
    ]);
    plant(&a, &path, &forged).await?;

    let b = node(&server, dir_b.path()).await?;
    let (found, forgery) = served_forgery(&b, "plant here").await?;
    assert!(!forgery, "a fresh node served the planted answer");
    assert_eq!(found, Outcome::Miss);
    // After an invalidation too, and on a node that has one in force.
    b.cache
        .invalidate(&Selector::Model("gpt-4o-mini".into()))
        .await?;
    plant(&a, &path, &forged).await?;
    let c = node(&server, dir_c.path()).await?;
    let (_, forgery) = served_forgery(&c, "plant here").await?;
    assert!(!forgery, "served after invalidate --model");
    // gc takes it away for good. (The nodes' own answers for the key, recomputed above, are
    // uploaded behind them to the same path: settle those first, so that what gc meets there
    // is the forgery, and what is there after it is not.)
    for node in [&a, &b, &c] {
        node.cache.flush().await?;
    }
    plant(&a, &path, &forged).await?;
    let report = c.cache.gc(false, |_| {}).await?;
    assert!(report.s3_entries >= 1, "{report:?}");
    let left = server.keys().await?.contains(&path);
    assert!(
        !left
            || !String::from_utf8_lossy(&Codec::default().open(&server.object(&path).await?)?)
                .contains("FORGED"),
        "gc left the forged object in place"
    );
    Ok(())
}

/// A change made to a well-sealed entry.
type Spoil = fn(&mut Entry);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_that_names_another_model_key_or_a_future_date_is_never_served() -> Result<()> {
    let server = TestS3::start().await?;
    let dir_a = TempDir::new()?;
    let a = node(&server, dir_a.path()).await?;
    let cases: [(&str, Spoil); 5] = [
        // Another scope: `invalidate --user` of the one it names would not reach it.
        ("another scope", |e| {
            e.scope = strata::Scope::User("mallory".into())
        }),
        // Another model: `invalidate --model gpt-4o-mini` would not reach it.
        ("another model", |e| e.model = "some-other-model".into()),
        // Another cache id: `invalidate --key` would not reach it.
        ("another id", |e| e.cache_id = "0".repeat(32)),
        ("another display key", |e| {
            e.cache_key = format!("x_{}", e.cache_id)
        }),
        // Written in 2100: `invalidate --older-than` would not reach it.
        ("a future date", |e| {
            e.created_at = chrono::DateTime::parse_from_rfc3339("2100-01-01T00:00:00Z")
                .expect("date")
                .with_timezone(&Utc);
        }),
    ];
    for (n, (what, spoil)) in cases.into_iter().enumerate() {
        let text = format!("named wrongly {n}");
        let (path, entry) = uploaded(&a, &text).await?;
        let mut forged = forged_answer(&entry);
        spoil(&mut forged);
        plant(&a, &path, &forged).await?;
        let dir = TempDir::new()?;
        let fresh = node(&server, dir.path()).await?;
        let (found, forgery) = served_forgery(&fresh, &text).await?;
        assert!(!forgery, "{what}: served");
        assert_eq!(found, Outcome::Miss, "{what}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_epoch_from_the_future_does_not_disable_the_cache() -> Result<()> {
    let server = TestS3::start().await?;
    let (dir_a, dir_b) = (TempDir::new()?, TempDir::new()?);
    let a = node(&server, dir_a.path()).await?;
    uploaded(&a, "still served").await?;
    // `control/epochs/evil.json` with `not_before_ms: 9e18`, and the shared document too.
    let poison = Epochs {
        not_before_ms: 9_000_000_000_000_000_000,
        all: u64::MAX,
        ..Epochs::default()
    };
    let bytes = serde_json::to_vec(&poison)?;
    let layout = a.s3.layout().clone();
    a.s3.put_object(
        &layout.node_epochs_path("evil"),
        bytes.clone(),
        "application/json",
    )
    .await?;
    a.s3.put_object(&layout.epochs_path(), bytes, "application/json")
        .await?;

    let b = node(&server, dir_b.path()).await?;
    b.cache.refresh_epochs().await?;
    assert_eq!(outcome(&b.cache, "still served").await?, Outcome::L3);
    assert_eq!(b.cache.epochs().snapshot().not_before_ms, 0, "not merged");
    // Nor does this node pass it on: its own copy and the shared document stay clean.
    b.cache
        .invalidate(&Selector::Tag("unrelated".into()))
        .await?;
    let own =
        b.s3.read_node_epochs(&layout.node_epochs_path(b.s3.node_id()))
            .await?
            .context("b's copy")?;
    assert_eq!(own.not_before_ms, 0);
    assert_eq!(own.all, 0);

    // `reset` writes a clean shared document over the poisoned one.
    b.cache.reset_epochs().await?;
    let (shared, _) = b.s3.read_epochs().await?.context("shared document")?;
    assert_eq!(shared.not_before_ms, 0);
    assert_eq!(shared.all, 0);
    assert!(
        shared.tag.contains_key("unrelated"),
        "legitimate bumps stay"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_poisoned_before_the_fix_are_dropped_when_the_node_opens() -> Result<()> {
    let dir = TempDir::new()?;
    let disk = strata::tiers::DiskTier::open(
        &strata::tiers::DiskConfig::new(dir.path()),
        Codec::default(),
    )?;
    // What an older release merged as it came.
    let store = strata::tiers::EpochStore::open(&disk)?;
    store.absorb(&Epochs {
        not_before_ms: 9_000_000_000_000_000_000,
        ..Epochs::default()
    })?;
    store.bump(&Selector::Tag("kept".into()))?;
    store.flush().await?;
    drop(store);
    let reopened = strata::tiers::EpochStore::open(&disk)?;
    let epochs = reopened.snapshot();
    assert_eq!(epochs.not_before_ms, 0, "the poison is gone");
    assert!(epochs.tag.contains_key("kept"), "real bumps stay");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_reaches_the_bucket() -> Result<()> {
    let server = TestS3::start().await?;
    let dir = TempDir::new()?;
    let a = node(&server, dir.path()).await?;
    a.cache
        .acting_as("bob")
        .invalidate(&Selector::Tag("jobs".into()))
        .await?;
    let day = Utc::now().date_naive();
    let path = a.s3.layout().audit_path(a.s3.node_id(), day);
    let text = String::from_utf8(server.object(&path).await?)?;
    let record: strata::tiers::AuditRecord =
        serde_json::from_str(text.lines().next().context("one record")?)?;
    assert_eq!(record.action, "invalidate");
    assert_eq!(record.who, "bob");
    assert_eq!(record.node, a.s3.node_id());
    assert_eq!(record.selector.as_deref(), Some("tag jobs"));
    Ok(())
}

fn keyring(material: u8, old: &[u8], encrypt: bool) -> std::sync::Arc<strata::core::Keyring> {
    let key = |b: u8| strata::core::Key::from_material(&[b; 48]).expect("key");
    std::sync::Arc::new(strata::core::Keyring::new(
        key(material),
        old.iter().map(|b| key(*b)).collect(),
        encrypt,
    ))
}

/// A node whose disk tier and S3 tier seal under `keys`.
async fn keyed_node(
    server: &TestS3,
    dir: &std::path::Path,
    keys: std::sync::Arc<strata::core::Keyring>,
) -> Result<Node> {
    let codec = Codec::default().with_keys(keys);
    let disk = strata::tiers::DiskTier::open(&strata::tiers::DiskConfig::new(dir), codec.clone())?;
    let s3 = strata::tiers::S3Tier::connect(&server.config(), &disk, codec).await?;
    let cache = strata::TieredCache::builder()
        .disk(disk.clone())
        .s3(s3.clone())
        .build();
    Ok(Node { cache, s3, disk })
}

/// Without a key, a well-formed entry recording no epoch, for a request the writer knows, was
/// served as any other. With a key, a writer to the bucket who lacks it plants nothing: not an
/// entry, not a control file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_key_a_writer_to_the_bucket_without_it_plants_nothing() -> Result<()> {
    let server = TestS3::start().await?;
    let (dir_a, dir_b) = (TempDir::new()?, TempDir::new()?);
    let a = keyed_node(&server, dir_a.path(), keyring(1, &[], false)).await?;
    let (path, entry) = uploaded(&a, "plant here").await?;
    let forged = forged_answer(&entry);
    // Unsealed, as a writer without the key makes it, and sealed under another key.
    for (how, codec) in [
        ("unsealed", Codec::default()),
        (
            "another key",
            Codec::default().with_keys(keyring(9, &[], false)),
        ),
    ] {
        a.s3.put_object(&path, codec.encode(&forged)?, "application/octet-stream")
            .await?;
        let dir = TempDir::new()?;
        let fresh = keyed_node(&server, dir.path(), keyring(1, &[], false)).await?;
        let (found, forgery) = served_forgery(&fresh, "plant here").await?;
        assert!(!forgery, "{how}: served");
        assert_eq!(found, Outcome::Miss, "{how}");
        assert!(fresh.cache.stats().errors.corrupt >= 1, "{how}: counted");
    }
    // A control file without a valid MAC is not obeyed: this bump, legitimate in form, would
    // take back every gpt-4o-mini answer on every node.
    let bump = Epochs {
        model: [(
            "gpt-4o-mini".to_string(),
            Utc::now().timestamp_millis() as u64,
        )]
        .into(),
        ..Epochs::default()
    };
    let layout = a.s3.layout().clone();
    a.s3.put_object(
        &layout.node_epochs_path("intruder"),
        serde_json::to_vec(&bump)?,
        "application/json",
    )
    .await?;
    a.s3.put_object(
        &layout.epochs_path(),
        serde_json::to_vec(&bump)?,
        "application/json",
    )
    .await?;
    let b = keyed_node(&server, dir_b.path(), keyring(1, &[], false)).await?;
    b.cache.refresh_epochs().await?;
    assert!(
        b.cache.epochs().snapshot().model.is_empty(),
        "an unsealed bump was obeyed"
    );
    // What the key holders publish is obeyed.
    a.cache
        .invalidate(&Selector::Model("gpt-4o-mini".into()))
        .await?;
    b.cache.refresh_epochs().await?;
    assert!(
        b.cache
            .epochs()
            .snapshot()
            .model
            .contains_key("gpt-4o-mini")
    );
    Ok(())
}

/// With `encrypt`, neither the disk tier's files nor the bucket's objects hold a request's or
/// a response's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_entries_hold_no_text_on_disk_or_in_the_bucket() -> Result<()> {
    let server = TestS3::start().await?;
    let dir = TempDir::new()?;
    let a = keyed_node(&server, dir.path(), keyring(1, &[], true)).await?;
    let question = "PRIVATE-QUESTION-7f3a about my medical history";
    let answer = "CONFIDENTIAL-ANSWER-91bc ".repeat(3);
    a.cache
        .put(&request(question), &Scope::Global, completion(&answer))
        .await?;
    a.cache.flush().await?;
    a.disk.flush_blocking()?;
    let needles: [&[u8]; 2] = [b"PRIVATE-QUESTION-7f3a", b"CONFIDENTIAL-ANSWER-91bc"];
    let holds = |bytes: &[u8]| {
        needles
            .iter()
            .any(|n| bytes.windows(n.len()).any(|w| w == *n))
    };
    for file in walk(dir.path())? {
        assert!(
            !holds(&std::fs::read(&file)?),
            "{} holds text",
            file.display()
        );
    }
    let keys = server.keys().await?;
    assert!(keys.len() >= 3, "entry, metadata, pointer: {keys:?}");
    for key in &keys {
        assert!(!holds(&server.object(key).await?), "{key} holds text");
    }
    // And it reads back, here and on another node with the key.
    let dir_b = TempDir::new()?;
    let b = keyed_node(&server, dir_b.path(), keyring(1, &[], true)).await?;
    let lookup = b
        .cache
        .get(&request(question), &Scope::Global)
        .await?
        .context("served")?;
    assert!(
        lookup
            .entry
            .response
            .get()
            .contains("CONFIDENTIAL-ANSWER-91bc")
    );
    Ok(())
}

fn walk(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let path = item?.path();
        if path.is_dir() {
            out.extend(walk(&path)?);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}

/// Control and analytics files of nodes stopped long ago stayed in the bucket for ever. gc
/// deletes another node's epoch copy not written for `forget_nodes_after`, and daily analytics
/// past the retention; never this node's own copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_expires_what_nodes_stopped_long_ago_left() -> Result<()> {
    let server = TestS3::start().await?;
    let (dir_a, dir_b) = (TempDir::new()?, TempDir::new()?);
    let a = node(&server, dir_a.path()).await?;
    a.cache.invalidate(&Selector::Tag("from-a".into())).await?;
    let layout = a.s3.layout().clone();
    let a_copy = layout.node_epochs_path(a.s3.node_id());
    let ancient = layout.analytics_path(
        "gone-node",
        chrono::NaiveDate::from_ymd_opt(2020, 1, 1).context("date")?,
    );
    a.s3.put_object(&ancient, b"{}".to_vec(), "application/json")
        .await?;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;

    let disk = strata::tiers::DiskTier::open(
        &strata::tiers::DiskConfig::new(dir_b.path()),
        Codec::default(),
    )?;
    let s3 = strata::tiers::S3Tier::connect(&server.config(), &disk, Codec::default()).await?;
    let b = strata::TieredCache::builder()
        .disk(disk)
        .s3(s3.clone())
        .forget_nodes_after(Some(std::time::Duration::from_secs(1)))
        .build();
    b.invalidate(&Selector::Tag("from-b".into())).await?;
    let b_copy = layout.node_epochs_path(s3.node_id());
    let dry = b.gc(true, |_| {}).await?;
    assert_eq!(dry.stale_objects, 2, "{dry:?}");
    assert!(
        server.keys().await?.contains(&a_copy),
        "a dry run deletes nothing"
    );
    let report = b.gc(false, |_| {}).await?;
    assert_eq!(report.stale_objects, 2, "{report:?}");
    let keys = server.keys().await?;
    assert!(
        !keys.contains(&a_copy),
        "a's copy, silent past the bound, is gone"
    );
    assert!(
        !keys.contains(&ancient),
        "analytics past the retention are gone"
    );
    assert!(keys.contains(&b_copy), "never its own");
    // What a's copy held lives on: b merged it.
    assert!(b.epochs().snapshot().tag.contains_key("from-a"));
    Ok(())
}

/// One flipped bit makes sled report the database corrupt, and the whole tier was moved aside
/// with the invalidations and the node id in it. They are kept beside the database too, and a
/// node whose tier was moved aside takes them up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_disk_tier_keeps_its_epochs_and_node_id() -> Result<()> {
    let server = TestS3::start().await?;
    let dir = TempDir::new()?;
    let node_id = {
        let a = node(&server, dir.path()).await?;
        a.cache
            .invalidate(&Selector::Tag("kept-through-corruption".into()))
            .await?;
        let id = a.s3.node_id().to_string();
        a.cache.close().await?;
        id
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    std::fs::write(dir.path().join("conf"), b"\x00not sled's config\xff")?;
    let again = node(&server, dir.path()).await?;
    assert!(again.disk.moved_aside().is_some(), "moved aside");
    assert_eq!(again.s3.node_id(), node_id, "the same node");
    assert!(
        again
            .cache
            .epochs()
            .snapshot()
            .tag
            .contains_key("kept-through-corruption"),
        "the invalidation still holds"
    );
    // Moved aside beside the temporary directory, outside it: not left behind.
    if let Some(aside) = again.disk.moved_aside() {
        std::fs::remove_dir_all(aside)?;
    }
    Ok(())
}
