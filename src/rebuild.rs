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

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cache::Cache;
use crate::dead_letter::DeadLetter;
use crate::mongo::{RebuildProgress, Store, StoreError};
use crate::read_model::ReadModel;
use crate::status::{Beside, StatusError, StatusProbe};
use crate::worker::{retry_transient, run_generation, GenerationEnd, IndexBuild, WorkerError, WorkerSettings};

/// Where a rebuild replays to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// Into a new generation beside the serving one, which readers keep
    /// until the switch (zero downtime).
    #[default]
    BlueGreen,
    /// Drop and replay the serving generation itself (downtime; for
    /// development): no switch, no handover, nothing to drop after.
    InPlace,
}

/// How a rebuild runs.
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    pub mode: Mode,
    /// Start checking the switch condition once the new generation lags by
    /// at most this many events.
    pub catch_up_lag: i64,
    /// How long the old generation outlives the switch.
    pub grace: Duration,
    /// How often progress is measured and reported.
    pub report_every: Duration,
    /// How long live workers may pause before the switch, and how long
    /// the rebuild keeps applying after it while they follow (each, at most).
    pub handover_timeout: Duration,
    /// Rebuild even when some partition's log no longer starts at offset 0
    /// (retention or DeleteRecords removed its first events).
    pub allow_partial_history: bool,
    /// The operator says the projection's workers are stopped: an in-place
    /// rebuild runs even if the registry still lists some (it refuses
    /// otherwise, naming them).
    pub workers_stopped: bool,
    /// Switch even when the new generation dead-lettered records the
    /// serving one applied (their courses then regress, or vanish, for
    /// readers); refused by default, naming them.
    pub accept_dead_letters: bool,
    /// Drop a generation a stopped rebuild left, and replay anew (instead
    /// of resuming it).
    pub restart: bool,
}

/// After every live worker consumes the new generation, the rebuild keeps
/// applying this much longer, while their first batches land.
const HANDOVER_LINGER: Duration = Duration::from_secs(1);

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
    #[error(
        "the log of {} no longer starts at offset 0, so a rebuild would miss the events retention removed; \
         give the topics retention.ms=-1 or compaction by course, or pass --allow-partial-history to rebuild from what is left",
        .0.join(", ")
    )]
    PartialHistory(Vec<String>),
    #[error(
        "live workers did not pause for the handover in time ({}); nothing was switched: run the rebuild again to resume",
        if .0.is_empty() { "the new generation did not reach the serving offsets".to_owned() } else { .0.join(", ") }
    )]
    HandoverTimedOut(Vec<String>),
    #[error(
        "retention removed events before the rebuild read them ({}); raise the topics' retention (retention.ms=-1 or compaction by course), or run it with --allow-partial-history",
        .0.join("; ")
    )]
    Overtaken(Vec<String>),
    #[error(
        "an in-place rebuild drops the serving generation and its offsets, and these live workers of {projection} would \
         write their positions back, so the replay would start there and skip the history below: {}; stop them first \
         (pass --workers-stopped if they are stopped and their registry entries not yet stale), or rebuild blue/green",
        .workers.join(", ")
    )]
    LiveWorkers {
        projection: &'static str,
        workers: Vec<String>,
    },
    #[error(
        "generation {to} of {projection} dead-lettered {count} record(s) that the serving generation {from} applied, so switching \
         would take them back from readers: {}{}; nothing was switched and generation {to} is kept. See them with \
         `courseview dlq list`; fix the cause (a lower --max-record-bytes, a stricter decoder) and replay anew with \
         `courseview rebuild {projection} --restart`, or run the rebuild again with --accept-dead-letters to switch to it",
        .letters.join(", "),
        if *.count > .letters.len() { format!(" and {} more", .count - .letters.len()) } else { String::new() }
    )]
    DeadLettered {
        projection: &'static str,
        from: u32,
        to: u32,
        /// How many; `letters` names the first few.
        count: usize,
        letters: Vec<String>,
    },
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
    /// Whether the live workers followed the switch before the rebuild's
    /// worker stopped (`None` for an in-place rebuild: nobody to follow).
    pub followed: Option<Followed>,
}

