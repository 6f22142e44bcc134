//! Kafka → worker → MongoDB → API, end to end on the real services.

use std::time::Duration;

use courseview::kafka::Outgoing;
use courseview::mongo::Store;
use courseview::read_model::ReadModel;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{json, Value};

use crate::helpers::{clean_replay, event, eventually, scenario, TestApp};

/// Publishes `events` and waits until both projections applied them.
async fn run_to_completion(app: &TestApp, events: &[Value]) -> Value {
    run_until(app, events, events.len()).await
}

/// Publishes `events` and waits until both projections applied `total`
/// records of this app's topics (earlier runs included).
async fn run_until(app: &TestApp, events: &[Value], total: usize) -> Value {
    let catalog = app.start_worker(ReadModel::Catalog);
    let teachers = app.start_worker(ReadModel::TeacherCourses);
    app.publish_all(events).await;
    app.wait_applied(ReadModel::Catalog, total as i64).await;
    app.wait_applied(ReadModel::TeacherCourses, total as i64).await;
    catalog.stop().await;
    teachers.stop().await;
    let (_, courses, teacher_ids) = scenario();
    app.answers(&courses, &teacher_ids).await
}

#[tokio::test]
async fn events_in_order_shuffled_across_topics_and_duplicated_give_the_same_answers() {
    let (events, _, _) = scenario();
    let in_order = run_to_completion(&TestApp::spawn().await, &events).await;
    assert_scenario_answers(&in_order, &events).await;
}

/// The same scenario with FerretDB 1.24.2 as the store: its miscounted
/// write replies (docs/COMPATIBILITY.md) are retried, never believed, so
/// the answers are still the right ones.
#[tokio::test]
async fn the_scenario_gives_the_same_answers_on_ferretdb() {
    let (events, _, _) = scenario();
    let app = TestApp::with(crate::helpers::Options {
        mongodb_uri: crate::mongo_compat::ferretdb_uri(),
        ..crate::helpers::Options::default()
    })
    .await;
    let on_ferretdb = run_to_completion(&app, &events).await;
    let on_the_suites = run_to_completion(&TestApp::spawn().await, &events).await;
    assert_eq!(on_ferretdb, on_the_suites);
}

/// Shuffled and duplicated deliveries give `in_order`, and `in_order` is right.
async fn assert_scenario_answers(in_order: &Value, events: &[Value]) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut shuffled = events.to_vec();
    shuffled.shuffle(&mut rng);
    let reordered = run_to_completion(&TestApp::spawn().await, &shuffled).await;

    let mut duplicated = shuffled.clone();
    duplicated.extend(events.iter().step_by(2).cloned());
    duplicated.shuffle(&mut rng);
    let with_duplicates = run_to_completion(&TestApp::spawn().await, &duplicated).await;

    assert_eq!(&reordered, in_order);
    assert_eq!(&with_duplicates, in_order);
    // And the answers are the right ones, not merely equal.
    let names: Vec<&str> = in_order["/catalog/courses?sort=name&limit=100"]["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["Async Rust", "Rust 102"]);
    assert_eq!(in_order["/catalog/courses/c3"]["status"], 404, "deleted course is gone");
    assert_eq!(
        in_order["/catalog/courses/c2"]["status"], 404,
        "unposted course is hidden"
    );
    let dashboard = &in_order["/teachers/t2/courses?sort=name"]["items"];
    let statuses: Vec<(&str, &str)> = dashboard
        .as_array()
        .expect("items")
        .iter()
        .map(|c| (c["name"].as_str().expect("name"), c["status"].as_str().expect("status")))
        .collect();
    assert_eq!(statuses, [("Async Rust", "posted"), ("Draft Only", "draft")]);
}

