//! Time alignment of a consumer's partitions while it catches up.
//!
//! Each event type has its own topic, so one course's events lie on several
//! partitions, and a consumer with a backlog reads each partition at its own
//! pace: librdkafka fetches about as many bytes from each, so partitions of
//! small records race ahead of those of large ones. A replay then meets a
//! course's posting long before its creation, remembers neither by the time
//! the other arrives, loads the course from MongoDB for each, and writes it
//! once per event. Like Kafka Streams, the reader pauses partitions whose
//! records are ahead in time of the furthest-behind partition that still has
//! records to deliver, so a catch-up reads the topics in about the order the
//! events happened, and a batch holds several events of each course.
//!
//! Only the order of fetching changes. librdkafka resumes a paused partition
//! at the record after the last one delivered, so nothing is skipped or
//! repeated, and each partition is still delivered in offset order. This
//! module decides; the reader in `kafka.rs` pauses and resumes.

use std::time::Duration;

/// A partition, as (topic, partition).
pub type Partition = (String, i32);

/// How far ahead (record timestamps) a partition may run before it is
/// paused. Small against the spread of a course's events in a real log
/// (seconds to days), so a replay meets them close together; large against
/// the skew between partitions of a live stream (milliseconds), which is
/// therefore never paused.
pub const SLACK: Duration = Duration::from_secs(1);

/// A partition that delivered nothing while the reader waited this long on
/// the broker no longer holds the others back: its backlog may be stuck
/// behind an open transaction, or its fetches slow.
pub const IDLE: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Default)]
struct Part {
    /// Timestamp (ms) of the last record delivered; None if it had none.
    last_ts: Option<i64>,
    /// Assigned but nothing delivered yet: its first records may be the
    /// oldest of all, so it holds the others back until it delivers.
    awaited: bool,
    /// The wait clock's reading at the last delivery (or assignment).
    delivered_at: Duration,
    paused: bool,
}

/// Partitions to pause and to resume, decided by [`Aligner::plan`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub pause: Vec<Partition>,
    pub resume: Vec<Partition>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.pause.is_empty() && self.resume.is_empty()
    }
}

/// Decides which partitions to pause, from what each delivered last.
///
/// Time here is a *wait clock*: how long the reader has waited on the
/// broker, not wall time, so a reader blocked on a slow worker does not
/// take every partition for idle.
#[derive(Debug)]
pub struct Aligner {
    slack_ms: i64,
    idle: Duration,
    /// A handful of partitions: a scan finds one without allocating.
    parts: Vec<(Partition, Part)>,
}

impl Aligner {
    pub fn new(slack: Duration, idle: Duration) -> Aligner {
        Aligner {
            slack_ms: i64::try_from(slack.as_millis()).unwrap_or(i64::MAX),
            idle,
            parts: Vec::new(),
        }
    }

    /// Starts over with a new assignment (the rebalance resumed every
    /// partition it touched); returns what was paused, to resume.
    pub fn assigned(&mut self, partitions: Vec<Partition>, clock: Duration) -> Vec<Partition> {
        let paused = self.paused();
        self.parts = partitions
            .into_iter()
            .map(|key| {
                let part = Part {
                    awaited: true,
                    delivered_at: clock,
                    ..Part::default()
                };
                (key, part)
            })
            .collect();
        paused
    }

    /// Notes a delivered record.
    pub fn delivered(&mut self, topic: &str, partition: i32, timestamp: Option<i64>, clock: Duration) {
        let index = match self.parts.iter().position(|((t, p), _)| *p == partition && t == topic) {
            Some(index) => index,
            None => {
                self.parts.push(((topic.to_owned(), partition), Part::default()));
                self.parts.len() - 1
            }
        };
        let part = &mut self.parts[index].1;
        part.last_ts = timestamp.filter(|t| *t >= 0);
        part.awaited = false;
        part.delivered_at = clock;
    }

    /// What to pause and resume now. `lag` gives a partition's records
    /// left to deliver, as the client last saw its end (None if unknown).
    /// One left is none: a transaction's commit marker ends the log and is
    /// never delivered.
    pub fn plan(&mut self, clock: Duration, lag: impl Fn(&str, i32) -> Option<i64>) -> Plan {
        let behind: Vec<bool> = self
            .parts
            .iter()
            .map(|((topic, partition), _)| lag(topic, *partition).is_none_or(|lag| lag > 1))
            .collect();
        // The furthest-behind timestamp among partitions still delivering.
        let frontier = self
            .parts
            .iter()
            .zip(&behind)
            .filter(|((_, p), behind)| **behind && !p.paused && clock.saturating_sub(p.delivered_at) <= self.idle)
            .filter_map(|((_, p), _)| if p.awaited { Some(i64::MIN) } else { p.last_ts })
            .min();
        let mut plan = Plan::default();
        for ((key, part), behind) in self.parts.iter_mut().zip(behind) {
            let Some(ts) = part.last_ts else { continue };
            if part.paused {
                // Resume with half the slack to spare, so a partition is not
                // paused again by the next record of the one it waited for.
                if frontier.is_none_or(|f| ts <= f.saturating_add(self.slack_ms / 2)) {
                    part.paused = false;
                    // Paused, it delivered nothing; that is not idleness.
                    part.delivered_at = clock;
                    plan.resume.push(key.clone());
                }
            } else if behind && frontier.is_some_and(|f| ts > f.saturating_add(self.slack_ms)) {
                part.paused = true;
                plan.pause.push(key.clone());
            }
        }
        plan.pause.sort();
        plan.resume.sort();
        plan
    }

