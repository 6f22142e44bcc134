//! The convergent state of one course, shared by every read model.
//!
//! Each field is a last-writer-wins register stamped with the event that set
//! it; counters are maxima; deletion is a tombstone. All three merge
//! operations are commutative, associative and idempotent, so applying a
//! course's events in any order, with any duplicates, yields the same state
//! as applying its history once in order. That is what lets the worker
//! replay batches after a crash and lets topics deliver out of order.

use serde::{Deserialize, Serialize};

use crate::event::{CourseEvent, EventKind, Millis, Stamp};

/// A last-writer-wins register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lww<T> {
    #[serde(rename = "val")]
    pub value: T,
    #[serde(rename = "at")]
    pub stamp: Stamp,
}

impl<T> Lww<T> {
    /// Sets `slot` to `value()` unless it already holds a write at least as
    /// new; `value` is only built when it is written.
    fn write(slot: &mut Option<Lww<T>>, value: impl FnOnce() -> T, stamp: &Stamp) {
        let newer = slot.as_ref().is_none_or(|cur| *stamp > cur.stamp);
        if newer {
            *slot = Some(Lww {
                value: value(),
                stamp: stamp.clone(),
            });
        }
    }
}

impl<T: Clone> Lww<T> {
    /// Takes `other`'s write if it is newer than `slot`'s; returns whether it did.
    fn merge(slot: &mut Option<Lww<T>>, other: &Option<Lww<T>>) -> bool {
        match other {
            Some(theirs) if slot.as_ref().is_none_or(|mine| theirs.stamp > mine.stamp) => {
                *slot = Some(theirs.clone());
                true
            }
            _ => false,
        }
    }
}

/// Whether the course is posted, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posting {
    pub posted: bool,
    /// The time of the event that set `posted`.
    pub since: Millis,
}

/// Everything the projections know about one course.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CourseState {
    pub course_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Lww<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail: Option<Lww<Option<String>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<Lww<Option<String>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_id: Option<Lww<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_at: Option<Lww<Millis>>,
    /// A `Created` has been applied (possibly after later events).
    #[serde(default)]
    pub created: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub posting: Option<Lww<Posting>>,
    /// Latest content change (`Created` or `Updated`) time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_at: Option<Millis>,
    /// Highest version applied, tombstoned or not; read-your-writes waits on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// Set once the course is deleted; from then on the state holds nothing
    /// else, so no event, older or newer, can bring the course back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<Stamp>,
}

impl CourseState {
    /// The empty state of a course no event has touched yet.
    pub fn new(course_id: impl Into<String>) -> Self {
        CourseState {
            course_id: course_id.into(),
            ..CourseState::default()
        }
    }

    /// Folds one event into the state. Events of another course are ignored:
    /// the caller groups by course, and a mismatch must not corrupt a document.
    pub fn apply(&mut self, event: &CourseEvent) {
        if event.course_id != self.course_id {
            return;
        }
        self.version = self.version.max(event.version);
        let stamp = event.stamp();
        if let Some(deleted) = &mut self.deleted {
            if let EventKind::Deleted = event.kind {
                if stamp > *deleted {
                    *deleted = stamp;
                }
            }
            return;
        }
        match &event.kind {
            EventKind::Created(c) => {
                self.created = true;
                Lww::write(&mut self.name, || c.name.clone(), &stamp);
                Lww::write(&mut self.thumbnail, || c.thumbnail.clone(), &stamp);
                Lww::write(&mut self.description, || c.description.clone(), &stamp);
                Lww::write(&mut self.teacher_id, || c.teacher_id.clone(), &stamp);
                Lww::write(&mut self.registered_at, || c.registered_at, &stamp);
                self.touch(event.occurred_at);
            }
            EventKind::Updated(ch) => {
                if let Some(name) = &ch.name {
                    Lww::write(&mut self.name, || name.clone(), &stamp);
                }
                if let Some(thumbnail) = &ch.thumbnail {
                    Lww::write(&mut self.thumbnail, || Some(thumbnail.clone()), &stamp);
                }
                if let Some(description) = &ch.description {
                    Lww::write(&mut self.description, || Some(description.clone()), &stamp);
                }
                self.touch(event.occurred_at);
            }
            EventKind::Posted | EventKind::Unposted => {
                let posting = Posting {
                    posted: matches!(event.kind, EventKind::Posted),
                    since: event.occurred_at,
                };
                Lww::write(&mut self.posting, || posting, &stamp);
            }
            EventKind::Deleted => {
                *self = CourseState {
                    course_id: std::mem::take(&mut self.course_id),
                    version: self.version,
                    deleted: Some(stamp),
                    ..CourseState::default()
                };
            }
        }
    }

