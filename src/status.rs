//! Projection status (DESIGN §2 "honest health"): per projection and
//! topic-partition, the stored offset, the high watermark, the lag in events
//! and in seconds (age of the oldest unapplied event), stall detection and
//! rebuild progress. Served by `GET /projections`, printed by
//! `courseview status`, and run periodically by each worker for its lag
//! metrics and readiness.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::kafka::{Gap, GapKind, Inspector, KafkaClientError, PartitionLog};
use crate::mongo::{Checkpoint, RebuildProgress, Store, StoreError, WorkerEntry};
use crate::read_model::ReadModel;

/// Why status could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Kafka(#[from] KafkaClientError),
}

/// One topic-partition of one projection generation.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    /// Next offset the projection will read (the low watermark if it has stored none).
    pub stored_offset: i64,
    /// Oldest retained offset: where a replay from "offset zero" starts.
    pub low_watermark: i64,
    pub high_watermark: i64,
    pub lag_events: i64,
    /// Age of the oldest unapplied event; 0 without lag.
    pub lag_seconds: f64,
    pub stalled: bool,
    /// Set while a worker of this generation cannot get past an offset:
    /// its fetch keeps failing there (the offset and the error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stuck: Option<String>,
    /// Set when the stored offset is not in the log: below its start
    /// (retention gap) or beyond its end (log reset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gap: Option<GapKind>,
}

/// One generation's position over all its partitions.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GenerationStatus {
    pub generation: u32,
    pub lag_events: i64,
    pub partitions: Vec<PartitionStatus>,
}

impl GenerationStatus {
    /// Events applied since the low watermarks, and events retained in all.
    pub fn progress(&self) -> (i64, i64) {
        let done = self
            .partitions
            .iter()
            .map(|p| (p.stored_offset.min(p.high_watermark) - p.low_watermark).max(0))
            .sum();
        let total = self.partitions.iter().map(|p| p.high_watermark - p.low_watermark).sum();
        (done, total)
    }
}

/// A generation being built and the serving one, measured together.
#[derive(Debug, Clone, PartialEq)]
pub struct Beside {
    pub serving: GenerationStatus,
    pub building: GenerationStatus,
}

/// A rebuild under way.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebuildStatus {
    #[serde(flatten)]
    pub position: GenerationStatus,
    pub progress: Option<RebuildProgress>,
    pub eta_seconds: Option<f64>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Live,
    Rebuilding,
    Stalled,
    /// The serving generation's stored offsets and the log disagree (a
    /// retention gap or a log reset): events were or may be missed.
    Gap,
    /// A worker's fetch keeps failing at one offset of a partition (a
    /// codec, a corrupt batch, a record over the fetch settings): nothing
    /// after it is applied until its cause is fixed.
    Stuck,
    /// An operator paused it (`courseview pause`): its workers apply
    /// nothing until `courseview resume`. Not stalled: it is meant.
    Paused,
}

#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProjectionStatus {
    pub projection: &'static str,
    pub state: State,
    #[serde(flatten)]
    pub serving: GenerationStatus,
    pub rebuild: Option<RebuildStatus>,
    /// Live worker processes of this projection: where their metrics are,
    /// and which generation each applies to.
    pub workers: Vec<WorkerEntry>,
    /// Records of this projection waiting in the dead-letter store.
    pub dead_letters: u64,
    /// Gaps recorded for the serving generation (also in the dead-letter
    /// store, as letters of their own kind); a rebuild clears them.
    pub gaps: Vec<GapReport>,
    /// Who paused it, when and why, while it is paused.
    pub paused: Option<crate::mongo::PauseInfo>,
}

/// One gap a worker found between its stored offset and the log.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GapReport {
    pub kind: GapKind,
    pub topic: String,
    pub partition: i32,
    pub stored_offset: i64,
    pub low_watermark: i64,
    pub high_watermark: i64,
    pub message: String,
}

