//! Conformance of the Kafka-protocol test peer: exactly what courseview
//! relies on, so a peer that drops records or reports wrong numbers fails
//! here, by name, instead of making the rest of the suite lie.
//!
//! Tansu 0.6.0 failed the first test: a fetch at offset 37 of a batch of 100
//! answered from offset 100, and the high watermark of 1,000 records was 901.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};

use courseview::kafka::create_topics;

use crate::helpers::{brokers, unique};

fn consumer(group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .expect("consumer")
}

/// Produces `count` records to partition 0 of `topic`, `batch` at a time,
/// lingering so that each group travels as one producer batch.
async fn produce_batched(topic: &str, count: usize, batch: usize) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "50")
        .set("batch.num.messages", batch.to_string())
        .create()
        .expect("producer");
    for start in (0..count).step_by(batch) {
        let sends: Vec<_> = (start..(start + batch).min(count))
            .map(|i| {
                let payload = format!("record-{i}");
                let producer = producer.clone();
                let topic = topic.to_owned();
                async move {
                    producer
                        .send(
                            FutureRecord::to(&topic).partition(0).key("k").payload(&payload),
                            Duration::from_secs(10),
                        )
                        .await
                        .map_err(|(e, _)| e)
                }
            })
            .collect();
        for delivered in futures::future::join_all(sends).await {
            delivered.expect("delivered");
        }
    }
    producer
        .flush(Timeout::After(Duration::from_secs(10)))
        .expect("flushed");
}

/// The first record delivered after assigning `topic`/0 at `offset`.
fn first_at(consumer: &BaseConsumer, topic: &str, offset: i64) -> Option<(i64, String)> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset)).expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let payload = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
            return Some((m.offset(), payload));
        }
    }
    None
}

#[tokio::test]
async fn a_fetch_inside_a_producer_batch_starts_at_that_offset_and_the_watermark_counts_every_record() {
    let topic = unique("conf.batch.");
    create_topics(&brokers(), std::slice::from_ref(&topic), 1)
        .await
        .expect("topic");
    produce_batched(&topic, 1_000, 100).await;

    let c = consumer(&unique("conf-"));
    let (low, high) = c
        .fetch_watermarks(&topic, 0, Duration::from_secs(5))
        .expect("watermarks");
    assert_eq!((low, high), (0, 1_000), "watermarks after 1,000 batched records");
    for wanted in [0, 37, 150, 555, 999] {
        assert_eq!(
            first_at(&c, &topic, wanted),
            Some((wanted, format!("record-{wanted}"))),
            "assigned at {wanted}, the first record must be {wanted}"
        );
    }
    assert_eq!(first_at(&c, &topic, 1_000), None, "nothing past the end");
}

#[tokio::test]
async fn a_regex_subscription_takes_matching_topics_only_including_ones_created_later() {
    let id = unique("conf");
    let early = format!("{id}.CourseCreatedEvent");
    let later = format!("{id}.CoursePostedEvent");
    let other = format!("{id}.Unrelated");
    create_topics(&brokers(), &[early.clone(), other.clone()], 1)
        .await
        .expect("topics");
    let c = consumer(&unique("conf-"));
    c.subscribe(&[&format!(r"^{id}\.Course.*Event$")]).expect("subscribe");
    // Let the first assignment happen before the later topic exists.
    for _ in 0..20 {
        c.poll(Duration::from_millis(100));
    }
    create_topics(&brokers(), std::slice::from_ref(&later), 1)
        .await
        .expect("topic");
    for t in [&early, &later, &other] {
        produce_batched(t, 3, 3).await;
    }
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 6 && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            seen.insert((m.topic().to_owned(), m.offset()));
        }
    }
    let topics: HashSet<&str> = seen.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(seen.len(), 6, "three records from each matching topic: {seen:?}");
    assert_eq!(topics, HashSet::from([early.as_str(), later.as_str()]));
}

/// Partitions of `topic` each consumer holds, polled until both have settled.
fn settle(consumers: &[&BaseConsumer], topic: &str, total: usize) -> Vec<Vec<i32>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for c in consumers {
            c.poll(Duration::from_millis(50));
        }
        let held: Vec<Vec<i32>> = consumers
            .iter()
            .map(|c| {
                let mut p: Vec<i32> = c
                    .assignment()
                    .map(|tpl| {
                        tpl.elements_for_topic(topic)
                            .iter()
                            .map(rdkafka::topic_partition_list::TopicPartitionListElem::partition)
                            .collect()
                    })
                    .unwrap_or_default();
                p.sort_unstable();
                p
            })
            .collect();
        let all: HashSet<i32> = held.iter().flatten().copied().collect();
        let count: usize = held.iter().map(Vec::len).sum();
        if all.len() == total && count == total && held.iter().all(|h| !h.is_empty()) {
            return held;
        }
        assert!(Instant::now() < deadline, "group did not settle: {held:?}");
    }
}

