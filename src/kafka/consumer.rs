//! The consumer that feeds projections: a `BaseConsumer` polled on its own
//! thread, assigning partitions at the projection's stored offsets in the
//! rebalance callback.

use super::*;

/// Consumer settings shared by every projection worker.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// The cluster and the user's client properties.
    pub brokers: KafkaConnection,
    /// A `^regex` or a comma-separated list of topic names.
    pub topics: String,
    pub group_id: String,
    /// How often to look for new topics matching the regex.
    pub metadata_refresh: Duration,
    pub session_timeout: Duration,
    /// What to do with a partition whose stored offset the log does not hold.
    pub on_gap: OnGap,
    /// Where the reader posts partitions whose fetch keeps failing at one
    /// offset (the worker's readiness, metrics and registry entry read it).
    pub stuck: Arc<StuckBoard>,
}

/// A partition whose fetch fails again and again at one offset: a record
/// that cannot be read at all cannot be dead-lettered, so it must be seen.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StuckPartition {
    pub topic: String,
    pub partition: i32,
    /// The offset the consumer cannot get past.
    pub offset: i64,
    /// The error the fetch keeps failing with.
    pub reason: String,
}

/// The partitions a reader finds stuck, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct StuckBoard(std::sync::Mutex<Vec<StuckPartition>>);

impl StuckBoard {
    pub fn now(&self) -> Vec<StuckPartition> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    fn replace(&self, stuck: Vec<StuckPartition>) {
        if let Ok(mut v) = self.0.lock() {
            *v = stuck;
        }
    }
}

/// How long a partition with records ahead of it may make no progress
/// while fetch errors repeat before it is reported stuck.
pub const STUCK_AFTER: Duration = Duration::from_secs(10);

/// Watches positions against fetch errors, on the reader thread.
#[derive(Debug, Default)]
struct StuckWatch {
    /// The last fetch error that is not about reaching the cluster, and when.
    last_error: Option<(String, std::time::Instant)>,
    /// Per partition: the position last seen and since when it has not moved.
    still: HashMap<(String, i32), (i64, std::time::Instant)>,
    reported: Vec<StuckPartition>,
}

impl StuckWatch {
    fn error(&mut self, error: String) {
        self.last_error = Some((error, std::time::Instant::now()));
    }

    /// No fetch error for a while.
    fn quiet(&self) -> bool {
        self.last_error
            .as_ref()
            .is_none_or(|(_, at)| at.elapsed() >= STUCK_AFTER)
    }

    /// Judges every assigned partition; returns the stuck ones when that changed.
    fn judge(
        &mut self,
        consumer: &BaseConsumer<AssignContext>,
        starts: &HashMap<(String, i32), i64>,
        align: &super::align::Align,
    ) -> Option<Vec<StuckPartition>> {
        let now = std::time::Instant::now();
        let positions = consumer.position().ok()?;
        let mut stuck = Vec::new();
        let mut seen = HashMap::new();
        for elem in positions.elements() {
            // Paused for time, it is not read: not stuck either.
            if align.is_paused(elem.topic(), elem.partition()) {
                continue;
            }
            let key = (elem.topic().to_owned(), elem.partition());
            // Nothing consumed since assignment: the position is where it was assigned.
            let position = match elem.offset() {
                Offset::Offset(at) => at,
                _ => match starts.get(&key) {
                    Some(at) => *at,
                    None => continue,
                },
            };
            let since = match self.still.get(&key) {
                Some((at, since)) if *at == position => *since,
                _ => now,
            };
            seen.insert(key.clone(), (position, since));
            let failing = self
                .last_error
                .as_ref()
                .filter(|(_, at)| now.duration_since(*at) < STUCK_AFTER / 2);
            if let Some((reason, _)) = failing {
                // Records after the position (asked only of a partition
                // that has not moved for long while fetches fail).
                if now.duration_since(since) >= STUCK_AFTER
                    && consumer
                        .fetch_watermarks(&key.0, key.1, Duration::from_secs(1))
                        .is_ok_and(|(_, high)| high > position)
                {
                    stuck.push(StuckPartition {
                        topic: key.0,
                        partition: key.1,
                        offset: position,
                        reason: reason.clone(),
                    });
                }
            }
        }
        self.still = seen;
        (stuck != self.reported).then(|| {
            self.reported = stuck.clone();
            stuck
        })
    }
}

/// What the reader hands the worker, in log order per partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feed {
    /// Records polled one after another, in the order polled (at most
    /// [`READ_CHUNK`]): one hand-over per run, not per record.
    Records(Vec<Record>),
    /// The consumer's position moved past offsets that are never delivered
    /// (transaction commit/abort markers, aborted records): everything
    /// before `next` has been handed over, so it may be stored as read.
    Advance { topic: String, partition: i32, next: i64 },
    /// The reader paused its partitions, as the worker asked (an operator's
    /// pause): every record before this was handed over, and none follows
    /// until the worker lifts the hold. The consumer stays in its group.
    Held,
}

/// Records the reader hands over at once at most: what librdkafka has
/// fetched already goes over in runs, not one channel send (and one worker
/// wake-up) per record.
pub const READ_CHUNK: usize = 256;

/// How often an idle reader looks for positions that moved past markers.
const ADVANCE_EVERY: Duration = Duration::from_millis(500);

/// How often the reader judges which partitions ran ahead in time.
const ALIGN_EVERY: Duration = Duration::from_millis(50);

/// `max.partition.fetch.bytes` of courseview's consumers: small steps, so
/// that partitions stay in step by time (`align`).
const MAX_PARTITION_FETCH_BYTES: i64 = 65_536;

/// How often a reader compares the ids of the topics it reads with the
/// cluster's (a re-created topic keeps its name, and librdkafka its
/// position in it).
const IDENTITY_EVERY: Duration = Duration::from_secs(5);