/// Marks the partitions that live workers of this generation report stuck.
fn mark_stuck(status: &mut GenerationStatus, workers: &[WorkerEntry]) {
    for worker in workers.iter().filter(|w| w.generation == status.generation) {
        for stuck in &worker.stuck {
            if let Some(p) = status
                .partitions
                .iter_mut()
                .find(|p| p.topic == stuck.topic && p.partition == stuck.partition)
            {
                p.stuck = Some(format!("at offset {}: {}", stuck.offset, stuck.reason));
            }
        }
    }
}

/// How long the age of the oldest unapplied event is looked for; a
/// partition whose record does not arrive in time shows no age (0) and is
/// judged stalled by its last progress alone.
const LAG_AGE_BUDGET: Duration = Duration::from_millis(600);

/// Computes status from MongoDB checkpoints and Kafka watermarks.
#[derive(Debug, Clone)]
pub struct StatusProbe {
    store: Store,
    inspector: Arc<Inspector>,
    topics: String,
    stall_after: Duration,
    /// Timestamps of records already looked up, by (topic, partition,
    /// offset): a record's timestamp never changes, and a stalled
    /// partition asks for the same record every time, so once found its
    /// age is known even when the broker is slow to answer again.
    timestamps: Arc<quick_cache::sync::Cache<Position, i64>>,
}

/// A record's place: (topic, partition, offset).
type Position = (String, i32, i64);

/// Remembered record timestamps, least recently used forgotten first.
const TIMESTAMPS_KEPT: usize = 4096;

fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl StatusProbe {
    pub fn new(
        store: Store,
        brokers: impl Into<crate::kafka::KafkaConnection>,
        topics: &str,
        stall_after: Duration,
    ) -> Result<Self, KafkaClientError> {
        Ok(StatusProbe {
            store,
            inspector: Arc::new(Inspector::new(brokers)?),
            topics: topics.to_owned(),
            stall_after,
            timestamps: Arc::new(quick_cache::sync::Cache::new(TIMESTAMPS_KEPT)),
        })
    }

    /// Status of every projection. The broker's partitions and watermarks
    /// are read once for all of them, and the projections are measured
    /// concurrently: `GET /projections` answers within its time bound even
    /// when the broker or MongoDB is slow to answer each call.
    pub async fn all(&self) -> Result<Vec<ProjectionStatus>, StatusError> {
        let logs = self.logs().await?;
        futures::future::try_join_all(ReadModel::ALL.map(|model| self.projection_in(model, &logs))).await
    }

    pub async fn projection(&self, model: ReadModel) -> Result<ProjectionStatus, StatusError> {
        let logs = self.logs().await?;
        self.projection_in(model, &logs).await
    }

    /// Per partition, the first offset at or after `millis` (offsets-for-times).
    pub async fn offsets_for_time(
        &self,
        logs: Vec<PartitionLog>,
        millis: i64,
    ) -> Result<HashMap<(String, i32), i64>, StatusError> {
        let inspector = Arc::clone(&self.inspector);
        Ok(
            tokio::task::spawn_blocking(move || inspector.offsets_for_time(&logs, millis))
                .await
                .map_err(|e| KafkaClientError::Request(e.to_string()))??,
        )
    }

    /// Every partition the projections read, with its watermarks.
    pub async fn logs(&self) -> Result<Vec<PartitionLog>, StatusError> {
        let inspector = Arc::clone(&self.inspector);
        let topics = self.topics.clone();
        Ok(tokio::task::spawn_blocking(move || inspector.logs(&topics))
            .await
            .map_err(|e| KafkaClientError::Request(e.to_string()))??)
    }

    async fn projection_in(&self, model: ReadModel, logs: &[PartitionLog]) -> Result<ProjectionStatus, StatusError> {
        let pointer = self.store.pointer(model.name()).await?;
        let serving = self.generation_in(model, pointer.generation, logs).await?;
        let rebuild = match pointer.building {
            Some(building) => {
                let position = self.generation_in(model, building, logs).await?;
                let eta_seconds = pointer
                    .rebuild
                    .as_ref()
                    .filter(|p| p.rate > 0.0)
                    .map(|p| (p.total - p.done).max(0) as f64 / p.rate);
                Some(RebuildStatus {
                    position,
                    progress: pointer.rebuild.clone(),
                    eta_seconds,
                })
            }
            None => None,
        };
        let gaps: Vec<GapReport> = self
            .store
            .gaps(model.name(), pointer.generation)
            .await?
            .into_iter()
            .filter_map(|letter| {
                let gap = letter.gap?;
                Some(GapReport {
                    kind: gap.kind,
                    topic: letter.topic,
                    partition: letter.partition,
                    stored_offset: letter.offset,
                    low_watermark: gap.low_watermark,
                    high_watermark: gap.high_watermark,
                    message: letter.error,
                })
            })
            .collect();
        let workers = self.store.live_workers(Some(model.name())).await?;
        let mut serving = serving;
        mark_stuck(&mut serving, &workers);
        // Ranges an operator skipped are listed in `gaps` but do not decide
        // the state: they were chosen, and must not hide a stall behind them.
        let found_gaps = gaps.iter().any(|g| g.kind != GapKind::Skipped);
        let state = if found_gaps || serving.partitions.iter().any(|p| p.gap.is_some()) {
            State::Gap
        } else if serving.partitions.iter().any(|p| p.stuck.is_some()) {
            State::Stuck
        } else if pointer.paused.is_some() {
            // Paused, it makes no progress by design: not a stall.
            for p in &mut serving.partitions {
                p.stalled = false;
            }
            State::Paused
        } else if serving.partitions.iter().any(|p| p.stalled) {
            State::Stalled
        } else if rebuild.is_some() {
            State::Rebuilding
        } else {
            State::Live
        };
        let dead_letters = self.store.count_dead_letters(model.name()).await?;
        Ok(ProjectionStatus {
            projection: model.name(),
            state,
            serving,
            rebuild,
            workers,
            dead_letters,
            gaps,
            paused: pointer.paused,
        })
    }

    /// Lag of one generation: checkpoints against watermarks; a partition
    /// with a backlog and no progress for `stall_after` is stalled.
    pub async fn generation(&self, model: ReadModel, generation: u32) -> Result<GenerationStatus, StatusError> {
        let logs = self.logs().await?;
        self.generation_in(model, generation, &logs).await
    }

    /// Where a generation stands in the log: its stored offsets against the
    /// watermarks and its lag in events, without the lag's age (`lag_seconds`
    /// stays 0 and `stalled` false). What a rebuild waits on; the age costs
    /// a fetch from every lagging partition, each round.
    pub async fn positions(&self, model: ReadModel, generation: u32) -> Result<GenerationStatus, StatusError> {
        let logs = self.logs().await?;
        Ok(self.positions_in(model, generation, &logs).await?.0)
    }

    /// Where a generation being built stands beside the serving one, from
    /// one reading of the log: what a rebuild measures each round (the
    /// serving offsets read first, so the comparison never runs ahead).
    pub async fn beside(&self, model: ReadModel, serving: u32, building: u32) -> Result<Beside, StatusError> {
        if serving == building {
            let status = self.positions(model, building).await?;
            return Ok(Beside {
                serving: status.clone(),
                building: status,
            });
        }
        // Serving offsets before the log's end: a live worker may store an
        // offset past an end read before it, which would look like a log
        // reset and lower the bar to the stale end.
        let serving_checkpoints = self.store.load_checkpoints(model.name(), serving).await?;
        let logs = self.logs().await?;
        Ok(Beside {
            serving: positions_at(serving, &logs, &serving_checkpoints),
            building: self.positions_in(model, building, &logs).await?.0,
        })
    }

    async fn positions_in(
        &self,
        model: ReadModel,
        generation: u32,
        logs: &[PartitionLog],
    ) -> Result<(GenerationStatus, HashMap<(String, i32), Checkpoint>), StatusError> {
        let checkpoints = self.store.load_checkpoints(model.name(), generation).await?;
        Ok((positions_at(generation, logs, &checkpoints), checkpoints))
    }

    async fn generation_in(
        &self,
        model: ReadModel,
        generation: u32,
        logs: &[PartitionLog],
    ) -> Result<GenerationStatus, StatusError> {
        let (mut status, checkpoints) = self.positions_in(model, generation, logs).await?;
        // The age of a partition's lag is that of the record at its stored offset.
        // (Past a gap below the log start, the oldest unapplied event still
        // in the log is at the log start.)
        let pending = |p: &PartitionStatus| (p.topic.clone(), p.partition, p.stored_offset.max(p.low_watermark));
        let known = |position: &Position| self.timestamps.get(position);
        let unknown: Vec<Position> = status
            .partitions
            .iter()
            .filter(|p| p.lag_events > 0)
            .map(pending)
            .filter(|position| known(position).is_none())
            .collect();
        let inspector = Arc::clone(&self.inspector);
        let looked_up = tokio::task::spawn_blocking(move || {
            let found = inspector.timestamps_at(&unknown, LAG_AGE_BUDGET)?;
            // Found by (topic, partition); keep them by offset too.
            Ok::<_, KafkaClientError>(
                unknown
                    .into_iter()
                    .filter_map(|(t, p, o)| found.get(&(t.clone(), p)).map(|ts| ((t, p, o), *ts)))
                    .collect::<Vec<_>>(),
            )
        })
        .await
        .map_err(|e| KafkaClientError::Request(e.to_string()))??;
        for (position, timestamp) in looked_up {
            self.timestamps.insert(position, timestamp);
        }
        let now = now_millis();
        let stall_ms = self.stall_after.as_millis() as i64;
        for p in status.partitions.iter_mut().filter(|p| p.lag_events > 0) {
            let oldest_ts = known(&pending(p));
            p.lag_seconds = oldest_ts.map_or(0.0, |ts| (now - ts).max(0) as f64 / 1000.0);
            let moved = checkpoints
                .get(&(p.topic.clone(), p.partition))
                .and_then(|c| c.updated_at);
            // Waiting since the later of: the last progress, the oldest pending event.
            let waiting_since = moved.max(oldest_ts);
            p.stalled = waiting_since.is_some_and(|since| now - since > stall_ms);
        }
        Ok(status)
    }
}

