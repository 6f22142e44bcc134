//! Route handlers: parse parameters, read through the cache, answer JSON.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, RawQuery};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::json;

use super::params::{Cursor, Params, Sort};
use super::{ApiError, AppState, AppStateExt, Expensive};
use crate::cache::Answer;
use crate::mongo::{ListQuery, Listing, Store};
use crate::read_model::ReadModel;
use crate::telemetry;

const STATUS_PAGE: &str = include_str!("status.html");

/// The query parameters each route accepts; anything else is a 400. The
/// OpenAPI test holds these and the document to the same lists.
pub const CATALOG_LIST_QUERY: &[&str] = &["teacherId", "q", "sort", "limit", "cursor"];
pub const TEACHER_COURSES_QUERY: &[&str] = &["sort", "limit", "cursor"];
pub const CATALOG_COURSE_QUERY: &[&str] = &["minVersion"];

/// Route templates (as in the OpenAPI document) and the query parameters
/// their handlers accept.
pub const QUERY_PARAMETERS: &[(&str, &[&str])] = &[
    ("/catalog/courses", CATALOG_LIST_QUERY),
    ("/catalog/courses/{courseId}", CATALOG_COURSE_QUERY),
    ("/teachers/{teacherId}/courses", TEACHER_COURSES_QUERY),
    ("/projections", &[]),
];

/// Every route template this API serves, for metric labels.
const TEMPLATES: &[&str] = &[
    "/catalog/courses",
    "/catalog/courses/{courseId}",
    "/teachers/{teacherId}/courses",
    "/projections",
    "/status",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
];

/// The static name of a matched route template.
pub fn template(matched: &str) -> &'static str {
    TEMPLATES.iter().find(|t| **t == matched).copied().unwrap_or("other")
}

/// How often a `minVersion` wait re-reads the applied version when no
/// notice says it moved: notices followed (a worker that does not announce
/// its writes is the reason to look at all) ...
const VERSION_RECHECK: Duration = Duration::from_millis(250);
/// ... and notices not followed (no Redis, or the subscription is down).
const VERSION_POLL: Duration = Duration::from_millis(100);
/// The least time between two reads of one wait.
const VERSION_SPACING: Duration = Duration::from_millis(25);

pub(super) fn id_param(name: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > 200 {
        return Err(ApiError::bad(name, "must be 1 to 200 characters"));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::bad(name, "must not contain control characters"));
    }
    Ok(())
}

/// `GET /catalog/courses?teacherId=&q=&sort=newest|name&limit=&cursor=`
#[utoipa::path(get, path = "/catalog/courses", tag = "catalog",
    params(
        ("teacherId" = Option<String>, Query, description = "Only this teacher's courses"),
        ("q" = Option<String>, Query, description = "Case-insensitive literal match on name and description (at most 200 characters)"),
        ("sort" = Option<super::params::Sort>, Query, description = "newest (default): last posted first; name: by name"),
        ("limit" = Option<i64>, Query, minimum = 1, description = "Items per page (default 20; larger values are capped at 100)"),
        ("cursor" = Option<String>, Query, description = "nextCursor of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of posted courses", body = super::openapi::CatalogPage),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 400, description = "A bad parameter", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "MongoDB unreachable, or the request took too long", body = super::openapi::Problem, content_type = "application/problem+json"),
    ))]
pub async fn catalog_list(
    state: AppStateExt,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref(), CATALOG_LIST_QUERY)?;
    let sort = params.sort()?;
    let teacher = params.text("teacherId")?.map(str::to_owned);
    let text = params.text("q")?;
    // A search walks every listed course: bounded in how many read MongoDB
    // at once (a cached search page takes no permit).
    let expensive = text.map(|_| Expensive::Search);
    let listing = Listing::Catalog {
        teacher,
        text: text.map(str::to_owned),
    };
    list(&state, ReadModel::Catalog, listing, sort, &params, expensive, &headers).await
}

/// `GET /teachers/{teacherId}/courses?sort=newest|name&limit=&cursor=`:
/// every non-deleted course of the teacher, drafts included.
#[utoipa::path(get, path = "/teachers/{teacherId}/courses", tag = "teachers",
    params(
        ("teacherId" = String, Path, description = "The teacher"),
        ("sort" = Option<super::params::Sort>, Query, description = "newest (default): last registered first; name: by name"),
        ("limit" = Option<i64>, Query, minimum = 1, description = "Items per page (default 20; capped at 100)"),
        ("cursor" = Option<String>, Query, description = "nextCursor of the previous page"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every non-deleted course of the teacher, drafts included", body = super::openapi::TeacherPage),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 400, description = "A bad parameter", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token names another teacher", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "The dashboard is off (no token key configured)", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "MongoDB unreachable, or the request took too long", body = super::openapi::Problem, content_type = "application/problem+json"),
    ))]
