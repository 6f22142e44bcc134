//! The seed's flow end to end: the course service writes a `course` row and
//! an `outbox` row in one MariaDB transaction, Debezium's MariaDB connector
//! and outbox router publish it to `outbox.event.Course`, `project catalog`
//! applies it, and the API serves it. Once per wire form of the router.

use std::time::Duration;

use courseview::read_model::ReadModel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;
use serde_json::{json, Value};

use crate::helpers::{event, eventually, scenario, TestApp};
use crate::outbox::{connect_url, connector_config, mariadb_port, register, unregister, CourseService, WireForm};

/// Sum of the high watermarks of the app's outbox topic, by partition.
pub fn outbox_watermarks(app: &TestApp) -> Vec<(i32, i64)> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &app.brokers)
        .create()
        .expect("consumer");
    let topic = app.topic("outbox.event.Course");
    (0..2)
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(&topic, p, Duration::from_secs(5))
                .expect("watermarks");
            (p, high)
        })
        .collect()
}

/// Commits warm-up events until Debezium has one in Kafka, so the history
/// that follows is not written before the connector reads the binlog
/// (`snapshot.mode=no_data` starts at the binlog's end when it starts).
/// They are updates of a course never created: no answer shows them.
pub async fn warm_up(app: &TestApp, service: &CourseService) {
    let mut version = 0;
    eventually("Debezium to publish a warm-up event", Duration::from_secs(90), || {
        version += 1;
        let mut warm = event("CourseUpdatedEvent", "warm", version, json!({"description": "warm-up"}));
        warm["eventId"] = json!(format!("warm-{}-{version}", app.id));
        async move {
            service.commit(&warm).expect("warm-up committed");
            tokio::time::sleep(Duration::from_millis(500)).await;
            (outbox_watermarks(app).iter().map(|(_, h)| h).sum::<i64>() > 0).then_some(())
        }
    })
    .await;
}

/// The `id` headers of every record on the app's outbox topic so far.
fn relayed_ids(app: &TestApp) -> std::collections::HashSet<String> {
    use rdkafka::message::Headers;
    use rdkafka::{Offset, TopicPartitionList};
    let topic = app.topic("outbox.event.Course");
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &app.brokers)
        .set("group.id", format!("{}-scan", app.id))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let ends = outbox_watermarks(app);
    let mut tpl = TopicPartitionList::new();
    for (p, _) in &ends {
        tpl.add_partition_offset(&topic, *p, Offset::Beginning).expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut ids = std::collections::HashSet::new();
    let mut next: std::collections::HashMap<i32, i64> = ends.iter().map(|(p, _)| (*p, 0)).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while ends.iter().any(|(p, h)| next[p] < *h) && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            next.insert(m.partition(), m.offset() + 1);
            if let Some(id) = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "id"))
                .and_then(|h| h.value)
            {
                ids.insert(String::from_utf8_lossy(id).into_owned());
            }
        }
    }
    ids
}

/// Commits a last event and waits until Debezium has relayed it: the binlog
/// is read in commit order, so everything committed before it is in Kafka
/// then (re-sends included). Then waits until `models` have applied it all.
pub async fn wait_relayed_and_applied(app: &TestApp, service: &CourseService, models: &[ReadModel]) {
    let id = format!("end-{}", app.id);
    let mut end = event("CourseUpdatedEvent", "warm", 3_000, json!({"description": "end"}));
    end["eventId"] = json!(id);
    service.commit(&end).expect("the last event committed");
    eventually("Debezium to relay the last event", Duration::from_secs(180), || async {
        relayed_ids(app).contains(&id).then_some(())
    })
    .await;
    for model in models {
        wait_caught_up(app, *model, 1).await;
    }
}

/// Until the catalog worker's stored offsets equal the outbox topic's high
/// watermarks on every partition, with at least `at_least` records in all.
pub async fn wait_caught_up(app: &TestApp, model: ReadModel, at_least: i64) {
    let topic = app.topic("outbox.event.Course");
    eventually(
        &format!("{} to catch up with Debezium", model.name()),
        Duration::from_secs(120),
        || async {
            let highs = outbox_watermarks(app);
            let generation = app.store.serving_generation(model.name()).await.ok()?;
            let stored = app.store.load_offsets(model.name(), generation).await.ok()?;
            let total: i64 = highs.iter().map(|(_, h)| h).sum();
            let all_applied = highs
                .iter()
                .all(|(p, h)| *h == 0 || stored.get(&(topic.clone(), *p)) == Some(h));
            (total >= at_least && all_applied).then_some(())
        },
    )
    .await;
}

/// The answers a per-type publication of the scenario gives: what the
/// outbox flow must equal.
async fn per_type_answers() -> Value {
    let (events, courses, teachers) = scenario();
    let app = TestApp::spawn().await;
    app.project_all(ReadModel::Catalog, &events).await;
    app.project_all(ReadModel::TeacherCourses, &events).await;
    app.answers(&courses, &teachers).await
}

