//! The projector worker: consume a projection's topics from its stored
//! offsets, apply events in batches to MongoDB, then store the offsets.
//!
//! Exactly-once *effect* rests on two facts. Offsets are stored only after
//! the batch's documents and dead letters are written, so a crash replays a
//! suffix of the log and never skips. And applying is idempotent and
//! order-insensitive (see `courseview-projections`), so replaying that
//! suffix changes nothing. Documents are written guarded by a revision, so
//! two workers touching one course (its events live on different topics,
//! hence maybe different workers) never lose each other's writes.
//!
//! `applier` applies a batch to one generation (no Kafka), with `states`
//! remembering what it wrote; `consume` runs one generation's consumer and
//! batch loop; `follow` watches the generation pointer and pauses for a
//! rebuild's handover; here, the settings, the outcome types and [`run`],
//! which ties them together.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use courseview_projections::{CourseEvent, CourseState};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, instrument, warn, Instrument};

use crate::cache::{Cache, Scope};
use crate::dead_letter::DeadLetter;
use crate::decode::decode;
use crate::kafka::{
    ByteBudget, Consumer, ConsumerSettings, Feed, Gap, GapKind, HoldRequest, KafkaClientError, OffsetSource,
    OffsetsUnavailable, OnGap, ReaderExit, READ_CHUNK,
};
use crate::mongo::{AlreadyNewer, Conflicts, DocWrite, PauseInfo, Store, StoreError, Stored};
use crate::read_model::ReadModel;
use crate::record::Record;
use crate::telemetry;

mod applier;
mod consume;
mod fold;
mod follow;
mod states;

pub use applier::{Applier, BatchOutcome};
pub use consume::run_generation;
pub use fold::{Flush, Fold, FoldLimits};
pub use follow::Paused;
use follow::{deadline_after, pause_for_handover, watch_pointer, Moved, Pause};

/// Bytes of course states a worker remembers between batches.
pub const DEFAULT_STATE_CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// Tuning of one worker.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub model: ReadModel,
    pub kafka: ConsumerSettings,
    /// Most records applied in one batch.
    pub batch_size: usize,
    /// How long to wait for more records once one has arrived.
    pub batch_linger: Duration,
    /// While behind, batches are folded together and written at this
    /// interval or memory bound; caught up, each batch is written at once.
    pub fold: FoldLimits,
    /// Longest pause between retries of a batch that failed transiently.
    pub max_backoff: Duration,
    /// Records larger than this (key + value + headers) are dead-lettered.
    pub max_record_bytes: usize,
    /// Bytes of records read but not yet applied, at most.
    pub max_queue_bytes: usize,
    /// Bytes of recently written course states kept to skip their loads.
    pub state_cache_bytes: u64,
    /// After shutdown starts, how long the batch in hand may keep retrying
    /// before it is abandoned (its offsets are then not stored).
    pub shutdown_timeout: Duration,
    /// Told what this worker is doing, each time it changes (the worker
    /// registry publishes it; a rebuild's handover waits on it).
    pub on_phase: Option<Arc<tokio::sync::watch::Sender<Phase>>>,
    /// Set while the batch in hand waits because Redis did not take its
    /// write announcement (the worker's readiness reads it).
    pub cache_held: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Raised while the worker applies nothing because an operator paused
    /// the projection (its fold written, its offsets stored).
    pub operator_paused: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// When the generation's query indexes are made.
    pub indexes: IndexBuild,
    /// Records applied per second, at most (a rebuild's `--max-rate`);
    /// `None`: as fast as the store takes them.
    pub max_rate: Option<f64>,
}

/// When a worker makes its generation's query indexes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IndexBuild {
    /// Before the first batch: readers may query the generation at once.
    #[default]
    AtStart,
    /// Left to whoever switches readers to it (a rebuild, before its
    /// switch): a store keeps indexes built once over written documents
    /// far more cheaply than updated on every write (PERFORMANCE.md).
    BeforeSwitch,
}

/// What a worker is doing: the generation it follows, and whether it is
/// consuming (false while it joins the group or pauses for a handover).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Phase {
    pub generation: u32,
    pub applying: bool,
    /// Paused for the rebuild's handover request ending then (ms): provably
    /// applying nothing. (An idle worker also has `applying` false, but may
    /// apply its next record.)
    pub paused_for: Option<i64>,
}

