//! One generation's consumer: the Kafka reader thread, stored offsets on
//! assignment, and the batch loop that feeds the applier.

use super::*;
use std::ops::ControlFlow;

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

    fn stored_topic_ids(&self) -> Result<HashMap<(String, i32), String>, OffsetsUnavailable> {
        self.block_on(self.store.load_topic_ids(self.projection, self.generation))
    }

    fn record_topic_id(
        &self,
        topic: &str,
        partition: i32,
        previous: Option<&str>,
        id: &str,
    ) -> Result<(), OffsetsUnavailable> {
        self.block_on(
            self.store
                .record_topic_id(self.projection, self.generation, (topic, partition), previous, id),
        )
    }
}

/// Consumes into one generation of the projection until `cancel` fires.
/// The rebuild runs this with its own consumer group and a new generation,
/// and no `paused`: an operator's pause holds live workers only.
pub async fn run_generation(
    settings: &WorkerSettings,
    store: Store,
    cache: Option<Cache>,
    generation: u32,
    cancel: CancellationToken,
    mut paused: Option<Paused>,
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
        let held_from_start = paused.as_mut().is_some_and(|p| p.borrow_and_update().is_some());
        let hold = Arc::new(HoldRequest::new(held_from_start));
        let mut holding = if held_from_start { Holding::Asked } else { Holding::No };
        let consumer = Consumer::subscribe(&settings.kafka, offsets, Arc::clone(&hold))?;
        // About two batches of records queue up, as runs no longer than a
        // batch (nor than READ_CHUNK).
        let longest_run = settings.batch_size.clamp(1, READ_CHUNK);
        let (tx, mut rx) = mpsc::channel::<Feed>((settings.batch_size * 2).div_ceil(longest_run).max(2));
        let budget = ByteBudget::new(settings.max_queue_bytes);
        let reader_cancel = cancel.child_token();
        let assigned = consumer.assigned();
        let backlog = consumer.backlog();
        let mut reader = Some(consumer.spawn_reader(tx, Arc::clone(&budget), longest_run, reader_cancel.clone()));
        info!(group = %settings.kafka.group_id, "Projector started.");

        let store_for_hold = store.clone();
        if paused.is_some() {
            // Raised again once the reader holds, if still paused.
            paused_flag(settings, held_from_start);
        }
        let applier = Applier::new(model, store, cache, generation)
            .with_record_limit(settings.max_record_bytes)
            .with_state_cache_bytes(settings.state_cache_bytes)
            .with_held_flag(settings.cache_held.clone());
        let hard = deadline_after(&cancel, settings.shutdown_timeout);
        let mut epoch_pending = false;
        let mut reported = false;
        let mut fold = Fold::default();
        // Records of a run that did not fit in the last batch: the next
        // batch starts with them.
        let mut carried: Vec<Record> = Vec::new();
        let mut pace = settings.max_rate.map(Pace::new);
        let result = loop {
            // An operator paused the projection: ask the reader to hold;
            // what it handed over before is applied and written when its
            // `Held` arrives.
            if holding == Holding::No && paused.as_mut().is_some_and(|p| p.borrow_and_update().is_some()) {
                hold.set(true);
                holding = Holding::Asked;
                info!("Pausing: writing what is in hand and storing its offsets.");
            }
            // Records that queued up while the last batch was written make
            // the next batch at once (group commit); only a record that
            // arrives into an idle worker waits the linger for company.
            let queued = if cancel.is_cancelled() {
                None
            } else if !carried.is_empty() {
                Some(Feed::Records(std::mem::take(&mut carried)))
            } else {
                rx.try_recv().ok()
            };
            let (first, arrival) = if let Some(feed) = queued {
                (Some(feed), Arrival::Queued)
            } else {
                let first = tokio::select! {
                    biased;
                    () = cancel.cancelled() => break Ok(GenerationEnd::Cancelled),
                    r = rx.recv() => r,
                    // Nothing arrives while a fold waits: it is written once
                    // the worker has caught up or its interval is over, not
                    // only when the next batch comes (none may).
                    () = tokio::time::sleep(FOLD_CHECK), if !fold.is_empty() => {
                        let behind = backlog.load(std::sync::atomic::Ordering::Relaxed) >= settings.batch_size as i64;
                        let why = settings.fold.judge(&fold, behind, false);
                        if why != Flush::Not {
                            match flush(&applier, &mut fold, &consumer, &hard, settings.max_backoff, why, &settings.kafka.group_id).await {
                                ControlFlow::Continue(told) => epoch_pending = told.pending(epoch_pending),
                                ControlFlow::Break(end) => break end,
                            }
                        }
                        continue;
                    }
                    // Idle tick: retry a cache invalidation Redis refused earlier.
                    () = tokio::time::sleep(Duration::from_millis(200)), if epoch_pending => {
                        epoch_pending = !applier.bump_cache().await;
                        continue;
                    }
                    // Asked to pause while idle: the reader's `Held` comes next.
                    r = async { paused.as_mut()?.changed().await.ok() }, if holding == Holding::No && paused.is_some() => {
                        // The pointer watcher is gone: the generation is ending.
                        if r.is_none() {
                            cancel.cancelled().await;
                        }
                        continue;
                    }
                    // Assigned and idle: following this generation all the same
                    // (a rebuild's handover waits for it).
                    () = tokio::time::sleep(Duration::from_millis(100)), if !reported && holding == Holding::No => {
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
                    ReaderExit::Fatal(reason) => GenerationEnd::KafkaFatal(reason),
                    other => GenerationEnd::ReaderDied(format!("reader stopped unasked: {other:?}")),
                });
            };
            if !reported && holding == Holding::No {
                // Something arrived, so partitions are assigned: consuming.
                report(settings, generation, true);
                reported = true;
            }
            let (batch, advanced, reader_held) = collect_batch(
                first,
                arrival,
                &mut rx,
                settings.batch_size,
                settings.batch_linger,
                &mut carried,
            )
            .await;
            if let Some(pace) = &mut pace {
                // Throttled: the reader waits behind the queue meanwhile.
                pace.take(batch.len(), &cancel).await;
            }
            let bytes: usize = batch.iter().map(Record::size).sum();
            // Folded, the records are done with: the fold counts what it keeps.
            applier.fold_in(&mut fold, &batch, &advanced);
            budget.release(bytes);
            // Behind: more than a batch still waits in the log.
            let behind = backlog.load(std::sync::atomic::Ordering::Relaxed) >= settings.batch_size as i64;
            let why = settings.fold.judge(&fold, behind, cancel.is_cancelled() || reader_held);
            if why != Flush::Not && !fold.is_empty() {
                match flush(&applier, &mut fold, &consumer, &hard, settings.max_backoff, why, &settings.kafka.group_id).await {
                    ControlFlow::Continue(told) => epoch_pending = told.pending(epoch_pending),
                    ControlFlow::Break(end) => break end,
                }
            }
            if reader_held {
                report(settings, generation, false);
                reported = false;
                let Some(paused) = paused.as_mut() else {
                    // Only a worker that watches for pauses asks to hold.
                    hold.set(false);
                    holding = Holding::No;
                    continue;
                };
                let reader_ended = || reader.as_ref().is_none_or(std::thread::JoinHandle::is_finished);
                match hold_while_paused(settings, &store_for_hold, generation, &consumer, paused, &cancel, &reader_ended).await {
                    Ok(Resumed::Here) => {
                        hold.set(false);
                        holding = Holding::No;
                    }
                    Ok(Resumed::Rejoin(why)) => break Ok(GenerationEnd::ResumeRejoin(why)),
                    Ok(Resumed::NotYet) => break Ok(GenerationEnd::Cancelled),
                    // Its channel closes: the next receive finds out why.
                    Ok(Resumed::ReaderEnded) => {}
                    Err(e) => break Err(e),
                }
            }
        };
        // What was folded when the loop ended is written too (a handover
        // waits for it), within the shutdown deadline.
        let result = match result {
            Ok(end) if !fold.is_empty() => {
                match flush(
                    &applier,
                    &mut fold,
                    &consumer,
                    &hard,
                    settings.max_backoff,
                    Flush::Stopping,
                    &settings.kafka.group_id,
                )
                .await
                {
                    ControlFlow::Continue(_) => Ok(end),
                    ControlFlow::Break(end) => end,
                }
            }
            other => other,
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

/// Where an operator's pause stands in a generation's loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holding {
    /// Not paused: reading.
    No,
    /// The reader was asked to hold; its `Held` has not arrived yet, so
    /// records before it may still come and are applied.
    Asked,
}

/// How an operator's pause, held inside the generation, ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resumed {
    /// Lifted, and every assigned partition moved to its stored offset
    /// (where the pause left it, or where `courseview offsets` put it).
    Here,
    /// Lifted, but some partition could not be moved there (revoked
    /// meanwhile, say): the consumer must start again from the stored
    /// offsets.
    Rejoin(String),
    /// The generation ends first (shutdown, a switch or a handover).
    NotYet,
    /// The reader stopped while held (a rebalance it could not make, a
    /// fatal client error): the member is gone, and why is on its channel.
    ReaderEnded,
}