pub async fn teacher_courses(
    state: AppStateExt,
    Path(teacher_id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    id_param("teacherId", &teacher_id)?;
    // Before anything is read: drafts are private.
    state.auth.authorize(&headers, &teacher_id)?;
    let params = Params::parse(query.as_deref(), TEACHER_COURSES_QUERY)?;
    let sort = params.sort()?;
    let listing = Listing::Teacher { teacher: teacher_id };
    list(
        &state,
        ReadModel::TeacherCourses,
        listing,
        sort,
        &params,
        None,
        &headers,
    )
    .await
}

/// One page of a listing, through the cache.
async fn list(
    state: &AppState,
    model: ReadModel,
    listing: Listing,
    sort: Sort,
    params: &Params,
    expensive: Option<Expensive>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let page = ListQuery {
        listing,
        order: sort.into(),
        after: params.cursor(sort)?.map(|c| (c.key, c.id)),
        limit: params.limit(state.settings.default_limit, state.settings.max_limit)?,
    };
    let generation = state.generation(model).await?;
    let collection = Store::collection_name(model.name(), generation);
    let suffix = format!(
        "list:{}:{}",
        page.listing.teacher().unwrap_or_default(),
        params.canonical()
    );
    let body = state
        .cached(model, generation, &suffix, || async {
            let _permit = expensive.map(|class| state.expensive(class)).transpose()?;
            let found = state.store.page(&collection, &page).await?;
            let next_cursor = match (found.more, found.items.last()) {
                (true, Some(last)) => Some(
                    Cursor {
                        sort,
                        key: last.key.clone(),
                        id: last.id.clone(),
                    }
                    .encode(),
                ),
                _ => None,
            };
            let items: Vec<_> = found.items.into_iter().map(|item| item.view).collect();
            Ok(Some(
                serde_json::to_vec(&json!({"items": items, "nextCursor": next_cursor})).unwrap_or_default(),
            ))
        })
        .await?
        // The loader always answers a page; nothing cached is absent.
        .unwrap_or_else(|| Answer::new(Bytes::new()));
    Ok(state.json(headers, body))
}

/// `GET /catalog/courses/{courseId}[?minVersion=N]`
#[utoipa::path(get, path = "/catalog/courses/{courseId}", tag = "catalog",
    params(
        ("courseId" = String, Path, description = "The course"),
        ("minVersion" = Option<i64>, Query, minimum = 0, description = "Wait (bounded) until the projection has applied this version of the course"),
    ),
    responses(
        (status = 200, description = "The course", body = super::openapi::CatalogCourse),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 400, description = "A bad parameter", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not posted, deleted or unknown", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 409, description = "The projection has not applied minVersion in time", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "MongoDB unreachable, or the request took too long", body = super::openapi::Problem, content_type = "application/problem+json"),
    ))]
