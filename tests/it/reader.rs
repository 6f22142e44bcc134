//! The consumer's reader thread: it hands over every record once, in order
//! per partition, and while catching up it reads the topics in about the
//! order their records were written (src/align.rs).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use courseview::kafka::{
    create_topics, ByteBudget, Consumer, ConsumerSettings, Feed, OffsetSource, OffsetsUnavailable, Outgoing, Producer,
};

use crate::helpers::{brokers, unique};

/// A generation that has stored nothing: every partition starts at zero.
struct FromZero;

impl OffsetSource for FromZero {
    fn stored_offsets(&self) -> Result<HashMap<(String, i32), i64>, OffsetsUnavailable> {
        Ok(HashMap::new())
    }
}

#[tokio::test]
async fn a_reader_catching_up_hands_over_every_record_once_with_the_topics_aligned_in_time() {
    // Two topics written side by side, a record every 5 ms each, 10 s in
    // all: the large records' topic fetches 4 KiB records, the small one's
    // 20 bytes, so a byte-fair fetcher runs the small topic far ahead in time.
    const PER_TOPIC: i64 = 2_000;
    let prefix = unique("align");
    let (large, small) = (format!("{prefix}.large"), format!("{prefix}.small"));
    create_topics(&brokers(), &[large.clone(), small.clone()], 1)
        .await
        .expect("topics");
    let producer = Producer::new(&brokers()).expect("producer");
    let base = chrono::Utc::now().timestamp_millis() - 60_000;
    let records: Vec<Outgoing> = (0..PER_TOPIC)
        .flat_map(|i| {
            [(&large, 4_096), (&small, 20)].map(|(topic, size)| Outgoing {
                topic: topic.clone(),
                value: Some(format!("{i:0size$}")),
                timestamp: Some(base + 5 * i),
                ..Outgoing::default()
            })
        })
        .collect();
    let sent: Vec<_> = futures::stream::iter(records.iter().map(|r| producer.send(r)))
        .buffered(500)
        .collect()
        .await;
    assert!(sent.iter().all(Result::is_ok), "every record produced");

    let settings = ConsumerSettings {
        brokers: brokers(),
        topics: format!("{large},{small}"),
        group_id: unique("align-"),
        metadata_refresh: Duration::from_secs(1),
        session_timeout: Duration::from_secs(6),
    };
    let consumer = Consumer::subscribe(&settings, Arc::new(FromZero)).expect("consumer");
    let (tx, mut rx) = mpsc::channel(200);
    let cancel = CancellationToken::new();
    let reader = consumer.spawn_reader(tx, ByteBudget::new(64 * 1024 * 1024), cancel.clone());

    // A worker's pace: 100 records, then a pause.
    let mut delivered: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
    let mut order: Vec<(String, i64)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while order.len() < 2 * PER_TOPIC as usize && tokio::time::Instant::now() < deadline {
        let Ok(Some(feed)) = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await else {
            continue;
        };
        if let Feed::Record(r) = feed {
            let ts = r.timestamp.expect("timestamp");
            delivered.entry(r.topic.clone()).or_default().push((r.offset, ts));
            order.push((r.topic, ts));
            if order.len() % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    cancel.cancel();
    drop(rx);
    let _ = tokio::task::spawn_blocking(move || reader.join()).await;

    for topic in [&large, &small] {
        let offsets: Vec<i64> = delivered[topic].iter().map(|(o, _)| *o).collect();
        assert_eq!(
            offsets,
            (0..PER_TOPIC).collect::<Vec<_>>(),
            "{topic}: every record once, in order"
        );
    }
    // How far ahead in time each record was of the other topic's next
    // undelivered record. Unaligned, the small topic runs seconds ahead;
    // aligned, about the slack (1 s) plus a plan's overshoot.
    let mut next_ts: HashMap<&str, i64> = [(large.as_str(), base), (small.as_str(), base)].into();
    let mut worst = 0;
    for (topic, ts) in &order {
        let other = if topic == &large {
            small.as_str()
        } else {
            large.as_str()
        };
        if next_ts[other] < base + 5 * PER_TOPIC {
            worst = worst.max(ts - next_ts[other]);
        }
        next_ts.insert(
            if topic == &large {
                large.as_str()
            } else {
                small.as_str()
            },
            ts + 5,
        );
    }
    assert!(
        worst <= 1_500,
        "a topic ran {worst} ms ahead of the other while both had records left"
    );
}
