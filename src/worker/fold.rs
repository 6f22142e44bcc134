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

/// Per course, what a fold's events give from empty. Boxed: the table then
/// holds a pointer per bucket, not a whole state, so its spare capacity (up
/// to half of it after it doubles) and the moment it doubles (old and new
/// tables both live) cost little. Hashed with foldhash, seeded per
/// process: a course id is hashed at every event and SipHash showed in the
/// worker's profile; the ids come from the topics' producers, who could do
/// worse than collide.
pub(super) type Folded = HashMap<String, Box<FoldedCourse>, foldhash::fast::RandomState>;

/// Partitions a course's records may span and it still be carried over.
const CARRIED_PARTITIONS: usize = 4;

/// Share of a fold's record-time span, at its young end, whose new courses
/// a flush while behind carries over to the next fold.
const CARRY_SHARE: i64 = 3;

/// A course's bytes beside its state's (which `state_bytes` counts, inline
/// part included): the rest of its box, the box's and the id's allocation
/// headers, and the id's slot.
const COURSE_EXTRA: usize = std::mem::size_of::<FoldedCourse>() - std::mem::size_of::<CourseState>() + 32;

/// One course's folded state, and where its records lie.
#[derive(Debug)]
pub(super) struct FoldedCourse {
    pub(super) state: CourseState,
    /// The earliest record time (ms) among its events in this fold.
    first_at: Option<i64>,
    /// Per partition (index into the fold's `partitions`), the lowest
    /// offset of its records in this fold, in the first `spans` slots: a
    /// fold that carries it over stores no offset past these.
    lowest: [(u32, i64); CARRIED_PARTITIONS],
    spans: usize,
    /// An event came without a record, or a record without a time, or from
    /// more partitions than `lowest` holds: never carried over.
    untracked: bool,
    /// Carried over from the fold before: written at the next flush,
    /// whatever its time, so no course is held back twice.
    carried: bool,
}

impl FoldedCourse {
    fn new(id: &str) -> Self {
        FoldedCourse {
            state: CourseState::new(id),
            first_at: None,
            lowest: [(0, 0); CARRIED_PARTITIONS],
            spans: 0,
            untracked: false,
            carried: false,
        }
    }

    /// Notes one of its records (`None`: an event without a record).
    fn saw(&mut self, at: Option<(u32, i64, Option<i64>)>) {
        if self.untracked {
            return;
        }
        let Some((partition, offset, Some(time))) = at else {
            self.untracked = true;
            return;
        };
        self.first_at = Some(self.first_at.map_or(time, |first| first.min(time)));
        match self.lowest[..self.spans].iter_mut().find(|(p, _)| *p == partition) {
            Some(slot) => slot.1 = slot.1.min(offset),
            None if self.spans < CARRIED_PARTITIONS => {
                self.lowest[self.spans] = (partition, offset);
                self.spans += 1;
            }
            None => self.untracked = true,
        }
    }

    /// Whether a flush carries it over when `cut` is the fold's young end.
    fn young(&self, cut: i64) -> bool {
        !self.carried && !self.untracked && self.first_at.is_some_and(|t| t >= cut)
    }
}

/// Where an event's record lies: topic, partition, offset, time.
pub(super) type At<'a> = (&'a str, i32, i64, Option<i64>);

