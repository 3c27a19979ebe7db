//! The upload queue never blocks and never grows without bound: uploads S3 keeps rejecting
//! are passed over, then parked; with S3 down the queue keeps to `outbox_capacity`; the drain
//! at close keeps to `close_timeout`.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};
use strata::Scope;
use strata::tiers::{DiskConfig, DiskTier, S3Tier};
use tempfile::TempDir;

use crate::s3_server::{Fault, TestS3};
use crate::s3_tier::{Node, completion, node, request};

fn bad_request(i: u64) -> Value {
    json!({"model": "bad-model", "messages": [{"role": "user", "content": format!("rejected {i}")}]})
}

async fn node_with_outbox(
    server: &TestS3,
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut strata::tiers::S3Config, &mut DiskConfig),
) -> Result<Node> {
    let mut config = server.config();
    let mut disk_config = DiskConfig::new(dir);
    tweak(&mut config, &mut disk_config);
    let disk = DiskTier::open(&disk_config, strata::core::Codec::default())?;
    let s3 = S3Tier::connect(&config, &disk, strata::core::Codec::default()).await?;
    let cache = strata::TieredCache::builder()
        .disk(disk.clone())
        .s3(s3.clone())
        .build();
    Ok(Node { cache, s3, disk })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_s3_keeps_rejecting_are_passed_over_then_parked() -> Result<()> {
    let mut server = TestS3::start().await?;
    if !server.can_stop() {
        return Ok(());
    }
    server
        .misbehave(Fault::RejectPutsContaining("/bad-model/".into()))
        .await?;
    let dir = TempDir::new()?;
    let a = node(&server, dir.path()).await?;
    // 300 uploads answered with a lasting 400, and one good entry among them in the queue.
    for i in 0..300 {
        a.cache
            .put(
                &bad_request(i),
                &Scope::Global,
                completion("never uploaded"),
            )
            .await?;
    }
    a.cache
        .put(&request("the good one"), &Scope::Global, completion("ok"))
        .await?;
    a.cache.settle().await;
    let mut passes = 0;
    while a.s3.stats().parked < 300 && passes < 20 {
        let _ = a.s3.drain().await;
        passes += 1;
    }
    let keys = server.keys().await?;
    assert!(
        keys.iter()
            .any(|k| k.contains("/gpt-4o-mini/") && k.ends_with(".json.zst")),
        "the good entry went up past the 300 failing ahead of it"
    );
    let stats = a.s3.stats();
    assert_eq!(stats.parked, 300, "{stats:?} after {passes} drains");
    assert_eq!(stats.pending, 0, "nothing holds the queue");
    assert!(a.s3.drain().await.is_ok(), "an empty queue drains");

    // Retried: back in the queue, and parked again while S3 still rejects them.
    assert_eq!(a.s3.retry_parked()?, 300);
    assert_eq!(a.s3.stats().pending, 300);
    // Dropped: gone from the queue; the entries stay local.
    for _ in 0..20 {
        if a.s3.stats().parked == 300 {
            break;
        }
        let _ = a.s3.drain().await;
    }
    assert_eq!(a.s3.drop_parked()?, 300);
    assert_eq!(a.s3.stats().parked, 0);
    assert!(
        a.cache
            .get(&bad_request(7), &Scope::Global)
            .await?
            .is_some()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_s3_down_the_upload_queue_keeps_to_its_bound() -> Result<()> {
    let mut server = TestS3::start().await?;
    if !server.can_stop() {
        return Ok(());
    }
    server.stop().await?;
    let dir = TempDir::new()?;
    let capacity = 256 << 10;
    let a = node_with_outbox(&server, dir.path(), |s3, disk| {
        s3.outbox_capacity = capacity;
        s3.close_timeout = Duration::from_millis(500);
        // A small disk tier: eviction moves the envelopes it drops into the queue.
        disk.capacity = 128 << 10;
    })
    .await?;
    for i in 0..3000 {
        a.cache
            .put(
                &request(&format!("while S3 is down {i}")),
                &Scope::Global,
                completion(&"an answer of some length ".repeat(8)),
            )
            .await?;
    }
    a.cache.settle().await;
    let dropped = a.s3.bound_outbox()?;
    let stats = a.s3.stats();
    assert!(dropped > 0, "{stats:?}");
    // The drainer bounds the queue on its own passes too: those drops are counted as well.
    assert!(stats.dropped_for_space >= dropped, "{stats:?}");
    assert!(
        stats.outbox_bytes <= capacity,
        "the queue holds {} bytes, past its bound of {capacity}",
        stats.outbox_bytes
    );
    // The newest stay: the last put is still queued.
    let newest = a
        .cache
        .key(&request("while S3 is down 2999"), &Scope::Global)?;
    assert!(
        a.s3.queued()?.iter().any(|(d, _)| *d == newest.key.digest),
        "the oldest go first"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_keeps_to_its_deadline_when_s3_hangs() -> Result<()> {
    let mut server = TestS3::start().await?;
    if !server.can_stop() {
        return Ok(());
    }
    server.misbehave(Fault::Stall).await?;
    let dir = TempDir::new()?;
    let a = node_with_outbox(&server, dir.path(), |s3, _| {
        s3.close_timeout = Duration::from_secs(1);
        s3.operation_timeout = Duration::from_secs(5);
    })
    .await?;
    a.cache
        .put(&request("stays queued"), &Scope::Global, completion("ok"))
        .await?;
    let started = Instant::now();
    let closed = a.cache.clone().close().await;
    assert!(
        closed.is_err(),
        "the uploads did not finish: an error says so"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "close took {:?}",
        started.elapsed()
    );
    assert_eq!(
        a.s3.stats().pending,
        1,
        "what is left stays queued for the next run"
    );
    Ok(())
}