/// How the handover after the switch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Followed {
    /// Every live worker consumes the new generation (or there is none).
    All,
    /// The handover timeout passed first; the rebuild's worker stopped
    /// anyway (a live worker that follows later reads from the new
    /// generation's stored offsets, so nothing is lost, only later).
    TimedOut,
    /// The rebuild was interrupted.
    Cancelled,
}

/// The rebuild's worker, cancelled whenever the rebuild returns, on every path.
struct RebuildWorker {
    cancel: CancellationToken,
    task: Option<JoinHandle<Result<GenerationEnd, WorkerError>>>,
}

impl RebuildWorker {
    /// Runs generation `to`'s replay until `cancel`.
    fn spawn(
        settings: WorkerSettings,
        store: Store,
        cache: Option<Cache>,
        to: u32,
        cancel: CancellationToken,
    ) -> RebuildWorker {
        let token = cancel.clone();
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                match run_generation(&settings, store.clone(), cache.clone(), to, token.clone(), None).await {
                    // MongoDB was unreachable at assignment: rejoin, as live workers do.
                    Ok(GenerationEnd::AssignmentFailed(reason) | GenerationEnd::OffsetOutOfRange(reason))
                        if !token.is_cancelled() =>
                    {
                        warn!(error = %reason, retry_in = ?backoff, "Rebuild worker rejoining the group.");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(settings.max_backoff);
                    }
                    other => return other,
                }
            }
        });
        RebuildWorker {
            cancel,
            task: Some(task),
        }
    }

    /// Stops it and reports how it ended (once; after that, nothing to stop).
    async fn stop(&mut self) -> Result<(), RebuildError> {
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

impl Mode {
    /// Readies the generation to replay into: returns it and the serving
    /// one (the same, in place, after dropping it).
    async fn begin(
        self,
        store: &Store,
        name: &str,
        restart: bool,
        sink: &mut dyn ProgressSink,
    ) -> Result<(u32, u32), RebuildError> {
        match self {
            Mode::InPlace => {
                let serving = store.serving_generation(name).await?;
                sink.phase(&format!(
                    "dropping generation {serving} of {name} (in place: it is unavailable until caught up)"
                ));
                store.drop_generation(name, serving).await?;
                Ok((serving, serving))
            }
            Mode::BlueGreen => {
                if restart {
                    if let Some(left) = store.abandon_rebuild(name, RESTART_LEASE).await? {
                        sink.phase(&format!(
                            "dropped generation {left}, which a stopped rebuild left (--restart)"
                        ));
                        warn!(
                            projection = name,
                            generation = left,
                            "Dropped the generation a stopped rebuild left (--restart)."
                        );
                    }
                }
                let pointer = store.begin_rebuild(name).await?;
                Ok((pointer.generation, pointer.building.unwrap_or(pointer.generation + 1)))
            }
        }
    }

    /// Readers see a generation rebuilt beside the serving one only after
    /// the switch, so its indexes wait until then; in place, readers are
    /// on it throughout.
    fn indexes(self) -> IndexBuild {
        match self {
            Mode::InPlace => IndexBuild::AtStart,
            Mode::BlueGreen => IndexBuild::BeforeSwitch,
        }
    }

    /// Whether progress goes on the pointer for status readers: a
    /// generation rebuilt in place is the serving one, not a rebuild beside it.
    fn records_progress(self) -> bool {
        self == Mode::BlueGreen
    }

    /// What follows the catch-up, in order.
    fn phases(self) -> &'static [Phase] {
        match self {
            Mode::BlueGreen => &[
                Phase::BuildIndexes,
                Phase::Switch,
                Phase::Follow,
                Phase::StopWorker,
                Phase::DropOld,
            ],
            Mode::InPlace => &[Phase::StopWorker],
        }
    }
}

