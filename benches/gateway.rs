//! The gateway under load, each figure next to its floor measured in the same run:
//!
//! 1. **Hits at concurrency 32** against a bare hyper server answering the same bytes for the
//!    same requests (a hash lookup): throughput ratio and p50 ratio.
//! 2. **Miss overhead**: one request at a time, each a new key, through the gateway and straight
//!    to the provider, alternately; p50 added for JSON, and for the first byte of a stream.
//! 3. **Load**: 10,000 requests at concurrency 256 (a Zipf mix of hits and misses): errors, and
//!    the process's peak RSS against the memory tier's bound plus 64 MiB.
//!
//! The provider is a fake on a loopback port that answers each request of the example workload
//! with its logged response (as JSON, or as the chat-completion stream it converts to). The
//! gateway, the provider, the bare server and the load all run in this process on one runtime,
//! so every figure pays the same for the machine. Run: `cargo bench --bench gateway`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::SeedableRng;
use rand_distr::{Distribution, Zipf};
use serde_json::{Value, json};
use strata::Config;
use strata::replay::{ExchangeLog, parse_exchange, peak_rss_bytes};
use strata_http::{Gateway, Server};
use tokio::net::TcpListener;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const MEMORY_BOUND: u64 = 64 << 20;

/// The workload: requests (with `seed` free for making keys distinct) and their responses.
fn workload() -> Vec<(Value, Bytes)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sharegpt-400.jsonl.zst");
    let mut log = ExchangeLog::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    while let Some(Ok((n, bytes))) = log.next_line() {
        if let Ok(e) = parse_exchange(n, bytes) {
            let mut request = e.request;
            if let Some(object) = request.as_object_mut() {
                object.remove("stream");
            }
            out.push((request, Bytes::from(e.response.get().to_string())));
        }
    }
    assert!(out.len() >= 300, "the example workload");
    out
}

/// What identifies a request to the fake provider and the bare server: its messages.
fn messages_of(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .map(|v| v["messages"].to_string())
        .unwrap_or_default()
}

fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(512)
        .build(connector)
}

/// Serves `answer` on a loopback port with hyper alone.
async fn serve_hyper<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let answer = answer.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

/// The fake provider: each workload request's logged response, as JSON or as a stream.
async fn provider(answers: Arc<HashMap<String, Bytes>>) -> SocketAddr {
    serve_hyper(move |req: Request<Incoming>| {
        let answers = Arc::clone(&answers);
        async move {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let stream = serde_json::from_slice::<Value>(&body)
                .map(|v| v["stream"] == json!(true))
                .unwrap_or(false);
            let Some(answer) = answers.get(&messages_of(&body)) else {
                return Response::builder()
                    .status(404)
                    .body(Full::new(Bytes::new()))
                    .expect("404");
            };
            if !stream {
                return Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(answer.clone()))
                    .expect("200");
            }
            let value: Value = serde_json::from_slice(answer).unwrap_or_default();
            let events = strata_http::convert::openai::chat_events(&value).unwrap_or_default();
            let body = strata_http::gateway::record::encode_events(&events);
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Full::new(body))
                .expect("200")
        }
    })
    .await
}

/// The bare server: the same bytes for the same requests, found by a hash lookup.
async fn bare(answers: Arc<HashMap<String, Bytes>>) -> SocketAddr {
    serve_hyper(move |req: Request<Incoming>| {
        let answers = Arc::clone(&answers);
        async move {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let answer = answers
                .get(&messages_of(&body))
                .cloned()
                .unwrap_or_default();
            Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(answer))
                .expect("200")
        }
    })
    .await
}

/// One POST; returns (ok, time to the first byte of the body, time to the end).
async fn post(client: &HttpClient, url: &str, body: Bytes) -> (bool, Duration, Duration) {
    let started = Instant::now();
    let request = Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-bench")
        .body(Full::new(body))
        .expect("request");
    let Ok(response) = client.request(request).await else {
        return (false, started.elapsed(), started.elapsed());
    };
    let ok = response.status().is_success();
    let mut body = response.into_body();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) if f.data_ref().is_some_and(|d| !d.is_empty()) => {
                first.get_or_insert_with(|| started.elapsed());
            }
            Ok(_) => {}
            Err(_) => return (false, started.elapsed(), started.elapsed()),
        }
    }
    let end = started.elapsed();
    (ok, first.unwrap_or(end), end)
}

