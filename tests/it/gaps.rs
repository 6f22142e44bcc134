//! Gaps are never silent (DESIGN §2): when the log no longer holds what a
//! projection's stored offsets say, because retention or DeleteRecords
//! moved its start past them (a retention gap) or the topic was deleted and
//! re-created below them (a log reset), the worker records it once as a
//! dead letter of its own kind, counts it, shows it on status and readiness,
//! and by default stops that partition. Real broker, real DeleteRecords,
//! real topic deletion, real worker processes.

use std::collections::HashMap;
use std::time::Duration;

use courseview::kafka::GapKind;
use courseview::read_model::ReadModel;
use courseview::rebuild::{rebuild, ProgressSink, RebuildError, RebuildOptions};
use courseview::status::State;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};

use crate::helpers::{event, eventually, parse_prometheus, sum_of, TestApp};
use crate::peers::free_port;

fn admin(app: &TestApp) -> AdminClient<DefaultClientContext> {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &app.brokers)
        .create()
        .expect("admin")
}

/// Deletes `topic` and creates it again (two partitions, empty).
async fn recreate(app: &TestApp, topic: &str) {
    admin(app)
        .delete_topics(&[topic], &AdminOptions::new())
        .await
        .expect("delete")
        .into_iter()
        .for_each(|r| {
            r.expect("deleted");
        });
    eventually("the topic to come back", Duration::from_secs(30), || async {
        courseview::kafka::create_topics(&app.brokers, &[topic.to_owned()], 2)
            .await
            .ok()
    })
    .await;
}

fn watermarks(app: &TestApp, topic: &str) -> Vec<(i64, i64)> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &app.brokers)
        .create()
        .expect("consumer");
    (0..2)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .expect("watermarks")
        })
        .collect()
}

/// DeleteRecords before `before[p]` on each partition `p` of `topic`.
async fn delete_records(app: &TestApp, topic: &str, before: &[i64]) {
    let mut tpl = TopicPartitionList::new();
    for (p, offset) in before.iter().enumerate() {
        tpl.add_partition_offset(topic, i32::try_from(p).expect("partition"), Offset::Offset(*offset))
            .expect("tpl");
    }
    admin(app)
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .expect("records deleted");
}

async fn stored(app: &TestApp, topic: &str) -> HashMap<i32, i64> {
    let generation = app.store.serving_generation("catalog").await.expect("generation");
    app.store
        .load_offsets("catalog", generation)
        .await
        .expect("offsets")
        .into_iter()
        .filter(|((t, _), _)| t == topic)
        .map(|((_, p), o)| (p, o))
        .collect()
}

fn courses(prefix: &str, kind: &str, version: i64, n: std::ops::Range<usize>) -> Vec<Value> {
    n.map(|i| {
        let course = format!("{prefix}{i}");
        let extra = if kind == "CourseCreatedEvent" {
            json!({"name": course, "teacherId": "t1"})
        } else {
            json!({})
        };
        event(kind, &course, version, extra)
    })
    .collect()
}

async fn visible(app: &TestApp, ids: impl Iterator<Item = String>) -> usize {
    let mut n = 0;
    for id in ids {
        if app.get_json(&format!("/catalog/courses/{id}")).await.0 == 200 {
            n += 1;
        }
    }
    n
}

async fn readyz(app: &TestApp, port: u16) -> u16 {
    app.get_raw(&format!("http://127.0.0.1:{port}/readyz")).await
}

struct Quiet;

impl ProgressSink for Quiet {
    fn progress(&mut self, _done: i64, _total: i64) {}
    fn phase(&mut self, _message: &str) {}
}

fn options(allow_partial_history: bool) -> RebuildOptions {
    RebuildOptions {
        allow_partial_history,
        workers_stopped: false,
        accept_dead_letters: false,
        restart: false,
        mode: courseview::rebuild::Mode::BlueGreen,
        catch_up_lag: 0,
        grace: Duration::from_millis(200),
        report_every: Duration::from_millis(50),
        handover_timeout: Duration::from_secs(10),
    }
}