/// Why the reader thread stopped. Each calls for something different from
/// the worker: nothing (it asked), or a fresh consumer (assignment failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReaderExit {
    /// The worker cancelled it.
    Cancelled,
    /// The worker dropped its end of the channel.
    ReceiverGone,
    /// Partitions were assigned but their stored offsets could not be
    /// read; they were left unassigned rather than started anywhere else.
    AssignmentFailed(String),
    /// A fetch position fell outside the log (retention overtook it, or the
    /// topic was re-created): a fresh assignment finds and records the gap.
    OffsetOutOfRange(String),
    /// librdkafka raised a fatal error (a fenced or unreleased instance,
    /// and the like): this client can do nothing more, so the process
    /// ends and its supervisor restarts it.
    Fatal(String),
}

/// Caps the bytes of records read but not yet applied, so a run of large
/// records cannot grow the worker's memory without bound.
#[derive(Debug)]
pub struct ByteBudget {
    limit: usize,
    used: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

impl ByteBudget {
    pub fn new(limit: usize) -> Arc<ByteBudget> {
        Arc::new(ByteBudget {
            limit: limit.max(1),
            used: std::sync::Mutex::new(0),
            freed: std::sync::Condvar::new(),
        })
    }

    fn used(&self) -> std::sync::MutexGuard<'_, usize> {
        // A poisoned lock only means a holder panicked; the count is still right.
        self.used.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Blocks until `n` bytes fit (a record larger than the whole budget
    /// passes alone), or `cancel` fires (returns false).
    pub fn acquire(&self, n: usize, cancel: &CancellationToken) -> bool {
        let mut used = self.used();
        while *used > 0 && *used + n > self.limit {
            if cancel.is_cancelled() {
                return false;
            }
            used = self
                .freed
                .wait_timeout(used, Duration::from_millis(100))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        *used += n;
        true
    }

    /// Takes `n` bytes if they fit now (as [`ByteBudget::acquire`] would
    /// without waiting); false, taking nothing, if it would have to wait.
    pub fn try_acquire(&self, n: usize) -> bool {
        let mut used = self.used();
        if *used > 0 && *used + n > self.limit {
            return false;
        }
        *used += n;
        true
    }

    pub fn release(&self, n: usize) {
        let mut used = self.used();
        *used = used.saturating_sub(n);
        self.freed.notify_all();
    }

    pub fn in_use(&self) -> usize {
        *self.used()
    }
}

/// The worker's request that the reader hold (read nothing, stay in the
/// group) or read. Requests are numbered, odd ones to hold, so a request
/// the reader has not seen yet is never lost behind a later one.
#[derive(Debug, Default)]
pub struct HoldRequest(std::sync::atomic::AtomicU64);

impl HoldRequest {
    pub fn new(hold: bool) -> Self {
        HoldRequest(std::sync::atomic::AtomicU64::new(u64::from(hold)))
    }

    /// Asks to hold or to read; nothing new if that is already asked.
    /// Only the worker asks, so this read-then-add does not race.
    pub fn set(&self, hold: bool) {
        if self.holding() != hold {
            self.0.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
    }

    pub fn holding(&self) -> bool {
        self.read().1
    }

    /// The request's number, and whether it asks to hold.
    fn read(&self) -> (u64, bool) {
        let n = self.0.load(std::sync::atomic::Ordering::Acquire);
        (n, n % 2 == 1)
    }
}

struct AssignContext {
    group: String,
    offsets: Arc<dyn OffsetSource>,
    on_gap: OnGap,
    /// How long an assignment waits for the stored offsets.
    patience: Duration,
    /// Set when an assignment could not be made; the reader stops on it.
    failed: Arc<std::sync::Mutex<Option<String>>>,
    report: Arc<ConnectionReport>,
    /// Set once partitions (possibly none) are assigned at stored offsets:
    /// the consumer then follows its generation, records or not.
    assigned: Arc<std::sync::atomic::AtomicBool>,
    /// Where each assigned partition started (its position until a record
    /// of it is consumed).
    starts: Arc<std::sync::Mutex<HashMap<(String, i32), i64>>>,
    /// librdkafka's words for the last error that is not about reaching
    /// the cluster (a fetch error's poll result carries only its code).
    last_reason: Arc<std::sync::Mutex<Option<String>>>,
    /// The topic ids the assigned partitions are read under: librdkafka
    /// goes on fetching at the same position when a topic is re-created
    /// under a running consumer, so the reader compares them now and then.
    reading: Arc<std::sync::Mutex<HashMap<String, String>>>,
    /// A client of its own that asks for topic ids: asked on the consumer's
    /// own handle, the answer's metadata would be taken for the consumer's.
    describer: Arc<Describer>,
    /// Raised by the worker while an operator pauses the projection:
    /// partitions assigned meanwhile are paused as soon as they are taken.
    hold: Arc<HoldRequest>,
    /// Counts assignments and revocations: the reader's time alignment
    /// starts over after each (an assignment resumes its partitions).
    rebalances: std::sync::atomic::AtomicU64,
}

/// The admin client that describes topics for a consumer.
type Describer = rdkafka::admin::AdminClient<super::report::Reporting>;

impl ClientContext for AssignContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.report.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if self.report.error(&error, reason) {
            return;
        }
        let mut last = self
            .last_reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A fetch error repeats every fetch: said once per change of words
        // (the stuck watch reports a partition it stops).
        if last.as_deref() != Some(reason) {
            warn!(group = %self.group, %error, reason, "Kafka client error.");
        }
        *last = Some(reason.to_owned());
    }
}

impl ConsumerContext for AssignContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        self.rebalances.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // The group answered: whatever kept the cluster out of reach is over.
                self.report.recovered();
                // Never start a partition anywhere but at its stored offset:
                // the group's committed offsets may belong to another
                // generation. Unable to tell it, leave them unassigned and
                // let the worker rejoin with a fresh consumer.
                let stored = match self.load_offsets_patiently() {
                    Ok(map) => map,
                    Err(e) => return self.refuse(consumer, "Cannot load stored offsets", e),
                };
                let identities = match self.identities(tpl) {
                    Ok(identities) => identities,
                    Err(e) => return self.refuse(consumer, "Cannot check the topics' identity", e),
                };
                if let Ok(mut reading) = self.reading.lock() {
                    reading.clone_from(&identities.now);
                }
                let mut assigned = TopicPartitionList::new();
                for elem in tpl.elements() {
                    let (topic, partition) = (elem.topic(), elem.partition());
                    // No stored offset: this generation never read the
                    // partition, so it starts at offset 0, and a log that
                    // no longer starts there is a retention gap too.
                    let at = stored.get(&(topic.to_owned(), partition)).copied().unwrap_or(0);
                    let identity = identities.of(topic, partition);
                    let offset = match self.check_stored(consumer, topic, partition, at, identity) {
                        Ok(Some(offset)) => offset,
                        // Stopped at a gap: left unassigned, reported.
                        Ok(None) => continue,
                        Err(e) => return self.refuse(consumer, "Cannot check stored offsets against the log", e),
                    };
                    if let Err(e) = assigned.add_partition_offset(topic, partition, offset) {
                        warn!(error = %e, "Cannot set assigned offset.");
                    }
                    if let (Offset::Offset(at), Ok(mut starts)) = (offset, self.starts.lock()) {
                        starts.insert((topic.to_owned(), partition), at);
                    }
                }
                info!(group = %self.group, partitions = assigned.count(), "Partitions assigned at stored offsets.");
                if let Err(e) = consumer.assign(&assigned) {
                    warn!(group = %self.group, error = %e, "Assignment failed.");
                    *self.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e.to_string());
                } else {
                    // Held: taken, to keep the group steady, but not read.
                    // Paused before this callback returns, so no record of
                    // them reaches a poll. Not held: resumed, since
                    // librdkafka keeps a partition's pause across its
                    // revocation, and one paused during a hold and taken
                    // back later would never be read again.
                    let (held, done) = if self.hold.holding() {
                        (true, consumer.pause(&assigned))
                    } else {
                        (false, consumer.resume(&assigned))
                    };
                    if let Err(e) = done {
                        warn!(group = %self.group, error = %e, held, "Cannot pause or resume the partitions just assigned.");
                    }
                    self.assigned.store(true, std::sync::atomic::Ordering::Release);
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.assigned.store(false, std::sync::atomic::Ordering::Release);
                info!(group = %self.group, partitions = tpl.count(), "Partitions revoked.");
                if let Err(e) = consumer.unassign() {
                    warn!(group = %self.group, error = %e, "Unassign failed.");
                }
            }
            other => {
                self.assigned.store(false, std::sync::atomic::Ordering::Release);
                warn!(group = %self.group, error = ?other, "Rebalance error; dropping assignment.");
                let _ = consumer.unassign();
            }
        }
    }
}

