//! strata-http: strata's HTTP side.
//!
//! - [`gateway`]: an OpenAI- and Anthropic-compatible caching gateway. Point an SDK's base URL
//!   at it; identical requests are answered from the cache, streams included, and identical
//!   requests in flight share one upstream call.
//! - [`api`]: response caching for any HTTP API: a tower layer for Rust services, and
//!   reverse-proxy routes for services in any language, sharing one policy.
//! - [`admin`]: the admin API (`/admin/…`: health, stats, report, invalidate, clear, warm,
//!   keys, a live monitor and dashboard) and `/metrics`.
//! - [`metrics`]: Prometheus metrics.
//! - [`convert`]: JSON answers and their SSE streams, each into the other.
//! - [`Server`]: listeners and graceful shutdown; the `strata serve` command only wires it up.
//!
//! ```no_run
//! # async fn demo(cache: strata_tiers::TieredCache) -> Result<(), strata_http::HttpError> {
//! use strata_http::{Gateway, Server, ServerConfig};
//! let gateway = Gateway::new(cache, ServerConfig::default())?;
//! let server = Server::bind(gateway).await?;
//! println!("listening on {}", server.local_addr()?);
//! server.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

pub mod admin;
pub mod api;
pub mod config;
pub mod convert;
pub mod error;
pub mod gateway;
pub mod metrics;
mod server;

pub use config::ServerConfig;
pub use error::HttpError;
pub use gateway::Gateway;
pub use server::Server;
