//! Response caching for ordinary APIs, shown on the jobs API of `examples/jobs_api.rs` two
//! ways: wrapped in the tower layer and served on a loopback port, and served bare behind
//! `strata serve`'s reverse proxy. Every scenario runs both ways; the invalidation and
//! isolation scenarios also run against a Python service (`jobs_service.py`) behind the proxy.

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use strata::Config;
use strata_http::api::{ApiCache, HttpConfig, UpstreamConfig};
use strata_http::{Gateway, Server};
use tempfile::TempDir;
use tokio::io::AsyncBufReadExt;
use tokio::sync::oneshot;

use crate::jobs_api::{self, Jobs};

/// Where handler calls are counted.
enum Calls {
    /// The Rust service's state, in this process.
    Rust(Arc<Jobs>),
    /// The Python service's `/_calls`.
    Http(String),
}

/// A jobs API under test, with the cache in front of it.
struct Api {
    base: String,
    calls: Calls,
    client: reqwest::Client,
    _dir: TempDir,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: Option<oneshot::Sender<()>>,
    _child: Option<KillOnDrop>,
}

struct KillOnDrop(tokio::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for task in &self._tasks {
            task.abort();
        }
    }
}

/// The example's `[http]` section with `tweak` applied.
fn http(tweak: fn(&mut HttpConfig)) -> HttpConfig {
    let mut config = jobs_api::http_config();
    config.upstreams.clear();
    config.warm.clear();
    tweak(&mut config);
    config
}

/// Sets a route's TTL (tests cannot wait a minute for an answer to go stale).
fn ttl(config: &mut HttpConfig, path: &str, ttl: Duration) {
    for route in &mut config.routes {
        if route.path == path {
            route.ttl = ttl;
        }
    }
}

async fn cache_in(dir: &Path) -> Result<strata_tiers::TieredCache> {
    let mut config = Config::load(None)?;
    config.disk.path = dir.join("cache");
    Ok(config.open_cache().await?)
}

async fn serve_axum(app: axum::Router) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, task))
}

impl Api {
    /// The Rust app wrapped in the layer, on a loopback port.
    async fn layered(tweak: fn(&mut HttpConfig)) -> Result<Api> {
        let dir = TempDir::new()?;
        let config = http(tweak);
        let api = ApiCache::new(
            cache_in(dir.path()).await?,
            config.policy()?,
            config.limits(),
            [9; 32],
        );
        let jobs = Arc::new(Jobs::default());
        let (addr, task) = serve_axum(jobs_api::app(Arc::clone(&jobs)).layer(api.layer())).await?;
        Ok(Api {
            base: format!("http://{addr}"),
            calls: Calls::Rust(jobs),
            client: reqwest::Client::new(),
            _dir: dir,
            _tasks: vec![task],
            stop: None,
            _child: None,
        })
    }

    /// `strata serve` in front of a service at `upstream`.
    async fn gateway(
        upstream: String,
        tweak: fn(&mut HttpConfig),
    ) -> Result<(
        TempDir,
        String,
        oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )> {
        let dir = TempDir::new()?;
        let mut config = Config::load(None)?;
        config.disk.path = dir.path().join("cache");
        config.server.listen = "127.0.0.1:0".parse()?;
        let mut http = http(tweak);
        http.upstreams = vec![UpstreamConfig {
            prefix: "/".into(),
            base: upstream,
        }];
        let cache = config.open_cache().await?;
        let server = Server::bind(Gateway::with_http(cache, config.server.clone(), &http)?).await?;
        let addr = server.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = server
                .run(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok((dir, format!("http://{addr}"), stop, task))
    }

    /// The Rust app bare on a loopback port, behind `strata serve`.
    async fn proxied(tweak: fn(&mut HttpConfig)) -> Result<Api> {
        let jobs = Arc::new(Jobs::default());
        let (app_addr, app_task) = serve_axum(jobs_api::app(Arc::clone(&jobs))).await?;
        let (dir, base, stop, task) = Api::gateway(format!("http://{app_addr}"), tweak).await?;
        Ok(Api {
            base,
            calls: Calls::Rust(jobs),
            client: reqwest::Client::new(),
            _dir: dir,
            _tasks: vec![app_task, task],
            stop: Some(stop),
            _child: None,
        })
    }

    /// The Python service behind `strata serve`.
    async fn python(tweak: fn(&mut HttpConfig)) -> Result<Api> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gateway/jobs_service.py");
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let mut child = tokio::process::Command::new(python)
            .arg(script)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the Python jobs service")?;
        let stdout = child.stdout.take().context("its output")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .context("the Python service did not start")??
            .unwrap_or_default();
        let port: u16 = first.strip_prefix("port ").context("`port N`")?.parse()?;
        let service = format!("http://127.0.0.1:{port}");
        let (dir, base, stop, task) = Api::gateway(service.clone(), tweak).await?;
        Ok(Api {
            base,
            calls: Calls::Http(format!("{service}/_calls")),
            client: reqwest::Client::new(),
            _dir: dir,
            _tasks: vec![task],
            stop: Some(stop),
            _child: Some(KillOnDrop(child)),
        })
    }

