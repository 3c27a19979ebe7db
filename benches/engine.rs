//! Hot-path benchmarks on the example workload, each next to the floor it is judged against,
//! measured in the same run. Run with `cargo bench --bench engine`; the summary at the end prints
//! the medians and the ratios that BENCHMARKS.md records.

use std::hint::black_box;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use futures::StreamExt;
use md5::{Digest, Md5};
use serde_json::Value;
use strata::core::Codec;
use strata::core::Selector;
use strata::replay::{Exchange, ExchangeLog, parse_exchange};
use strata::tiers::{DiskConfig, DiskTier, S3Tier, Tier};
use strata::{Completion, Normalizer, Scope, TieredCache};

fn workload() -> Vec<Exchange> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sharegpt-400.jsonl.zst");
    let mut log = ExchangeLog::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    while let Some(Ok((n, bytes))) = log.next_line() {
        if let Ok(exchange) = parse_exchange(n, bytes) {
            out.push(exchange);
        }
    }
    assert!(out.len() >= 300);
    out
}

fn requests(exchanges: &[Exchange]) -> Vec<Value> {
    exchanges.iter().map(|e| e.request.clone()).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn filled_cache(
    rt: &tokio::runtime::Runtime,
    exchanges: &[Exchange],
    disk: Option<DiskTier>,
) -> TieredCache {
    fill(rt, exchanges, disk, TieredCache::builder())
}

fn fill(
    rt: &tokio::runtime::Runtime,
    exchanges: &[Exchange],
    disk: Option<DiskTier>,
    builder: strata::tiers::TieredCacheBuilder,
) -> TieredCache {
    let mut builder = builder.memory_capacity(256 << 20);
    if let Some(disk) = disk {
        builder = builder.disk(disk);
    }
    let cache = builder.build();
    rt.block_on(async {
        for e in exchanges {
            let _ = cache.put(&e.request, &Scope::Global, e.completion()).await;
        }
    });
    cache
}

/// The codec on the example entries: the default (level -1 with the built-in dictionary) next to
/// level 1 without it, encode and decode, with the compression ratio of each printed.
fn bench_codec(c: &mut Criterion) {
    let exchanges = workload();
    let rt = runtime();
    let cache = TieredCache::builder().analytics(None).build();
    let entries: Vec<_> = rt.block_on(async {
        let mut out = Vec::new();
        for e in &exchanges {
            if let Ok(entry) = cache.put(&e.request, &Scope::Global, e.completion()).await {
                out.push(entry);
            }
        }
        out
    });
    let mut group = c.benchmark_group("codec");
    for (name, codec) in [
        ("default", Codec::default()),
        (
            "level1_no_dictionary",
            Codec::new(1024, 1).with_dictionary(false),
        ),
    ] {
        let envelopes: Vec<Vec<u8>> = entries
            .iter()
            .map(|e| codec.encode(e).unwrap_or_else(|err| panic!("{err}")))
            .collect();
        let plain = Codec::new(usize::MAX, 1);
        let raw: usize = entries
            .iter()
            .map(|e| plain.encode(e).map_or(0, |b| b.len()))
            .sum();
        let stored: usize = envelopes.iter().map(Vec::len).sum();
        println!(
            "codec/{name}: {} entries, {:.0} bytes each uncompressed, ratio {:.2}",
            entries.len(),
            raw as f64 / entries.len() as f64,
            raw as f64 / stored as f64
        );
        let mut i = 0;
        group.bench_function(format!("encode_{name}"), |b| {
            b.iter(|| {
                i = (i + 1) % entries.len();
                black_box(codec.encode(&entries[i]).map(|b| b.len()).unwrap_or(0))
            })
        });
        let mut i = 0;
        group.bench_function(format!("decode_{name}"), |b| {
            b.iter(|| {
                i = (i + 1) % envelopes.len();
                black_box(codec.decode(&envelopes[i]).is_ok())
            })
        });
    }
    group.finish();
}

fn bench_key(c: &mut Criterion) {
    let exchanges = workload();
    let requests = requests(&exchanges);
    let normalizer = Normalizer::default();
    let canonical: Vec<String> = requests
        .iter()
        .map(|r| {
            normalizer
                .key(r, &Scope::Global)
                .map(|k| k.canonical)
                .unwrap_or_default()
        })
        .collect();
    let mut group = c.benchmark_group("key");
    let mut i = 0;
    group.bench_function("md5_of_canonical_bytes", |b| {
        b.iter(|| {
            i = (i + 1) % canonical.len();
            black_box(Md5::digest(canonical[i].as_bytes()))
        })
    });
    let mut i = 0;
    group.bench_function("key_derivation", |b| {
        b.iter(|| {
            i = (i + 1) % requests.len();
            black_box(normalizer.key(&requests[i], &Scope::Global).map(|k| k.key))
        })
    });
    // Both again, one request at a time: MD5 of its canonical bytes and its key derivation in
    // the same round (which goes first alternates), every single time kept for the summary.
    let mut i = 0;
    group.bench_function("paired_round", |b| {
        b.iter_custom(|iters| {
            let mut rounds = Vec::with_capacity(iters as usize);
            for _ in 0..iters {
                i = (i + 1) % requests.len();
                let md5 = || {
                    let started = Instant::now();
                    black_box(Md5::digest(black_box(canonical[i].as_bytes())));
                    started.elapsed()
                };
                let key = || {
                    let started = Instant::now();
                    black_box(
                        normalizer
                            .key(&requests[i], &Scope::Global)
                            .map(|k| k.key)
                            .is_ok(),
                    );
                    started.elapsed()
                };
                rounds.push(if i % 2 == 0 {
                    let m = md5();
                    [m, key()]
                } else {
                    let k = key();
                    [md5(), k]
                });
            }
            let total = rounds.iter().flatten().sum();
            lock(&KEY_ROUNDS).extend(rounds);
            total
        })
    });
    group.finish();
}

fn bench_tiers(c: &mut Criterion) {
    let exchanges = workload();
    let requests = requests(&exchanges);
    let rt = runtime();
    let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
    let disk = DiskTier::open(&DiskConfig::new(dir.path().join("l2")), Codec::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let cache = filled_cache(&rt, &exchanges, Some(disk.clone()));
    let keys: Vec<_> = requests
        .iter()
        .filter_map(|r| cache.key(r, &Scope::Global).ok())
        .collect();
    let never = || async { Err::<Completion, _>(std::io::Error::other("not a hit")) };

    let mut group = c.benchmark_group("tiers");
    let mut i = 0;
    group.bench_function("moka_get_floor", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % keys.len();
            let id = keys[i].key.id();
            let memory = cache.memory();
            async move { black_box(memory.get_id(id).await) }
        })
    });
    bench_l1_hit(&mut group, "l1_hit", &rt, &cache, &requests, &L1_HITS);
    let codec = Codec::default();
    let envelopes: Vec<Vec<u8>> = rt.block_on(async {
        let mut out = Vec::new();
        for k in &keys {
            if let Ok(Some(entry)) = disk.get(&k.key).await {
                out.push(codec.encode(&entry).unwrap_or_default());
            }
        }
        out
    });
    let mut i = 0;
    group.bench_function("envelope_decode_floor", |b| {
        b.iter(|| {
            i = (i + 1) % envelopes.len();
            black_box(codec.decode_local(&envelopes[i]).is_ok())
        })
    });
    let mut i = 0;
    group.bench_function("l2_hit", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (cache, requests, keys) = (&cache, &requests, &keys);
            let start = i;
            i = (i + iters as usize) % requests.len();
            async move {
                let mut times = Vec::with_capacity(iters as usize);
                for n in 0..iters as usize {
                    let at = (start + n) % requests.len();
                    // Drop the L1 copy (not timed) so the lookup goes to disk and promotes it
                    // back.
                    cache.memory().remove_id(keys[at].key.id()).await;
                    let started = Instant::now();
                    let lookup = cache
                        .get_or_execute(&requests[at], &Scope::Global, never)
                        .await;
                    times.push(started.elapsed());
                    assert!(matches!(lookup.map(|l| l.outcome), Ok(strata::Outcome::L2)));
                }
                let total = times.iter().sum();
                lock(&L2_HITS).extend(times.into_iter().map(|t| [t]));
                total
            }
        })
    });
    // The same from a synchronous caller, one `block_on` per lookup: the runtime allocates and
    // copies the whole lookup future each time (tokio boxes a future over 16 KiB).
    let mut i = 0;
    group.bench_function("l2_hit_block_on", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                i = (i + 1) % requests.len();
                rt.block_on(cache.memory().remove_id(keys[i].key.id()));
                let started = Instant::now();
                let lookup = rt.block_on(cache.get_or_execute(&requests[i], &Scope::Global, never));
                total += started.elapsed();
                assert!(matches!(lookup.map(|l| l.outcome), Ok(strata::Outcome::L2)));
            }
            total
        })
    });
    bench_put(&mut group, "put_l1_l2", &rt, &cache, &exchanges, &PUTS);
    group.finish();
    drop(cache);
    let _ = Arc::new(dir);
}

