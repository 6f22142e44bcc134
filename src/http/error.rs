//! API errors as RFC 9457 problem details. Internals (driver messages,
//! hostnames) are logged, never returned.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tracing::error;

use crate::mongo::StoreError;

/// Everything a handler can answer besides success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The client's fault: a query or path parameter is invalid.
    #[error("invalid parameter {parameter:?}: {message}")]
    BadParameter { parameter: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// `minVersion` was not reached in time.
    #[error("projection is behind")]
    Behind { wanted: i64, applied: Option<i64> },
    /// MongoDB is unreachable: retry later.
    #[error("read model store unavailable")]
    Unavailable,
    /// No valid bearer token for a private resource.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid token, for someone else's resource.
    #[error("{0}")]
    Forbidden(String),
    /// The teacher dashboard has no key configured.
    #[error("the teacher dashboard is off")]
    DashboardOff,
    /// The request outlived the server's time limit.
    #[error("request timed out")]
    TimedOut,
    /// Too many requests of one expensive kind at once (`search`, `minVersion`).
    #[error("too many {0} requests at once")]
    Busy(&'static str),
    /// Anything unexpected; details go to the log only.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn bad(parameter: &str, message: impl Into<String>) -> Self {
        ApiError::BadParameter {
            parameter: parameter.to_owned(),
            message: message.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_transient() {
            error!(error = %e, "MongoDB unavailable for an API read.");
            ApiError::Unavailable
        } else {
            error!(error = %e, "API read failed.");
            ApiError::Internal
        }
    }
}

/// The problem+json body.
#[derive(Debug, Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    title: &'a str,
    status: u16,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameter: Option<&'a str>,
    #[serde(rename = "wantedVersion", skip_serializing_if = "Option::is_none")]
    wanted_version: Option<i64>,
    #[serde(rename = "appliedVersion", skip_serializing_if = "Option::is_none")]
    applied_version: Option<i64>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let detail = self.to_string();
        let (status, kind, title) = match &self {
            ApiError::BadParameter { .. } => (StatusCode::BAD_REQUEST, "/problems/bad-parameter", "Bad parameter"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "/problems/not-found", "Not found"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "/problems/unauthorized", "Unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "/problems/forbidden", "Forbidden"),
            ApiError::DashboardOff => (StatusCode::NOT_FOUND, "/problems/dashboard-off", "Not found"),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "/problems/method-not-allowed",
                "Method not allowed",
            ),
            ApiError::Behind { .. } => (
                StatusCode::CONFLICT,
                "/problems/projection-behind",
                "Projection is behind",
            ),
            ApiError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "/problems/unavailable",
                "Service unavailable",
            ),
            ApiError::TimedOut => (
                StatusCode::SERVICE_UNAVAILABLE,
                "/problems/timed-out",
                "Request timed out",
            ),
            ApiError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "/problems/busy", "Too busy"),
            ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "/problems/internal",
                "Internal error",
            ),
        };
        let detail = match &self {
            ApiError::MethodNotAllowed => "this API is read-only: use GET or HEAD".to_owned(),
            ApiError::Behind { wanted, applied } => format!(
                "the projection has applied version {} of this course, not yet {wanted}; retry shortly",
                applied.map_or_else(|| "none".to_owned(), |v| v.to_string())
            ),
            ApiError::Unavailable => "the read model store is unreachable; retry shortly".to_owned(),
            ApiError::TimedOut => "the request took longer than the server allows; retry shortly".to_owned(),
            ApiError::Busy(kind) => {
                format!("too many {kind} requests are running; retry shortly (cached reads are not limited)")
            }
            ApiError::DashboardOff => "the teacher dashboard needs a token key: start the API with --jwt-hs256-secret, --jwt-public-key or --jwt-jwks (or --dashboard-public, for development only)".to_owned(),
            _ => detail,
        };
        let (wanted_version, applied_version) = match &self {
            ApiError::Behind { wanted, applied } => (Some(*wanted), *applied),
            _ => (None, None),
        };
        let body = Problem {
            kind,
            title,
            status: status.as_u16(),
            detail,
            parameter: match &self {
                ApiError::BadParameter { parameter, .. } => Some(parameter),
                _ => None,
            },
            wanted_version,
            applied_version,
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (status, json).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self {
            ApiError::MethodNotAllowed => {
                headers.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            }
            ApiError::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"courseview\""),
                );
            }
            ApiError::Unavailable | ApiError::TimedOut | ApiError::Behind { .. } | ApiError::Busy(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}
