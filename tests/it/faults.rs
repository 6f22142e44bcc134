//! One test per way of losing, double-applying or regressing that was found
//! at the edges (issue "Nothing lost, nothing regressed"). Each injects its
//! fault for real: bytes a producer really sends, a server really stopped,
//! a real signal to a real process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courseview::cli::dlq::{self, DlqCommand, DlqFilter, ReplayArgs};
use courseview::kafka::{create_topics, ByteBudget, Consumer, ConsumerSettings, OffsetSource, Outgoing, ReaderExit};
use courseview::read_model::ReadModel;
use courseview::worker::Applier;
use rdkafka::consumer::{CommitMode, Consumer as _};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::helpers::{
    brokers, clean_replay, event, eventually, log_lines, logged, parse_prometheus, signal, sum_of, unique, Options,
    TestApp,
};
use crate::peers::{free_port, silent_listener, PrivateMongo, PrivateRedis};
use crate::pipeline::big_history;

#[tokio::test]
async fn a_record_with_a_non_utf8_header_key_is_dead_lettered_raw_and_the_worker_goes_on() {
    let app = TestApp::spawn().await;
    let worker = app.start_worker(ReadModel::Catalog);
    let created = event(
        "CourseCreatedEvent",
        "h1",
        1,
        json!({"name": "Headers", "teacherId": "t"}),
    );
    app.send(Outgoing {
        topic: app.topic("CourseCreatedEvent"),
        key: Some("h0".into()),
        value: Some(event("CourseCreatedEvent", "h0", 1, json!({"name": "Bad header"})).to_string()),
        raw_headers: vec![(vec![0xff, 0xfe, b'k'], b"v".to_vec())],
        ..Outgoing::default()
    })
    .await;
    app.publish(&created).await;
    app.publish(&event("CoursePostedEvent", "h1", 2, json!({}))).await;
    app.wait_applied(ReadModel::Catalog, 3).await;

    assert_eq!(app.get_json("/catalog/courses/h1").await.0, 200, "later events applied");
    let letters = app.store.dead_letters(Some("catalog"), 10).await.expect("letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0].1;
    assert_eq!(
        letter.headers[0].key,
        vec![0xff, 0xfe, b'k'],
        "the raw key bytes are kept"
    );
    assert!(letter.error.contains("not valid UTF-8"), "{}", letter.error);
    assert!(!worker.task.is_finished(), "the worker is still running");
    worker.stop().await;
}

/// Stored offsets that cannot be read for the first `failures` calls.
struct FlakyOffsets {
    calls: AtomicUsize,
    failures: usize,
    offsets: HashMap<(String, i32), i64>,
}

impl OffsetSource for FlakyOffsets {
    fn stored_offsets(&self) -> Result<HashMap<(String, i32), i64>, courseview::kafka::OffsetsUnavailable> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
            Err(courseview::kafka::OffsetsUnavailable {
                reason: "MongoDB unreachable (injected)".into(),
                retry: true,
            })
        } else {
            Ok(self.offsets.clone())
        }
    }

    fn record_gap(
        &self,
        gap: &courseview::kafka::Gap,
        _: courseview::kafka::OnGap,
    ) -> Result<(), courseview::kafka::OffsetsUnavailable> {
        panic!("no gap in this test: {gap:?}")
    }
}

/// A consumer of `topic` alone, in a group of its own named from `prefix`,
/// that stops at a gap.
fn reader_settings(topic: &str, prefix: &str) -> ConsumerSettings {
    ConsumerSettings {
        brokers: brokers().into(),
        topics: topic.to_owned(),
        group_id: unique(prefix),
        metadata_refresh: Duration::from_secs(1),
        session_timeout: Duration::from_secs(6),
        on_gap: courseview::kafka::OnGap::Stop,
        stuck: std::sync::Arc::default(),
    }
}