/// A step of a rebuild after its replay has caught up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Build the query indexes the replay went without; the replay goes on.
    BuildIndexes,
    /// Pause the live workers, close the gap, switch the pointer.
    Switch,
    /// Keep applying (and invalidating the cache) until the live workers
    /// run on the new generation, so readers never wait on a gap.
    Follow,
    StopWorker,
    /// Drop the old generation once no reader can still hold it.
    DropOld,
}

/// How a phase ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Done,
    /// Interrupted; the rebuild worker is stopped: run again to resume.
    Interrupted,
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
    let mode = options.mode;
    check_history(probe, model, options.allow_partial_history).await?;
    if mode == Mode::InPlace && !options.workers_stopped {
        let live = store.live_workers(Some(name)).await?;
        if !live.is_empty() {
            return Err(RebuildError::LiveWorkers {
                projection: name,
                workers: live
                    .into_iter()
                    .map(|w| format!("{} (pid {} on {})", w.id, w.pid, w.host))
                    .collect(),
            });
        }
    }
    let (from, to) = mode.begin(store, name, options.restart, sink).await?;
    sink.phase(&format!("replaying {name} from offset 0 into generation {to}"));
    info!(projection = name, from, to, "Rebuild started.");

    let mut worker_settings = settings.clone();
    worker_settings.kafka.group_id = format!("{}.rebuild.g{to}", settings.kafka.group_id);
    worker_settings.on_phase = None;
    worker_settings.indexes = mode.indexes();
    if options.allow_partial_history {
        worker_settings.kafka.on_gap = crate::kafka::OnGap::Accepted;
    }
    // With the cache: once readers switch, its batches must invalidate
    // what they cached of this generation.
    let mut run = Run {
        store,
        probe,
        options,
        cancel,
        generations: Generations { model, from, to },
        worker: RebuildWorker::spawn(worker_settings, store.clone(), cache, to, cancel.child_token()),
    };

    let started = Instant::now();
    let Some(events) = run.catch_up(sink).await? else {
        return Ok(None);
    };
    let mut elapsed = started.elapsed();
    let mut followed = None;
    for phase in mode.phases() {
        let step = match phase {
            Phase::BuildIndexes => run.build_indexes(settings.max_backoff, sink).await?,
            Phase::Switch => {
                let step = run.switch(sink).await?;
                elapsed = started.elapsed();
                step
            }
            Phase::Follow => {
                sink.phase("applying until the live workers follow the switch");
                followed = Some(hand_over(store, name, to, options.handover_timeout, cancel).await);
                Step::Done
            }
            Phase::StopWorker => {
                run.worker.stop().await?;
                Step::Done
            }
            Phase::DropOld => {
                run.drop_old(sink).await?;
                Step::Done
            }
        };
        if step == Step::Interrupted {
            return Ok(None);
        }
    }
    Ok(Some(RebuildReport {
        from,
        to,
        events,
        elapsed,
        followed,
    }))
}

/// The generations a rebuild works between (the same one, in place).
#[derive(Debug, Clone, Copy)]
struct Generations {
    model: ReadModel,
    from: u32,
    to: u32,
}

/// One rebuild under way: what its phases share.
struct Run<'a> {
    store: &'a Store,
    probe: &'a StatusProbe,
    options: &'a RebuildOptions,
    cancel: &'a CancellationToken,
    generations: Generations,
    worker: RebuildWorker,
}

/// Refuses (or, allowed, warns of) a history retention has cut.
async fn check_history(probe: &StatusProbe, model: ReadModel, allow_partial: bool) -> Result<(), RebuildError> {
    let partial: Vec<String> = probe
        .positions(model, 0)
        .await?
        .partitions
        .iter()
        .filter(|p| p.low_watermark > 0)
        .map(|p| format!("{}/{} (starts at {})", p.topic, p.partition, p.low_watermark))
        .collect();
    if partial.is_empty() {
        return Ok(());
    }
    if !allow_partial {
        return Err(RebuildError::PartialHistory(partial));
    }
    warn!(projection = model.name(), partitions = %partial.join(", "), "Rebuilding from a partial history (--allow-partial-history).");
    Ok(())
}