impl AssignContext {
    /// Takes no partitions, and says why; the reader stops on it.
    fn refuse(&self, consumer: &BaseConsumer<Self>, what: &str, error: String) {
        warn!(group = %self.group, %error, "{what}; not taking the partitions.");
        let _ = consumer.unassign();
        *self.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error);
    }

    /// Where to start a partition stored at `at`: there when the log holds
    /// it; otherwise the gap is recorded and the policy says (`None`: stop).
    fn check_stored(
        &self,
        consumer: &BaseConsumer<Self>,
        topic: &str,
        partition: i32,
        at: i64,
        identity: Identity<'_>,
    ) -> Result<Option<Offset>, String> {
        let start = self.start_at(consumer, topic, partition, at, identity)?;
        // Going on: this is the log the partition is read from now. A
        // partition stopped at a gap keeps the old id, so it stays stopped.
        if let (Some(_), Identity { now: Some(now), stored }) = (start, identity) {
            if stored != Some(now) {
                self.patiently("record the topic's id", || {
                    self.offsets.record_topic_id(topic, partition, stored, now)
                })?;
            }
        }
        Ok(start)
    }

    /// The topics' ids now and as stored with the offsets, for the
    /// partitions being assigned.
    fn identities(&self, tpl: &TopicPartitionList) -> Result<Identities, String> {
        let elements = tpl.elements();
        let mut topics: Vec<&str> = elements.iter().map(|e| e.topic()).collect();
        topics.sort_unstable();
        topics.dedup();
        let now = super::topic_id::topic_ids(self.describer.inner(), &topics, Duration::from_secs(5))
            .map_err(|e| format!("topic ids of {}: {e}", topics.join(", ")))?;
        let stored = self.patiently("load stored topic ids", || self.offsets.stored_topic_ids())?;
        Ok(Identities { now, stored })
    }

    fn start_at(
        &self,
        consumer: &BaseConsumer<Self>,
        topic: &str,
        partition: i32,
        at: i64,
        identity: Identity<'_>,
    ) -> Result<Option<Offset>, String> {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(5))
            .map_err(|e| format!("watermarks of {topic}/{partition}: {e}"))?;
        let found = match identity {
            // Read from another topic of that name: whatever the new log's
            // length, the stored offset is not a position in it.
            Identity {
                stored: Some(old),
                now: Some(new),
            } if old != new && at > 0 => Some(Gap::recreated(topic, partition, at, (low, high), old, new)),
            _ => Gap::find(topic, partition, at, low, high),
        };
        let Some(gap) = found else {
            return Ok(Some(Offset::Offset(at)));
        };
        if self.on_gap == OnGap::Accepted && at == 0 {
            // A rebuild told --allow-partial-history, at a partition it has
            // not read yet: the missing start is what it was told about.
            return Ok(Some(Offset::Offset(gap.resume_at())));
        }
        if self.on_gap == OnGap::Accepted {
            // Retention overtook what it was reading: not what it was told
            // about, so the gap is recorded (and the rebuild goes on past
            // it, keeping it on record).
            self.patiently("record a gap", || self.offsets.record_gap(&gap, OnGap::Continue))?;
            tracing::error!(group = %self.group, gap = %gap.describe(), "Gap in the log while rebuilding with --allow-partial-history: recorded, going on from the log's start.");
            return Ok(Some(Offset::Offset(gap.resume_at())));
        }
        self.patiently("record a gap", || self.offsets.record_gap(&gap, self.on_gap))?;
        if self.on_gap == OnGap::Stop {
            tracing::error!(
                group = %self.group,
                gap = %gap.describe(),
                "Gap in the log: this partition is stopped (COURSEVIEW_ON_GAP=stop). Rebuild the projection (courseview rebuild, with --allow-partial-history if the log no longer starts at 0), or restart with COURSEVIEW_ON_GAP=continue to go on from offset {}.",
                gap.resume_at()
            );
            return Ok(None);
        }
        tracing::error!(
            group = %self.group,
            gap = %gap.describe(),
            resume_at = gap.resume_at(),
            "Gap in the log: going on from the log's start (COURSEVIEW_ON_GAP=continue); the gap stays reported until a rebuild."
        );
        Ok(Some(Offset::Offset(gap.resume_at())))
    }

    fn load_offsets_patiently(&self) -> Result<HashMap<(String, i32), i64>, String> {
        self.patiently("load stored offsets", || self.offsets.stored_offsets())
    }

    /// Runs a call to the offset store, retrying what may pass until the
    /// assignment's patience runs out (the rebalance waits meanwhile).
    fn patiently<T>(&self, what: &str, mut call: impl FnMut() -> Result<T, OffsetsUnavailable>) -> Result<T, String> {
        let deadline = std::time::Instant::now() + self.patience;
        let mut attempt = 0_u32;
        loop {
            attempt += 1;
            match call() {
                Ok(done) => return Ok(done),
                Err(e) if !e.retry || std::time::Instant::now() >= deadline => return Err(e.reason),
                Err(e) => {
                    warn!(group = %self.group, attempt, error = %e.reason, "Cannot {what}; retrying.");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
}

/// Topic ids at an assignment: the cluster's now, and those the offsets
/// were stored under.
struct Identities {
    now: HashMap<String, String>,
    stored: HashMap<(String, i32), String>,
}

impl Identities {
    fn of(&self, topic: &str, partition: i32) -> Identity<'_> {
        Identity {
            stored: self.stored.get(&(topic.to_owned(), partition)).map(String::as_str),
            now: self.now.get(topic).map(String::as_str),
        }
    }
}

/// One partition's topic id as stored and now (`None`: not known).
#[derive(Debug, Clone, Copy)]
struct Identity<'a> {
    stored: Option<&'a str>,
    now: Option<&'a str>,
}

/// A group consumer of the projection's topics.
pub struct Consumer {
    inner: Arc<BaseConsumer<AssignContext>>,
    group: String,
    failed: Arc<std::sync::Mutex<Option<String>>>,
    assigned: Arc<std::sync::atomic::AtomicBool>,
    starts: Arc<std::sync::Mutex<HashMap<(String, i32), i64>>>,
    last_reason: Arc<std::sync::Mutex<Option<String>>>,
    stuck: Arc<StuckBoard>,
    reading: Arc<std::sync::Mutex<HashMap<String, String>>>,
    backlog: Arc<std::sync::atomic::AtomicI64>,
    describer: Arc<Describer>,
    hold: Arc<HoldRequest>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").field("group", &self.group).finish()
    }
}