    /// Merges another state of the same course into this one, with the
    /// effect of applying here every event `other` has applied: each
    /// register keeps the newer write, counters the maximum, and the
    /// tombstone wins. So a worker can fold events into a fresh state in
    /// memory and merge it into the stored one later. Returns whether this
    /// state changed (a state of another course changes nothing).
    pub fn merge(&mut self, other: &CourseState) -> bool {
        if other.course_id != self.course_id {
            return false;
        }
        let version = self.version.max(other.version);
        let mut changed = version != self.version;
        self.version = version;
        match (&mut self.deleted, &other.deleted) {
            (Some(mine), Some(theirs)) => {
                if theirs > mine {
                    *mine = theirs.clone();
                    changed = true;
                }
                return changed;
            }
            (Some(_), None) => return changed,
            (None, Some(theirs)) => {
                *self = CourseState {
                    course_id: std::mem::take(&mut self.course_id),
                    version: self.version,
                    deleted: Some(theirs.clone()),
                    ..CourseState::default()
                };
                return true;
            }
            (None, None) => {}
        }
        changed |= Lww::merge(&mut self.name, &other.name);
        changed |= Lww::merge(&mut self.thumbnail, &other.thumbnail);
        changed |= Lww::merge(&mut self.description, &other.description);
        changed |= Lww::merge(&mut self.teacher_id, &other.teacher_id);
        changed |= Lww::merge(&mut self.registered_at, &other.registered_at);
        changed |= Lww::merge(&mut self.posting, &other.posting);
        if other.created && !self.created {
            self.created = true;
            changed = true;
        }
        let last_updated_at = self.last_updated_at.max(other.last_updated_at);
        changed |= last_updated_at != self.last_updated_at;
        self.last_updated_at = last_updated_at;
        changed
    }

    fn touch(&mut self, at: Millis) {
        self.last_updated_at = self.last_updated_at.max(Some(at));
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.is_some()
    }

    pub fn is_posted(&self) -> bool {
        self.posting.as_ref().is_some_and(|p| p.value.posted)
    }

    /// Time the course was last posted, if it is posted now.
    pub fn posted_at(&self) -> Option<Millis> {
        self.posting.as_ref().filter(|p| p.value.posted).map(|p| p.value.since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Changes, Created};
    use crate::{Catalog, Projection, TeacherCourses};

    fn ev(version: i64, kind: EventKind) -> CourseEvent {
        CourseEvent {
            event_id: format!("e{version}"),
            course_id: "c".into(),
            version: Some(version),
            occurred_at: version * 1000,
            kind,
        }
    }

    fn created(name: &str) -> EventKind {
        EventKind::Created(Created {
            name: name.into(),
            thumbnail: None,
            description: Some("d".into()),
            teacher_id: "t".into(),
            registered_at: 5,
        })
    }

    fn renamed(name: &str) -> EventKind {
        EventKind::Updated(Changes {
            name: Some(name.into()),
            ..Changes::default()
        })
    }

    fn run(events: &[CourseEvent]) -> CourseState {
        let mut s = CourseState::new("c");
        events.iter().for_each(|e| s.apply(e));
        s
    }

    #[test]
    fn created_arriving_after_updated_keeps_the_newer_name() {
        let s = run(&[ev(2, renamed("new")), ev(1, created("old"))]);
        assert_eq!(s.name.map(|n| n.value).as_deref(), Some("new"));
        assert_eq!(s.description.and_then(|d| d.value).as_deref(), Some("d"));
    }

    #[test]
    fn posted_before_created_is_remembered_and_lists_the_course() {
        let s = run(&[ev(2, EventKind::Posted), ev(1, created("n"))]);
        let course = Catalog::view(&s).expect("listed");
        assert_eq!(course.posted_at, 2000);
        assert_eq!(course.version, Some(2));
    }

    #[test]
    fn an_older_unposted_does_not_hide_a_newer_post() {
        let s = run(&[
            ev(1, created("n")),
            ev(3, EventKind::Posted),
            ev(2, EventKind::Unposted),
        ]);
        assert!(Catalog::view(&s).is_some());
    }

    #[test]
    fn deleted_is_final_even_against_newer_events() {
        let s = run(&[ev(1, created("n")), ev(2, EventKind::Deleted), ev(3, EventKind::Posted)]);
        assert!(s.is_deleted());
        assert!(Catalog::view(&s).is_none());
        assert!(TeacherCourses::view(&s).is_none());
        assert_eq!(s.version, Some(3));
    }

    #[test]
    fn unposted_course_is_a_draft_for_its_teacher_and_absent_from_the_catalog() {
        let s = run(&[
            ev(1, created("n")),
            ev(2, EventKind::Posted),
            ev(3, EventKind::Unposted),
        ]);
        assert!(Catalog::view(&s).is_none());
        let t = TeacherCourses::view(&s).expect("on dashboard");
        assert_eq!(t.status, crate::Status::Draft);
    }

    #[test]
    fn events_of_another_course_are_ignored() {
        let mut other = ev(1, created("n"));
        other.course_id = "x".into();
        assert_eq!(run(&[other]), CourseState::new("c"));
    }
}