/// An L2 hit with the entries sealed and encrypted under a key (`[security] encrypt`) next to
/// one without a key, in the same run: the target is at most 1.3× the unkeyed hit.
fn bench_encryption(c: &mut Criterion) {
    let exchanges = workload();
    let requests = requests(&exchanges);
    let rt = runtime();
    let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("{e}"));
    let key = strata::core::Key::from_material(&[0x5a; 32]).unwrap_or_else(|e| panic!("{e}"));
    let keys = Arc::new(strata::core::Keyring::new(key, Vec::new(), true));
    let mut group = c.benchmark_group("encryption");
    for (name, codec) in [
        ("l2_hit_plain", Codec::default()),
        ("l2_hit_encrypted", Codec::default().with_keys(keys)),
    ] {
        let disk = DiskTier::open(&DiskConfig::new(dir.path().join(name)), codec)
            .unwrap_or_else(|e| panic!("{e}"));
        let cache = filled_cache(&rt, &exchanges, Some(disk));
        rt.block_on(cache.settle());
        let keyed: Vec<_> = requests
            .iter()
            .filter_map(|r| cache.key(r, &Scope::Global).ok())
            .collect();
        let never = || async { Err::<Completion, _>(std::io::Error::other("not a hit")) };
        // The decode alone (the floor of the difference).
        let decoder = cache.disk().map(|d| d.codec().clone()).unwrap_or_default();
        let envelopes: Vec<Vec<u8>> = keyed
            .iter()
            .filter_map(|k| cache.disk()?.raw(&k.key.digest).ok().flatten())
            .map(|v| v.to_vec())
            .collect();
        let mut i = 0;
        group.bench_function(format!("decode_{}", &name[7..]), |b| {
            b.iter(|| {
                i = (i + 1) % envelopes.len();
                black_box(decoder.decode_local(&envelopes[i]).is_ok())
            })
        });
        let mut i = 0;
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (cache, requests, keyed) = (&cache, &requests, &keyed);
                let start = i;
                i = (i + iters as usize) % requests.len();
                async move {
                    let mut total = Duration::ZERO;
                    for n in 0..iters as usize {
                        let at = (start + n) % requests.len();
                        cache.memory().remove_id(keyed[at].key.id()).await;
                        let started = Instant::now();
                        let lookup = cache
                            .get_or_execute(&requests[at], &Scope::Global, never)
                            .await;
                        total += started.elapsed();
                        assert!(matches!(lookup.map(|l| l.outcome), Ok(strata::Outcome::L2)));
                    }
                    total
                }
            })
        });
    }
    group.finish();
}

