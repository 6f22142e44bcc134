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
    ByteBudget, Consumer, ConsumerSettings, Feed, Gap, GapKind, KafkaClientError, OffsetSource, OffsetsUnavailable,
    OnGap, ReaderExit,
};
use crate::mongo::{DocWrite, Store, StoreError, Stored};
use crate::read_model::ReadModel;
use crate::record::Record;
use crate::telemetry;

/// How often a live worker checks whether readers moved to another generation.
const POINTER_POLL: Duration = Duration::from_millis(500);

/// Bytes of course states a worker remembers between batches.
pub const DEFAULT_STATE_CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// How many times a batch retries revision conflicts before backing off.
const MAX_CONFLICT_ROUNDS: usize = 16;

/// Tuning of one worker.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub model: ReadModel,
    pub kafka: ConsumerSettings,
    /// Most records applied in one batch.
    pub batch_size: usize,
    /// How long to wait for more records once one has arrived.
    pub batch_linger: Duration,
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
    /// When the generation's query indexes are made.
    pub indexes: IndexBuild,
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

/// What a batch did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub applied: usize,
    pub dead_letters: usize,
    pub documents_written: usize,
    /// Next offset per (topic, partition) stored by this batch.
    pub offsets: Vec<(String, i32, i64)>,
}

/// The part of a worker that needs no Kafka: applying a batch of records to
/// one generation of a read model. `dlq replay` and tests use it directly.
#[derive(Debug, Clone)]
pub struct Applier {
    model: ReadModel,
    store: Store,
    cache: Option<Cache>,
    generation: u32,
    max_record_bytes: usize,
    /// This applier's name in the cache's writers set.
    writer: String,
    /// Recently written states with their revisions, least recently used
    /// evicted first, bounded by bytes. A course's events live on several
    /// topics and so arrive in different batches; remembering what we wrote
    /// saves re-reading it. A stale entry (another worker wrote the course
    /// since) is harmless: the revision guard rejects the write, and the
    /// course is reloaded and reapplied.
    recent: Arc<quick_cache::sync::Cache<String, Stored, StateBytes>>,
    /// Whether courses missing from `recent` are presumed absent from the
    /// store (written as new, no load) rather than loaded first. Guessing
    /// wrong costs one refused statement and a reload, never a lost event:
    /// the write is guarded by revision 0. Set after each batch from how
    /// often the guess was right.
    presume_absent: Arc<std::sync::atomic::AtomicBool>,
    /// Raised while a batch waits for its write announcement.
    held: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Applier {
    pub fn new(model: ReadModel, store: Store, cache: Option<Cache>, generation: u32) -> Self {
        Applier {
            model,
            store,
            cache,
            generation,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            writer: format!("{:016x}", rand::random::<u64>()),
            recent: Arc::new(quick_cache::sync::Cache::with_weighter(
                16 * 1024,
                DEFAULT_STATE_CACHE_BYTES,
                StateBytes,
            )),
            presume_absent: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            held: None,
        }
    }

    /// Raises `held` while a batch waits for its write announcement.
    #[must_use]
    pub fn with_held_flag(mut self, held: Option<Arc<std::sync::atomic::AtomicBool>>) -> Self {
        self.held = held;
        self
    }

    /// Keeps about `bytes` of recently written states (0: none).
    #[must_use]
    pub fn with_state_cache_bytes(mut self, bytes: u64) -> Self {
        self.recent = Arc::new(quick_cache::sync::Cache::with_weighter(
            (bytes / 1024).max(16) as usize,
            bytes.max(1),
            StateBytes,
        ));
        self
    }

    /// Records over `limit` bytes are dead-lettered instead of applied.
    #[must_use]
    pub fn with_record_limit(mut self, limit: usize) -> Self {
        self.max_record_bytes = limit.clamp(1, MAX_RECORD_BYTES_CAP);
        self
    }

    fn collection(&self) -> String {
        Store::collection_name(self.model.name(), self.generation)
    }

    /// Decodes, applies and writes a batch, then stores its offsets. Safe to
    /// call again with the same records after any failure.
    pub async fn apply_batch(&self, records: &[Record]) -> Result<BatchOutcome, BatchError> {
        self.apply_batch_and_advance(records, &[]).await
    }

    /// As [`Applier::apply_batch`], also storing `advanced` next-offsets of
    /// partitions whose position moved past undelivered offsets.
    #[instrument(skip_all, fields(projection = self.model.name(), records = records.len()))]
    pub async fn apply_batch_and_advance(
        &self,
        records: &[Record],
        advanced: &[(String, i32, i64)],
    ) -> Result<BatchOutcome, BatchError> {
        let started = Instant::now();
        let projection = self.model.name();
        let mut events: Vec<CourseEvent> = Vec::with_capacity(records.len());
        let mut dead = Vec::new();
        for record in records {
            let size = record.size();
            if size > self.max_record_bytes {
                let e = crate::decode::DecodeError::TooLarge {
                    size,
                    limit: self.max_record_bytes,
                };
                warn!(projection, position = %record.position(), error = %e, "Dead-lettering oversized record.");
                dead.push(DeadLetter::oversized(projection, record, &e.to_string()));
                continue;
            }
            match decode(record) {
                Ok(event) => events.push(event),
                Err(e) => {
                    warn!(projection, position = %record.position(), error = %e, "Dead-lettering undecodable record.");
                    dead.push(DeadLetter::new(projection, record, &e.to_string()));
                }
            }
        }
        let written = self.apply_events(&events).await?;
        if !dead.is_empty() {
            self.store.put_dead_letters(&dead).await?;
            telemetry::dead_letters(projection, dead.len() as u64);
        }
        let offsets = next_offsets(records, advanced);
        self.store.store_offsets(projection, self.generation, &offsets).await?;
        for event in &events {
            telemetry::event_applied(projection, event.kind.type_name());
        }
        telemetry::batch(projection, records.len(), started.elapsed());
        Ok(BatchOutcome {
            applied: events.len(),
            dead_letters: dead.len(),
            documents_written: written,
            offsets,
        })
    }

    /// Makes cached API answers of this generation obsolete; false if Redis
    /// did not take it (the caller retries).
    pub async fn bump_cache(&self) -> bool {
        match &self.cache {
            Some(cache) => cache.bump_epoch_for(self.scope(), Some(&self.writer)).await,
            None => true,
        }
    }

    fn scope(&self) -> Scope<'static> {
        Scope {
            projection: self.model.name(),
            generation: self.generation,
        }
    }