/// The scenario as a Debezium outbox router would publish it, rotating
/// through every value/key/header variant DESIGN §1 lists.
pub fn as_outbox(app: &TestApp, events: &[Value]) -> Vec<Outgoing> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut payload = e.clone();
            let obj = payload.as_object_mut().expect("object");
            let event_type = obj
                .remove("eventType")
                .and_then(|t| t.as_str().map(str::to_owned))
                .expect("type");
            let event_id = obj
                .remove("eventId")
                .and_then(|t| t.as_str().map(str::to_owned))
                .expect("id");
            let course = obj
                .remove("courseId")
                .and_then(|t| t.as_str().map(str::to_owned))
                .expect("course");
            let mut headers = vec![("id".to_owned(), event_id)];
            let (key, value) = match i % 4 {
                // Object payload (expand.json.payload on), type in a header.
                0 => {
                    headers.push(("eventType".into(), event_type));
                    (course, payload.to_string())
                }
                // Escaped JSON string payload, JSON-string key, type in the payload.
                1 => {
                    payload["type"] = json!(event_type);
                    (json!(course).to_string(), json!(payload.to_string()).to_string())
                }
                // JsonConverter schema wrapper around the object.
                2 => {
                    headers.push(("eventType".into(), event_type));
                    let wrapped = json!({"schema": {"type": "struct", "optional": false}, "payload": payload});
                    (course, wrapped.to_string())
                }
                // Schema wrapper around an escaped string, schema-wrapped key.
                _ => {
                    headers.push(("eventType".into(), event_type));
                    let wrapped = json!({"schema": {"type": "string"}, "payload": payload.to_string()});
                    let key = json!({"schema": {"type": "string"}, "payload": course});
                    (key.to_string(), wrapped.to_string())
                }
            };
            Outgoing {
                topic: app.topic("outbox.event.Course"),
                key: Some(key),
                value: Some(value),
                headers,
                ..Outgoing::default()
            }
        })
        .collect()
}

#[tokio::test]
async fn debezium_outbox_variants_give_the_same_answers_as_per_type_topics() {
    let (events, courses, teachers) = scenario();
    let per_type = run_to_completion(&TestApp::spawn().await, &events).await;

    let app = TestApp::spawn().await;
    let worker = app.start_worker(ReadModel::Catalog);
    let teacher_worker = app.start_worker(ReadModel::TeacherCourses);
    for record in as_outbox(&app, &events) {
        app.send(record).await;
    }
    app.wait_applied(ReadModel::Catalog, events.len() as i64).await;
    app.wait_applied(ReadModel::TeacherCourses, events.len() as i64).await;
    worker.stop().await;
    teacher_worker.stop().await;
    assert_eq!(app.store.count_dead_letters("catalog").await.expect("count"), 0);
    assert_eq!(app.answers(&courses, &teachers).await, per_type);
}

/// Many courses, many events, so a crash lands mid-stream.
pub fn big_history(prefix: &str, courses: usize) -> Vec<Value> {
    let mut events = Vec::new();
    for c in 0..courses {
        let id = format!("{prefix}{c:04}");
        events.push(event(
            "CourseCreatedEvent",
            &id,
            1,
            json!({"name": format!("Course {c}"), "teacherId": format!("t{}", c % 7)}),
        ));
        events.push(event("CoursePostedEvent", &id, 2, json!({})));
        events.push(event(
            "CourseUpdatedEvent",
            &id,
            3,
            json!({"description": format!("v3 of {c}")}),
        ));
        if c % 5 == 0 {
            events.push(event("CourseDeletedEvent", &id, 4, json!({})));
        }
    }
    events
}

