//! Per-request controls (RFC 9111 request directives and `X-Strata-*` headers) and the status
//! headers every answer carries (RFC 9211 `Cache-Status`, `X-Strata-Cache`, `X-Strata-Key`, `Age`).

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use headers::{CacheControl, HeaderMapExt};
use strata_analytics::Outcome;

/// `X-Strata-TTL`: the entry's TTL (`90`, `90s`, `12h`, `7d`).
pub const TTL: &str = "x-strata-ttl";
/// `X-Strata-Tags`: the entry's tags, comma-separated (`jobs:42, team:search`).
pub const TAGS: &str = "x-strata-tags";
/// `X-Strata-Namespace`: narrows the scope to a namespace.
pub const NAMESPACE: &str = "x-strata-namespace";
/// `X-Strata-User`: narrows the scope to a user.
pub const USER: &str = "x-strata-user";
/// `X-Strata-Session`: narrows the scope to a session.
pub const SESSION: &str = "x-strata-session";
/// `X-Strata-Cache`: what the cache did (response).
pub const CACHE: &str = "x-strata-cache";
/// `X-Strata-Key`: the entry's display key (response).
pub const KEY: &str = "x-strata-key";

/// How many tags one request may set, and how long each may be.
const MAX_TAGS: usize = 32;
const MAX_TAG_LEN: usize = 128;

/// What a request asks of the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Controls {
    /// `Cache-Control: no-store`: answer normally, store nothing.
    pub no_store: bool,
    /// `Cache-Control: no-cache`: skip the lookup, call upstream, store the new answer.
    pub no_cache: bool,
    /// `Cache-Control: max-age=N`: only an entry younger than this may answer.
    pub max_age: Option<Duration>,
    /// `Cache-Control: only-if-cached`: 504 on a miss, with no upstream call.
    pub only_if_cached: bool,
    /// `X-Strata-TTL`.
    pub ttl: Option<Duration>,
    /// `X-Strata-Tags`.
    pub tags: Vec<String>,
}

impl Controls {
    /// Reads the controls of a request; a malformed `X-Strata-*` value is an error that says
    /// which (a 400). An unreadable `Cache-Control` is ignored, as caches do.
    pub fn from_headers(headers: &HeaderMap) -> Result<Controls, String> {
        let mut controls = Controls::default();
        if let Some(cc) = headers.typed_get::<CacheControl>() {
            controls.no_store = cc.no_store();
            controls.no_cache = cc.no_cache();
            controls.max_age = cc.max_age();
            controls.only_if_cached = cc.only_if_cached();
        }
        if let Some(ttl) = text(headers, TTL)? {
            controls.ttl = Some(parse_ttl(ttl)?);
        }
        if let Some(tags) = text(headers, TAGS)? {
            for tag in tags.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if tag.len() > MAX_TAG_LEN || tag.chars().any(char::is_control) {
                    return Err(format!(
                        "{TAGS}: a tag is at most {MAX_TAG_LEN} printable characters"
                    ));
                }
                controls.tags.push(tag.to_string());
            }
            if controls.tags.len() > MAX_TAGS {
                return Err(format!("{TAGS}: at most {MAX_TAGS} tags"));
            }
        }
        Ok(controls)
    }
}

/// A header's value as text; an error if it is not.
pub fn text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, String> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|v| Some(v.trim()))
            .map_err(|_| format!("{name}: not visible ASCII text")),
    }
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let parsed = match text.parse::<u64>() {
        Ok(seconds) => Ok(Duration::from_secs(seconds)),
        Err(_) => humantime::parse_duration(text).map_err(|e| e.to_string()),
    };
    parsed.map_err(|e| format!("{TTL}: `{text}` is not a duration ({e})"))
}

/// What the cache did with a request: the words of `X-Strata-Cache` and `Cache-Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Served from a tier.
    Hit {
        /// Which one (`l1`, `l2`, `l3`).
        tier: Outcome,
        /// The entry's age.
        age: Duration,
        /// Its time left to live, if it expires.
        ttl: Option<Duration>,
    },
    /// Looked up, not found; this request's upstream call answered it.
    Miss {
        /// Whether its answer was stored.
        stored: bool,
    },
    /// Joined an identical request's upstream call in flight.
    Coalesced {
        /// Whether the answer was stored.
        stored: bool,
    },
    /// `no-cache`, or an entry older than `max-age`: called upstream again.
    Refresh {
        /// Whether the new answer was stored.
        stored: bool,
        /// RFC 9211's reason: `request` (a directive) or `stale` (too old for `max-age`).
        why: &'static str,
    },
    /// Not cacheable (no key, not JSON): forwarded as it came.
    Bypass,
    /// `only-if-cached` and nothing cached: 504, upstream not called.
    NotCached,
}