/// Benches an L1 hit through `get_or_execute` (key included), the requests in rotation; every
/// lookup's time goes into `kept`.
fn bench_l1_hit(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    rt: &tokio::runtime::Runtime,
    cache: &TieredCache,
    requests: &[Value],
    kept: &Mutex<Vec<[Duration; 1]>>,
) {
    let never = || async { Err::<Completion, _>(std::io::Error::other("not a hit")) };
    let mut i = 0;
    group.bench_function(name, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let start = i;
            i = (i + iters as usize) % requests.len();
            let round = move |at: usize| async move {
                let started = Instant::now();
                let hit = cache
                    .get_or_execute(&requests[at], &Scope::Global, never)
                    .await
                    .is_ok();
                let took = started.elapsed();
                black_box(hit);
                [took]
            };
            kept_rounds(iters, start, requests.len(), round, kept)
        })
    });
}

/// Benches `put` on `cache`, the workload's exchanges in rotation; every put's time goes into
/// `kept` (the `Completion` is built before the clock starts).
fn bench_put(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    rt: &tokio::runtime::Runtime,
    cache: &TieredCache,
    exchanges: &[Exchange],
    kept: &Mutex<Vec<[Duration; 1]>>,
) {
    let mut i = 0;
    group.bench_function(name, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let start = i;
            i = (i + iters as usize) % exchanges.len();
            let round = move |at: usize| async move {
                let e = &exchanges[at];
                let completion = e.completion();
                let started = Instant::now();
                let stored = cache.put(&e.request, &Scope::Global, completion).await;
                let took = started.elapsed();
                black_box(stored.is_ok());
                [took]
            };
            kept_rounds(iters, start, exchanges.len(), round, kept)
        })
    });
}

#[path = "../tests/support/s3.rs"]
mod s3_server;

/// Entries per measured outbox drain.
const DRAIN_BATCH: usize = 256;

/// The in-process S3 server, on a runtime (two threads) of its own, as a server in another
/// process would have. On the bench's runtime its request handling would queue behind the
/// caller's tasks and the drainer's, and the ratios would measure that scheduling rather than
/// the tier. The runtime is returned to be dropped after the server.
fn s3_server_on_its_own_threads() -> (tokio::runtime::Runtime, s3_server::TestS3) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("s3-server")
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let server = rt
        .block_on(s3_server::TestS3::start())
        .unwrap_or_else(|e| panic!("{e}"));
    (rt, server)
}

