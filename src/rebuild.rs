//! Rebuild from offset zero without downtime (DESIGN §2).
//!
//! A rebuild replays every retained event into a new generation of the
//! projection's collection, with its own consumer group and its own stored
//! offsets, until it has reached, on every partition, the offsets the
//! serving generation has stored; then it switches the generation pointer
//! in one guarded update, and keeps applying until the live workers follow. The API and live workers follow
//! the pointer, so readers see the old generation until the switch and the
//! complete new one after; nothing ever reads a half-built generation. The
//! old generation is dropped after a grace period, when no reader can still
//! hold it. An interrupted rebuild resumes its generation from its stored
//! offsets and never touches the serving one.

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cache::Cache;
use crate::mongo::{RebuildProgress, Store, StoreError};
use crate::status::{StatusError, StatusProbe};
use crate::worker::{run_generation, GenerationEnd, WorkerError, WorkerSettings};

/// How a rebuild runs.
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// Drop and replay the serving generation (downtime; for development).
    pub in_place: bool,
    /// Start checking the switch condition once the new generation lags by
    /// at most this many events.
    pub catch_up_lag: i64,
    /// How long the old generation outlives the switch.
    pub grace: Duration,
    /// How often progress is measured and reported.
    pub report_every: Duration,
    /// After the switch, how long the rebuild keeps applying at most while
    /// it waits for the live workers to follow.
    pub handover_timeout: Duration,
}

/// After every live worker reports the new generation, the rebuild keeps
/// applying this much longer: the time for their consumers to rejoin.
const HANDOVER_LINGER: Duration = Duration::from_secs(3);

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
    #[error("the rebuild worker stopped: {0:?}")]
    WorkerStopped(GenerationEnd),
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

/// The rebuild's worker, cancelled whenever the rebuild returns, on every path.
struct RebuildWorker {
    cancel: CancellationToken,
    task: Option<JoinHandle<Result<GenerationEnd, WorkerError>>>,
}

impl RebuildWorker {
    /// Stops it and reports how it ended.
    async fn stop(mut self) -> Result<(), RebuildError> {
        self.cancel.cancel();
        match self.task.take() {
            Some(task) => Self::ended(task.await),
            None => Ok(()),
        }
    }

    fn ended(joined: Result<Result<GenerationEnd, WorkerError>, tokio::task::JoinError>) -> Result<(), RebuildError> {
        match joined {
            Ok(Ok(GenerationEnd::Cancelled | GenerationEnd::Abandoned)) => Ok(()),
            Ok(Ok(other)) => Err(RebuildError::WorkerStopped(other)),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(WorkerError::ReaderDied(format!("rebuild worker task: {e}")).into()),
        }
    }
}

impl Drop for RebuildWorker {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Rebuilds `settings.model`. `Ok(None)`: cancelled; run it again to resume.
pub async fn rebuild(
    settings: &WorkerSettings,
    store: &Store,
    cache: Option<Cache>,
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
    worker_settings.on_generation = None;
    let mut worker = {
        let cancel = cancel.child_token();
        let (store, token) = (store.clone(), cancel.clone());
        // With the cache: once readers switch, its batches must invalidate
        // what they cached of this generation.
        let task = tokio::spawn(async move { run_generation(&worker_settings, store, cache, to, token).await });
        RebuildWorker {
            cancel,
            task: Some(task),
        }
    };

    let started = Instant::now();
    let mut first_done = None;
    let events = loop {
        let Some(task) = worker.task.as_mut() else {
            return Ok(None);
        };
        tokio::select! {
            () = cancel.cancelled() => {
                worker.stop().await?;
                sink.phase("interrupted; run the same command again to resume");
                return Ok(None);
            }
            joined = task => {
                worker.task = None;
                RebuildWorker::ended(joined)?;
                return Ok(None);
            }
            () = tokio::time::sleep(options.report_every) => {}
        }
        let position = match probe.generation(model, to).await {
            Ok(position) => position,
            Err(e) => {
                // MongoDB or Kafka blinked: the worker retries on its own;
                // measure again next round.
                warn!(projection = name, error = %e, "Cannot measure rebuild progress; retrying.");
                continue;
            }
        };
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
        if position.lag_events > options.catch_up_lag {
            continue;
        }
        if options.in_place {
            break done;
        }
        match reached_serving(store, name, from, to).await {
            Ok(true) => break done,
            Ok(false) => {}
            Err(e) => warn!(projection = name, error = %e, "Cannot compare generations; retrying."),
        }
    };

    if !options.in_place && !store.switch_generation(name, from, to).await? {
        worker.stop().await?;
        return Err(RebuildError::PointerMoved(name));
    }
    let elapsed = started.elapsed();
    sink.phase(&format!("switched readers of {name} to generation {to}"));
    info!(
        projection = name,
        from, to, events, "Readers switched to the new generation."
    );
    if !options.in_place {
        // Keep applying (and invalidating the cache) until the live workers
        // run on the new generation, so readers never wait on a gap.
        sink.phase("applying until the live workers follow the switch");
        hand_over(store, name, to, options.handover_timeout, cancel).await;
    }
    worker.stop().await?;

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

/// Whether generation `to` has stored, on every partition, at least the
/// offset the serving generation `from` has: switching then shows readers
/// nothing older than they saw.
async fn reached_serving(store: &Store, name: &str, from: u32, to: u32) -> Result<bool, StoreError> {
    // Serving first: it only moves forward, so what `to` has read after
    // this is compared with a value that is at most current.
    let serving = store.load_offsets(name, from).await?;
    let building = store.load_offsets(name, to).await?;
    let behind: Vec<_> = serving
        .iter()
        .filter(|(tp, offset)| building.get(*tp).is_none_or(|b| b < *offset))
        .collect();
    if !behind.is_empty() {
        debug!(
            projection = name,
            partitions = behind.len(),
            "New generation not yet at the serving offsets."
        );
    }
    Ok(behind.is_empty())
}

/// Waits until every live worker of the projection reports generation `to`
/// (then a little longer, for their consumers to rejoin), or `timeout`.
async fn hand_over(store: &Store, name: &str, to: u32, timeout: Duration, cancel: &CancellationToken) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match store.live_workers(Some(name)).await {
            Ok(workers) if workers.iter().all(|w| w.generation == to) => {
                let linger = if workers.is_empty() {
                    Duration::ZERO
                } else {
                    HANDOVER_LINGER
                };
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + linger)) => {}
                }
                return;
            }
            Ok(_) => {}
            Err(e) => warn!(projection = name, error = %e, "Cannot read the worker registry."),
        }
        if tokio::time::Instant::now() >= deadline || cancel.is_cancelled() {
            warn!(
                projection = name,
                "Live workers did not all follow the switch in time; stopping the rebuild worker anyway."
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