impl Disposition {
    /// The `X-Strata-Cache` word.
    pub fn word(self) -> &'static str {
        match self {
            Disposition::Hit { .. } => "HIT",
            Disposition::Miss { .. } | Disposition::NotCached => "MISS",
            Disposition::Coalesced { .. } => "COALESCED",
            Disposition::Refresh { .. } => "REFRESH",
            Disposition::Bypass => "BYPASS",
        }
    }

    /// The `result` label of the request metrics.
    pub fn result(self) -> &'static str {
        match self {
            Disposition::Hit { .. } => "hit",
            Disposition::Miss { .. } | Disposition::NotCached => "miss",
            Disposition::Coalesced { .. } => "coalesced",
            Disposition::Refresh { .. } => "refresh",
            Disposition::Bypass => "bypass",
        }
    }

    /// The RFC 9211 `Cache-Status` value, for the cache named `strata`.
    pub fn cache_status(self, key: Option<&str>) -> String {
        let mut out = String::from("strata");
        match self {
            Disposition::Hit { ttl, tier, .. } => {
                out.push_str("; hit");
                if let Some(ttl) = ttl {
                    out.push_str(&format!("; ttl={}", ttl.as_secs()));
                }
                let detail = match tier {
                    Outcome::L1 => "l1",
                    Outcome::L2 => "l2",
                    Outcome::L3 => "l3",
                    _ => "memory",
                };
                out.push_str("; detail=");
                out.push_str(detail);
            }
            Disposition::Miss { stored } => {
                out.push_str("; fwd=miss");
                if stored {
                    out.push_str("; stored");
                }
            }
            Disposition::Coalesced { stored } => {
                out.push_str("; fwd=miss; collapsed");
                if stored {
                    out.push_str("; stored");
                }
            }
            Disposition::Refresh { stored, why } => {
                out.push_str("; fwd=");
                out.push_str(why);
                if stored {
                    out.push_str("; stored");
                }
            }
            Disposition::Bypass => out.push_str("; fwd=bypass"),
            Disposition::NotCached => out.push_str("; fwd=miss; detail=only-if-cached"),
        }
        if let Some(key) = key {
            // An sf-string: display keys are `[a-z0-9._-]` and hex, nothing to escape.
            out.push_str(&format!("; key=\"{key}\""));
        }
        out
    }

    /// Adds the status headers to a response's headers.
    pub fn apply(self, key: Option<&str>, headers: &mut HeaderMap) {
        let mut set = |name: &'static str, value: String| {
            if let Ok(value) = HeaderValue::try_from(value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        };
        set("cache-status", self.cache_status(key));
        set(CACHE, self.word().to_string());
        if let Some(key) = key {
            set(KEY, key.to_string());
        }
        if let Disposition::Hit { age, .. } = self {
            set("age", age.as_secs().to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::try_from(*name).unwrap(),
                HeaderValue::try_from(*value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn request_directives_are_read() {
        let c = Controls::from_headers(&headers(&[(
            "cache-control",
            "no-cache, max-age=60, only-if-cached",
        )]))
        .unwrap();
        assert!(c.no_cache && c.only_if_cached && !c.no_store);
        assert_eq!(c.max_age, Some(Duration::from_secs(60)));
        let c = Controls::from_headers(&headers(&[("cache-control", "no-store")])).unwrap();
        assert!(c.no_store);
    }

    #[test]
    fn strata_headers_are_read_and_bad_ones_refused() {
        let c = Controls::from_headers(&headers(&[(TTL, "90"), (TAGS, "jobs:42, team:search,")]))
            .unwrap();
        assert_eq!(c.ttl, Some(Duration::from_secs(90)));
        assert_eq!(c.tags, ["jobs:42", "team:search"]);
        let c = Controls::from_headers(&headers(&[(TTL, "12h")])).unwrap();
        assert_eq!(c.ttl, Some(Duration::from_secs(12 * 3600)));
        let err = Controls::from_headers(&headers(&[(TTL, "soon")])).unwrap_err();
        assert!(err.contains("x-strata-ttl"), "{err}");
        let many = vec!["t"; 40].join(",");
        assert!(Controls::from_headers(&headers(&[(TAGS, &many)])).is_err());
    }

    #[test]
    fn cache_status_follows_rfc_9211() {
        let hit = Disposition::Hit {
            tier: Outcome::L2,
            age: Duration::from_secs(5),
            ttl: Some(Duration::from_secs(100)),
        };
        assert_eq!(
            hit.cache_status(Some("gpt-4o_00")),
            "strata; hit; ttl=100; detail=l2; key=\"gpt-4o_00\""
        );
        assert_eq!(
            Disposition::Miss { stored: true }.cache_status(None),
            "strata; fwd=miss; stored"
        );
        assert_eq!(
            Disposition::Coalesced { stored: true }.cache_status(None),
            "strata; fwd=miss; collapsed; stored"
        );
        assert_eq!(Disposition::Bypass.cache_status(None), "strata; fwd=bypass");
        let mut map = HeaderMap::new();
        hit.apply(Some("k"), &mut map);
        assert_eq!(map["age"], "5");
        assert_eq!(map[CACHE], "HIT");
        assert_eq!(map[KEY], "k");
    }
}