#[tokio::test]
async fn partitions_whose_stored_offsets_cannot_be_read_are_not_started_at_the_group_offsets() {
    let app = TestApp::spawn().await;
    let topic = unique("assign.");
    create_topics(&brokers(), std::slice::from_ref(&topic), 1)
        .await
        .expect("topic");
    for i in 0..10 {
        app.send(Outgoing {
            topic: topic.clone(),
            key: Some(format!("k{i}")),
            value: Some(format!("{i}")),
            ..Outgoing::default()
        })
        .await;
    }
    let settings = reader_settings(&topic, "assign-");
    // The group's committed offset is ahead of the stored one, as after a
    // rebuild switch (it belongs to the previous generation).
    let committer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", &settings.group_id)
        .create()
        .expect("committer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Offset(8))
        .expect("tpl");
    committer.commit(&tpl, CommitMode::Sync).expect("commit");
    let stored = HashMap::from([((topic.clone(), 0), 3_i64)]);

    let read_with = |failures: usize| {
        let source = Arc::new(FlakyOffsets {
            calls: AtomicUsize::new(0),
            failures,
            offsets: stored.clone(),
        });
        let consumer = Consumer::subscribe(&settings, source, Default::default()).expect("consumer");
        let (tx, rx) = tokio::sync::mpsc::channel(100);
        // A reader that never gives up is stopped after 30 s, so the test
        // fails on its exit reason instead of hanging.
        let cancel = CancellationToken::new();
        let timer = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            timer.cancel();
        });
        let reader = consumer.spawn_reader(tx, ByteBudget::new(1 << 20), courseview::kafka::READ_CHUNK, cancel);
        (consumer, reader, rx)
    };

    // Unreadable for longer than an assignment may wait: nothing is read.
    let (consumer, reader, mut rx) = read_with(usize::MAX);
    let exit = tokio::task::spawn_blocking(move || reader.join().expect("reader ran"))
        .await
        .expect("joined");
    assert!(matches!(exit, ReaderExit::AssignmentFailed(_)), "{exit:?}");
    while let Ok(feed) = rx.try_recv() {
        assert!(
            !matches!(feed, courseview::kafka::Feed::Records(_)),
            "no record was read from the group's offset: {feed:?}"
        );
    }
    drop(consumer);

    // A blip shorter than that: the partition starts at the stored offset.
    let (consumer, _reader, mut rx) = read_with(3);
    let first = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match rx.recv().await.expect("open") {
                courseview::kafka::Feed::Records(run) => return run.into_iter().next().expect("a run is never empty"),
                // Positions reported while idle are not records.
                courseview::kafka::Feed::Advance { next, .. } => assert!(next <= 3, "advanced to {next}"),
                courseview::kafka::Feed::Held => panic!("held though never asked to"),
            }
        }
    })
    .await
    .expect("a record");
    assert_eq!(first.offset, 3, "started at the stored offset, not the group's 8");
    drop(consumer);
}

/// Reads `topic` from offset 0 with a byte budget of `budget` bytes and
/// runs of at most `longest_run`, releasing each run's bytes as it
/// arrives, until `count` records came; returns each run's offsets.
async fn runs_read(topic: &str, budget: usize, longest_run: usize, count: usize) -> Vec<Vec<i64>> {
    let settings = reader_settings(topic, "runs-");
    let source = Arc::new(FlakyOffsets {
        calls: AtomicUsize::new(0),
        failures: 0,
        offsets: HashMap::from([((topic.to_owned(), 0), 0_i64)]),
    });
    let consumer = Consumer::subscribe(&settings, source, Default::default()).expect("consumer");
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let cancel = CancellationToken::new();
    let budget_handle = ByteBudget::new(budget);
    let reader = consumer.spawn_reader(tx, Arc::clone(&budget_handle), longest_run, cancel.clone());
    let mut runs = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        while runs.iter().map(Vec::len).sum::<usize>() < count {
            match rx.recv().await.expect("reader open") {
                courseview::kafka::Feed::Records(run) => {
                    budget_handle.release(run.iter().map(courseview::record::Record::size).sum());
                    runs.push(run.iter().map(|r| r.offset).collect::<Vec<_>>());
                }
                courseview::kafka::Feed::Advance { .. } => {}
                courseview::kafka::Feed::Held => panic!("held though never asked to"),
            }
        }
    })
    .await;
    cancel.cancel();
    drop(rx);
    tokio::task::spawn_blocking(move || reader.join().expect("reader ran"))
        .await
        .expect("joined");
    drop(consumer);
    read.unwrap_or_else(|_| {
        panic!(
            "read {} of {count} records in 60 s",
            runs.iter().map(Vec::len).sum::<usize>()
        )
    });
    runs
}

