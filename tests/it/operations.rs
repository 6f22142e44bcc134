//! Operating projections: rebuild without downtime, scaled-out worker
//! processes, stall detection, metrics.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courseview::read_model::ReadModel;
use courseview::rebuild::{rebuild, ProgressSink, RebuildOptions, RebuildReport};
use serde_json::{json, Value};

use crate::helpers::{clean_replay, eventually, parse_prometheus, sum_of, Options, Reaped, TestApp};
use crate::pipeline::big_history;

#[derive(Default)]
struct Recorder {
    updates: Vec<(i64, i64)>,
    phases: Vec<String>,
}

impl ProgressSink for Recorder {
    fn progress(&mut self, done: i64, total: i64) {
        self.updates.push((done, total));
    }
    fn phase(&mut self, message: &str) {
        self.phases.push(message.to_owned());
    }
}

#[tokio::test]
async fn rebuild_under_load_serves_only_complete_generations_and_equals_a_clean_replay() {
    let initial = big_history("a", 150);
    let extra = big_history("b", 60);
    let app = TestApp::spawn().await;
    let live = app.start_worker(ReadModel::Catalog);
    app.publish_all(&initial).await;
    app.wait_applied(ReadModel::Catalog, initial.len() as i64).await;
    // Courses a0001.. of teacher t1 that must be in every answer from now on.
    let (_, before) = app.get_json("/catalog/courses?teacherId=t1&limit=100").await;
    let expected: HashSet<String> = before["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|c| c["id"].as_str().expect("id").to_owned())
        .collect();
    assert!(expected.len() > 10);

    // Readers hammer the API for the whole rebuild.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (http, base, stop, expected) = (
            app.http.clone(),
            app.base_url.clone(),
            Arc::clone(&stop),
            expected.clone(),
        );
        tokio::spawn(async move {
            let mut answers = 0;
            while !stop.load(Ordering::Relaxed) {
                let body: Value = http
                    .get(format!("{base}/catalog/courses?teacherId=t1&limit=100"))
                    .send()
                    .await
                    .expect("request")
                    .json()
                    .await
                    .expect("json");
                let ids: HashSet<String> = body["items"]
                    .as_array()
                    .expect("items")
                    .iter()
                    .map(|c| c["id"].as_str().expect("id").to_owned())
                    .collect();
                let missing: Vec<_> = expected.difference(&ids).collect();
                assert!(
                    missing.is_empty(),
                    "an answer during the rebuild lacked {missing:?}: half-built generation"
                );
                let one = http
                    .get(format!("{base}/catalog/courses/a0001"))
                    .send()
                    .await
                    .expect("request");
                assert_eq!(one.status().as_u16(), 200, "a0001 served throughout");
                answers += 1;
            }
            answers
        })
    };
    // Writers keep producing during the rebuild.
    let writer = {
        let (producer, extra, prefix) = (app.producer.clone(), extra.clone(), app.id.clone());
        tokio::spawn(async move {
            for e in &extra {
                let topic = format!("{prefix}.{}", e["eventType"].as_str().expect("type"));
                let record = courseview::kafka::Outgoing {
                    topic,
                    key: e["courseId"].as_str().map(str::to_owned),
                    value: Some(e.to_string()),
                    ..courseview::kafka::Outgoing::default()
                };
                producer.send(&record).await.expect("produce");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let options = RebuildOptions {
        allow_partial_history: false,
        workers_stopped: false,
        accept_dead_letters: false,
        restart: false,
        mode: courseview::rebuild::Mode::BlueGreen,
        catch_up_lag: 20,
        grace: Duration::from_secs(1),
        report_every: Duration::from_millis(100),
        handover_timeout: Duration::from_secs(5),
    };
    let mut recorder = Recorder::default();
    let settings = app.worker_settings(ReadModel::Catalog);
    let cancel = tokio_util::sync::CancellationToken::new();
    let report = rebuild(
        &settings,
        &app.store,
        app.cache.clone(),
        &app.probe,
        &options,
        &mut recorder,
        &cancel,
    )
    .await
    .expect("rebuild")
    .expect("not interrupted");
    assert_eq!((report.from, report.to), (1, 2));
    assert!(!recorder.updates.is_empty(), "progress was reported");
    assert!(recorder.updates.iter().all(|(done, total)| done <= total));

    writer.await.expect("writer");
    stop.store(true, Ordering::Relaxed);
    let answers = reader.await.expect("every answer during the rebuild was complete");
    assert!(answers > 0);

    // The live worker followed the pointer and catches up in generation 2.
    let all: Vec<Value> = initial.iter().chain(extra.iter()).cloned().collect();
    app.wait_applied(ReadModel::Catalog, all.len() as i64).await;
    live.stop().await;
    assert_eq!(app.store.serving_generation("catalog").await.expect("pointer"), 2);
    assert_eq!(app.dump(ReadModel::Catalog).await, clean_replay(&all).await);
    let collections = app.store.collection_names().await.expect("collections");
    assert!(
        !collections.contains(&"catalog_g1".to_owned()),
        "old generation dropped: {collections:?}"
    );
    assert!(collections.contains(&"catalog_g2".to_owned()));
}

/// A `courseview project catalog` process of this app on a known metrics port.
fn spawn_worker_process(app: &TestApp) -> (Reaped, u16) {
    let port = crate::peers::free_port();
    let listen = format!("127.0.0.1:{port}");
    (
        app.worker_process(ReadModel::Catalog, &[("COURSEVIEW_METRICS_LISTEN", listen.as_str())]),
        port,
    )
}

/// Partition counts this process logged at each assignment.
fn watch_assignments(child: &mut Reaped) -> impl Fn() -> Vec<i64> {
    let logs = crate::helpers::log_lines(child);
    move || {
        logs.lock()
            .map(|all| {
                all.iter()
                    .filter(|v| v["message"] == "Partitions assigned at stored offsets.")
                    .filter_map(|v| v["partitions"].as_i64())
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[tokio::test]
async fn two_worker_processes_split_partitions_and_a_killed_one_loses_nothing() {
    let events = big_history("w", 250);
    let app = TestApp::spawn().await;
    let (mut first, _) = spawn_worker_process(&app);
    let first_log = watch_assignments(&mut first);
    let (mut second, second_port) = spawn_worker_process(&app);
    let second_log = watch_assignments(&mut second);
    let total_partitions = 12; // six topics of two partitions

    // Both processes hold a share of the partitions before any event flows.
    eventually("the group to split the partitions", Duration::from_secs(60), || async {
        let a = first_log().last().copied()?;
        let b = second_log().last().copied()?;
        (a > 0 && b > 0 && a + b == total_partitions).then_some(())
    })
    .await;

    let half = events.len() / 2;
    app.publish_all(&events[..half]).await;
    eventually("some progress", Duration::from_secs(60), || async {
        let offsets = app.store.load_offsets("catalog", 1).await.ok()?;
        (offsets.values().sum::<i64>() > 20).then_some(())
    })
    .await;
    first.kill().expect("kill -9 the first worker");
    let _ = first.wait();
    app.publish_all(&events[half..]).await;
    // The survivor takes every partition over after the session timeout.
    app.wait_applied(ReadModel::Catalog, events.len() as i64).await;
    assert_eq!(second_log().last().copied(), Some(total_partitions));

    let ready = app
        .http
        .get(format!("http://127.0.0.1:{second_port}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 200);
    let text = app.get_text(&format!("http://127.0.0.1:{second_port}/metrics")).await;
    assert!(
        text.contains("courseview_events_applied_total{projection=\"catalog\""),
        "worker metrics: {text}"
    );
    assert!(
        text.contains("courseview_consumer_lag_events{"),
        "lag gauges per partition"
    );

    let _ = second.kill();
    let _ = second.wait();
    assert_eq!(app.dump(ReadModel::Catalog).await, clean_replay(&events).await);
}

#[tokio::test]
async fn a_projection_with_a_backlog_and_no_progress_is_reported_stalled() {
    let app = TestApp::with(Options {
        stall_after: Duration::from_secs(1),
        ..Options::default()
    })
    .await;
    for v in 1..=3 {
        let e = crate::helpers::event(
            "CourseCreatedEvent",
            &format!("s{v}"),
            1,
            json!({"name": "n", "teacherId": "t"}),
        );
        app.publish(&e).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The age of the oldest pending event is looked up within a short
    // budget; a loaded machine may miss it once, never for long (the
    // probe remembers it).
    let body = eventually("the projection reported stalled", Duration::from_secs(10), || async {
        let (status, body) = app.get_json("/projections").await;
        assert_eq!(status, 200);
        (body["projections"][0]["state"] == "stalled").then_some(body)
    })
    .await;
    let catalog = &body["projections"][0];
    assert_eq!(catalog["projection"], "catalog");
    assert_eq!(catalog["lagEvents"], 3);
    let lagging: Vec<&Value> = catalog["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .filter(|p| p["lagEvents"].as_i64() > Some(0))
        .collect();
    assert!(
        lagging
            .iter()
            .all(|p| p["stalled"] == true && p["lagSeconds"].as_f64() >= Some(1.0)),
        "{lagging:?}"
    );

    // Once a worker applies the backlog the projection is live again.
    let worker = app.start_worker(ReadModel::Catalog);
    app.wait_applied(ReadModel::Catalog, 3).await;
    worker.stop().await;
    let (_, body) = app.get_json("/projections").await;
    assert_eq!(
        (
            body["projections"][0]["state"].as_str(),
            body["projections"][0]["lagEvents"].as_i64()
        ),
        (Some("live"), Some(0))
    );
    let partition = &body["projections"][0]["partitions"][0];
    for field in [
        "topic",
        "partition",
        "storedOffset",
        "highWatermark",
        "lagEvents",
        "lagSeconds",
    ] {
        assert!(!partition[field].is_null(), "{field} in {partition}");
    }
}

#[tokio::test]
async fn a_worker_that_cannot_measure_or_make_progress_is_not_ready() {
    let app = TestApp::spawn().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_courseview"))
        .args([
            "project",
            "catalog",
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
            "--status-interval",
            "200ms",
        ])
        .env("MONGODB_URI", "mongodb://127.0.0.1:1")
        .env("MONGODB_TIMEOUT", "200ms")
        .env("COURSEVIEW_TOPICS", app.topics_regex())
        .stderr(Stdio::null())
        .spawn()
        .expect("worker starts");
    let mut child = Reaped(child);
    let (status, body) = eventually("the worker's readyz to answer", Duration::from_secs(20), || async {
        let r = app
            .http
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .ok()?;
        Some((r.status().as_u16(), r.json::<Value>().await.ok()?))
    })
    .await;
    let health = app
        .http
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .expect("healthz");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["stalledOrUnmeasured"], json!(["catalog"]));
    assert_eq!(health.status().as_u16(), 200);
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_counters_move_with_events() {
    let app = TestApp::spawn().await;
    let applied = r#"courseview_events_applied_total{projection="catalog",type="CourseCreatedEvent"}"#;
    let before = parse_prometheus(&app.get("/metrics").await.text().await.expect("text"));
    let worker = app.start_worker(ReadModel::Catalog);
    for i in 0..5 {
        let e = crate::helpers::event(
            "CourseCreatedEvent",
            &format!("m{i}"),
            1,
            json!({"name": "n", "teacherId": "t"}),
        );
        app.publish(&e).await;
    }
    app.wait_applied(ReadModel::Catalog, 5).await;
    worker.stop().await;
    app.get("/catalog/courses/m1").await;
    let response = app.get("/metrics").await;
    assert!(response.headers()["content-type"]
        .to_str()
        .expect("type")
        .starts_with("text/plain"));
    let after = parse_prometheus(&response.text().await.expect("text"));
    assert!(
        sum_of(&after, applied) - sum_of(&before, applied) >= 5.0,
        "applied counter moved by the 5 events"
    );
    for family in [
        "courseview_batch_seconds_bucket",
        "courseview_batch_size_bucket",
        "courseview_http_requests_total",
        "courseview_http_request_seconds_bucket",
        "courseview_cache_lookups_total",
    ] {
        assert!(after.iter().any(|(k, _)| k.starts_with(family)), "{family} exported");
    }
    assert!(
        after
            .iter()
            .any(|(k, _)| k.contains(r#"route="/catalog/courses/{courseId}""#)),
        "HTTP metrics use the route template, never a course id"
    );
}

/// Cancels the rebuild at its first progress report.
/// Rebuild options for a small corpus: switch at zero lag, short grace.
fn quick(in_place: bool) -> RebuildOptions {
    RebuildOptions {
        allow_partial_history: false,
        workers_stopped: false,
        accept_dead_letters: false,
        restart: false,
        mode: if in_place {
            courseview::rebuild::Mode::InPlace
        } else {
            courseview::rebuild::Mode::BlueGreen
        },
        catch_up_lag: 0,
        grace: Duration::from_millis(200),
        report_every: Duration::from_millis(50),
        handover_timeout: Duration::from_secs(5),
    }
}

/// Runs a catalog rebuild of `app` to its end, reporting to `sink`.
async fn rebuild_to_end(app: &TestApp, options: &RebuildOptions, sink: &mut dyn ProgressSink) -> RebuildReport {
    rebuild(
        &app.worker_settings(ReadModel::Catalog),
        &app.store,
        app.cache.clone(),
        &app.probe,
        options,
        sink,
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("rebuild runs")
    .expect("rebuild finishes")
}

struct CancelOnProgress(tokio_util::sync::CancellationToken);

impl ProgressSink for CancelOnProgress {
    fn progress(&mut self, _done: i64, _total: i64) {
        self.0.cancel();
    }
    fn phase(&mut self, _message: &str) {}
}

#[tokio::test]
async fn an_interrupted_rebuild_resumes_its_generation_and_never_touches_the_serving_one() {
    let events = big_history("i", 100);
    let app = TestApp::spawn().await;
    let live = app.start_worker(ReadModel::Catalog);
    app.publish_all(&events).await;
    app.wait_applied(ReadModel::Catalog, events.len() as i64).await;
    let serving_before = app.dump(ReadModel::Catalog).await;

    let settings = app.worker_settings(ReadModel::Catalog);
    let options = quick(false);
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut interrupter = CancelOnProgress(cancel.clone());
    let first = rebuild(
        &settings,
        &app.store,
        app.cache.clone(),
        &app.probe,
        &options,
        &mut interrupter,
        &cancel,
    )
    .await
    .expect("interrupted cleanly");
    assert_eq!(first, None, "interrupted");
    let pointer = app.store.pointer("catalog").await.expect("pointer");
    assert_eq!(
        (pointer.generation, pointer.building),
        (1, Some(2)),
        "serving untouched, generation 2 pending"
    );
    assert_eq!(
        app.dump(ReadModel::Catalog).await,
        serving_before,
        "the serving generation is unchanged"
    );
    assert_eq!(app.get_json("/catalog/courses/i0001").await.0, 200);

    let mut recorder = Recorder::default();
    let report = rebuild_to_end(&app, &options, &mut recorder).await;
    assert_eq!((report.from, report.to), (1, 2), "the same generation was resumed");
    app.wait_applied(ReadModel::Catalog, events.len() as i64).await;
    live.stop().await;
    assert_eq!(
        app.dump(ReadModel::Catalog).await,
        serving_before,
        "the rebuilt generation equals the old one"
    );
}

#[tokio::test]
async fn an_in_place_rebuild_is_refused_while_a_live_worker_is_registered_naming_it() {
    let events = big_history("ip", 20);
    let app = TestApp::spawn().await;
    let worker = app.worker_process(ReadModel::Catalog, &[]);
    app.publish_all(&events).await;
    eventually("every event applied", Duration::from_secs(60), || async {
        let status = app.probe.projection(ReadModel::Catalog).await.ok()?;
        (status.serving.lag_events == 0 && status.serving.partitions.iter().any(|p| p.stored_offset > 0)).then_some(())
    })
    .await;
    let live = eventually("the worker registered", Duration::from_secs(30), || async {
        let live = app.store.live_workers(Some("catalog")).await.ok()?;
        (!live.is_empty()).then_some(live)
    })
    .await;
    let before = app.dump(ReadModel::Catalog).await;

    let refused = rebuild(
        &app.worker_settings(ReadModel::Catalog),
        &app.store,
        app.cache.clone(),
        &app.probe,
        &quick(true),
        &mut Recorder::default(),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect_err("refused while a live worker runs");
    let message = refused.to_string();
    assert!(
        matches!(refused, courseview::rebuild::RebuildError::LiveWorkers { .. }) && message.contains(&live[0].id),
        "names the worker: {message}"
    );
    assert_eq!(app.dump(ReadModel::Catalog).await, before, "nothing was dropped");

    // Stopped, it runs (its entry leaves the registry on a graceful stop).
    crate::helpers::signal(&worker, "TERM");
    app.no_live_workers(ReadModel::Catalog).await;
    let report = rebuild_to_end(&app, &quick(true), &mut Recorder::default()).await;
    assert_eq!(report.events, events.len() as i64, "every event replayed");
    assert_eq!(app.dump(ReadModel::Catalog).await, before);
}

#[tokio::test]
async fn an_in_place_rebuild_replays_the_serving_generation_from_zero() {
    let events = big_history("p", 80);
    let app = TestApp::spawn().await;
    app.project_all(ReadModel::Catalog, &events).await;
    let before = app.dump(ReadModel::Catalog).await;

    let options = quick(true);
    let mut recorder = Recorder::default();
    let report = rebuild_to_end(&app, &options, &mut recorder).await;
    assert_eq!((report.from, report.to), (1, 1), "same generation, replayed in place");
    assert_eq!(report.events, events.len() as i64, "every event replayed");
    assert!(
        recorder.phases.iter().any(|p| p.contains("dropping generation 1")),
        "the drop is announced: {:?}",
        recorder.phases
    );
    let pointer = app.store.pointer("catalog").await.expect("pointer");
    assert_eq!((pointer.generation, pointer.building), (1, None));
    assert_eq!(
        app.dump(ReadModel::Catalog).await,
        before,
        "the replay equals the original"
    );
}

#[tokio::test]
async fn a_rebuild_hands_over_to_an_idle_live_worker_as_soon_as_it_follows_not_at_the_timeout() {
    let app = TestApp::spawn().await;
    let (_live, _) = spawn_worker_process(&app);
    let events = big_history("idle", 20);
    app.publish_all(&events).await;
    app.wait_applied(ReadModel::Catalog, events.len() as i64).await;
    // Nothing arrives from here on: the live worker, once it follows the
    // switch, has no record to apply.
    let options = RebuildOptions {
        allow_partial_history: false,
        workers_stopped: false,
        accept_dead_letters: false,
        restart: false,
        mode: courseview::rebuild::Mode::BlueGreen,
        catch_up_lag: 20,
        grace: Duration::from_millis(100),
        report_every: Duration::from_millis(100),
        handover_timeout: Duration::from_secs(20),
    };
    let report = rebuild(
        &app.worker_settings(ReadModel::Catalog),
        &app.store,
        app.cache.clone(),
        &app.probe,
        &options,
        &mut Recorder::default(),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("rebuild")
    .expect("not interrupted");
    assert_eq!(
        report.followed,
        Some(courseview::rebuild::Followed::All),
        "the idle live worker was seen to follow the switch"
    );
}

/// Index names of `collection` in `app`'s database (empty while it does not exist).
async fn index_names(db: &mongodb::Database, collection: &str) -> Vec<String> {
    db.collection::<bson::Document>(collection)
        .list_index_names()
        .await
        .unwrap_or_default()
}

#[tokio::test]
async fn a_rebuild_replays_without_query_indexes_and_builds_them_before_readers_switch() {
    let events = big_history("ix", 600);
    let app = TestApp::spawn().await;
    app.project_all(ReadModel::Catalog, &events).await;
    let wanted = 1 + courseview::mongo::Store::index_keys(ReadModel::Catalog).len();
    let client = mongodb::Client::with_uri_str(&app.mongodb_uri).await.expect("client");
    let db = client.database(app.store.database_name());
    let building = courseview::mongo::Store::collection_name("catalog", 2);

    // Watch the new generation while the rebuild runs: how many indexes it
    // had while it held documents and readers were still on generation 1,
    // and at the first sight of the switch.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn({
        let (db, store, done, building) = (db.clone(), app.store.clone(), Arc::clone(&done), building.clone());
        async move {
            let (mut while_building, mut at_switch) = (Vec::new(), None);
            while !done.load(Ordering::Acquire) && at_switch.is_none() {
                let indexes = index_names(&db, &building).await.len();
                let documents = db
                    .collection::<bson::Document>(&building)
                    .estimated_document_count()
                    .await
                    .unwrap_or(0);
                match store.serving_generation("catalog").await {
                    Ok(2) => at_switch = Some(index_names(&db, &building).await.len()),
                    Ok(_) if documents > 0 => while_building.push(indexes),
                    _ => {}
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (while_building, at_switch)
        }
    });
    let report = rebuild_to_end(&app, &quick(false), &mut Recorder::default()).await;
    done.store(true, Ordering::Release);
    let (while_building, at_switch) = watcher.await.expect("watcher");
    assert_eq!((report.from, report.to), (1, 2));
    assert!(
        while_building.first() == Some(&1),
        "the replay writes with only the _id index (indexes seen while building: {while_building:?})"
    );
    let at_switch = match at_switch {
        Some(n) => n,
        None => index_names(&db, &building).await.len(),
    };
    assert_eq!(
        at_switch, wanted,
        "readers switch to a generation that has every query index"
    );
}

/// A rebuild whose worker dead-letters a record the serving generation
/// applied (here a lower `--max-record-bytes`) would make that course
/// regress at the switch: it stops before switching, naming the letter,
/// unless the operator accepts it.
#[tokio::test]
async fn a_rebuild_that_dead_letters_what_the_serving_generation_applied_stops_before_the_switch() {
    let app = TestApp::spawn().await;
    let live = app.start_worker(ReadModel::Catalog);
    let events = big_history("reg", 20);
    app.publish_all(&events).await;
    // 600 KiB: under the live worker's limit (1 MiB), over the rebuild's.
    app.publish(&crate::helpers::event(
        "CourseCreatedEvent",
        "reg-big",
        1,
        json!({"name": "big", "teacherId": "t", "description": "y".repeat(600 * 1024)}),
    ))
    .await;
    app.publish(&crate::helpers::event("CoursePostedEvent", "reg-big", 2, json!({})))
        .await;
    app.wait_applied(ReadModel::Catalog, events.len() as i64 + 2).await;
    assert_eq!(app.get_json("/catalog/courses/reg-big").await.0, 200, "served before");

    let mut settings = app.worker_settings(ReadModel::Catalog);
    settings.max_record_bytes = 500_000;
    let run = |settings: courseview::worker::WorkerSettings, options: RebuildOptions| {
        let app = &app;
        async move {
            rebuild(
                &settings,
                &app.store,
                app.cache.clone(),
                &app.probe,
                &options,
                &mut Recorder::default(),
                &tokio_util::sync::CancellationToken::new(),
            )
            .await
        }
    };
    let refused = run(settings.clone(), quick(false))
        .await
        .expect_err("stops before the switch");
    let message = refused.to_string();
    assert!(
        matches!(refused, courseview::rebuild::RebuildError::DeadLettered { .. })
            && message.contains("generation 2")
            && message.contains("--accept-dead-letters"),
        "names what the new generation dead-lettered: {message}"
    );
    let pointer = app.store.pointer("catalog").await.expect("pointer");
    assert_eq!(
        (pointer.generation, pointer.building),
        (1, Some(2)),
        "nothing was switched"
    );
    assert_eq!(app.get_json("/catalog/courses/reg-big").await.0, 200, "still served");

    // With the limit as it was, --restart drops generation 2 and replays anew.
    let mut restart = quick(false);
    restart.restart = true;
    let report = run(app.worker_settings(ReadModel::Catalog), restart)
        .await
        .expect("runs")
        .expect("finishes");
    assert_eq!((report.from, report.to), (1, 3), "replayed into a fresh generation");
    assert_eq!(app.get_json("/catalog/courses/reg-big").await.0, 200);

    // Refused again against generation 3; accepted, it switches and the
    // letter stays on record for generation 4.
    let refused = run(settings.clone(), quick(false)).await.expect_err("refused again");
    assert!(refused.to_string().contains("generation 4"), "{refused}");
    let mut accepting = quick(false);
    accepting.accept_dead_letters = true;
    let report = run(settings.clone(), accepting).await.expect("runs").expect("finishes");
    assert_eq!((report.from, report.to), (3, 4));
    let letters = app.store.dead_letters(Some("catalog"), 100).await.expect("letters");
    let ids: Vec<&String> = letters.iter().map(|(id, _)| id).collect();
    assert!(
        letters
            .iter()
            .any(|(_, l)| l.generation == Some(4) && l.truncated_from.is_some()),
        "the oversized record is a dead letter of generation 4: {ids:?}"
    );
    assert!(
        letters.iter().any(|(_, l)| l.generation == Some(2)),
        "the dropped generation's letter stays (it may be the only copy of a record): {ids:?}"
    );
    live.stop().await;
}