pub async fn catalog_course(
    state: AppStateExt,
    Path(course_id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    id_param("courseId", &course_id)?;
    let params = Params::parse(query.as_deref(), CATALOG_COURSE_QUERY)?;
    let model = ReadModel::Catalog;
    let generation = state.generation(model).await?;
    let collection = Store::collection_name(model.name(), generation);
    if let Some(wanted) = params.version("minVersion")? {
        let _permit = state.expensive(Expensive::VersionWait)?;
        wait_for_version(&state, &collection, &course_id, wanted).await?;
        // Answer from the state waited for, never from an older cached one.
        let view = state.store.listed_view(&collection, &course_id).await?;
        state.forget_generation(model, generation);
        return match view {
            Some(v) => Ok(state.json(&headers, Answer::new(serde_json::to_vec(&v).unwrap_or_default().into()))),
            None => Err(not_in_catalog(&course_id)),
        };
    }
    // An answer memory holds for a plain GET is served ahead of the router
    // (`fast`): what this does for it, that does too.
    let body = state
        .cached(model, generation, &course_suffix(&course_id), || async {
            let view = state.store.listed_view(&collection, &course_id).await?;
            Ok(view.map(|v| serde_json::to_vec(&v).unwrap_or_default()))
        })
        .await?;
    match body {
        Some(body) => Ok(state.json(&headers, body)),
        None => Err(not_in_catalog(&course_id)),
    }
}

/// The cache key suffix of a course's answer.
pub(super) fn course_suffix(course_id: &str) -> String {
    ["course:", course_id].concat()
}

/// The 404 of a course the catalog does not list.
pub(super) fn not_in_catalog(course_id: &str) -> ApiError {
    ApiError::NotFound(format!("course {course_id:?} is not in the catalog"))
}

/// Read-your-writes: waits until the projection has applied `wanted` for
/// this course, up to the configured bound. Reads MongoDB directly (the
/// cache cannot answer "has version N landed"), once, then again when a
/// worker's epoch bump is heard (a bump follows its batch's write), so a
/// wait costs MongoDB a few reads, not one every few milliseconds.
async fn wait_for_version(state: &AppState, collection: &str, course_id: &str, wanted: i64) -> Result<(), ApiError> {
    let deadline = tokio::time::Instant::now() + state.settings.min_version_wait;
    // Subscribed before the first read, so a bump between the two counts.
    let mut changes = state
        .caches
        .local
        .as_ref()
        .map(|local| (Arc::clone(local), local.changes()));
    loop {
        let applied = state.store.applied_version(collection, course_id).await?;
        if applied.is_some_and(|v| v >= wanted) {
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(ApiError::Behind { wanted, applied });
        }
        let next = match &changes {
            Some((local, _)) if local.trusted() => VERSION_RECHECK,
            _ => VERSION_POLL,
        };
        let until = (now + next).min(deadline);
        // Bumps of any scope wake every waiter: read at most every
        // VERSION_SPACING however often they come.
        tokio::time::sleep_until((now + VERSION_SPACING).min(deadline)).await;
        match &mut changes {
            Some((_, changes)) => {
                // Woken by a bump, or at `until`. The sender lives in
                // `local`, held here, so the channel never closes.
                let _ = tokio::time::timeout_at(until, changes.changed()).await;
                changes.mark_unchanged();
            }
            None => tokio::time::sleep_until(until).await,
        }
    }
}

/// `GET /projections`: per projection and partition, stored offset, high
/// watermark, lag, generation, state and rebuild progress.
#[utoipa::path(get, path = "/projections", tag = "operations",
    responses(
        (status = 200, description = "Per projection: state, generation, partitions, lag, rebuild, workers; and the cache's state", body = super::openapi::Projections),
        (status = 400, description = "A bad parameter", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "Status is not enabled on this API", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "MongoDB or Kafka unreachable, or too slow", body = super::openapi::Problem, content_type = "application/problem+json"),
    ))]
pub async fn projections(state: AppStateExt, RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    Params::parse(query.as_deref(), &[])?;
    let all = state.projection_status(super::STATUS_LIMIT).await?;
    let cache = match &state.caches.redis {
        None => "disabled",
        Some(cache) if cache.ping().await => "up",
        Some(_) => "down",
    };
    Ok((
        StatusCode::OK,
        axum::Json(json!({"projections": *all, "cache": {"state": cache}})),
    )
        .into_response())
}

/// `GET /status`: the operators' page. Static HTML and script compiled into
/// the binary (no build step, no CDN) that polls `GET /projections`.
#[utoipa::path(get, path = "/status", tag = "operations",
    responses((status = 200, description = "The operators' status page", content_type = "text/html", body = String)))]
pub async fn status_page() -> Response {
    let mut response = STATUS_PAGE.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /healthz`: the process is alive.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is alive", body = super::openapi::Health)))]
pub async fn healthz() -> Response {
    (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response()
}

/// `GET /readyz`: MongoDB answers, so reads can be served.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "MongoDB answers", body = super::openapi::Health),
        (status = 503, description = "MongoDB unreachable", body = super::openapi::Problem, content_type = "application/problem+json"),
    ))]
pub async fn readyz(state: AppStateExt) -> Result<Response, ApiError> {
    state.store.ping().await?;
    // A live worker that does not invalidate this API's cache (no Redis, or
    // another key prefix) lets cached answers go stale for their TTL.
    if let Some(cache) = &state.caches.redis {
        let blind: Vec<String> = state
            .store
            .live_workers(None)
            .await?
            .into_iter()
            .filter(|w| w.invalidates.as_deref() != Some(cache.prefix()))
            .map(|w| {
                format!(
                    "{} (invalidates {})",
                    w.id,
                    w.invalidates
                        .as_deref()
                        .map_or("no cache".to_owned(), |p| format!("prefix {p:?}"))
                )
            })
            .collect();
        if !blind.is_empty() {
            return Ok((
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({
                    "status": "not ready",
                    "workersNotInvalidatingThisCache": blind,
                    "cachePrefix": cache.prefix(),
                })),
            )
                .into_response());
        }
    }
    Ok((StatusCode::OK, axum::Json(json!({"status": "ready"}))).into_response())
}

/// `GET /metrics`: Prometheus text.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn metrics() -> Response {
    let mut response = telemetry::prometheus().render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// `GET /openapi.json`: this document, generated from the code.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = Object)))]
pub async fn openapi(state: AppStateExt) -> Response {
    let mut response = state.openapi.as_ref().clone().into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such resource".to_owned())
}
