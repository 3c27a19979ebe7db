//! `[http]`: the response cache's routes, mutation rules, upstreams and warming, as
//! configured for `strata serve`.

use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use super::Limits;
use super::policy::{InvalidateConfig, Policy, RouteConfig};
use crate::error::HttpError;

/// The `[http]` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Cached routes (`[[http.routes]]`), tried in order.
    pub routes: Vec<RouteConfig>,
    /// Mutation rules (`[[http.invalidate]]`).
    pub invalidate: Vec<InvalidateConfig>,
    /// Services behind `strata serve` (`[[http.upstreams]]`), by path prefix.
    pub upstreams: Vec<UpstreamConfig>,
    /// URLs fetched through the cache at start and every `warm_interval` (`[[http.warm]]`).
    pub warm: Vec<WarmConfig>,
    /// How often the warm URLs are fetched again (0: only at start).
    #[serde(with = "humantime_serde")]
    pub warm_interval: Duration,
    /// Bodies at least this long are compressed when the client accepts gzip, br or zstd.
    pub compress_min: ByteSize,
    /// Largest answer stored; a longer one streams through uncached.
    pub body_limit: ByteSize,
    /// Largest `POST` body read for a key (413 past it).
    pub request_body_limit: ByteSize,
    /// Memory for compressed variants of hot answers.
    pub variants_memory: ByteSize,
    /// Bound on one call to a service, its answer read whole.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        let limits = Limits::default();
        HttpConfig {
            routes: Vec::new(),
            invalidate: Vec::new(),
            upstreams: Vec::new(),
            warm: Vec::new(),
            warm_interval: Duration::ZERO,
            compress_min: ByteSize::b(limits.compress_min as u64),
            body_limit: ByteSize::b(limits.body_limit as u64),
            request_body_limit: ByteSize::b(limits.request_body_limit as u64),
            variants_memory: ByteSize::b(limits.variants_memory),
            call_timeout: limits.call_timeout,
        }
    }
}

/// A service behind `strata serve`: requests whose path starts with `prefix` go to `base`
/// (the prefix replaced by the base's path).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The path prefix (`/`, `/api`), matched at segment boundaries.
    pub prefix: String,
    /// The service's base URL (`http://127.0.0.1:8000`, `https://api.example.com/v2`).
    pub base: String,
}

/// A URL to keep warm: a path (and query) fetched through the cache, with headers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WarmConfig {
    /// The path and query (`/jobs?page=1`).
    pub url: String,
    /// Headers sent with it (a user's, for a per-user route).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

impl HttpConfig {
    /// The compiled policy.
    pub fn policy(&self) -> Result<Policy, HttpError> {
        Policy::new(&self.routes, &self.invalidate)
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        let size = |b: ByteSize| usize::try_from(b.as_u64()).unwrap_or(usize::MAX);
        Limits {
            compress_min: size(self.compress_min),
            body_limit: size(self.body_limit),
            request_body_limit: size(self.request_body_limit),
            variants_memory: self.variants_memory.as_u64(),
            call_timeout: self.call_timeout,
        }
    }

    /// Whether anything is configured.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.invalidate.is_empty() && self.upstreams.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_table_reads_from_toml() {
        let config: HttpConfig = toml::from_str(
            r#"
            warm_interval = "5m"
            [[routes]]
            path = "/health"
            ttl = "30s"
            scope = "public"
            [[routes]]
            path = "/jobs/{job_id}"
            ttl = "60s"
            scope = "user"
            user_header = "x-user"
            tags = ["jobs:{job_id}"]
            stale_while_revalidate = "30s"
            stale_if_error = "10m"
            [[invalidate]]
            path = "/jobs/{job_id}"
            methods = ["PUT", "PATCH", "DELETE"]
            tags = ["jobs:list", "jobs:{job_id}"]
            [[upstreams]]
            prefix = "/"
            base = "http://127.0.0.1:8000"
            [[warm]]
            url = "/health"
            "#,
        )
        .unwrap();
        let policy = config.policy().unwrap();
        assert_eq!(policy.routes().len(), 2);
        assert_eq!(policy.routes()[1].keep_for(), Duration::from_secs(660));
        assert_eq!(config.warm_interval, Duration::from_secs(300));
        assert!(
            toml::from_str::<HttpConfig>(
                "[[routes]]\npath = \"/x\"\nttl = \"1s\"\nscoep = \"public\""
            )
            .is_err()
        );
    }
}
