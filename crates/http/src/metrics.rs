//! `GET /metrics`: Prometheus metrics (OpenMetrics text), named by Prometheus conventions.
//!
//! The gateway counts its requests by route and result and times lookups and upstream calls;
//! the engine's own counters (hits by tier, misses, coalesced lookups, savings, tier errors)
//! and the tiers' sizes are read at each scrape, so they cover every lookup the cache made,
//! whoever made it. Every label has a fixed, small set of values.

use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use strata_tiers::TieredCache;

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of a request counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    result: &'static str,
}

/// A route label alone.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

type Histograms = Family<RouteLabel, Histogram, fn() -> Histogram>;

/// The gateway's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    upstream_errors: Family<RouteLabel, Counter>,
    lookup: Histograms,
    upstream: Histograms,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// 50 µs to about 60 s, each bucket 2.5 times the last.
fn seconds() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        50e-6, 2.5, 16,
    ))
}

impl Metrics {
    /// Metrics for a cache; `in_flight` is the gateway's count of requests being answered.
    pub fn new(
        cache: TieredCache,
        in_flight: std::sync::Arc<AtomicI64>,
        api: Option<crate::api::ApiCache>,
    ) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "strata_requests",
            "Requests the gateway answered, by route and what the cache did",
            requests.clone(),
        );
        let upstream_errors = Family::<RouteLabel, Counter>::default();
        registry.register(
            "strata_upstream_errors",
            "Upstream calls that failed: unreachable, timed out, or a stream cut",
            upstream_errors.clone(),
        );
        let lookup: Histograms = Family::new_with_constructor(seconds);
        registry.register(
            "strata_lookup_duration_seconds",
            "Time from a request's arrival to the cache's decision (hit, or the upstream call)",
            lookup.clone(),
        );
        let upstream: Histograms = Family::new_with_constructor(seconds);
        registry.register(
            "strata_upstream_duration_seconds",
            "Duration of upstream calls, to the answer's last byte",
            upstream.clone(),
        );
        // Exported at 0 before the first failure, so that rates and alerts have a series.
        for route in crate::gateway::route::LlmRoute::ALL
            .iter()
            .map(|r| r.label())
            .chain(["passthrough"])
        {
            upstream_errors
                .get_or_create(&RouteLabel { route })
                .inc_by(0);
        }
        registry.register_collector(Box::new(EngineCollector { cache, in_flight }));
        if let Some(api) = api {
            registry.register_collector(Box::new(RouteCollector { api }));
        }
        Metrics {
            registry,
            requests,
            upstream_errors,
            lookup,
            upstream,
        }
    }

    /// Counts a request.
    pub fn request(&self, route: &'static str, result: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { route, result })
            .inc();
    }

    /// Counts a failed upstream call.
    pub fn upstream_error(&self, route: &'static str) {
        self.upstream_errors
            .get_or_create(&RouteLabel { route })
            .inc();
    }

    /// Times a lookup.
    pub fn lookup(&self, route: &'static str, took: Duration) {
        self.lookup
            .get_or_create(&RouteLabel { route })
            .observe(took.as_secs_f64());
    }

    /// Times an upstream call.
    pub fn upstream(&self, route: &'static str, took: Duration) {
        self.upstream
            .get_or_create(&RouteLabel { route })
            .observe(took.as_secs_f64());
    }

    /// The metrics in OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        out
    }
}

/// The engine's counters and the tiers' sizes, read at each scrape.
struct EngineCollector {
    cache: TieredCache,
    in_flight: std::sync::Arc<AtomicI64>,
}

