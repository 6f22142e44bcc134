//! Applying a batch of records to one generation of a read model: decode,
//! dead-letter what cannot be applied, fold events into course states,
//! write them revision-guarded, store the offsets.

use std::collections::HashSet;

use super::states::{Checkout, Guessed, StateCache};
use super::*;

/// How many times a batch retries revision conflicts before backing off.
const MAX_CONFLICT_ROUNDS: usize = 16;

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
                dead.push(DeadLetter::oversized(projection, record, &e.to_string()).of_generation(self.generation));
                continue;
            }
            match decode(record) {
                Ok(event) => events.push(event),
                Err(e) => {
                    warn!(projection, position = %record.position(), error = %e, "Dead-lettering undecodable record.");
                    dead.push(DeadLetter::new(projection, record, &e.to_string()).of_generation(self.generation));
                }
            }
        }
        let written = self.apply_events(&events).await?;
        if !dead.is_empty() {
            self.store.put_dead_letters(&dead).await?;
            telemetry::dead_letters(projection, dead.len() as u64);
        }
        let offsets = next_offsets(records, advanced);
        let AlreadyNewer(behind) = self.store.store_offsets(projection, self.generation, &offsets).await?;
        if behind > 0 {
            // The partition's next owner stored a later offset: ours stays unwritten.
            debug!(projection, partitions = behind, "Offsets already stored further on.");
        }
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

    /// Applies events to their courses' documents; returns documents written.
    pub async fn apply_events(&self, events: &[CourseEvent]) -> Result<usize, BatchError> {
        if events.is_empty() {
            return Ok(0);
        }
        self.announce_write().await?;
        let mut by_course: HashMap<&str, Vec<&CourseEvent>> = HashMap::new();
        for event in events {
            by_course.entry(event.course_id.as_str()).or_default().push(event);
        }
        let pending: Vec<String> = by_course.keys().map(|id| (*id).to_owned()).collect();
        let (mut written, mut pending) = self.first_round(&by_course, &pending).await?;
        for _ in 1..MAX_CONFLICT_ROUNDS {
            if pending.is_empty() {
                break;
            }
            // Later rounds load every course not in memory.
            let round = self.round(&by_course, &pending, Missing::Load).await?;
            written += round.written;
            pending = round.conflicts.0;
        }
        if pending.is_empty() {
            Ok(written)
        } else {
            // Contention this persistent is transient by nature: retry the batch.
            Err(BatchError::Store(StoreError::Contended(pending.len())))
        }
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
    async fn first_round(
        &self,
        by_course: &HashMap<&str, Vec<&CourseEvent>>,
        pending: &[String],
    ) -> Result<(usize, Vec<String>), BatchError> {
        let presume = self.states.presumes_absent();
        let missing = if presume { Missing::PresumeAbsent } else { Missing::Load };
        let round = self.round(by_course, pending, missing).await?;
        self.states.learn(round.guessed, round.written);
        Ok((round.written, round.conflicts.0))
    }

    /// Folds each pending course's events into its state and writes the
    /// changed ones, revision-guarded.
    async fn round(
        &self,
        by_course: &HashMap<&str, Vec<&CourseEvent>>,
        pending: &[String],
        missing: Missing,
    ) -> Result<Round, BatchError> {
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
            let (mut state, rev) = match known.remove(id) {
                Some(s) => (s.state, s.rev),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::rec;

    #[test]
    fn next_offsets_are_one_past_the_highest_offset_per_partition() {
        let records = [rec("a", 0, 5), rec("a", 0, 3), rec("a", 1, 9), rec("b", 0, 0)];
        assert_eq!(
            next_offsets(&records, &[]),
            vec![("a".into(), 0, 6), ("a".into(), 1, 10), ("b".into(), 0, 1)]
        );
    }

    #[test]
    fn advanced_positions_raise_the_stored_offsets_only_upwards() {
        let merged = next_offsets(
            &[rec("a", 0, 5), rec("b", 0, 1)],
            &[("a".into(), 0, 4), ("b".into(), 0, 3), ("c".into(), 1, 7)],
        );
        assert_eq!(merged, vec![("a".into(), 0, 6), ("b".into(), 0, 3), ("c".into(), 1, 7)]);
    }
}
