//! Rebuild from offset zero without downtime (DESIGN §2).
//!
//! A rebuild replays every retained event into a new generation of the
//! projection's collection, with its own consumer group and its own stored
//! offsets, until its lag is below a threshold; then it switches the
//! generation pointer in one guarded update. The API and live workers follow
//! the pointer, so readers see the old generation until the switch and the
//! complete new one after; nothing ever reads a half-built generation. The
//! old generation is dropped after a grace period, when no reader can still
//! hold it. An interrupted rebuild resumes its generation from its stored
//! offsets and never touches the serving one.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::mongo::{RebuildProgress, Store, StoreError};
use crate::status::{StatusError, StatusProbe};
use crate::worker::{run_generation, WorkerError, WorkerSettings};

/// How a rebuild runs.
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// Drop and replay the serving generation (downtime; for development).
    pub in_place: bool,
    /// Switch once the new generation lags by at most this many events.
    pub catch_up_lag: i64,
    /// How long the old generation outlives the switch.
    pub grace: Duration,
    /// How often progress is measured and reported.
    pub report_every: Duration,
}

/// Receives progress (a terminal bar, log lines, or a test's recorder).
pub trait ProgressSink: Send {
    fn progress(&mut self, done: i64, total: i64);
    fn phase(&mut self, message: &str);
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Status(#[from] StatusError),
    #[error("the rebuild worker failed: {0}")]
    Worker(#[from] WorkerError),
    #[error("the generation pointer of {0} moved during the rebuild (another rebuild?)")]
    PointerMoved(&'static str),
}

/// What a finished rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildReport {
    pub from: u32,
    pub to: u32,
    /// Events in the new generation at the switch.
    pub events: i64,
    /// From start to the switch (the grace period is not included).
    pub elapsed: Duration,
}

/// Rebuilds `settings.model`. `Ok(None)`: cancelled; run it again to resume.
pub async fn rebuild(
    settings: &WorkerSettings,
    store: &Store,
    probe: &StatusProbe,
    options: &RebuildOptions,
    sink: &mut dyn ProgressSink,
    cancel: &CancellationToken,
) -> Result<Option<RebuildReport>, RebuildError> {
    let model = settings.model;
    let name = model.name();
    let (from, to) = if options.in_place {
        let serving = store.serving_generation(name).await?;
        sink.phase(&format!(
            "dropping generation {serving} of {name} (in place: it is unavailable until caught up)"
        ));
        store.drop_generation(name, serving).await?;
        (serving, serving)
    } else {
        let pointer = store.begin_rebuild(name).await?;
        let building = pointer.building.unwrap_or(pointer.generation + 1);
        (pointer.generation, building)
    };
    sink.phase(&format!("replaying {name} from offset 0 into generation {to}"));
    info!(projection = name, from, to, "Rebuild started.");

    let mut worker_settings = settings.clone();
    worker_settings.kafka.group_id = format!("{}.rebuild.g{to}", settings.kafka.group_id);
    let worker_cancel = cancel.child_token();
    let mut worker = {
        let (store, token) = (store.clone(), worker_cancel.clone());
        // No cache: nobody reads this generation before the switch.
        tokio::spawn(async move { run_generation(&worker_settings, store, None, to, token).await })
    };

    let started = Instant::now();
    let mut first_done = None;
    let events = loop {
        tokio::select! {
            () = cancel.cancelled() => {
                worker_cancel.cancel();
                let _ = (&mut worker).await;
                sink.phase("interrupted; run the same command again to resume");
                return Ok(None);
            }
            joined = &mut worker => {
                joined.map_err(|e| WorkerError::Store(StoreError::Failed(e.to_string())))??;
                return Ok(None);
            }
            () = tokio::time::sleep(options.report_every) => {}
        }
        let position = probe.generation(model, to).await?;
        let (done, total) = position.progress();
        let base = *first_done.get_or_insert(done);
        let rate = (done - base) as f64 / started.elapsed().as_secs_f64().max(0.001);
        sink.progress(done, total);
        if !options.in_place {
            let progress = RebuildProgress {
                generation: to,
                done,
                total,
                rate,
                updated_at: chrono::Utc::now().timestamp_millis(),
            };
            if let Err(e) = store.record_rebuild_progress(name, &progress).await {
                warn!(error = %e, "Cannot record rebuild progress.");
            }
        }
        if position.lag_events <= options.catch_up_lag {
            break done;
        }
    };

    if !options.in_place && !store.switch_generation(name, from, to).await? {
        worker_cancel.cancel();
        let _ = worker.await;
        return Err(RebuildError::PointerMoved(name));
    }
    let elapsed = started.elapsed();
    sink.phase(&format!("switched readers of {name} to generation {to}"));
    info!(
        projection = name,
        from, to, events, "Readers switched to the new generation."
    );
    worker_cancel.cancel();
    worker
        .await
        .map_err(|e| WorkerError::Store(StoreError::Failed(e.to_string())))??;

    if !options.in_place {
        sink.phase(&format!("dropping generation {from} in {:?}", options.grace));
        tokio::select! {
            () = cancel.cancelled() => warn!(projection = name, generation = from, "Interrupted before dropping the old generation; it stays."),
            () = tokio::time::sleep(options.grace) => {
                store.drop_generation(name, from).await?;
                info!(projection = name, generation = from, "Old generation dropped.");
            }
        }
    }
    Ok(Some(RebuildReport {
        from,
        to,
        events,
        elapsed,
    }))
}