#[tokio::test]
async fn the_reader_hands_a_backlog_over_in_runs_bounded_by_its_chunk_the_batch_and_the_byte_budget_in_order() {
    let app = TestApp::spawn().await;
    let topic = unique("runs.");
    create_topics(&brokers(), std::slice::from_ref(&topic), 1)
        .await
        .expect("topic");
    const COUNT: usize = 3_000;
    // Ten-byte values: "record0042".
    futures::future::join_all((0..COUNT).map(|i| {
        app.send(Outgoing {
            topic: topic.clone(),
            value: Some(format!("record{i:04}")),
            ..Outgoing::default()
        })
    }))
    .await;
    let every = (0..COUNT as i64).collect::<Vec<_>>();

    // A backlog goes over in runs, none longer than the chunk, each record
    // once and in order.
    let runs = runs_read(&topic, 1 << 20, courseview::kafka::READ_CHUNK, COUNT).await;
    assert_eq!(runs.concat(), every, "every record once, in order");
    assert!(
        runs.iter().all(|run| run.len() <= courseview::kafka::READ_CHUNK),
        "longest run {}",
        runs.iter().map(Vec::len).max().unwrap_or(0)
    );
    assert!(
        runs.len() * 4 < COUNT,
        "{} runs for {COUNT} records: handed over one by one",
        runs.len()
    );

    // A budget of five records' bytes: a run never holds more than fit, and
    // the reader hands over what it holds rather than wait for room forever.
    let runs = runs_read(&topic, 50, courseview::kafka::READ_CHUNK, COUNT).await;
    assert_eq!(runs.concat(), every, "every record once, in order");
    assert!(
        runs.iter().all(|run| run.len() <= 5),
        "longest run {} under a five-record budget",
        runs.iter().map(Vec::len).max().unwrap_or(0)
    );

    // A worker with small batches asks for short runs.
    let runs = runs_read(&topic, 1 << 20, 7, COUNT).await;
    assert_eq!(runs.concat(), every, "every record once, in order");
    assert!(
        runs.iter().all(|run| run.len() <= 7),
        "longest run {} where 7 were asked for",
        runs.iter().map(Vec::len).max().unwrap_or(0)
    );
}

#[tokio::test]
async fn records_over_the_size_limit_are_dead_lettered_and_a_batch_far_over_16_mib_is_written() {
    let app = TestApp::spawn().await;
    let mut settings = app.worker_settings(ReadModel::Catalog);
    settings.max_record_bytes = 200_000;
    settings.batch_size = 1_000;
    settings.batch_linger = Duration::from_millis(500);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(courseview::worker::run(
        settings,
        app.store.clone(),
        app.cache.clone(),
        cancel.clone(),
    ));
    // 400 courses with 60 kB descriptions: one batch whose documents hold
    // about 48 MB (state and view), three times what one command may carry.
    let long = "x".repeat(60_000);
    let mut events = Vec::new();
    for i in 0..400 {
        let c = format!("big{i:03}");
        events.push(event(
            "CourseCreatedEvent",
            &c,
            1,
            json!({"name": c, "teacherId": "t", "description": long}),
        ));
    }
    let oversized = event(
        "CourseCreatedEvent",
        "huge",
        1,
        json!({"name": "huge", "description": "y".repeat(300_000)}),
    );
    app.publish(&oversized).await;
    app.publish_all(&events).await;
    app.wait_applied(ReadModel::Catalog, 401).await;
    cancel.cancel();
    task.await.expect("task").expect("clean stop");

    let docs = app.dump(ReadModel::Catalog).await;
    assert_eq!(docs.len(), 400, "every course within the limit is written");
    let letters = app.store.dead_letters(Some("catalog"), 10).await.expect("letters");
    assert_eq!(letters.len(), 1);
    let letter = &letters[0].1;
    assert!(letter.error.contains("over the limit of 200000"), "{}", letter.error);
    assert!(letter.truncated_from.is_some_and(|n| n > 300_000));
    assert_eq!(
        letter.value.as_ref().map(Vec::len),
        Some(courseview::dead_letter::OVERSIZED_PREFIX)
    );
}

