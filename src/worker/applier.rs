//! Applying a batch of records to one generation of a read model: decode,
//! dead-letter what cannot be applied, fold events into course states,
//! write them revision-guarded, store the offsets.

use std::collections::HashSet;

use super::fold::{Fold, Folded};
use super::states::{Checkout, Guessed, StateCache};
use super::*;

/// How many times a batch retries revision conflicts before backing off.
const MAX_CONFLICT_ROUNDS: usize = 16;

/// Courses written per round: a fold's documents are built and sent this
/// many at a time.
const WRITE_SLICE: usize = 2_000;

/// What a batch did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub applied: usize,
    pub dead_letters: usize,
    pub documents_written: usize,
    /// Next offset per (topic, partition) stored by this batch.
    pub offsets: Vec<(String, i32, i64)>,
}

/// What [`Applier::write`] wrote of a fold: everything but its offsets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    pub applied: usize,
    pub dead_letters: usize,
    pub documents_written: usize,
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
    /// Recently written states, shared by clones.
    states: Arc<StateCache>,
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
            states: Arc::new(StateCache::sized(16 * 1024, DEFAULT_STATE_CACHE_BYTES)),
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
        self.states = Arc::new(StateCache::new(bytes));
        self
    }

    /// Records over `limit` bytes are dead-lettered instead of applied.
    #[must_use]
    pub fn with_record_limit(mut self, limit: usize) -> Self {
        self.max_record_bytes = limit.clamp(1, MAX_RECORD_BYTES_CAP);
        self
    }

    /// The projection it applies to.
    pub fn projection(&self) -> &'static str {
        self.model.name()
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
    pub async fn apply_batch_and_advance(
        &self,
        records: &[Record],
        advanced: &[(String, i32, i64)],
    ) -> Result<BatchOutcome, BatchError> {
        let mut fold = Fold::default();
        self.fold_in(&mut fold, records, advanced);
        self.flush(&fold).await
    }

    /// Decodes records into `fold`: their events merged into its states,
    /// the ones that cannot be applied kept as dead letters, their offsets
    /// covered. Writes nothing.
    pub fn fold_in(&self, fold: &mut Fold, records: &[Record], advanced: &[(String, i32, i64)]) {
        let projection = self.model.name();
        for record in records {
            let size = record.size();
            if size > self.max_record_bytes {
                let e = crate::decode::DecodeError::TooLarge {
                    size,
                    limit: self.max_record_bytes,
                };
                warn!(projection, position = %record.position(), error = %e, "Dead-lettering oversized record.");
                fold.add_dead_letter(
                    DeadLetter::oversized(projection, record, &e.to_string()).of_generation(self.generation),
                );
                continue;
            }
            match decode(record) {
                Ok(event) => fold.add_event(
                    &event,
                    Some((&record.topic, record.partition, record.offset, record.timestamp)),
                ),
                Err(e) => {
                    warn!(projection, position = %record.position(), error = %e, "Dead-lettering undecodable record.");
                    fold.add_dead_letter(
                        DeadLetter::new(projection, record, &e.to_string()).of_generation(self.generation),
                    );
                }
            }
        }
        fold.cover(records, advanced);
    }

    /// Writes a fold: each touched course once (revision-guarded), then its
    /// dead letters, then the offsets it covers, so no offset is stored
    /// before everything below it is written. Safe to call again with the
    /// same fold after any failure.
    pub async fn flush(&self, fold: &Fold) -> Result<BatchOutcome, BatchError> {
        let Written {
            applied,
            dead_letters,
            documents_written,
        } = self.write(fold).await?;
        let offsets = self.store_positions(fold).await?;
        Ok(BatchOutcome {
            applied,
            dead_letters,
            documents_written,
            offsets,
        })
    }

    /// Writes a fold's courses (each once, revision-guarded) and dead
    /// letters, storing no offset: [`Applier::store_positions`] does, after
    /// this succeeded. Safe to call again with the same fold after any
    /// failure.
    #[instrument(skip_all, fields(projection = self.model.name(), records = fold.records, courses = fold.courses.len()))]
    pub async fn write(&self, fold: &Fold) -> Result<Written, BatchError> {
        let started = Instant::now();
        let projection = self.model.name();
        let written = self.write_folded(&fold.courses).await?;
        if !fold.dead.is_empty() {
            self.store.put_dead_letters(&fold.dead).await?;
            telemetry::dead_letters(projection, fold.dead.len() as u64);
        }
        for (kind, count) in &fold.kinds {
            telemetry::events_applied(projection, kind, *count);
        }
        telemetry::documents_written(projection, written as u64);
        telemetry::batch(projection, fold.records, started.elapsed());
        Ok(Written {
            applied: fold.events,
            dead_letters: fold.dead.len(),
            documents_written: written,
        })
    }

    /// Stores the offsets a fold covers (forward only); call it only once
    /// [`Applier::write`] wrote that fold, or a fold that covers it.
    #[instrument(skip_all, fields(projection = self.model.name()))]
    pub async fn store_positions(&self, fold: &Fold) -> Result<Vec<(String, i32, i64)>, BatchError> {
        let projection = self.model.name();
        let offsets = fold.offsets();
        if offsets.is_empty() {
            return Ok(offsets);
        }
        let AlreadyNewer(behind) = self.store.store_offsets(projection, self.generation, &offsets).await?;
        if behind > 0 {
            // The partition's next owner stored a later offset: ours stays unwritten.
            debug!(projection, partitions = behind, "Offsets already stored further on.");
        }
        Ok(offsets)
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

    /// Applies events to their courses' documents; returns documents written.
    pub async fn apply_events(&self, events: &[CourseEvent]) -> Result<usize, BatchError> {
        let mut fold = Fold::default();
        fold.add_events(events);
        self.write_folded(&fold.courses).await
    }

    /// Merges each course's folded state into its stored one and writes the
    /// changed ones; returns documents written.
    async fn write_folded(&self, folded: &Folded) -> Result<usize, BatchError> {
        if folded.is_empty() {
            return Ok(0);
        }
        self.announce_write().await?;
        let courses: Vec<String> = folded.keys().cloned().collect();
        let mut written = 0;
        // A slice at a time: a large fold's documents are never all
        // encoded at once.
        for slice in courses.chunks(WRITE_SLICE) {
            let (done, mut pending) = self.first_round(folded, slice).await?;
            written += done;
            for _ in 1..MAX_CONFLICT_ROUNDS {
                if pending.is_empty() {
                    break;
                }
                // Later rounds load every course not in memory.
                let round = self.round(folded, &pending, Missing::Load).await?;
                written += round.written;
                pending = round.conflicts.0;
            }
            if !pending.is_empty() {
                // Contention this persistent is transient by nature: retry the batch.
                return Err(BatchError::Store(StoreError::Contended(pending.len())));
            }
        }
        Ok(written)
    }

    /// Readers bypass the cache from now until this batch's bump. A write
    /// Redis was not told of could be hidden from readers by answers cached
    /// before it, for as long as their TTL: never.
    async fn announce_write(&self) -> Result<(), BatchError> {
        let Some(cache) = &self.cache else {
            return Ok(());
        };
        let announced = cache.begin_write(self.scope(), &self.writer).await;
        if let Some(held) = &self.held {
            held.store(!announced, std::sync::atomic::Ordering::Relaxed);
        }
        if announced {
            Ok(())
        } else {
            Err(BatchError::Unannounced)
        }
    }

    /// The first round: one round trip per batch in the common case.
    /// Courses seen recently come from memory, and unseen ones are presumed
    /// new (a replay from zero, a rebuild) while that keeps being true;
    /// refused ones come back as conflicts and are loaded next round.
    async fn first_round(&self, folded: &Folded, pending: &[String]) -> Result<(usize, Vec<String>), BatchError> {
        let presume = self.states.presumes_absent();
        let missing = if presume { Missing::PresumeAbsent } else { Missing::Load };
        let round = self.round(folded, pending, missing).await?;
        self.states.learn(round.guessed, round.written);
        Ok((round.written, round.conflicts.0))
    }

    /// Merges each pending course's folded state into its stored one and
    /// writes the changed ones, revision-guarded.
    async fn round(&self, folded: &Folded, pending: &[String], missing: Missing) -> Result<Round, BatchError> {
        let collection = self.collection();
        let Checkout {
            mut known,
            missing: unseen,
        } = self.states.checkout(pending);
        let presumed: HashSet<String> = match missing {
            Missing::PresumeAbsent => unseen.into_iter().collect(),
            Missing::Load => {
                known.extend(self.store.load_states(&collection, &unseen).await?);
                HashSet::new()
            }
        };
        let mut writes = Vec::with_capacity(pending.len());
        let mut unchanged = Vec::new();
        for id in pending {
            let Some(events) = folded.get(id).map(|course| &course.state) else {
                continue;
            };
            let (mut state, rev) = match known.remove(id) {
                Some(s) => (s.state, s.rev),
                None => (CourseState::new(id.as_str()), 0),
            };
            let changed = state.merge(events);
            // A replayed or duplicate event changes nothing: skip the write
            // (only a stored course can be left unchanged).
            if rev > 0 && !changed {
                unchanged.push(Stored { state, rev });
                continue;
            }
            writes.push(DocWrite::new(self.model, id.clone(), rev, state));
        }
        let conflicts = self.store.write_states(&collection, &writes).await?;
        let guessed = Guessed {
            presumed: presumed.len(),
            wrong: StateCache::wrong_guesses(&presumed, &conflicts),
        };
        let written = writes.len() - conflicts.len();
        self.states.commit(writes, unchanged, &conflicts);
        if !conflicts.is_empty() {
            telemetry::write_conflicts(self.model.name(), conflicts.len());
            debug!(
                conflicts = conflicts.len(),
                "Another worker wrote these courses; reapplying."
            );
        }
        Ok(Round {
            written,
            conflicts,
            guessed,
        })
    }
}

/// What one round of writes did.
#[derive(Debug)]
struct Round {
    written: usize,
    /// Courses to reload and reapply next round.
    conflicts: Conflicts,
    /// What the guess about courses not in memory came to.
    guessed: Guessed,
}

/// How a round finds the stored states of courses not in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Missing {
    /// Read them from the store.
    Load,
    /// Presume them new: write at revision 0, no read.
    PresumeAbsent,
}