#[tokio::test]
async fn a_group_splits_partitions_between_members_and_a_leaver_hands_them_over() {
    let topic = unique("conf.group.");
    create_topics(&brokers(), std::slice::from_ref(&topic), 2)
        .await
        .expect("topic");
    let group = unique("conf-");
    let a = consumer(&group);
    let b = consumer(&group);
    a.subscribe(&[&topic]).expect("subscribe");
    b.subscribe(&[&topic]).expect("subscribe");
    let held = settle(&[&a, &b], &topic, 2);
    assert_eq!(held.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1], "{held:?}");

    b.unsubscribe();
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        a.poll(Duration::from_millis(50));
        let count = a.assignment().map(|t| t.count()).unwrap_or_default();
        if count == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the remaining member never got both partitions"
        );
    }
}

#[tokio::test]
async fn committed_offsets_are_kept_per_group_and_read_back() {
    let topic = unique("conf.commit.");
    create_topics(&brokers(), std::slice::from_ref(&topic), 2)
        .await
        .expect("topic");
    let group = unique("conf-");
    let c = consumer(&group);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(5)).expect("tpl");
    tpl.add_partition_offset(&topic, 1, Offset::Offset(9)).expect("tpl");
    c.commit(&tpl, CommitMode::Sync).expect("commit");

    let fresh = consumer(&group);
    let mut ask = TopicPartitionList::new();
    ask.add_partition(&topic, 0);
    ask.add_partition(&topic, 1);
    let committed = fresh
        .committed_offsets(ask.clone(), Duration::from_secs(5))
        .expect("committed");
    let offsets: Vec<Offset> = committed.elements().iter().map(|e| e.offset()).collect();
    assert_eq!(offsets, vec![Offset::Offset(5), Offset::Offset(9)]);

    let other = consumer(&unique("conf-"));
    let theirs = other.committed_offsets(ask, Duration::from_secs(5)).expect("committed");
    assert!(
        theirs.elements().iter().all(|e| e.offset() == Offset::Invalid),
        "another group has its own offsets"
    );
}

fn admin() -> rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client")
}

/// A consumer that reports an out-of-range fetch instead of resetting.
fn strict_consumer() -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("conf-"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "error")
        .create()
        .expect("consumer")
}

/// Polls after assigning `topic`/0 at `offset`: the first record or error.
fn first_outcome(consumer: &BaseConsumer, topic: &str, offset: i64) -> Option<Result<i64, rdkafka::error::KafkaError>> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset)).expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => return Some(Ok(m.offset())),
            Some(Err(e)) => return Some(Err(e)),
            None => {}
        }
    }
    None
}

/// What a retention gap looks like on the real broker: DeleteRecords moves
/// the log start, and a fetch below it is OFFSET_OUT_OF_RANGE (librdkafka
/// resets silently under `auto.offset.reset=earliest`; courseview must not
/// let that pass, the second review's item 1).
#[tokio::test]
async fn delete_records_moves_the_log_start_and_a_fetch_below_it_is_out_of_range() {
    let topic = unique("conf.retention.");
    create_topics(&brokers(), std::slice::from_ref(&topic), 1)
        .await
        .expect("topic");
    produce_batched(&topic, 10, 10).await;
    let mut upto = TopicPartitionList::new();
    upto.add_partition_offset(&topic, 0, Offset::Offset(6)).expect("tpl");
    let deleted = admin()
        .delete_records(&upto, &rdkafka::admin::AdminOptions::new())
        .await
        .expect("delete records");
    assert_eq!(
        deleted.elements()[0].offset(),
        Offset::Offset(6),
        "the new low watermark"
    );

    let c = strict_consumer();
    let (low, high) = c
        .fetch_watermarks(&topic, 0, Duration::from_secs(5))
        .expect("watermarks");
    assert_eq!((low, high), (6, 10), "the log start moved, the end did not");
    assert_eq!(
        first_outcome(&c, &topic, 6).map(Result::ok),
        Some(Some(6)),
        "from the new start"
    );
    let below = first_outcome(&c, &topic, 3).expect("an answer below the log start");
    assert!(
        below
            .as_ref()
            .is_err_and(|e| e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AutoOffsetReset)),
        "a fetch below the log start is out of range: {below:?}"
    );
}