    /// Keeps what is now stored; conflicted courses are reloaded next round.
    fn remember(&self, writes: Vec<DocWrite>, unchanged: Vec<Stored>, conflicts: &[String]) {
        for w in writes.into_iter().filter(|w| !conflicts.contains(&w.id)) {
            self.recent.insert(
                w.id,
                Stored {
                    state: w.state,
                    rev: w.expected_rev + 1,
                },
            );
        }
        for s in unchanged {
            self.recent.insert(s.state.course_id.clone(), s);
        }
    }

    /// Applies events to their courses' documents; returns documents written.
    pub async fn apply_events(&self, events: &[CourseEvent]) -> Result<usize, BatchError> {
        use std::sync::atomic::Ordering::Relaxed;
        let collection = self.collection();
        if let (Some(cache), false) = (&self.cache, events.is_empty()) {
            // Readers bypass the cache from now until this batch's bump. A
            // write Redis was not told of could be hidden from readers by
            // answers cached before it, for as long as their TTL: never.
            let announced = cache.begin_write(self.scope(), &self.writer).await;
            if let Some(held) = &self.held {
                held.store(!announced, Relaxed);
            }
            if !announced {
                return Err(BatchError::Unannounced);
            }
        }
        let mut by_course: HashMap<&str, Vec<&CourseEvent>> = HashMap::new();
        for event in events {
            by_course.entry(event.course_id.as_str()).or_default().push(event);
        }
        let mut pending: Vec<String> = by_course.keys().map(|id| (*id).to_owned()).collect();
        let mut written = 0;
        // Courses written as new without a load, and how many of those the
        // store refused (they existed after all).
        let mut presumed: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut presumed_wrong = 0;
        for round in 0..MAX_CONFLICT_ROUNDS {
            if pending.is_empty() {
                break;
            }
            let mut stored: HashMap<String, Stored> = HashMap::with_capacity(pending.len());
            let mut missing = Vec::new();
            for id in &pending {
                // Taken out while in flight: a failed write must not leave a
                // state behind that the store does not have.
                match self.recent.remove(id) {
                    Some((_, known)) => {
                        stored.insert(id.clone(), known);
                    }
                    None => missing.push(id.clone()),
                }
            }
            // One round trip per batch in the common case: courses seen
            // recently come from memory, and unseen ones are presumed new
            // (a replay from zero, a rebuild) while that keeps being true.
            // Refused ones come back as conflicts and are loaded next round.
            if round == 0 && self.presume_absent.load(Relaxed) {
                presumed = missing.into_iter().collect();
            } else {
                stored.extend(self.store.load_states(&collection, &missing).await?);
            }
            let mut writes = Vec::with_capacity(pending.len());
            let mut unchanged = Vec::new();
            for id in &pending {
                let (mut state, rev) = match stored.get(id) {
                    Some(s) => (s.state.clone(), s.rev),
                    None => (CourseState::new(id.as_str()), 0),
                };
                // Only a stored course can be left unchanged.
                let before = (rev > 0).then(|| state.clone());
                for event in by_course.get(id.as_str()).into_iter().flatten() {
                    state.apply(event);
                }
                // A replayed or duplicate event changes nothing: skip the write.
                if before.as_ref() == Some(&state) {
                    unchanged.push(Stored { state, rev });
                    continue;
                }
                writes.push(DocWrite {
                    id: id.clone(),
                    expected_rev: rev,
                    view: self.model.view(&state),
                    state,
                });
            }
            let conflicts = self.store.write_states(&collection, &writes).await?;
            if round == 0 {
                presumed_wrong = conflicts.iter().filter(|id| presumed.contains(*id)).count();
            }
            written += writes.len() - conflicts.len();
            self.remember(writes, unchanged, &conflicts);
            if !conflicts.is_empty() {
                telemetry::write_conflicts(self.model.name(), conflicts.len());
                debug!(
                    conflicts = conflicts.len(),
                    "Another worker wrote these courses; reapplying."
                );
            }
            pending = conflicts;
        }
        if !presumed.is_empty() {
            // Keep presuming while at most a quarter of the guesses miss.
            self.presume_absent.store(presumed_wrong * 4 <= presumed.len(), Relaxed);
        } else if !self.presume_absent.load(Relaxed) && written > 0 {
            // Loading first: try presuming again now and then, so a worker
            // that met existing courses once does not load forever.
            self.presume_absent.store(rand::random::<u8>() < 8, Relaxed);
        }
        if pending.is_empty() {
            Ok(written)
        } else {
            // Contention this persistent is transient by nature: retry the batch.
            Err(BatchError::Store(StoreError::Unavailable(Box::new(
                mongodb::error::Error::custom(format!("{} documents kept changing under us", pending.len())),
            ))))
        }
    }
}

