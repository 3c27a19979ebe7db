//! What an API answer is in the cache: the `response` of its entry, as JSON
//! (`{"v": 1, "status": 200, "headers": [[name, value], …], "etag": "\"…\"", "body": "…"}`,
//! or `"body64"` for a body that is not UTF-8 text).

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::gateway::upstream::HOP_BY_HOP;

/// Headers never stored besides those of the connection ([`HOP_BY_HOP`]): one message's, one
/// client's, and those strata writes itself on every answer.
const NOT_STORED: [&str; 10] = [
    "content-length",
    "set-cookie",
    "age",
    "date",
    "cache-control",
    "etag",
    "vary",
    "cache-status",
    "x-cache",
    super::TAGS_HEADER,
];

/// Whether a header is never stored.
fn not_stored(name: &str) -> bool {
    HOP_BY_HOP.contains(&name) || NOT_STORED.contains(&name)
}

/// Most headers one answer may store.
pub const MAX_HEADERS: usize = 64;

/// An answer as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its status.
    pub status: StatusCode,
    /// Its headers, less those never stored.
    pub headers: HeaderMap,
    /// Its entity tag: the service's, or a strong one from the body's digest.
    pub etag: HeaderValue,
    /// Its body, identity-encoded.
    pub body: Bytes,
}

/// Text borrowed from the entry where it has no escapes, else unescaped into its own.
type Text<'a> = std::borrow::Cow<'a, str>;

#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    v: u8,
    status: u16,
    #[serde(borrow)]
    headers: Vec<(Text<'a>, Text<'a>)>,
    #[serde(borrow)]
    etag: Text<'a>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    body: Option<Text<'a>>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    body64: Option<Text<'a>>,
}

/// The strong entity tag of a body: 128 bits of its BLAKE3 digest.
pub fn etag_of(body: &[u8]) -> HeaderValue {
    let digest = blake3::hash(body);
    let hex = digest.to_hex();
    let text = format!("\"{}\"", &hex.as_str()[..32]);
    HeaderValue::try_from(text).unwrap_or(HeaderValue::from_static("\"0\""))
}

impl Stored {
    /// The stored form of an answer: headers never stored are dropped; the service's ETag is
    /// kept, else one is computed from the body.
    pub fn new(status: StatusCode, headers: &HeaderMap, body: Bytes) -> Stored {
        let mut kept = HeaderMap::new();
        for (name, value) in headers {
            if !not_stored(name.as_str()) && kept.len() < MAX_HEADERS {
                kept.append(name.clone(), value.clone());
            }
        }
        let etag = etag_for(headers, &body);
        Stored {
            status,
            headers: kept,
            etag,
            body,
        }
    }

    /// An answer passed on without being stored: every header but those of the connection
    /// (its `Set-Cookie` and `Cache-Control` included); the service's ETag, else the body's.
    pub fn passing(status: StatusCode, headers: &HeaderMap, body: Bytes) -> Stored {
        let mut kept = headers.clone();
        for name in HOP_BY_HOP {
            kept.remove(name);
        }
        kept.remove(header::ETAG);
        kept.remove(header::CONTENT_LENGTH);
        kept.remove(super::TAGS_HEADER);
        let etag = etag_for(headers, &body);
        Stored {
            status,
            headers: kept,
            etag,
            body,
        }
    }