/// What a log reset looks like: a topic deleted and re-created starts again
/// at offset 0, so a stored offset of the old log may lie beyond its end or
/// inside records it never saw (the second review's item 2).
#[tokio::test]
async fn a_topic_deleted_and_re_created_starts_again_at_offset_zero() {
    let topic = unique("conf.recreated.");
    create_topics(&brokers(), std::slice::from_ref(&topic), 1)
        .await
        .expect("topic");
    produce_batched(&topic, 20, 10).await;
    admin()
        .delete_topics(&[&topic], &rdkafka::admin::AdminOptions::new())
        .await
        .expect("delete topic")
        .into_iter()
        .for_each(|r| {
            r.expect("topic deleted");
        });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Creating again succeeds once the deletion has gone through.
        match create_topics(&brokers(), std::slice::from_ref(&topic), 1).await {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "re-creating {topic}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    produce_batched(&topic, 3, 3).await;
    let c = strict_consumer();
    let (low, high) = c
        .fetch_watermarks(&topic, 0, Duration::from_secs(5))
        .expect("watermarks");
    assert_eq!((low, high), (0, 3), "the new log starts again at 0");
    let beyond = first_outcome(&c, &topic, 15).expect("an answer beyond the end");
    assert!(
        beyond.is_err(),
        "offset 15 of the old log is out of range now: {beyond:?}"
    );
}

/// Kafka 4's consumer group protocol (KIP-848) with librdkafka 2.12: the
/// broker assigns partitions itself and a member gets them. courseview
/// stays on the classic protocol (README, "Consumer groups").
#[tokio::test]
async fn the_consumer_group_protocol_of_kafka_4_assigns_partitions() {
    let topic = unique("conf.kip848.");
    create_topics(&brokers(), std::slice::from_ref(&topic), 2)
        .await
        .expect("topic");
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("conf-"))
        .set("group.protocol", "consumer")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    c.subscribe(&[&topic]).expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        c.poll(Duration::from_millis(100));
        if c.assignment().map(|t| t.count()).unwrap_or_default() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no assignment under group.protocol=consumer");
    }
}

/// A transactional producer (as Debezium's exactly-once relay is) commits
/// some transactions and aborts others: under `read_committed` the aborted
/// events are never applied, and an idle worker's lag reaches 0 past the
/// commit markers (which hold offsets no record is read at) without the
/// projection ever being reported stalled.
#[tokio::test]
async fn aborted_transactions_are_never_applied_and_an_idle_worker_s_lag_reaches_zero_past_the_markers() {
    use crate::helpers::{event, Options, TestApp};
    use courseview::read_model::ReadModel;
    use courseview::status::State;
    use serde_json::json;

    let app = TestApp::with(Options {
        stall_after: Duration::from_secs(2),
        ..Options::default()
    })
    .await;
    let worker = app.start_worker(ReadModel::Catalog);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &app.brokers)
        .set("transactional.id", unique("txn-"))
        .create()
        .expect("transactional producer");
    producer
        .init_transactions(Duration::from_secs(30))
        .expect("init transactions");
    for i in 0..6 {
        let course = format!("tx{i}");
        producer.begin_transaction().expect("begin");
        for e in [
            event(
                "CourseCreatedEvent",
                &course,
                1,
                json!({"name": course, "teacherId": "t1"}),
            ),
            event("CoursePostedEvent", &course, 2, json!({})),
        ] {
            let topic = app.topic(e["eventType"].as_str().expect("type"));
            let payload = e.to_string();
            producer
                .send(
                    FutureRecord::to(&topic).key(&course).payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .expect("sent in the transaction");
        }
        if i % 3 == 1 {
            producer.abort_transaction(Duration::from_secs(30)).expect("abort");
        } else {
            producer.commit_transaction(Duration::from_secs(30)).expect("commit");
        }
    }

    // Lag 0 on every partition, then still live for longer than stall_after.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut caught_up_at = None;
    loop {
        let status = app.probe.projection(ReadModel::Catalog).await.expect("status");
        assert_ne!(
            status.state,
            State::Stalled,
            "an idle worker past markers is not stalled: {status:?}"
        );
        if status.serving.lag_events == 0 && status.serving.partitions.iter().any(|p| p.high_watermark > 0) {
            let since = *caught_up_at.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(4) {
                break;
            }
        } else {
            caught_up_at = None;
        }
        assert!(
            Instant::now() < deadline,
            "lag never reached 0 past the markers: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker.stop().await;
    for i in 0..6 {
        let (status, _) = app.get_json(&format!("/catalog/courses/tx{i}")).await;
        let committed = i % 3 != 1;
        assert_eq!(
            status,
            if committed { 200 } else { 404 },
            "tx{i}: committed {committed}"
        );
    }
    assert_eq!(app.store.count_dead_letters("catalog").await.expect("count"), 0);
}
