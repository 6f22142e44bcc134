//! Decoding Kafka records into course events (DESIGN §1).
//!
//! Two producers are understood as they are: the course service publishing
//! one topic per event type, and the Debezium outbox event router in all its
//! variants (object payload, escaped JSON string payload, JsonConverter's
//! `{"schema","payload"}` wrapper around either, `id`/`eventType` headers,
//! JSON-string keys). Every failure is a [`DecodeError`]: the worker sends the
//! record to the dead-letter store and moves on, so nothing here may panic.

use chrono::DateTime;
use courseview_projections::{Changes, CourseEvent, Created, EventKind, Millis};
use serde_json::{Map, Value};

use crate::record::Record;

/// Why a record is not a course event. Every variant means "skip": retrying
/// cannot fix the bytes, so the record goes to the dead-letter store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
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
    let raw = record.value.as_deref().ok_or(DecodeError::NoValue)?;
    let value: Value = serde_json::from_slice(raw).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
    let payload = unwrap_payload(value)?;
    let fields = Fields(&payload);

    let kind_name = event_type(&fields, record)?;
    let course_id = match fields.string("courseId", "course_id")? {
        Some(id) => id,
        None => record_key(record).ok_or(DecodeError::MissingField("courseId"))?,
    };
    if course_id.is_empty() {
        return Err(DecodeError::InvalidField {
            field: "courseId",
            reason: "is empty".into(),
        });
    }
    let event_id = match fields.string("eventId", "event_id")? {
        Some(id) => id,
        None => record
            .header("id")
            .or_else(|| record.header("eventId"))
            .map(str::to_owned)
            // Deterministic, so a replayed record keeps its identity.
            .unwrap_or_else(|| record.position()),
    };
    let version = fields.integer("version", "version")?;
    let occurred_at = fields
        .time("occurredAt", "occurred_at")?
        .or(record.timestamp)
        .unwrap_or(0);

    let kind = match kind_name {
        KnownType::Created => EventKind::Created(Created {
            name: fields
                .string("name", "name")?
                .ok_or(DecodeError::MissingField("name"))?,
            thumbnail: fields.string("thumbnail", "thumbnail")?,
            description: fields.string("description", "description")?,
            teacher_id: fields
                .string("teacherId", "teacher_id")?
                .ok_or(DecodeError::MissingField("teacherId"))?,
            registered_at: fields.time("registeredAt", "registered_at")?.unwrap_or(occurred_at),
        }),
        KnownType::Updated => EventKind::Updated(Changes {
            name: fields.string("name", "name")?,
            thumbnail: fields.string("thumbnail", "thumbnail")?,
            description: fields.string("description", "description")?,
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

/// Peels JsonConverter wrappers and escaped-JSON strings down to the object.
fn unwrap_payload(mut value: Value) -> Result<Map<String, Value>, DecodeError> {
    for _ in 0..MAX_UNWRAP {
        value = match value {
            Value::Object(mut obj) if obj.contains_key("schema") && obj.contains_key("payload") => {
                obj.remove("payload").unwrap_or(Value::Null)
            }
            Value::Object(obj) => return Ok(obj),
            Value::String(s) => {
                serde_json::from_str(&s).map_err(|e| DecodeError::InvalidJson(format!("in string payload: {e}")))?
            }
            other => return Err(DecodeError::NotAnObject(json_kind(&other))),
        };
    }
    Err(DecodeError::NotAnObject("nesting too deep"))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
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

/// Value field, then headers, then the payload's `type`, then the topic name
/// (its last `.`-separated segment, so prefixed topics like
/// `prod.CourseCreatedEvent` work too).
fn event_type(fields: &Fields<'_>, record: &Record) -> Result<KnownType, DecodeError> {
    let named = match fields.string("eventType", "event_type")? {
        Some(t) => Some(t),
        None => record
            .header("eventType")
            .or_else(|| record.header("type"))
            .map(str::to_owned)
            .map_or_else(|| fields.string("type", "type"), |t| Ok(Some(t)))?,
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

/// Field access accepting camelCase and snake_case names.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, camel: &str, snake: &str) -> Option<&Value> {
        self.0.get(camel).or_else(|| self.0.get(snake)).filter(|v| !v.is_null())
    }

    fn string(&self, camel: &'static str, snake: &str) -> Result<Option<String>, DecodeError> {
        match self.get(camel, snake) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            // Numeric ids are common in outbox tables; keep them as text.
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(other) => Err(invalid(camel, format!("expected a string, found {}", json_kind(other)))),
        }
    }

    fn integer(&self, camel: &'static str, snake: &str) -> Result<Option<i64>, DecodeError> {
        match self.get(camel, snake) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| invalid(camel, format!("{n} is not an integer"))),
            Some(Value::String(s)) => s
                .parse()
                .map(Some)
                .map_err(|_| invalid(camel, format!("{s:?} is not an integer"))),
            Some(other) => Err(invalid(
                camel,
                format!("expected an integer, found {}", json_kind(other)),
            )),
        }
    }

    /// RFC 3339 text, or epoch milliseconds (what Debezium emits for timestamps).
    fn time(&self, camel: &'static str, snake: &str) -> Result<Option<Millis>, DecodeError> {
        match self.get(camel, snake) {
            None => Ok(None),
            Some(Value::String(s)) => DateTime::parse_from_rfc3339(s)
                .map(|t| Some(t.timestamp_millis()))
                .map_err(|e| invalid(camel, format!("{s:?} is not an RFC 3339 time: {e}"))),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| invalid(camel, format!("{n} is not epoch milliseconds"))),
            Some(other) => Err(invalid(camel, format!("expected a time, found {}", json_kind(other)))),
        }
    }
}

