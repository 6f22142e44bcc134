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

/// A gap of the peer, pinned so that it cannot go unnoticed: nisshi 0.8.1
/// refuses transactional producers (and rejects client-written control
/// batches), so no test here can put a transaction commit marker in a log.
/// courseview's handling of markers (an idle reader stores the consumer
/// position past them, `kafka::positions_moved`) is therefore exercised on
/// Apache Kafka only. When this starts failing, the peer has transactions:
/// add the end-to-end test of DESIGN's "lag reaches 0 after a transaction".
#[tokio::test]
async fn the_peer_refuses_transactional_producers_so_commit_markers_are_not_tested_here() {
    use rdkafka::producer::FutureProducer;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("transactional.id", unique("txn-"))
        .create()
        .expect("producer");
    let refused = producer.init_transactions(Duration::from_secs(10));
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("authorization failed")),
        "the broker now accepts transactions ({refused:?}): test commit markers end to end"
    );
}
