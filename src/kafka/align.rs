//! Reading partitions in step by time while behind. librdkafka fetches
//! each partition by bytes, so across a backlog a topic of small records
//! runs far ahead, in the log's time, of one of large records: a course's
//! `CoursePostedEvent` is read minutes of history before its
//! `CourseCreatedEvent`, and a fold can never merge them into one write.
//! Kafka Streams picks the partition with the oldest head for the same
//! reason. Here the reader pauses a partition that is behind and has run
//! more than [`AHEAD`] past the oldest partition still catching up, and
//! resumes it once that one has come within half of it.
//!
//! Only the order in which partitions are read changes, never what is read
//! or which offsets are stored: a projection converges whatever the order
//! across partitions (DESIGN §2). A partition near its end (less than
//! [`BEHIND`] records to read) is never paused and never waited for when
//! every partition is near its end (a caught-up worker reads as before,
//! whatever its records' timestamps) or when its records are recent
//! (within [`RECENT`] of the wall clock). One near its end with old records
//! while another is behind (a topic of few events, such as deletions, in a
//! replay) is held and waited for like one behind: read ahead, its events
//! would reach a fold long before the rest of their courses' and cost each
//! such course a write of its own.
//! One that has delivered nothing
//! for [`IDLE`] (stuck at a bad batch, its leader away) holds no one back.
//! No partition stays paused for more than [`HELD_AT_MOST`] of polling: a
//! record dated in the future, or a topic of old records beside a busy
//! one, slows a partition down but never stops it.

use std::collections::HashMap;
use std::time::Duration;

/// How far, in the records' own time, a partition may run ahead of the
/// oldest one still catching up before it is paused.
pub const AHEAD: Duration = Duration::from_secs(1);

/// Records still to read before a partition counts as behind.
pub const BEHIND: i64 = 1000;

/// How far behind the wall clock a partition's last record may lie and
/// the partition, near its end, still count as caught up.
pub const RECENT: Duration = Duration::from_secs(60);

/// A partition that has delivered nothing for this long of the reader's
/// polling is not waited for. Counted in time spent polling, not waiting
/// for the worker: a reader blocked while the worker writes a fold would
/// otherwise find every partition idle after each write.
pub const IDLE: Duration = Duration::from_secs(1);

/// The longest a partition stays paused, in the reader's polling time;
/// then it is resumed whatever the others' times.
pub const HELD_AT_MOST: Duration = Duration::from_secs(10);

/// What the reader knows of one assigned partition.
#[derive(Debug, Clone, Copy, Default)]
struct Part {
    /// The timestamp of the last record it delivered (ms since the epoch);
    /// none before its first.
    at: Option<i64>,
    /// The reader's polling clock when that record was delivered.
    when: Duration,
    /// Records left to read, as the last judgement measured.
    left: i64,
    /// Paused by this alignment.
    paused: bool,
    /// The reader's polling clock when it was paused.
    since: Duration,
    /// Named by the judgement under way (the others are no longer assigned).
    assigned: bool,
}

impl Part {
    /// Whether it is catching up, so held when ahead and waited for when
    /// behind: many records left, or, while some partition has
    /// (`replaying`), a few left that are old by the wall clock `now`. One
    /// near its end with recent records is live traffic.
    fn catching_up(&self, now: i64, replaying: bool) -> bool {
        let old = |at: i64| at < now.saturating_sub(recent());
        self.left >= BEHIND || (replaying && self.left > 0 && self.at.is_some_and(old))
    }
}

/// The assigned partitions' times, and the reader's polling clock.
#[derive(Debug, Default)]
pub struct Align {
    parts: HashMap<String, HashMap<i32, Part>>,
    clock: Duration,
    /// The wall clock (ms since the epoch) at the last poll; 0 before it.
    now: i64,
    /// Some partition had [`BEHIND`] records or more left at the last
    /// judgement.
    replaying: bool,
    /// Whether any partition was paused or behind at the last judgement:
    /// when none, as for a caught-up worker, a record costs one lookup.
    engaged: bool,
}

/// The pauses and resumes one judgement asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Moves {
    pub pause: Vec<(String, i32)>,
    pub resume: Vec<(String, i32)>,
}

