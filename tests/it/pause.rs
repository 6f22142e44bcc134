//! `courseview pause` / `resume` against real Kafka, MongoDB and Redis:
//! a paused projection's workers write what they folded, store their
//! offsets at that batch boundary and apply nothing more while events keep
//! coming; they keep their process, their consumer group membership and
//! their health endpoints; `resume` goes on
//! from the stored offsets, and nothing is lost across the pause.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use courseview::read_model::ReadModel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{json, Value};

use crate::helpers::{clean_replay, event, eventually, unique, Reaped, TestApp};

/// `courses` courses, each created, updated, posted and updated again.
fn stream(courses: usize) -> Vec<Value> {
    let mut events = Vec::new();
    for c in 0..courses {
        let id = format!("p{c}");
        events.push(event(
            "CourseCreatedEvent",
            &id,
            1,
            json!({"name": format!("Course {c}"), "teacherId": "t1"}),
        ));
        events.push(event("CourseUpdatedEvent", &id, 2, json!({"description": "first"})));
        events.push(event("CoursePostedEvent", &id, 3, json!({})));
        events.push(event(
            "CourseUpdatedEvent",
            &id,
            4,
            json!({"name": format!("Course {c} again")}),
        ));
    }
    events
}

/// Publishes `events` at about `per_second`.
async fn publish_steadily(app: &TestApp, events: &[Value], per_second: usize) {
    for chunk in events.chunks(per_second / 10) {
        let started = Instant::now();
        app.publish_all(chunk).await;
        tokio::time::sleep(Duration::from_millis(100).saturating_sub(started.elapsed())).await;
    }
}

/// Runs `courseview <args>` for this app and waits for it to succeed.
fn command(app: &TestApp, args: &[&str]) {
    let mut child = app.process(args, &[]);
    let status = child.0.wait().expect("the command ran");
    assert!(status.success(), "courseview {args:?} failed: {status}");
}

fn worker(app: &TestApp) -> (Reaped, String) {
    let port = crate::peers::free_port();
    let addr = format!("127.0.0.1:{port}");
    let worker = app.worker_process(ReadModel::Catalog, &[("COURSEVIEW_METRICS_LISTEN", addr.as_str())]);
    (worker, format!("http://{addr}"))
}

async fn offsets(app: &TestApp) -> HashMap<(String, i32), i64> {
    app.store.load_offsets("catalog", 1).await.expect("offsets")
}

/// The events of this app's log below `offsets`, partition by partition:
/// what a worker that stored them has applied.
fn events_below(app: &TestApp, offsets: &HashMap<(String, i32), i64>) -> Vec<Value> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &app.brokers)
        .set("group.id", unique("scan"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in offsets {
        if *offset > 0 {
            tpl.add_partition_offset(topic, *partition, Offset::Beginning)
                .expect("partition");
        }
    }
    consumer.assign(&tpl).expect("assigned");
    let want: i64 = offsets.values().sum();
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (events.len() as i64) < want {
        assert!(
            Instant::now() < deadline,
            "read {} of {want} records below the offsets",
            events.len()
        );
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        if m.offset() < offsets[&(m.topic().to_owned(), m.partition())] {
            events.push(serde_json::from_slice(m.payload().expect("a value")).expect("an event"));
        }
    }
    events
}

/// The worker's `/readyz` body once it answers 200 (before its first lag
/// measurement it is not ready yet); a paused worker is ready: there is
/// nothing to restart.
async fn readyz(app: &TestApp, base: &str) -> Option<Value> {
    let response = app.http.get(format!("{base}/readyz")).send().await.ok()?;
    if response.status() != 200 {
        return None;
    }
    response.json().await.ok()
}

/// The projection's consumer group as the broker describes it: its state
/// and how many members it has.
fn group(app: &TestApp) -> (String, usize) {
    let client: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &app.brokers)
        .create()
        .expect("client");
    let name = format!("{}.catalog", app.id);
    let list = client
        .fetch_group_list(Some(&name), Duration::from_secs(5))
        .expect("the group described");
    list.groups()
        .iter()
        .find(|g| g.name() == name)
        .map(|g| (g.state().to_owned(), g.members().len()))
        .unwrap_or_else(|| ("Dead".to_owned(), 0))
}

/// Waits for the group to be stable with `members` members.
async fn group_stable_with(app: &TestApp, members: usize) {
    eventually(
        &format!("the group to be stable with {members} member(s)"),
        Duration::from_secs(30),
        || async { (group(app) == ("Stable".to_owned(), members)).then_some(()) },
    )
    .await;
}

