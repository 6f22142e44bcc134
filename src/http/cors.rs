//! Cross-origin reads (CORS), off unless origins are listed: the public
//! catalog for `COURSEVIEW_CORS_ORIGINS`, the teacher dashboard (which
//! takes `Authorization`) only for `COURSEVIEW_CORS_DASHBOARD_ORIGINS`.
//!
//! One layer outside every other, so a preflight `OPTIONS` is answered
//! before the read-only rule turns other methods into 405. Origins are
//! matched exactly (scheme, host, port); `*` is allowed for the catalog
//! only: a wildcard beside a bearer token would let any page use a
//! teacher's token that the browser holds.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, request::Parts, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Which origins may read which routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorsSettings {
    /// May read `/catalog/…`; `*`: any.
    pub catalog: Vec<String>,
    /// May read `/teachers/…` with `Authorization`; never `*`.
    pub dashboard: Vec<String>,
}

/// A setting that stops the process at start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CorsError {
    #[error("COURSEVIEW_CORS_DASHBOARD_ORIGINS cannot be \"*\": the dashboard takes bearer tokens; list its origins")]
    WildcardDashboard,
    #[error("CORS origin {0:?} is not an origin like https://app.example.com (scheme, host, optional port; no path)")]
    NotAnOrigin(String),
}

impl CorsSettings {
    /// From comma-separated lists, checked.
    pub fn parse(catalog: &str, dashboard: &str) -> Result<CorsSettings, CorsError> {
        // Browsers send scheme and host in lower case.
        let list = |s: &str| -> Vec<String> {
            s.split(',')
                .map(str::trim)
                .filter(|o| !o.is_empty())
                .map(str::to_ascii_lowercase)
                .collect()
        };
        let settings = CorsSettings {
            catalog: list(catalog),
            dashboard: list(dashboard),
        };
        if settings.dashboard.iter().any(|o| o == "*") {
            return Err(CorsError::WildcardDashboard);
        }
        for origin in settings.catalog.iter().chain(&settings.dashboard) {
            if origin != "*" && !is_origin(origin) {
                return Err(CorsError::NotAnOrigin(origin.clone()));
            }
        }
        Ok(settings)
    }

    pub fn enabled(&self) -> bool {
        !self.catalog.is_empty() || !self.dashboard.is_empty()
    }

    /// Whether `origin` may read `path`.
    fn allows(&self, origin: &str, path: &str) -> bool {
        if path == "/catalog" || path.starts_with("/catalog/") {
            self.catalog.iter().any(|o| o == "*" || o == origin)
        } else if path.starts_with("/teachers/") {
            self.dashboard.iter().any(|o| o == origin)
        } else {
            false
        }
    }

    /// The layer, or `None` when no origin is listed (CORS off).
    pub fn layer(&self) -> Option<CorsLayer> {
        if !self.enabled() {
            return None;
        }
        let settings = Arc::new(self.clone());
        Some(
            CorsLayer::new()
                .allow_origin(AllowOrigin::predicate(move |origin: &HeaderValue, parts: &Parts| {
                    origin
                        .to_str()
                        .is_ok_and(|origin| settings.allows(origin, parts.uri.path()))
                }))
                .allow_methods([Method::GET, Method::HEAD])
                .allow_headers([header::AUTHORIZATION, header::IF_NONE_MATCH])
                .expose_headers([header::ETAG, header::RETRY_AFTER])
                .max_age(Duration::from_secs(600)),
        )
    }
}

/// Outside the CORS layer (which takes every `OPTIONS` for a preflight):
/// an `OPTIONS` that is no preflight is a method this read-only API does
/// not serve, a 405 as without CORS.
pub async fn only_preflights(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    if request.method() == Method::OPTIONS && !request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
        return super::ApiError::MethodNotAllowed.into_response();
    }
    next.run(request).await
}

/// `scheme://host[:port]`, nothing after.
fn is_origin(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains('/')
        && !rest.contains('?')
        && !rest.contains('#')
        && !rest.contains(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dashboard_never_takes_a_wildcard_and_origins_must_be_origins() {
        assert_eq!(CorsSettings::parse("", "*"), Err(CorsError::WildcardDashboard));
        assert!(matches!(
            CorsSettings::parse("https://a.example/path", ""),
            Err(CorsError::NotAnOrigin(_))
        ));
        let s = CorsSettings::parse("*", "https://teach.example").expect("valid");
        assert!(s.allows("https://any.example", "/catalog/courses"));
        assert!(!s.allows("https://any.example", "/teachers/t/courses"));
        assert!(s.allows("https://teach.example", "/teachers/t/courses"));
        assert!(!s.allows("https://teach.example", "/projections"));
    }

    #[test]
    fn no_origin_listed_is_no_layer() {
        assert!(CorsSettings::parse(" , ", "").expect("valid").layer().is_none());
    }
}