/// L3 against s3s-fs served in-process on loopback, each measure next to a raw GetObject of the
/// same objects from the same server, and put with S3 next to put without.
fn bench_s3(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let exchanges = workload();
    let requests = requests(&exchanges);
    let (_server_rt, server) = s3_server_on_its_own_threads();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let open = |name: &str| {
        DiskTier::open(&DiskConfig::new(dir.path().join(name)), Codec::default())
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let (disk, plain_disk) = (open("with-s3"), open("without-s3"));
    let s3 = rt
        .block_on(S3Tier::connect(&server.config(), &disk, Codec::default()))
        .unwrap_or_else(|e| panic!("{e}"));
    let cache = rt.block_on(async {
        let cache = TieredCache::builder()
            .memory_capacity(256 << 20)
            .disk(disk.clone())
            .s3(s3.clone())
            .build();
        for e in &exchanges {
            let _ = cache.put(&e.request, &Scope::Global, e.completion()).await;
        }
        cache.flush().await.unwrap_or_else(|e| panic!("{e}"));
        cache
    });
    let plain = filled_cache(&rt, &exchanges, Some(plain_disk));
    let keys: Vec<_> = requests
        .iter()
        .map(|r| {
            cache
                .key(r, &Scope::Global)
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let paths: Vec<String> = keys
        .iter()
        .map(|k| s3.known_path(&k.key).ok().flatten().unwrap_or_default())
        .collect();
    let never = || async { Err::<Completion, std::io::Error>(std::io::Error::other("miss")) };

    // Paired measures: every iteration of each of these benches runs the same round (a raw GET,
    // `fetch` and an L3 hit of one object; a put without S3 and one with), and each bench
    // times only its own step. A measure and its floor then see the same server, the same
    // background work and the same alternation. Timed in separate loops, a GET after a GET
    // finds the server's worker threads still awake, a GET after client-side work often finds
    // them parked: that bias alone moved the ratios by 0.1–0.2 (BENCHMARKS.md).
    let l3_round = |at: usize| {
        let (cache, disk, s3, request, key, path) =
            (&cache, &disk, &s3, &requests[at], &keys[at].key, &paths[at]);
        async move {
            // Drop the L1 and L2 copies (not timed) so the lookup goes to S3 and promotes it
            // back; first, so that each timed step follows another's work with no gap.
            cache.memory().remove_id(key.id()).await;
            let _ = disk.remove(key).await;
            // Which step goes first rotates from round to round, so that none always follows
            // the untimed removals or always runs on a server its predecessor just woke.
            let mut times = [Duration::ZERO; 3];
            for step in [0, 1, 2].map(|s| (s + at) % 3) {
                let started = Instant::now();
                match step {
                    0 => {
                        let out = s3
                            .client()
                            .get_object()
                            .bucket(s3.bucket())
                            .key(path)
                            .send()
                            .await
                            .unwrap_or_else(|e| panic!("{e}"));
                        let body = out.body.collect().await.unwrap_or_else(|e| panic!("{e}"));
                        black_box(body.to_vec());
                    }
                    1 => {
                        black_box(s3.fetch(key).await.ok().flatten().map(|f| f.1.len()));
                    }
                    _ => {
                        let lookup = cache.get_or_execute(request, &Scope::Global, never).await;
                        assert!(matches!(lookup.map(|l| l.outcome), Ok(strata::Outcome::L3)));
                    }
                }
                times[step] = started.elapsed();
            }
            times
        }
    };
    // Which put goes first alternates from round to round: a put with S3 wakes the drainer,
    // which then uploads during whatever runs next.
    let put_round = |at: usize| {
        let (plain, cache, e) = (&plain, &cache, &exchanges[at]);
        async move {
            let mut times = [Duration::ZERO; 2];
            let order = if at.is_multiple_of(2) { [0, 1] } else { [1, 0] };
            for which in order {
                let target = if which == 0 { plain } else { cache };
                let started = Instant::now();
                let stored = target.put(&e.request, &Scope::Global, e.completion()).await;
                times[which] = started.elapsed();
                black_box(stored.is_ok());
            }
            times
        }
    };
    let mut group = c.benchmark_group("s3");
    // Longer than the other groups: a step here shares two cores with the drainer's uploads
    // and the server, whose bursts make its samples spread more widely.
    group.measurement_time(Duration::from_secs(10));
    let mut next = 0;
    for (step, name) in ["raw_get_object_floor", "l3_fetch", "l3_hit"]
        .into_iter()
        .enumerate()
    {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (start, count, l3_round) = (next, requests.len(), &l3_round);
                next = (next + iters as usize) % count;
                async move {
                    let mut total = Duration::ZERO;
                    for n in 0..iters as usize {
                        total += l3_round((start + n) % count).await[step];
                    }
                    total
                }
            })
        });
    }
    for (step, name) in ["put_without_s3", "put_with_s3"].into_iter().enumerate() {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (start, count, put_round) = (next, exchanges.len(), &put_round);
                next = (next + iters as usize) % count;
                async move {
                    let mut total = Duration::ZERO;
                    for n in 0..iters as usize {
                        total += put_round((start + n) % count).await[step];
                    }
                    total
                }
            })
        });
    }
    // The same rounds once more, every step of every round kept: the summary takes each step's
    // median over single operations of the same rounds. Criterion's medians above are medians
    // of per-sample means, each bench's samples taken in a window of their own; a burst of the
    // drainer or of sled's flusher lands in one window and not in its floor's. Here a measure
    // and its floor come from the same rounds, and one slow operation is one value of many.
    group.bench_function("l3_round_paired", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (start, count) = (next, requests.len());
            next = (next + iters as usize) % count;
            kept_rounds(iters, start, count, &l3_round, &L3_ROUNDS)
        })
    });
    group.bench_function("put_round_paired", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (start, count) = (next, exchanges.len());
            next = (next + iters as usize) % count;
            kept_rounds(iters, start, count, &put_round, &PUT_ROUNDS)
        })
    });
    group.finish();
    rt.block_on(async {
        let _ = cache.flush().await;
    });

    // Outbox drain: a tier of its own (no background drainer), timed per entry drained.
    let drain_dir = open("drain");
    let drain_tier = rt
        .block_on(S3Tier::connect(
            &server.config(),
            &drain_dir,
            Codec::default(),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let envelopes: Vec<_> = keys
        .iter()
        .filter_map(|k| {
            let entry = rt.block_on(disk.get(&k.key)).ok().flatten()?;
            Some((k.key.clone(), Codec::default().encode(&entry).ok()?))
        })
        .collect();
    let mut group = c.benchmark_group("s3_drain");
    group
        .sample_size(10)
        .sampling_mode(criterion::SamplingMode::Flat);
    // One iteration: 256 entries queued (not timed), then drained (timed); a full batch, as a
    // busy node's outbox holds.
    let mut round = 0u8;
    group.bench_function("outbox_drain_256", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (tier, envelopes) = (&drain_tier, &envelopes);
            round = round.wrapping_add(1);
            let round = round;
            async move {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    for (key, envelope) in envelopes.iter().cycle().take(DRAIN_BATCH) {
                        // Outbox keys of this round alone; the objects are the workload's.
                        let mut key = key.clone();
                        key.digest[0] ^= round;
                        key.digest[1] ^= i as u8;
                        tier.enqueue(&key, envelope)
                            .unwrap_or_else(|e| panic!("{e}"));
                    }
                    let started = std::time::Instant::now();
                    tier.drain().await.unwrap_or_else(|e| panic!("{e}"));
                    total += started.elapsed();
                }
                total
            }
        })
    });
    // The floor: the same three PUTs per entry (entry, then metadata and pointer together) and
    // one manifest PUT, at the same concurrency, straight through the SDK client.
    let client = rt.block_on(server.config().client());
    let meta_body = vec![b'{'; 420];
    group.bench_function("raw_put_floor_256", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (client, envelopes, server, meta_body) = (&client, &envelopes, &server, &meta_body);
            async move {
                let put = |key: String, body: Vec<u8>| async move {
                    client
                        .put_object()
                        .bucket(&server.bucket)
                        .key(key)
                        .body(aws_sdk_s3::primitives::ByteStream::from(body))
                        .send()
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                };
                let started = std::time::Instant::now();
                for _ in 0..iters {
                    futures::stream::iter(envelopes.iter().cycle().take(DRAIN_BATCH).enumerate())
                        .map(|(i, (_, envelope))| async move {
                            let base = format!("{}/raw-floor/{i}", server.prefix);
                            put(format!("{base}.json.zst"), envelope.clone()).await;
                            tokio::join!(
                                put(format!("{base}.metadata.json"), meta_body.clone()),
                                put(format!("{base}.pointer.json"), meta_body.clone()),
                            );
                        })
                        .buffer_unordered(server.config().max_concurrency)
                        .collect::<Vec<()>>()
                        .await;
                    put(
                        format!("{}/raw-floor/manifest", server.prefix),
                        meta_body.clone(),
                    )
                    .await;
                }
                started.elapsed()
            }
        })
    });
    group.finish();
    drop((cache, plain, server));
}