/// Waits until the worker's `/readyz` says it is paused.
async fn held(app: &TestApp, base: &str) {
    eventually("the worker to say it is paused", Duration::from_secs(15), || async {
        (readyz(app, base).await?["status"] == "paused").then_some(())
    })
    .await;
}

fn sorted(mut docs: Vec<bson::Document>) -> Vec<bson::Document> {
    docs.sort_by(|a, b| {
        a.get_str("_id")
            .unwrap_or_default()
            .cmp(b.get_str("_id").unwrap_or_default())
    });
    docs
}

#[tokio::test]
async fn a_pause_under_a_steady_stream_stops_at_a_batch_boundary_and_resume_loses_nothing() {
    let app = TestApp::spawn().await;
    let (mut worker, base) = worker(&app);
    let events = stream(250);
    let checks = async {
        // Some applied first, while the stream runs.
        eventually("the worker to apply some events", Duration::from_secs(30), || async {
            (offsets(&app).await.values().sum::<i64>() > 50).then_some(())
        })
        .await;
        command(&app, &["pause", "catalog", "--reason", "moving the cluster"]);
        let body = eventually("the worker to say it is paused", Duration::from_secs(15), || async {
            let body = readyz(&app, &base).await?;
            (body["status"] == "paused").then_some(body)
        })
        .await;
        assert!(body["paused"].get("catalog").is_some(), "{body}");
        eventually(
            "readiness to give the pause's reason",
            Duration::from_secs(10),
            || async { (readyz(&app, &base).await?["paused"]["catalog"] == "moving the cluster").then_some(()) },
        )
        .await;
        // Once paused, nothing moves while events keep coming.
        let (read_model, stored) = (app.dump(ReadModel::Catalog).await, offsets(&app).await);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(offsets(&app).await, stored, "offsets stopped");
        assert_eq!(app.dump(ReadModel::Catalog).await, read_model, "the read model stopped");
        let (status, projections) = app.get_json("/projections").await;
        assert_eq!(status, 200);
        let catalog = projections["projections"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["projection"] == "catalog"))
            .cloned()
            .expect("catalog");
        assert_eq!(catalog["state"], "paused", "{catalog}");
        assert_eq!(catalog["paused"]["reason"], "moving the cluster");
        let metrics = app.get_text(&format!("{base}/metrics")).await;
        assert!(
            metrics.contains("courseview_projection_paused{projection=\"catalog\"} 1"),
            "the paused gauge: {metrics}"
        );
        // Paused, the worker is still in its group: no rebalance at the
        // pause or at the resume, and lag tools still see the member.
        assert_eq!(
            group(&app),
            ("Stable".to_owned(), 1),
            "a paused worker keeps its group membership"
        );
        (read_model, stored)
    };
    let ((read_model, stored), ()) = tokio::join!(checks, publish_steadily(&app, &events, 100));
    let total = events.len() as i64;
    assert!(stored.values().sum::<i64>() < total, "paused before the stream ended");
    // A batch boundary: what is stored is exactly what is applied.
    let applied = events_below(&app, &stored);
    assert_eq!(
        sorted(read_model),
        sorted(clean_replay(&applied).await),
        "the read model at the pause equals a clean replay of the events below its offsets"
    );

    command(&app, &["resume", "catalog"]);
    app.wait_applied(ReadModel::Catalog, total).await;
    assert_eq!(
        sorted(app.dump(ReadModel::Catalog).await),
        sorted(clean_replay(&events).await),
        "resumed, the read model equals a clean replay"
    );
    eventually(
        "the resumed worker to say it is ready",
        Duration::from_secs(15),
        || async { (readyz(&app, &base).await?["status"] == "ready").then_some(()) },
    )
    .await;
    crate::helpers::signal(&worker, "TERM");
    let _ = worker.0.wait();
}

#[tokio::test]
async fn a_worker_started_while_paused_stays_paused_until_resumed() {
    let app = TestApp::spawn().await;
    command(&app, &["pause", "catalog"]);
    let events = stream(10);
    app.publish_all(&events).await;
    let (mut worker, base) = worker(&app);
    let logs = crate::helpers::log_lines(&mut worker);
    held(&app, &base).await;
    // It joins its group, takes its partitions and reads none of them.
    group_stable_with(&app, 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        crate::helpers::logged(
            &logs,
            "Paused by an operator; applying nothing until resumed, still in the group."
        ),
        "the worker said it holds"
    );
    assert!(offsets(&app).await.is_empty(), "nothing stored while paused");
    assert!(
        app.dump(ReadModel::Catalog).await.is_empty(),
        "nothing applied while paused"
    );

    command(&app, &["resume", "catalog"]);
    app.wait_applied(ReadModel::Catalog, events.len() as i64).await;
    assert!(
        crate::helpers::logged(&logs, "Resumed; going on from the stored offsets."),
        "the same consumer went on, without rejoining"
    );
    assert_eq!(
        sorted(app.dump(ReadModel::Catalog).await),
        sorted(clean_replay(&events).await)
    );
    crate::helpers::signal(&worker, "TERM");
    let _ = worker.0.wait();
}