impl Run<'_> {
    /// Replays until the new generation lags by at most the catch-up lag and
    /// has reached the serving offsets; returns the events it holds then, or
    /// `None` when interrupted (the worker stopped).
    async fn catch_up(&mut self, sink: &mut dyn ProgressSink) -> Result<Option<i64>, RebuildError> {
        let Generations { model, from, to } = self.generations;
        let (store, probe, options, cancel) = (self.store, self.probe, self.options, self.cancel);
        let worker = &mut self.worker;
        let name = model.name();
        let started = Instant::now();
        let mut first_done = None;
        let mut gaps_accepted = false;
        loop {
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
            // Retention overtook the replay (gap recorded for the new
            // generation, its partition stopped): it can never reach the
            // serving offsets, so say so instead of waiting forever.
            // Told --allow-partial-history (the rerun its message
            // recommends), the partitions go on from the log's start and
            // the gaps stay on record for the new generation.
            match store.gaps(name, to).await {
                Ok(gaps) if !gaps.is_empty() && options.allow_partial_history => {
                    if !gaps_accepted {
                        gaps_accepted = true;
                        warn!(
                            projection = name,
                            gaps = gaps.len(),
                            "Going on past the gaps retention left (--allow-partial-history); they stay on record."
                        );
                        sink.phase(&format!(
                            "going on past {} recorded gap(s) (--allow-partial-history); they stay on record",
                            gaps.len()
                        ));
                    }
                }
                Ok(gaps) if !gaps.is_empty() => {
                    worker.stop().await?;
                    return Err(RebuildError::Overtaken(gaps.into_iter().map(|g| g.error).collect()));
                }
                Ok(_) => {}
                Err(e) => warn!(projection = name, error = %e, "Cannot read the new generation's gaps; retrying."),
            }
            let beside = match probe.beside(model, from, to).await {
                Ok(beside) => beside,
                Err(e) => {
                    // MongoDB or Kafka blinked: the worker retries on its own;
                    // measure again next round.
                    warn!(projection = name, error = %e, "Cannot measure rebuild progress; retrying.");
                    continue;
                }
            };
            let (done, total) = beside.building.progress();
            let base = *first_done.get_or_insert(done);
            let rate = (done - base) as f64 / started.elapsed().as_secs_f64().max(0.001);
            sink.progress(done, total);
            if options.mode.records_progress() {
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
            if beside.building.lag_events <= options.catch_up_lag && reached_serving(model, &beside) {
                // Checked again at the switch; here it spares the live
                // workers a pause for nothing.
                if let Err(e) = check_dead_letters(store, options, self.generations).await {
                    worker.stop().await?;
                    return Err(e);
                }
                return Ok(Some(done));
            }
        }
    }

    /// Builds the new generation's query indexes before the handover pauses
    /// anyone: on a large generation this is the slow part, and the replay
    /// goes on meanwhile. Raced with `cancel`: an interrupt must not wait for it.
    async fn build_indexes(
        &mut self,
        max_backoff: Duration,
        sink: &mut dyn ProgressSink,
    ) -> Result<Step, RebuildError> {
        let Generations { model, to, .. } = self.generations;
        let Run { store, cancel, .. } = *self;
        let worker = &mut self.worker;
        sink.phase(&format!("building the query indexes of generation {to}"));
        let collection = Store::collection_name(model.name(), to);
        let built = tokio::select! {
            () = cancel.cancelled() => Ok(None),
            built = retry_transient("create indexes", cancel, max_backoff, || {
                store.ensure_indexes(&collection, model)
            }) => built,
        };
        match built {
            Ok(Some(())) => Ok(Step::Done),
            Ok(None) => {
                worker.stop().await?;
                sink.phase("interrupted; run the same command again to resume");
                Ok(Step::Interrupted)
            }
            Err(e) => {
                // Stop the replay before saying why: its batch in hand lands.
                worker.stop().await?;
                Err(e.into())
            }
        }
    }

    /// Closes the gap and switches: live workers pause, so the serving
    /// generation stops moving; then the pointer switches once the new one has
    /// reached it exactly. A pause or a catch-up that runs out of time switches
    /// nothing (the serving generation may still be moving): the handover is
    /// withdrawn and tried again, a few times, then the rebuild stops.
    async fn switch(&mut self, sink: &mut dyn ProgressSink) -> Result<Step, RebuildError> {
        let generations = self.generations;
        let Generations { model, from, to } = generations;
        let (store, probe, options, cancel) = (self.store, self.probe, self.options, self.cancel);
        let worker = &mut self.worker;
        let name = model.name();
        let mut attempt = 0;
        loop {
            attempt += 1;
            sink.phase("pausing live workers to close the gap");
            let handover = Handover::request(store, name, from, to, options.handover_timeout).await?;
            let outcome = match handover.wait_paused(store, from, cancel).await {
                Pause::Paused => handover.wait_reached(probe, generations, cancel).await,
                Pause::Cancelled => Reach::Cancelled,
                Pause::TimedOut(waiting) => Reach::NotPaused(waiting),
            };
            let waiting = match outcome {
                Reach::Reached => {
                    // The serving generation is paused: its offsets are final.
                    if let Err(e) = check_dead_letters(store, options, generations).await {
                        handover.withdraw(store).await;
                        worker.stop().await?;
                        return Err(e);
                    }
                    let latest = handover.until - i64::try_from(SWITCH_MARGIN.as_millis()).unwrap_or(0);
                    if store.switch_generation(name, from, to, latest).await? {
                        sink.phase(&format!("switched readers of {name} to generation {to}"));
                        info!(projection = name, from, to, "Readers switched to the new generation.");
                        return Ok(Step::Done);
                    }
                    handover.withdraw(store).await;
                    if store.serving_generation(name).await? != from {
                        worker.stop().await?;
                        return Err(RebuildError::PointerMoved(name));
                    }
                    warn!(
                        projection = name,
                        attempt, "The handover closed before the switch; not switching."
                    );
                    Vec::new()
                }
                Reach::Cancelled => {
                    handover.withdraw(store).await;
                    worker.stop().await?;
                    sink.phase("interrupted before the switch; run the same command again to resume");
                    return Ok(Step::Interrupted);
                }
                Reach::NotPaused(waiting) => {
                    handover.withdraw(store).await;
                    warn!(projection = name, attempt, workers = %waiting.join(", "), "Live workers did not pause in time; not switching.");
                    waiting
                }
                Reach::TimedOut => {
                    handover.withdraw(store).await;
                    warn!(
                        projection = name,
                        attempt, "The new generation did not reach the paused serving offsets in time; not switching."
                    );
                    Vec::new()
                }
            };
            if attempt >= HANDOVER_ATTEMPTS {
                worker.stop().await?;
                return Err(RebuildError::HandoverTimedOut(waiting));
            }
            // Let the live workers catch up before asking them again.
            tokio::select! {
                () = cancel.cancelled() => {}
                () = tokio::time::sleep(options.report_every.max(Duration::from_millis(500))) => {}
            }
        }
    }

    /// Drops the old generation after `grace`, when no reader can still hold
    /// it; an interrupt leaves it.
    async fn drop_old(&self, sink: &mut dyn ProgressSink) -> Result<(), RebuildError> {
        let Generations { model, from, .. } = self.generations;
        let (store, cancel, grace, name) = (self.store, self.cancel, self.options.grace, model.name());
        sink.phase(&format!("dropping generation {from} in {grace:?}"));
        tokio::select! {
            () = cancel.cancelled() => warn!(projection = name, generation = from, "Interrupted before dropping the old generation; it stays."),
            () = tokio::time::sleep(grace) => {
                store.drop_generation(name, from).await?;
                info!(projection = name, generation = from, "Old generation dropped.");
            }
        }
        Ok(())
    }
}

