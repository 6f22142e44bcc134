//! HTTP: the read-only query API (DESIGN §4). [`app`] builds the router so
//! tests can drive it without a socket; [`serve`] runs it until shutdown.

mod auth;
pub mod cors;
mod error;
mod fast;
mod openapi;
mod params;
mod respond;
mod routes;
mod snapshot;
mod worker;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio_util::sync::CancellationToken;
use tower_http::compression::predicate::{DefaultPredicate, Predicate, SizeAbove};
use tower_http::compression::CompressionLayer;
use tower_http::trace::TraceLayer;

pub use auth::{AuthConfigError, DashboardAuth, JwtSettings, JwtVerifier};
pub use error::ApiError;
pub use routes::{template as route_template, QUERY_PARAMETERS};
pub use worker::{serve_worker, worker_app, WorkerHealth};

use respond::{json_response, GzipMemo, GZIP_MEMO_BYTES};

use crate::cache::{Answer, Cache, LocalCache, ReadThrough, Scope};
use crate::mongo::{Store, StoreError};
use crate::read_model::ReadModel;
use crate::status::{ProjectionStatus, StatusProbe};
use crate::telemetry;

/// How long `GET /projections` waits for a measurement.
const STATUS_LIMIT: Duration = Duration::from_secs(3);

/// How long a resolved generation pointer is trusted before re-reading it.
const GENERATION_TTL: Duration = Duration::from_millis(250);

/// How often [`serve`] re-reads the generation pointers in the background.
const POINTER_EVERY: Duration = Duration::from_millis(200);

/// How long one background read of a generation pointer may take: a read
/// that hangs (a half-open socket) must not freeze the follower.
const POINTER_READ_LIMIT: Duration = Duration::from_millis(500);

/// How long a pointer read by the follower is served. Past it the API may
/// be cut off from MongoDB while a rebuild switches, so a request reads
/// the pointer itself (and waits, or fails, on MongoDB) rather than serve
/// a generation that may no longer be the one readers follow.
const FOLLOWED_TRUST: Duration = Duration::from_secs(1);

/// Kinds of request that cost the database far more than a cached read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expensive {
    /// A catalog page with `q` (a regex over every listed course).
    Search,
    /// A course with `minVersion` (re-reads until the version lands).
    VersionWait,
}

impl Expensive {
    pub fn name(self) -> &'static str {
        match self {
            Expensive::Search => "search",
            Expensive::VersionWait => "minVersion",
        }
    }
}

/// API tuning.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub default_limit: i64,
    pub max_limit: i64,
    /// Longest `minVersion` wait.
    pub min_version_wait: Duration,
    pub request_timeout: Duration,
    /// `q` searches that may read MongoDB at once (each walks the listed
    /// courses with a regex); past it, a fast 503 with `Retry-After`.
    pub max_searches: usize,
    /// `minVersion` waits that may run at once (each re-reads MongoDB until
    /// its version lands); past it, a fast 503 with `Retry-After`.
    pub max_waits: usize,
    /// Origins that may read cross-origin (off by default).
    pub cors: cors::CorsSettings,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            default_limit: 20,
            max_limit: 100,
            min_version_wait: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            // The driver's pool holds 10 connections: searches may take a
            // few, the cached reads keep the rest.
            max_searches: 4,
            max_waits: 16,
            cors: cors::CorsSettings::default(),
        }
    }
}

/// Shared state of the API handlers. axum clones it for every request, so
/// it is one `Arc` (cloning the fields themselves was 7 % of a cached
/// GET's CPU time in a profile).
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