/// The sum of the catalog's stored offsets.
async fn applied(app: &TestApp) -> i64 {
    applied_to(app, 1).await
}

/// The sum of the stored offsets of the catalog's `generation`.
async fn applied_to(app: &TestApp, generation: u32) -> i64 {
    app.store
        .load_offsets("catalog", generation)
        .await
        .expect("offsets")
        .values()
        .sum()
}

fn fails(app: &TestApp, args: &[&str]) {
    let mut child = app.process(args, &[]);
    let status = child.0.wait().expect("the command ran");
    assert!(!status.success(), "courseview {args:?} must refuse");
}

#[tokio::test]
async fn offsets_moved_to_a_time_while_paused_reapply_from_there_and_resume_equals_a_clean_replay() {
    let app = TestApp::spawn().await;
    let (mut worker, base) = worker(&app);
    let logs = crate::helpers::log_lines(&mut worker);
    let before: Vec<Value> = stream(20);
    let after: Vec<Value> = stream(40).split_off(80);
    app.publish_all(&before).await;
    app.wait_applied(ReadModel::Catalog, before.len() as i64).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let time = chrono::Utc::now().timestamp_millis();
    tokio::time::sleep(Duration::from_millis(50)).await;
    app.publish_all(&after).await;
    let total = (before.len() + after.len()) as i64;
    app.wait_applied(ReadModel::Catalog, total).await;

    fails(&app, &["offsets", "catalog", "--to-time", &time.to_string()]);
    assert_eq!(applied(&app).await, total, "refused while running: nothing moved");
    command(&app, &["pause", "catalog"]);
    held(&app, &base).await;
    command(
        &app,
        &["offsets", "catalog", "--to-time", &time.to_string(), "--dry-run"],
    );
    assert_eq!(applied(&app).await, total, "a dry run changes nothing");
    command(&app, &["offsets", "catalog", "--to-time", &time.to_string()]);
    assert_eq!(
        applied(&app).await,
        before.len() as i64,
        "every partition at its first record after the time"
    );
    command(&app, &["resume", "catalog"]);
    app.wait_applied(ReadModel::Catalog, total).await;
    assert_eq!(
        sorted(app.dump(ReadModel::Catalog).await),
        sorted(clean_replay(&[before, after].concat()).await),
        "re-applied from the time, the read model equals a clean replay"
    );
    // Its paused partitions would have resumed where they stopped: the
    // same consumer moved them to the moved offsets instead (the wait for
    // every event above needs them re-applied from the time).
    assert!(
        crate::helpers::logged(&logs, "Resumed; going on from the stored offsets."),
        "the same consumer went on, without rejoining"
    );
    crate::helpers::signal(&worker, "TERM");
    let _ = worker.0.wait();
}

#[tokio::test]
async fn offsets_moved_forward_report_the_skipped_events_instead_of_losing_them_silently() {
    let app = TestApp::spawn().await;
    command(&app, &["pause", "catalog"]);
    let events = stream(20);
    app.publish_all(&events).await;
    let topic = app.topic("CourseUpdatedEvent");
    let (_, high) = {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &app.brokers)
            .create()
            .expect("consumer");
        consumer
            .fetch_watermarks(&topic, 0, Duration::from_secs(5))
            .expect("watermarks")
    };
    assert!(high > 0, "updates on partition 0 to skip");
    command(
        &app,
        &["offsets", "catalog", "--to-offset", &format!("{topic}:0:{high}")],
    );
    let skipped: Vec<Value> = events_below(&app, &HashMap::from([((topic.clone(), 0), high)]));
    let (mut worker, _) = worker(&app);
    command(&app, &["resume", "catalog"]);
    app.wait_applied(ReadModel::Catalog, events.len() as i64).await;

    let (_, projections) = app.get_json("/projections").await;
    let catalog = projections["projections"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["projection"] == "catalog"))
        .cloned()
        .expect("catalog");
    assert_eq!(
        catalog["state"], "live",
        "a chosen skip does not set the state (a stall would still show): {catalog}"
    );
    let gap = catalog["gaps"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["kind"] == "skipped"))
        .cloned()
        .unwrap_or_else(|| panic!("a skipped range: {catalog}"));
    assert_eq!(
        (gap["topic"].as_str(), gap["partition"].as_i64()),
        (Some(topic.as_str()), Some(0))
    );
    assert_eq!(
        (gap["lowWatermark"].as_i64(), gap["highWatermark"].as_i64()),
        (Some(0), Some(high)),
        "the range: {gap}"
    );
    let ids: Vec<&Value> = skipped.iter().map(|e| &e["eventId"]).collect();
    let kept: Vec<Value> = events
        .iter()
        .filter(|e| !ids.contains(&&e["eventId"]))
        .cloned()
        .collect();
    assert_eq!(
        sorted(app.dump(ReadModel::Catalog).await),
        sorted(clean_replay(&kept).await),
        "everything but the skipped range applied"
    );
    crate::helpers::signal(&worker, "TERM");
    let _ = worker.0.wait();
}

