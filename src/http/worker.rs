//! The worker's own small HTTP surface: `/metrics`, `/healthz`, `/readyz`.
//! Readiness fails while any of the process's projections is stalled, has a
//! gap in its log, has a stuck partition, waits for Redis to take a write
//! announcement, or cannot be measured (MongoDB or Kafka unreachable).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::routes;
use crate::kafka::StuckBoard;
use crate::read_model::ReadModel;

/// Readiness per projection run by this process.
#[derive(Debug)]
pub struct WorkerHealth {
    ready: Mutex<HashMap<ReadModel, bool>>,
    /// Per projection: raised while its batch waits because Redis did not
    /// take the write announcement.
    held: HashMap<ReadModel, Arc<std::sync::atomic::AtomicBool>>,
    /// Per projection: partitions its reader finds stuck.
    stuck: HashMap<ReadModel, Arc<StuckBoard>>,
    /// Per projection: raised by its worker while it applies nothing
    /// because an operator paused it.
    paused: HashMap<ReadModel, Arc<std::sync::atomic::AtomicBool>>,
    /// Per projection paused by an operator: the reason given.
    reasons: Mutex<HashMap<ReadModel, String>>,
}

impl WorkerHealth {
    /// Not ready until the first status measurement says so.
    pub fn new(models: &[ReadModel]) -> Self {
        WorkerHealth {
            ready: Mutex::new(models.iter().map(|m| (*m, false)).collect()),
            held: models
                .iter()
                .map(|m| (*m, Arc::new(std::sync::atomic::AtomicBool::new(false))))
                .collect(),
            stuck: models.iter().map(|m| (*m, Arc::default())).collect(),
            paused: models
                .iter()
                .map(|m| (*m, Arc::new(std::sync::atomic::AtomicBool::new(false))))
                .collect(),
            reasons: Mutex::default(),
        }
    }

    /// The flag a projection's worker raises while an operator's pause holds it.
    pub fn paused_flag(&self, model: ReadModel) -> Option<Arc<std::sync::atomic::AtomicBool>> {
        self.paused.get(&model).cloned()
    }

    /// Records why an operator paused `model` (from the pointer).
    pub fn set_pause_reason(&self, model: ReadModel, reason: Option<String>) {
        if let Ok(mut map) = self.reasons.lock() {
            match reason {
                Some(reason) => map.insert(model, reason),
                None => map.remove(&model),
            };
        }
    }

    /// Projections whose worker is holding for an operator's pause, by
    /// name, with the reason given (empty if none or not read yet).
    pub fn paused(&self) -> std::collections::BTreeMap<&'static str, String> {
        let reasons = self.reasons.lock().map(|m| m.clone()).unwrap_or_default();
        self.paused
            .iter()
            .filter(|(_, f)| f.load(std::sync::atomic::Ordering::Relaxed))
            .map(|(m, _)| (m.name(), reasons.get(m).cloned().unwrap_or_default()))
            .collect()
    }

    /// Where a projection's reader posts its stuck partitions.
    pub fn stuck_board(&self, model: ReadModel) -> Arc<StuckBoard> {
        self.stuck.get(&model).cloned().unwrap_or_default()
    }

    /// The flag a projection's worker raises while its batch waits on Redis.
    pub fn held_flag(&self, model: ReadModel) -> Option<Arc<std::sync::atomic::AtomicBool>> {
        self.held.get(&model).cloned()
    }

    pub fn set(&self, model: ReadModel, ready: bool) {
        if let Ok(mut map) = self.ready.lock() {
            map.insert(model, ready);
        }
    }

    /// Every stuck partition of this process's projections.
    pub fn stuck_now(&self) -> Vec<crate::kafka::StuckPartition> {
        self.stuck.values().flat_map(|b| b.now()).collect()
    }

    /// Projections that are not ready.
    pub fn not_ready(&self) -> Vec<&'static str> {
        let map = self.ready.lock().map(|m| m.clone()).unwrap_or_default();
        let held = |m: &ReadModel| {
            self.held
                .get(m)
                .is_some_and(|h| h.load(std::sync::atomic::Ordering::Relaxed))
        };
        let stuck = |m: &ReadModel| self.stuck.get(m).is_some_and(|b| !b.now().is_empty());
        let mut names: Vec<_> = map
            .into_iter()
            .filter(|(m, r)| !r || held(m) || stuck(m))
            .map(|(m, _)| m.name())
            .collect();
        names.sort_unstable();
        names
    }
}

pub fn worker_app(health: Arc<WorkerHealth>) -> Router {
    Router::new()
        .route("/metrics", get(routes::metrics))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(readyz))
        .with_state(health)
}

async fn readyz(State(health): State<Arc<WorkerHealth>>) -> Response {
    let not_ready = health.not_ready();
    let paused = health.paused();
    if not_ready.is_empty() && !paused.is_empty() {
        // Ready (nothing to restart): paused on purpose, and said so.
        (StatusCode::OK, Json(json!({"status": "paused", "paused": paused}))).into_response()
    } else if not_ready.is_empty() {
        (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "stalledOrUnmeasured": not_ready, "stuck": health.stuck_now()})),
        )
            .into_response()
    }
}

/// Serves the worker endpoints until `shutdown`.
pub async fn serve_worker(
    listener: tokio::net::TcpListener,
    health: Arc<WorkerHealth>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, worker_app(health))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