fn report(settings: &WorkerSettings, generation: u32, applying: bool) {
    if let Some(tx) = &settings.on_phase {
        tx.send_replace(Phase {
            generation,
            applying,
            paused_for: None,
        });
    }
}

/// Tells the registry this worker applies nothing to `generation` until a
/// rebuild's handover ends: what the rebuild waits for before switching.
fn report_paused(settings: &WorkerSettings, generation: u32, until: i64) {
    if let Some(tx) = &settings.on_phase {
        tx.send_replace(Phase {
            generation,
            applying: false,
            paused_for: Some(until),
        });
    }
}

/// Default record size limit: Kafka's own default `message.max.bytes`.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1024 * 1024;

/// The record limit may not exceed this. A course document holds its text
/// fields twice (state and view), each from possibly a different event, and
/// a MongoDB document is at most 16 MiB: three fields of 1 MiB, twice, plus
/// ids, stay well inside it.
pub const MAX_RECORD_BYTES_CAP: usize = 1024 * 1024;

/// Why a worker stopped (`Ok` side of [`run`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// Shutdown was requested and the batch in hand was written.
    Shutdown,
    /// Shutdown was requested and the batch in hand could not be written
    /// within the shutdown timeout; its offsets were not stored.
    ShutdownAbandonedBatch,
}

/// How one generation's consumption ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GenerationEnd {
    /// Its token fired (shutdown, or the serving generation moved).
    Cancelled,
    /// Its token fired, and the batch in hand was given up at the deadline.
    Abandoned,
    /// Stored offsets could not be read at assignment: rejoin afresh.
    AssignmentFailed(String),
    /// A fetch position fell out of the log: rejoin, and the assignment
    /// finds and records the gap.
    OffsetOutOfRange(String),
    /// The reader thread ended on its own (it panicked or its channel closed).
    ReaderDied(String),
    /// librdkafka raised a fatal error: the worker must end.
    KafkaFatal(String),
    /// Resumed after an operator's pause, but some partition could not be
    /// moved to its stored offset: rejoin, so the assignment starts each
    /// partition there.
    ResumeRejoin(String),
}

/// Why a batch could not be applied this time, by what the caller does next.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Redis did not take the batch's write announcement: writing anyway
    /// could leave API answers stale past DESIGN's bound, so the batch
    /// waits (offsets unmoved) and is tried again.
    #[error("Redis did not take this batch's write announcement; the batch waits")]
    Unannounced,
}

/// An error a retry loop can tell transient from permanent.
pub trait Retryable: std::fmt::Display {
    fn is_transient(&self) -> bool;
    /// The system that failed, for the transient-errors metric.
    fn system(&self) -> &'static str;
}

impl Retryable for StoreError {
    fn is_transient(&self) -> bool {
        StoreError::is_transient(self)
    }
    fn system(&self) -> &'static str {
        "mongodb"
    }
}

impl Retryable for BatchError {
    fn is_transient(&self) -> bool {
        match self {
            BatchError::Store(e) => e.is_transient(),
            BatchError::Unannounced => true,
        }
    }
    fn system(&self) -> &'static str {
        match self {
            BatchError::Store(_) => "mongodb",
            BatchError::Unannounced => "redis",
        }
    }
}

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Kafka(#[from] KafkaClientError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the Kafka reader thread died: {0}")]
    ReaderDied(String),
    /// The Kafka client cannot go on; a supervisor restarts the process.
    #[error("fatal Kafka client error: {0}")]
    KafkaFatal(String),
    /// Only transient batch errors are retried; this one was given up.
    #[error(transparent)]
    Batch(BatchError),
}

impl From<BatchError> for WorkerError {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::Store(e) => WorkerError::Store(e),
            other => WorkerError::Batch(other),
        }
    }
}