/// How recently a rebuild must have reported progress for `--restart` to
/// take it as still running (it reports every half second).
const RESTART_LEASE: Duration = Duration::from_secs(15);

/// How many of the new generation's letters are compared with the serving
/// one before a switch; past it the rebuild refuses (unless accepted), as
/// it cannot tell that the rest lose nothing.
const LETTERS_COMPARED: i64 = 100_000;

/// Refuses a switch, unless accepted, when the new generation dead-lettered
/// records the serving one applied.
async fn check_dead_letters(
    store: &Store,
    options: &RebuildOptions,
    generations: Generations,
) -> Result<(), RebuildError> {
    let Generations { model, from, to } = generations;
    if options.accept_dead_letters || from == to {
        return Ok(());
    }
    let mut letters = dead_lettered_applied(store, model.name(), from, to).await?;
    if letters.is_empty() {
        return Ok(());
    }
    // Stopped: say so on the pointer, so `--restart` need not wait out the lease.
    if let Err(e) = store.clear_rebuild_progress(model.name(), to).await {
        warn!(error = %e, "Cannot clear the rebuild's progress.");
    }
    let count = letters.len();
    letters.truncate(LETTERS_NAMED);
    Err(RebuildError::DeadLettered {
        projection: model.name(),
        from,
        to,
        count,
        letters,
    })
}