#[tokio::test]
async fn a_worker_crashed_and_restarted_resumes_from_stored_offsets_and_equals_a_clean_run() {
    let events = big_history("k", 300);

    let expected = clean_replay(&events).await;

    let app = TestApp::spawn().await;
    app.publish_all(&events).await;
    // Crash mid-stream: the task is dropped at whatever await it is in,
    // between a batch's writes and its offsets or anywhere else.
    let first = app.start_worker(ReadModel::Catalog);
    eventually("some progress before the crash", Duration::from_secs(60), || async {
        let offsets = app.store.load_offsets("catalog", 1).await.ok()?;
        (offsets.values().sum::<i64>() > 0).then_some(())
    })
    .await;
    first.task.abort();
    let _ = first.task.await;

    let second = app.start_worker(ReadModel::Catalog);
    app.wait_applied(ReadModel::Catalog, events.len() as i64).await;
    second.stop().await;
    // A graceful stop and restart with nothing new applies nothing twice.
    let third = app.start_worker(ReadModel::Catalog);
    tokio::time::sleep(Duration::from_millis(300)).await;
    third.stop().await;

    assert_eq!(app.dump(ReadModel::Catalog).await, expected);
    let stored: i64 = app
        .store
        .load_offsets("catalog", 1)
        .await
        .expect("offsets")
        .values()
        .sum();
    assert_eq!(
        stored,
        events.len() as i64,
        "offsets stop exactly at the end of the log"
    );
}

#[tokio::test]
async fn a_garbage_record_is_dead_lettered_and_later_events_still_apply() {
    let app = TestApp::spawn().await;
    let worker = app.start_worker(ReadModel::Catalog);
    let garbage = Outgoing {
        topic: app.topic("CourseCreatedEvent"),
        key: Some("g1".into()),
        value: Some("{this is not json".into()),
        headers: vec![("source".into(), "test".into())],
        ..Outgoing::default()
    };
    app.send(garbage).await;
    let missing_name = event("CourseCreatedEvent", "g2", 1, json!({"teacherId": "t"}));
    app.publish(&missing_name).await;
    app.publish(&event(
        "CourseCreatedEvent",
        "ok",
        1,
        json!({"name": "Fine", "teacherId": "t"}),
    ))
    .await;
    app.publish(&event("CoursePostedEvent", "ok", 2, json!({}))).await;
    app.wait_applied(ReadModel::Catalog, 4).await;
    worker.stop().await;

    let (status, body) = app.get_json("/catalog/courses/ok").await;
    assert_eq!((status, body["name"].as_str()), (200, Some("Fine")));
    let letters = app.store.dead_letters(Some("catalog"), 10).await.expect("dead letters");
    assert_eq!(letters.len(), 2);
    let bad_json = letters
        .iter()
        .map(|(_, l)| l)
        .find(|l| l.key.as_deref() == Some(&b"g1"[..]))
        .expect("garbage stored");
    assert_eq!(bad_json.topic, app.topic("CourseCreatedEvent"));
    assert_eq!(bad_json.value.as_deref(), Some(&b"{this is not json"[..]));
    assert!(
        bad_json.error.contains("not valid JSON"),
        "error says why: {}",
        bad_json.error
    );
    assert!(bad_json.offset >= 0 && (0..2).contains(&bad_json.partition));
    let no_name = letters
        .iter()
        .map(|(_, l)| l)
        .find(|l| l.key.as_deref() == Some(&b"g2"[..]))
        .expect("missing field stored");
    assert!(
        no_name.error.contains("name"),
        "error names the field: {}",
        no_name.error
    );
}

