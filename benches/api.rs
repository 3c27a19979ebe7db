//! API response caching, each figure next to its floor measured in the same run:
//!
//! 1. **The layer, in process**: a hit through [`CacheLayer`](strata_http::api::CacheLayer)
//!    against a call of the bare service (the example jobs API, an axum router) for the same
//!    request: the time a hit adds (target: at most 10 µs).
//! 2. **Hits through `strata serve`** at concurrency 32 against a bare hyper server answering
//!    the same bytes: the throughput ratio (target: at least 0.5).
//!
//! Run: `cargo bench --bench api`. Everything runs in this process on one runtime, so both
//! sides of each ratio pay the same for the machine.

#[path = "../examples/jobs_api.rs"]
mod jobs_api;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use strata_http::api::{ApiCache, UpstreamConfig};
use strata_http::{Gateway, Server};
use tokio::net::TcpListener;
use tower::ServiceExt;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

fn request(path: &str) -> axum::http::Request<axum::body::Body> {
    axum::http::Request::builder()
        .uri(path)
        .header("x-user", "alice")
        .body(axum::body::Body::empty())
        .expect("request")
}

/// Mean time of one call of `svc` for `path`, over `n` calls (the body read whole).
async fn mean_call<S>(svc: &S, path: &str, n: usize) -> Duration
where
    S: tower::Service<
            axum::http::Request<axum::body::Body>,
            Response = axum::http::Response<axum::body::Body>,
            Error = std::convert::Infallible,
        > + Clone,
{
    let started = Instant::now();
    for _ in 0..n {
        let response = svc
            .clone()
            .oneshot(request(path))
            .await
            .expect("infallible");
        let body = response.into_body().collect().await.expect("body");
        std::hint::black_box(body.to_bytes());
    }
    started.elapsed() / n as u32
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn open_cache(dir: &std::path::Path) -> strata_tiers::TieredCache {
    let mut config = strata::Config::load(None).expect("config");
    config.disk.path = dir.join("cache");
    config.open_cache().await.expect("cache")
}

async fn in_process() {
    let dir = tempfile::TempDir::new().expect("dir");
    let http = jobs_api::http_config();
    let api = ApiCache::new(
        open_cache(dir.path()).await,
        http.policy().expect("policy"),
        http.limits(),
        rand::random(),
    );
    let jobs = Arc::new(jobs_api::Jobs::default());
    let bare = jobs_api::app(Arc::clone(&jobs));
    let layered = jobs_api::app(jobs).layer(api.layer());
    println!("1. a hit through the layer, in process (target: adds at most 10 µs)");
    for path in ["/health", "/jobs/42", "/jobs"] {
        // Warm both: the entry is stored, the code paths are hot.
        mean_call(&bare, path, 2_000).await;
        mean_call(&layered, path, 2_000).await;
        let (mut b, mut l) = (Vec::new(), Vec::new());
        for _ in 0..15 {
            b.push(mean_call(&bare, path, 2_000).await);
            l.push(mean_call(&layered, path, 2_000).await);
        }
        let (b, l) = (median(b), median(l));
        let added = l.saturating_sub(b);
        println!(
            "   {path:<10} bare {:>7.2} µs · through the layer {:>7.2} µs · added {:>6.2} µs ({})",
            us(b),
            us(l),
            us(added),
            if added <= Duration::from_micros(10) {
                "met"
            } else {
                "NOT met"
            }
        );
    }
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(512)
        .build(connector)
}

/// Serves `body` (with `headers`) for every request, with hyper alone.
async fn bare_hyper(body: Bytes, headers: Vec<(String, String)>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let headers = Arc::new(headers);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (body, headers) = (body.clone(), Arc::clone(&headers));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    let mut response = Response::builder();
                    for (name, value) in headers.iter() {
                        response = response.header(name, value);
                    }
                    let response = response.body(Full::new(body.clone())).expect("response");
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

/// `total` GETs of `url` from `concurrency` workers: (requests per second, errors).
async fn load(client: &HttpClient, url: &str, total: usize, concurrency: usize) -> (f64, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, url) = (client.clone(), url.to_string());
        let (next, errors) = (Arc::clone(&next), Arc::clone(&errors));
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let request = Request::get(&url)
                    .header("x-user", "alice")
                    .body(Empty::new())
                    .expect("request");
                let ok = match client.request(request).await {
                    Ok(response) => {
                        let ok = response.status().is_success();
                        ok && response.into_body().collect().await.is_ok()
                    }
                    Err(_) => false,
                };
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for worker in workers {
        let _ = worker.await;
    }
    (
        total as f64 / started.elapsed().as_secs_f64(),
        errors.load(Ordering::Relaxed),
    )
}

async fn through_serve() {
    let dir = tempfile::TempDir::new().expect("dir");
    let jobs = Arc::new(jobs_api::Jobs::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let service = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, jobs_api::app(jobs)).await;
    });
    let mut config = strata::Config::load(None).expect("config");
    config.disk.path = dir.path().join("cache");
    config.server.listen = "127.0.0.1:0".parse().expect("addr");
    let mut http = jobs_api::http_config();
    http.warm.clear();
    http.upstreams = vec![UpstreamConfig {
        prefix: "/".into(),
        base: format!("http://{service}"),
    }];
    let cache = config.open_cache().await.expect("cache");
    let server =
        Server::bind(Gateway::with_http(cache, config.server.clone(), &http).expect("gateway"))
            .await
            .expect("bind");
    let gateway = server.local_addr().expect("addr");
    tokio::spawn(server.run(std::future::pending()));
    let client = client();
    println!(
        "2. hits through strata serve at concurrency 32 (target: at least 0.5 of a bare hyper server)"
    );
    for path in ["/health", "/jobs/42"] {
        let url = format!("http://{gateway}{path}");
        // The answer a hit sends, byte for byte, for the bare server.
        let first = client
            .request(
                Request::get(&url)
                    .header("x-user", "alice")
                    .body(Empty::new())
                    .expect("request"),
            )
            .await
            .expect("first");
        let _ = first.into_body().collect().await;
        let hit = client
            .request(
                Request::get(&url)
                    .header("x-user", "alice")
                    .body(Empty::new())
                    .expect("request"),
            )
            .await
            .expect("hit");
        let headers: Vec<(String, String)> = hit
            .headers()
            .iter()
            .filter(|(n, _)| *n != "content-length" && *n != "date")
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        assert_eq!(
            hit.headers().get("x-cache").map(|v| v.as_bytes()),
            Some(&b"HIT"[..])
        );
        let body = hit.into_body().collect().await.expect("body").to_bytes();
        let bare = bare_hyper(body, headers).await;
        let bare_url = format!("http://{bare}{path}");
        load(&client, &bare_url, 2_000, 32).await;
        load(&client, &url, 2_000, 32).await;
        let (mut b, mut s, mut errors) = (Vec::new(), Vec::new(), 0);
        for _ in 0..3 {
            let (rps, e) = load(&client, &bare_url, 20_000, 32).await;
            b.push(rps);
            errors += e;
            let (rps, e) = load(&client, &url, 20_000, 32).await;
            s.push(rps);
            errors += e;
        }
        let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
        let ratios: Vec<String> = b
            .iter()
            .zip(&s)
            .map(|(b, s)| format!("{:.2}", s / b))
            .collect();
        let ratio = best(&s) / best(&b);
        println!(
            "   {path:<10} bare {:>8.0}/s · strata serve {:>8.0}/s · ratio {ratio:.2} (rounds {}) · errors {errors} ({})",
            best(&b),
            best(&s),
            ratios.join(", "),
            if ratio >= 0.5 && errors == 0 {
                "met"
            } else {
                "NOT met"
            }
        );
    }
}

async fn run() {
    in_process().await;
    through_serve().await;
}