impl Consumer {
    #[instrument(skip_all, fields(group = %settings.group_id))]
    /// `hold`: while raised, the reader keeps the consumer in its group but
    /// reads nothing (see [`Feed::Held`]).
    pub fn subscribe(
        settings: &ConsumerSettings,
        offsets: Arc<dyn OffsetSource>,
        hold: Arc<HoldRequest>,
    ) -> Result<Consumer, KafkaClientError> {
        let failed = Arc::new(std::sync::Mutex::new(None));
        let assigned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let starts = Arc::default();
        let last_reason = Arc::default();
        let reading = Arc::default();
        let describer: Arc<Describer> = Arc::new(
            settings
                .brokers
                .finish(&mut settings.brokers.config())
                .create_with_context(super::report::Reporting(settings.brokers.report()))?,
        );
        let context = AssignContext {
            group: settings.group_id.clone(),
            offsets,
            on_gap: settings.on_gap,
            // Well inside the rebalance timeout, so the group never waits on us.
            patience: settings.session_timeout / 2,
            failed: Arc::clone(&failed),
            report: settings.brokers.report(),
            assigned: Arc::clone(&assigned),
            starts: Arc::clone(&starts),
            last_reason: Arc::clone(&last_reason),
            reading: Arc::clone(&reading),
            describer: Arc::clone(&describer),
            hold: Arc::clone(&hold),
            rebalances: std::sync::atomic::AtomicU64::default(),
        };
        let mut config = settings.brokers.config();
        config
            .set("group.id", &settings.group_id)
            .set("client.id", format!("courseview-{}", settings.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Every partition is assigned at an explicit offset; a position
            // that falls out of the log later is an error to report (a
            // gap), never a silent jump to the log's start.
            .set("auto.offset.reset", "error")
            // Debezium's exactly-once relay writes transactions: never apply
            // an aborted event.
            .set("isolation.level", "read_committed")
            .set("session.timeout.ms", settings.session_timeout.as_millis().to_string())
            .set(
                "topic.metadata.refresh.interval.ms",
                settings.metadata_refresh.as_millis().to_string(),
            )
            .set("partition.assignment.strategy", "range,roundrobin")
            // Return fetches within 50 ms even when the broker holds them for
            // more data: freshness is bounded by this wait.
            .set("fetch.wait.max.ms", "50")
            // librdkafka prefetches up to 64 MiB per consumer by default; a
            // batch needs far less, and worker memory is a target (PERFORMANCE.md).
            .set("queued.max.messages.kbytes", "8192")
            // The kbytes bound counts payloads only; each queued message also
            // carries a librdkafka op of a few hundred bytes, and the default
            // of 100,000 messages per partition made those the largest heap
            // consumer (heaptrack). Queues fill to this only when the log
            // holds more, so it made RSS grow with the log up to the cap.
            // At 1,000 per partition the queued ops and the fetch buffers
            // they pin were still 17 of the rebuild process's 37 MiB heap
            // peak (heaptrack at 200 k and 1 M events); 500 keep half a
            // batch ready on each partition.
            .set("queued.min.messages", "500")
            // A partition whose queue filled waits this long before its next
            // fetch; with queues this short librdkafka's default (1 s) can
            // leave one empty meanwhile (its documentation says as much).
            .set("fetch.queue.backoff.ms", "20")
            // A fetch response is held whole while it is parsed: at 4 MiB
            // two of them were 8 of the worker's 35 MiB heap peak
            // (heaptrack, 100 k events); 2 MiB is still ~3,000 records,
            // more than a batch, and the broker is not the worker's limit.
            .set("fetch.max.bytes", super::config::FETCH_MAX_BYTES.to_string())
            // Each partition's share of a fetch is counted in bytes: with
            // librdkafka's 1 MiB a topic of small records delivers far more
            // history per fetch than one of large records, and the time
            // alignment (`align`) drops the prefetched records of each
            // partition it pauses. 64 KiB per partition keeps the steps
            // small: 0.33 documents written per event at 200 k, against 0.67
            // at 1 MiB and 0.69 unaligned (PERFORMANCE.md). A user's
            // `max.partition.fetch.bytes` is applied after this one.
            .set("max.partition.fetch.bytes", MAX_PARTITION_FETCH_BYTES.to_string());
        let consumer: BaseConsumer<AssignContext> =
            settings.brokers.finish(&mut config).create_with_context(context)?;
        let topics = topic_subscription(&settings.topics);
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&refs)?;
        info!(topics = %settings.topics, "Subscribed.");
        Ok(Consumer {
            inner: Arc::new(consumer),
            group: settings.group_id.clone(),
            failed,
            assigned,
            starts,
            last_reason,
            stuck: Arc::clone(&settings.stuck),
            reading,
            backlog: Arc::default(),
            describer,
            hold,
        })
    }

    /// Polls on a dedicated thread and sends records into `tx`, holding
    /// their bytes in `budget` until the worker releases them, until
    /// cancelled or the receiver is gone. Rebalances run on that thread, and
    /// so does leaving the group at the end: librdkafka may call back into
    /// the rebalance handler there, which must not run on an async thread.
    /// Whether the group has assigned this consumer its partitions (at
    /// their stored offsets) and not revoked them since.
    /// Records in the log not yet handed over, over the assigned partitions
    /// (measured every half second by the reader): how far behind it is.
    pub fn backlog(&self) -> Arc<std::sync::atomic::AtomicI64> {
        Arc::clone(&self.backlog)
    }

    pub fn assigned(&self) -> Arc<std::sync::atomic::AtomicBool> {
        Arc::clone(&self.assigned)
    }

    /// Starts the thread that polls and hands records over in runs of at
    /// most `longest_run` (capped at [`READ_CHUNK`]).
    pub fn spawn_reader(
        &self,
        tx: mpsc::Sender<Feed>,
        budget: Arc<ByteBudget>,
        longest_run: usize,
        cancel: CancellationToken,
    ) -> std::thread::JoinHandle<ReaderExit> {
        let longest_run = longest_run.clamp(1, READ_CHUNK);
        let consumer = Arc::clone(&self.inner);
        let failed = Arc::clone(&self.failed);
        let (starts, board) = (Arc::clone(&self.starts), Arc::clone(&self.stuck));
        let last_reason = Arc::clone(&self.last_reason);
        let reading = Arc::clone(&self.reading);
        let backlog = Arc::clone(&self.backlog);
        let describer = Arc::clone(&self.describer);
        let hold = Arc::clone(&self.hold);
        let group = self.group.clone();
        std::thread::Builder::new()
            .name(format!("kafka-{group}"))
            .spawn(move || {
                let mut advanced: HashMap<(String, i32), i64> = HashMap::new();
                let mut last_check = std::time::Instant::now();
                let mut last_identity = std::time::Instant::now();
                let mut watch = StuckWatch::default();
                // The last request of the worker's this thread acted on,
                // and whether it paused the assignment for it.
                let (mut seen, mut held) = (0, false);
                let mut align = super::align::Align::default();
                let mut last_align = std::time::Instant::now();
                let mut rebalances = 0;
                let exit = loop {
                    if cancel.is_cancelled() {
                        break ReaderExit::Cancelled;
                    }
                    // Fatal: this client can do nothing more (librdkafka
                    // says so through poll or its error callback).
                    if let Some(reason) = fatal_error(&consumer) {
                        break ReaderExit::Fatal(reason);
                    }
                    // Here, between polls, everything polled is on the
                    // channel: pausing now, librdkafka will resume each
                    // partition right after the last record handed over
                    // (its pause keeps that position, and drops what it had
                    // fetched beyond it). Polling goes on while held, so the
                    // consumer keeps its place in the group.
                    // Each request is answered, even one undone and made
                    // again since this thread last looked: the worker
                    // waits for a `Held` after each request to hold.
                    let (request, want) = hold.read();
                    if request != seen {
                        seen = request;
                        let assignment = consumer.assignment().unwrap_or_default();
                        let done = if want {
                            consumer.pause(&assignment)
                        } else {
                            consumer.resume(&assignment)
                        };
                        if let Err(e) = done {
                            warn!(group = %group, error = %e, held = want, "Cannot pause or resume the partitions.");
                        }
                        held = want;
                        // Every partition paused or resumed: none is
                        // paused for time any more.
                        let _ = align.reset();
                        if held && tx.blocking_send(Feed::Held).is_err() {
                            break ReaderExit::ReceiverGone;
                        }
                    }
                    // Here, before the next poll, every record polled so far
                    // is on the channel, so a position read now is never
                    // ahead of what was sent. (After a poll it could be.)
                    // Held, positions do not move and a partition is not
                    // stuck: nothing is handed over or judged.
                    if !held && last_check.elapsed() >= ADVANCE_EVERY {
                        last_check = std::time::Instant::now();
                        let positions = consumer.position().unwrap_or_default();
                        backlog.store(log_backlog(&consumer, &positions), std::sync::atomic::Ordering::Relaxed);
                        let moved = positions_moved(&positions, &mut advanced);
                        if moved.into_iter().any(|feed| tx.blocking_send(feed).is_err()) {
                            break ReaderExit::ReceiverGone;
                        }
                        let starts = starts.lock().map(|s| s.clone()).unwrap_or_default();
                        if let Some(stuck) = watch.judge(&consumer, &starts, &align) {
                            report_stuck(&group, &board, stuck);
                        }
                        // Errors over: the same words, if they return, are said again.
                        if watch.quiet() {
                            if let Ok(mut said) = last_reason.lock() {
                                *said = None;
                            }
                        }
                    }
                    // The assignment changed: start over, and resume what
                    // this alignment had paused, whether or not the
                    // assignment did (unless an operator holds them all).
                    let now_rebalances = consumer.context().rebalances.load(std::sync::atomic::Ordering::Relaxed);
                    if now_rebalances != rebalances {
                        rebalances = now_rebalances;
                        let resume = align.reset();
                        if !held && !resume.is_empty() {
                            let moves = super::align::Moves {
                                pause: Vec::new(),
                                resume,
                            };
                            move_partitions(&consumer, &mut align, &moves, &group);
                        }
                    }
                    if !held && last_align.elapsed() >= ALIGN_EVERY {
                        last_align = std::time::Instant::now();
                        align_partitions(&consumer, &mut align, &group);
                    }
                    if last_identity.elapsed() >= IDENTITY_EVERY {
                        last_identity = std::time::Instant::now();
                        if let Some(reason) = recreated(&describer, &reading) {
                            // As a position out of the log: the worker rejoins,
                            // and the assignment records the log reset.
                            break ReaderExit::OffsetOutOfRange(reason);
                        }
                    }
                    let polling = std::time::Instant::now();
                    let polled = consumer.poll(Duration::from_millis(100));
                    align.polled(polling.elapsed());
                    if let Some(reason) = failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
                        break ReaderExit::AssignmentFailed(reason);
                    }
                    let error = match polled {
                        None => None,
                        Some(Err(e)) => Some(e),
                        Some(Ok(message)) => {
                            // What librdkafka has fetched already is polled
                            // on at once and handed over as one run. The run
                            // ends before anything the checks above must see
                            // between polls: a pause or resume for time, a
                            // rebalance, a failed assignment, an error.
                            let mut chunk = Vec::with_capacity(longest_run.min(64));
                            let mut next = Some(message);
                            let (mut error, mut gone) = (None, false);
                            while let Some(message) = next.take() {
                                let record = to_record(&message);
                                drop(message);
                                let moves = align.delivered(&record.topic, record.partition, record.timestamp);
                                let size = record.size();
                                if !budget.try_acquire(size) {
                                    // Room is freed only as the worker takes
                                    // records: hand over what is in hand first.
                                    if !hand_over(&tx, &mut chunk, &mut advanced) {
                                        gone = true;
                                        break;
                                    }
                                    if !budget.acquire(size, &cancel) {
                                        // Cancelled: the run in hand went
                                        // over above, and this record is
                                        // read again from the stored offset.
                                        break;
                                    }
                                }
                                chunk.push(record);
                                if let Some(moves) = moves {
                                    // Paused right after this record, before
                                    // the next poll: it resumes right after it.
                                    move_partitions(&consumer, &mut align, &moves, &group);
                                    break;
                                }
                                if chunk.len() >= longest_run
                                    || consumer.context().rebalances.load(std::sync::atomic::Ordering::Relaxed)
                                        != rebalances
                                {
                                    break;
                                }
                                match consumer.poll(Duration::ZERO) {
                                    None => {}
                                    Some(Ok(message)) => next = Some(message),
                                    Some(Err(e)) => error = Some(e),
                                }
                                if failed
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                                    .is_some()
                                {
                                    // The reader ends for it below; this
                                    // record is not handed over.
                                    next = None;
                                }
                            }
                            if cancel.is_cancelled() {
                                break ReaderExit::Cancelled;
                            }
                            if gone || !hand_over(&tx, &mut chunk, &mut advanced) {
                                break ReaderExit::ReceiverGone;
                            }
                            if let Some(reason) =
                                failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
                            {
                                break ReaderExit::AssignmentFailed(reason);
                            }
                            error
                        }
                    };
                    match error {
                        None => {}
                        Some(e)
                            if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AutoOffsetReset) =>
                        {
                            break ReaderExit::OffsetOutOfRange(e.to_string());
                        }
                        Some(e @ KafkaError::MessageConsumptionFatal(_)) => {
                            break ReaderExit::Fatal(fatal_error(&consumer).unwrap_or_else(|| e.to_string()));
                        }
                        // Reaching the cluster failed: the context said so, once.
                        Some(e) if report::reach_failure(&e) => {
                            debug!(group = %group, error = %e, "Kafka poll error.")
                        }
                        // A fetch error: if it repeats at one offset, the
                        // stuck watch reports the partition.
                        Some(e) => {
                            debug!(group = %group, error = %e, "Kafka poll error.");
                            // The error callback ran first, with the detail.
                            let said = last_reason.lock().ok().and_then(|r| r.clone());
                            watch.error(said.unwrap_or_else(|| e.to_string()));
                        }
                    }
                };
                // Whatever it reported stuck is no longer this reader's.
                report_stuck(&group, &board, Vec::new());
                // Leave the group here, on the thread that serves callbacks.
                consumer.unsubscribe();
                debug!(group = %group, exit = ?exit, "Reader stopped.");
                exit
            })
            .unwrap_or_else(|e| panic!("cannot spawn the Kafka reader thread: {e}"))
    }

    /// Commits next-offsets to the consumer group (for lag tools). Best
    /// effort: the stored offsets in MongoDB are the source of truth.
    pub fn commit(&self, offsets: &[(String, i32, i64)]) {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, offset) in offsets {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
        }
        if let Err(e) = self.inner.commit(&tpl, CommitMode::Async) {
            debug!(group = %self.group, error = %e, "Group commit failed.");
        }
    }

    /// Makes librdkafka raise a fatal error on this consumer, through its
    /// own entry point for testing (`rd_kafka_test_fatal_error`): no broker
    /// can fence a consumer without static membership (courseview reserves
    /// `group.instance.id`), and what follows a fatal error must be tested.
    /// Returns whether it was raised (only the first one is).
    #[doc(hidden)]
    #[allow(unsafe_code)]
    pub fn raise_fatal_error(&self, reason: &str) -> bool {
        let Ok(reason) = std::ffi::CString::new(reason) else {
            return false;
        };
        // SAFETY: the client pointer is valid while `self.inner` lives, and
        // librdkafka copies `reason` before returning.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                self.inner.client().native_ptr(),
                rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_FENCED_INSTANCE_ID,
                reason.as_ptr(),
            )
        };
        err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
    }

    /// Currently assigned (topic, partition) pairs.
    pub fn assignment(&self) -> Vec<(String, i32)> {
        self.inner
            .assignment()
            .map(|tpl| {
                tpl.elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Moves each assigned partition that has an offset in `stored` to
    /// it (paused ones too: they resume there). Fails, naming the
    /// partitions, if any could not be moved (revoked meanwhile, say).
    pub async fn seek_to(&self, stored: &HashMap<(String, i32), i64>) -> Result<(), String> {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in self.assignment() {
            if let Some(offset) = stored.get(&(topic.clone(), partition)) {
                tpl.add_partition_offset(&topic, partition, Offset::Offset(*offset))
                    .map_err(|e| e.to_string())?;
            }
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        let inner = Arc::clone(&self.inner);
        let sought = tokio::task::spawn_blocking(move || inner.seek_partitions(tpl, Duration::from_secs(5)))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let failed: Vec<String> = sought
            .elements()
            .iter()
            .filter_map(|e| {
                e.error()
                    .err()
                    .map(|err| format!("{}[{}]: {err}", e.topic(), e.partition()))
            })
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join(", "))
        }
    }

    /// Low and high watermarks of a partition (blocking network call).
    pub fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64), KafkaClientError> {
        Ok(self.inner.fetch_watermarks(topic, partition, Duration::from_secs(2))?)
    }
}