/// How many of the records a refusal names (the count says the rest).
const LETTERS_NAMED: usize = 20;

/// Records generation `to` dead-lettered below the offsets generation
/// `from` has stored, where `from` has no letter of its own: `from`
/// applied them. A letter from before letters carried their generation
/// proves nothing either way, so it does not excuse one. A partition read
/// under another topic id by each (a log reset the serving generation
/// stopped at) is not compared: its stored offset is in a log that is gone.
async fn dead_lettered_applied(store: &Store, name: &str, from: u32, to: u32) -> Result<Vec<String>, StoreError> {
    let letters = store.record_letters_of(name, to, LETTERS_COMPARED).await?;
    if letters.is_empty() {
        return Ok(Vec::new());
    }
    let serving = store.load_offsets(name, from).await?;
    let (serving_ids, building_ids) = (
        store.load_topic_ids(name, from).await?,
        store.load_topic_ids(name, to).await?,
    );
    let applied: Vec<&DeadLetter> = letters
        .iter()
        .filter(|l| {
            let at = (l.topic.clone(), l.partition);
            let same_log = match (serving_ids.get(&at), building_ids.get(&at)) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            };
            same_log && serving.get(&at).is_some_and(|&stored| l.offset < stored)
        })
        .collect();
    let theirs = |l: &DeadLetter| DeadLetter::record_id(name, from, &l.topic, l.partition, l.offset);
    let mut found = HashSet::new();
    for chunk in applied.chunks(1_000) {
        let ids: Vec<String> = chunk.iter().map(|l| theirs(l)).collect();
        found.extend(store.existing_dead_letters(&ids).await?);
    }
    let mut lost: Vec<String> = applied
        .into_iter()
        .filter(|l| !found.contains(&theirs(l)))
        .map(|l| format!("{}/{} offset {} ({})", l.topic, l.partition, l.offset, l.error))
        .collect();
    if letters.len() as i64 >= LETTERS_COMPARED && !lost.is_empty() {
        lost.push(format!(
            "and possibly more (over {LETTERS_COMPARED} letters, not all compared)"
        ));
    }
    Ok(lost)
}

