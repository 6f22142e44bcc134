//! The OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]`
//! annotations and these schema types. The router is built from the same
//! annotations (utoipa-axum), so a route cannot exist without its entry.
//!
//! The course schemas are the projections' own view types (their `openapi`
//! feature derives the schema); Schemathesis checks every response against
//! the document in `scripts/test`.

pub use courseview_projections::{CatalogCourse, TeacherCourse};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

/// RFC 9457 problem details: every error answer.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)]
pub struct Problem {
    /// A URI reference naming the kind of problem, e.g. `/problems/bad-parameter`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    /// What went wrong, for people.
    pub detail: String,
    /// The offending parameter (400).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
    /// `minVersion` asked for (409).
    #[serde(rename = "wantedVersion", skip_serializing_if = "Option::is_none")]
    pub wanted_version: Option<i64>,
    /// The version the projection has applied (409), if any.
    #[serde(rename = "appliedVersion", skip_serializing_if = "Option::is_none")]
    pub applied_version: Option<i64>,
}

/// A page of the catalog.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct CatalogPage {
    pub items: Vec<CatalogCourse>,
    /// Pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// A page of a teacher's dashboard.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct TeacherPage {
    pub items: Vec<TeacherCourse>,
    pub next_cursor: Option<String>,
}

/// `{"status": …}` of the health endpoints.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)]
pub struct Health {
    pub status: String,
}

/// The cache's state as this API sees it.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)]
pub struct CacheState {
    /// `up`, `down` or `disabled`.
    pub state: String,
}

/// `GET /projections`.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)]
pub struct Projections {
    pub projections: Vec<crate::status::ProjectionStatus>,
    pub cache: CacheState,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "courseview",
        description = "Read-only query API over the course read models (the Q of CQRS). Errors are RFC 9457 problem details; reads carry ETags. Every method but GET and HEAD is a 405 problem, except, when the server lists CORS origins (COURSEVIEW_CORS_ORIGINS for /catalog, COURSEVIEW_CORS_DASHBOARD_ORIGINS for /teachers), the CORS preflight: an OPTIONS with Access-Control-Request-Method, answered with the Access-Control-Allow-* headers for a listed origin.",
    ),
    components(schemas(Problem))
)]
pub struct ApiDoc;
