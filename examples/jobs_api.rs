//! A small jobs API (axum, an in-memory store, a count of handler calls), served bare or
//! wrapped in strata's response-cache layer with the policy of `examples/jobs_api.toml`.
//!
//! ```text
//! cargo run --example jobs_api -- --cached            # the layer, in process, on :8000
//! cargo run --example jobs_api                        # bare on :8000, then:
//! cargo run --release -- serve --config examples/jobs_api.toml --listen 127.0.0.1:8080
//! curl -i -H 'x-user: alice' http://127.0.0.1:8080/jobs/42   # MISS, then HIT
//! ```
//!
//! The tests include this file and run the same app both ways.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

/// A job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// Its id.
    pub id: u64,
    /// Who owns it.
    pub owner: String,
    /// Its state.
    pub status: String,
    /// What it does.
    pub description: String,
}

/// The service's state: jobs per user, handler calls per endpoint, and a switch that makes
/// every handler answer 500.
#[derive(Debug, Default)]
pub struct Jobs {
    store: Mutex<HashMap<String, BTreeMap<u64, Job>>>,
    calls: Mutex<BTreeMap<&'static str, u64>>,
    total: AtomicU64,
    /// While set, every handler answers 500.
    pub failing: AtomicBool,
}

impl Jobs {
    /// Handler calls so far, of one endpoint.
    pub fn calls(&self, endpoint: &str) -> u64 {
        self.calls
            .lock()
            .map(|c| c.get(endpoint).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Handler calls so far, of every endpoint.
    pub fn total_calls(&self) -> u64 {
        self.total.load(SeqCst)
    }

    fn called(&self, endpoint: &'static str) -> Result<(), Refusal> {
        self.total.fetch_add(1, SeqCst);
        if let Ok(mut calls) = self.calls.lock() {
            *calls.entry(endpoint).or_default() += 1;
        }
        if self.failing.load(SeqCst) {
            return Err(Refusal::Down);
        }
        Ok(())
    }

    /// The user's jobs (twenty to start with).
    fn with_user<T>(&self, user: &str, f: impl FnOnce(&mut BTreeMap<u64, Job>) -> T) -> T {
        let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        let jobs = store.entry(user.to_string()).or_insert_with(|| {
            (1..=20)
                .chain([42])
                .map(|id| {
                    let job = Job {
                        id,
                        owner: user.to_string(),
                        status: "queued".into(),
                        description: format!(
                            "Summarize the quarterly filings of portfolio {id} for {user}"
                        ),
                    };
                    (id, job)
                })
                .collect()
        });
        f(jobs)
    }
}

/// Why a handler answers with an error.
#[derive(Debug)]
pub enum Refusal {
    /// The failure switch is on: 500.
    Down,
    /// No `x-user`: 401.
    NoUser,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Down => {
                (StatusCode::INTERNAL_SERVER_ERROR, "the jobs store is down").into_response()
            }
            Refusal::NoUser => (StatusCode::UNAUTHORIZED, "x-user is required").into_response(),
        }
    }
}

fn user(headers: &HeaderMap) -> Result<String, Refusal> {
    headers
        .get("x-user")
        .and_then(|v| v.to_str().ok())
        .filter(|u| !u.is_empty())
        .map(String::from)
        .ok_or(Refusal::NoUser)
}

type Shared = State<Arc<Jobs>>;