    /// Handler calls of an endpoint so far.
    async fn calls(&self, endpoint: &str) -> Result<u64> {
        match &self.calls {
            Calls::Rust(jobs) => Ok(jobs.calls(endpoint)),
            Calls::Http(url) => {
                let all: Value = self.client.get(url).send().await?.json().await?;
                Ok(all[endpoint].as_u64().unwrap_or(0))
            }
        }
    }

    fn failing(&self, on: bool) {
        if let Calls::Rust(jobs) = &self.calls {
            jobs.failing.store(on, SeqCst);
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Result<Answer> {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let (status, headers) = (response.status(), response.headers().clone());
        let body = response.bytes().await?.to_vec();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Result<Answer> {
        self.send(reqwest::Method::GET, path, headers, None).await
    }
}

/// An answer, read whole.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn x_cache(&self) -> &str {
        self.headers
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    fn cache_status(&self) -> &str {
        self.headers
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| String::from_utf8_lossy(&self.body).into_owned())
    }
}

const ALICE: (&str, &str) = ("x-user", "alice");
const BOB: (&str, &str) = ("x-user", "bob");

fn unchanged(_: &mut HttpConfig) {}

async fn health_is_served_from_the_cache(api: Api) -> Result<()> {
    let first = api.get("/health", &[]).await?;
    assert_eq!((first.status, first.x_cache()), (StatusCode::OK, "MISS"));
    for _ in 0..3 {
        let again = api.get("/health", &[]).await?;
        assert_eq!(again.x_cache(), "HIT", "{}", again.cache_status());
        assert!(
            again.cache_status().starts_with("strata; hit; ttl="),
            "{}",
            again.cache_status()
        );
        assert!(again.headers.contains_key("age"));
        assert_eq!(again.header("cache-control"), "public, max-age=30");
        assert_eq!(again.body, first.body);
    }
    assert_eq!(api.calls("health").await?, 1);
    Ok(())
}

async fn a_job_update_invalidates_the_job_and_the_list(api: Api) -> Result<()> {
    for path in ["/jobs", "/jobs/42", "/jobs/7"] {
        assert_eq!(api.get(path, &[ALICE]).await?.x_cache(), "MISS", "{path}");
        assert_eq!(api.get(path, &[ALICE]).await?.x_cache(), "HIT", "{path}");
    }
    let (list, job) = (api.calls("list").await?, api.calls("job").await?);
    assert_eq!((list, job), (1, 2));
    let put = api
        .send(
            reqwest::Method::PUT,
            "/jobs/42",
            &[ALICE],
            Some(json!({"status": "done"})),
        )
        .await?;
    assert_eq!(put.status, StatusCode::OK);
    let after = api.get("/jobs/42", &[ALICE]).await?;
    assert_eq!(after.x_cache(), "MISS");
    assert_eq!(after.json()?["status"], "done");
    let listed = api.get("/jobs", &[ALICE]).await?;
    assert_eq!(listed.x_cache(), "MISS");
    let listed = listed.json()?;
    let done = listed
        .as_array()
        .context("a list")?
        .iter()
        .find(|j| j["id"] == 42)
        .context("job 42")?;
    assert_eq!(done["status"], "done");
    assert_eq!(api.get("/jobs/7", &[ALICE]).await?.x_cache(), "HIT");
    assert_eq!((api.calls("list").await?, api.calls("job").await?), (2, 3));
    Ok(())
}

async fn users_never_see_each_others_jobs(api: Api) -> Result<()> {
    let owners = |answer: &Answer| -> Result<Vec<String>> {
        let list = answer.json()?;
        Ok(list
            .as_array()
            .context("a list")?
            .iter()
            .map(|j| j["owner"].as_str().unwrap_or("").to_string())
            .collect())
    };
    let alice = api.get("/jobs", &[ALICE]).await?;
    assert!(owners(&alice)?.iter().all(|o| o == "alice"));
    let bob = api.get("/jobs", &[BOB]).await?;
    assert_eq!(bob.x_cache(), "MISS", "bob must not get alice's entry");
    assert!(owners(&bob)?.iter().all(|o| o == "bob"));
    let alice_again = api.get("/jobs", &[ALICE]).await?;
    assert_eq!(alice_again.x_cache(), "HIT");
    assert!(owners(&alice_again)?.iter().all(|o| o == "alice"));
    let bob_again = api.get("/jobs", &[BOB]).await?;
    assert_eq!(bob_again.x_cache(), "HIT");
    assert!(owners(&bob_again)?.iter().all(|o| o == "bob"));
    let nobody = api.get("/jobs", &[]).await?;
    assert_eq!(
        (nobody.status, nobody.x_cache()),
        (StatusCode::UNAUTHORIZED, "BYPASS")
    );
    Ok(())
}

async fn if_none_match_gets_a_304(api: Api) -> Result<()> {
    let first = api.get("/jobs/42", &[ALICE]).await?;
    let etag = first.header("etag").to_string();
    assert!(etag.starts_with('"'), "a strong tag: {etag}");
    let hit = api
        .get("/jobs/42", &[ALICE, ("if-none-match", &etag)])
        .await?;
    assert_eq!(
        (hit.status, hit.x_cache()),
        (StatusCode::NOT_MODIFIED, "HIT")
    );
    assert!(hit.body.is_empty());
    assert_eq!(hit.header("etag"), etag);
    let other = api
        .get(
            "/jobs/42",
            &[ALICE, ("if-none-match", "\"something-else\"")],
        )
        .await?;
    assert_eq!(other.status, StatusCode::OK);
    // Through to the service (no-cache), the same body: still a 304.
    let forwarded = api
        .get(
            "/jobs/42",
            &[
                ALICE,
                ("if-none-match", &etag),
                ("cache-control", "no-cache"),
            ],
        )
        .await?;
    assert_eq!(
        (forwarded.status, forwarded.x_cache()),
        (StatusCode::NOT_MODIFIED, "MISS")
    );
    assert!(
        forwarded.cache_status().contains("fwd=request"),
        "{}",
        forwarded.cache_status()
    );
    assert_eq!(api.calls("job").await?, 2);
    Ok(())
}

fn short_job_ttl(config: &mut HttpConfig) {
    ttl(config, "/jobs/{job_id}", Duration::from_millis(1500));
    ttl(config, "/version", Duration::from_millis(1500));
}

async fn stale_answers_serve_on_errors_and_refresh_once(api: Api) -> Result<()> {
    // stale-if-error.
    let fresh = api.get("/jobs/3", &[ALICE]).await?;
    assert_eq!(fresh.x_cache(), "MISS");
    tokio::time::sleep(Duration::from_millis(1700)).await;
    api.failing(true);
    let stale = api.get("/jobs/3", &[ALICE]).await?;
    assert_eq!(
        (stale.status, stale.x_cache()),
        (StatusCode::OK, "STALE"),
        "{}",
        stale.cache_status()
    );
    assert!(
        stale.cache_status().contains("fwd-status=500"),
        "{}",
        stale.cache_status()
    );
    assert!(
        stale.cache_status().contains("detail=stale-if-error"),
        "{}",
        stale.cache_status()
    );
    assert_eq!(stale.body, fresh.body);
    let never_cached = api.get("/jobs/4", &[ALICE]).await?;
    assert_eq!(never_cached.status, StatusCode::INTERNAL_SERVER_ERROR);
    api.failing(false);
    // stale-while-revalidate: /version's answers carry the call count they were made at.
    let first = api.get("/version", &[]).await?;
    assert_eq!(first.json()?["build"], 1);
    tokio::time::sleep(Duration::from_millis(1700)).await;
    for _ in 0..5 {
        let stale = api.get("/version", &[]).await?;
        assert!(
            matches!(stale.x_cache(), "STALE" | "HIT"),
            "{}",
            stale.cache_status()
        );
        if stale.x_cache() == "STALE" {
            assert_eq!(stale.json()?["build"], 1);
            assert!(stale.cache_status().contains("stale-while-revalidate"));
        }
    }
    for _ in 0..50 {
        if api.calls("version").await? >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(api.calls("version").await?, 2, "refreshed once");
    let refreshed = api.get("/version", &[]).await?;
    assert_eq!(refreshed.x_cache(), "HIT");
    assert_eq!(refreshed.json()?["build"], 2);
    Ok(())
}

async fn no_store_and_set_cookie_are_never_stored(api: Api) -> Result<()> {
    for n in 1..=2 {
        let greeting = api.get("/greeting", &[]).await?;
        assert_eq!(greeting.x_cache(), "MISS");
        assert!(
            greeting.cache_status().contains("detail=set-cookie"),
            "{}",
            greeting.cache_status()
        );
        assert_eq!(
            greeting.header("set-cookie"),
            format!("visitor={n}; HttpOnly")
        );
        let stats = api.get("/stats", &[]).await?;
        assert_eq!(stats.x_cache(), "MISS");
        assert!(
            stats.cache_status().contains("detail=no-store"),
            "{}",
            stats.cache_status()
        );
        assert_eq!(stats.header("cache-control"), "no-store");
    }
    assert_eq!(
        (api.calls("greeting").await?, api.calls("stats").await?),
        (2, 2)
    );
    Ok(())
}

async fn head_works(api: Api) -> Result<()> {
    let head = api
        .send(reqwest::Method::HEAD, "/health", &[], None)
        .await?;
    assert_eq!((head.status, head.x_cache()), (StatusCode::OK, "MISS"));
    assert!(head.body.is_empty());
    let get = api.get("/health", &[]).await?;
    assert_eq!(
        get.x_cache(),
        "HIT",
        "HEAD's call stored what GET is served"
    );
    assert_eq!(head.header("content-length"), get.body.len().to_string());
    let head = api
        .send(reqwest::Method::HEAD, "/health", &[], None)
        .await?;
    assert_eq!(head.x_cache(), "HIT");
    assert_eq!(head.header("etag"), get.header("etag"));
    assert_eq!(api.calls("health").await?, 1);
    Ok(())
}

fn gunzip(body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body).read_to_end(&mut out)?;
    Ok(out)
}

async fn gzip_and_identity_variants_never_mix(api: Api) -> Result<()> {
    let gzip = [ALICE, ("accept-encoding", "gzip")];
    let plain = [ALICE];
    let zstd = [ALICE, ("accept-encoding", "zstd")];
    let mut bodies = Vec::new();
    for (round, headers) in [&gzip[..], &plain[..], &gzip[..], &plain[..], &zstd[..]]
        .into_iter()
        .enumerate()
    {
        let answer = api.get("/jobs", headers).await?;
        assert_eq!(answer.x_cache(), if round == 0 { "MISS" } else { "HIT" });
        assert!(
            answer.header("vary").contains("accept-encoding"),
            "{}",
            answer.header("vary")
        );
        let body = match headers.len() {
            1 => {
                assert_eq!(answer.header("content-encoding"), "");
                answer.body.clone()
            }
            _ if headers[1].1 == "gzip" => {
                assert_eq!(answer.header("content-encoding"), "gzip");
                assert!(answer.header("etag").ends_with("-gzip\""));
                gunzip(&answer.body)?
            }
            _ => {
                assert_eq!(answer.header("content-encoding"), "zstd");
                zstd::stream::decode_all(&answer.body[..])?
            }
        };
        assert_eq!(
            body.len().to_string(),
            answer
                .header("content-length")
                .parse::<usize>()
                .map(|_| body.len().to_string())?
        );
        bodies.push(body);
    }
    assert!(bodies[0].len() > 1024, "the list is worth compressing");
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "every variant is the same JSON"
    );
    serde_json::from_slice::<Value>(&bodies[0])?;
    assert_eq!(api.calls("list").await?, 1);
    Ok(())
}