#[derive(Debug, Clone)]
pub struct Shared {
    store: Store,
    /// Redis and, in front of it, answers in process memory (which Redis's
    /// notices keep fresh).
    caches: ReadThrough,
    gzipped: Arc<GzipMemo>,
    settings: ApiSettings,
    generations: Arc<RwLock<HashMap<ReadModel, (u32, Instant)>>>,
    /// Set while [`AppState::follow_pointers`] keeps `generations` fresh:
    /// requests then never read the pointer themselves.
    pointers_followed: Arc<std::sync::atomic::AtomicBool>,
    status: Option<StatusProbe>,
    auth: DashboardAuth,
    /// This API's OpenAPI document as JSON (set when the router is built).
    openapi: Arc<Vec<u8>>,
    /// Projection status: one measurement at a time, shared by
    /// concurrent requests.
    status_share: Arc<snapshot::StatusShare>,
    /// Permits of the expensive request classes (see [`ApiSettings`]).
    searches: Arc<tokio::sync::Semaphore>,
    waits: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    pub fn new(store: Store, cache: Option<Cache>, settings: ApiSettings) -> Self {
        AppState(Arc::new(Shared {
            store,
            caches: ReadThrough {
                redis: cache,
                local: None,
            },
            gzipped: Arc::new(GzipMemo::new(GZIP_MEMO_BYTES)),
            generations: Arc::default(),
            pointers_followed: Arc::default(),
            status: None,
            auth: DashboardAuth::Off,
            openapi: Arc::default(),
            status_share: Arc::default(),
            searches: Arc::new(tokio::sync::Semaphore::new(settings.max_searches.max(1))),
            waits: Arc::new(tokio::sync::Semaphore::new(settings.max_waits.max(1))),
            settings,
        }))
    }

    /// A permit of an expensive request class, or `Busy` at once when all
    /// are taken: one kind of request never takes the whole pool.
    pub fn expensive(&self, class: Expensive) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        let permits = match class {
            Expensive::Search => &self.searches,
            Expensive::VersionWait => &self.waits,
        };
        Arc::clone(permits).try_acquire_owned().map_err(|_| {
            telemetry::expensive_refused(class.name());
            ApiError::Busy(class.name())
        })
    }

    /// Guards the teacher dashboard.
    pub fn with_auth(mut self, auth: DashboardAuth) -> Self {
        self.inner().auth = auth;
        self
    }

    /// The fields, to set while the state is being built (not yet shared,
    /// so nothing is copied).
    fn inner(&mut self) -> &mut Shared {
        Arc::make_mut(&mut self.0)
    }

    /// Keeps up to `max_bytes` of answers in process memory (0: none). Only
    /// with Redis, whose notices keep them fresh; [`serve`] follows them
    /// (with no bytes too: `minVersion` waits on them).
    pub fn with_local_cache(mut self, max_bytes: u64) -> Self {
        let inner = self.inner();
        inner.caches.local = inner
            .caches
            .redis
            .as_ref()
            .map(|cache| LocalCache::new(max_bytes, cache.ttl()));
        self
    }

    /// The in-process cache, if on.
    pub fn local_cache(&self) -> Option<Arc<LocalCache>> {
        self.caches.local.clone()
    }

    /// Enables `GET /projections`.
    pub fn with_status(mut self, probe: StatusProbe) -> Self {
        self.inner().status = Some(probe);
        self
    }

    /// Projection status, measured once however many requests ask, and
    /// within `limit` (the request waits no longer).
    async fn projection_status(&self, limit: Duration) -> Result<Arc<Vec<ProjectionStatus>>, ApiError> {
        let Some(probe) = &self.status else {
            return Err(ApiError::NotFound(
                "projection status is not enabled on this API".into(),
            ));
        };
        self.status_share.get(probe, limit).await
    }

    /// The generation readers currently follow for this read model.
    async fn generation(&self, model: ReadModel) -> Result<u32, StoreError> {
        if let Some(generation) = self.known_generation(model) {
            return Ok(generation);
        }
        let asked = Instant::now();
        let read = self.store.serving_generation(model.name()).await?;
        Ok(self.remember_generation(model, read, asked))
    }

    /// The generation last read for `model`, if read recently enough to
    /// serve it without reading the pointer again.
    fn known_generation(&self, model: ReadModel) -> Option<u32> {
        // Followed in the background, the last read is trusted a little
        // longer, so a cached answer does not wait on MongoDB for the
        // pointer; never longer than FOLLOWED_TRUST.
        let trusted = if self.pointers_followed.load(std::sync::atomic::Ordering::Acquire) {
            FOLLOWED_TRUST
        } else {
            GENERATION_TTL
        };
        let known = self.generations.read().ok()?;
        let (generation, at) = known.get(&model)?;
        (at.elapsed() < trusted).then_some(*generation)
    }

    /// Re-reads every read model's generation pointer every
    /// [`POINTER_EVERY`] until `cancel` (readers follow a switch within
    /// that and one read), so requests find it in memory. Each read is
    /// bounded by [`POINTER_READ_LIMIT`]; failures are logged once per
    /// episode, and the recovery too.
    async fn follow_pointers(self, cancel: CancellationToken) {
        self.pointers_followed.store(true, std::sync::atomic::Ordering::Release);
        // Per read model: one pointer may fail while the other reads fine.
        let mut failing: HashMap<ReadModel, bool> = HashMap::new();
        loop {
            // Both at once: one hanging read must not age the other's.
            let asked = Instant::now();
            let reads =
                futures::future::join_all(ReadModel::ALL.map(|model| {
                    tokio::time::timeout(POINTER_READ_LIMIT, self.store.serving_generation(model.name()))
                }));
            let reads = tokio::select! {
                () = cancel.cancelled() => return,
                reads = reads => reads,
            };
            for (model, read) in ReadModel::ALL.into_iter().zip(reads) {
                let failing = failing.entry(model).or_default();
                let failure = match read {
                    Ok(Ok(generation)) => {
                        self.remember_generation(model, generation, asked);
                        None
                    }
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some(format!("no answer within {POINTER_READ_LIMIT:?}")),
                };
                match failure {
                    Some(error) if !*failing => {
                        *failing = true;
                        tracing::warn!(projection = model.name(), %error, trusted_for = ?FOLLOWED_TRUST, "Cannot read the generation pointer; the last one read is served for a moment, then requests read it themselves.");
                    }
                    None if *failing => {
                        *failing = false;
                        tracing::info!(projection = model.name(), "Generation pointer read again.");
                    }
                    _ => {}
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(POINTER_EVERY) => {}
            }
        }
    }

    /// Records a generation read from the pointer and returns the one to
    /// serve: never an older one than this API has served already. (Two
    /// requests race: one that read the pointer just before a switch must
    /// not put the old generation back after another saw the new one; the
    /// old one is frozen, so readers would go back in time.) Generations
    /// only grow, and an in-place rebuild keeps its number. `asked` is when
    /// the read was sent: the pointer is at least that fresh, and no more,
    /// so the trust windows count from there.
    fn remember_generation(&self, model: ReadModel, read: u32, asked: Instant) -> u32 {
        let Ok(mut known) = self.generations.write() else {
            return read;
        };
        let entry = known.entry(model).or_insert((read, asked));
        if read >= entry.0 {
            *entry = (read, asked.max(entry.1));
        }
        entry.0
    }

    /// Serves a JSON answer from the cache, or computes and caches it.
    /// `None` from `load` is a 404 (cached too, so hot misses stay cheap).
    async fn cached<F, Fut>(
        &self,
        model: ReadModel,
        generation: u32,
        suffix: &str,
        load: F,
    ) -> Result<Option<Answer>, ApiError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Option<Vec<u8>>, ApiError>>,
    {
        let scope = Scope {
            projection: model.name(),
            generation,
        };
        self.caches.get_or_load(scope, suffix, load).await
    }

    /// A JSON 200 (or 304), compressed bodies memoized.
    fn json(&self, request_headers: &HeaderMap, answer: Answer) -> Response {
        json_response(request_headers, answer, Some(&self.gzipped))
    }

    /// An answer read from MongoDB outside the cache (`minVersion`) may be
    /// newer than what memory holds for the generation.
    fn forget_generation(&self, model: ReadModel, generation: u32) {
        self.caches.forget_scope(Scope {
            projection: model.name(),
            generation,
        });
    }
}

