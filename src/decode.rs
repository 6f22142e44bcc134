//! Decoding Kafka records into course events (DESIGN §1).
//!
//! Two producers are understood as they are: the course service publishing
//! one topic per event type, and the Debezium outbox event router in all its
//! variants (object payload, escaped JSON string payload, JsonConverter's
//! `{"schema","payload"}` wrapper around either, `id`/`eventType` headers,
//! JSON-string keys). Every failure is a [`DecodeError`]: the worker sends the
//! record to the dead-letter store and moves on, so nothing here may panic.

use std::borrow::Cow;
use std::fmt;

use chrono::DateTime;
use courseview_projections::{Changes, CourseEvent, Created, EventKind, Millis};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::record::Record;

/// Why a record is not a course event. Every variant means "skip": retrying
/// cannot fix the bytes, so the record goes to the dead-letter store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("header key {0:?} is not valid UTF-8")]
    HeaderKeyNotUtf8(String),
    #[error("header {0:?} is not valid UTF-8")]
    HeaderNotUtf8(String),
    #[error("record is {size} bytes, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("record has no value")]
    NoValue,
    #[error("value is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("value is not a JSON object (found {0})")]
    NotAnObject(&'static str),
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("no event type in the value, the eventType/type headers or the topic name {0:?}")]
    NoType(String),
    #[error("missing field {0:?}")]
    MissingField(&'static str),
    #[error("field {field:?} is invalid: {reason}")]
    InvalidField { field: &'static str, reason: String },
}

/// How deep string-in-wrapper-in-string nesting may go before we give up.
const MAX_UNWRAP: usize = 4;

/// Decodes one record into a course event.
pub fn decode(record: &Record) -> Result<CourseEvent, DecodeError> {
    if let Some(key) = record.non_utf8_header_key() {
        return Err(DecodeError::HeaderKeyNotUtf8(key));
    }
    let raw = record.value.as_deref().ok_or(DecodeError::NoValue)?;
    let text = std::str::from_utf8(raw).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
    decode_text(text, record, 0)
}

/// Peels JsonConverter wrappers and escaped-JSON strings down to the object,
/// then reads the event from it in one pass: only the fields decoding needs
/// are parsed, borrowed from the input where possible (this is the hot path).
fn decode_text(text: &str, record: &Record, depth: usize) -> Result<CourseEvent, DecodeError> {
    if depth == MAX_UNWRAP {
        return Err(DecodeError::NotAnObject("nesting too deep"));
    }
    let bad_json = |e: serde_json::Error| match depth {
        0 => DecodeError::InvalidJson(e.to_string()),
        _ => DecodeError::InvalidJson(format!("in string payload: {e}")),
    };
    match text.trim_start().as_bytes().first() {
        Some(b'{') => {
            let wire: Wire<'_> = serde_json::from_str(text).map_err(bad_json)?;
            match (wire.schema, wire.payload) {
                (true, Some(payload)) => decode_text(payload.get(), record, depth + 1),
                _ => event_from(&wire, record),
            }
        }
        Some(b'"') => match serde_json::from_str(text).map_err(bad_json)? {
            Flex::Str(inner) => decode_text(&inner, record, depth + 1),
            _ => Err(DecodeError::NotAnObject("a string")),
        },
        first => {
            serde_json::from_str::<IgnoredAny>(text).map_err(bad_json)?;
            Err(DecodeError::NotAnObject(match first {
                Some(b'[') => "an array",
                Some(b't' | b'f') => "a boolean",
                Some(b'n') => "null",
                _ => "a number",
            }))
        }
    }
}

fn event_from(wire: &Wire<'_>, record: &Record) -> Result<CourseEvent, DecodeError> {
    let kind_name = event_type(wire, record)?;
    let course_id = match field(&wire.course_id, "courseId", Flex::string)? {
        Some(id) => id,
        None => record_key(record).ok_or(DecodeError::MissingField("courseId"))?,
    };
    if course_id.is_empty() {
        return Err(DecodeError::InvalidField {
            field: "courseId",
            reason: "is empty".into(),
        });
    }
    let event_id = match field(&wire.event_id, "eventId", Flex::string)? {
        Some(id) => id,
        None => match first_header(record, &["id", "eventId"])? {
            Some(id) => id.to_owned(),
            // Deterministic, so a replayed record keeps its identity.
            None => record.position(),
        },
    };
    let version = field(&wire.version, "version", Flex::integer)?;
    let occurred_at = field(&wire.occurred_at, "occurredAt", Flex::time)?
        .or(record.timestamp)
        .unwrap_or(0);
    let name = field(&wire.name, "name", Flex::string)?;
    let thumbnail = field(&wire.thumbnail, "thumbnail", Flex::string)?;
    let description = field(&wire.description, "description", Flex::string)?;

    let kind = match kind_name {
        KnownType::Created => EventKind::Created(Created {
            name: name.ok_or(DecodeError::MissingField("name"))?,
            thumbnail,
            description,
            teacher_id: field(&wire.teacher_id, "teacherId", Flex::string)?
                .ok_or(DecodeError::MissingField("teacherId"))?,
            registered_at: field(&wire.registered_at, "registeredAt", Flex::time)?.unwrap_or(occurred_at),
        }),
        KnownType::Updated => EventKind::Updated(Changes {
            name,
            thumbnail,
            description,
        }),
        KnownType::Posted => EventKind::Posted,
        KnownType::Unposted => EventKind::Unposted,
        KnownType::Deleted => EventKind::Deleted,
    };
    Ok(CourseEvent {
        event_id,
        course_id,
        version,
        occurred_at,
        kind,
    })
}

/// The fields of an event object that decoding reads, camelCase or
/// snake_case (both spellings of one field in a record are an error, as a
/// field given twice is); every other field is skipped without being
/// parsed into anything. JSON null counts as absent.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, rename = "eventType", alias = "event_type")]
    event_type: Option<Flex<'a>>,
    #[serde(borrow, rename = "type")]
    type_field: Option<Flex<'a>>,
    #[serde(borrow, rename = "courseId", alias = "course_id")]
    course_id: Option<Flex<'a>>,
    #[serde(borrow, rename = "eventId", alias = "event_id")]
    event_id: Option<Flex<'a>>,
    #[serde(borrow)]
    version: Option<Flex<'a>>,
    #[serde(borrow, rename = "occurredAt", alias = "occurred_at")]
    occurred_at: Option<Flex<'a>>,
    #[serde(borrow)]
    name: Option<Flex<'a>>,
    #[serde(borrow)]
    thumbnail: Option<Flex<'a>>,
    #[serde(borrow)]
    description: Option<Flex<'a>>,
    #[serde(borrow, rename = "teacherId", alias = "teacher_id")]
    teacher_id: Option<Flex<'a>>,
    #[serde(borrow, rename = "registeredAt", alias = "registered_at")]
    registered_at: Option<Flex<'a>>,
    // JsonConverter's wrapper: {"schema": …, "payload": <the event>}. The
    // schema is null for schemaless data, and still marks a wrapper.
    #[serde(default, deserialize_with = "present")]
    schema: bool,
    #[serde(borrow, default, deserialize_with = "payload")]
    payload: Option<&'a RawValue>,
}

