//! Folding while behind: the events of many batches merged into one state
//! per course in memory, written once per flush, then the offsets the
//! flush covers. A worker catching up writes each touched course once per
//! flush instead of once per batch.
//!
//! Why it keeps the exactly-once effect: a fold stores no offset until the
//! flush has written every state, and every dead letter, of the records it
//! covers; a crash before that replays them from the offsets stored
//! before, and folding them again gives the same states (the state is
//! convergent: `CourseState::merge`).

use opentelemetry::trace::SpanContext;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::states::state_bytes;
use super::*;
use crate::telemetry::traces;

/// Events decoded and folded, not yet written.
#[derive(Debug)]
pub struct Fold {
    /// Per course, the state its folded events give from empty. Boxed: the
    /// table then holds a pointer per bucket, not a whole state, so its
    /// spare capacity (up to half of it after it doubles) and the moment
    /// it doubles (old and new tables both live) cost little.
    pub(super) courses: HashMap<String, Box<CourseState>>,
    pub(super) dead: Vec<DeadLetter>,
    /// Next offset per partition once the fold is written.
    next: HashMap<(String, i32), i64>,
    /// Events folded per type (for the applied counter, at the flush).
    pub(super) kinds: HashMap<&'static str, u64>,
    pub(super) records: usize,
    pub(super) events: usize,
    /// The trace contexts its records carried, when traces are exported
    /// (up to the SDK's limit of links per span).
    links: Vec<SpanContext>,
    /// Estimate of the heap it holds.
    bytes: usize,
    started: Instant,
}

impl Default for Fold {
    fn default() -> Self {
        Fold {
            courses: HashMap::new(),
            dead: Vec::new(),
            next: HashMap::new(),
            kinds: HashMap::new(),
            records: 0,
            events: 0,
            links: Vec::new(),
            bytes: 0,
            started: Instant::now(),
        }
    }
}

impl Fold {
    /// Folds decoded events in (their records' offsets are added apart).
    pub(super) fn add_events<'a>(&mut self, events: impl IntoIterator<Item = &'a CourseEvent>) {
        for event in events {
            self.events += 1;
            *self.kinds.entry(event.kind.type_name()).or_default() += 1;
            let state = match self.courses.get_mut(event.course_id.as_str()) {
                Some(state) => {
                    self.bytes -= state_bytes(state);
                    state
                }
                None => self
                    .courses
                    .entry(event.course_id.clone())
                    .or_insert_with(|| Box::new(CourseState::new(event.course_id.as_str()))),
            };
            state.apply(event);
            self.bytes += state_bytes(state) + event.course_id.len() + 32;
        }
    }

    pub(super) fn add_dead_letter(&mut self, letter: DeadLetter) {
        self.bytes += letter.key.as_ref().map_or(0, Vec::len) + letter.value.as_ref().map_or(0, Vec::len) + 256;
        self.dead.push(letter);
    }

    /// Covers records and position advances: the flush stores one past the
    /// highest offset of each partition (never lower than an advance).
    pub(super) fn cover(&mut self, records: &[Record], advanced: &[(String, i32, i64)]) {
        self.records += records.len();
        if traces::exporting() {
            let room = traces::MAX_LINKS.saturating_sub(self.links.len());
            self.links
                .extend(records.iter().filter_map(traces::record_context).take(room));
        }
        let positions = records
            .iter()
            .map(|r| (r.topic.as_str(), r.partition, r.offset + 1))
            .chain(advanced.iter().map(|(t, p, o)| (t.as_str(), *p, *o)));
        for (topic, partition, offset) in positions {
            match self.next.get_mut(&(topic.to_owned(), partition)) {
                Some(slot) => *slot = (*slot).max(offset),
                None => {
                    self.next.insert((topic.to_owned(), partition), offset);
                }
            }
        }
    }

    /// The next offset per partition, sorted.
    pub(super) fn offsets(&self) -> Vec<(String, i32, i64)> {
        let mut out: Vec<_> = self.next.iter().map(|((t, p), o)| (t.clone(), *p, *o)).collect();
        out.sort();
        out
    }

    /// Whether it holds nothing to write and no position to store.
    pub fn is_empty(&self) -> bool {
        self.courses.is_empty() && self.dead.is_empty() && self.next.is_empty()
    }

    /// Estimate of the heap it holds: the states, their ids and dead
    /// letters, and the table of courses (a bucket per slot of capacity).
    pub fn bytes(&self) -> usize {
        const SLOT: usize = std::mem::size_of::<(String, Box<CourseState>)>() + 1;
        self.bytes + self.courses.capacity() * SLOT
    }

    /// Since the first batch folded in.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn records(&self) -> usize {
        self.records
    }

    /// The CONSUMER span of its flush, `process <topic>` (`process` across
    /// topics), the root of a trace, linked to each record's context, with the messaging
    /// conventions' attributes; its writes are its children. No span when
    /// traces are not exported, so logs keep the worker's context.
    pub(super) fn process_span(&self, projection: &'static str, group: &str) -> tracing::Span {
        if !traces::exporting() {
            return tracing::Span::none();
        }
        let mut topics = self.next.keys().map(|(t, _)| t.as_str());
        let topic = topics.next().filter(|first| topics.all(|t| t == *first));
        let mut partitions = self.next.keys().map(|(_, p)| *p);
        let partition = partitions.next().filter(|first| partitions.all(|p| p == *first));
        let name = topic.map_or_else(|| "process".to_owned(), |t| format!("process {t}"));
        let span = tracing::info_span!(
            "process",
            otel.name = name,
            otel.kind = "consumer",
            messaging.system = "kafka",
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.consumer.group.name = group,
            messaging.destination.name = tracing::field::Empty,
            messaging.destination.partition.id = tracing::field::Empty,
            // i64: the exporter writes unsigned integers as strings.
            messaging.batch.message_count = i64::try_from(self.records).unwrap_or(i64::MAX),
            courseview.projection = projection,
        );
        if let Some(topic) = topic {
            span.record("messaging.destination.name", topic);
            if let Some(partition) = partition {
                span.record("messaging.destination.partition.id", partition.to_string());
            }
        }
        // A root of its own trace (linked, not parented, to the records'
        // contexts), while logs keep the worker's span around it.
        let _ = span.set_parent(opentelemetry::Context::new());
        for link in &self.links {
            span.add_link(link.clone());
        }
        span
    }
}