/// librdkafka's fatal error, if it has raised one: the client is unusable.
/// Which topic being read was deleted and re-created since its partitions
/// were assigned, said as a reason; `None` when none (or the cluster could
/// not be asked: the next round asks again).
fn recreated(describer: &Describer, reading: &std::sync::Mutex<HashMap<String, String>>) -> Option<String> {
    let reading = reading.lock().ok()?.clone();
    if reading.is_empty() {
        return None;
    }
    let topics: Vec<&str> = reading.keys().map(String::as_str).collect();
    let now = match super::topic_id::topic_ids(describer.inner(), &topics, Duration::from_secs(2)) {
        Ok(now) => now,
        Err(e) => {
            debug!(error = %e, "Cannot compare the topics' ids; asking again later.");
            return None;
        }
    };
    reading.iter().find_map(|(topic, old)| {
        now.get(topic)
            .filter(|new| *new != old)
            .map(|new| format!("topic {topic} was deleted and re-created while being read (topic id {old}, now {new})"))
    })
}

fn fatal_error(consumer: &BaseConsumer<AssignContext>) -> Option<String> {
    consumer
        .client()
        .fatal_error()
        .map(|(code, reason)| format!("{reason} ({code:?})"))
}

/// Posts the stuck partitions, says so once per change, and sets the gauge.
fn report_stuck(group: &str, board: &StuckBoard, stuck: Vec<StuckPartition>) {
    for was in board.now() {
        if !stuck
            .iter()
            .any(|s| (s.topic.as_str(), s.partition) == (was.topic.as_str(), was.partition))
        {
            info!(group, topic = %was.topic, partition = was.partition, "Partition moves again.");
            crate::telemetry::partition_stuck(group, &was.topic, was.partition, false);
        }
    }
    for s in &stuck {
        tracing::error!(
            group,
            topic = %s.topic,
            partition = s.partition,
            offset = s.offset,
            reason = %s.reason,
            "Partition stuck: its fetch keeps failing at this offset, so nothing after it is applied. Nothing can be dead-lettered for a record that cannot be read: fix its cause (a codec, a corrupt batch, a fetch size) or move the offset past it."
        );
        crate::telemetry::partition_stuck(group, &s.topic, s.partition, true);
    }
    board.replace(stuck);
}