fn paused_flag(settings: &WorkerSettings, on: bool) {
    if let Some(flag) = &settings.operator_paused {
        flag.store(on, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How often a held worker looks whether its reader is still there.
const READER_CHECK: Duration = Duration::from_millis(500);

/// Holds while an operator has the projection paused. The fold is
/// written and its offsets stored; the consumer keeps polling, so it stays
/// in its group with its partitions paused, and applies nothing.
async fn hold_while_paused(
    settings: &WorkerSettings,
    store: &Store,
    generation: u32,
    consumer: &Consumer,
    paused: &mut Paused,
    cancel: &CancellationToken,
    reader_ended: &(dyn Fn() -> bool + Sync),
) -> Result<Resumed, WorkerError> {
    let projection = settings.model.name();
    // Resumed before the reader held: nothing to say.
    if let Some(info) = paused.borrow().clone() {
        paused_flag(settings, true);
        info!(
            projection,
            generation,
            by = info.by,
            reason = info.reason.unwrap_or_default(),
            "Paused by an operator; applying nothing until resumed, still in the group."
        );
    }
    while paused.borrow_and_update().is_some() {
        tokio::select! {
            () = cancel.cancelled() => return Ok(Resumed::NotYet),
            changed = paused.changed() => if changed.is_err() {
                // The pointer watcher is gone: the generation is ending.
                cancel.cancelled().await;
                return Ok(Resumed::NotYet);
            },
            () = tokio::time::sleep(READER_CHECK) => if reader_ended() {
                return Ok(Resumed::ReaderEnded);
            },
        }
    }
    // Each partition starts at its stored offset, not where librdkafka
    // paused it: `courseview offsets` may have moved it meanwhile.
    let read = || store.load_offsets(projection, generation);
    let Some(stored) = retry_transient("read stored offsets", cancel, settings.max_backoff, read).await? else {
        return Ok(Resumed::NotYet);
    };
    paused_flag(settings, false);
    match consumer.seek_to(&stored).await {
        Ok(()) => {
            info!(projection, generation, "Resumed; going on from the stored offsets.");
            Ok(Resumed::Here)
        }
        Err(why) => Ok(Resumed::Rejoin(why)),
    }
}

/// Paces records to at most `rate` per second: each batch may go once the
/// ones before it have had their share of time.
#[derive(Debug)]
struct Pace {
    rate: f64,
    next: tokio::time::Instant,
}

impl Pace {
    fn new(rate: f64) -> Self {
        Pace {
            rate,
            next: tokio::time::Instant::now(),
        }
    }

    /// Waits until `records` more may go (or `cancel` fires).
    async fn take(&mut self, records: usize, cancel: &CancellationToken) {
        let now = tokio::time::Instant::now();
        let start = self.next.max(now);
        self.next = start + Duration::from_secs_f64(records as f64 / self.rate);
        tokio::select! {
            () = cancel.cancelled() => {}
            () = tokio::time::sleep_until(start) => {}
        }
    }
}

/// How often an idle worker holding a fold looks whether to write it.
const FOLD_CHECK: Duration = Duration::from_millis(50);

/// Whether the cache heard of a flush's changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Told {
    /// No document changed: there was nothing to tell.
    NothingChanged,
    Yes,
    /// Redis refused: it is told again when the worker is idle.
    Refused,
}

impl Told {
    /// Whether a cache invalidation is still owed, given whether one was.
    fn pending(self, before: bool) -> bool {
        match self {
            Self::NothingChanged => before,
            Self::Yes => false,
            Self::Refused => true,
        }
    }
}

/// Writes the fold (retrying what is transient, until the shutdown
/// deadline), tells the cache, then stores its offsets, in the group too,
/// leaving the fold empty. `Break` ends the generation: the deadline
/// passed with nothing stored, or a write failed for good.
async fn flush(
    applier: &Applier,
    fold: &mut Fold,
    consumer: &Consumer,
    hard: &CancellationToken,
    max_backoff: Duration,
    why: Flush,
    group: &str,
) -> ControlFlow<Result<GenerationEnd, WorkerError>, Told> {
    // The flush's CONSUMER span: its writes, offset store and cache
    // announcement are its children.
    let span = fold.process_span(applier.projection(), group);
    // Behind, the youngest courses wait for the next fold (and hold back
    // the offsets of their records).
    let young = if why.carries() {
        fold.take_young()
    } else {
        Fold::default()
    };
    // Whether the cache must hear of this flush: a carried fold's courses
    // were counted when folded, so courses count too.
    let changes = fold.events() + fold.dead.len() + fold.courses.len() > 0;
    async {
        let held: &Fold = fold;
        let started = tokio::time::Instant::now();
        let outcome = match until_deadline("apply batch", hard, max_backoff, || applier.write(held)).await {
            Ok(Some(outcome)) => outcome,
            Ok(None) => {
                return abandoned(
                    fold,
                    "Shutdown deadline passed; batch abandoned, its offsets not stored.",
                )
            }
            Err(e) => return ControlFlow::Break(Err(e.into())),
        };
        // Readers may see the batch now: its offsets say only where a
        // restart begins, not what is written.
        let told = if !changes {
            // A fold of position advances only changed no document.
            Told::NothingChanged
        } else if applier.bump_cache().await {
            Told::Yes
        } else {
            Told::Refused
        };
        // Retried on its own: the documents above are written.
        match until_deadline("store offsets", hard, max_backoff, || applier.store_positions(held)).await {
            Ok(Some(offsets)) => consumer.commit(&offsets),
            Ok(None) => return abandoned(fold, "Shutdown deadline passed; batch written, its offsets not stored."),
            Err(e) => return ControlFlow::Break(Err(e.into())),
        }
        debug!(
            ?why,
            records = fold.records(),
            applied = outcome.applied,
            dead = outcome.dead_letters,
            written = outcome.documents_written,
            age_ms = fold.age().as_millis() as u64,
            write_ms = started.elapsed().as_millis() as u64,
            "Batch committed."
        );
        *fold = young;
        fold.restart_clock();
        ControlFlow::Continue(told)
    }
    .instrument(span)
    .await
}

/// Ends the generation with the fold's offsets unstored.
fn abandoned<T>(fold: &Fold, why: &'static str) -> ControlFlow<Result<GenerationEnd, WorkerError>, T> {
    warn!(records = fold.records(), "{why}");
    ControlFlow::Break(Ok(GenerationEnd::Abandoned))
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panicked".to_owned())
}

/// Runs `op`, retried through transient failures, until it is done or
/// the hard deadline passes (`Ok(None)`), even in the middle of a try.
async fn until_deadline<T, F, Fut>(
    what: &'static str,
    hard: &CancellationToken,
    max_backoff: Duration,
    op: F,
) -> Result<Option<T>, BatchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BatchError>>,
{
    tokio::select! {
        r = retry_transient(what, hard, max_backoff, op) => r,
        () = hard.cancelled() => Ok(None),
    }
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
/// alongside. Records of a run past `max` go to `carried` (empty when
/// called), for the next batch.
async fn collect_batch(
    first: Feed,
    arrival: Arrival,
    rx: &mut mpsc::Receiver<Feed>,
    max: usize,
    linger: Duration,
    carried: &mut Vec<Record>,
) -> (Vec<Record>, Vec<(String, i32, i64)>, bool) {
    let (mut batch, mut advanced) = (Vec::new(), Vec::new());
    // Takes `feed` in; true when it was the reader's `Held`.
    let mut take = |feed: Feed, batch: &mut Vec<Record>| -> bool {
        match feed {
            Feed::Records(mut run) => {
                let room = max.saturating_sub(batch.len());
                if run.len() > room {
                    carried.extend(run.drain(room..));
                }
                if batch.is_empty() {
                    *batch = run;
                } else {
                    batch.append(&mut run);
                }
            }
            Feed::Advance { topic, partition, next } => advanced.push((topic, partition, next)),
            Feed::Held => return true,
        }
        false
    };
    let mut held = take(first, &mut batch);
    // An advance alone is a batch at once: nothing else is coming.
    let advance_only = batch.is_empty() && !held;
    let deadline = tokio::time::Instant::now() + linger;
    // Nothing follows the reader's `Held`: the batch ends there.
    while !advance_only && !held && batch.len() < max {
        match rx.try_recv() {
            Ok(feed) => held = take(feed, &mut batch),
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) if arrival == Arrival::Queued => break,
            Err(mpsc::error::TryRecvError::Empty) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(feed)) => held = take(feed, &mut batch),
                Ok(None) | Err(_) => break,
            },
        }
    }
    (batch, advanced, held)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::rec;

    #[tokio::test]
    async fn a_pace_lets_through_no_more_than_its_rate() {
        let mut pace = Pace::new(2_000.0);
        let cancel = CancellationToken::new();
        let started = std::time::Instant::now();
        // 1,000 records at 2,000/s: the first batch goes at once, and the
        // ten after it wait for the share of time the ones before took.
        for _ in 0..10 {
            pace.take(100, &cancel).await;
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(440), "paced: {took:?}");
        assert!(took < Duration::from_millis(900), "not slower than the rate: {took:?}");
    }

    #[tokio::test]
    async fn records_already_waiting_make_a_batch_at_once_without_waiting_out_the_linger() {
        let (tx, mut rx) = mpsc::channel(16);
        for offset in 1..5 {
            tx.send(Feed::Records(vec![rec("a", 0, offset)])).await.expect("queued");
        }
        let started = std::time::Instant::now();
        let (batch, _, _) = collect_batch(
            Feed::Records(vec![rec("a", 0, 0)]),
            Arrival::Queued,
            &mut rx,
            100,
            Duration::from_secs(5),
            &mut Vec::new(),
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
            let _ = tx.send(Feed::Records(vec![rec("a", 0, 1)])).await;
        });
        let (batch, _, _) = collect_batch(
            Feed::Records(vec![rec("a", 0, 0)]),
            Arrival::Awaited,
            &mut rx,
            100,
            Duration::from_secs(2),
            &mut Vec::new(),
        )
        .await;
        assert_eq!(batch.len(), 2, "the record sent 30 ms later joined the batch");
    }

    #[tokio::test]
    async fn a_batch_never_grows_past_its_size() {
        let (tx, mut rx) = mpsc::channel(10);
        for i in 1..9 {
            tx.send(Feed::Records(vec![rec("a", 0, i)])).await.expect("send");
        }
        for arrival in [Arrival::Queued, Arrival::Awaited] {
            let (batch, _, _) = collect_batch(
                Feed::Records(vec![rec("a", 0, 0)]),
                arrival,
                &mut rx,
                3,
                Duration::from_millis(10),
                &mut Vec::new(),
            )
            .await;
            assert_eq!(batch.len(), 3, "{arrival:?}");
        }
    }

    #[tokio::test]
    async fn a_run_longer_than_the_batch_is_split_and_the_rest_starts_the_next_batch_in_order() {
        let (tx, mut rx) = mpsc::channel(10);
        tx.send(Feed::Records((5..9).map(|i| rec("a", 0, i)).collect()))
            .await
            .expect("send");
        let mut carried = Vec::new();
        let run = (0..5).map(|i| rec("a", 0, i)).collect();
        let (batch, _, _) = collect_batch(
            Feed::Records(run),
            Arrival::Queued,
            &mut rx,
            3,
            Duration::from_millis(10),
            &mut carried,
        )
        .await;
        let offsets = |records: &[Record]| records.iter().map(|r| r.offset).collect::<Vec<_>>();
        assert_eq!(offsets(&batch), [0, 1, 2], "no more than the batch's size");
        assert_eq!(offsets(&carried), [3, 4], "the rest kept, nothing read past it");
        let (batch, _, _) = collect_batch(
            Feed::Records(std::mem::take(&mut carried)),
            Arrival::Queued,
            &mut rx,
            3,
            Duration::from_millis(10),
            &mut carried,
        )
        .await;
        assert_eq!(offsets(&batch), [3, 4, 5], "the carried records first, then the queue");
        assert_eq!(offsets(&carried), [6, 7, 8]);
    }
}