#[tokio::test]
async fn min_version_answers_from_the_state_it_waited_for_never_from_an_older_cached_one() {
    let app = TestApp::spawn().await;
    app.project_all(
        ReadModel::Catalog,
        &[
            event("CourseCreatedEvent", "m1", 1, json!({"name": "Old", "teacherId": "t"})),
            event("CoursePostedEvent", "m1", 2, json!({})),
        ],
    )
    .await;
    let (status, cached) = app.get_json("/catalog/courses/m1").await;
    assert_eq!((status, cached["version"].as_i64()), (200, Some(2)));
    // Version 3 lands in MongoDB, and the cache has not been invalidated yet
    // (the worker's epoch bump is still on its way).
    let generation = app.store.serving_generation("catalog").await.expect("generation");
    let event3 = courseview::decode::decode(&courseview::record::Record {
        topic: "CourseUpdatedEvent".into(),
        key: Some(b"m1".to_vec()),
        value: Some(
            event("CourseUpdatedEvent", "m1", 3, json!({"name": "New"}))
                .to_string()
                .into_bytes(),
        ),
        ..Default::default()
    })
    .expect("decodes");
    Applier::new(ReadModel::Catalog, app.store.clone(), None, generation)
        .apply_events(&[event3])
        .await
        .expect("applied");

    let (status, body) = app.get_json("/catalog/courses/m1?minVersion=3").await;
    assert_eq!(status, 200);
    assert_eq!(
        (body["version"].as_i64(), body["name"].as_str()),
        (Some(3), Some("New"))
    );
}

#[tokio::test]
async fn sigterm_with_mongodb_down_exits_within_the_bound_and_the_next_start_loses_nothing() {
    let mut mongo = PrivateMongo::start();
    let app = TestApp::with(Options {
        mongodb_uri: mongo.uri(),
        ..Options::default()
    })
    .await;
    let events = big_history("s", 40);
    let (first, rest) = events.split_at(events.len() / 2);
    let mut worker = app.worker_process(
        ReadModel::Catalog,
        &[("COURSEVIEW_SHUTDOWN_TIMEOUT", "2s"), ("MONGODB_TIMEOUT", "500ms")],
    );
    let logs = log_lines(&mut worker);
    app.publish_all(first).await;
    app.wait_applied(ReadModel::Catalog, first.len() as i64).await;

    mongo.kill();
    app.publish_all(rest).await;
    eventually("the worker to retry a batch", Duration::from_secs(30), || async {
        logged(&logs, "Transient failure; retrying without advancing offsets.").then_some(())
    })
    .await;
    let asked = Instant::now();
    signal(&worker, "TERM");
    let status = wait_exit(&mut worker, Duration::from_secs(15)).await;
    assert!(
        asked.elapsed() < Duration::from_secs(8),
        "exit took {:?} with a 2 s shutdown timeout",
        asked.elapsed()
    );
    assert!(status.success(), "{status:?}");
    assert!(logged(
        &logs,
        "Shutdown deadline passed; batch abandoned, its offsets not stored."
    ));

    mongo.restart();
    let worker = app.start_worker(ReadModel::Catalog);
    app.wait_applied(ReadModel::Catalog, events.len() as i64).await;
    worker.stop().await;
    assert_eq!(app.dump(ReadModel::Catalog).await, clean_replay(&events).await);
}

