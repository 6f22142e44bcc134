//! The benchmark corpus, shared by the CPU and end-to-end benchmarks.
#![allow(dead_code)]

use courseview::record::Record;
use serde_json::json;

/// A stream shaped like production: created, updated twice, posted, a few
/// unposted/deleted; 10% through the outbox with string payloads.
pub fn corpus(courses: usize) -> Vec<Record> {
    let mut records = Vec::new();
    for c in 0..courses {
        let id = format!("3f1e7c2a-{c:08}");
        let kinds: &[&str] = match c % 10 {
            0 => &[
                "CourseCreatedEvent",
                "CourseUpdatedEvent",
                "CoursePostedEvent",
                "CourseDeletedEvent",
            ],
            1 => &["CourseCreatedEvent", "CoursePostedEvent", "CourseUnpostedEvent"],
            _ => &[
                "CourseCreatedEvent",
                "CourseUpdatedEvent",
                "CoursePostedEvent",
                "CourseUpdatedEvent",
            ],
        };
        for (i, kind) in kinds.iter().enumerate() {
            let mut value = json!({
                "eventId": format!("7d0c{c:08}{i:04}"),
                "eventType": kind,
                "courseId": id,
                "version": i + 1,
                "occurredAt": format!("2026-11-21T09:{:02}:{:02}.123Z", i, c % 60),
            });
            match *kind {
                "CourseCreatedEvent" => {
                    value["name"] = json!(format!("Course number {c}"));
                    value["thumbnail"] = json!(format!("https://cdn.example.com/thumbs/{id}.png"));
                    value["description"] =
                        json!("A practical introduction with exercises, quizzes and a final project.");
                    value["teacherId"] = json!(format!("teacher-{}", c % 97));
                    value["registeredAt"] = json!("2026-11-20T08:00:00Z");
                }
                "CourseUpdatedEvent" => value["description"] = json!(format!("Revised syllabus {i}")),
                _ => {}
            }
            let outbox = c % 10 == 3;
            records.push(Record {
                topic: if outbox {
                    "outbox.event.Course".into()
                } else {
                    (*kind).into()
                },
                partition: (c % 3) as i32,
                offset: records.len() as i64,
                key: Some(id.clone().into_bytes()),
                value: Some(
                    if outbox {
                        json!(value.to_string()).to_string()
                    } else {
                        value.to_string()
                    }
                    .into_bytes(),
                ),
                headers: if outbox {
                    vec![("id".into(), Some(b"x".to_vec()))]
                } else {
                    Vec::new()
                },
                timestamp: Some(1_795_000_000_000),
            });
        }
    }
    records
}