fn percentile(times: &mut [Duration], q: f64) -> Duration {
    times.sort();
    let rank = ((q * times.len() as f64).ceil() as usize).clamp(1, times.len());
    times[rank - 1]
}

/// `total` requests from `concurrency` workers, each taking the next body; returns the
/// per-request times, the errors and the wall time.
async fn load(
    client: &HttpClient,
    url: &str,
    bodies: Arc<Vec<Bytes>>,
    total: usize,
    concurrency: usize,
) -> (Vec<Duration>, usize, Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, url, bodies) = (client.clone(), url.to_string(), Arc::clone(&bodies));
        let (next, errors) = (Arc::clone(&next), Arc::clone(&errors));
        workers.push(tokio::spawn(async move {
            let mut times = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return times;
                }
                let (ok, _, took) = post(&client, &url, bodies[i % bodies.len()].clone()).await;
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                times.push(took);
            }
        }));
    }
    let mut times = Vec::new();
    for worker in workers {
        times.extend(worker.await.unwrap_or_default());
    }
    (times, errors.load(Ordering::Relaxed), started.elapsed())
}

fn body_of(request: &Value, seed: Option<u64>, stream: bool) -> Bytes {
    let mut request = request.clone();
    if let Some(seed) = seed {
        request["seed"] = json!(seed);
    }
    if stream {
        request["stream"] = json!(true);
    }
    Bytes::from(request.to_string())
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let exchanges = workload();
    let answers: Arc<HashMap<String, Bytes>> = Arc::new(
        exchanges
            .iter()
            .map(|(request, response)| (request["messages"].to_string(), response.clone()))
            .collect(),
    );
    let provider_addr = provider(Arc::clone(&answers)).await;
    let bare_addr = bare(Arc::clone(&answers)).await;
    let dir = tempfile::TempDir::new().expect("temp dir");
    let mut config = Config::load(None).expect("config");
    config.disk.path = dir.path().join("cache");
    config.memory.capacity = bytesize::ByteSize::b(MEMORY_BOUND);
    config.server.listen = "127.0.0.1:0".parse().expect("addr");
    config.server.openai_base = format!("http://{provider_addr}/v1");
    let cache = config.open_cache().await.expect("cache");
    let server = Server::bind(Gateway::new(cache, config.server.clone()).expect("gateway"))
        .await
        .expect("bind");
    let gateway_addr = server.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let client = client();
    let gateway = format!("http://{gateway_addr}/v1/chat/completions");
    let direct = format!("http://{provider_addr}/v1/chat/completions");
    let bare_url = format!("http://{bare_addr}/v1/chat/completions");

    // 2. Miss overhead, first: every request is a new key. Alternating gateway and direct
    // calls share whatever the machine is doing.
    let rounds: usize = std::env::var("STRATA_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1000);
    let (mut via, mut straight, mut via_ttfb, mut straight_ttfb) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        let (request, _) = &exchanges[i % exchanges.len()];
        let seed = Some(1_000_000 + i as u64);
        let (ok, _, took) = post(&client, &gateway, body_of(request, seed, false)).await;
        assert!(ok, "gateway miss");
        via.push(took);
        straight.push(
            post(&client, &direct, body_of(request, seed, false))
                .await
                .2,
        );
        let seed = Some(2_000_000 + i as u64);
        let (ok, first, _) = post(&client, &gateway, body_of(request, seed, true)).await;
        assert!(ok, "gateway stream miss");
        via_ttfb.push(first);
        straight_ttfb.push(post(&client, &direct, body_of(request, seed, true)).await.1);
    }
    let miss = (percentile(&mut via, 0.5), percentile(&mut straight, 0.5));
    let ttfb = (
        percentile(&mut via_ttfb, 0.5),
        percentile(&mut straight_ttfb, 0.5),
    );

    if std::env::var("STRATA_BENCH_ONLY").as_deref() == Ok("miss") {
        // The floor of a proxy hop: an uncached path through the gateway and straight.
        let (mut via, mut straight) = (Vec::new(), Vec::new());
        let models_via = format!("http://{gateway_addr}/v1/models");
        let models_direct = format!("http://{provider_addr}/v1/models");
        for _ in 0..rounds {
            via.push(post(&client, &models_via, Bytes::new()).await.2);
            straight.push(post(&client, &models_direct, Bytes::new()).await.2);
        }
        println!(
            "passthrough p50 added: {:.1} µs",
            us(percentile(&mut via, 0.5)) - us(percentile(&mut straight, 0.5))
        );
        println!(
            "miss p50 added: JSON {:.1} µs, stream first byte {:.1} µs",
            us(miss.0) - us(miss.1),
            us(ttfb.0) - us(ttfb.1)
        );
        return;
    }

    // 1. Hits at concurrency 32: warm every request once, then the same bodies against the
    // gateway and the bare server, alternately, three rounds each.
    let bodies: Arc<Vec<Bytes>> = Arc::new(
        exchanges
            .iter()
            .map(|(request, _)| body_of(request, None, false))
            .collect(),
    );
    for body in bodies.iter() {
        assert!(post(&client, &gateway, body.clone()).await.0, "warm");
    }
    let per_round = 20_000;
    let mut rounds_out = Vec::new();
    for _ in 0..3 {
        let (mut g, g_err, g_wall) =
            load(&client, &gateway, Arc::clone(&bodies), per_round, 32).await;
        let (mut b, b_err, b_wall) =
            load(&client, &bare_url, Arc::clone(&bodies), per_round, 32).await;
        assert_eq!(g_err + b_err, 0, "errors under the hit load");
        let g_rps = per_round as f64 / g_wall.as_secs_f64();
        let b_rps = per_round as f64 / b_wall.as_secs_f64();
        rounds_out.push((
            g_rps,
            b_rps,
            percentile(&mut g, 0.5),
            percentile(&mut b, 0.5),
            percentile(&mut g, 0.99),
            percentile(&mut b, 0.99),
        ));
    }

    // 3. Load: 10,000 requests at concurrency 256, Zipf(1.1) over the workload, one in ten a
    // new key (a miss).
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let zipf = Zipf::new(exchanges.len() as f64, 1.1).expect("zipf");
    let mixed: Arc<Vec<Bytes>> = Arc::new(
        (0..10_000u64)
            .map(|i| {
                let rank = zipf.sample(&mut rng) as usize - 1;
                let seed = (i % 10 == 0).then_some(3_000_000 + i);
                body_of(&exchanges[rank].0, seed, false)
            })
            .collect(),
    );
    let (mut times, errors, wall) = load(&client, &gateway, mixed, 10_000, 256).await;
    let peak = peak_rss_bytes().unwrap_or(0);
    let _ = stop.send(());
    let _ = serving.await;

    println!("strata gateway bench (loopback, 2 worker threads for everything)");
    println!();
    println!("1. hits at concurrency 32, 20,000 requests a round, gateway vs bare hyper:");
    println!(
        "   round   gateway req/s   bare req/s   ratio    gateway p50   bare p50   ratio    gateway p99   bare p99"
    );
    for (i, (g, b, gp, bp, g99, b99)) in rounds_out.iter().enumerate() {
        println!(
            "   {:>5}   {:>13.0}   {:>10.0}   {:>5.2}   {:>9.1} µs   {:>6.1} µs   {:>5.2}   {:>9.1} µs   {:>6.1} µs",
            i + 1,
            g,
            b,
            g / b,
            us(*gp),
            us(*bp),
            us(*gp) / us(*bp),
            us(*g99),
            us(*b99),
        );
    }
    println!("   targets: throughput ratio >= 0.50, p50 ratio <= 2.00");
    println!();
    println!("2. miss overhead, {rounds} rounds, one request at a time, each a new key:");
    println!(
        "   JSON p50:            gateway {:>8.1} µs   direct {:>8.1} µs   added {:>7.1} µs (target <= 250)",
        us(miss.0),
        us(miss.1),
        us(miss.0) - us(miss.1)
    );
    println!(
        "   stream first byte:   gateway {:>8.1} µs   direct {:>8.1} µs   added {:>7.1} µs (target <= 250)",
        us(ttfb.0),
        us(ttfb.1),
        us(ttfb.0) - us(ttfb.1)
    );
    println!();
    println!("3. load: 10,000 requests at concurrency 256 (Zipf 1.1, one in ten a miss):");
    println!(
        "   errors {errors}   {:.0} req/s   p50 {:.1} µs   p99 {:.1} µs",
        10_000.0 / wall.as_secs_f64(),
        us(percentile(&mut times, 0.5)),
        us(percentile(&mut times, 0.99))
    );
    println!(
        "   peak RSS of the whole process {:.1} MiB; memory tier bound {} MiB + 64 MiB = {} MiB (target: below)",
        peak as f64 / (1 << 20) as f64,
        MEMORY_BOUND >> 20,
        (MEMORY_BOUND >> 20) + 64
    );
}