/// `payload` as raw JSON; a null payload stays `Some("null")` so that a
/// wrapper around nothing is told apart from an event without a wrapper.
fn payload<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// Whether the field is there at all, null included.
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    IgnoredAny::deserialize(deserializer).map(|_| true)
}

/// A field, if present, read by `read`.
fn field<'a, T>(
    value: &Option<Flex<'a>>,
    name: &'static str,
    read: impl Fn(&Flex<'a>, &'static str) -> Result<T, DecodeError>,
) -> Result<Option<T>, DecodeError> {
    value.as_ref().map(|v| read(v, name)).transpose()
}

/// A JSON scalar as it came (strings borrowed from the input unless they
/// hold escapes), or the kind of anything else.
enum Flex<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    Uint(u64),
    Float(f64),
    Other(&'static str),
}

impl Flex<'_> {
    fn string(&self, field: &'static str) -> Result<String, DecodeError> {
        match self {
            Flex::Str(s) => Ok(s.to_string()),
            // Numeric ids are common in outbox tables; keep them as text.
            Flex::Int(n) => Ok(n.to_string()),
            Flex::Uint(n) => Ok(n.to_string()),
            Flex::Float(n) => Ok(n.to_string()),
            Flex::Other(kind) => Err(invalid(field, format!("expected a string, found {kind}"))),
        }
    }

    fn integer(&self, field: &'static str) -> Result<i64, DecodeError> {
        match self {
            Flex::Int(n) => Ok(*n),
            Flex::Uint(n) => Err(invalid(field, format!("{n} is not an integer"))),
            Flex::Float(n) => Err(invalid(field, format!("{n} is not an integer"))),
            Flex::Str(s) => s
                .parse()
                .map_err(|_| invalid(field, format!("{s:?} is not an integer"))),
            Flex::Other(kind) => Err(invalid(field, format!("expected an integer, found {kind}"))),
        }
    }

    /// RFC 3339 text, or epoch milliseconds (what Debezium emits for timestamps).
    fn time(&self, field: &'static str) -> Result<Millis, DecodeError> {
        match self {
            Flex::Str(s) => DateTime::parse_from_rfc3339(s)
                .map(|t| t.timestamp_millis())
                .map_err(|e| invalid(field, format!("{s:?} is not an RFC 3339 time: {e}"))),
            Flex::Int(n) => Ok(*n),
            Flex::Uint(n) => Err(invalid(field, format!("{n} is not epoch milliseconds"))),
            Flex::Float(n) => Err(invalid(field, format!("{n} is not epoch milliseconds"))),
            Flex::Other(kind) => Err(invalid(field, format!("expected a time, found {kind}"))),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Flex<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FlexVisitor;
        impl<'de> Visitor<'de> for FlexVisitor {
            type Value = Flex<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Flex<'de>, E> {
                Ok(Flex::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Flex<'de>, E> {
                Ok(Flex::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Flex<'de>, E> {
                Ok(Flex::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Flex<'de>, E> {
                Ok(i64::try_from(v).map_or(Flex::Uint(v), Flex::Int))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Flex<'de>, E> {
                Ok(Flex::Float(v))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Flex<'de>, E> {
                Ok(Flex::Other("a boolean"))
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Flex<'de>, S::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Flex::Other("an array"))
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Flex<'de>, M::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Flex::Other("an object"))
            }
        }
        deserializer.deserialize_any(FlexVisitor)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KnownType {
    Created,
    Updated,
    Posted,
    Unposted,
    Deleted,
}

impl KnownType {
    /// Accepts `CourseCreatedEvent` and `CourseCreated`, case-sensitively.
    fn parse(name: &str) -> Option<Self> {
        let base = name.strip_suffix("Event").unwrap_or(name);
        Some(match base {
            "CourseCreated" => KnownType::Created,
            "CourseUpdated" => KnownType::Updated,
            "CoursePosted" => KnownType::Posted,
            "CourseUnposted" => KnownType::Unposted,
            "CourseDeleted" => KnownType::Deleted,
            _ => return None,
        })
    }
}

/// The first of these headers that is present, as text.
fn first_header<'r>(record: &'r Record, names: &[&str]) -> Result<Option<&'r str>, DecodeError> {
    for name in names {
        let found = record.header(name).map_err(|e| DecodeError::HeaderNotUtf8(e.header))?;
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// Value field, then headers, then the payload's `type`, then the topic name
/// (its last `.`-separated segment, so prefixed topics like
/// `prod.CourseCreatedEvent` work too).
fn event_type(wire: &Wire<'_>, record: &Record) -> Result<KnownType, DecodeError> {
    let named = match field(&wire.event_type, "eventType", Flex::string)? {
        Some(t) => Some(t),
        None => match first_header(record, &["eventType", "type"])? {
            Some(t) => Some(t.to_owned()),
            None => field(&wire.type_field, "type", Flex::string)?,
        },
    };
    if let Some(name) = named {
        return KnownType::parse(&name).ok_or(DecodeError::UnknownType(name));
    }
    let segment = record.topic.rsplit('.').next().unwrap_or_default();
    KnownType::parse(segment).ok_or_else(|| DecodeError::NoType(record.topic.clone()))
}

/// The record key as a course id: plain UTF-8, or a JSON string when the
/// Debezium key converter is JsonConverter (possibly schema-wrapped).
fn record_key(record: &Record) -> Option<String> {
    let key = std::str::from_utf8(record.key.as_deref()?).ok()?.trim();
    if key.starts_with('"') || key.starts_with('{') {
        if let Ok(value) = serde_json::from_str::<Value>(key) {
            let value = match value {
                Value::Object(mut obj) if obj.contains_key("payload") => obj.remove("payload")?,
                other => other,
            };
            return match value {
                Value::String(s) if !s.is_empty() => Some(s),
                _ => None,
            };
        }
    }
    (!key.is_empty()).then(|| key.to_owned())
}

fn invalid(field: &'static str, reason: String) -> DecodeError {
    DecodeError::InvalidField { field, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_type_of_the_one_list_decodes_by_name() {
        for name in courseview_projections::EVENT_TYPES {
            assert!(KnownType::parse(name).is_some(), "{name}");
        }
    }

    /// A hand-written record value from `tests/fixtures/events/`.
    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!("../tests/fixtures/events/", $name, ".json"))
        };
    }

    fn record(topic: &str, key: Option<&str>, headers: &[(&str, &str)], value: &str) -> Record {
        Record {
            topic: topic.into(),
            partition: 0,
            offset: 42,
            key: key.map(|k| k.as_bytes().to_vec()),
            value: Some(value.as_bytes().to_vec()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec())))
                .collect(),
            timestamp: Some(1_000),
        }
    }

    fn millis(s: &str) -> Millis {
        DateTime::parse_from_rfc3339(s).expect("valid time").timestamp_millis()
    }

    fn expected_created() -> CourseEvent {
        CourseEvent {
            event_id: "e-1".into(),
            course_id: "c-1".into(),
            version: Some(1),
            occurred_at: millis("2026-11-21T09:00:00Z"),
            kind: EventKind::Created(Created {
                name: "Rust 101".into(),
                thumbnail: Some("https://img/1.png".into()),
                description: Some("Ownership for everyone".into()),
                teacher_id: "t-1".into(),
                registered_at: millis("2026-11-21T08:59:59Z"),
            }),
        }
    }

    #[test]
    fn camel_case_created_with_unknown_fields_decodes() {
        let r = record("CourseCreatedEvent", Some("c-1"), &[], fixture!("created_camel"));
        assert_eq!(decode(&r), Ok(expected_created()));
    }

    #[test]
    fn snake_case_created_decodes_the_same() {
        let r = record("CourseCreatedEvent", Some("c-1"), &[], fixture!("created_snake"));
        assert_eq!(decode(&r), Ok(expected_created()));
    }

    #[test]
    fn updated_takes_type_from_topic_and_keeps_only_present_fields() {
        let r = record("prod.CourseUpdatedEvent", Some("c-1"), &[], fixture!("updated_partial"));
        let e = decode(&r).expect("decodes");
        assert_eq!(e.occurred_at, millis("2026-11-21T08:10:00Z"));
        assert_eq!(
            e.kind,
            EventKind::Updated(Changes {
                description: Some("Now with async".into()),
                ..Changes::default()
            })
        );
    }

    #[test]
    fn course_id_falls_back_to_the_key_and_type_to_the_header() {
        let r = record(
            "anything",
            Some("c-9"),
            &[("eventType", "CoursePostedEvent")],
            fixture!("posted_minimal"),
        );
        let e = decode(&r).expect("decodes");
        assert_eq!((e.course_id.as_str(), e.kind), ("c-9", EventKind::Posted));
        assert_eq!(e.version, Some(3));
    }

    #[test]
    fn type_header_is_used_when_event_type_header_is_absent() {
        let r = record(
            "anything",
            Some("c-9"),
            &[("type", "CourseUnposted")],
            fixture!("posted_minimal"),
        );
        assert_eq!(decode(&r).map(|e| e.kind), Ok(EventKind::Unposted));
    }

    #[test]
    fn a_header_key_that_is_not_utf8_is_a_poison_record() {
        let mut r = record(
            "outbox.event.Course",
            Some("c-1"),
            &[("eventType", "CoursePostedEvent")],
            fixture!("outbox_object"),
        );
        r.headers.push((vec![0xff, 0xfe, b'x'], Some(b"v".to_vec())));
        assert!(matches!(decode(&r), Err(DecodeError::HeaderKeyNotUtf8(_))));
    }

    #[test]
    fn a_used_header_value_that_is_not_utf8_is_a_poison_record() {
        let mut r = record("outbox.event.Course", Some("c-1"), &[], fixture!("outbox_object"));
        r.headers.push((b"eventType".to_vec(), Some(vec![0xc3, 0x28])));
        assert_eq!(decode(&r), Err(DecodeError::HeaderNotUtf8("eventType".into())));
    }

    #[test]
    fn outbox_object_payload_with_id_and_event_type_headers() {
        let r = record(
            "outbox.event.Course",
            Some("c-1"),
            &[("id", "9b7c"), ("eventType", "CoursePostedEvent")],
            fixture!("outbox_object"),
        );
        let e = decode(&r).expect("decodes");
        assert_eq!(
            (e.event_id.as_str(), e.kind, e.version),
            ("9b7c", EventKind::Posted, Some(4))
        );
    }

    #[test]
    fn outbox_escaped_string_payload_with_json_string_key() {
        let r = record(
            "outbox.event.Course",
            Some("\"c-1\""),
            &[("id", "a1")],
            fixture!("outbox_escaped_string"),
        );
        let e = decode(&r).expect("decodes");
        assert_eq!(e.course_id, "c-1");
        assert_eq!(
            e.kind,
            EventKind::Updated(Changes {
                name: Some("Rust 102".into()),
                ..Changes::default()
            })
        );
    }

    #[test]
    fn outbox_schema_wrapper_around_object_uses_payload_type_field() {
        let r = record(
            "outbox.event.Course",
            Some("c-1"),
            &[("id", "a2")],
            fixture!("outbox_schema_object"),
        );
        assert_eq!(
            decode(&r).map(|e| (e.kind, e.version)),
            Ok((EventKind::Deleted, Some(6)))
        );
    }

    #[test]
    fn outbox_schema_wrapper_around_escaped_string_with_schema_wrapped_key() {
        let key = r#"{"schema":{"type":"string"},"payload":"c-7"}"#;
        let r = record(
            "outbox.event.Course",
            Some(key),
            &[("id", "a3"), ("eventType", "CourseUnpostedEvent")],
            fixture!("outbox_schema_string"),
        );
        let e = decode(&r).expect("decodes");
        assert_eq!((e.course_id.as_str(), e.kind), ("c-1", EventKind::Unposted));
    }

    #[test]
    fn missing_event_id_is_derived_from_the_record_position() {
        let r = record("CoursePostedEvent", Some("c-1"), &[], r#"{"version":2}"#);
        assert_eq!(decode(&r).map(|e| e.event_id), Ok("CoursePostedEvent/0/42".into()));
    }

    #[test]
    fn missing_occurred_at_falls_back_to_the_record_timestamp() {
        let r = record("CoursePostedEvent", Some("c-1"), &[], r#"{}"#);
        assert_eq!(decode(&r).map(|e| e.occurred_at), Ok(1_000));
    }

    #[test]
    fn undecodable_records_are_typed_errors() {
        let cases: &[(&str, Option<&str>, &str, DecodeError)] = &[
            (
                "CourseCreatedEvent",
                Some("c"),
                "{not json",
                DecodeError::InvalidJson(String::new()),
            ),
            (
                "CourseCreatedEvent",
                Some("c"),
                "[1,2]",
                DecodeError::NotAnObject("an array"),
            ),
            (
                "CourseCreatedEvent",
                Some("c"),
                "\"{oops\"",
                DecodeError::InvalidJson(String::new()),
            ),
            (
                "CourseCreatedEvent",
                Some("c"),
                r#"{"teacherId":"t"}"#,
                DecodeError::MissingField("name"),
            ),
            (
                "CourseCreatedEvent",
                None,
                r#"{"name":"n","teacherId":"t"}"#,
                DecodeError::MissingField("courseId"),
            ),
            (
                "x",
                Some("c"),
                r#"{"eventType":"CourseArchivedEvent"}"#,
                DecodeError::UnknownType("CourseArchivedEvent".into()),
            ),
            ("misc", Some("c"), "{}", DecodeError::NoType("misc".into())),
            (
                "CoursePostedEvent",
                Some("c"),
                r#"{"version":1.5}"#,
                DecodeError::InvalidField {
                    field: "version",
                    reason: String::new(),
                },
            ),
            (
                "CoursePostedEvent",
                Some("c"),
                r#"{"occurredAt":"yesterday"}"#,
                DecodeError::InvalidField {
                    field: "occurredAt",
                    reason: String::new(),
                },
            ),
            (
                // Both spellings of one field: as ambiguous as one given twice.
                "CoursePostedEvent",
                None,
                r#"{"courseId":"a","course_id":"b"}"#,
                DecodeError::InvalidJson(String::new()),
            ),
            (
                // Ambiguous: which name is meant? Dead-lettered, not guessed.
                "CourseUpdatedEvent",
                Some("c"),
                r#"{"name":"a","name":"b"}"#,
                DecodeError::InvalidJson(String::new()),
            ),
            (
                "CourseUpdatedEvent",
                Some("c"),
                r#"{"name":["x"]}"#,
                DecodeError::InvalidField {
                    field: "name",
                    reason: String::new(),
                },
            ),
        ];
        for (topic, key, value, expected) in cases {
            let got = decode(&record(topic, *key, &[], value)).expect_err(value);
            // Messages carry parser detail; compare the variant and field.
            let strip = |e: &DecodeError| match e {
                DecodeError::InvalidJson(_) => DecodeError::InvalidJson(String::new()),
                DecodeError::InvalidField { field, .. } => DecodeError::InvalidField {
                    field,
                    reason: String::new(),
                },
                other => other.clone(),
            };
            assert_eq!(strip(&got), *expected, "for {value}");
        }
        let no_value = Record {
            value: None,
            ..record("CourseCreatedEvent", None, &[], "")
        };
        assert_eq!(decode(&no_value), Err(DecodeError::NoValue));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use serde_json::json;

        proptest! {
            #[test]
            fn arbitrary_bytes_decode_or_fail_without_panicking(
                bytes in proptest::collection::vec(any::<u8>(), 0..256),
                topic in "[A-Za-z.]{0,24}",
            ) {
                let mut r = record(&topic, None, &[], "");
                r.value = Some(bytes);
                let _ = decode(&r);
            }

            #[test]
            fn every_outbox_wrapping_decodes_to_the_per_type_event(
                name in any::<String>(),
                description in proptest::option::of(any::<String>()),
                course in "[a-z0-9-]{1,16}",
                version in 1..i64::MAX,
                snake in any::<bool>(),
            ) {
                let (course_key, teacher_key) = if snake { ("course_id", "teacher_id") } else { ("courseId", "teacherId") };
                let mut event = json!({
                    "eventId": "e-1", "eventType": "CourseCreatedEvent", "version": version,
                    "occurredAt": "2026-11-21T09:00:00Z", "name": name, "description": description,
                });
                event[course_key] = json!(course);
                event[teacher_key] = json!("t-1");
                let plain = decode(&record("CourseCreatedEvent", None, &[], &event.to_string()))
                    .expect("per-type event decodes");
                let escaped = Value::String(event.to_string()).to_string();
                let wrapped = json!({"schema": {"type": "string"}, "payload": event}).to_string();
                let wrapped_escaped = json!({"schema": {}, "payload": event.to_string()}).to_string();
                // JsonConverter with schemas enabled, for schemaless data.
                let null_schema = json!({"schema": null, "payload": event.to_string()}).to_string();
                for value in [escaped, wrapped, wrapped_escaped, null_schema] {
                    let outbox = decode(&record("outbox.event.Course", None, &[], &value));
                    prop_assert_eq!(outbox.as_ref(), Ok(&plain), "for {}", value);
                }
                prop_assert_eq!(plain.course_id, course);
                prop_assert_eq!(plain.version, Some(version));
            }
        }
    }
}