/// Every record on the app's outbox topic, as Debezium wrote it.
fn captured_records(app: &TestApp) -> Vec<Value> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &app.brokers)
        .set("group.id", format!("{}-capture", app.id))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer
        .subscribe(&[&app.topic("outbox.event.Course")])
        .expect("subscribe");
    let mut records = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else {
            if !records.is_empty() {
                break;
            }
            continue;
        };
        use rdkafka::message::Headers;
        let headers: serde_json::Map<String, Value> = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            json!(String::from_utf8_lossy(h.value.unwrap_or_default())),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        records.push(json!({
            "key": m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            "headers": headers,
            "value": m.payload().map(|v| String::from_utf8_lossy(v).into_owned()),
        }));
    }
    records
}

async fn outbox_flow_equals_per_type_topics(form: WireForm) {
    let expected = per_type_answers().await;
    let (events, courses, teachers) = scenario();
    let app = TestApp::spawn().await;
    let service = CourseService::create(mariadb_port());
    let connect = connect_url();
    let name = register(
        &app.http,
        &connect,
        &connector_config(&app, &service, form, &app.brokers),
    )
    .await;
    let catalog = app.start_worker(ReadModel::Catalog);
    let dashboards = app.start_worker(ReadModel::TeacherCourses);
    warm_up(&app, &service).await;

    let rolled_back = [
        event(
            "CourseCreatedEvent",
            "rb",
            1,
            json!({"name": "Never", "teacherId": "t1"}),
        ),
        event("CoursePostedEvent", "rb", 2, json!({})),
    ];
    for (i, e) in events.iter().enumerate() {
        service.commit(e).expect("committed");
        if i == events.len() / 2 {
            service.roll_back(&rolled_back);
        }
    }
    wait_relayed_and_applied(&app, &service, &[ReadModel::Catalog, ReadModel::TeacherCourses]).await;
    catalog.stop().await;
    dashboards.stop().await;

    if let Ok(dir) = std::env::var("COURSEVIEW_CAPTURE_DEBEZIUM") {
        let file = std::path::Path::new(&dir).join(format!("debezium_{form:?}.json").to_lowercase());
        let records = captured_records(&app);
        std::fs::write(file, serde_json::to_string_pretty(&records).expect("json")).expect("capture written");
    }
    unregister(&app.http, &connect, &name).await;

    let refused = app.store.dead_letters(Some("catalog"), 5).await.expect("dead letters");
    assert!(refused.is_empty(), "{form:?}: nothing refused, got {refused:?}");
    assert_eq!(
        app.answers(&courses, &teachers).await,
        expected,
        "{form:?}: the outbox flow equals per-type topics"
    );
    let (status, _) = app.get_json("/catalog/courses/rb").await;
    assert_eq!(status, 404, "{form:?}: a rolled-back transaction never shows");
}

#[tokio::test]
async fn debezium_outbox_with_string_converter_gives_the_per_type_answers() {
    outbox_flow_equals_per_type_topics(WireForm::StringConverter).await;
}

#[tokio::test]
async fn debezium_outbox_with_json_converter_without_schemas_gives_the_per_type_answers() {
    outbox_flow_equals_per_type_topics(WireForm::JsonNoSchemas).await;
}

#[tokio::test]
async fn debezium_outbox_with_json_converter_with_schemas_gives_the_per_type_answers() {
    outbox_flow_equals_per_type_topics(WireForm::JsonWithSchemas).await;
}

#[tokio::test]
async fn debezium_outbox_with_expanded_json_payload_gives_the_per_type_answers() {
    outbox_flow_equals_per_type_topics(WireForm::ExpandedPayload).await;
}

/// What the router really writes, pinned: one captured record per wire form
/// (tests/fixtures/events/debezium_*.json, written by this test with
/// `COURSEVIEW_CAPTURE_DEBEZIUM=dir`) decodes to the event it came from.
#[test]
fn records_debezium_produced_decode_to_their_events() {
    for (file, text) in [
        (
            "debezium_stringconverter.json",
            include_str!("../fixtures/events/debezium_stringconverter.json"),
        ),
        (
            "debezium_jsonnoschemas.json",
            include_str!("../fixtures/events/debezium_jsonnoschemas.json"),
        ),
        (
            "debezium_jsonwithschemas.json",
            include_str!("../fixtures/events/debezium_jsonwithschemas.json"),
        ),
        (
            "debezium_expandedpayload.json",
            include_str!("../fixtures/events/debezium_expandedpayload.json"),
        ),
    ] {
        let records: Vec<Value> = serde_json::from_str(text).expect("fixture is JSON");
        let created = records
            .iter()
            .find(|r| r["headers"]["id"] == "c1-v1")
            .unwrap_or_else(|| panic!("{file}: the record of c1's creation"));
        let record = courseview::record::Record {
            topic: "outbox.event.Course".into(),
            key: created["key"].as_str().map(|k| k.as_bytes().to_vec()),
            value: created["value"].as_str().map(|v| v.as_bytes().to_vec()),
            headers: created["headers"]
                .as_object()
                .expect("headers")
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_str().map(|v| v.as_bytes().to_vec())))
                .collect(),
            ..courseview::record::Record::default()
        };
        let decoded = courseview::decode::decode(&record).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(decoded.course_id, "c1", "{file}");
        assert_eq!(decoded.event_id, "c1-v1", "{file}");
        assert_eq!(decoded.version, Some(1), "{file}");
        assert!(
            matches!(decoded.kind, courseview_projections::event::EventKind::Created(_)),
            "{file}: {:?}",
            decoded.kind
        );
    }
}