/// Sends the records in hand as one run (none: nothing) and notes, per
/// partition, the offset after the last one; false if the worker is gone.
fn hand_over(tx: &mpsc::Sender<Feed>, chunk: &mut Vec<Record>, advanced: &mut HashMap<(String, i32), i64>) -> bool {
    if chunk.is_empty() {
        return true;
    }
    for (i, record) in chunk.iter().enumerate() {
        // The last of each run of one partition is enough.
        let last = chunk
            .get(i + 1)
            .is_none_or(|after| after.partition != record.partition || after.topic != record.topic);
        if last {
            advanced.insert((record.topic.clone(), record.partition), record.offset + 1);
        }
    }
    tx.blocking_send(Feed::Records(std::mem::take(chunk))).is_ok()
}

/// Partitions whose consumer position is past the last offset handed over
/// (or last reported): librdkafka advances it over transaction markers
/// without delivering anything, and only the position tells.
fn positions_moved(positions: &TopicPartitionList, advanced: &mut HashMap<(String, i32), i64>) -> Vec<Feed> {
    let mut moved = Vec::new();
    for elem in positions.elements() {
        let Offset::Offset(next) = elem.offset() else {
            continue;
        };
        let key = (elem.topic().to_owned(), elem.partition());
        // Any change, not only growth: after a partition moves away and
        // back it may restart lower (storing lower is a no-op; offsets
        // never move backwards).
        if advanced.get(&key) != Some(&next) {
            advanced.insert(key, next);
            moved.push(Feed::Advance {
                topic: elem.topic().to_owned(),
                partition: elem.partition(),
                next,
            });
        }
    }
    moved
}

