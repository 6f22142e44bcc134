//! A course's answer that process memory holds, served ahead of the
//! router (issue 24, item 4). For it the router's layers do nothing: no
//! route to find, no parameter to parse, no time limit to keep, no span
//! that anyone records; in a profile of cached GETs they and the
//! handler's extractors were about half of the API's own CPU time.
//! Anything else goes through the router as before: another path or
//! method, a query string, an id the router would decode or refuse,
//! request spans recorded (traces exported, or tower-http's request logs
//! on), CORS on, or an answer memory may not serve now (the same
//! freshness rules as [`crate::cache::ReadThrough`]). So every answer is
//! the one the router would give. (Log directives scoped to the request
//! span, such as `[request]=debug`, see only what the router answers;
//! `tower_http=debug` sends every request through it.)

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::Request;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures::future::Either;

use super::{routes, AppState};
use crate::cache::Scope;
use crate::read_model::ReadModel;
use crate::telemetry;

const COURSE_PATH: &str = "/catalog/courses/";
const COURSE_ROUTE: &str = "/catalog/courses/{courseId}";

/// The API: memory's course answers, then the router.
#[derive(Clone)]
pub(super) struct Api {
    state: AppState,
    router: Router,
    /// CORS adds headers the answers here would lack.
    on: bool,
}

impl Api {
    /// `router`: [`app`] of the same state.
    pub(super) fn new(state: AppState, router: Router) -> Api {
        let on = !state.settings.cors.enabled();
        Api { state, router, on }
    }
}

impl tower::Service<Request> for Api {
    type Response = Response;
    type Error = Infallible;
    type Future =
        Either<std::future::Ready<Result<Response, Infallible>>, axum::routing::future::RouteFuture<Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower::Service::<Request>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match self.on.then(|| course_from_memory(&self.state, &request)).flatten() {
            Some(response) => Either::Left(std::future::ready(Ok(response))),
            None => Either::Right(self.router.call(request)),
        }
    }
}

/// `GET /catalog/courses/{id}` answered from memory, or `None` for the
/// router to answer.
fn course_from_memory(state: &AppState, request: &Request) -> Option<Response> {
    if request.method() != Method::GET || request.uri().query().is_some() {
        return None;
    }
    let id = request.uri().path().strip_prefix(COURSE_PATH)?;
    if id.contains(['/', '%']) || routes::id_param("courseId", id).is_err() || spans_recorded() {
        return None;
    }
    let started = Instant::now();
    let model = ReadModel::Catalog;
    let scope = Scope {
        projection: model.name(),
        generation: state.known_generation(model)?,
    };
    let response = match state.caches.memory(scope, &routes::course_suffix(id))? {
        Some(answer) => state.json(request.headers(), answer),
        None => routes::not_in_catalog(id).into_response(),
    };
    telemetry::http_request(COURSE_ROUTE, response.status().as_u16(), started.elapsed());
    Some(response)
}