/// Waits for a process to exit, polling, up to `timeout`.
async fn wait_exit(child: &mut crate::helpers::Reaped, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "the process did not exit within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let mut mongo = PrivateMongo::start();
    let app = TestApp::with(Options {
        mongodb_uri: mongo.uri(),
        ..Options::default()
    })
    .await;
    let mut worker = app.worker_process(
        ReadModel::Catalog,
        &[("COURSEVIEW_SHUTDOWN_TIMEOUT", "120s"), ("MONGODB_TIMEOUT", "500ms")],
    );
    let logs = log_lines(&mut worker);
    app.publish(&event("CourseCreatedEvent", "q1", 1, json!({"name": "A"})))
        .await;
    app.wait_applied(ReadModel::Catalog, 1).await;
    mongo.kill();
    app.publish(&event("CoursePostedEvent", "q1", 2, json!({}))).await;
    eventually("the worker to retry a batch", Duration::from_secs(30), || async {
        logged(&logs, "Transient failure; retrying without advancing offsets.").then_some(())
    })
    .await;
    signal(&worker, "TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        worker.0.try_wait().expect("wait").is_none(),
        "still finishing its batch"
    );
    let asked = Instant::now();
    signal(&worker, "TERM");
    let status = wait_exit(&mut worker, Duration::from_secs(5)).await;
    assert!(asked.elapsed() < Duration::from_secs(2), "{:?}", asked.elapsed());
    assert_eq!(status.code(), Some(130));
}

#[tokio::test]
async fn a_dead_letter_replayed_during_a_rebuild_lands_in_the_generation_being_built_too() {
    let app = TestApp::spawn().await;
    app.project_all(
        ReadModel::Catalog,
        &[event(
            "CourseCreatedEvent",
            "r1",
            1,
            json!({"name": "R", "teacherId": "t"}),
        )],
    )
    .await;
    let pointer = app.store.begin_rebuild("catalog").await.expect("rebuild begins");
    let building = pointer.building.expect("building");
    let posted = event("CoursePostedEvent", "r1", 2, json!({}));
    let record = courseview::record::Record {
        topic: app.topic("CoursePostedEvent"),
        key: Some(b"r1".to_vec()),
        value: Some(posted.to_string().into_bytes()),
        ..Default::default()
    };
    let letter = courseview::dead_letter::DeadLetter::new("catalog", &record, "simulated");
    let other = courseview::dead_letter::DeadLetter::new(
        "catalog",
        &courseview::record::Record {
            offset: 99,
            ..record.clone()
        },
        "left alone",
    );
    app.store
        .put_dead_letters(&[letter.clone(), other])
        .await
        .expect("stored");
    let replay = ReplayArgs {
        id: Some(letter.id()),
        filter: DlqFilter {
            projection: None,
            limit: 1000,
        },
        no_cache_invalidation: false,
    };
    dlq::run(app.global(), DlqCommand::Replay(replay))
        .await
        .expect("replay");

    for generation in [pointer.generation, building] {
        let collection = courseview::mongo::Store::collection_name("catalog", generation);
        let version = app.store.applied_version(&collection, "r1").await.expect("read");
        assert_eq!(version, Some(2), "generation {generation} has the replayed event");
    }
    let left = app.store.dead_letters(None, 10).await.expect("letters");
    assert_eq!(left.len(), 1, "--id replays that letter only");
    assert_eq!(left[0].1.error, "left alone");
}

/// Answers every request of `app` within `bound`, `rounds` times over.
async fn assert_answers_within(app: &TestApp, bound: Duration, rounds: usize) {
    for _ in 0..rounds {
        for path in ["/catalog/courses/u1", "/catalog/courses?limit=5"] {
            let started = Instant::now();
            let (status, _) = app.get_json(path).await;
            assert_eq!(status, 200, "{path}");
            assert!(started.elapsed() < bound, "{path} took {:?}", started.elapsed());
        }
    }
}