impl Align {
    /// The reader spent `took` in a poll.
    pub fn polled(&mut self, took: Duration) {
        self.clock += took;
        self.now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    }

    /// A record of the partition was handed over: pauses the partition
    /// right after it if it ran ahead of the oldest one still catching up,
    /// and resumes those that record brought near again. Checked at every
    /// record, not only at judgements: between two, a worker folding in
    /// memory reads thousands. No allocation unless something moves.
    pub fn delivered(&mut self, topic: &str, partition: i32, timestamp: Option<i64>) -> Option<Moves> {
        let at = timestamp?;
        let clock = self.clock;
        let part = match self.parts.get_mut(topic) {
            Some(partitions) => partitions.entry(partition).or_default(),
            None => self
                .parts
                .entry(topic.to_owned())
                .or_default()
                .entry(partition)
                .or_default(),
        };
        part.at = Some(at);
        part.when = clock;
        let part = *part;
        if !self.engaged {
            return None;
        }
        let frontier = self.frontier();
        let mut moves = Moves::default();
        if !part.paused
            && part.catching_up(self.now, self.replaying)
            && frontier.is_some_and(|oldest| at > oldest.saturating_add(ahead()))
        {
            if let Some(part) = self.parts.get_mut(topic).and_then(|p| p.get_mut(&partition)) {
                part.paused = true;
                part.since = clock;
            }
            moves.pause.push((topic.to_owned(), partition));
        }
        self.resume_near(frontier, &mut moves);
        (!moves.pause.is_empty() || !moves.resume.is_empty()).then_some(moves)
    }

    /// Forgets everything: the assignment changed, or the reader paused or
    /// resumed every partition itself (an operator's pause). Returns the
    /// partitions it had paused, for the caller to resume where no one
    /// else did.
    pub fn reset(&mut self) -> Vec<(String, i32)> {
        let paused = self
            .parts
            .iter()
            .flat_map(|(topic, partitions)| {
                partitions
                    .iter()
                    .filter(|(_, p)| p.paused)
                    .map(move |(partition, _)| (topic.clone(), *partition))
            })
            .collect();
        self.parts.clear();
        self.engaged = false;
        self.replaying = false;
        paused
    }

    /// librdkafka refused a move: undone here too, so that the next
    /// judgement tries again (a partition marked resumed but still paused
    /// would be neither read nor watched).
    pub fn refused(&mut self, topic: &str, partition: i32, pause: bool) {
        if let Some(part) = self.parts.get_mut(topic).and_then(|p| p.get_mut(&partition)) {
            part.paused = !pause;
            part.since = self.clock;
        }
        self.engaged = true;
    }

    pub fn is_paused(&self, topic: &str, partition: i32) -> bool {
        self.parts
            .get(topic)
            .and_then(|p| p.get(&partition))
            .is_some_and(|p| p.paused)
    }

    /// The time of the oldest partition still catching up and still
    /// delivering.
    fn frontier(&self) -> Option<i64> {
        self.parts
            .values()
            .flat_map(HashMap::values)
            .filter(|p| {
                !p.paused && p.catching_up(self.now, self.replaying) && self.clock.saturating_sub(p.when) < IDLE
            })
            .filter_map(|p| p.at)
            .min()
    }