/// Whether the router's request span would be recorded: as an exported
/// trace, or as tower-http's request log lines.
fn spans_recorded() -> bool {
    telemetry::traces::exporting()
        || tracing::enabled!(target: "tower_http::trace::on_request", tracing::Level::DEBUG)
        || tracing::enabled!(target: "tower_http::trace::on_response", tracing::Level::DEBUG)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::{header, StatusCode};
    use bytes::Bytes;
    use tower::ServiceExt;

    use super::*;
    use crate::cache::{Answer, Cache, ABSENT};
    use crate::http::{app, ApiSettings};
    use crate::mongo::Store;

    /// An API state whose memory holds these answers of catalog generation
    /// 1 (`None`: cached as absent). Nothing here talks to a server: the
    /// driver and the Redis client connect lazily, and a memory hit needs
    /// neither.
    async fn holding(answers: &[(&str, Option<&'static [u8]>)], settings: ApiSettings) -> AppState {
        let store = Store::connect("mongodb://127.0.0.1:1", "unused", Duration::from_millis(10))
            .await
            .expect("store");
        let cache = Cache::new(
            "redis://127.0.0.1:1",
            "fast",
            Duration::from_millis(10),
            Duration::from_secs(60),
        )
        .expect("cache");
        let state = AppState::new(store, Some(cache), settings).with_local_cache(1 << 20);
        state.remember_generation(ReadModel::Catalog, 1, Instant::now());
        let local = state.local_cache().expect("memory layer");
        local.fenced(local.now_ms());
        let base = state.caches.redis.as_ref().expect("redis").base(Scope {
            projection: "catalog",
            generation: 1,
        });
        for (id, body) in answers {
            let stamp = local.stamp(&base).expect("trusted");
            let answer = Answer::new(Bytes::from_static(body.unwrap_or(ABSENT)));
            local.insert(
                &base,
                &routes::course_suffix(id),
                stamp,
                answer,
                Duration::from_secs(60),
            );
        }
        state
    }

    /// Memory's answers ahead of a router that answers only 418, so an
    /// answer that went to the router shows.
    fn ahead_of_a_teapot(state: &AppState) -> Api {
        Api::new(
            state.clone(),
            Router::new().fallback(|| async { StatusCode::IM_A_TEAPOT }),
        )
    }

    async fn call<S>(
        service: S,
        method: Method,
        uri: &str,
        headers: &[(header::HeaderName, &str)],
    ) -> (u16, Vec<(String, String)>, Bytes)
    where
        S: tower::Service<Request, Response = Response, Error = Infallible>,
    {
        let mut request = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            request = request.header(name, *value);
        }
        let response = service
            .oneshot(request.body(Body::empty()).expect("request"))
            .await
            .expect("answered");
        let status = response.status().as_u16();
        let mut named: Vec<(String, String)> = response
            .headers()
            .iter()
            // axum writes it into the router's headers; hyper writes it on
            // the wire for both, from the body's exact length.
            .filter(|(n, _)| **n != header::CONTENT_LENGTH)
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("?").to_owned()))
            .collect();
        named.sort();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
        (status, named, body)
    }

    #[tokio::test]
    async fn a_course_memory_holds_is_answered_ahead_of_the_router_as_the_router_answers_it() {
        let state = holding(
            &[("c1", Some(br#"{"id":"c1"}"#)), ("gone", None)],
            ApiSettings::default(),
        )
        .await;
        let etag = Answer::new(Bytes::from_static(br#"{"id":"c1"}"#)).etag;
        let etag = etag.to_str().expect("etag");
        for (uri, headers, status) in [
            ("/catalog/courses/c1", vec![], 200),
            ("/catalog/courses/c1", vec![(header::IF_NONE_MATCH, etag)], 304),
            ("/catalog/courses/gone", vec![], 404),
        ] {
            let fast = call(ahead_of_a_teapot(&state), Method::GET, uri, &headers).await;
            assert_eq!(fast.0, status, "{uri} {headers:?}: {fast:?}");
            let routed = call(app(state.clone()), Method::GET, uri, &headers).await;
            assert_eq!(fast, routed, "{uri} {headers:?}: memory's answer against the router's");
        }
    }

    #[tokio::test]
    async fn anything_but_a_plain_get_of_a_course_memory_holds_goes_to_the_router() {
        let state = holding(&[("c1", Some(br#"{"id":"c1"}"#))], ApiSettings::default()).await;
        let long = format!("/catalog/courses/{}", "x".repeat(201));
        for (method, uri) in [
            (Method::GET, "/catalog/courses/c1?minVersion=1"),
            (Method::GET, "/catalog/courses/c1?"),
            (Method::HEAD, "/catalog/courses/c1"),
            (Method::GET, "/catalog/courses/c%31"),
            (Method::GET, "/catalog/courses/c1/"),
            (Method::GET, "/catalog/courses/"),
            (Method::GET, long.as_str()),
            (Method::GET, "/catalog/courses/other"),
            (Method::GET, "/catalog/courses"),
            (Method::GET, "/teachers/c1/courses"),
        ] {
            let (status, ..) = call(ahead_of_a_teapot(&state), method.clone(), uri, &[]).await;
            assert_eq!(status, 418, "{method} {uri}");
        }
        let (status, ..) = call(ahead_of_a_teapot(&state), Method::GET, "/catalog/courses/c1", &[]).await;
        assert_eq!(status, 200, "the plain GET, for contrast");

        // CORS adds headers to what the router answers.
        let mut settings = ApiSettings::default();
        settings.cors.catalog = vec!["*".into()];
        let cors = holding(&[("c1", Some(br#"{"id":"c1"}"#))], settings).await;
        let (status, ..) = call(ahead_of_a_teapot(&cors), Method::GET, "/catalog/courses/c1", &[]).await;
        assert_eq!(status, 418, "CORS on");

        // Memory may not serve: no fence came back lately, or the pointer
        // was not read lately.
        let local = state.local_cache().expect("memory layer");
        local.distrust();
        let (status, ..) = call(ahead_of_a_teapot(&state), Method::GET, "/catalog/courses/c1", &[]).await;
        assert_eq!(status, 418, "memory not trusted");
        local.fenced(local.now_ms());
        state.generations.write().expect("lock").clear();
        let (status, ..) = call(ahead_of_a_teapot(&state), Method::GET, "/catalog/courses/c1", &[]).await;
        assert_eq!(status, 418, "no generation known");
    }
}
