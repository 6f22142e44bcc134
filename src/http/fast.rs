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
//! the one the router would give.

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::Request;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures::future::Either;

use super::{app, routes, AppState};
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
    pub(super) fn new(state: AppState) -> Api {
        let on = !state.settings.cors.enabled();
        Api {
            router: app(state.clone()),
            state,
            on,
        }
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