#[tokio::test]
async fn a_retention_gap_is_recorded_once_reported_and_stops_its_partition_until_told_to_continue() {
    let app = TestApp::spawn().await;
    let topic = app.topic("CoursePostedEvent");
    let created = courses("r", "CourseCreatedEvent", 1, 0..30);
    let posted = courses("r", "CoursePostedEvent", 2, 0..30);
    let first = app.start_worker(ReadModel::Catalog);
    app.publish_all(&created).await;
    app.publish_all(&posted[..10]).await;
    app.wait_applied(ReadModel::Catalog, 40).await;
    first.stop().await;
    let before = stored(&app, &topic).await;

    // While no worker runs: more posts arrive, and retention removes the
    // unread ones but the last of each partition.
    app.publish_all(&posted[10..]).await;
    let highs = watermarks(&app, &topic);
    let cut: Vec<i64> = highs.iter().map(|(_, high)| high - 1).collect();
    delete_records(&app, &topic, &cut).await;
    let expected: Vec<(i32, i64, i64)> = (0..2)
        .filter_map(|p| {
            let s = before.get(&p).copied().unwrap_or(0);
            let low = cut[usize::try_from(p).expect("p")];
            (s < low).then_some((p, s, low))
        })
        .collect();
    assert!(
        !expected.is_empty(),
        "the deletion overtook a stored offset: {before:?} {cut:?}"
    );

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let worker = app.worker_process(ReadModel::Catalog, &[("COURSEVIEW_METRICS_LISTEN", listen.as_str())]);
    let status = eventually("the gap to be reported", Duration::from_secs(30), || async {
        let s = app.probe.projection(ReadModel::Catalog).await.ok()?;
        (s.state == State::Gap && s.gaps.len() == expected.len()).then_some(s)
    })
    .await;
    for (p, s, low) in &expected {
        let gap = status
            .gaps
            .iter()
            .find(|g| g.topic == topic && g.partition == *p)
            .expect("a gap per overtaken partition");
        assert_eq!(gap.kind, GapKind::RetentionGap);
        assert_eq!((gap.stored_offset, gap.low_watermark), (*s, *low), "the missing range");
    }
    let (code, body) = app.get_json("/projections").await;
    assert_eq!(code, 200);
    let catalog = body["projections"]
        .as_array()
        .and_then(|all| all.iter().find(|p| p["projection"] == "catalog"))
        .cloned()
        .expect("catalog status");
    assert_eq!(catalog["state"], "gap", "GET /projections says gap: {catalog}");
    assert_eq!(catalog["gaps"][0]["kind"], "retentionGap");
    eventually("the worker to be unready", Duration::from_secs(20), || async {
        (readyz(&app, port).await == 503).then_some(())
    })
    .await;
    let metrics = app.get_text(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert!(
        sum_of(&parse_prometheus(&metrics), "courseview_gaps_total") >= expected.len() as f64,
        "counted: {metrics}"
    );

    // Stopped: the overtaken partitions stay at their stored offsets, and
    // the found gaps are recorded once however often they are found.
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(worker);
    let again = app.worker_process(ReadModel::Catalog, &[]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(again);
    let after = stored(&app, &topic).await;
    for (p, s, _) in &expected {
        assert_eq!(
            after.get(p),
            Some(s),
            "partition {p} is not consumed past a gap under stop"
        );
    }
    let letters = app.store.dead_letters(Some("catalog"), 100).await.expect("letters");
    let gap_letters = letters.iter().filter(|(_, l)| l.gap.is_some()).count();
    assert_eq!(gap_letters, expected.len(), "each gap recorded once: {letters:?}");

    // continue: from the log's start; the gap stays reported.
    let going_on = app.worker_process(ReadModel::Catalog, &[("COURSEVIEW_ON_GAP", "continue")]);
    eventually(
        "the partitions to go on from the log start",
        Duration::from_secs(30),
        || async {
            let now = stored(&app, &topic).await;
            let highs = watermarks(&app, &topic);
            (0..2)
                .all(|p| now.get(&p) == Some(&highs[usize::try_from(p).expect("p")].1))
                .then_some(())
        },
    )
    .await;
    let status = app.probe.projection(ReadModel::Catalog).await.expect("status");
    assert_eq!(status.state, State::Gap, "the gap stays reported until a rebuild");

    // A rebuild refuses a history that does not start at 0, unless told.
    let settings = app.worker_settings(ReadModel::Catalog);
    let cancel = tokio_util::sync::CancellationToken::new();
    let refused = rebuild(
        &settings,
        &app.store,
        app.cache.clone(),
        &app.probe,
        &options(false),
        &mut Quiet,
        &cancel,
    )
    .await;
    match refused {
        Err(RebuildError::PartialHistory(partitions)) => {
            assert!(
                partitions.iter().any(|p| p.starts_with(&topic)),
                "names them: {partitions:?}"
            );
        }
        other => panic!("a rebuild of a partial history must refuse: {other:?}"),
    }
    let r = rebuild(
        &settings,
        &app.store,
        app.cache.clone(),
        &app.probe,
        &options(true),
        &mut Quiet,
        &cancel,
    )
    .await;
    r.expect("rebuild").expect("not interrupted");
    let status = app.probe.projection(ReadModel::Catalog).await.expect("status");
    assert_eq!(status.state, State::Live, "a rebuild clears the gap: {:?}", status.gaps);
    drop(going_on);
}

#[tokio::test]
async fn a_topic_re_created_below_the_stored_offset_is_a_log_reset_and_continue_rewinds_the_checkpoint() {
    let app = TestApp::spawn().await;
    let topic = app.topic("CourseUpdatedEvent");
    let created = courses("z", "CourseCreatedEvent", 1, 0..10);
    let posted = courses("z", "CoursePostedEvent", 2, 0..10);
    let renamed: Vec<Value> = (0..10)
        .map(|i| {
            event(
                "CourseUpdatedEvent",
                &format!("z{i}"),
                3,
                json!({"name": format!("old {i}")}),
            )
        })
        .collect();
    let worker = app.start_worker(ReadModel::Catalog);
    app.publish_all(&created).await;
    app.publish_all(&posted).await;
    app.publish_all(&renamed).await;
    app.publish_all(&renamed).await;
    app.wait_applied(ReadModel::Catalog, 40).await;
    worker.stop().await;
    let before = stored(&app, &topic).await;

    // The topic is deleted and re-created; its new log is shorter than the
    // stored offsets.
    recreate(&app, &topic).await;
    let newer: Vec<Value> = (0..2)
        .map(|i| {
            event(
                "CourseUpdatedEvent",
                &format!("z{i}"),
                4,
                json!({"name": format!("new {i}")}),
            )
        })
        .collect();
    app.publish_all(&newer).await;
    let highs = watermarks(&app, &topic);
    let reset: Vec<i32> = (0..2)
        .filter(|p| before.get(p).copied().unwrap_or(0) > highs[usize::try_from(*p).expect("p")].1)
        .collect();
    assert!(!reset.is_empty(), "stored {before:?} beyond the new log {highs:?}");

    let stopped = app.worker_process(ReadModel::Catalog, &[]);
    let status = eventually("the log reset to be reported", Duration::from_secs(30), || async {
        let s = app.probe.projection(ReadModel::Catalog).await.ok()?;
        (s.state == State::Gap && s.gaps.len() == reset.len()).then_some(s)
    })
    .await;
    assert!(
        status.gaps.iter().all(|g| g.kind == GapKind::LogReset),
        "{:?}",
        status.gaps
    );
    assert!(
        status
            .serving
            .partitions
            .iter()
            .filter(|p| p.topic == topic && reset.contains(&p.partition))
            .all(|p| p.stored_offset > p.high_watermark),
        "status shows the stored offset beyond the log, never clamped: {:?}",
        status.serving
    );
    drop(stopped);
    assert_eq!(
        stored(&app, &topic).await,
        before,
        "stop: the checkpoint stays where it was"
    );

    // continue: the checkpoint goes back to the new log's start (the one
    // explicit rewind), and the new log's events are applied.
    let going_on = app.worker_process(ReadModel::Catalog, &[("COURSEVIEW_ON_GAP", "continue")]);
    served_renamed(&app, "z", 2).await;
    let now = stored(&app, &topic).await;
    for p in &reset {
        assert_eq!(
            now.get(p),
            Some(&highs[usize::try_from(*p).expect("p")].1),
            "partition {p}: the checkpoint follows the new log"
        );
    }
    assert_eq!(
        app.probe.projection(ReadModel::Catalog).await.expect("status").state,
        State::Gap,
        "still reported until a rebuild"
    );
    drop(going_on);
    assert_eq!(visible(&app, (0..10).map(|i| format!("z{i}"))).await, 10);
}

/// A projection that never read a partition starts it at offset 0: a log
/// that no longer starts there is a retention gap too, not a silent start
/// at the log start.
#[tokio::test]
async fn a_partition_never_read_whose_log_no_longer_starts_at_zero_is_a_retention_gap() {
    let app = TestApp::spawn().await;
    let topic = app.topic("CourseCreatedEvent");
    app.publish_all(&courses("n", "CourseCreatedEvent", 1, 0..20)).await;
    let highs = watermarks(&app, &topic);
    let cut: Vec<i64> = highs.iter().map(|(_, high)| high / 2).collect();
    delete_records(&app, &topic, &cut).await;
    let worker = app.start_worker(ReadModel::Catalog);
    let status = eventually("the gap to be reported", Duration::from_secs(30), || async {
        let s = app.probe.projection(ReadModel::Catalog).await.ok()?;
        let found = s.gaps.iter().filter(|g| g.topic == topic).count();
        (s.state == State::Gap && found == cut.iter().filter(|c| **c > 0).count()).then_some(s)
    })
    .await;
    assert!(
        status
            .gaps
            .iter()
            .all(|g| g.kind == GapKind::RetentionGap && g.stored_offset == 0),
        "{:?}",
        status.gaps
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_rebuild_overtaken_by_retention_resumes_with_allow_partial_history_keeping_the_gap_on_record() {
    let app = TestApp::spawn().await;
    let mut events = courses("ov", "CourseCreatedEvent", 1, 0..20);
    events.extend(courses("ov", "CoursePostedEvent", 2, 0..20));
    app.project_all(ReadModel::Catalog, &events).await;

    // Where a rebuild that retention overtook stops: its generation begun,
    // the log's start moved past where it was reading, and the gap its
    // worker found recorded for that generation (as the worker records it).
    let topic = app.topic("CourseCreatedEvent");
    let building = app
        .store
        .begin_rebuild("catalog")
        .await
        .expect("begun")
        .building
        .expect("a generation being built");
    let high = watermarks(&app, &topic)[0].1;
    assert!(high > 3, "records to delete");
    delete_records(&app, &topic, &[3, 0]).await;
    let gap = courseview::kafka::Gap::find(&topic, 0, 0, 3, high).expect("a retention gap");
    app.store
        .record_gap("catalog", building, &gap, false)
        .await
        .expect("recorded");
    let rerun = |allow| {
        let app = &app;
        async move {
            rebuild(
                &app.worker_settings(ReadModel::Catalog),
                &app.store,
                app.cache.clone(),
                &app.probe,
                &options(allow),
                &mut Quiet,
                &tokio_util::sync::CancellationToken::new(),
            )
            .await
        }
    };
    // Without the flag: the history is partial, refused by name.
    assert!(matches!(rerun(false).await, Err(RebuildError::PartialHistory(_))));
    // With the flag its message recommends, the same generation completes.
    let report = rerun(true)
        .await
        .expect("the resumed rebuild goes on past the recorded gap")
        .expect("finished");
    assert_eq!(report.to, building, "the same generation resumed");
    let gaps = app.store.gaps("catalog", building).await.expect("gaps");
    assert_eq!(gaps.len(), 1, "the gap stays on record for the new generation");
    // Served from the new generation: every course but the three whose
    // creation retention removed.
    assert_eq!(visible(&app, (0..20).map(|i| format!("ov{i}"))).await, 17);
}

/// A topic deleted and re-created, then refilled past the stored offsets
/// before the worker comes back, has watermarks that look fine: only its
/// identity (Kafka's topic id) tells the stored offsets belong to a log
/// that is gone. Without the check the worker would start at the stored
/// offset in the new log and skip everything below it without a word.
#[tokio::test]
async fn a_topic_re_created_and_refilled_past_the_stored_offset_is_a_log_reset_by_its_id() {
    let app = TestApp::spawn().await;
    let topic = app.topic("CourseUpdatedEvent");
    let created = courses("r", "CourseCreatedEvent", 1, 0..10);
    let posted = courses("r", "CoursePostedEvent", 2, 0..10);
    let renamed = |version: i64, name: &str| -> Vec<Value> {
        (0..10)
            .map(|i| {
                event(
                    "CourseUpdatedEvent",
                    &format!("r{i}"),
                    version,
                    json!({"name": format!("{name} {i}")}),
                )
            })
            .collect()
    };
    let worker = app.start_worker(ReadModel::Catalog);
    app.publish_all(&created).await;
    app.publish_all(&posted).await;
    app.publish_all(&renamed(3, "old")).await;
    app.publish_all(&renamed(4, "old")).await;
    app.wait_applied(ReadModel::Catalog, 40).await;
    worker.stop().await;
    let before = stored(&app, &topic).await;

    recreate(&app, &topic).await;
    // Twelve events per course in the new log: every partition now holds
    // at least ten more than its stored offset.
    for version in 5..17 {
        app.publish_all(&renamed(version, "new")).await;
    }
    let highs = watermarks(&app, &topic);
    for (p, at) in &before {
        assert!(
            highs[usize::try_from(*p).expect("p")].1 >= at + 10,
            "partition {p}: the new log ({highs:?}) holds more than the stored offset {at}"
        );
    }

    let stopped = app.worker_process(ReadModel::Catalog, &[]);
    let status = eventually("the log reset to be reported", Duration::from_secs(30), || async {
        let s = app.probe.projection(ReadModel::Catalog).await.ok()?;
        let resets = s
            .gaps
            .iter()
            .filter(|g| g.topic == topic && g.kind == GapKind::LogReset)
            .count();
        (s.state == State::Gap && resets == before.len()).then_some(s)
    })
    .await;
    let letters = app.store.dead_letters(Some("catalog"), 100).await.expect("letters");
    assert_eq!(
        letters
            .iter()
            .filter(|(_, l)| l.gap.as_ref().is_some_and(|g| g.kind == GapKind::LogReset))
            .count(),
        before.len(),
        "one log_reset letter per partition read before: {:?}",
        status.gaps
    );
    drop(stopped);
    assert_eq!(
        stored(&app, &topic).await,
        before,
        "stop: nothing of the new log was taken for the old one"
    );

    // continue: the new log is read from its start.
    let going_on = app.worker_process(ReadModel::Catalog, &[("COURSEVIEW_ON_GAP", "continue")]);
    served_renamed(&app, "r", 10).await;
    drop(going_on);
}

/// librdkafka keeps a running consumer's position when its topic is
/// deleted and re-created, and fetches on from there once the new log is
/// long enough: the reader compares topic ids now and then, and a change
/// rejoins the group, where the log reset is found and recorded. The
/// worker is frozen (SIGSTOP, shorter than its session) while the topic is
/// re-created and refilled, so its consumer meets the new log only once it
/// is already past the old position.
#[tokio::test]
async fn a_topic_re_created_and_refilled_under_a_running_worker_is_a_log_reset() {
    let app = TestApp::spawn().await;
    let topic = app.topic("CourseUpdatedEvent");
    let renamed = |version: i64, name: &str| -> Vec<Value> {
        (0..10)
            .map(|i| {
                event(
                    "CourseUpdatedEvent",
                    &format!("u{i}"),
                    version,
                    json!({"name": format!("{name} {i}")}),
                )
            })
            .collect()
    };
    let worker = app.worker_process(ReadModel::Catalog, &[("COURSEVIEW_SESSION_TIMEOUT", "30s")]);
    app.publish_all(&courses("u", "CourseCreatedEvent", 1, 0..10)).await;
    app.publish_all(&courses("u", "CoursePostedEvent", 2, 0..10)).await;
    app.publish_all(&renamed(3, "old")).await;
    app.publish_all(&renamed(4, "old")).await;
    app.wait_applied(ReadModel::Catalog, 40).await;
    let before = stored(&app, &topic).await;

    crate::helpers::signal(&worker, "STOP");
    recreate(&app, &topic).await;
    for version in 5..17 {
        app.publish_all(&renamed(version, "new")).await;
    }
    crate::helpers::signal(&worker, "CONT");
    let status = eventually("the log reset to be reported", Duration::from_secs(60), || async {
        let s = app.probe.projection(ReadModel::Catalog).await.ok()?;
        let resets = s
            .gaps
            .iter()
            .filter(|g| g.topic == topic && g.kind == GapKind::LogReset)
            .count();
        (s.state == State::Gap && resets >= 1).then_some(s)
    })
    .await;
    assert!(
        status.gaps.iter().all(|g| g.topic == topic),
        "only the re-created topic: {:?} (stored before: {before:?})",
        status.gaps
    );
    drop(worker);
}

/// Waits until courses `<prefix>0..n` are served under the names the new
/// log gave them ("new <i>").
async fn served_renamed(app: &TestApp, prefix: &str, n: usize) {
    eventually(
        "the new log's events to be applied",
        Duration::from_secs(30),
        || async {
            for i in 0..n {
                let (_, body) = app.get_json(&format!("/catalog/courses/{prefix}{i}")).await;
                if body["name"] != format!("new {i}") {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
}