/// Whether the generation being built has reached, on every partition,
/// the offset the serving one has stored: switching then shows readers
/// nothing older than they saw (once the serving generation is paused, see
/// [`Handover`]). A partition counts as reached when the new generation's
/// position there (its stored offset, or the low watermark when retention
/// emptied it) is at least the serving one; only partitions of the
/// projection's topics count.
fn reached_serving(model: ReadModel, beside: &Beside) -> bool {
    let position: HashMap<(&str, i32), i64> = beside
        .building
        .partitions
        .iter()
        .map(|p| ((p.topic.as_str(), p.partition), p.stored_offset))
        .collect();
    let mut behind = 0;
    for serving in &beside.serving.partitions {
        let Some(&at) = position.get(&(serving.topic.as_str(), serving.partition)) else {
            continue;
        };
        let (offset, high) = (serving.stored_offset, serving.high_watermark);
        // A serving offset past the log's end (the topic was re-created: a
        // log reset) can never be reached; the log's end is all there is.
        if offset > high {
            warn!(
                projection = model.name(),
                topic = %serving.topic,
                partition = serving.partition,
                serving = offset,
                log_end = high,
                "The serving generation's stored offset lies beyond the log's end (log reset); the rebuild counts this partition as reached at the log's end."
            );
        }
        if at < offset.min(high) {
            behind += 1;
        }
    }
    if behind > 0 {
        debug!(
            projection = model.name(),
            partitions = behind,
            "New generation not yet at the serving offsets."
        );
    }
    behind == 0
}

/// How long before its deadline a handover no longer allows a switch: the
/// workers end their pause by their own clocks, so this covers clock skew
/// and the switch's round trip.
const SWITCH_MARGIN: Duration = Duration::from_secs(2);

/// How often a rebuild asks live workers to pause before it gives up.
const HANDOVER_ATTEMPTS: u32 = 3;

/// How waiting for the live workers to pause ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pause {
    /// Every live worker of the serving generation reported paused.
    Paused,
    /// These workers had not paused by the handover's deadline.
    TimedOut(Vec<String>),
    Cancelled,
}

/// How closing the gap to the serving generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reach {
    /// Reached while the serving generation was paused: safe to switch.
    Reached,
    /// Not reached by the handover's deadline.
    TimedOut,
    /// The live workers did not pause (these, by id).
    NotPaused(Vec<String>),
    Cancelled,
}

/// A handover request on the generation pointer: live workers of the
/// serving generation pause until the switch, or until its deadline (so a
/// rebuild that dies mid-way cannot stop them for longer).
struct Handover {
    name: &'static str,
    deadline: tokio::time::Instant,
    /// The request's `handoverUntil` (ms): what a worker reports as paused
    /// for, so a pause left over from an earlier request never counts.
    until: i64,
}

impl Handover {
    async fn request(
        store: &Store,
        name: &'static str,
        from: u32,
        to: u32,
        timeout: Duration,
    ) -> Result<Handover, RebuildError> {
        let until = chrono::Utc::now().timestamp_millis() + i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        if !store.request_handover(name, from, to, until).await? {
            return Err(RebuildError::PointerMoved(name));
        }
        Ok(Handover {
            name,
            deadline: tokio::time::Instant::now() + timeout,
            until,
        })
    }

