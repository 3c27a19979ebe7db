//! The tower layer: any `Service<Request<Body>>` (an axum `Router`, a hyper service) answered
//! through an [`ApiCache`].
//!
//! ```no_run
//! # async fn demo(cache: strata_tiers::TieredCache) {
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//! use strata_http::api::{ApiCache, Limits, Policy, RouteScope};
//! let policy = Policy::builder()
//!     .route("/health", Duration::from_secs(30), |r| r.scope(RouteScope::Public))
//!     .build()
//!     .unwrap();
//! let api = ApiCache::new(cache, policy, Limits::default(), rand::random());
//! let app: Router = Router::new()
//!     .route("/health", get(|| async { "ok" }))
//!     .layer(api.layer());
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{Request, Response};
use bytes::Bytes;
use tower::{Layer, Service};

use super::ApiCache;
use super::handle::BoxError;

/// Wraps a service in the response cache.
#[derive(Debug, Clone)]
pub struct CacheLayer {
    cache: ApiCache,
}

impl CacheLayer {
    /// The layer of a cache.
    pub fn new(cache: ApiCache) -> CacheLayer {
        CacheLayer { cache }
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = CacheService<S>;

    fn layer(&self, inner: S) -> CacheService<S> {
        CacheService {
            inner,
            cache: self.cache.clone(),
        }
    }
}

/// A service behind the response cache. Its errors are the inner service's: a request whose
/// call fails is answered stale where `stale_if_error` allows, else gets the error.
#[derive(Debug, Clone)]
pub struct CacheService<S> {
    inner: S,
    cache: ApiCache,
}

impl<S> CacheService<S> {
    /// The cache in front of the service.
    pub fn cache(&self) -> &ApiCache {
        &self.cache
    }
}

impl<S, B, RB> Service<Request<B>> for CacheService<S>
where
    S: Service<Request<Body>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The service made ready is the one called; its clone stays for the next request.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let cache = self.cache.clone();
        Box::pin(async move { cache.handle(inner, request.map(Body::new)).await })
    }
}