#[tokio::test]
async fn with_redis_unreachable_or_silent_every_answer_stays_within_the_redis_timeout() {
    let seed = [
        event("CourseCreatedEvent", "u1", 1, json!({"name": "U", "teacherId": "t"})),
        event("CoursePostedEvent", "u1", 2, json!({})),
    ];
    // Nothing listens: connections are refused (the client used to retry
    // with backoff for ~1.4 s past REDIS_TIMEOUT).
    let refused = TestApp::with(Options {
        redis_url: Some(format!("redis://127.0.0.1:{}", free_port())),
        ..Options::default()
    })
    .await;
    project_without_cache(&refused, &seed).await;
    // REDIS_TIMEOUT is 200 ms in tests; the MongoDB read is a few ms.
    assert_answers_within(&refused, Duration::from_millis(700), 8).await;

    // Something accepts and never answers: every call hits the timeout.
    let port = silent_listener();
    let mute = TestApp::with(Options {
        redis_url: Some(format!("redis://127.0.0.1:{port}")),
        ..Options::default()
    })
    .await;
    project_without_cache(&mute, &seed).await;
    assert_answers_within(&mute, Duration::from_millis(700), 8).await;
}

/// Projects `events` with a worker that has no cache to announce to (its
/// writes would wait for a Redis that never answers; this test is about
/// the API's reads).
async fn project_without_cache(app: &TestApp, events: &[Value]) {
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(courseview::worker::run(
        app.worker_settings(ReadModel::Catalog),
        app.store.clone(),
        None,
        cancel.clone(),
    ));
    app.publish_all(events).await;
    app.wait_applied(ReadModel::Catalog, events.len() as i64).await;
    cancel.cancel();
    task.await.expect("worker task").expect("worker stops cleanly");
}

#[tokio::test]
async fn concurrent_status_requests_with_kafka_unreachable_are_answered_503_within_the_limit() {
    // A broker address that accepts and never answers.
    let port = silent_listener();
    let app = TestApp::with(Options {
        status_brokers: Some(format!("127.0.0.1:{port}")),
        ..Options::default()
    })
    .await;
    let started = Instant::now();
    let requests: Vec<_> = (0..12).map(|_| app.get("/projections")).collect();
    let responses = futures::future::join_all(requests).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "12 concurrent requests took {:?}",
        started.elapsed()
    );
    for r in responses {
        assert_eq!(r.status().as_u16(), 503);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
}

#[tokio::test]
async fn control_characters_are_400_and_a_timed_out_request_is_problem_json() {
    let app = TestApp::spawn().await;
    for path in [
        "/catalog/courses?q=a%00b",
        "/catalog/courses?teacherId=%01",
        "/catalog/courses/a%00b",
    ] {
        let response = app.get(path).await;
        assert_eq!(response.status().as_u16(), 400, "{path}");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
    }
    let slow = TestApp::with(Options {
        request_timeout: Duration::from_millis(1),
        min_version_wait: Duration::from_secs(2),
        ..Options::default()
    })
    .await;
    // The counter is process-wide: another test's 503 on this route in the
    // same moment could make up for a missing count, never fail this.
    let timed_out = r#"courseview_http_requests_total{route="/catalog/courses/{courseId}",status="503"}"#;
    let counted = || async {
        sum_of(
            &parse_prometheus(&slow.get("/metrics").await.text().await.expect("text")),
            timed_out,
        )
    };
    let before = counted().await;
    for _ in 0..5 {
        let response = slow.get("/catalog/courses/nope?minVersion=5").await;
        assert_eq!(response.status().as_u16(), 503);
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["type"], "/problems/timed-out");
    }
    assert!(
        counted().await - before >= 5.0,
        "timed-out requests count in the request metrics"
    );
}