    /// The JSON the entry stores.
    pub fn to_json(&self) -> serde_json::Value {
        let headers: Vec<(Text<'_>, Text<'_>)> = self
            .headers
            .iter()
            .filter_map(|(n, v)| Some((n.as_str().into(), v.to_str().ok()?.into())))
            .collect();
        let (body, body64) = match std::str::from_utf8(&self.body) {
            Ok(text) => (Some(std::borrow::Cow::Borrowed(text)), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&self.body)),
            ),
        };
        let wire = Wire {
            v: 1,
            status: self.status.as_u16(),
            headers,
            etag: self.etag.to_str().unwrap_or("\"0\"").into(),
            body,
            body64: body64.map(Text::Owned),
        };
        serde_json::to_value(&wire).unwrap_or(serde_json::Value::Null)
    }

    /// Reads an entry's JSON back; anything malformed is an error (the entry is then a miss).
    pub fn from_json(text: &str) -> Result<Stored, String> {
        let wire: Wire<'_> = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if wire.v != 1 {
            return Err(format!("stored answer version {}", wire.v));
        }
        let status = StatusCode::from_u16(wire.status).map_err(|e| e.to_string())?;
        if wire.headers.len() > MAX_HEADERS {
            return Err("too many headers".into());
        }
        let mut headers = HeaderMap::with_capacity(wire.headers.len());
        for (name, value) in &wire.headers {
            let name = HeaderName::try_from(&**name).map_err(|e| e.to_string())?;
            if not_stored(name.as_str()) {
                return Err(format!("a stored `{name}` header"));
            }
            let value = HeaderValue::try_from(&**value).map_err(|e| e.to_string())?;
            headers.append(name, value);
        }
        if !is_entity_tag(wire.etag.as_bytes()) {
            return Err("not an entity tag".into());
        }
        let etag = HeaderValue::try_from(&*wire.etag).map_err(|e| e.to_string())?;
        let body = match (wire.body, wire.body64) {
            (Some(text), None) => Bytes::from(text.into_owned()),
            (None, Some(b64)) => Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(&*b64)
                    .map_err(|e| e.to_string())?,
            ),
            _ => return Err("a body, as text or base64".into()),
        };
        Ok(Stored {
            status,
            headers,
            etag,
            body,
        })
    }
}

/// The service's entity tag when it sent a well-formed one, else the body's.
fn etag_for(headers: &HeaderMap, body: &[u8]) -> HeaderValue {
    headers
        .get(header::ETAG)
        .filter(|v| is_entity_tag(v.as_bytes()))
        .cloned()
        .unwrap_or_else(|| etag_of(body))
}

/// Whether `value` is an entity tag: `"…"` or `W/"…"` (RFC 9110 §8.8.3).
pub fn is_entity_tag(value: &[u8]) -> bool {
    let opaque = value.strip_prefix(b"W/").unwrap_or(value);
    opaque.len() >= 2
        && opaque[0] == b'"'
        && opaque[opaque.len() - 1] == b'"'
        && opaque[1..opaque.len() - 1]
            .iter()
            .all(|&b| b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_binary_bodies_round_trip_and_private_headers_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::SET_COOKIE, HeaderValue::from_static("a=b"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        let text = Stored::new(StatusCode::OK, &headers, Bytes::from_static(b"{\"a\":1}"));
        assert!(text.headers.get(header::SET_COOKIE).is_none());
        assert!(text.headers.get(header::CONNECTION).is_none());
        assert_eq!(text.etag, etag_of(b"{\"a\":1}"));
        let json = text.to_json().to_string();
        assert_eq!(Stored::from_json(&json).unwrap(), text);
        let binary = Stored::new(
            StatusCode::OK,
            &HeaderMap::new(),
            Bytes::from_static(&[0xff, 0]),
        );
        let json = binary.to_json().to_string();
        assert!(json.contains("body64"));
        assert_eq!(Stored::from_json(&json).unwrap(), binary);
    }

    #[test]
    fn the_services_etag_is_kept_and_a_forged_document_refused() {
        let mut headers = HeaderMap::new();
        headers.insert(header::ETAG, HeaderValue::from_static("W/\"v7\""));
        let stored = Stored::new(StatusCode::OK, &headers, Bytes::new());
        assert_eq!(stored.etag, "W/\"v7\"");
        assert!(
            Stored::from_json(
                r#"{"v":1,"status":200,"headers":[["set-cookie","x=1"]],"etag":"\"a\"","body":""}"#
            )
            .is_err()
        );
        assert!(
            Stored::from_json(r#"{"v":1,"status":200,"headers":[],"etag":"nope","body":""}"#)
                .is_err()
        );
        assert!(
            Stored::from_json(r#"{"v":1,"status":99,"headers":[],"etag":"\"a\"","body":""}"#)
                .is_err()
        );
        assert!(Stored::from_json(r#"{"v":1,"status":200,"headers":[],"etag":"\"a\""}"#).is_err());
    }
}
