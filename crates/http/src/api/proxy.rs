//! Reverse-proxy routes: `strata serve` in front of services in any language. Each
//! `[[http.upstreams]]` entry is a [`Forward`] service (a pooled reqwest client) wrapped in the
//! same [`CacheLayer`](super::CacheLayer) a Rust service would use, so the policy is applied
//! once, by one piece of code.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, Response, StatusCode, header};
use futures::TryStreamExt;
use tower::{Layer, Service, ServiceExt};

use super::config::{HttpConfig, WarmConfig};
use super::{ApiCache, CacheService};
use crate::config::ServerConfig;
use crate::error::HttpError;
use crate::gateway::upstream::{HOP_BY_HOP, error_chain, forwarded};

/// A service that forwards every request to a base URL. Never fails: an upstream that cannot
/// be reached is a 502 (504 past the first-byte timeout), which `stale_if_error` can answer.
#[derive(Debug, Clone)]
pub struct Forward {
    client: reqwest::Client,
    base: Arc<str>,
    prefix: Arc<str>,
    first_byte: Duration,
}

impl Forward {
    /// Forwards paths under `prefix` to `base`.
    pub fn new(
        client: reqwest::Client,
        base: &str,
        prefix: &str,
        first_byte: Duration,
    ) -> Result<Forward, HttpError> {
        let parsed = reqwest::Url::parse(base)
            .map_err(|e| HttpError::Config(format!("[[http.upstreams]] base `{base}`: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(HttpError::Config(format!(
                "[[http.upstreams]] base `{base}`: not an http(s) URL"
            )));
        }
        Ok(Forward {
            client,
            base: base.trim_end_matches('/').into(),
            prefix: normalize_prefix(prefix)?.into(),
            first_byte,
        })
    }

    fn url(&self, path: &str, query: Option<&str>) -> String {
        let rest = path.strip_prefix(&*self.prefix).unwrap_or(path);
        match query {
            Some(q) => format!("{}{rest}?{q}", self.base),
            None => format!("{}{rest}", self.base),
        }
    }
}

/// A prefix without its trailing `/` (`/` itself becomes empty: everything).
fn normalize_prefix(prefix: &str) -> Result<String, HttpError> {
    if !prefix.starts_with('/') {
        return Err(HttpError::Config(format!(
            "[[http.upstreams]] prefix `{prefix}`: must start with `/`"
        )));
    }
    Ok(prefix.trim_end_matches('/').to_string())
}

fn failure(status: StatusCode, message: String) -> Response<Body> {
    let mut response = Response::new(Body::from(message));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

impl Service<Request<Body>> for Forward {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let url = this.url(parts.uri.path(), parts.uri.query());
            let headers = forwarded(&parts.headers, false);
            let mut call = this
                .client
                .request(parts.method.clone(), &url)
                .headers(headers);
            if parts.method != Method::GET && parts.method != Method::HEAD {
                // The body streams on; its length, when the client said it, goes with it
                // (servers that read no chunked bodies need it).
                if let Some(length) = parts.headers.get(header::CONTENT_LENGTH) {
                    call = call.header(header::CONTENT_LENGTH, length.clone());
                }
                call = call.body(reqwest::Body::wrap_stream(body.into_data_stream()));
            }
            let answer = match tokio::time::timeout(this.first_byte, call.send()).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => {
                    tracing::warn!(url = %url, error = %error_chain(&e), "the service could not be reached");
                    return Ok(failure(
                        StatusCode::BAD_GATEWAY,
                        format!("the service could not be reached: {}", error_chain(&e)),
                    ));
                }
                Err(_) => {
                    return Ok(failure(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the service did not answer in time".into(),
                    ));
                }
            };
            let status = answer.status();
            let mut headers = axum::http::HeaderMap::with_capacity(answer.headers().len());
            for (name, value) in answer.headers() {
                if !HOP_BY_HOP.contains(&name.as_str()) {
                    headers.append(name.clone(), value.clone());
                }
            }
            let mut response = Response::new(Body::from_stream(
                answer.bytes_stream().map_err(axum::Error::new),
            ));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            Ok(response)
        })
    }
}

/// The reverse proxy of `strata serve`: its upstreams, each behind the response cache, and
/// the warm list.
#[derive(Debug, Clone)]
pub struct Proxy {
    api: ApiCache,
    upstreams: Arc<Vec<(String, CacheService<Forward>)>>,
    warm: Arc<Vec<WarmConfig>>,
    warm_interval: Duration,
}

/// What a warm pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct WarmOutcome {
    /// URLs fetched and stored.
    pub stored: usize,
    /// URLs fetched whose answers were not stored (a policy's rule, or no route).
    pub not_stored: usize,
    /// URLs that failed (no upstream, an error answer).
    pub failed: usize,
}