#[tokio::test]
async fn a_replayed_dead_letter_lands_correctly_after_later_events_of_its_course() {
    use courseview::cli::dlq::{self, DlqCommand, DlqFilter, ReplayArgs};
    use courseview::dead_letter::DeadLetter;
    use courseview::record::Record;

    let app = TestApp::spawn().await;
    let worker = app.start_worker(ReadModel::Catalog);
    app.publish(&event(
        "CourseCreatedEvent",
        "d1",
        1,
        json!({"name": "Replayed", "teacherId": "t"}),
    ))
    .await;
    app.publish(&event("CourseUpdatedEvent", "d1", 3, json!({"description": "v3"})))
        .await;
    app.wait_applied(ReadModel::Catalog, 2).await;
    worker.stop().await;
    assert_eq!(app.get_json("/catalog/courses/d1").await.0, 404, "not posted yet");

    // Version 2 (the posting) was dead-lettered once, e.g. by a decoder bug since fixed.
    let posted = event("CoursePostedEvent", "d1", 2, json!({}));
    let record = Record {
        topic: app.topic("CoursePostedEvent"),
        offset: 0,
        key: Some(b"d1".to_vec()),
        value: Some(posted.to_string().into_bytes()),
        ..Record::default()
    };
    let letter = DeadLetter::new("catalog", &record, "simulated failure");
    app.store.put_dead_letters(&[letter]).await.expect("stored");

    let global = app.global();
    let filter = DlqFilter {
        projection: Some(ReadModel::Catalog),
        limit: 10,
    };
    let replay = ReplayArgs {
        id: None,
        filter,
        no_cache_invalidation: false,
    };
    dlq::run(global, DlqCommand::Replay(replay)).await.expect("replay");

    let (status, course) = app.get_json("/catalog/courses/d1").await;
    assert_eq!(status, 200, "posted by the replayed letter");
    assert_eq!(
        (course["description"].as_str(), course["version"].as_i64()),
        (Some("v3"), Some(3))
    );
    assert_eq!(
        app.store.count_dead_letters("catalog").await.expect("count"),
        0,
        "replayed letters are removed"
    );
}

#[tokio::test]
async fn states_stored_in_the_forms_of_earlier_releases_are_read_and_carried_on() {
    // Earlier releases stored a course's state as an embedded document,
    // then as the plain state in JSON; it is now packed. A read model
    // written by an old release must carry on under the new one without a
    // rebuild.
    let (events, _, _) = scenario();
    let expected = run_to_completion(&TestApp::spawn().await, &events).await;

    let app = TestApp::spawn().await;
    let (first, rest) = events.split_at(events.len() / 2);
    run_to_completion(&app, first).await;
    let client = mongodb::Client::with_uri_str(&app.mongodb_uri).await.expect("client");
    let db = client.database(app.store.database_name());
    let mut rewritten = 0;
    for model in [ReadModel::Catalog, ReadModel::TeacherCourses] {
        let generation = app.store.serving_generation(model.name()).await.expect("generation");
        let name = Store::collection_name(model.name(), generation);
        let ids: Vec<String> = app
            .store
            .dump(&name)
            .await
            .expect("dump")
            .iter()
            .map(|d| d.get_str("_id").expect("an id").to_owned())
            .collect();
        let written: std::collections::HashMap<_, _> = app
            .store
            .load_states(&name, &ids)
            .await
            .expect("states load")
            .into_iter()
            .map(|(id, s)| (id, s.state))
            .collect();
        assert_eq!(written.len(), ids.len(), "{name}: every stored state loads");
        for (i, (id, state)) in written.iter().enumerate() {
            let old: bson::Bson = if i % 2 == 0 {
                bson::to_document(state).expect("as a document").into()
            } else {
                serde_json::to_string(state).expect("as JSON").into()
            };
            db.collection::<bson::Document>(&name)
                .update_one(
                    bson::doc! {"_id": id},
                    bson::doc! {"$set": {"state": old}, "$unset": {"st": ""}},
                )
                .await
                .expect("rewritten the old way");
            rewritten += 1;
        }
        // Read back exactly, not merely well enough for the answers below.
        let loaded = app.store.load_states(&name, &ids).await.expect("old states load");
        let loaded: std::collections::HashMap<_, _> = loaded.into_iter().map(|(id, s)| (id, s.state)).collect();
        assert_eq!(loaded, written, "{name}: old-form states read back as written");
    }
    assert!(rewritten > 0, "nothing to rewrite");

    assert_eq!(run_until(&app, rest, events.len()).await, expected);
}
