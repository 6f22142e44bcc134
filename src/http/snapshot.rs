//! `GET /projections` measures Kafka and MongoDB; a flood of requests while
//! either is slow must not pile up measurements. One measurement runs at a
//! time; callers share it, a bounded number wait for it, and the rest get
//! the last snapshot (or a fast 503 when there is none yet).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Semaphore};

use super::ApiError;
use crate::status::{ProjectionStatus, StatusError, StatusProbe};

/// A measured status (`None`: it failed) and when.
type Measured = Option<(Instant, Option<Arc<Vec<ProjectionStatus>>>)>;

/// How long a measured projection status is shared between requests.
const FRESH: Duration = Duration::from_millis(250);

/// Requests that may wait for a measurement at once; others take the last one.
const WAITERS: usize = 64;

/// Longest a single measurement may run before it counts as failed (and
/// another may start).
const MEASURE_LIMIT: Duration = Duration::from_secs(30);

/// The shared measurement of projection status.
#[derive(Debug)]
pub struct StatusShare {
    measured: watch::Sender<Measured>,
    running: AtomicBool,
    waiters: Semaphore,
    /// The last successful measurement, for callers past the waiting bound.
    last_good: Mutex<Option<Arc<Vec<ProjectionStatus>>>>,
}

impl Default for StatusShare {
    fn default() -> Self {
        StatusShare {
            measured: watch::Sender::new(None),
            running: AtomicBool::new(false),
            waiters: Semaphore::new(WAITERS),
            last_good: Mutex::new(None),
        }
    }
}

impl StatusShare {
    /// The status, measured at most once per [`FRESH`] however many ask,
    /// waiting at most `limit`.
    pub async fn get(
        self: &Arc<Self>,
        probe: &StatusProbe,
        limit: Duration,
    ) -> Result<Arc<Vec<ProjectionStatus>>, ApiError> {
        if let Some((at, snapshot)) = self.measured.borrow().as_ref() {
            if at.elapsed() < FRESH {
                return snapshot.clone().ok_or(ApiError::Unavailable);
            }
        }
        let Ok(_permit) = self.waiters.try_acquire() else {
            // Enough are waiting already: the last good answer, or 503.
            return self.last_good().ok_or(ApiError::Unavailable);
        };
        let mut changes = self.measured.subscribe();
        changes.mark_unchanged();
        self.start(probe);
        match tokio::time::timeout(limit, changes.changed()).await {
            Ok(Ok(())) => changes
                .borrow()
                .as_ref()
                .and_then(|(_, snapshot)| snapshot.clone())
                .ok_or(ApiError::Unavailable),
            Ok(Err(_)) => Err(ApiError::Unavailable),
            Err(_) => {
                tracing::warn!("Projection status took too long; answering 503.");
                Err(ApiError::Unavailable)
            }
        }
    }

    fn last_good(&self) -> Option<Arc<Vec<ProjectionStatus>>> {
        self.last_good.lock().ok().and_then(|g| g.clone())
    }

    /// Starts a measurement unless one is running.
    fn start(self: &Arc<Self>, probe: &StatusProbe) {
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let (share, probe) = (Arc::clone(self), probe.clone());
        tokio::spawn(async move {
            // In a task of its own, so a panic in it is a failed
            // measurement here, not a flag left raised for good.
            let measured = tokio::spawn(async move { probe.all().await });
            let fresh = match tokio::time::timeout(MEASURE_LIMIT, measured).await {
                Ok(Ok(Ok(all))) => Some(Arc::new(all)),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "Projection status measurement failed.");
                    None
                }
                Ok(Ok(Err(StatusError::Store(e)))) => {
                    tracing::error!(error = %e, "MongoDB unavailable for projection status.");
                    None
                }
                Ok(Ok(Err(StatusError::Kafka(e)))) => {
                    tracing::error!(error = %e, "Kafka unavailable for projection status.");
                    None
                }
                Err(_) => {
                    tracing::error!(limit = ?MEASURE_LIMIT, "Projection status measurement did not finish in time.");
                    None
                }
            };
            if let (Some(good), Ok(mut last)) = (&fresh, share.last_good.lock()) {
                *last = Some(Arc::clone(good));
            }
            // A failure is remembered as briefly as a success, so callers
            // do not re-measure at once.
            share.running.store(false, Ordering::Release);
            share.measured.send_replace(Some((Instant::now(), fresh)));
        });
    }
}