    /// Takes each assigned partition's records still to read (0 when
    /// unknown), forgets the partitions no longer assigned, and decides
    /// which to pause and which to resume; records them as done. Updated
    /// in place: a judgement allocates only for a newly assigned topic.
    pub fn judge<T: AsRef<str>>(&mut self, backlog: &[(T, i32, i64)]) -> Moves {
        for part in self.parts.values_mut().flat_map(HashMap::values_mut) {
            part.assigned = false;
        }
        for (topic, partition, left) in backlog {
            let topic = topic.as_ref();
            if !self.parts.contains_key(topic) {
                self.parts.insert(topic.to_owned(), HashMap::new());
            }
            if let Some(partitions) = self.parts.get_mut(topic) {
                let part = partitions.entry(*partition).or_default();
                part.left = *left;
                part.assigned = true;
            }
        }
        for partitions in self.parts.values_mut() {
            partitions.retain(|_, part| part.assigned);
        }
        self.parts.retain(|_, partitions| !partitions.is_empty());
        self.replaying = self.parts.values().flat_map(HashMap::values).any(|p| p.left >= BEHIND);
        let frontier = self.frontier();
        let mut moves = Moves::default();
        let (now, replaying) = (self.now, self.replaying);
        for (topic, partitions) in &mut self.parts {
            for (partition, part) in partitions.iter_mut() {
                let Some(at) = part.at else { continue };
                if !part.paused
                    && part.catching_up(now, replaying)
                    && frontier.is_some_and(|oldest| at > oldest.saturating_add(ahead()))
                {
                    part.paused = true;
                    part.since = self.clock;
                    moves.pause.push((topic.clone(), *partition));
                }
            }
        }
        self.resume_near(frontier, &mut moves);
        self.engaged = self
            .parts
            .values()
            .flat_map(HashMap::values)
            .any(|p| p.paused || p.catching_up(self.now, self.replaying));
        moves.pause.sort();
        moves.resume.sort();
        moves
    }
}

impl Align {
    /// Resumes the paused partitions the oldest one came within half the
    /// allowance of, those no longer catching up (never held), and those
    /// paused for [`HELD_AT_MOST`]. A resumed
    /// partition keeps its last time and counts as just heard from: until
    /// its next record arrives, it holds the others back as if it were
    /// still there, and is let go after [`IDLE`] if nothing comes.
    fn resume_near(&mut self, frontier: Option<i64>, moves: &mut Moves) {
        let clock = self.clock;
        let (now, replaying) = (self.now, self.replaying);
        for (topic, partitions) in &mut self.parts {
            for (partition, part) in partitions.iter_mut() {
                if !part.paused {
                    continue;
                }
                let far =
                    matches!((part.at, frontier), (Some(at), Some(oldest)) if at > oldest.saturating_add(ahead() / 2));
                let too_long = clock.saturating_sub(part.since) >= HELD_AT_MOST;
                if !part.catching_up(now, replaying) || !far || too_long {
                    part.paused = false;
                    part.when = clock;
                    moves.resume.push((topic.clone(), *partition));
                }
            }
        }
    }
}

fn ahead() -> i64 {
    i64::try_from(AHEAD.as_millis()).unwrap_or(i64::MAX)
}