async fn health(State(jobs): Shared) -> Response {
    if let Err(r) = jobs.called("health") {
        return r.into_response();
    }
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn version(State(jobs): Shared) -> Response {
    if let Err(r) = jobs.called("version") {
        return r.into_response();
    }
    let calls = jobs.calls("version");
    axum::Json(serde_json::json!({"version": "1.4.2", "build": calls})).into_response()
}

async fn list(State(jobs): Shared, headers: HeaderMap) -> Response {
    if let Err(r) = jobs.called("list") {
        return r.into_response();
    }
    let user = match user(&headers) {
        Ok(u) => u,
        Err(r) => return r.into_response(),
    };
    let list: Vec<Job> = jobs.with_user(&user, |j| j.values().cloned().collect());
    axum::Json(list).into_response()
}

async fn create(
    State(jobs): Shared,
    headers: HeaderMap,
    axum::Json(job): axum::Json<Job>,
) -> Response {
    if let Err(r) = jobs.called("create") {
        return r.into_response();
    }
    let user = match user(&headers) {
        Ok(u) => u,
        Err(r) => return r.into_response(),
    };
    let job = Job {
        owner: user.clone(),
        ..job
    };
    jobs.with_user(&user, |j| j.insert(job.id, job.clone()));
    (StatusCode::CREATED, axum::Json(job)).into_response()
}

async fn one(State(jobs): Shared, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Err(r) = jobs.called("job") {
        return r.into_response();
    }
    let user = match user(&headers) {
        Ok(u) => u,
        Err(r) => return r.into_response(),
    };
    match jobs.with_user(&user, |j| j.get(&id).cloned()) {
        // The service tags its own answer too: everything of one owner goes at once.
        Some(job) => (
            [("x-strata-tags", format!("owner:{user}"))],
            axum::Json(job),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such job").into_response(),
    }
}

#[derive(Deserialize)]
struct Update {
    status: String,
}

async fn update(
    State(jobs): Shared,
    headers: HeaderMap,
    Path(id): Path<u64>,
    axum::Json(update): axum::Json<Update>,
) -> Response {
    if let Err(r) = jobs.called("update") {
        return r.into_response();
    }
    let user = match user(&headers) {
        Ok(u) => u,
        Err(r) => return r.into_response(),
    };
    let updated = jobs.with_user(&user, |j| {
        j.get_mut(&id).map(|job| {
            job.status = update.status;
            job.clone()
        })
    });
    match updated {
        Some(job) => axum::Json(job).into_response(),
        None => (StatusCode::NOT_FOUND, "no such job").into_response(),
    }
}

async fn download(State(jobs): Shared, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Err(r) = jobs.called("download") {
        return r.into_response();
    }
    let user = match user(&headers) {
        Ok(u) => u,
        Err(r) => return r.into_response(),
    };
    // Building the report takes a while: what coalescing is for.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = format!(
        "job,owner,line\n{}",
        (0..200)
            .map(|n| format!("{id},{user},{n}\n"))
            .collect::<String>()
    );
    ([(header::CONTENT_TYPE, "text/csv")], body).into_response()
}

async fn greeting(State(jobs): Shared) -> Response {
    if let Err(r) = jobs.called("greeting") {
        return r.into_response();
    }
    let n = jobs.calls("greeting");
    (
        [(header::SET_COOKIE, format!("visitor={n}; HttpOnly"))],
        format!("hello, visitor {n}"),
    )
        .into_response()
}

async fn stats(State(jobs): Shared) -> Response {
    if let Err(r) = jobs.called("stats") {
        return r.into_response();
    }
    let n = jobs.total_calls();
    ([(header::CACHE_CONTROL, "no-store")], format!("{n} calls")).into_response()
}

/// The app: every endpoint over one state.
pub fn app(jobs: Arc<Jobs>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/version", get(version))
        .route("/jobs", get(list).post(create))
        .route("/jobs/{job_id}", get(one).put(update).patch(update))
        .route("/jobs/{job_id}/download", get(download))
        .route("/greeting", get(greeting))
        .route("/stats", get(stats))
        .with_state(jobs)
}

/// The `[http]` section of `examples/jobs_api.toml`.
pub fn http_config() -> strata_http::api::HttpConfig {
    #[derive(Deserialize)]
    struct File {
        http: strata_http::api::HttpConfig,
    }
    let text = include_str!("jobs_api.toml");
    match toml::from_str::<File>(text) {
        Ok(file) => file.http,
        Err(e) => panic!("examples/jobs_api.toml: {e}"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cached = args.iter().any(|a| a == "--cached");
    let listen: SocketAddr = args
        .iter()
        .position(|a| a == "--listen")
        .and_then(|i| args.get(i + 1))
        .map_or("127.0.0.1:8000", String::as_str)
        .parse()?;
    let jobs = Arc::new(Jobs::default());
    let mut app = app(Arc::clone(&jobs));
    if cached {
        let config = strata::Config::load(None)?;
        let cache = config.open_cache().await?;
        let http = http_config();
        let api =
            strata_http::api::ApiCache::new(cache, http.policy()?, http.limits(), rand::random());
        app = app.layer(api.layer());
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!(
        "jobs API on http://{} ({})",
        listener.local_addr()?,
        if cached { "cached by strata" } else { "bare" }
    );
    axum::serve(listener, app).await?;
    Ok(())
}
