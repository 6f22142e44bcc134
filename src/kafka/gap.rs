//! Gaps: where a partition's stored offset and its log disagree, and
//! what the consumer asks of the offset store about them.

use super::*;

/// Where a projection's stored offsets come from at assignment time, and
/// where a gap between them and the log is recorded.
pub trait OffsetSource: Send + Sync + 'static {
    /// Next offset to read for every (topic, partition) the projection has stored.
    fn stored_offsets(&self) -> Result<HashMap<(String, i32), i64>, OffsetsUnavailable>;

    /// Records `gap` (once, however often it is found) and, when the worker
    /// goes on after a log reset, moves the checkpoint back to the log's
    /// start: the one way a checkpoint ever goes back.
    fn record_gap(&self, gap: &Gap, policy: OnGap) -> Result<(), OffsetsUnavailable>;

    /// The topic id each (topic, partition) was last read under. A source
    /// that keeps none (the default) leaves a re-created topic to be found
    /// by its watermarks alone.
    fn stored_topic_ids(&self) -> Result<HashMap<(String, i32), String>, OffsetsUnavailable> {
        Ok(HashMap::new())
    }

    /// Records the id of the topic a partition is read from now, if the
    /// id stored is still `previous` (a stale owner of the partition must
    /// not put back an old id after the new owner recorded the new one).
    fn record_topic_id(
        &self,
        _topic: &str,
        _partition: i32,
        _previous: Option<&str>,
        _id: &str,
    ) -> Result<(), OffsetsUnavailable> {
        Ok(())
    }
}

/// How a stored offset disagrees with the log it points into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum GapKind {
    /// Below the log start: retention or DeleteRecords removed events the
    /// projection never read, offsets `[stored, low)`.
    RetentionGap,
    /// Beyond the log end: the topic was deleted and re-created (or its
    /// log lost), so the stored offset belongs to a log that is gone.
    LogReset,
    /// Moved past by an operator (`courseview offsets`), offsets
    /// `[stored, high)`: never applied; a rebuild applies them.
    Skipped,
}

impl GapKind {
    pub fn name(self) -> &'static str {
        match self {
            GapKind::RetentionGap => "retention_gap",
            GapKind::LogReset => "log_reset",
            GapKind::Skipped => "skipped",
        }
    }
}

/// A stored offset the log does not hold, as found at assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub kind: GapKind,
    pub topic: String,
    pub partition: i32,
    /// The projection's stored (next) offset.
    pub stored: i64,
    /// The partition's watermarks when it was found.
    pub low: i64,
    pub high: i64,
    /// Set when the log was told apart by its topic id (old, new), not by
    /// its length: a re-created topic refilled past the stored offset.
    pub recreated: Option<(String, String)>,
}

impl Gap {
    /// The gap of a stored offset against the watermarks, if any.
    pub fn find(topic: &str, partition: i32, stored: i64, low: i64, high: i64) -> Option<Gap> {
        let kind = if stored < low {
            GapKind::RetentionGap
        } else if stored > high {
            GapKind::LogReset
        } else {
            return None;
        };
        Some(Gap {
            kind,
            topic: topic.to_owned(),
            partition,
            stored,
            low,
            high,
            recreated: None,
        })
    }

    /// The gap of a stored offset read from a topic whose id has changed
    /// since (`old`, now `new`): the offset belongs to a log that is gone,
    /// whatever the new one's length.
    pub fn recreated(topic: &str, partition: i32, stored: i64, (low, high): (i64, i64), old: &str, new: &str) -> Gap {
        Gap {
            kind: GapKind::LogReset,
            topic: topic.to_owned(),
            partition,
            stored,
            low,
            high,
            recreated: Some((old.to_owned(), new.to_owned())),
        }
    }

    /// Offsets `[from, to)` an operator moved a projection past.
    pub fn skipped(topic: &str, partition: i32, from: i64, to: i64) -> Gap {
        Gap {
            kind: GapKind::Skipped,
            topic: topic.to_owned(),
            partition,
            stored: from,
            low: from,
            high: to,
            recreated: None,
        }
    }

    /// What happened, for logs, dead letters and status.
    pub fn describe(&self) -> String {
        match self.kind {
            GapKind::RetentionGap => format!(
                "retention gap on {}/{}: offsets {}..{} ({} events) were removed from the log before this projection read them (log now {}..{})",
                self.topic,
                self.partition,
                self.stored,
                self.low,
                self.low - self.stored,
                self.low,
                self.high
            ),
            GapKind::LogReset if self.recreated.is_some() => {
                let (old, new) = self.recreated.as_ref().map_or(("", ""), |(o, n)| (o.as_str(), n.as_str()));
                format!(
                    "log reset on {}/{}: the topic was deleted and re-created (topic id {old}, now {new}); the stored offset {} belongs to the old log, and what it held after {} is unknown (the new log holds {}..{})",
                    self.topic, self.partition, self.stored, self.stored, self.low, self.high
                )
            }
            GapKind::LogReset => format!(
                "log reset on {}/{}: the stored offset {} lies beyond the log's end {} (the topic was deleted and re-created?); what the old log held after {} is unknown",
                self.topic, self.partition, self.stored, self.high, self.stored
            ),
            GapKind::Skipped => format!(
                "skipped by an operator on {}/{}: offsets {}..{} ({} events) were moved past with `courseview offsets` and not applied; a rebuild applies them",
                self.topic,
                self.partition,
                self.low,
                self.high,
                self.high - self.low
            ),
        }
    }

    /// Where the partition is read from when the worker goes on.
    pub fn resume_at(&self) -> i64 {
        self.low
    }
}

/// What a worker does with a partition whose stored offset is a gap
/// (`COURSEVIEW_ON_GAP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OnGap {
    /// Stop consuming that partition (the rest goes on, the API keeps
    /// serving), until an operator rebuilds or chooses `continue`.
    #[default]
    Stop,
    /// Go on from the log's start; the gap stays reported until a rebuild.
    Continue,
    /// Go on from the log's start without recording: a rebuild whose
    /// operator accepted a partial history (`--allow-partial-history`).
    #[value(skip)]
    Accepted,
}

/// Stored offsets could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetsUnavailable {
    pub reason: String,
    /// Whether asking again soon may succeed (MongoDB blinked), or not (the
    /// call came from a thread that cannot wait for it).
    pub retry: bool,
}