async fn a_hundred_identical_gets_make_one_call(api: Api) -> Result<()> {
    let api = Arc::new(api);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let api = Arc::clone(&api);
        tasks.push(tokio::spawn(async move {
            api.get("/jobs/42/download", &[ALICE]).await
        }));
    }
    let mut bodies = Vec::new();
    for task in tasks {
        let answer = task.await??;
        if answer.status != StatusCode::OK {
            bail!(
                "{}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
        }
        bodies.push(answer.body);
    }
    assert!(bodies.iter().all(|b| b == &bodies[0]));
    assert_eq!(api.calls("download").await?, 1);
    Ok(())
}

macro_rules! both_ways {
    ($($scenario:ident $(with $tweak:ident)?),* $(,)?) => {$(
        mod $scenario {
            #[allow(unused_imports)]
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn through_the_layer() -> Result<()> {
                let tweaks: &[fn(&mut HttpConfig)] = &[unchanged $(, $tweak)?];
                let tweak = tweaks[tweaks.len() - 1];
                super::$scenario(Api::layered(tweak).await?).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn behind_strata_serve() -> Result<()> {
                let tweaks: &[fn(&mut HttpConfig)] = &[unchanged $(, $tweak)?];
                let tweak = tweaks[tweaks.len() - 1];
                super::$scenario(Api::proxied(tweak).await?).await
            }
        }
    )*};
}

both_ways!(
    health_is_served_from_the_cache,
    a_job_update_invalidates_the_job_and_the_list,
    users_never_see_each_others_jobs,
    if_none_match_gets_a_304,
    stale_answers_serve_on_errors_and_refresh_once with short_job_ttl,
    no_store_and_set_cookie_are_never_stored,
    head_works,
    gzip_and_identity_variants_never_mix,
    a_hundred_identical_gets_make_one_call,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_service_behind_strata_serve_is_invalidated_and_isolated() -> Result<()> {
    a_job_update_invalidates_the_job_and_the_list(Api::python(unchanged).await?).await?;
    users_never_see_each_others_jobs(Api::python(unchanged).await?).await
}

fn anonymous_health(config: &mut HttpConfig) {
    for route in &mut config.routes {
        if route.path == "/health" {
            route.scope = strata_http::api::RouteScope::Anonymous;
        }
    }
}

async fn authorization_passes_anonymous_routes_by(api: Api) -> Result<()> {
    assert_eq!(api.get("/health", &[]).await?.x_cache(), "MISS");
    assert_eq!(api.get("/health", &[]).await?.x_cache(), "HIT");
    let with_credentials = api
        .get("/health", &[("authorization", "Bearer secret")])
        .await?;
    assert_eq!(with_credentials.x_cache(), "BYPASS");
    assert!(
        with_credentials
            .cache_status()
            .contains("detail=authorization")
    );
    assert_eq!(api.calls("health").await?, 2);
    Ok(())
}

async fn request_directives_are_honoured(api: Api) -> Result<()> {
    // An explicitly public route serves requests with credentials.
    assert_eq!(api.get("/health", &[]).await?.x_cache(), "MISS");
    let with_credentials = api
        .get("/health", &[("authorization", "Bearer secret")])
        .await?;
    assert_eq!(with_credentials.x_cache(), "HIT");
    // only-if-cached: a 504 without a call, or the entry.
    let nothing = api
        .get("/jobs/9", &[ALICE, ("cache-control", "only-if-cached")])
        .await?;
    assert_eq!(
        (nothing.status, nothing.x_cache()),
        (StatusCode::GATEWAY_TIMEOUT, "MISS")
    );
    assert_eq!(api.calls("job").await?, 0);
    api.get("/jobs/9", &[ALICE]).await?;
    let cached = api
        .get("/jobs/9", &[ALICE, ("cache-control", "only-if-cached")])
        .await?;
    assert_eq!(cached.x_cache(), "HIT");
    // max-age=0: too old for this request, called again.
    let fresher = api
        .get("/jobs/9", &[ALICE, ("cache-control", "max-age=0")])
        .await?;
    assert_eq!(fresher.x_cache(), "MISS");
    assert!(
        fresher.cache_status().contains("fwd=stale"),
        "{}",
        fresher.cache_status()
    );
    assert_eq!(api.calls("job").await?, 2);
    // no-store: passed by, and nothing stored.
    let by = api
        .get("/jobs/10", &[ALICE, ("cache-control", "no-store")])
        .await?;
    assert_eq!(by.x_cache(), "BYPASS");
    assert_eq!(api.get("/jobs/10", &[ALICE]).await?.x_cache(), "MISS");
    // If-Modified-Since, on an answer without Last-Modified: nothing to compare, a 200.
    let since = api
        .get(
            "/jobs/10",
            &[
                ALICE,
                ("if-modified-since", "Sat, 05 Dec 2026 00:00:00 GMT"),
            ],
        )
        .await?;
    assert_eq!(since.status, StatusCode::OK);
    Ok(())
}

/// The admin API's JSON answer to a POST.
async fn admin_post(api: &Api, path: &str, body: Value) -> Result<Value> {
    let response = api
        .client
        .post(format!("{}{path}", api.base))
        .json(&body)
        .send()
        .await?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        bail!("{path}: {status} {text}");
    }
    Ok(serde_json::from_str(&text)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_from_the_service_and_from_code_invalidate() -> Result<()> {
    let dir = TempDir::new()?;
    let config = http(unchanged);
    let api = ApiCache::new(
        cache_in(dir.path()).await?,
        config.policy()?,
        config.limits(),
        [9; 32],
    );
    let jobs = Arc::new(Jobs::default());
    let (addr, _task) = serve_axum(jobs_api::app(Arc::clone(&jobs)).layer(api.layer())).await?;
    let client = reqwest::Client::new();
    let get = |user: &'static str, path: &'static str| {
        let client = client.clone();
        async move {
            let r = client
                .get(format!("http://{addr}{path}"))
                .header("x-user", user)
                .send()
                .await?;
            anyhow::Ok(
                r.headers()
                    .get("x-cache")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string(),
            )
        }
    };
    for user in ["alice", "bob"] {
        assert_eq!(get(user, "/jobs/1").await?, "MISS");
        assert_eq!(get(user, "/jobs/1").await?, "HIT");
    }
    // The service tagged each answer `owner:{user}` (X-Strata-Tags), and asks from its own code.
    api.invalidate_tags(["owner:alice"]).await?;
    assert_eq!(get("alice", "/jobs/1").await?, "MISS");
    assert_eq!(get("bob", "/jobs/1").await?, "HIT");
    // A route's tag, from the engine as `strata invalidate --tag` does it.
    api.cache()
        .invalidate(&strata_core::Selector::Tag("jobs:1".into()))
        .await?;
    assert_eq!(get("bob", "/jobs/1").await?, "MISS");
    assert_eq!(jobs.calls("job"), 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_urls_metrics_and_the_route_report() -> Result<()> {
    fn warm(config: &mut HttpConfig) {
        config.warm = vec![
            strata_http::api::WarmConfig {
                url: "/health".into(),
                headers: Default::default(),
            },
            strata_http::api::WarmConfig {
                url: "/jobs/42".into(),
                headers: [("x-user".to_string(), "alice".to_string())].into(),
            },
        ];
    }
    let api = Api::proxied(warm).await?;
    for _ in 0..100 {
        if api.calls("health").await? == 1 && api.calls("job").await? == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Warmed at start: hits without a call.
    assert_eq!(api.get("/health", &[]).await?.x_cache(), "HIT");
    assert_eq!(api.get("/jobs/42", &[ALICE]).await?.x_cache(), "HIT");
    assert_eq!(
        (api.calls("health").await?, api.calls("job").await?),
        (1, 1)
    );
    // The admin API takes URLs.
    let warmed = admin_post(
        &api,
        "/admin/warm",
        json!({"urls": ["/version", {"url": "/jobs", "headers": {"x-user": "bob"}}]}),
    )
    .await?;
    assert_eq!(warmed["stored"], 2, "{warmed}");
    assert_eq!(api.get("/version", &[]).await?.x_cache(), "HIT");
    assert_eq!(api.get("/jobs", &[BOB]).await?.x_cache(), "HIT");
    // ... and invalidates these entries as it does LLM ones.
    admin_post(&api, "/admin/invalidate", json!({"tag": "jobs:list"})).await?;
    assert_eq!(api.get("/jobs", &[BOB]).await?.x_cache(), "MISS");
    let metrics = api
        .client
        .get(format!("{}/metrics", api.base))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains(r#"strata_http_requests_total{route="/health",result="hit"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"strata_http_served_bytes_total{route="/health"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"strata_http_saved_seconds_total{route="/jobs/{job_id}"}"#),
        "{metrics}"
    );
    let report: Value = api
        .client
        .get(format!("{}/admin/report?since=1h&by=route", api.base))
        .send()
        .await?
        .json()
        .await?;
    let groups = report["groups"].as_array().context("groups")?;
    let health = groups
        .iter()
        .find(|g| g["group"] == "/health")
        .with_context(|| format!("{report}"))?;
    assert!(health["hits"]["l1"].as_u64() >= Some(1), "{report}");
    assert!(
        groups
            .iter()
            .all(|g| g["group"].as_str().is_some_and(|r| r.starts_with('/')))
    );
    Ok(())
}

both_ways!(
    authorization_passes_anonymous_routes_by with anonymous_health,
    request_directives_are_honoured,
);