    /// Waits until every live worker of `from` has said it is paused
    /// (registry entries expire with their heartbeat: a killed worker is
    /// never waited for past its lease).
    async fn wait_paused(&self, store: &Store, from: u32, cancel: &CancellationToken) -> Pause {
        let mut waiting = Vec::new();
        while tokio::time::Instant::now() < self.deadline {
            if cancel.is_cancelled() {
                return Pause::Cancelled;
            }
            match store.live_workers(Some(self.name)).await {
                Ok(workers) => {
                    waiting = workers
                        .into_iter()
                        .filter(|w| w.generation == from && w.paused_for != Some(self.until))
                        .map(|w| w.id)
                        .collect();
                    if waiting.is_empty() {
                        return Pause::Paused;
                    }
                }
                Err(e) => warn!(projection = self.name, error = %e, "Cannot read the worker registry."),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Pause::TimedOut(waiting)
    }

    /// Waits until the new generation has reached the (now paused) serving
    /// offsets, until the handover's deadline.
    async fn wait_reached(&self, probe: &StatusProbe, generations: Generations, cancel: &CancellationToken) -> Reach {
        let Generations { model, from, to } = generations;
        loop {
            match probe
                .beside(model, from, to)
                .await
                .map(|beside| reached_serving(model, &beside))
            {
                // Reached with time to spare: the switch itself is guarded
                // by the handover still being open (`switch_generation`).
                Ok(true) if tokio::time::Instant::now() + SWITCH_MARGIN < self.deadline => return Reach::Reached,
                Ok(true) => return Reach::TimedOut,
                Ok(false) => {}
                Err(e) => warn!(projection = self.name, error = %e, "Cannot compare generations; retrying."),
            }
            if tokio::time::Instant::now() + SWITCH_MARGIN >= self.deadline {
                return Reach::TimedOut;
            }
            tokio::select! {
                () = cancel.cancelled() => return Reach::Cancelled,
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    async fn withdraw(&self, store: &Store) {
        if let Err(e) = store.cancel_handover(self.name).await {
            warn!(projection = self.name, error = %e, "Cannot withdraw the handover; it expires on its own.");
        }
    }
}

/// Waits until every live worker of the projection consumes generation
/// `to` (then a little longer, for their first batches), or `timeout`.
async fn hand_over(store: &Store, name: &str, to: u32, timeout: Duration, cancel: &CancellationToken) -> Followed {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match store.live_workers(Some(name)).await {
            Ok(workers) if workers.iter().all(|w| w.generation == to && w.applying) => {
                let linger = if workers.is_empty() {
                    Duration::ZERO
                } else {
                    HANDOVER_LINGER
                };
                tokio::select! {
                    () = cancel.cancelled() => return Followed::Cancelled,
                    () = tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + linger)) => {}
                }
                return Followed::All;
            }
            Ok(_) => {}
            Err(e) => warn!(projection = name, error = %e, "Cannot read the worker registry."),
        }
        if cancel.is_cancelled() {
            return Followed::Cancelled;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(
                projection = name,
                "Live workers did not all follow the switch in time; stopping the rebuild worker anyway."
            );
            return Followed::TimedOut;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{GenerationStatus, PartitionStatus};

    fn generation(generation: u32, partitions: &[(&str, i32, i64, i64)]) -> GenerationStatus {
        GenerationStatus {
            generation,
            lag_events: 0,
            partitions: partitions
                .iter()
                .map(|&(topic, partition, stored_offset, high_watermark)| PartitionStatus {
                    topic: topic.into(),
                    partition,
                    stored_offset,
                    low_watermark: 0,
                    high_watermark,
                    lag_events: 0,
                    lag_seconds: 0.0,
                    stalled: false,
                    stuck: None,
                    gap: None,
                })
                .collect(),
        }
    }

    fn reached(serving: &[(&str, i32, i64, i64)], building: &[(&str, i32, i64, i64)]) -> bool {
        let beside = Beside {
            serving: generation(1, serving),
            building: generation(2, building),
        };
        reached_serving(ReadModel::Catalog, &beside)
    }

    #[test]
    fn a_partition_behind_the_serving_offset_holds_the_switch() {
        let serving = [("a", 0, 10, 12), ("a", 1, 5, 5)];
        assert!(!reached(&serving, &[("a", 0, 10, 12), ("a", 1, 4, 5)]));
        assert!(reached(&serving, &[("a", 0, 11, 12), ("a", 1, 5, 5)]));
    }

    #[test]
    fn a_serving_offset_past_the_log_end_counts_as_reached_at_the_end() {
        // The topic was re-created: 40 can never be reached, 3 is the end.
        assert!(reached(&[("a", 0, 40, 3)], &[("a", 0, 3, 3)]));
        assert!(!reached(&[("a", 0, 40, 3)], &[("a", 0, 2, 3)]));
    }

    #[test]
    fn in_place_the_generation_is_its_own_serving_one() {
        let same = [("a", 0, 7, 9)];
        assert!(reached(&same, &same));
    }
}