/// A generation's stored offsets against the watermarks in `logs`.
fn positions_at(
    generation: u32,
    logs: &[PartitionLog],
    checkpoints: &HashMap<(String, i32), Checkpoint>,
) -> GenerationStatus {
    let partitions: Vec<PartitionStatus> = logs
        .iter()
        .map(|log| {
            let checkpoint = checkpoints.get(&(log.topic.clone(), log.partition));
            // The stored offset as it is, never clamped to the log: a
            // hole below the log start, or an offset past its end, shows.
            let stored = checkpoint.map_or(log.low, |c| c.offset);
            // Only a retention gap is judged here: the checkpoint is read
            // after the watermarks, so a busy partition's stored offset
            // may legitimately pass the high watermark read before it.
            // Log resets are judged by the workers, checkpoint first.
            let gap = Gap::find(&log.topic, log.partition, stored, log.low, log.high)
                .map(|g| g.kind)
                .filter(|kind| *kind == GapKind::RetentionGap);
            PartitionStatus {
                topic: log.topic.clone(),
                partition: log.partition,
                stored_offset: stored,
                low_watermark: log.low,
                high_watermark: log.high,
                // Events still in the log and not applied.
                lag_events: (log.high - stored.max(log.low)).max(0),
                lag_seconds: 0.0,
                stalled: false,
                stuck: None,
                gap,
            }
        })
        .collect();
    GenerationStatus {
        generation,
        lag_events: partitions.iter().map(|p| p.lag_events).sum(),
        partitions,
    }
}