#[tokio::test]
async fn two_worker_processes_with_default_settings_both_run_and_show_in_status() {
    let app = TestApp::spawn().await;
    let mut a = app.worker_process(ReadModel::Catalog, &[]);
    let mut b = app.worker_process(ReadModel::Catalog, &[]);
    let c = app.worker_process(ReadModel::TeacherCourses, &[]);
    let (logs_a, logs_b) = (log_lines(&mut a), log_lines(&mut b));
    let workers = eventually("three registered workers", Duration::from_secs(30), || async {
        let catalog = app.store.live_workers(Some("catalog")).await.ok()?;
        let teacher = app.store.live_workers(Some("teacher_courses")).await.ok()?;
        (catalog.len() == 2 && teacher.len() == 1).then_some((catalog, teacher))
    })
    .await;
    let addrs: std::collections::HashSet<&str> = workers
        .0
        .iter()
        .chain(workers.1.iter())
        .map(|w| w.metrics_addr.as_str())
        .collect();
    assert_eq!(addrs.len(), 3, "each has its own metrics address: {addrs:?}");
    for addr in &addrs {
        let metrics = app.get_raw(&format!("http://{addr}/metrics")).await;
        assert_eq!(metrics, 200, "{addr} serves metrics");
    }
    let (_, status) = app.get_json("/projections").await;
    assert_eq!(status["projections"][0]["workers"].as_array().map(Vec::len), Some(2));
    for (child, logs) in [(&a, &logs_a), (&b, &logs_b)] {
        assert!(logged(logs, "Worker metrics and health listening."));
        assert!(child.0.id() > 0);
    }
    drop(c);
}

#[tokio::test]
async fn an_evicted_cache_epoch_never_revives_older_answers() {
    let app = TestApp::spawn().await;
    let worker = app.start_worker(ReadModel::Catalog);
    app.publish_all(&[
        event(
            "CourseCreatedEvent",
            "e1",
            1,
            json!({"name": "First", "teacherId": "t"}),
        ),
        event("CoursePostedEvent", "e1", 2, json!({})),
    ])
    .await;
    app.wait_applied(ReadModel::Catalog, 2).await;
    assert_eq!(app.get_json("/catalog/courses/e1").await.1["name"], "First");
    app.publish(&event("CourseUpdatedEvent", "e1", 3, json!({"name": "Second"})))
        .await;
    app.wait_applied(ReadModel::Catalog, 3).await;
    eventually("the update to show", Duration::from_secs(2), || async {
        (app.get_json("/catalog/courses/e1").await.1["name"] == "Second").then_some(())
    })
    .await;
    // Redis evicts the epoch key (allkeys-lru under maxmemory).
    let client = redis::Client::open(crate::helpers::redis_url()).expect("redis");
    let mut conn = client.get_multiplexed_async_connection().await.expect("conn");
    let generation = app.store.serving_generation("catalog").await.expect("generation");
    let _: () = redis::cmd("DEL")
        .arg(format!("cvtest:{}:catalog:g{generation}:epoch", app.id))
        .query_async(&mut conn)
        .await
        .expect("del");
    for _ in 0..5 {
        assert_eq!(app.get_json("/catalog/courses/e1").await.1["name"], "Second");
    }
    worker.stop().await;
}