/// Every timed L2 hit: the summary also gives their per-operation median.
static L2_HITS: Mutex<Vec<[Duration; 1]>> = Mutex::new(Vec::new());
/// Every timed L1 hit of `tiers/l1_hit`.
static L1_HITS: Mutex<Vec<[Duration; 1]>> = Mutex::new(Vec::new());
/// Every timed put of `tiers/put_l1_l2`.
static PUTS: Mutex<Vec<[Duration; 1]>> = Mutex::new(Vec::new());
/// Step times of every paired key round: MD5 of the canonical bytes, key derivation.
static KEY_ROUNDS: Mutex<Vec<[Duration; 2]>> = Mutex::new(Vec::new());
/// Step times of every paired L3 round: raw GET, `fetch`, L3 hit.
static L3_ROUNDS: Mutex<Vec<[Duration; 3]>> = Mutex::new(Vec::new());
/// Step times of every paired put round: without S3, with S3.
static PUT_ROUNDS: Mutex<Vec<[Duration; 2]>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `iters` rounds, the workload's items in rotation from `start`, and keeps every round's
/// step times in `kept`. Returns the time of all their steps.
async fn kept_rounds<const N: usize, F, Fut>(
    iters: u64,
    start: usize,
    count: usize,
    round: F,
    kept: &Mutex<Vec<[Duration; N]>>,
) -> Duration
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = [Duration; N]>,
{
    let mut rounds = Vec::with_capacity(iters as usize);
    for n in 0..iters as usize {
        rounds.push(round((start + n) % count).await);
    }
    let total = rounds.iter().flatten().sum();
    lock(kept).extend(rounds);
    total
}