/// Runs one projection until `cancel` fires, following its generation
/// pointer: when a rebuild switches readers to a new generation, the worker
/// finishes its batch and moves to that generation and its stored offsets.
/// On shutdown it finishes the batch in hand (within
/// `settings.shutdown_timeout`), stores its offsets and leaves the group.
pub async fn run(
    settings: WorkerSettings,
    store: Store,
    cache: Option<Cache>,
    cancel: CancellationToken,
) -> Result<Stopped, WorkerError> {
    let projection = settings.model.name();
    let mut backoff = Duration::from_millis(200);
    loop {
        let Some(pointer) = retry_transient("read generation pointer", &cancel, settings.max_backoff, || {
            store.pointer(projection)
        })
        .await?
        else {
            return Ok(Stopped::Shutdown);
        };
        let generation = pointer.generation;
        report(&settings, generation, false);
        // A rebuild handing over from this generation: pause before taking
        // partitions, or this worker could move the serving generation
        // after the rebuild saw every worker paused.
        if pause_for_handover(&settings, &store, projection, generation, &cancel).await != Pause::Over {
            return Ok(Stopped::Shutdown);
        }
        let moved = cancel.child_token();
        // Paused by an operator as the pointer was read: the consumer joins
        // the group held, so a worker started while paused reads nothing.
        let (paused_tx, paused) = tokio::sync::watch::channel(pointer.paused);
        let watcher = tokio::spawn(watch_pointer(
            store.clone(),
            projection,
            generation,
            moved.clone(),
            paused_tx,
        ));
        let end = run_generation(
            &settings,
            store.clone(),
            cache.clone(),
            generation,
            moved.clone(),
            Some(paused),
        )
        .await;
        // The watcher ends once `moved` fired, saying whether it fired it.
        moved.cancel();
        let why = watcher.await.ok().flatten();
        match (end?, why) {
            (GenerationEnd::Cancelled, _) if cancel.is_cancelled() => return Ok(Stopped::Shutdown),
            (GenerationEnd::Abandoned, _) if cancel.is_cancelled() => return Ok(Stopped::ShutdownAbandonedBatch),
            (GenerationEnd::Cancelled | GenerationEnd::Abandoned, why) => {
                backoff = Duration::from_millis(200);
                report(&settings, generation, false);
                if pause_for_handover(&settings, &store, projection, generation, &cancel).await == Pause::Shutdown {
                    return Ok(Stopped::Shutdown);
                }
                match why {
                    Some(Moved::Switched { to }) => {
                        info!(
                            projection,
                            from = generation,
                            to,
                            "Generation switched; following the pointer."
                        );
                    }
                    Some(Moved::Handover { to, until }) => {
                        info!(
                            projection,
                            from = generation,
                            to,
                            until,
                            "Handed over; following the pointer."
                        );
                    }
                    None => info!(projection, from = generation, "Following the pointer."),
                }
            }
            (GenerationEnd::AssignmentFailed(reason), _) => {
                telemetry::transient_error("kafka", "assign partitions");
                warn!(projection, error = %reason, retry_in = ?backoff, "Rejoining the group with a fresh consumer.");
                tokio::select! {
                    () = cancel.cancelled() => return Ok(Stopped::Shutdown),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(settings.max_backoff);
            }
            (GenerationEnd::OffsetOutOfRange(reason), _) => {
                warn!(projection, error = %reason, retry_in = ?backoff, "A partition's position fell out of the log; rejoining to find the gap.");
                tokio::select! {
                    () = cancel.cancelled() => return Ok(Stopped::Shutdown),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(settings.max_backoff);
            }
            (GenerationEnd::ResumeRejoin(reason), _) => {
                warn!(projection, generation, error = %reason, "Resumed, but a partition could not be moved to its stored offset; rejoining the group to start there.");
            }
            (GenerationEnd::ReaderDied(reason), _) => return Err(WorkerError::ReaderDied(reason)),
            (GenerationEnd::KafkaFatal(reason), _) => return Err(WorkerError::KafkaFatal(reason)),
        }
    }
}

/// Retries `op` while it fails transiently, backing off up to `max_backoff`.
/// `Ok(None)` means `cancel` fired first.
pub async fn retry_transient<T, E, F, Fut>(
    op_name: &'static str,
    cancel: &CancellationToken,
    max_backoff: Duration,
    mut op: F,
) -> Result<Option<T>, E>
where
    E: Retryable,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match op().await {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.is_transient() => {
                telemetry::transient_error(e.system(), op_name);
                warn!(op = op_name, error = %e, retry_in = ?backoff, "Transient failure; retrying without advancing offsets.");
                tokio::select! {
                    () = cancel.cancelled() => return Ok(None),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(max_backoff);
            }
            Err(e) => {
                error!(op = op_name, error = %e, "Permanent failure.");
                return Err(e);
            }
        }
    }
}

/// A record at a position, for unit tests.
#[cfg(test)]
fn rec(topic: &str, partition: i32, offset: i64) -> Record {
    Record {
        topic: topic.into(),
        partition,
        offset,
        ..Record::default()
    }
}