    /// Partitions currently paused.
    pub fn paused(&self) -> Vec<Partition> {
        let mut paused: Vec<Partition> = self
            .parts
            .iter()
            .filter(|(_, p)| p.paused)
            .map(|(k, _)| k.clone())
            .collect();
        paused.sort();
        paused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn p(topic: &str) -> Partition {
        (topic.to_owned(), 0)
    }

    fn aligner() -> Aligner {
        Aligner::new(Duration::from_millis(50), Duration::from_millis(200))
    }

    fn backlog(_: &str, _: i32) -> Option<i64> {
        Some(1_000)
    }

    #[test]
    fn a_partition_ahead_of_one_with_a_backlog_is_paused_and_resumed_when_it_catches_up() {
        let mut a = aligner();
        a.delivered("created", 0, Some(1_000), MS);
        a.delivered("posted", 0, Some(1_200), MS);
        let plan = a.plan(MS, backlog);
        assert_eq!(plan.pause, vec![p("posted")]);
        assert!(plan.resume.is_empty());
        // Within the slack, but not within half of it: still paused.
        a.delivered("created", 0, Some(1_160), 2 * MS);
        assert!(a.plan(2 * MS, backlog).is_empty());
        a.delivered("created", 0, Some(1_180), 3 * MS);
        let plan = a.plan(3 * MS, backlog);
        assert_eq!(plan.resume, vec![p("posted")]);
        assert!(a.paused().is_empty());
    }

    #[test]
    fn partitions_within_the_slack_are_left_alone() {
        let mut a = aligner();
        a.delivered("created", 0, Some(1_000), MS);
        a.delivered("posted", 0, Some(1_050), MS);
        assert!(a.plan(MS, backlog).is_empty());
    }

    #[test]
    fn a_caught_up_partition_holds_no_one_back() {
        let mut a = aligner();
        a.delivered("deleted", 0, Some(1_000), MS);
        a.delivered("posted", 0, Some(5_000), MS);
        // "deleted" delivered its last record; a commit marker follows.
        let lag = |topic: &str, _| Some(if topic == "deleted" { 1 } else { 100 });
        assert!(a.plan(MS, lag).is_empty());
    }

    #[test]
    fn a_partition_that_stops_delivering_releases_the_others_after_the_idle_wait() {
        let mut a = aligner();
        a.delivered("created", 0, Some(1_000), MS);
        a.delivered("posted", 0, Some(5_000), MS);
        assert_eq!(a.plan(MS, backlog).pause, vec![p("posted")]);
        // The reader waits on the broker; "created" sends nothing (an open
        // transaction holds its backlog back).
        assert!(a.plan(150 * MS, backlog).is_empty());
        let plan = a.plan(250 * MS, backlog);
        assert_eq!(plan.resume, vec![p("posted")]);
    }

    #[test]
    fn a_paused_partition_is_never_the_one_held_back_for() {
        let mut a = aligner();
        a.delivered("created", 0, Some(1_000), MS);
        a.delivered("updated", 0, Some(2_000), MS);
        a.delivered("posted", 0, Some(3_000), MS);
        assert_eq!(a.plan(MS, backlog).pause, vec![p("posted"), p("updated")]);
        // "created" catches up with "updated" only: "posted" stays paused,
        // measured against "created" rather than the paused "updated".
        a.delivered("created", 0, Some(1_990), 2 * MS);
        let plan = a.plan(2 * MS, backlog);
        assert_eq!(plan.resume, vec![p("updated")]);
        assert_eq!(a.paused(), vec![p("posted")]);
    }

    #[test]
    fn a_partition_assigned_but_not_yet_delivering_holds_the_others_back_until_it_does() {
        let mut a = aligner();
        assert!(a.assigned(vec![p("created"), p("posted")], MS).is_empty());
        // The small records of "posted" arrive first.
        a.delivered("posted", 0, Some(5_000), MS);
        assert_eq!(a.plan(MS, backlog).pause, vec![p("posted")]);
        a.delivered("created", 0, Some(4_990), 2 * MS);
        assert_eq!(a.plan(2 * MS, backlog).resume, vec![p("posted")]);
        // A new assignment hands back what was paused, to resume.
        a.delivered("created", 0, Some(4_000), 3 * MS);
        a.delivered("posted", 0, Some(5_000), 3 * MS);
        assert_eq!(a.plan(3 * MS, backlog).pause, vec![p("posted")]);
        assert_eq!(a.assigned(vec![p("created")], 4 * MS), vec![p("posted")]);
        assert!(a.paused().is_empty());
    }

    #[test]
    fn an_assigned_partition_with_nothing_to_deliver_holds_no_one_back_after_the_idle_wait() {
        let mut a = aligner();
        a.assigned(vec![p("created"), p("posted")], MS);
        a.delivered("posted", 0, Some(5_000), MS);
        assert_eq!(a.plan(MS, backlog).pause, vec![p("posted")]);
        assert_eq!(a.plan(300 * MS, backlog).resume, vec![p("posted")]);
    }

    #[test]
    fn records_without_timestamps_are_never_paused() {
        let mut a = aligner();
        a.delivered("created", 0, Some(1_000), MS);
        a.delivered("legacy", 0, None, MS);
        assert!(a.plan(MS, backlog).is_empty());
    }

    #[test]
    fn with_no_partition_left_delivering_everything_paused_resumes() {
        let mut a = aligner();
        a.delivered("created", 0, Some(1_000), MS);
        a.delivered("posted", 0, Some(5_000), MS);
        assert_eq!(a.plan(MS, backlog).pause, vec![p("posted")]);
        // "created" reached its end.
        let lag = |topic: &str, _| Some(if topic == "created" { 0 } else { 100 });
        assert_eq!(a.plan(2 * MS, lag).resume, vec![p("posted")]);
    }
}