impl Proxy {
    /// The proxy of a configuration over `api`.
    pub fn new(
        api: ApiCache,
        server: &ServerConfig,
        http: &HttpConfig,
    ) -> Result<Proxy, HttpError> {
        let client = reqwest::Client::builder()
            .connect_timeout(server.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| HttpError::Config(format!("upstream client: {e}")))?;
        let mut upstreams = Vec::new();
        for upstream in &http.upstreams {
            let forward = Forward::new(
                client.clone(),
                &upstream.base,
                &upstream.prefix,
                server.first_byte_timeout,
            )?;
            let prefix = normalize_prefix(&upstream.prefix)?;
            if prefix == "/v1"
                || prefix.starts_with("/v1/")
                || prefix.starts_with("/admin")
                || prefix == "/metrics"
            {
                return Err(HttpError::Config(format!(
                    "[[http.upstreams]] prefix `{}`: `/v1/`, `/admin/` and `/metrics` are the gateway's",
                    upstream.prefix
                )));
            }
            upstreams.push((prefix, api.layer().layer(forward)));
        }
        // The longest prefix first.
        upstreams.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Ok(Proxy {
            api,
            upstreams: Arc::new(upstreams),
            warm: Arc::new(http.warm.clone()),
            warm_interval: http.warm_interval,
        })
    }

    /// The response cache.
    pub fn api(&self) -> &ApiCache {
        &self.api
    }

    /// Whether any upstream is configured.
    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// Serves one request: through the upstream whose prefix it falls under, else 404.
    pub async fn serve(&self, request: Request<Body>) -> Response<Body> {
        let path = request.uri().path();
        if crate::gateway::has_dot_segment(path) {
            return failure(
                StatusCode::BAD_REQUEST,
                "a path with `.` or `..` segments".into(),
            );
        }
        let Some((_, service)) = self.upstreams.iter().find(|(prefix, _)| {
            prefix.is_empty()
                || path == prefix
                || path
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        }) else {
            return failure(
                StatusCode::NOT_FOUND,
                format!("no upstream serves `{path}`"),
            );
        };
        match service.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }

    /// Fetches `urls` through the cache (`refresh`: with `Cache-Control: no-cache`, so that a
    /// fresh answer replaces what is stored).
    pub async fn warm(&self, urls: &[WarmConfig], refresh: bool) -> WarmOutcome {
        let mut outcome = WarmOutcome::default();
        for item in urls {
            let mut request = Request::new(Body::empty());
            match item.url.parse() {
                Ok(uri) => *request.uri_mut() = uri,
                Err(e) => {
                    tracing::warn!(url = %item.url, error = %e, "a warm URL is not a path");
                    outcome.failed += 1;
                    continue;
                }
            }
            for (name, value) in &item.headers {
                if let (Ok(name), Ok(value)) = (
                    header::HeaderName::try_from(name.as_str()),
                    HeaderValue::try_from(value.as_str()),
                ) {
                    request.headers_mut().insert(name, value);
                }
            }
            if refresh {
                request
                    .headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            }
            let response = self.serve(request).await;
            let stored = response
                .headers()
                .get("cache-status")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("; stored") || v.contains("; hit"));
            if !response.status().is_success() && !stored {
                outcome.failed += 1;
            } else if stored {
                outcome.stored += 1;
            } else {
                outcome.not_stored += 1;
            }
        }
        outcome
    }

    /// Warms the `[[http.warm]]` URLs now, then every `warm_interval` until `closing` is set.
    pub fn spawn_warmer(&self, mut closing: tokio::sync::watch::Receiver<bool>) {
        if self.warm.is_empty() {
            return;
        }
        let proxy = self.clone();
        tokio::spawn(async move {
            let outcome = proxy.warm(&proxy.warm, false).await;
            tracing::info!(?outcome, "warmed the [[http.warm]] URLs");
            if proxy.warm_interval.is_zero() {
                return;
            }
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(proxy.warm_interval) => {}
                    _ = closing.wait_for(|c| *c) => return,
                }
                let outcome = proxy.warm(&proxy.warm, true).await;
                tracing::info!(?outcome, "warmed the [[http.warm]] URLs again");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_replaced_by_the_bases_path() {
        let client = reqwest::Client::new();
        let f = Forward::new(
            client.clone(),
            "http://127.0.0.1:9/v2/",
            "/api",
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(
            f.url("/api/jobs/7", Some("a=1")),
            "http://127.0.0.1:9/v2/jobs/7?a=1"
        );
        let root = Forward::new(client, "http://127.0.0.1:9", "/", Duration::from_secs(1)).unwrap();
        assert_eq!(root.url("/jobs", None), "http://127.0.0.1:9/jobs");
        assert!(normalize_prefix("api").is_err());
    }
}
