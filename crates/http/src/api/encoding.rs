//! Content codings: which one a request accepts (`Accept-Encoding`, RFC 9110 §12.5.3), and
//! the body in it. strata stores each body once, identity-encoded, and compresses on the way
//! out; compressed variants are kept in a bounded memory map so a hot answer is compressed once.

use std::io::Write;

use axum::http::{HeaderMap, header};
use bytes::Bytes;

/// A content coding strata writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// No coding.
    Identity,
    /// gzip (RFC 1952).
    Gzip,
    /// Brotli (RFC 7932).
    Brotli,
    /// Zstandard (RFC 8878).
    Zstd,
}

impl Encoding {
    /// The `Content-Encoding` token.
    pub fn token(self) -> &'static str {
        match self {
            Encoding::Identity => "identity",
            Encoding::Gzip => "gzip",
            Encoding::Brotli => "br",
            Encoding::Zstd => "zstd",
        }
    }

    /// The coding a request prefers among those strata writes: highest `q` first, then zstd,
    /// br, gzip. Identity when nothing else is acceptable.
    pub fn negotiate(headers: &HeaderMap) -> Encoding {
        let mut best = (0u16, Encoding::Identity);
        for value in headers.get_all(header::ACCEPT_ENCODING) {
            let Ok(text) = value.to_str() else { continue };
            for item in text.split(',') {
                let mut parts = item.split(';');
                let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
                let q = parts
                    .find_map(|p| p.trim().strip_prefix("q="))
                    .map_or(1000, quality);
                let encoding = match coding.as_str() {
                    "zstd" => Encoding::Zstd,
                    "br" => Encoding::Brotli,
                    "gzip" | "x-gzip" => Encoding::Gzip,
                    _ => continue,
                };
                let rank = |e: Encoding| match e {
                    Encoding::Zstd => 3,
                    Encoding::Brotli => 2,
                    Encoding::Gzip => 1,
                    Encoding::Identity => 0,
                };
                if q > 0 && (q > best.0 || (q == best.0 && rank(encoding) > rank(best.1))) {
                    best = (q, encoding);
                }
            }
        }
        best.1
    }

    /// `body` in this coding.
    pub fn encode(self, body: &[u8]) -> std::io::Result<Bytes> {
        match self {
            Encoding::Identity => Ok(Bytes::copy_from_slice(body)),
            Encoding::Gzip => {
                let mut out = flate2::write::GzEncoder::new(
                    Vec::with_capacity(body.len() / 3),
                    flate2::Compression::new(6),
                );
                out.write_all(body)?;
                Ok(Bytes::from(out.finish()?))
            }
            Encoding::Brotli => {
                let mut out = Vec::with_capacity(body.len() / 3);
                {
                    let mut writer = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                    writer.write_all(body)?;
                }
                Ok(Bytes::from(out))
            }
            Encoding::Zstd => Ok(Bytes::from(zstd::bulk::compress(body, 3)?)),
        }
    }
}

/// A `q` value in thousandths (`0.5` → 500); unreadable is 0.
fn quality(text: &str) -> u16 {
    let text = text.trim();
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    match whole {
        "1" => 1000,
        "0" => {
            let digits: String = fraction.chars().take(3).collect();
            if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
                return 0;
            }
            format!("{digits:0<3}").parse().unwrap_or(0)
        }
        _ => 0,
    }
}

/// Whether a body of this type is worth compressing (text, JSON, XML, JavaScript, SVG).
pub fn compressible(headers: &HeaderMap) -> bool {
    let Some(kind) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let kind = kind
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    kind.starts_with("text/")
        || kind.ends_with("/json")
        || kind.ends_with("+json")
        || kind.ends_with("/xml")
        || kind.ends_with("+xml")
        || kind == "application/javascript"
        || kind == "image/svg+xml"
        || kind == "application/x-ndjson"
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use std::io::Read;

    fn accepting(value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn the_preferred_acceptable_coding_is_chosen() {
        assert_eq!(Encoding::negotiate(&HeaderMap::new()), Encoding::Identity);
        assert_eq!(Encoding::negotiate(&accepting("gzip")), Encoding::Gzip);
        assert_eq!(
            Encoding::negotiate(&accepting("gzip, br, zstd")),
            Encoding::Zstd
        );
        assert_eq!(
            Encoding::negotiate(&accepting("gzip;q=1.0, br;q=0.5")),
            Encoding::Gzip
        );
        assert_eq!(
            Encoding::negotiate(&accepting("gzip;q=0, identity")),
            Encoding::Identity
        );
        assert_eq!(
            Encoding::negotiate(&accepting("deflate, compress")),
            Encoding::Identity
        );
    }

    #[test]
    fn every_coding_decodes_back() {
        let body = "{\"jobs\": [1, 2, 3]} ".repeat(100);
        let gz = Encoding::Gzip.encode(body.as_bytes()).unwrap();
        let mut out = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, body);
        let br = Encoding::Brotli.encode(body.as_bytes()).unwrap();
        let mut out = String::new();
        brotli::Decompressor::new(&br[..], 4096)
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, body);
        let zs = Encoding::Zstd.encode(body.as_bytes()).unwrap();
        assert_eq!(zstd::stream::decode_all(&zs[..]).unwrap(), body.as_bytes());
        assert!(gz.len() < body.len() / 4);
    }
}