#[tokio::test]
async fn with_redis_full_under_noeviction_answers_stay_fresh() {
    let redis = PrivateRedis::start_with(&["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]);
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let client = eventually("private redis", Duration::from_secs(10), || async {
        let client = redis::Client::open(url.as_str()).ok()?;
        client
            .get_multiplexed_async_connection()
            .await
            .ok()
            .map(|c| (client, c))
    })
    .await;
    let mut conn = client.1;
    let app = TestApp::with(Options {
        redis_url: Some(url.clone()),
        ..Options::default()
    })
    .await;
    let worker = app.start_worker(ReadModel::Catalog);
    app.publish_all(&[
        event("CourseCreatedEvent", "f1", 1, json!({"name": "v1", "teacherId": "t"})),
        event("CoursePostedEvent", "f1", 2, json!({})),
    ])
    .await;
    app.wait_applied(ReadModel::Catalog, 2).await;
    assert_eq!(app.get_json("/catalog/courses/f1").await.1["name"], "v1");
    // Fill Redis until it refuses writes.
    let filler = "z".repeat(64 * 1024);
    for i in 0.. {
        let put: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("filler{i}"))
            .arg(&filler)
            .query_async(&mut conn)
            .await;
        if put.is_err() {
            break;
        }
    }
    for version in 3..6 {
        let name = format!("v{version}");
        app.publish(&event("CourseUpdatedEvent", "f1", version, json!({"name": name})))
            .await;
        app.wait_applied(ReadModel::Catalog, version).await;
        let deadline = Instant::now() + Duration::from_secs(1);
        eventually(
            &format!("{name} to show within 1 s"),
            Duration::from_secs(1),
            || async { (app.get_json("/catalog/courses/f1").await.1["name"] == name.as_str()).then_some(()) },
        )
        .await;
        assert!(Instant::now() <= deadline);
    }
    worker.stop().await;
}

/// A record of `event` on its type's topic.
fn record_of(event: &Value, offset: i64) -> courseview::record::Record {
    courseview::record::Record {
        topic: event["eventType"].as_str().expect("type").to_owned(),
        partition: 0,
        offset,
        key: None,
        value: Some(event.to_string().into_bytes()),
        headers: Vec::new(),
        timestamp: None,
    }
}

#[tokio::test]
async fn a_course_presumed_new_but_written_by_another_worker_is_reloaded_and_nothing_is_lost() {
    let app = TestApp::spawn().await;
    let generation = app.store.serving_generation("catalog").await.expect("pointer");
    let first = Applier::new(ReadModel::Catalog, app.store.clone(), None, generation);
    let created = event(
        "CourseCreatedEvent",
        "n1",
        1,
        json!({"name": "Created", "teacherId": "t9"}),
    );
    let posted = event("CoursePostedEvent", "n1", 2, json!({}));
    first
        .apply_batch(&[record_of(&created, 0), record_of(&posted, 0)])
        .await
        .expect("first worker");
    // A second worker has never seen the course: it writes it as new
    // without loading, the store refuses that (revision 0 is taken), and it
    // reloads the course and reapplies its event.
    let second = Applier::new(ReadModel::Catalog, app.store.clone(), None, generation);
    let renamed = event("CourseUpdatedEvent", "n1", 3, json!({"name": "Renamed"}));
    let outcome = second
        .apply_batch(&[record_of(&renamed, 0)])
        .await
        .expect("second worker");
    assert_eq!(outcome.documents_written, 1);
    let (status, course) = app.get_json("/catalog/courses/n1").await;
    assert_eq!(status, 200, "{course}");
    assert_eq!(course["name"], "Renamed");
    assert_eq!(course["teacherId"], "t9", "the first worker's fields survive");
    assert_eq!(course["version"], 3);
    assert_eq!(
        app.dump(ReadModel::Catalog).await,
        clean_replay(&[created, posted, renamed]).await
    );
}

/// A projection that cannot go on ends its whole process, non-zero and
/// naming it, so a supervisor (Kubernetes) restarts it: `project --all`
/// used to run on with the other projection while the failed one did
/// nothing and the process stayed up. The failure is real: a state stored
/// in bytes no release can read, which stops a worker rather than be
/// skipped (its stamps make replays converge).
#[tokio::test]
async fn a_projection_that_cannot_go_on_ends_the_whole_process_non_zero_naming_it() {
    let app = TestApp::spawn().await;
    let collection = courseview::mongo::Store::collection_name(ReadModel::TeacherCourses.name(), 1);
    mongodb::Client::with_uri_str(&app.mongodb_uri)
        .await
        .expect("client")
        .database(app.store.database_name())
        .collection::<bson::Document>(&collection)
        .insert_one(bson::doc! {"_id": "u1", "st": "\u{1}not a state", "_rev": 1})
        .await
        .expect("unreadable state stored");
    let mut process = app.process(&["project", "--all"], &[]);
    let logs = log_lines(&mut process);
    app.publish(&event(
        "CourseCreatedEvent",
        "u1",
        1,
        json!({"name": "A", "teacherId": "t1"}),
    ))
    .await;

    let status = wait_exit(&mut process, Duration::from_secs(60)).await;
    assert!(!status.success(), "{status:?}");
    let named = logs.lock().expect("logs").iter().any(|l| {
        l["level"] == "ERROR"
            && l["projection"] == ReadModel::TeacherCourses.name()
            && l["error"].as_str().is_some_and(|e| e.contains("state of \"u1\""))
    });
    assert!(
        named,
        "the failed projection and its cause are logged: {:?}",
        logs.lock().expect("logs")
    );
}
