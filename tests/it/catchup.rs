//! Catching up over topics whose records differ in size. librdkafka fills
//! each partition's share of a fetch by bytes, so unaided a topic of small
//! records runs far ahead, in the log's time, of one of large records, and
//! a course's events land in different folds: written once per fold
//! instead of once. The reader keeps its partitions in step by time.

use std::time::Duration;

use courseview::kafka::Outgoing;
use courseview::read_model::ReadModel;
use serde_json::{json, Value};

use crate::helpers::{event, eventually, log_lines, TestApp};

/// Courses in the history; each is created (a large record) and posted (a
/// small one) 500 ms later, one course every 20 ms: 4 minutes of history,
/// 6,000 records on each partition (the reader holds back only partitions
/// with more than a thousand left).
const COURSES: usize = 12_000;

#[tokio::test]
async fn a_worker_catching_up_over_large_and_small_records_folds_each_courses_events_together() {
    let app = TestApp::spawn().await;
    let base = chrono::Utc::now().timestamp_millis() - 3_600_000;
    let padding = "x".repeat(600);
    let mut records: Vec<Outgoing> = Vec::with_capacity(2 * COURSES);
    for i in 0..COURSES {
        let course = format!("catchup-{i:05}");
        let created = event(
            "CourseCreatedEvent",
            &course,
            1,
            json!({
                "name": format!("Course {i}"), "thumbnail": format!("https://img/{course}.png"),
                "description": padding, "teacherId": format!("t{}", i % 7),
                "registeredAt": "2026-11-20T08:00:00Z"
            }),
        );
        let posted = event("CoursePostedEvent", &course, 2, json!({}));
        let at = base + 20 * i as i64;
        records.push(outgoing(&app, &created, at));
        records.push(outgoing(&app, &posted, at + 500));
    }
    // The log holds them in the order they happened, as the course service
    // writes them.
    records.sort_by_key(|r| r.timestamp);
    for chunk in records.chunks(500) {
        futures::future::join_all(chunk.iter().map(|r| app.producer.send(r)))
            .await
            .into_iter()
            .for_each(|sent| {
                sent.expect("produced");
            });
    }

    // A fold of 2 MiB holds about a fifth of the history; no flush by time.
    let mut worker = app.worker_process(
        ReadModel::Catalog,
        &[
            ("RUST_LOG", "info,courseview::worker::consume=debug"),
            ("COURSEVIEW_FOLD_INTERVAL", "60s"),
            ("COURSEVIEW_FOLD_BYTES", "2097152"),
            ("COURSEVIEW_BATCH_SIZE", "500"),
        ],
    );
    let logs = log_lines(&mut worker);
    app.wait_applied(ReadModel::Catalog, records.len() as i64).await;

    let (read, written) = eventually("the flushes to be logged", Duration::from_secs(10), || async {
        let lines = logs.lock().ok()?;
        let flushes: Vec<&Value> = lines.iter().filter(|l| l["message"] == "Batch committed.").collect();
        let sum = |field: &str| flushes.iter().filter_map(|l| l[field].as_u64()).sum::<u64>();
        let read = sum("records");
        (read >= records.len() as u64).then(|| (read, sum("written")))
    })
    .await;
    // In step, a fold splits a course only when its two events straddle the
    // fold's end: about 1.1 documents per course, 0.55 per event. Out of
    // step, the posts run ahead and nearly every course is written twice.
    let per_event = written as f64 / read as f64;
    assert!(
        per_event <= 0.7,
        "{written} documents written for {read} events ({per_event:.2} per event): the folds did not hold each course's events together"
    );
    let catalog = app.dump(ReadModel::Catalog).await;
    assert_eq!(catalog.len(), COURSES, "every course is posted in the catalog");
}

fn outgoing(app: &TestApp, event: &Value, timestamp: i64) -> Outgoing {
    Outgoing {
        topic: app.topic(event["eventType"].as_str().expect("eventType")),
        key: event["courseId"].as_str().map(str::to_owned),
        value: Some(event.to_string()),
        timestamp: Some(timestamp),
        ..Outgoing::default()
    }
}