/// Events decoded and folded, not yet written.
#[derive(Debug)]
pub struct Fold {
    pub(super) courses: Folded,
    pub(super) dead: Vec<DeadLetter>,
    /// Next offset per partition once the fold is written.
    next: HashMap<(String, i32), i64>,
    /// The partitions its courses' records came from (`FoldedCourse::lowest`
    /// indexes them).
    partitions: Vec<(String, i32)>,
    /// The earliest and latest record times its events came with.
    times: Option<(i64, i64)>,
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
            courses: Folded::default(),
            dead: Vec::new(),
            next: HashMap::new(),
            partitions: Vec::new(),
            times: None,
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
    /// Folds decoded events in that came without records: their courses
    /// are never carried over (their records' offsets are added apart).
    pub(super) fn add_events<'a>(&mut self, events: impl IntoIterator<Item = &'a CourseEvent>) {
        for event in events {
            self.add_event(event, None);
        }
    }

    /// Folds one decoded event in, noting where its record lies.
    pub(super) fn add_event(&mut self, event: &CourseEvent, at: Option<At<'_>>) {
        self.events += 1;
        *self.kinds.entry(event.kind.type_name()).or_default() += 1;
        let at = at.map(|(topic, partition, offset, time)| {
            if let Some(t) = time {
                self.times = Some(self.times.map_or((t, t), |(low, high)| (low.min(t), high.max(t))));
            }
            (self.partition_index(topic, partition), offset, time)
        });
        let course = match self.courses.get_mut(event.course_id.as_str()) {
            Some(course) => {
                self.bytes -= state_bytes(&course.state);
                course
            }
            None => {
                self.bytes += event.course_id.len() + COURSE_EXTRA;
                self.courses
                    .entry(event.course_id.clone())
                    .or_insert_with(|| Box::new(FoldedCourse::new(event.course_id.as_str())))
            }
        };
        course.state.apply(event);
        course.saw(at);
        self.bytes += state_bytes(&course.state);
    }

    /// The index of a partition in `partitions`, added if new. Records come
    /// in runs of one partition, and a worker reads a few dozen at most.
    fn partition_index(&mut self, topic: &str, partition: i32) -> u32 {
        let found = self.partitions.iter().rposition(|(t, p)| *p == partition && t == topic);
        let index = found.unwrap_or_else(|| {
            self.partitions.push((topic.to_owned(), partition));
            self.partitions.len() - 1
        });
        u32::try_from(index).unwrap_or(u32::MAX)
    }

    /// Takes out the courses a flush while behind need not write yet: those
    /// whose first record in this fold lies in the youngest third of its
    /// records' time span (likely to hear more soon: a course created and
    /// posted seconds apart is then written once, not once per fold). The
    /// offsets this fold stores are lowered to the lowest record of each
    /// carried course, partition by partition, so none is stored before the
    /// carried states are written; the fold returned holds them, the
    /// offsets they held back, and is written at the next flush, carrying
    /// nothing of them twice.
    pub(super) fn take_young(&mut self) -> Fold {
        let mut young = Fold {
            partitions: self.partitions.clone(),
            ..Fold::default()
        };
        let Some((first, last)) = self.times else {
            return young;
        };
        let cut = last - (last - first) / CARRY_SHARE;
        if cut <= first {
            return young;
        }
        let ids: Vec<String> = self
            .courses
            .iter()
            .filter(|(_, course)| course.young(cut))
            .map(|(id, _)| id.clone())
            .collect();
        let mut lowest: HashMap<u32, i64> = HashMap::new();
        for id in ids {
            let Some(mut course) = self.courses.remove(&id) else {
                continue;
            };
            for (partition, offset) in &course.lowest[..course.spans] {
                let low = lowest.entry(*partition).or_insert(*offset);
                *low = (*low).min(*offset);
            }
            let bytes = state_bytes(&course.state) + id.len() + COURSE_EXTRA;
            self.bytes = self.bytes.saturating_sub(bytes);
            young.bytes += bytes;
            course.carried = true;
            young.courses.insert(id, course);
        }
        for (partition, low) in lowest {
            let Some(key) = self.partitions.get(partition as usize) else {
                continue;
            };
            if let Some(next) = self.next.get_mut(key) {
                if *next > low {
                    young.next.insert(key.clone(), *next);
                    *next = low;
                }
            }
        }
        young
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
        // Records come in runs of one partition: one lookup per run, at its
        // highest offset, not one (and a key built) per record.
        let mut highest: Option<(&str, i32, i64)> = None;
        for r in records {
            match &mut highest {
                Some((topic, partition, offset)) if *partition == r.partition && *topic == r.topic => {
                    *offset = (*offset).max(r.offset + 1);
                }
                _ => {
                    if let Some((topic, partition, offset)) = highest.take() {
                        self.advance(topic, partition, offset);
                    }
                    highest = Some((r.topic.as_str(), r.partition, r.offset + 1));
                }
            }
        }
        let positions = highest
            .into_iter()
            .chain(advanced.iter().map(|(t, p, o)| (t.as_str(), *p, *o)));
        for (topic, partition, offset) in positions {
            self.advance(topic, partition, offset);
        }
    }

    /// Raises a partition's next offset to `offset` (never lowers it).
    fn advance(&mut self, topic: &str, partition: i32, offset: i64) {
        match self.next.get_mut(&(topic.to_owned(), partition)) {
            Some(slot) => *slot = (*slot).max(offset),
            None => {
                self.next.insert((topic.to_owned(), partition), offset);
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

    /// Starts its age now: a carried fold becomes the one folded into only
    /// once the flush that carried it is written.
    pub(super) fn restart_clock(&mut self) {
        self.started = Instant::now();
    }

    /// Events folded in (a carried fold starts at 0: they were counted
    /// in the fold they came in).
    pub fn events(&self) -> usize {
        self.events
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

impl Flush {
    /// Whether a flush for this reason carries the youngest courses over:
    /// only while behind and going on; caught up or stopping, everything
    /// in hand is written.
    pub fn carries(self) -> bool {
        matches!(self, Flush::Interval | Flush::Bytes)
    }
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
        // A partition's records in runs, one coming back after another's.
        fold.cover(
            &[
                rec("a", 0, 5),
                rec("a", 0, 3),
                rec("a", 1, 9),
                rec("a", 0, 7),
                rec("a", 1, 2),
            ],
            &[],
        );
        fold.cover(
            &[rec("b", 0, 1)],
            &[("a".into(), 0, 4), ("b".into(), 0, 3), ("c".into(), 1, 7)],
        );
        assert_eq!(
            fold.offsets(),
            vec![
                ("a".into(), 0, 8),
                ("a".into(), 1, 10),
                ("b".into(), 0, 3),
                ("c".into(), 1, 7)
            ]
        );
        assert_eq!(fold.records(), 6);
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

    /// An event of `course` from a record at `at`, folded and covered.
    fn fold_at(fold: &mut Fold, course: &str, at: At<'_>) {
        let event = CourseEvent {
            event_id: format!("{course}-{}-{}", at.1, at.2),
            course_id: course.into(),
            version: Some(1),
            occurred_at: 0,
            kind: courseview_projections::EventKind::Posted,
        };
        fold.add_event(&event, Some(at));
        let mut record = rec(at.0, at.1, at.2);
        record.timestamp = at.3;
        fold.cover(&[record], &[]);
    }

    fn ids(fold: &Fold) -> Vec<&str> {
        let mut ids: Vec<&str> = fold.courses.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn a_flush_behind_carries_courses_first_seen_in_the_youngest_third_and_stores_no_offset_past_their_records() {
        let mut fold = Fold::default();
        // Record times 1000..3000: the youngest third starts after 2333.
        fold_at(&mut fold, "a", ("t", 0, 0, Some(1000)));
        fold_at(&mut fold, "a", ("u", 0, 1, Some(1500)));
        fold_at(&mut fold, "b", ("t", 0, 2, Some(2500)));
        fold_at(&mut fold, "b", ("u", 0, 3, Some(2600)));
        fold_at(&mut fold, "c", ("t", 0, 4, Some(2000)));
        fold_at(&mut fold, "c", ("u", 0, 5, Some(3000)));
        let mut young = fold.take_young();
        assert_eq!((ids(&fold), ids(&young)), (vec!["a", "c"], vec!["b"]));
        assert_eq!(
            fold.offsets(),
            vec![("t".into(), 0, 2), ("u".into(), 0, 3)],
            "stored up to b's first record in each partition, not past it"
        );
        assert_eq!(young.offsets(), vec![("t".into(), 0, 5), ("u".into(), 0, 6)]);
        assert_eq!(
            (young.events(), fold.events()),
            (0, 6),
            "events count where they were folded"
        );

        // The next fold: `b` was carried once, so it is written now, and
        // only the newest course is carried.
        fold_at(&mut young, "b", ("t", 0, 6, Some(3100)));
        fold_at(&mut young, "d", ("t", 0, 7, Some(3200)));
        let next = young.take_young();
        assert_eq!((ids(&young), ids(&next)), (vec!["b"], vec!["d"]));
        assert_eq!(young.offsets(), vec![("t".into(), 0, 7), ("u".into(), 0, 6)]);
        assert_eq!(next.offsets(), vec![("t".into(), 0, 8)]);
    }

    #[test]
    fn courses_whose_records_lack_a_time_or_span_too_many_partitions_are_never_carried() {
        let mut fold = Fold::default();
        fold_at(&mut fold, "old", ("t", 0, 0, Some(1000)));
        fold_at(&mut fold, "timeless", ("t", 0, 1, Some(2900)));
        fold_at(&mut fold, "timeless", ("t", 0, 2, None));
        for partition in 0..=CARRIED_PARTITIONS as i32 {
            fold_at(&mut fold, "wide", ("w", partition, 0, Some(2950)));
        }
        fold.add_events(&one_event_each(1, || courseview_projections::EventKind::Posted));
        fold_at(&mut fold, "c0", ("t", 0, 3, Some(3000)));
        let young = fold.take_young();
        assert!(young.courses.is_empty(), "carried {:?}", ids(&young));
        assert_eq!(fold.offsets()[0], ("t".into(), 0, 4));
        assert!(!Flush::CaughtUp.carries() && !Flush::Stopping.carries());
        assert!(Flush::Bytes.carries() && Flush::Interval.carries());
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
        let heap_of_states: usize = fold.courses.values().map(|c| state_bytes(&c.state)).sum();
        assert!(
            fold.bytes() >= table + heap_of_states,
            "estimate {} < table {table} + states {heap_of_states}",
            fold.bytes()
        );
    }
}