/// When a fold is written: at once when the worker is caught up, else at
/// the interval or the memory bound, whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoldLimits {
    /// Longest a fold waits before it is written.
    pub interval: Duration,
    /// Most bytes (estimated) a fold holds before it is written.
    pub bytes: usize,
}

impl Default for FoldLimits {
    fn default() -> Self {
        FoldLimits {
            interval: Duration::from_secs(2),
            bytes: 8 * 1024 * 1024,
        }
    }
}

/// Why a fold is written now, or that it is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// No more than a batch waits in the log: the worker is caught up.
    CaughtUp,
    Interval,
    Bytes,
    /// Shutdown or a generation change: write what is in hand.
    Stopping,
    /// Behind, within the limits: fold the next batch in too.
    Not,
}

impl FoldLimits {
    pub fn judge(&self, fold: &Fold, behind: bool, stopping: bool) -> Flush {
        if stopping {
            Flush::Stopping
        } else if !behind {
            Flush::CaughtUp
        } else if fold.bytes() >= self.bytes {
            Flush::Bytes
        } else if fold.age() >= self.interval {
            Flush::Interval
        } else {
            Flush::Not
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::rec;

    #[test]
    fn a_fold_covers_one_past_the_highest_offset_per_partition_and_never_below_an_advance() {
        let mut fold = Fold::default();
        fold.cover(&[rec("a", 0, 5), rec("a", 0, 3), rec("a", 1, 9)], &[]);
        fold.cover(
            &[rec("b", 0, 1)],
            &[("a".into(), 0, 4), ("b".into(), 0, 3), ("c".into(), 1, 7)],
        );
        assert_eq!(
            fold.offsets(),
            vec![
                ("a".into(), 0, 6),
                ("a".into(), 1, 10),
                ("b".into(), 0, 3),
                ("c".into(), 1, 7)
            ]
        );
        assert_eq!(fold.records(), 4);
    }

    #[test]
    fn a_caught_up_worker_writes_at_once_and_one_behind_folds_until_a_limit() {
        let limits = FoldLimits {
            interval: Duration::from_secs(60),
            bytes: 1_000,
        };
        let mut fold = Fold::default();
        assert_eq!(limits.judge(&fold, false, false), Flush::CaughtUp);
        assert_eq!(limits.judge(&fold, true, false), Flush::Not);
        assert_eq!(limits.judge(&fold, true, true), Flush::Stopping);
        fold.add_events(&one_event_each(20, || {
            courseview_projections::EventKind::Created(courseview_projections::Created {
                name: "a course".into(),
                thumbnail: None,
                description: None,
                teacher_id: "t".into(),
                registered_at: 0,
            })
        }));
        assert_eq!(fold.courses.len(), 20);
        assert_eq!(limits.judge(&fold, true, false), Flush::Bytes, "{} bytes", fold.bytes());
        let quick = FoldLimits {
            interval: Duration::ZERO,
            bytes: usize::MAX,
        };
        assert_eq!(quick.judge(&fold, true, false), Flush::Interval);
    }

    /// One event of `kind` for each of `courses` distinct courses.
    fn one_event_each(courses: usize, kind: impl Fn() -> courseview_projections::EventKind) -> Vec<CourseEvent> {
        (0..courses)
            .map(|i| CourseEvent {
                event_id: format!("e{i}"),
                course_id: format!("c{i}"),
                version: Some(1),
                occurred_at: 0,
                kind: kind(),
            })
            .collect()
    }

    #[test]
    fn the_memory_bound_counts_the_table_the_states_live_in() {
        let mut fold = Fold::default();
        fold.add_events(&one_event_each(5000, || courseview_projections::EventKind::Posted));
        // What the heap holds for the table alone: a slot per bucket (the
        // key and whatever the map keeps for each state) and a control byte.
        let (id, state) = fold.courses.iter().next().expect("a course");
        let slot = std::mem::size_of_val(id) + std::mem::size_of_val(state);
        let table = fold.courses.capacity() * (slot + 1);
        let heap_of_states: usize = fold.courses.values().map(|s| state_bytes(s)).sum();
        assert!(
            fold.bytes() >= table + heap_of_states,
            "estimate {} < table {table} + states {heap_of_states}",
            fold.bytes()
        );
    }
}
