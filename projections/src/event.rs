//! The course domain events as the projections see them, already decoded.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (UTC). Kept as an integer so that this
/// crate needs no date library and comparisons are exact.
pub type Millis = i64;

/// One course event, decoded from whatever envelope carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CourseEvent {
    /// Unique per event; the last tie-break of the order.
    pub event_id: String,
    pub course_id: String,
    /// Increasing per course; the primary order when present.
    pub version: Option<i64>,
    /// When the event happened; orders events that carry no version. The
    /// decoder falls back to the record's log-append time, which stands in
    /// for arrival order.
    pub occurred_at: Millis,
    pub kind: EventKind,
}

/// What happened to the course.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    Created(Created),
    Updated(Changes),
    Posted,
    Unposted,
    Deleted,
}

/// Every event type's wire name (and per-type topic name), in the order of
/// a course's life.
pub const EVENT_TYPES: [&str; 5] = [
    "CourseCreatedEvent",
    "CourseUpdatedEvent",
    "CoursePostedEvent",
    "CourseUnpostedEvent",
    "CourseDeletedEvent",
];

impl EventKind {
    /// The event type's wire name, one of [`EVENT_TYPES`], also used as a
    /// bounded metrics label.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::Created(_) => "CourseCreatedEvent",
            EventKind::Updated(_) => "CourseUpdatedEvent",
            EventKind::Posted => "CoursePostedEvent",
            EventKind::Unposted => "CourseUnpostedEvent",
            EventKind::Deleted => "CourseDeletedEvent",
        }
    }
}

/// Payload of `CourseCreatedEvent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub name: String,
    pub thumbnail: Option<String>,
    pub description: Option<String>,
    pub teacher_id: String,
    pub registered_at: Millis,
}

/// Payload of `CourseUpdatedEvent`: only the present fields change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub name: Option<String>,
    pub thumbnail: Option<String>,
    pub description: Option<String>,
}

/// The total order of a course's events: version, then time, then event id.
/// An event without a version sorts before every versioned one (version -1),
/// so a producer that adds versions later cannot be overruled by old events.
/// The event id makes the order total, which is what makes last-writer-wins
/// independent of delivery order even when two events tie on time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    #[serde(rename = "v")]
    pub version: i64,
    #[serde(rename = "t")]
    pub at: Millis,
    /// Shared: one event stamps several registers of a state.
    #[serde(rename = "e")]
    pub event_id: Arc<str>,
}

impl CourseEvent {
    pub fn stamp(&self) -> Stamp {
        Stamp {
            version: self.version.unwrap_or(-1),
            at: self.occurred_at,
            event_id: Arc::from(self.event_id.as_str()),
        }
    }
}
