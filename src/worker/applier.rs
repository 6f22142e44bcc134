//! Applying a batch of records to one generation of a read model: decode,
//! dead-letter what cannot be applied, fold events into course states,
//! write them revision-guarded, store the offsets.

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
            Err(BatchError::Store(StoreError::Contended(pending.len())))
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
}