/// The `q` quantile (0.5: the median) of column `step` over `rounds`, in microseconds.
fn step_quantile<const N: usize>(rounds: &[[Duration; N]], step: usize, q: f64) -> Option<f64> {
    let mut times: Vec<Duration> = rounds.iter().map(|r| r[step]).collect();
    times.sort_unstable();
    let at = ((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1));
    times.get(at).map(|d| d.as_secs_f64() * 1e6)
}

/// The median of column `step` over `rounds`, in microseconds.
fn step_median<const N: usize>(rounds: &[[Duration; N]], step: usize) -> Option<f64> {
    step_quantile(rounds, step, 0.5)
}

/// "p99 a / b µs" for columns `measure` and `floor` of `rounds`.
fn p99s<const N: usize>(rounds: &[[Duration; N]], measure: usize, floor: usize) -> String {
    match (
        step_quantile(rounds, measure, 0.99),
        step_quantile(rounds, floor, 0.99),
    ) {
        (Some(m), Some(f)) => format!("; p99 {m:.1} against {f:.1} µs"),
        _ => String::new(),
    }
}

/// When this process started: the summary reads only estimates written since.
static STARTED: std::sync::OnceLock<std::time::SystemTime> = std::sync::OnceLock::new();

/// The median criterion recorded for `group/name` in this run, in nanoseconds.
fn median_ns(group: &str, name: &str) -> Option<f64> {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let path = dir
        .join("criterion")
        .join(group)
        .join(name)
        .join("new/estimates.json");
    // Only what this process measured: a group the filter skipped keeps an older run's file.
    let written = std::fs::metadata(&path).ok()?.modified().ok()?;
    if written < *STARTED.get()? {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["median"]["point_estimate"].as_f64()
}

/// A summary row: the per-operation median and p99 of the single times in `kept`.
fn per_operation(
    rows: &mut Vec<String>,
    what: &str,
    operations: &str,
    kept: &Mutex<Vec<[Duration; 1]>>,
    target: &str,
) {
    let kept = lock(kept);
    if let (Some(median), Some(p99)) = (step_median(&kept, 0), step_quantile(&kept, 0, 0.99)) {
        // The mean is what criterion's figure (total time over iterations) comes near.
        let mean = kept.iter().map(|t| t[0].as_secs_f64()).sum::<f64>() / kept.len() as f64 * 1e6;
        rows.push(format!(
            "| {what}, per-operation median of {} {operations} | {median:.2} µs | {target} | p99 {p99:.2} µs, mean {mean:.2} µs |",
            kept.len()
        ));
    }
}

fn summary() {
    let us = |g: &str, n: &str| median_ns(g, n).map(|ns| ns / 1000.0);
    let mut rows: Vec<String> = Vec::new();
    let key = us("key", "key_derivation");
    if let (Some(md5), Some(key)) = (us("key", "md5_of_canonical_bytes"), key) {
        rows.push(format!(
            "| key derivation | {key:.2} µs ({:.2}× MD5) | ≤ 1.3× MD5 | MD5 alone {md5:.2} µs |",
            key / md5
        ));
    }
    let key_rounds = lock(&KEY_ROUNDS);
    if let (Some(md5), Some(key)) = (step_median(&key_rounds, 0), step_median(&key_rounds, 1)) {
        rows.push(format!(
            "| key derivation, per-operation medians of {} paired rounds | {key:.2} µs ({:.2}× MD5) | ≤ 1.3× MD5 | MD5 alone {md5:.2} µs{} |",
            key_rounds.len(),
            key / md5,
            p99s(&key_rounds, 1, 0)
        ));
    }
    let plus_key = key.map(|k| format!(" + key {k:.2} µs")).unwrap_or_default();
    if let (Some(l1), Some(moka)) = (us("tiers", "l1_hit"), us("tiers", "moka_get_floor")) {
        rows.push(format!(
            "| L1 hit | {l1:.2} µs | ≤ 8 µs | moka get {moka:.2} µs{plus_key} |"
        ));
    }
    per_operation(&mut rows, "L1 hit", "lookups", &L1_HITS, "≤ 8 µs");
    if let (Some(l2), Some(decode)) = (us("tiers", "l2_hit"), us("tiers", "envelope_decode_floor"))
    {
        rows.push(format!(
            "| L2 hit | {l2:.2} µs | ≤ 15 µs | envelope decode {decode:.2} µs{plus_key} |"
        ));
    }
    per_operation(&mut rows, "L2 hit", "lookups", &L2_HITS, "≤ 15 µs");
    if let Some(recorder) = us("recording", "recorder_per_event") {
        rows.push(format!(
            "| the recorder's work per lookup (its own thread), a new hot key each time | {recorder:.2} µs | | |"
        ));
    }
    if let (Some(on), Some(off)) = (
        us("encryption", "l2_hit_encrypted"),
        us("encryption", "l2_hit_plain"),
    ) {
        rows.push(format!(
            "| L2 hit, entries encrypted under a key | {on:.2} µs ({:.2}× without) | ≤ 1.3× | without a key {off:.2} µs (same run) |",
            on / off
        ));
    }
    if let Some(sync) = us("tiers", "l2_hit_block_on") {
        rows.push(format!(
            "| L2 hit from a synchronous caller (`block_on` per lookup) | {sync:.2} µs | | |"
        ));
    }
    if let (Some(on), Some(off)) = (
        us("recording", "l1_hit_recorded"),
        us("recording", "l1_hit_unrecorded"),
    ) {
        rows.push(format!(
            "| L1 hit with analytics recording | {on:.2} µs ({:+.1}% vs without) | ≤ +5% | without recording {off:.2} µs |",
            (on / off - 1.0) * 100.0
        ));
    }
    for (name, what) in [
        ("default", "level -1, dictionary"),
        ("level1_no_dictionary", "level 1, no dictionary"),
    ] {
        if let (Some(encode), Some(decode)) = (
            us("codec", &format!("encode_{name}")),
            us("codec", &format!("decode_{name}")),
        ) {
            rows.push(format!(
                "| codec ({what}) | encode {encode:.2} µs, decode {decode:.2} µs | | (ratio printed above) |"
            ));
        }
    }
    if let Some(put) = us("tiers", "put_l1_l2") {
        rows.push(format!("| put (L1 + L2) | {put:.2} µs | ≤ 30 µs | |"));
    }
    per_operation(&mut rows, "put (L1 + L2)", "puts", &PUTS, "≤ 30 µs");
    if let (Some(l3), Some(raw)) = (us("s3", "l3_hit"), us("s3", "raw_get_object_floor")) {
        rows.push(format!(
            "| L3 hit | {l3:.1} µs ({:.2}× raw GET) | ≤ 1.2× raw GET | raw GetObject {raw:.1} µs |",
            l3 / raw
        ));
    }
    if let (Some(with), Some(without)) = (us("s3", "put_with_s3"), us("s3", "put_without_s3")) {
        rows.push(format!(
            "| put with S3 | {with:.2} µs ({:.2}× without) | ≤ 1.1× without | put without S3 {without:.2} µs |",
            with / without
        ));
    }
    let l3_rounds = lock(&L3_ROUNDS);
    if let (Some(raw), Some(fetch), Some(l3)) = (
        step_median(&l3_rounds, 0),
        step_median(&l3_rounds, 1),
        step_median(&l3_rounds, 2),
    ) {
        rows.push(format!(
            "| L3 hit, per-operation median of {} paired rounds | {l3:.1} µs ({:.2}× raw GET) | ≤ 1.2× raw GET | raw GetObject {raw:.1} µs, `fetch` {fetch:.1} µs{} |",
            l3_rounds.len(),
            l3 / raw,
            p99s(&l3_rounds, 2, 0)
        ));
    }
    let put_rounds = lock(&PUT_ROUNDS);
    if let (Some(without), Some(with)) = (step_median(&put_rounds, 0), step_median(&put_rounds, 1))
    {
        rows.push(format!(
            "| put with S3, per-operation median of {} paired rounds | {with:.2} µs ({:.2}× without) | ≤ 1.1× without | put without S3 {without:.2} µs{} |",
            put_rounds.len(),
            with / without,
            p99s(&put_rounds, 1, 0)
        ));
    }
    if let Some(local) = us("invalidate", "by_model_over_100k_entries") {
        let published = us("invalidate", "by_model_published_to_s3")
            .map(|p| format!("with S3 (published to the bucket) {:.2} ms", p / 1000.0))
            .unwrap_or_default();
        rows.push(format!(
            "| invalidate a model over 100,000 entries | {:.3} ms | < 10 ms | {published} |",
            local / 1000.0
        ));
    }
    if let (Some(per_batch), Some(raw)) = (
        us("s3_drain", "outbox_drain_256"),
        us("s3_drain", "raw_put_floor_256"),
    ) {
        let rate = |us: f64| DRAIN_BATCH as f64 * 1e6 / us;
        rows.push(format!(
            "| outbox drain | {:.0} entries/s ({DRAIN_BATCH} per drain) | ≥ 300 entries/s | same PUTs straight through the SDK {:.0} entries/s |",
            rate(per_batch),
            rate(raw)
        ));
    }
    if rows.is_empty() {
        return;
    }
    println!("\nsummary (medians of this run)");
    println!("| measure | median | target | floor in the same run |");
    println!("|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(40)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args()
}

/// Invalidation by model with 100,000 entries in L1 and L2 (it must not touch them), and the
/// same call with an S3 tier, where it also publishes the epochs to the bucket.
fn bench_invalidate(c: &mut Criterion) {
    let rt = runtime();
    let exchanges = workload();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let disk = DiskTier::open(&DiskConfig::new(dir.path().join("l2")), Codec::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let cache = TieredCache::builder()
        .memory_capacity(1 << 30)
        .disk(disk)
        .build();
    let models = [
        "gpt-4o",
        "gpt-4o-mini",
        "claude-3-5-sonnet",
        "llama-3.1-70b",
    ];
    rt.block_on(async {
        for i in 0..INVALIDATE_ENTRIES {
            let e = &exchanges[i % exchanges.len()];
            let mut request = e.request.clone();
            request["model"] = Value::from(models[i % models.len()]);
            request["seed"] = Value::from(i);
            let _ = cache.put(&request, &Scope::Global, e.completion()).await;
        }
    });
    let selector = Selector::Model("gpt-4o".into());
    let mut group = c.benchmark_group("invalidate");
    group.bench_function("by_model_over_100k_entries", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                cache
                    .invalidate(&selector)
                    .await
                    .unwrap_or_else(|e| panic!("{e}")),
            )
        })
    });

    let (_server_rt, server) = s3_server_on_its_own_threads();
    let s3_disk = DiskTier::open(&DiskConfig::new(dir.path().join("s3")), Codec::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let s3 = rt
        .block_on(S3Tier::connect(
            &server.config(),
            &s3_disk,
            Codec::default(),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let shared = rt.block_on(async {
        TieredCache::builder()
            .disk(s3_disk)
            .s3(s3)
            .refresh_interval(Duration::from_secs(3600))
            .build()
    });
    group.bench_function("by_model_published_to_s3", |b| {
        b.to_async(&rt).iter(|| async {
            let done = shared
                .invalidate(&selector)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(done.published);
        })
    });
    group.finish();
    drop((cache, shared, server));
}

const INVALIDATE_ENTRIES: usize = 100_000;

/// The L1 hit with analytics recording on (the default) and off, memory tier only, same run:
/// what recording adds to the fastest lookup.
fn bench_recording(c: &mut Criterion) {
    let exchanges = workload();
    let requests = requests(&exchanges);
    let rt = runtime();
    let recorded = fill(&rt, &exchanges, None, TieredCache::builder());
    let unrecorded = fill(
        &rt,
        &exchanges,
        None,
        TieredCache::builder().analytics(None),
    );
    assert!(recorded.analytics().is_some() && unrecorded.analytics().is_none());
    let mut group = c.benchmark_group("recording");
    for (name, cache) in [
        ("l1_hit_unrecorded", &unrecorded),
        ("l1_hit_recorded", &recorded),
    ] {
        // Their single times are not summarized: only criterion's two medians are compared.
        let discarded = Mutex::new(Vec::new());
        bench_l1_hit(&mut group, name, &rt, cache, &requests, &discarded);
    }
    // The recorder's own work per lookup event, on the thread that drains them: every example
    // entry served in rotation, so with more keys than the hot-key sketch's 256 counters each
    // event takes a counter (its worst case). Queued, then drained and persisted by `flush`.
    let entries: Vec<Arc<strata::Entry>> = rt.block_on(async {
        let mut out = Vec::new();
        for r in &requests {
            if let Ok(Some(lookup)) = unrecorded.get(r, &Scope::Global).await {
                out.push(lookup.entry);
            }
        }
        out
    });
    let analytics = strata::analytics::Analytics::temporary(strata::analytics::AnalyticsConfig {
        poll_interval: Duration::from_secs(3600),
        persist_interval: Duration::from_secs(3600),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let mut i = 0;
    group.bench_function("recorder_per_event", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                // Within the channel's capacity, so nothing is dropped.
                let batch = left.min(8_192);
                for _ in 0..batch {
                    i = (i + 1) % entries.len();
                    analytics.record(strata::analytics::Event::Lookup {
                        outcome: strata::Outcome::L2,
                        entry: Some(Arc::clone(&entries[i])),
                        model: None,
                        lookup_us: 14,
                        aggressive: None,
                    });
                }
                let started = Instant::now();
                analytics.flush().unwrap_or_else(|e| panic!("{e}"));
                total += started.elapsed();
                left -= batch;
            }
            total
        })
    });
    group.finish();
    if let Some(analytics) = recorded.analytics() {
        println!(
            "recording: {} lookups dropped (channel full)",
            analytics.dropped()
        );
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_key, bench_codec, bench_tiers, bench_encryption, bench_recording, bench_s3, bench_invalidate
}

fn main() {
    STARTED.get_or_init(std::time::SystemTime::now);
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
