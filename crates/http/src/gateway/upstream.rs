//! Calls to the upstream providers: one pooled HTTP client (rustls), the base URLs, and what
//! is forwarded of a request and of an answer.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, Method};
use reqwest::Client;

use super::route::Provider;
use crate::config::ServerConfig;
use crate::error::HttpError;

/// Headers that belong to one connection (RFC 9110 §7.6.1), never forwarded.
pub(crate) const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The upstream providers and the client that reaches them.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: Client,
    openai: String,
    anthropic: String,
    first_byte: Duration,
}

impl Upstream {
    /// The client for a configuration: connection pool, connect timeout, rustls.
    pub fn new(config: &ServerConfig) -> Result<Self, HttpError> {
        let client = Client::builder()
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            // The gateway passes redirects on; it does not follow them for the client.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| HttpError::Config(format!("upstream client: {e}")))?;
        Ok(Upstream {
            client,
            openai: base(&config.openai_base, "openai_base")?,
            anthropic: base(&config.anthropic_base, "anthropic_base")?,
            first_byte: config.first_byte_timeout,
        })
    }

    /// The URL a request for `path_and_query` (under `/v1/`) goes to at `provider`.
    pub fn url(&self, provider: Provider, path_and_query: &str) -> String {
        let base = match provider {
            Provider::OpenAi => &self.openai,
            Provider::Anthropic => &self.anthropic,
        };
        let rest = path_and_query.strip_prefix("/v1").unwrap_or(path_and_query);
        format!("{base}{rest}")
    }

    /// A request to the upstream, with the headers to forward (see [`forwarded`]).
    pub fn request(
        &self,
        method: Method,
        url: &str,
        headers: HeaderMap,
    ) -> reqwest::RequestBuilder {
        self.client.request(method, url).headers(headers)
    }

    /// Sends a request and waits for its head, for at most the first-byte timeout.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, super::flight::Failure> {
        use super::flight::Failure;
        match tokio::time::timeout(self.first_byte, request.send()).await {
            Err(_) => Err(Failure::TimedOut(format!(
                "no answer within {}",
                humantime::format_duration(self.first_byte)
            ))),
            Ok(Err(e)) if e.is_timeout() => Err(Failure::TimedOut(error_chain(&e))),
            Ok(Err(e)) => Err(Failure::Unreachable(error_chain(&e))),
            Ok(Ok(response)) => Ok(response),
        }
    }
}

fn base(url: &str, setting: &str) -> Result<String, HttpError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| HttpError::Config(format!("[server] {setting} `{url}`: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(HttpError::Config(format!(
            "[server] {setting} `{url}`: not an http(s) URL"
        )));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// An error and its causes on one line (reqwest's own message hides the cause).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// The headers of a client's request to forward upstream: all of them, credentials included,
/// less hop-by-hop headers, `host` and `content-length` (the client sets them for the new
/// connection), the gateway's own `x-strata-*`, and on cached routes (`identity`)
/// `accept-encoding`, so that the answer arrives as text the gateway can record.
pub fn forwarded(headers: &HeaderMap, identity: bool) -> HeaderMap {
    let named_in_connection: Vec<HeaderName> = headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n)
            || n == "host"
            || n == "content-length"
            || n.starts_with("x-strata-")
            || (identity && n == "accept-encoding")
            || named_in_connection.contains(name)
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// The headers of an upstream's answer to pass back: all but hop-by-hop ones and
/// `content-length` (the gateway frames the body itself). An answer the gateway records or
/// shares between clients (`shared`) also loses `set-cookie`, which belongs to one client, and
/// one it recorded (whose body the gateway writes in the shape asked for) `content-type` and
/// `content-encoding`.
pub fn returned(headers: &HeaderMap, recorded: bool, shared: bool) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n)
            || n == "content-length"
            || (shared && n == "set-cookie")
            || (recorded && (n == "content-type" || n == "content-encoding"))
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bases_with_path_prefixes_are_joined_to_the_rest_of_the_path() {
        let config = ServerConfig {
            openai_base: "http://127.0.0.1:8000/api/v1/".into(),
            ..ServerConfig::default()
        };
        let upstream = Upstream::new(&config).unwrap();
        assert_eq!(
            upstream.url(Provider::OpenAi, "/v1/chat/completions?x=1"),
            "http://127.0.0.1:8000/api/v1/chat/completions?x=1"
        );
        assert_eq!(
            upstream.url(Provider::Anthropic, "/v1/messages"),
            "https://api.anthropic.com/v1/messages"
        );
        let bad = ServerConfig {
            anthropic_base: "ftp://x".into(),
            ..ServerConfig::default()
        };
        assert!(Upstream::new(&bad).is_err());
    }

    #[test]
    fn hop_by_hop_and_strata_headers_stay_behind_and_credentials_go() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer sk".parse().unwrap());
        headers.insert("connection", "keep-alive, x-custom".parse().unwrap());
        headers.insert("x-custom", "1".parse().unwrap());
        headers.insert("x-strata-ttl", "60".parse().unwrap());
        headers.insert("accept-encoding", "gzip".parse().unwrap());
        headers.insert("host", "gateway".parse().unwrap());
        headers.insert("anthropic-version", "2023-06-01".parse().unwrap());
        let out = forwarded(&headers, true);
        assert_eq!(out["authorization"], "Bearer sk");
        assert_eq!(out["anthropic-version"], "2023-06-01");
        for gone in [
            "connection",
            "x-custom",
            "x-strata-ttl",
            "accept-encoding",
            "host",
        ] {
            assert!(!out.contains_key(gone), "{gone}");
        }
        assert!(forwarded(&headers, false).contains_key("accept-encoding"));
    }
}