/// The routes and the OpenAPI document, from the same annotations.
pub fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    use utoipa::OpenApi as _;
    use utoipa_axum::router::OpenApiRouter;
    use utoipa_axum::routes;
    // The read models' JSON answers gzip themselves, from a memo
    // (`respond`): the compression layer wraps only the other routes, and
    // a cached answer does not pass through it.
    let compressed = OpenApiRouter::new()
        .routes(routes!(routes::projections))
        .routes(routes!(routes::status_page))
        .routes(routes!(routes::healthz))
        .routes(routes!(routes::readyz))
        .routes(routes!(routes::metrics))
        .routes(routes!(routes::openapi))
        .layer(CompressionLayer::new().compress_when(DefaultPredicate::new().and(SizeAbove::new(1024))));
    let (router, mut doc) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(routes::catalog_list))
        .routes(routes!(routes::catalog_course))
        .routes(routes!(routes::teacher_courses))
        .merge(compressed)
        .split_for_parts();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        utoipa::openapi::security::SecurityScheme::Http(
            utoipa::openapi::security::HttpBuilder::new()
                .scheme(utoipa::openapi::security::HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .build(),
        ),
    );
    (router, doc)
}

/// The OpenAPI document of this API.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    routes().1
}

/// The API router with every layer, ready to serve or to `oneshot`.
pub fn app(mut state: AppState) -> Router {
    telemetry::prometheus();
    let timeout = state.settings.request_timeout;
    let (router, doc) = routes();
    state.inner().openapi = Arc::new(doc.to_json().map(String::into_bytes).unwrap_or_default());
    let cors = state.settings.cors.layer();
    let router = router
        .fallback(routes::not_found)
        .with_state(state)
        .layer(middleware::from_fn_with_state(timeout, edge));
    // Outside the read-only rule, so a preflight is answered, not a 405.
    let router = match cors {
        Some(cors) => router.layer(cors).layer(middleware::from_fn(cors::only_preflights)),
        None => router,
    };
    router.layer(
        TraceLayer::new_for_http()
            .make_span_with(request_span)
            .on_response(record_status),
    )
}