/// Pauses the partitions that ran ahead in time while behind and resumes
/// those the others came near again (`align`). Between polls, like the
/// hold: every record polled is on the channel, so a pause drops only the
/// partition's prefetched records (fetched again on resume), and the
/// partition resumes right after the last record handed over.
fn align_partitions(consumer: &BaseConsumer<AssignContext>, align: &mut super::align::Align, group: &str) {
    let Ok(positions) = consumer.position() else { return };
    // Unknown (nothing fetched yet): counted as near its end, so never
    // held paused.
    let left = records_left(consumer, &positions);
    let backlog: Vec<(&str, i32, i64)> = left
        .iter()
        .map(|(elem, left)| (elem.topic(), elem.partition(), left.unwrap_or(0)))
        .collect();
    let moves = align.judge(&backlog);
    move_partitions(consumer, align, &moves, group);
}

/// Pauses and resumes partitions as the time alignment asks, and tells it
/// what librdkafka refused.
fn move_partitions(
    consumer: &BaseConsumer<AssignContext>,
    align: &mut super::align::Align,
    moves: &super::align::Moves,
    group: &str,
) {
    for (list, pause) in [(&moves.pause, true), (&moves.resume, false)] {
        if list.is_empty() {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in list {
            tpl.add_partition(topic, *partition);
        }
        let done = if pause {
            consumer.pause(&tpl)
        } else {
            consumer.resume(&tpl)
        };
        match done {
            Ok(()) => debug!(group = %group, partitions = ?list, pause, "Partitions aligned by time."),
            Err(e) => {
                warn!(group = %group, error = %e, pause, "Cannot pause or resume partitions for time alignment.");
                for (topic, partition) in list {
                    align.refused(topic, *partition, pause);
                }
            }
        }
    }
}

/// Records in the log not yet handed to the worker, over the assigned
/// partitions whose count is known.
fn log_backlog(consumer: &BaseConsumer<AssignContext>, positions: &TopicPartitionList) -> i64 {
    records_left(consumer, positions)
        .iter()
        .filter_map(|(_, left)| *left)
        .sum()
}

/// Per assigned partition, the records in the log not yet handed to the
/// worker: its high watermark as its last fetch saw it (no request) less
/// its position; `None` while either is unknown.
fn records_left<'a>(
    consumer: &BaseConsumer<AssignContext>,
    positions: &'a TopicPartitionList,
) -> Vec<(rdkafka::topic_partition_list::TopicPartitionListElem<'a>, Option<i64>)> {
    positions
        .elements()
        .into_iter()
        .map(|elem| {
            let left = match elem.offset() {
                Offset::Offset(next) => {
                    cached_high_watermark(consumer, elem.topic(), elem.partition()).map(|high| (high - next).max(0))
                }
                _ => None,
            };
            (elem, left)
        })
        .collect()
}

