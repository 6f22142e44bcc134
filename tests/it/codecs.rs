//! Compressed record batches: every codec Kafka has, chosen by the topic
//! or by the producer; a batch that cannot be read at all (real bad bytes
//! in the broker's log) shows its partition stuck instead of a log line;
//! and a fatal client error ends the reader.

use std::time::Duration;

use courseview::read_model::ReadModel;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};

use crate::helpers::{event, eventually, TestApp};

/// Creates a topic with topic-level settings (the suite's broker).
pub(crate) async fn create_topic_with(brokers: &str, topic: &str, config: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin");
    let mut new = NewTopic::new(topic, 1, TopicReplication::Fixed(1));
    for (k, v) in config {
        new = new.set(k, v);
    }
    let results = admin
        .create_topics(
            &[new],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics");
    for r in results {
        r.expect("topic created");
    }
}

/// Sends `events` in one batch compressed with `codec` (`none` for none).
pub(crate) async fn produce_compressed(brokers: &str, topic: &str, codec: &str, events: &[Value]) {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("compression.type", codec)
        // Long enough that every record of the call shares one batch.
        .set("linger.ms", "200")
        .create()
        .expect("producer");
    let sends: Vec<_> = events
        .iter()
        .map(|e| {
            let key = e["courseId"].as_str().expect("course id").to_owned();
            let value = e.to_string();
            let producer = producer.clone();
            let topic = topic.to_owned();
            async move {
                producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&value),
                        Duration::from_secs(10),
                    )
                    .await
                    .map_err(|(e, _)| e)
            }
        })
        .collect();
    for sent in futures::future::join_all(sends).await {
        sent.expect("delivered");
    }
}

/// Created and posted events of `n` courses named `prefix0..`.
pub(crate) fn posted_courses(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .flat_map(|c| {
            let id = format!("{prefix}{c}");
            [
                event("CourseCreatedEvent", &id, 1, json!({"name": id, "teacherId": "t1"})),
                event("CoursePostedEvent", &id, 2, json!({})),
            ]
        })
        .collect()
}

#[tokio::test]
async fn batches_compressed_with_every_codec_by_the_topic_or_by_the_producer_are_applied() {
    let app = TestApp::spawn().await;
    let mut courses = Vec::new();
    for (name, topic_codec, producer_codec) in [
        ("TopicGzip", "gzip", "none"),
        ("TopicSnappy", "snappy", "none"),
        ("TopicLz4", "lz4", "none"),
        ("TopicZstd", "zstd", "none"),
        ("ProducerGzip", "producer", "gzip"),
        ("ProducerSnappy", "producer", "snappy"),
        ("ProducerLz4", "producer", "lz4"),
        ("ProducerZstd", "producer", "zstd"),
    ] {
        let topic = format!("{}.Course{name}Event", app.id);
        create_topic_with(&app.brokers, &topic, &[("compression.type", topic_codec)]).await;
        let prefix = name.to_lowercase();
        produce_compressed(&app.brokers, &topic, producer_codec, &posted_courses(&prefix, 5)).await;
        courses.extend((0..5).map(|c| format!("{prefix}{c}")));
    }
    let worker = app.start_worker(ReadModel::Catalog);
    for course in &courses {
        eventually(&format!("{course} listed"), Duration::from_secs(60), || async {
            (app.get_json(&format!("/catalog/courses/{course}")).await.0 == 200).then_some(())
        })
        .await;
    }
    worker.stop().await;
}

/// The directory holding partition 0 of `topic` on the suite's broker.
fn partition_dir(topic: &str) -> std::path::PathBuf {
    let run = std::env::var_os("COURSEVIEW_RUN")
        .map_or_else(|| crate::peers::cache_dir().join("run"), std::path::PathBuf::from);
    run.join("kafka/log").join(format!("{topic}-0"))
}

/// Overwrites part of the compressed records of the batch starting at
/// `base_offset` in the broker's segment file: real bad bytes on disk,
/// served as they are (the broker does not re-check what it reads).
pub(crate) fn corrupt_batch(topic: &str, base_offset: i64) {
    let path = partition_dir(topic).join("00000000000000000000.log");
    let mut bytes = std::fs::read(&path).expect("segment");
    let mut at = 0;
    while at + 61 <= bytes.len() {
        let base = i64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let length = u32::from_be_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes")) as usize;
        if base == base_offset {
            // Past the 61-byte batch header and the gzip header: deflate data.
            let start = at + 61 + 12;
            let end = (at + 12 + length).min(start + 24);
            assert!(end > start, "a batch with compressed records at {base_offset}");
            for b in &mut bytes[start..end] {
                *b = 0xff;
            }
            use std::io::{Seek, Write};
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open segment");
            file.seek(std::io::SeekFrom::Start(start as u64)).expect("seek");
            file.write_all(&bytes[start..end]).expect("write");
            file.sync_all().expect("sync");
            return;
        }
        at += 12 + length;
    }
    panic!("no batch at offset {base_offset} in {}", path.display());
}