impl std::fmt::Debug for EngineCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineCollector").finish_non_exhaustive()
    }
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let stats = self.cache.stats();
        let plain = [
            (
                "strata_misses",
                "Lookups that called upstream (or found nothing)",
                stats.misses,
            ),
            (
                "strata_coalesced",
                "Lookups that shared an identical request's upstream call in flight",
                stats.hits.coalesced,
            ),
            (
                "strata_saved_tokens",
                "Tokens the served hits would have used, input plus output",
                stats.tokens_saved,
            ),
        ];
        for (name, help, value) in plain {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(metric)?;
        }
        let metric = encoder.encode_descriptor(
            "strata_saved_usd",
            "USD the served hits would have cost upstream",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(stats.cost_saved_usd).encode(metric)?;
        let mut hits = encoder.encode_descriptor(
            "strata_hits",
            "Lookups served from a tier",
            None,
            MetricType::Counter,
        )?;
        for (tier, n) in [
            ("l1", stats.hits.l1),
            ("l2", stats.hits.l2),
            ("l3", stats.hits.l3),
        ] {
            ConstCounter::new(n).encode(hits.encode_family(&[("tier", tier)])?)?;
        }
        let mut errors = encoder.encode_descriptor(
            "strata_tier_errors",
            "Tier failures (each one a counted miss, never a failed request)",
            None,
            MetricType::Counter,
        )?;
        for (tier, n) in [
            ("l1", stats.errors.l1),
            ("l2", stats.errors.l2),
            ("l3", stats.errors.l3),
        ] {
            ConstCounter::new(n).encode(errors.encode_family(&[("tier", tier)])?)?;
        }
        let (memory, disk) = self.cache.usage();
        let l3 = self.cache.l3();
        let gauges = [
            (
                "strata_memory_bytes",
                "Bytes held by the memory tier",
                memory.bytes as i64,
            ),
            (
                "strata_disk_bytes",
                "Bytes held by the disk tier",
                disk.map_or(0, |d| d.bytes as i64),
            ),
            (
                "strata_outbox_depth",
                "Entries waiting for upload to S3",
                l3.map_or(0, |l3| l3.pending() as i64),
            ),
            (
                "strata_s3_breaker_open",
                "1 while the S3 circuit breaker is open (S3 skipped), else 0",
                i64::from(l3.is_some_and(|l3| l3.breaker_open())),
            ),
            (
                "strata_in_flight_requests",
                "Requests the gateway is answering now",
                self.in_flight.load(Relaxed),
            ),
        ];
        for (name, help, value) in gauges {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(metric)?;
        }
        Ok(())
    }
}

/// The response cache's counters per route, read at each scrape.
#[derive(Debug)]
struct RouteCollector {
    api: crate::api::ApiCache,
}

impl Collector for RouteCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let routes = self.api.route_counters();
        let mut requests = encoder.encode_descriptor(
            "strata_http_requests",
            "Requests to cached API routes, by route and what the cache did",
            None,
            MetricType::Counter,
        )?;
        for r in &routes {
            for (result, n) in [
                ("hit", r.hits),
                ("stale", r.stale),
                ("miss", r.misses),
                ("bypass", r.bypass),
            ] {
                let labels = [("route", r.route.as_str()), ("result", result)];
                ConstCounter::new(n).encode(requests.encode_family(&labels)?)?;
            }
        }
        type Read = fn(&crate::api::RouteSnapshot) -> f64;
        let per_route: [(&str, &str, Read); 4] = [
            (
                "strata_http_served_bytes",
                "Body bytes sent from cached entries",
                |r| r.bytes_served as f64,
            ),
            (
                "strata_http_saved_seconds",
                "Service time the cached answers saved (each: its call's time)",
                |r| r.saved_us as f64 / 1e6,
            ),
            (
                "strata_http_upstream_seconds",
                "Time spent waiting for the services",
                |r| r.upstream_us as f64 / 1e6,
            ),
            (
                "strata_http_not_stored",
                "Service answers not stored (RFC 9111 rules, or the route's statuses)",
                |r| r.not_stored as f64,
            ),
        ];
        for (name, help, value) in per_route {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for r in &routes {
                let labels = [("route", r.route.as_str())];
                ConstCounter::new(value(r)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
