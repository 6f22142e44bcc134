//! JSON answers: a strong ETag and 304s, and gzip from a memo.
//!
//! Gzip is done here, not only by tower-http's compression layer, because
//! the layer compresses every response anew: a hot list page is compressed
//! once and served from the memo (PERFORMANCE.md). The layer still
//! compresses everything else, and leaves bodies encoded here alone.
//! Reading `Accept-Encoding` is hand-written because tower-http keeps its
//! parser private.

use bytes::Bytes;

use crate::cache::Answer;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// Bytes of gzipped bodies kept for reuse.
pub(super) const GZIP_MEMO_BYTES: u64 = 2 << 20;

/// Bodies at least this large are gzipped when the client accepts it
/// (a single course, ~400 bytes, costs more to compress than it saves).
const GZIP_ABOVE: usize = 1024;

/// Whether `Accept-Encoding` admits gzip: named with a non-zero weight,
/// or, when not named, `*` with one (RFC 9110 §12.5.3).
fn accepts_gzip(request_headers: &HeaderMap) -> bool {
    let mut gzip = None;
    let mut any = None;
    let codings = request_headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for item in codings {
        let mut parts = item.split(';').map(str::trim);
        let coding = parts.next().unwrap_or("");
        // "q=0", "Q=0.0", "q=0.000": a zero weight refuses; no weight, or
        // one that does not parse, does not.
        let refused = parts.any(|p| {
            let p = p.replace(' ', "");
            p.get(..2).is_some_and(|q| q.eq_ignore_ascii_case("q=")) && p[2..].parse::<f32>().is_ok_and(|q| q == 0.0)
        });
        // Listed more than once: admitted if any entry admits it.
        let entry = if coding.eq_ignore_ascii_case("gzip") {
            &mut gzip
        } else if coding == "*" {
            &mut any
        } else {
            continue;
        };
        *entry = Some(entry.unwrap_or(false) || !refused);
    }
    gzip.or(any).unwrap_or(false)
}

/// Gzipped bodies by content: a hot page is compressed once, not on every
/// request. Bounded by bytes; the identity body is kept to rule out a
/// hash collision.
pub(super) struct GzipMemo(quick_cache::sync::Cache<u64, (Bytes, Bytes), GzipBytes>);

#[derive(Clone, Copy)]
pub(super) struct GzipBytes;

impl quick_cache::Weighter<u64, (Bytes, Bytes)> for GzipBytes {
    fn weight(&self, _: &u64, value: &(Bytes, Bytes)) -> u64 {
        (value.0.len() + value.1.len() + 64) as u64
    }
}

impl GzipMemo {
    pub(super) fn new(max_bytes: u64) -> Self {
        GzipMemo(quick_cache::sync::Cache::with_weighter(
            (max_bytes / 4096).max(16) as usize,
            max_bytes.max(1),
            GzipBytes,
        ))
    }

    fn gzip(&self, hash: u64, body: &Bytes) -> Bytes {
        if let Some((identity, gzipped)) = self.0.get(&hash) {
            // The memory layer hands out the same allocation: skip the compare then.
            if (identity.as_ptr() == body.as_ptr() && identity.len() == body.len()) || identity == *body {
                return gzipped;
            }
        }
        use std::io::Write as _;
        let mut encoder =
            flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4), flate2::Compression::fast());
        // Writing to a Vec cannot fail.
        let _ = encoder.write_all(body);
        let gzipped = Bytes::from(encoder.finish().unwrap_or_default());
        self.0.insert(hash, (body.clone(), gzipped.clone()));
        gzipped
    }
}

impl std::fmt::Debug for GzipMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GzipMemo").field("bytes", &self.0.weight()).finish()
    }
}

/// A JSON 200 with a strong ETag over the body, or a 304 when the client
/// already holds it; gzipped (from `memo`, if given) when large and
/// accepted. `no-cache`: clients may keep it but must revalidate, which
/// the ETag makes cheap.
pub(super) fn json_response(request_headers: &HeaderMap, answer: Answer, memo: Option<&GzipMemo>) -> Response {
    let Answer { body, hash, etag } = answer;
    let tag = etag.to_str().unwrap_or_default();
    let matches = request_headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"));
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let gzip = body.len() >= GZIP_ABOVE && accepts_gzip(request_headers);
        let mut r = match (gzip, memo) {
            (true, Some(memo)) => {
                let mut r = (StatusCode::OK, memo.gzip(hash, &body)).into_response();
                // The compression layer leaves encoded bodies alone.
                r.headers_mut()
                    .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                r
            }
            _ => (StatusCode::OK, body).into_response(),
        };
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r.headers_mut()
            .insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        r
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(value: &str) -> bool {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(value).expect("header"));
        accepts_gzip(&headers)
    }

    #[test]
    fn gzip_is_sent_only_where_accept_encoding_admits_it() {
        for yes in [
            "gzip",
            "GZIP",
            "br, gzip;q=0.5",
            "*",
            "deflate, *;q=0.1",
            "gzip; q=1",
            "gzip;q=",
            "gzip, gzip;q=0",
        ] {
            assert!(accepts(yes), "{yes}");
        }
        for no in [
            "br",
            "identity",
            "gzip;q=0",
            "gzip; q=0",
            "gzip;q=0.0",
            "gzip;q=0.000",
            "*;q=0",
            "gzip;q=0, *",
        ] {
            assert!(!accepts(no), "{no}");
        }
        assert!(!accepts_gzip(&HeaderMap::new()), "no header: identity");
    }
}