/// The next offset to read per partition after this batch: one past its
/// highest record, or a position `advanced` past undelivered offsets,
/// whichever is higher.
fn next_offsets(records: &[Record], advanced: &[(String, i32, i64)]) -> Vec<(String, i32, i64)> {
    let positions = records
        .iter()
        .map(|r| (r.topic.as_str(), r.partition, r.offset + 1))
        .chain(advanced.iter().map(|(t, p, o)| (t.as_str(), *p, *o)));
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for (topic, partition, offset) in positions {
        let slot = next.entry((topic, partition)).or_insert(offset);
        *slot = (*slot).max(offset);
    }
    let mut out: Vec<_> = next.into_iter().map(|((t, p), o)| (t.to_owned(), p, o)).collect();
    out.sort();
    out
}

/// Weighs a remembered state by the bytes it holds (an estimate: its text
/// fields plus a fixed overhead), so the cache is bounded in memory, not
/// in entries.
#[derive(Debug, Clone, Copy)]
struct StateBytes;

impl quick_cache::Weighter<String, Stored> for StateBytes {
    fn weight(&self, key: &String, value: &Stored) -> u64 {
        // What the heap really holds: each string or event id is its own
        // allocation with a header. (The first estimate counted text plus
        // a flat 512 bytes, and a 16 MiB budget held about 32 MiB: a
        // 200 k replay peaked at 88 MiB RSS with it, 56 MiB with 1 MiB.)
        const ALLOCATION: usize = 32;
        let s = &value.state;
        let text = |t: &str| t.len() + ALLOCATION;
        let optional = |t: &Option<String>| t.as_deref().map_or(0, text);
        let stamp = |e: &str| e.len() + ALLOCATION;
        let registers = [
            s.name.as_ref().map(|n| text(&n.value) + stamp(&n.stamp.event_id)),
            s.teacher_id.as_ref().map(|t| text(&t.value) + stamp(&t.stamp.event_id)),
            s.thumbnail
                .as_ref()
                .map(|t| optional(&t.value) + stamp(&t.stamp.event_id)),
            s.description
                .as_ref()
                .map(|d| optional(&d.value) + stamp(&d.stamp.event_id)),
            s.registered_at.as_ref().map(|r| stamp(&r.stamp.event_id)),
            s.posting.as_ref().map(|p| stamp(&p.stamp.event_id)),
            s.deleted.as_ref().map(|d| stamp(&d.event_id)),
        ];
        let bytes = std::mem::size_of::<Stored>()
            + text(key)
            + text(&s.course_id)
            + registers.iter().flatten().sum::<usize>()
            // The cache's own entry.
            + 64;
        bytes as u64
    }
}