#[tokio::test]
async fn a_batch_that_cannot_be_read_shows_its_partition_stuck_fails_readiness_and_counts_in_metrics() {
    let app = TestApp::spawn().await;
    let topic = format!("{}.CourseCorruptEvent", app.id);
    create_topic_with(&app.brokers, &topic, &[("compression.type", "producer")]).await;
    produce_compressed(&app.brokers, &topic, "gzip", &posted_courses("before", 5)).await;
    produce_compressed(&app.brokers, &topic, "gzip", &posted_courses("bad", 5)).await;
    produce_compressed(&app.brokers, &topic, "gzip", &posted_courses("after", 5)).await;
    corrupt_batch(&topic, 10);

    let mut worker = app.worker_process(ReadModel::Catalog, &[]);
    // What comes before the bad batch is applied.
    for c in 0..5 {
        eventually("the courses before the bad batch", Duration::from_secs(60), || async {
            (app.get_json(&format!("/catalog/courses/before{c}")).await.0 == 200).then_some(())
        })
        .await;
    }
    // The partition shows as stuck at the bad batch, with the reason.
    let partition = eventually("the partition shown stuck", Duration::from_secs(60), || async {
        let (_, status) = app.get_json("/projections").await;
        let catalog = status["projections"]
            .as_array()?
            .iter()
            .find(|p| p["projection"] == "catalog")?
            .clone();
        let partition = catalog["partitions"]
            .as_array()?
            .iter()
            .find(|p| p["topic"] == topic.as_str() && p["stuck"].is_string())?
            .clone();
        (catalog["state"] == "stuck").then_some(partition)
    })
    .await;
    let why = partition["stuck"].as_str().expect("reason");
    assert!(
        why.starts_with("at offset 10:") && why.contains("Decompression"),
        "librdkafka's own words: {why}"
    );
    assert_eq!(partition["storedOffset"], 10, "nothing past the bad batch was stored");

    let workers = app.store.live_workers(Some("catalog")).await.expect("registry");
    let metrics_addr = workers.first().expect("the worker is registered").metrics_addr.clone();
    let ready = app
        .http
        .get(format!("http://{metrics_addr}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 503, "a stuck partition fails the worker's readiness");
    let body: Value = ready.json().await.expect("json");
    assert_eq!(body["stuck"][0]["offset"], 10, "{body}");
    let metrics = app.get_text(&format!("http://{metrics_addr}/metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("courseview_partition_stuck{") && l.contains(&topic) && l.ends_with(" 1")),
        "the stuck gauge: {metrics}"
    );
    assert!(
        crate::helpers::logged(&crate::helpers::log_lines(&mut worker), "Partition stuck: its fetch keeps failing at this offset, so nothing after it is applied. Nothing can be dead-lettered for a record that cannot be read: fix its cause (a codec, a corrupt batch, a fetch size) or move the offset past it."),
        "said at error level, once"
    );
    // Nothing after it was applied, nothing skipped.
    assert_eq!(app.get_json("/catalog/courses/after0").await.0, 404);
    crate::helpers::signal(&worker, "TERM");
}

#[tokio::test]
async fn a_fatal_client_error_ends_the_reader_with_its_reason() {
    use courseview::kafka::{ByteBudget, Consumer, ConsumerSettings, ReaderExit};
    let app = TestApp::spawn().await;
    let settings = app.worker_settings(ReadModel::Catalog).kafka;
    let settings = ConsumerSettings {
        group_id: crate::helpers::unique("fatal-"),
        ..settings
    };
    struct NoOffsets;
    impl courseview::kafka::OffsetSource for NoOffsets {
        fn stored_offsets(
            &self,
        ) -> Result<std::collections::HashMap<(String, i32), i64>, courseview::kafka::OffsetsUnavailable> {
            Ok(std::collections::HashMap::new())
        }
        fn record_gap(
            &self,
            gap: &courseview::kafka::Gap,
            _: courseview::kafka::OnGap,
        ) -> Result<(), courseview::kafka::OffsetsUnavailable> {
            panic!("no gap here: {gap:?}")
        }
    }
    let consumer =
        Consumer::subscribe(&settings, std::sync::Arc::new(NoOffsets), std::sync::Arc::default()).expect("consumer");
    let (tx, _rx) = tokio::sync::mpsc::channel(100);
    let reader = consumer.spawn_reader(
        tx,
        ByteBudget::new(1 << 20),
        courseview::kafka::READ_CHUNK,
        tokio_util::sync::CancellationToken::new(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(consumer.raise_fatal_error("fenced by a newer instance (raised by the test)"));
    let exit = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || reader.join().expect("reader ran")),
    )
    .await
    .expect("the reader stops at once, not polling on")
    .expect("joined");
    match exit {
        ReaderExit::Fatal(reason) => assert!(reason.contains("fenced by a newer instance"), "{reason}"),
        other => panic!("a fatal error ends the reader as fatal: {other:?}"),
    }
    // Closing a consumer after a fatal error can wait on the group for
    // good; the worker leaves it behind the same way (worker/consume.rs).
    std::mem::forget(consumer);
}
