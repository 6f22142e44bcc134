//! Topic administration and the log's watermarks (what status and a
//! rebuild measure against).

use super::*;

/// Creates topics that do not exist yet (existing ones are left alone),
/// replicated as the cluster's `default.replication.factor` says (KIP-464's
/// -1), so a three-broker cluster gets three replicas and a single node one.
#[instrument(skip_all)]
pub async fn create_topics(
    brokers: impl Into<KafkaConnection>,
    topics: &[String],
    partitions: i32,
) -> Result<(), KafkaClientError> {
    let brokers = brokers.into();
    let report = brokers.report();
    let admin: AdminClient<Reporting> = brokers
        .finish(&mut brokers.config())
        .create_with_context(Reporting(Arc::clone(&report)))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(-1)))
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .map_err(|e| report.explain(e))?;
    for result in results {
        if let Err((topic, code)) = result {
            if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                return Err(KafkaClientError::Request(format!("create topic {topic}: {code}")));
            }
        }
    }
    Ok(())
}

/// A group-less client for status: which partitions match, their
/// watermarks, and the timestamp of the record at an offset (the age of the
/// oldest unapplied event). All calls block; run them off the async runtime.
pub struct Inspector {
    inner: std::sync::Mutex<BaseConsumer<Reporting>>,
    report: Arc<ConnectionReport>,
}

impl std::fmt::Debug for Inspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inspector")
    }
}

/// One partition's position in its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLog {
    pub topic: String,
    pub partition: i32,
    pub low: i64,
    pub high: i64,
}

impl Inspector {
    pub fn new(brokers: impl Into<KafkaConnection>) -> Result<Inspector, KafkaClientError> {
        let brokers = brokers.into();
        let mut config = brokers.config();
        config
            .set("group.id", "courseview-inspector")
            .set("enable.auto.commit", "false")
            // The age of the oldest event a worker will apply: never an
            // aborted one's.
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "false")
            // It reads one record per partition: keep librdkafka from
            // prefetching tens of MiB behind it.
            .set("queued.max.messages.kbytes", "1024")
            .set("queued.min.messages", "1")
            .set("fetch.max.bytes", "1048576")
            .set("max.partition.fetch.bytes", "65536")
            // Lag ages are looked for within a short budget: do not let the
            // broker hold a fetch for librdkafka's default 500 ms.
            .set("fetch.wait.max.ms", "50")
            // With a one-message queue every fetch fills it, and librdkafka
            // then waits this long before the partition's next fetch
            // (default 1 s): a status read soon after another found no
            // record within its budget, and a stalled projection looked live.
            .set("fetch.queue.backoff.ms", "10");
        let report = brokers.report();
        let consumer: BaseConsumer<Reporting> = brokers
            .finish(&mut config)
            .create_with_context(Reporting(Arc::clone(&report)))?;
        Ok(Inspector {
            inner: std::sync::Mutex::new(consumer),
            report,
        })
    }

    fn consumer(&self) -> std::sync::MutexGuard<'_, BaseConsumer<Reporting>> {
        // A poisoned lock only means a status call panicked; the client is fine.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every partition of the topics `topics` selects (`^regex` or names), with watermarks.
    pub fn logs(&self, topics: &str) -> Result<Vec<PartitionLog>, KafkaClientError> {
        let consumer = self.consumer();
        let metadata = consumer.fetch_metadata(None, Duration::from_secs(5)).map_err(|e| {
            // Callbacks (the error saying why) are served on poll; this
            // client is polled only to read lag ages.
            let _ = consumer.poll(Duration::from_millis(100));
            self.report.explain(e)
        })?;
        self.report.recovered();
        let pattern = if topics.starts_with('^') {
            Some(regex::Regex::new(topics).map_err(|e| KafkaClientError::Config(format!("bad topic regex: {e}")))?)
        } else {
            None
        };
        let names = topic_subscription(topics);
        let mut logs = Vec::new();
        for topic in metadata.topics() {
            let selected = match &pattern {
                Some(re) => re.is_match(topic.name()),
                None => names.iter().any(|n| n == topic.name()),
            };
            if !selected {
                continue;
            }
            for partition in topic.partitions() {
                let (low, high) = consumer.fetch_watermarks(topic.name(), partition.id(), Duration::from_secs(5))?;
                logs.push(PartitionLog {
                    topic: topic.name().to_owned(),
                    partition: partition.id(),
                    low,
                    high,
                });
            }
        }
        logs.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        Ok(logs)
    }

    /// Per partition, the first offset whose record's timestamp is at or
    /// after `millis` (Kafka's offsets-for-times); the log's end where no
    /// record is that late.
    pub fn offsets_for_time(
        &self,
        partitions: &[PartitionLog],
        millis: i64,
    ) -> Result<HashMap<(String, i32), i64>, KafkaClientError> {
        let consumer = self.consumer();
        let mut tpl = TopicPartitionList::new();
        for log in partitions {
            tpl.add_partition_offset(&log.topic, log.partition, Offset::Offset(millis))?;
        }
        let found = consumer.offsets_for_times(tpl, Duration::from_secs(10))?;
        let mut out = HashMap::new();
        for log in partitions {
            let offset = match found.find_partition(&log.topic, log.partition).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                // No record at or after the time: the end of the log.
                Some(Offset::End) | None => log.high,
                Some(other) => {
                    return Err(KafkaClientError::Config(format!(
                        "offsets-for-times answered {other:?} for {}/{}",
                        log.topic, log.partition
                    )))
                }
            };
            out.insert((log.topic.clone(), log.partition), offset);
        }
        Ok(out)
    }

    /// The timestamp (ms) of the record at each (topic, partition, offset),
    /// for those that answer within `timeout`.
    pub fn timestamps_at(
        &self,
        positions: &[(String, i32, i64)],
        timeout: Duration,
    ) -> Result<HashMap<(String, i32), i64>, KafkaClientError> {
        let mut found = HashMap::new();
        if positions.is_empty() {
            return Ok(found);
        }
        let consumer = self.consumer();
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, offset) in positions {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
        }
        consumer.assign(&tpl)?;
        let deadline = std::time::Instant::now() + timeout;
        while found.len() < positions.len() && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
                // The first record at or after the offset: the stored offset
                // may sit on a commit marker or an offset compaction removed,
                // where no record is.
                let key = (m.topic().to_owned(), m.partition());
                let wanted = !found.contains_key(&key)
                    && positions
                        .iter()
                        .any(|(t, p, o)| t == m.topic() && *p == m.partition() && m.offset() >= *o);
                if let (true, Some(ts)) = (wanted, m.timestamp().to_millis()) {
                    found.insert(key, ts);
                }
            }
        }
        consumer.unassign()?;
        Ok(found)
    }
}
