//! The compact form a [`CourseState`] is stored in.
//!
//! A state stamps each register with the event that wrote it, and one
//! event writes several registers (a `Created` writes five), so the plain
//! form repeats an event's id and time once per register, and the course
//! id the document's `_id` already holds. The packed form keeps each
//! distinct stamp once, in a table the registers point into, and leaves
//! the course id out: about half the bytes of the plain form, which is
//! what the store writes for every course of every flush.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::event::{Millis, Stamp};
use crate::state::{CourseState, Lww, Posting};

/// A [`CourseState`] without its course id, each stamp stored once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedState {
    /// The distinct stamps, `[version, time, event id]`; registers hold an
    /// index into this table.
    #[serde(rename = "s", default, skip_serializing_if = "Vec::is_empty")]
    stamps: Vec<(i64, Millis, Arc<str>)>,
    #[serde(rename = "n", default, skip_serializing_if = "Option::is_none")]
    name: Option<(String, usize)>,
    #[serde(rename = "h", default, skip_serializing_if = "Option::is_none")]
    thumbnail: Option<(Option<String>, usize)>,
    #[serde(rename = "d", default, skip_serializing_if = "Option::is_none")]
    description: Option<(Option<String>, usize)>,
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    teacher_id: Option<(String, usize)>,
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    registered_at: Option<(Millis, usize)>,
    #[serde(rename = "c", default, skip_serializing_if = "std::ops::Not::not")]
    created: bool,
    /// `[posted, since, stamp]`.
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    posting: Option<(bool, Millis, usize)>,
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    last_updated_at: Option<Millis>,
    #[serde(rename = "v", default, skip_serializing_if = "Option::is_none")]
    version: Option<i64>,
    #[serde(rename = "x", default, skip_serializing_if = "Option::is_none")]
    deleted: Option<usize>,
}

/// Builds the stamp table while packing.
#[derive(Default)]
struct Table(Vec<(i64, Millis, Arc<str>)>);

impl Table {
    fn index(&mut self, stamp: &Stamp) -> usize {
        let found = self
            .0
            .iter()
            .position(|(v, t, e)| *v == stamp.version && *t == stamp.at && **e == *stamp.event_id);
        found.unwrap_or_else(|| {
            self.0.push((stamp.version, stamp.at, Arc::clone(&stamp.event_id)));
            self.0.len() - 1
        })
    }

    fn pack<T: Clone>(&mut self, register: Option<&Lww<T>>) -> Option<(T, usize)> {
        register.map(|r| (r.value.clone(), self.index(&r.stamp)))
    }
}

impl PackedState {
    /// The packed form of `state`.
    pub fn pack(state: &CourseState) -> Self {
        let mut table = Table::default();
        let name = table.pack(state.name.as_ref());
        let thumbnail = table.pack(state.thumbnail.as_ref());
        let description = table.pack(state.description.as_ref());
        let teacher_id = table.pack(state.teacher_id.as_ref());
        let registered_at = table.pack(state.registered_at.as_ref());
        let posting = table.pack(state.posting.as_ref()).map(|(p, i)| (p.posted, p.since, i));
        let deleted = state.deleted.as_ref().map(|d| table.index(d));
        PackedState {
            stamps: table.0,
            name,
            thumbnail,
            description,
            teacher_id,
            registered_at,
            created: state.created,
            posting,
            last_updated_at: state.last_updated_at,
            version: state.version,
            deleted,
        }
    }

    /// The state of `course_id` this packs; an error names a register
    /// whose stamp is not in the table (the stored value is damaged).
    pub fn unpack(self, course_id: impl Into<String>) -> Result<CourseState, String> {
        let stamps: Vec<Stamp> = self
            .stamps
            .into_iter()
            .map(|(version, at, event_id)| Stamp { version, at, event_id })
            .collect();
        let stamp = |i: usize, register: &str| stamp_at(&stamps, i, register);
        Ok(CourseState {
            course_id: course_id.into(),
            name: lww(&stamps, self.name, "name")?,
            thumbnail: lww(&stamps, self.thumbnail, "thumbnail")?,
            description: lww(&stamps, self.description, "description")?,
            teacher_id: lww(&stamps, self.teacher_id, "teacher")?,
            registered_at: lww(&stamps, self.registered_at, "registered")?,
            created: self.created,
            posting: lww(
                &stamps,
                self.posting.map(|(posted, since, i)| (Posting { posted, since }, i)),
                "posting",
            )?,
            last_updated_at: self.last_updated_at,
            version: self.version,
            deleted: self.deleted.map(|i| stamp(i, "deleted")).transpose()?,
        })
    }
}

fn stamp_at(stamps: &[Stamp], i: usize, register: &str) -> Result<Stamp, String> {
    stamps
        .get(i)
        .cloned()
        .ok_or_else(|| format!("register {register} names stamp {i} of {}", stamps.len()))
}

fn lww<T>(stamps: &[Stamp], register: Option<(T, usize)>, name: &str) -> Result<Option<Lww<T>>, String> {
    register
        .map(|(value, i)| {
            Ok(Lww {
                value,
                stamp: stamp_at(stamps, i, name)?,
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Changes, CourseEvent, Created, EventKind};

    fn ev(id: &str, version: i64, kind: EventKind) -> CourseEvent {
        CourseEvent {
            event_id: id.into(),
            course_id: "c".into(),
            version: Some(version),
            occurred_at: version * 1000,
            kind,
        }
    }

    fn created() -> EventKind {
        EventKind::Created(Created {
            name: "n".into(),
            thumbnail: None,
            description: Some("d".into()),
            teacher_id: "t".into(),
            registered_at: 5,
        })
    }

    #[test]
    fn a_created_course_packs_one_stamp_for_its_five_registers_and_unpacks_equal() {
        let mut state = CourseState::new("c");
        state.apply(&ev("e1", 1, created()));
        state.apply(&ev(
            "e2",
            2,
            EventKind::Updated(Changes {
                name: Some("m".into()),
                ..Changes::default()
            }),
        ));
        state.apply(&ev("e3", 3, EventKind::Posted));
        let packed = PackedState::pack(&state);
        assert_eq!(packed.stamps.len(), 3, "{packed:?}");
        assert_eq!(packed.clone().unpack("c"), Ok(state.clone()));
        let plain = serde_json_len(&state);
        let small = serde_json_len(&packed);
        assert!(small * 2 < plain + 40, "packed {small} bytes against plain {plain}");
    }

    #[test]
    fn a_deleted_course_keeps_its_tombstone_and_version() {
        let mut state = CourseState::new("c");
        state.apply(&ev("e1", 1, created()));
        state.apply(&ev("e2", 2, EventKind::Deleted));
        assert_eq!(PackedState::pack(&state).unpack("c"), Ok(state));
    }

    #[test]
    fn a_register_naming_a_missing_stamp_is_an_error_not_a_guess() {
        let packed: PackedState = serde_json::from_str(r#"{"s":[[1,1,"e"]],"n":["x",3]}"#).expect("parses");
        let err = packed.unpack("c").expect_err("damaged");
        assert!(err.contains("name"), "{err}");
    }

    fn serde_json_len<T: Serialize>(value: &T) -> usize {
        serde_json::to_string(value).expect("encodes").len()
    }
}
