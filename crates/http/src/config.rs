//! `[server]`: the gateway's settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use strata_core::Secret;

/// The settings of `strata serve`, read from the `[server]` section of the configuration (and
/// `STRATA_SERVER_*` variables).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Where the gateway listens.
    pub listen: SocketAddr,
    /// Where `/admin/` and `/metrics` listen, when not on `listen` (empty: on `listen`).
    #[serde(with = "optional_addr")]
    pub admin_listen: Option<SocketAddr>,
    /// Base URL of the OpenAI-shaped upstream, `/v1` included (any OpenAI-compatible server:
    /// vLLM, Ollama, OpenRouter, a base with a path prefix). A request for `/v1/{rest}` goes to
    /// `{openai_base}/{rest}`.
    pub openai_base: String,
    /// Base URL of the Anthropic upstream, `/v1` included.
    pub anthropic_base: String,
    /// Bound on opening a connection to an upstream.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bound on waiting for an upstream's response headers (a JSON answer is generated whole
    /// before them: reasoning models can take minutes).
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Bound on the silence between two events of a stream, or two chunks of a body.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Largest request body the cached routes read (413 past it). Other routes stream their
    /// bodies through unread.
    pub body_limit: bytesize::ByteSize,
    /// Largest upstream answer that is recorded; a longer one is cut (502) and not stored.
    pub response_limit: bytesize::ByteSize,
    /// Share answers between requests that carry different credentials. Off by default: an
    /// answer is then shared only by requests with the same `Authorization` / `x-api-key`.
    pub share_across_credentials: bool,
    /// A file of at least 32 bytes keying the hash that turns a credential into a namespace.
    /// Empty: a random key kept in the disk tier (or in memory without one). Nodes that share
    /// a bucket share gateway answers only if they share this key.
    pub scope_key_file: PathBuf,
    /// The bearer token the admin API requires. Empty: the admin API answers loopback clients
    /// only. Prefer `STRATA_SERVER_ADMIN_TOKEN` to writing it in a file.
    pub admin_token: Secret,
    /// Bound on finishing the requests in flight at shutdown (then the outbox is drained and
    /// the disk tier flushed).
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: None,
            openai_base: "https://api.openai.com/v1".into(),
            anthropic_base: "https://api.anthropic.com/v1".into(),
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(120),
            body_limit: bytesize::ByteSize::mib(32),
            response_limit: bytesize::ByteSize::mib(64),
            share_across_credentials: false,
            scope_key_file: PathBuf::new(),
            admin_token: Secret::default(),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// An address, or an empty string for none (TOML has no null).
mod optional_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        text.trim()
            .parse()
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("`{text}`: {e}")))
    }

    pub fn serialize<S: Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_str(""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_admin_listen_is_none_and_an_address_is_read() {
        let config: ServerConfig = serde_json::from_str(r#"{"admin_listen": ""}"#).unwrap();
        assert_eq!(config.admin_listen, None);
        let config: ServerConfig =
            serde_json::from_str(r#"{"admin_listen": "127.0.0.1:9090"}"#).unwrap();
        assert_eq!(config.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert!(serde_json::from_str::<ServerConfig>(r#"{"admin_listen": "nowhere"}"#).is_err());
    }

    #[test]
    fn unknown_settings_are_refused() {
        assert!(serde_json::from_str::<ServerConfig>(r#"{"listne": "127.0.0.1:1"}"#).is_err());
    }
}