#[tokio::test]
async fn a_rebuild_of_a_paused_projection_switches_and_its_worker_stays_held_in_its_group_until_resumed() {
    let app = TestApp::spawn().await;
    let (mut worker, base) = worker(&app);
    let logs = crate::helpers::log_lines(&mut worker);
    let first = stream(10);
    app.publish_all(&first).await;
    app.wait_applied(ReadModel::Catalog, first.len() as i64).await;
    command(&app, &["pause", "catalog", "--reason", "rebuilding"]);
    held(&app, &base).await;
    command(
        &app,
        &["rebuild", "catalog", "--handover-timeout", "3s", "--grace", "1s"],
    );
    assert_eq!(
        app.store.serving_generation("catalog").await.expect("pointer"),
        2,
        "the rebuild switched"
    );
    // Events after the switch: the held worker, now on generation 2, reads none.
    let later: Vec<Value> = stream(20).split_off(first.len());
    app.publish_all(&later).await;
    group_stable_with(&app, 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        applied_to(&app, 2).await,
        first.len() as i64,
        "the new generation holds what the rebuild applied, no more"
    );
    assert_eq!(
        readyz(&app, &base).await.map(|b| b["status"].clone()),
        Some(json!("paused")),
        "still paused after the switch"
    );

    command(&app, &["resume", "catalog"]);
    let all = [first, later].concat();
    eventually(
        "the resumed worker to apply the rest",
        Duration::from_secs(30),
        || async {
            let stored: i64 = app.store.load_offsets("catalog", 2).await.ok()?.values().sum();
            (stored == all.len() as i64).then_some(())
        },
    )
    .await;
    assert_eq!(
        sorted(app.dump(ReadModel::Catalog).await),
        sorted(clean_replay(&all).await),
        "resumed on the new generation, the read model equals a clean replay"
    );
    assert!(
        crate::helpers::logged(&logs, "Resumed; going on from the stored offsets."),
        "it went on with the consumer it held, not a fresh one"
    );
    crate::helpers::signal(&worker, "TERM");
    let _ = worker.0.wait();
}

#[tokio::test]
async fn partitions_taken_away_during_a_pause_and_given_back_after_the_resume_are_read_again() {
    let app = TestApp::spawn().await;
    let (mut first_worker, base) = worker(&app);
    let before = stream(10);
    app.publish_all(&before).await;
    app.wait_applied(ReadModel::Catalog, before.len() as i64).await;
    command(&app, &["pause", "catalog"]);
    held(&app, &base).await;
    // A second worker joins while paused: the first gives it one partition
    // of each topic (librdkafka keeps those paused on the first's side).
    let (mut second_worker, _) = worker(&app);
    group_stable_with(&app, 2).await;
    command(&app, &["resume", "catalog"]);
    // The second leaves after the resume: its partitions go back to the
    // first, which is no longer holding and must read them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    crate::helpers::signal(&second_worker, "TERM");
    let _ = second_worker.0.wait();
    group_stable_with(&app, 1).await;
    let after: Vec<Value> = stream(30).split_off(before.len());
    app.publish_all(&after).await;
    let all = [before, after].concat();
    app.wait_applied(ReadModel::Catalog, all.len() as i64).await;
    assert_eq!(
        sorted(app.dump(ReadModel::Catalog).await),
        sorted(clean_replay(&all).await),
        "every partition read again, the read model equals a clean replay"
    );
    crate::helpers::signal(&first_worker, "TERM");
    let _ = first_worker.0.wait();
}