fn invalid(field: &'static str, reason: String) -> DecodeError {
    DecodeError::InvalidField { field, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: &str, key: Option<&str>, headers: &[(&str, &str)], value: &str) -> Record {
        Record {
            topic: topic.into(),
            partition: 0,
            offset: 42,
            key: key.map(|k| k.as_bytes().to_vec()),
            value: Some(value.as_bytes().to_vec()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), Some(v.as_bytes().to_vec())))
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
        let r = record(
            "CourseCreatedEvent",
            Some("c-1"),
            &[],
            include_str!("../tests/fixtures/events/created_camel.json"),
        );
        assert_eq!(decode(&r), Ok(expected_created()));
    }

    #[test]
    fn snake_case_created_decodes_the_same() {
        let r = record(
            "CourseCreatedEvent",
            Some("c-1"),
            &[],
            include_str!("../tests/fixtures/events/created_snake.json"),
        );
        assert_eq!(decode(&r), Ok(expected_created()));
    }

    #[test]
    fn updated_takes_type_from_topic_and_keeps_only_present_fields() {
        let r = record(
            "prod.CourseUpdatedEvent",
            Some("c-1"),
            &[],
            include_str!("../tests/fixtures/events/updated_partial.json"),
        );
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
            include_str!("../tests/fixtures/events/posted_minimal.json"),
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
            include_str!("../tests/fixtures/events/posted_minimal.json"),
        );
        assert_eq!(decode(&r).map(|e| e.kind), Ok(EventKind::Unposted));
    }

    #[test]
    fn outbox_object_payload_with_id_and_event_type_headers() {
        let r = record(
            "outbox.event.Course",
            Some("c-1"),
            &[("id", "9b7c"), ("eventType", "CoursePostedEvent")],
            include_str!("../tests/fixtures/events/outbox_object.json"),
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
            include_str!("../tests/fixtures/events/outbox_escaped_string.json"),
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
            include_str!("../tests/fixtures/events/outbox_schema_object.json"),
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
            include_str!("../tests/fixtures/events/outbox_schema_string.json"),
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
}