/// The high watermark librdkafka last saw for a partition, without asking
/// the broker (rdkafka wraps only the asking kind).
#[allow(unsafe_code)]
fn cached_high_watermark(consumer: &BaseConsumer<AssignContext>, topic: &str, partition: i32) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1_i64, -1_i64);
    // SAFETY: the client pointer is valid while `consumer` lives; librdkafka
    // only reads `topic` and writes the two integers before returning.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
}

/// `^regex` subscribes by pattern; anything else is a list of names.
pub(super) fn topic_subscription(topics: &str) -> Vec<String> {
    if topics.starts_with('^') {
        vec![topics.to_owned()]
    } else {
        topics
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

fn to_record(m: &BorrowedMessage<'_>) -> Record {
    Record {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers: m.headers().map(raw_headers).unwrap_or_default(),
        timestamp: m.timestamp().to_millis(),
    }
}

/// Header keys and values as bytes. rdkafka's own accessors unwrap the key
/// as UTF-8 and panic on anything else, which would let one bad record kill
/// the reader; so this asks librdkafka for the raw bytes itself. (A key
/// with a NUL byte inside is cut there: librdkafka gives keys as C strings.)
#[allow(unsafe_code)]
fn raw_headers(headers: &BorrowedHeaders) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let native = std::ptr::from_ref(headers).cast::<rdkafka::types::RDKafkaHeaders>();
    (0..headers.count())
        .filter_map(|idx| {
            let mut name: *const std::ffi::c_char = std::ptr::null();
            let mut value: *const std::ffi::c_void = std::ptr::null();
            let mut size = 0_usize;
            // SAFETY: `BorrowedHeaders` is a transparent view of librdkafka's
            // `rd_kafka_headers_t` (rdkafka builds it by this very cast), and
            // it lives as long as `headers`. On success librdkafka points
            // `name` at a NUL-terminated string and `value` at `size` bytes
            // (or null), both owned by the headers and valid while they are;
            // we copy them out before returning.
            unsafe {
                let err = rdkafka::bindings::rd_kafka_header_get_all(native, idx, &mut name, &mut value, &mut size);
                if err != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                    return None;
                }
                let key = std::ffi::CStr::from_ptr(name).to_bytes().to_vec();
                let value = (!value.is_null()).then(|| std::slice::from_raw_parts(value.cast::<u8>(), size).to_vec());
                Some((key, value))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::HoldRequest;

    #[test]
    fn a_hold_undone_and_asked_again_before_the_reader_looks_is_a_new_request() {
        let hold = HoldRequest::new(false);
        let (never, _) = hold.read();
        hold.set(true);
        let (asked, holding) = hold.read();
        assert!(holding);
        hold.set(true);
        assert_eq!(hold.read().0, asked, "asking again what is asked is nothing new");
        hold.set(false);
        hold.set(true);
        let (again, holding) = hold.read();
        assert!(holding);
        assert!(
            again != asked && again != never,
            "a reader that saw the first request sees this one as new"
        );
    }
}