fn recent() -> i64 {
    i64::try_from(RECENT.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(topic: &str, partition: i32, left: i64) -> (String, i32, i64) {
        (topic.to_owned(), partition, left)
    }

    fn one(topic: &str, partition: i32) -> Vec<(String, i32)> {
        vec![(topic.to_owned(), partition)]
    }

    fn pauses(moves: Option<Moves>) -> Vec<(String, i32)> {
        moves.map(|m| m.pause).unwrap_or_default()
    }

    fn resumes(moves: Option<Moves>) -> Vec<(String, i32)> {
        moves.map(|m| m.resume).unwrap_or_default()
    }

    #[test]
    fn a_partition_behind_and_ahead_in_time_of_the_oldest_one_catching_up_is_paused_until_it_comes_near() {
        let mut align = Align::default();
        let backlog = [part("created", 0, 50_000), part("posted", 0, 20_000)];
        align.judge(&backlog);
        assert_eq!(align.delivered("created", 0, Some(10_000)), None);
        assert_eq!(align.delivered("posted", 0, Some(10_900)), None, "within the allowance");
        assert_eq!(
            pauses(align.delivered("posted", 0, Some(15_000))),
            one("posted", 0),
            "ran ahead: paused after this record"
        );
        assert!(align.is_paused("posted", 0));
        assert_eq!(align.judge(&backlog), Moves::default(), "paused already");
        // The oldest catches up to within half the allowance: the record
        // that brings it there resumes the other.
        assert_eq!(align.delivered("created", 0, Some(14_000)), None, "still 1 s behind");
        assert_eq!(resumes(align.delivered("created", 0, Some(14_600))), one("posted", 0));
        assert!(!align.is_paused("posted", 0));
    }

    #[test]
    fn a_resumed_partition_holds_the_others_back_before_its_next_record_arrives() {
        let mut align = Align::default();
        align.judge(&[part("created", 0, 50_000), part("posted", 0, 20_000)]);
        align.delivered("created", 0, Some(10_000));
        align.delivered("posted", 0, Some(15_000));
        align.delivered("created", 0, Some(14_600));
        assert!(!align.is_paused("posted", 0));
        // Created runs on while posted refetches: paused at 1 s past it.
        assert_eq!(align.delivered("created", 0, Some(15_900)), None);
        assert_eq!(pauses(align.delivered("created", 0, Some(16_100))), one("created", 0));
    }

    #[test]
    fn a_judgement_pauses_what_ran_ahead_between_judgements() {
        let mut align = Align::default();
        align.delivered("created", 0, Some(10_000));
        align.delivered("posted", 0, Some(15_000));
        let moves = align.judge(&[part("created", 0, 50_000), part("posted", 0, 20_000)]);
        assert_eq!(moves.pause, one("posted", 0));
    }

    #[test]
    fn a_partition_near_its_end_is_never_paused_and_never_waited_for() {
        let mut align = Align::default();
        align.judge(&[part("created", 0, 50_000), part("live", 0, 3)]);
        align.delivered("created", 0, Some(10_000));
        assert_eq!(
            align.delivered("live", 0, Some(99_000)),
            None,
            "few records left: read as they come"
        );
        // The old partition near its end holds no one back either.
        align.judge(&[part("created", 0, 10), part("other", 0, 50_000)]);
        assert_eq!(align.delivered("other", 0, Some(60_000)), None);
    }

    #[test]
    fn a_partition_that_delivers_nothing_while_the_reader_polls_holds_no_one_back() {
        let mut align = Align::default();
        let backlog = [part("stuck", 0, 50_000), part("fast", 0, 50_000)];
        align.judge(&backlog);
        align.delivered("stuck", 0, Some(10_000));
        assert_eq!(pauses(align.delivered("fast", 0, Some(20_000))), one("fast", 0));
        // Time spent waiting for the worker is not polling: still waited for.
        assert_eq!(align.judge(&backlog), Moves::default());
        // A second of polling with nothing from it: the paused one resumes.
        align.polled(IDLE);
        assert_eq!(align.judge(&backlog).resume, one("fast", 0));
        assert_eq!(align.delivered("fast", 0, Some(21_000)), None, "not paused again");
    }

    #[test]
    fn with_every_partition_behind_paused_the_rest_resume() {
        let mut align = Align::default();
        let backlog = [part("a", 0, 5_000), part("b", 0, 5_000)];
        align.judge(&backlog);
        align.delivered("a", 0, Some(0));
        assert_eq!(pauses(align.delivered("b", 0, Some(5_000))), one("b", 0));
        // The only partition left near its end: no one to wait for.
        assert_eq!(align.judge(&[part("a", 0, 0), part("b", 0, 5_000)]).resume, one("b", 0));
    }

    #[test]
    fn a_paused_partition_whose_backlog_is_unknown_or_small_is_resumed() {
        let mut align = Align::default();
        align.judge(&[part("a", 0, 5_000), part("b", 0, 5_000)]);
        align.delivered("a", 0, Some(0));
        assert_eq!(pauses(align.delivered("b", 0, Some(5_000))), one("b", 0));
        assert_eq!(align.judge(&[part("a", 0, 5_000), part("b", 0, 0)]).resume, one("b", 0));
        assert!(!align.is_paused("b", 0));
    }

    #[test]
    fn a_partition_ahead_for_good_is_resumed_after_the_longest_hold() {
        let mut align = Align::default();
        let backlog = [part("busy", 0, 50_000), part("future", 0, 50_000)];
        align.judge(&backlog);
        align.delivered("busy", 0, Some(10_000));
        // A producer's clock a day ahead.
        assert_eq!(pauses(align.delivered("future", 0, Some(86_410_000))), one("future", 0));
        align.polled(HELD_AT_MOST / 2);
        assert_eq!(align.delivered("busy", 0, Some(11_000)), None, "still held");
        align.polled(HELD_AT_MOST / 2);
        assert_eq!(resumes(align.delivered("busy", 0, Some(12_000))), one("future", 0));
    }

    #[test]
    fn a_move_librdkafka_refused_is_tried_again() {
        let mut align = Align::default();
        let backlog = [part("a", 0, 5_000), part("b", 0, 5_000)];
        align.judge(&backlog);
        align.delivered("a", 0, Some(0));
        assert_eq!(pauses(align.delivered("b", 0, Some(5_000))), one("b", 0));
        align.refused("b", 0, true);
        assert!(!align.is_paused("b", 0), "the pause did not happen");
        assert_eq!(align.judge(&backlog).pause, one("b", 0), "asked again");
        align.refused("b", 0, false);
        assert!(align.is_paused("b", 0), "the resume did not happen");
    }

    #[test]
    fn a_partition_near_its_end_with_old_records_is_held_and_waited_for_like_one_behind() {
        let mut align = Align::default();
        align.polled(Duration::ZERO);
        let backlog = [part("created", 0, 50_000), part("deleted", 0, 600)];
        align.judge(&backlog);
        align.delivered("created", 0, Some(10_000));
        assert_eq!(
            pauses(align.delivered("deleted", 0, Some(15_000))),
            one("deleted", 0),
            "600 records left, hours old: held"
        );
        assert_eq!(
            align.judge(&backlog),
            Moves::default(),
            "not resumed for being near its end"
        );
        assert_eq!(resumes(align.delivered("created", 0, Some(14_600))), one("deleted", 0));
        // Now the old one is the oldest: the one behind waits for it.
        assert_eq!(align.delivered("deleted", 0, Some(14_700)), None);
        assert_eq!(pauses(align.delivered("created", 0, Some(16_000))), one("created", 0));
    }

    #[test]
    fn a_caught_up_reader_with_old_records_is_never_held() {
        let mut align = Align::default();
        align.polled(Duration::ZERO);
        // Two live partitions whose timestamps lag the wall clock by
        // minutes (a producer's slow clock), every one near its end.
        let backlog = [part("a", 0, 600), part("b", 0, 600)];
        align.judge(&backlog);
        align.delivered("a", 0, Some(10_000));
        assert_eq!(align.delivered("b", 0, Some(190_000)), None, "nothing is replaying");
        assert_eq!(align.judge(&backlog), Moves::default());
    }

    #[test]
    fn a_partition_near_its_end_with_recent_records_is_never_held() {
        let mut align = Align::default();
        align.polled(Duration::ZERO);
        let now = align.now;
        align.judge(&[part("created", 0, 50_000), part("live", 0, 600)]);
        align.delivered("created", 0, Some(10_000));
        assert_eq!(
            align.delivered("live", 0, Some(now - 1_000)),
            None,
            "live traffic: read as it comes"
        );
        assert_eq!(
            align.judge(&[part("created", 0, 50_000), part("live", 0, 600)]),
            Moves::default()
        );
    }

    #[test]
    fn a_caught_up_reader_is_not_held_between_judgements() {
        let mut align = Align::default();
        align.judge(&[part("a", 0, 10), part("b", 0, 10)]);
        align.delivered("a", 0, Some(0));
        assert_eq!(align.delivered("b", 0, Some(99_000)), None);
        assert_eq!(align.judge(&[part("a", 0, 10), part("b", 0, 10)]), Moves::default());
    }

    #[test]
    fn a_reset_forgets_and_names_what_it_had_paused() {
        let mut align = Align::default();
        align.judge(&[part("a", 0, 5_000), part("b", 0, 5_000)]);
        align.delivered("a", 0, Some(0));
        align.delivered("b", 0, Some(5_000));
        assert_eq!(align.reset(), one("b", 0));
        assert!(!align.is_paused("b", 0));
        assert_eq!(align.reset(), Vec::new());
    }

    #[test]
    fn a_paused_partition_taken_away_is_forgotten() {
        let mut align = Align::default();
        align.judge(&[part("a", 0, 5_000), part("b", 0, 5_000)]);
        align.delivered("a", 0, Some(0));
        assert_eq!(pauses(align.delivered("b", 0, Some(5_000))), one("b", 0));
        align.judge(&[part("a", 0, 5_000)]);
        assert!(!align.is_paused("b", 0));
    }
}