/// Reads stored offsets from MongoDB on the Kafka reader thread.
struct StoredOffsets {
    store: Store,
    projection: &'static str,
    generation: u32,
    runtime: Handle,
}

impl StoredOffsets {
    /// Runs a store call from the Kafka reader thread.
    fn block_on<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, OffsetsUnavailable> {
        // librdkafka may call back from whichever thread drops or closes the
        // consumer; `block_on` there, on an async thread, would abort the
        // process. Failing makes the assignment wait for a fresh consumer.
        if Handle::try_current().is_ok() {
            return Err(OffsetsUnavailable {
                reason: "stored offsets requested on an async runtime thread".into(),
                retry: false,
            });
        }
        self.runtime.block_on(call).map_err(|e| OffsetsUnavailable {
            reason: e.to_string(),
            retry: true,
        })
    }
}

impl OffsetSource for StoredOffsets {
    fn stored_offsets(&self) -> Result<HashMap<(String, i32), i64>, OffsetsUnavailable> {
        self.block_on(self.store.load_offsets(self.projection, self.generation))
    }

    fn record_gap(&self, gap: &Gap, policy: OnGap) -> Result<(), OffsetsUnavailable> {
        let rewind = gap.kind == GapKind::LogReset && policy == OnGap::Continue;
        self.block_on(self.store.record_gap(self.projection, self.generation, gap, rewind))?;
        telemetry::gap(self.projection, gap.kind.name());
        Ok(())
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
        let Some(generation) = retry_transient("read generation pointer", &cancel, settings.max_backoff, || {
            store.serving_generation(projection)
        })
        .await?
        else {
            return Ok(Stopped::Shutdown);
        };
        report(&settings, generation, false);
        // A rebuild handing over from this generation: pause before taking
        // partitions, or this worker could move the serving generation
        // after the rebuild saw every worker paused.
        if pause_for_handover(&settings, &store, projection, generation, &cancel).await {
            return Ok(Stopped::Shutdown);
        }
        let moved = cancel.child_token();
        let watcher = tokio::spawn(watch_pointer(store.clone(), projection, generation, moved.clone()));
        let end = run_generation(&settings, store.clone(), cache.clone(), generation, moved).await;
        watcher.abort();
        match end? {
            GenerationEnd::Cancelled if cancel.is_cancelled() => return Ok(Stopped::Shutdown),
            GenerationEnd::Abandoned if cancel.is_cancelled() => return Ok(Stopped::ShutdownAbandonedBatch),
            GenerationEnd::Cancelled | GenerationEnd::Abandoned => {
                backoff = Duration::from_millis(200);
                report(&settings, generation, false);
                if pause_for_handover(&settings, &store, projection, generation, &cancel).await {
                    return Ok(Stopped::Shutdown);
                }
                info!(
                    projection,
                    from = generation,
                    "Generation switched or handed over; following the pointer."
                );
            }
            GenerationEnd::AssignmentFailed(reason) => {
                telemetry::transient_error("kafka", "assign partitions");
                warn!(projection, error = %reason, retry_in = ?backoff, "Rejoining the group with a fresh consumer.");
                tokio::select! {
                    () = cancel.cancelled() => return Ok(Stopped::Shutdown),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(settings.max_backoff);
            }
            GenerationEnd::OffsetOutOfRange(reason) => {
                warn!(projection, error = %reason, retry_in = ?backoff, "A partition's position fell out of the log; rejoining to find the gap.");
                tokio::select! {
                    () = cancel.cancelled() => return Ok(Stopped::Shutdown),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(settings.max_backoff);
            }
            GenerationEnd::ReaderDied(reason) => return Err(WorkerError::ReaderDied(reason)),
        }
    }
}

/// Cancels `moved` once the serving generation is no longer `generation`,
/// or a rebuild asks this generation's workers to pause for its handover.
async fn watch_pointer(store: Store, projection: &'static str, generation: u32, moved: CancellationToken) {
    loop {
        tokio::select! {
            () = moved.cancelled() => return,
            () = tokio::time::sleep(POINTER_POLL) => {}
        }
        if let Ok(pointer) = store.pointer(projection).await {
            let now = chrono::Utc::now().timestamp_millis();
            if pointer.generation != generation || pointer.handing_over(now).is_some_and(|to| to != generation) {
                moved.cancel();
                return;
            }
        }
    }
}

/// While a rebuild hands over from `generation` (still serving), applies
/// nothing: the serving generation must stop moving so the new one can
/// reach it. Returns when the pointer switched, the handover was withdrawn
/// or expired; `true` if shutdown came first.
async fn pause_for_handover(
    settings: &WorkerSettings,
    store: &Store,
    projection: &'static str,
    generation: u32,
    cancel: &CancellationToken,
) -> bool {
    let mut announced = false;
    // Until when the last pointer read asked us to pause: a failed read
    // (MongoDB slow or away) must not end the pause early and let the
    // serving generation move under a rebuild that is closing the gap.
    let mut paused_until: Option<i64> = None;
    loop {
        let now = chrono::Utc::now().timestamp_millis();
        match store.pointer(projection).await {
            Ok(p) if p.generation == generation && p.handing_over(now).is_some() => {
                let until = p.handover.map(|(_, until)| until);
                // A new request (a rebuild asking again) is reported anew.
                if until != paused_until {
                    if !announced {
                        info!(projection, generation, "Pausing for a rebuild's handover.");
                        announced = true;
                    }
                    report_paused(settings, generation, until.unwrap_or_default());
                }
                paused_until = until;
            }
            Ok(_) => return false,
            Err(_) if paused_until.is_some_and(|until| now < until) => {}
            // MongoDB unreachable and no handover known: the next
            // generation start retries it.
            Err(_) => return false,
        }
        tokio::select! {
            () = cancel.cancelled() => return true,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// A token that fires `after` once `cancel` has fired: the deadline of the
/// work in hand when shutdown starts.
fn deadline_after(cancel: &CancellationToken, after: Duration) -> CancellationToken {
    let hard = CancellationToken::new();
    let (cancel, trigger) = (cancel.clone(), hard.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = cancel.cancelled() => {}
            // Nobody holds the deadline any more: nothing to time.
            () = trigger.cancelled() => return,
        }
        tokio::time::sleep(after).await;
        trigger.cancel();
    });
    hard
}

/// Consumes into one generation of the projection until `cancel` fires.
/// The rebuild runs this with its own consumer group and a new generation.
pub async fn run_generation(
    settings: &WorkerSettings,
    store: Store,
    cache: Option<Cache>,
    generation: u32,
    cancel: CancellationToken,
) -> Result<GenerationEnd, WorkerError> {
    let model = settings.model;
    let span = tracing::info_span!("worker", projection = model.name(), generation);
    async move {
        let collection = Store::collection_name(model.name(), generation);
        if settings.indexes == IndexBuild::AtStart
            && retry_transient("create indexes", &cancel, settings.max_backoff, || {
                store.ensure_indexes(&collection, model)
            })
            .await?
            .is_none()
        {
            return Ok(GenerationEnd::Cancelled);
        }
        let offsets = Arc::new(StoredOffsets {
            store: store.clone(),
            projection: model.name(),
            generation,
            runtime: Handle::current(),
        });
        let consumer = Consumer::subscribe(&settings.kafka, offsets)?;
        let (tx, mut rx) = mpsc::channel::<Feed>(settings.batch_size * 2);
        let budget = ByteBudget::new(settings.max_queue_bytes);
        let reader_cancel = cancel.child_token();
        let assigned = consumer.assigned();
        let mut reader = Some(consumer.spawn_reader(tx, Arc::clone(&budget), reader_cancel.clone()));
        info!(group = %settings.kafka.group_id, "Projector started.");

        let applier = Applier::new(model, store, cache, generation)
            .with_record_limit(settings.max_record_bytes)
            .with_state_cache_bytes(settings.state_cache_bytes)
            .with_held_flag(settings.cache_held.clone());
        let hard = deadline_after(&cancel, settings.shutdown_timeout);
        let mut epoch_pending = false;
        let mut reported = false;
        let result = loop {
            // Records that queued up while the last batch was written make
            // the next batch at once (group commit); only a record that
            // arrives into an idle worker waits the linger for company.
            let queued = if cancel.is_cancelled() { None } else { rx.try_recv().ok() };
            let (first, arrival) = if let Some(feed) = queued {
                (Some(feed), Arrival::Queued)
            } else {
                let first = tokio::select! {
                    biased;
                    () = cancel.cancelled() => break Ok(GenerationEnd::Cancelled),
                    r = rx.recv() => r,
                    // Idle tick: retry a cache invalidation Redis refused earlier.
                    () = tokio::time::sleep(Duration::from_millis(200)), if epoch_pending => {
                        epoch_pending = !applier.bump_cache().await;
                        continue;
                    }
                    // Assigned and idle: following this generation all the same
                    // (a rebuild's handover waits for it).
                    () = tokio::time::sleep(Duration::from_millis(100)), if !reported => {
                        if assigned.load(std::sync::atomic::Ordering::Acquire) {
                            report(settings, generation, true);
                            reported = true;
                        }
                        continue;
                    }
                };
                (first, Arrival::Awaited)
            };
            let Some(first) = first else {
                // The reader ended without being asked: find out why.
                let exit = match reader.take().map(|r| r.join()) {
                    Some(Ok(exit)) => exit,
                    Some(Err(panic)) => break Ok(GenerationEnd::ReaderDied(panic_message(&panic))),
                    None => ReaderExit::ReceiverGone,
                };
                break Ok(match exit {
                    ReaderExit::AssignmentFailed(reason) => GenerationEnd::AssignmentFailed(reason),
                    ReaderExit::OffsetOutOfRange(reason) => GenerationEnd::OffsetOutOfRange(reason),
                    other => GenerationEnd::ReaderDied(format!("reader stopped unasked: {other:?}")),
                });
            };
            if !reported {
                // Something arrived, so partitions are assigned: consuming.
                report(settings, generation, true);
                reported = true;
            }
            let (batch, advanced) = collect_batch(first, arrival, &mut rx, settings.batch_size, settings.batch_linger).await;
            let bytes: usize = batch.iter().map(Record::size).sum();
            // The batch in hand is finished even if shutdown starts now, but
            // only until the shutdown deadline.
            let outcome = tokio::select! {
                r = retry_transient("apply batch", &hard, settings.max_backoff, || applier.apply_batch_and_advance(&batch, &advanced)) => r,
                () = hard.cancelled() => Ok(None),
            };
            budget.release(bytes);
            match outcome {
                Ok(Some(outcome)) => {
                    consumer.commit(&outcome.offsets);
                    // A batch of position advances only changed no document.
                    if !batch.is_empty() {
                        epoch_pending = !applier.bump_cache().await;
                    }
                    debug!(
                        applied = outcome.applied,
                        dead = outcome.dead_letters,
                        written = outcome.documents_written,
                        "Batch committed."
                    );
                }
                Ok(None) => {
                    warn!(
                        records = batch.len(),
                        "Shutdown deadline passed; batch abandoned, its offsets not stored."
                    );
                    break Ok(GenerationEnd::Abandoned);
                }
                Err(e) => break Err(e.into()),
            }
        };
        hard.cancel();
        reader_cancel.cancel();
        drop(rx);
        // Join the reader and drop our consumer handle off the async threads
        // (librdkafka may run callbacks on close), within the deadline.
        let closing = tokio::task::spawn_blocking(move || {
            let joined = reader.map(std::thread::JoinHandle::join);
            drop(consumer);
            joined
        });
        if tokio::time::timeout(settings.shutdown_timeout, closing).await.is_err() {
            warn!("Kafka consumer did not close in time; leaving it behind.");
        }
        info!("Projector stopped.");
        result
    }
    .instrument(span)
    .await
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panicked".to_owned())
}

/// How a batch's first record reached the worker, which decides whether
/// the batch waits for more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// It was waiting already: take what is queued and write it now.
    Queued,
    /// The worker was idle and waited for it: linger for what follows.
    Awaited,
}

/// Takes `first` plus what is queued, up to `max` records, and if `first`
/// was awaited, whatever arrives within `linger`; position advances travel
/// alongside.
async fn collect_batch(
    first: Feed,
    arrival: Arrival,
    rx: &mut mpsc::Receiver<Feed>,
    max: usize,
    linger: Duration,
) -> (Vec<Record>, Vec<(String, i32, i64)>) {
    fn take(feed: Feed, batch: &mut Vec<Record>, advanced: &mut Vec<(String, i32, i64)>) {
        match feed {
            Feed::Record(r) => batch.push(r),
            Feed::Advance { topic, partition, next } => advanced.push((topic, partition, next)),
        }
    }
    let (mut batch, mut advanced) = (Vec::new(), Vec::new());
    take(first, &mut batch, &mut advanced);
    // An advance alone is a batch at once: nothing else is coming.
    let advance_only = !advanced.is_empty();
    let deadline = tokio::time::Instant::now() + linger;
    while !advance_only && batch.len() < max {
        match rx.try_recv() {
            Ok(feed) => take(feed, &mut batch, &mut advanced),
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) if arrival == Arrival::Queued => break,
            Err(mpsc::error::TryRecvError::Empty) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(feed)) => take(feed, &mut batch, &mut advanced),
                Ok(None) | Err(_) => break,
            },
        }
    }
    (batch, advanced)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(topic: &str, partition: i32, offset: i64) -> Record {
        Record {
            topic: topic.into(),
            partition,
            offset,
            ..Record::default()
        }
    }

    #[tokio::test]
    async fn records_already_waiting_make_a_batch_at_once_without_waiting_out_the_linger() {
        let (tx, mut rx) = mpsc::channel(16);
        for offset in 1..5 {
            tx.send(Feed::Record(rec("a", 0, offset))).await.expect("queued");
        }
        let started = std::time::Instant::now();
        let (batch, _) = collect_batch(
            Feed::Record(rec("a", 0, 0)),
            Arrival::Queued,
            &mut rx,
            100,
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(batch.len(), 5, "everything that was waiting");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a backlog is written at once ({:?})",
            started.elapsed()
        );
        drop(tx);
    }

    #[tokio::test]
    async fn a_record_that_finds_the_worker_idle_waits_the_linger_for_the_ones_after_it() {
        let (tx, mut rx) = mpsc::channel(16);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let _ = tx.send(Feed::Record(rec("a", 0, 1))).await;
        });
        let (batch, _) = collect_batch(
            Feed::Record(rec("a", 0, 0)),
            Arrival::Awaited,
            &mut rx,
            100,
            Duration::from_secs(2),
        )
        .await;
        assert_eq!(batch.len(), 2, "the record sent 30 ms later joined the batch");
    }

    #[test]
    fn next_offsets_are_one_past_the_highest_offset_per_partition() {
        let records = [rec("a", 0, 5), rec("a", 0, 3), rec("a", 1, 9), rec("b", 0, 0)];
        assert_eq!(
            next_offsets(&records, &[]),
            vec![("a".into(), 0, 6), ("a".into(), 1, 10), ("b".into(), 0, 1)]
        );
    }

    #[test]
    fn remembered_states_are_bounded_by_bytes_not_entries() {
        use quick_cache::Weighter as _;
        let big = |i: usize| {
            let value = serde_json::json!({
                "eventId": format!("e{i}"), "eventType": "CourseUpdatedEvent", "courseId": format!("c{i}"),
                "version": 1, "description": "x".repeat(1 << 20),
            });
            let record = Record {
                topic: "CourseUpdatedEvent".into(),
                value: Some(value.to_string().into_bytes()),
                ..Record::default()
            };
            let mut state = CourseState::new(format!("c{i}").as_str());
            state.apply(&decode(&record).expect("event"));
            (format!("c{i}"), Stored { state, rev: 1 })
        };
        let (key, value) = big(0);
        assert!(
            StateBytes.weight(&key, &value) > 1 << 20,
            "a 1 MiB description weighs over 1 MiB"
        );
        let cache = quick_cache::sync::Cache::with_weighter(64, 8 << 20, StateBytes);
        for i in 0..40 {
            let (k, v) = big(i);
            cache.insert(k, v);
        }
        assert!(cache.weight() <= 8 << 20, "40 MiB of states kept within 8 MiB");
        assert!(cache.len() >= 4, "but not emptied either");
    }

    #[test]
    fn advanced_positions_raise_the_stored_offsets_only_upwards() {
        let merged = next_offsets(
            &[rec("a", 0, 5), rec("b", 0, 1)],
            &[("a".into(), 0, 4), ("b".into(), 0, 3), ("c".into(), 1, 7)],
        );
        assert_eq!(merged, vec![("a".into(), 0, 6), ("b".into(), 0, 3), ("c".into(), 1, 7)]);
    }

    #[tokio::test]
    async fn a_batch_never_grows_past_its_size() {
        let (tx, mut rx) = mpsc::channel(10);
        for i in 1..9 {
            tx.send(Feed::Record(rec("a", 0, i))).await.expect("send");
        }
        for arrival in [Arrival::Queued, Arrival::Awaited] {
            let (batch, _) = collect_batch(
                Feed::Record(rec("a", 0, 0)),
                arrival,
                &mut rx,
                3,
                Duration::from_millis(10),
            )
            .await;
            assert_eq!(batch.len(), 3, "{arrival:?}");
        }
    }
}