/// The request's span: as tower-http's default (DEBUG, so off unless
/// `RUST_LOG` asks) while traces are not exported; exported, a SERVER span
/// continuing the caller's `traceparent`, named by its route in [`edge`].
fn request_span(request: &Request) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if !telemetry::traces::exporting() {
        return tracing::debug_span!("request", method = %request.method(), uri = %request.uri(), version = ?request.version());
    }
    let span = tracing::info_span!(
        "request",
        otel.name = %request.method(),
        otel.kind = "server",
        http.request.method = %request.method(),
        url.path = request.uri().path(),
        http.route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
    );
    // A malformed traceparent starts a new trace (what W3C asks).
    let _ = span.set_parent(telemetry::traces::http_context(request.headers()));
    span
}

fn record_status(response: &Response, latency: Duration, span: &tracing::Span) {
    use tower_http::trace::OnResponse;
    span.record("http.response.status_code", i64::from(response.status().as_u16()));
    // tower-http's own response log (DEBUG), as before.
    tower_http::trace::DefaultOnResponse::default().on_response(response, latency, span);
}

/// Serves `app` on `listener` until `shutdown` fires, then drains requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let (Some(cache), Some(local)) = (&state.caches.redis, &state.caches.local) {
        let (cache, local, cancel) = (cache.clone(), Arc::clone(local), shutdown.clone());
        tokio::spawn(async move { cache.follow_notices(local, cancel).await });
    }
    tokio::spawn(state.clone().follow_pointers(shutdown.clone()));
    let api = axum::ServiceExt::<Request>::into_make_service(fast::Api::new(state.clone(), app(state)));
    axum::serve(listener, api)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// The edge of every request, in one layer because each `from_fn` layer
/// costs a boxed future and a service clone per request (a cached GET is a
/// few microseconds): the API is read-only (anything but GET and HEAD is a
/// 405 problem), a request that outlives the time limit gets a 503
/// problem, and both count in the request metrics.
async fn edge(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    // The matched route template keeps the label bounded (no course ids).
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| routes::template(p.as_str()));
    if telemetry::traces::exporting() {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let span = tracing::Span::current();
        span.record("http.route", route);
        // Started spans take a new name only through the API itself.
        span.context()
            .span()
            .update_name(format!("{} {route}", request.method()));
    }
    let response = if request.method() == Method::GET || request.method() == Method::HEAD {
        match tokio::time::timeout(limit, next.run(request)).await {
            Ok(response) => response,
            Err(_) => ApiError::TimedOut.into_response(),
        }
    } else {
        ApiError::MethodNotAllowed.into_response()
    };
    telemetry::http_request(route, response.status().as_u16(), started.elapsed());
    response
}

/// `State` re-exported for route modules.
type AppStateExt = State<AppState>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pointer_read_from_before_a_switch_never_brings_the_old_generation_back() {
        // The driver connects lazily: nothing here talks to a server.
        let store = Store::connect("mongodb://127.0.0.1:1", "unused", Duration::from_millis(10))
            .await
            .expect("store");
        let state = AppState::new(store, None, ApiSettings::default());
        let now = Instant::now();
        assert_eq!(state.remember_generation(ReadModel::Catalog, 1, now), 1);
        assert_eq!(state.remember_generation(ReadModel::Catalog, 2, now), 2);
        assert_eq!(
            state.remember_generation(ReadModel::Catalog, 1, now),
            2,
            "a slow request's read of the old pointer"
        );
        assert_eq!(state.remember_generation(ReadModel::TeacherCourses, 1, now), 1);
    }
}
