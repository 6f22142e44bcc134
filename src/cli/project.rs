//! `courseview project <projection>… | --all`: run projector workers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

/// The worker's metrics port unless told otherwise (the Prometheus
/// exporters' customary one).
pub const DEFAULT_METRICS_PORT: u16 = 9464;
use clap::Args;
use futures::FutureExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{humantime_duration, Global};
use crate::http::{self, WorkerHealth};
use crate::kafka::{ConsumerSettings, OnGap};
use crate::mongo::{Store, WorkerEntry};
use crate::read_model::ReadModel;
use crate::status::{State, StatusProbe};
use crate::telemetry;
use crate::worker::{self, WorkerSettings};

#[derive(Debug, Clone, Args)]
pub struct ProjectArgs {
    /// Projections to run (each in its own consumer group with its own offsets).
    #[arg(value_enum, required_unless_present = "all")]
    pub projections: Vec<ReadModel>,
    /// Run every projection in this process.
    #[arg(long, conflicts_with = "projections")]
    pub all: bool,
    #[command(flatten)]
    pub worker: WorkerArgs,
    /// Address of this worker's /metrics, /healthz and /readyz. Unset, it
    /// is 127.0.0.1:9464, or any free port when that one is taken (several
    /// workers on one host); the address is logged and shown by `status`.
    #[arg(long, env = "COURSEVIEW_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Run without telling the API's cache of writes (no Redis, or Redis
    /// ignored): API answers are then fresh only within the cache TTL, not
    /// DESIGN's 1 s. Without this flag a worker with `REDIS_URL=none`
    /// refuses to start.
    #[arg(long, env = "COURSEVIEW_NO_CACHE_INVALIDATION")]
    pub no_cache_invalidation: bool,
    /// How often the worker measures its lag (metrics) and stall (readiness).
    #[arg(long, env = "COURSEVIEW_STATUS_INTERVAL", default_value = "5s", value_parser = humantime_duration)]
    pub status_interval: Duration,
}

/// Consumer and batching settings of a projector worker.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Consumer group of a projection is `<prefix>.<projection>`.
    #[arg(long, env = "COURSEVIEW_GROUP_PREFIX", default_value = "courseview")]
    pub group_prefix: String,
    /// Most records applied per batch.
    #[arg(long, env = "COURSEVIEW_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: usize,
    /// How long a batch waits for more records after the first.
    #[arg(long, env = "COURSEVIEW_BATCH_LINGER", default_value = "20ms", value_parser = humantime_duration)]
    pub batch_linger: Duration,
    /// While behind (catching up, rebuilding), fold batches together in
    /// memory and write each touched course once per this interval (or
    /// --fold-bytes, whichever comes first); caught up, every batch is
    /// written at once. Offsets are stored only after a fold is written.
    #[arg(long, env = "COURSEVIEW_FOLD_INTERVAL", default_value = "2s", value_parser = humantime_duration)]
    pub fold_interval: Duration,
    /// Most bytes (estimated) of folded course states held before they are
    /// written (see --fold-interval).
    #[arg(long, env = "COURSEVIEW_FOLD_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub fold_bytes: usize,
    /// How often to look for new topics that match the regex.
    #[arg(long, env = "COURSEVIEW_METADATA_REFRESH", default_value = "30s", value_parser = humantime_duration)]
    pub metadata_refresh: Duration,
    /// Kafka consumer session timeout (how fast a dead worker's partitions move).
    #[arg(long, env = "COURSEVIEW_SESSION_TIMEOUT", default_value = "10s", value_parser = humantime_duration)]
    pub session_timeout: Duration,
    /// Longest pause between retries after a transient MongoDB failure.
    #[arg(long, env = "COURSEVIEW_MAX_BACKOFF", default_value = "5s", value_parser = humantime_duration)]
    pub max_backoff: Duration,
    /// Records larger than this many bytes (key + value + headers) are
    /// dead-lettered; from 1 to 1048576 (1 MiB: a course document holds its
    /// fields' values with their stamps and must fit MongoDB's 16 MiB).
    #[arg(
        long,
        env = "COURSEVIEW_MAX_RECORD_BYTES",
        default_value_t = worker::DEFAULT_MAX_RECORD_BYTES,
        value_parser = record_limit
    )]
    pub max_record_bytes: usize,
    /// What a worker does with a partition whose stored offset the log no
    /// longer holds (a retention gap, or a log reset after the topic was
    /// re-created): `stop` consuming it, or `continue` from the log's start.
    /// Either way the gap is dead-lettered, counted and reported.
    #[arg(long, env = "COURSEVIEW_ON_GAP", value_enum, default_value_t = OnGap::Stop)]
    pub on_gap: OnGap,
    /// Bytes of consumed records waiting to be applied, at most.
    #[arg(long, env = "COURSEVIEW_MAX_QUEUE_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_queue_bytes: usize,
    /// Bytes of recently written course states kept in memory, so their
    /// next events need no load (an estimate of their size).
    #[arg(long, env = "COURSEVIEW_STATE_CACHE_BYTES", default_value_t = worker::DEFAULT_STATE_CACHE_BYTES)]
    pub state_cache_bytes: u64,
    /// On SIGTERM/SIGINT, how long the batch in hand may still retry
    /// (MongoDB down) before the process exits without storing its offsets.
    #[arg(long, env = "COURSEVIEW_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime_duration)]
    pub shutdown_timeout: Duration,
}

/// `--max-record-bytes`: refused outside 1..=1 MiB rather than clamped.
fn record_limit(value: &str) -> Result<usize, String> {
    let bytes: usize = value.parse().map_err(|e| format!("not a number of bytes: {e}"))?;
    if (1..=worker::MAX_RECORD_BYTES_CAP).contains(&bytes) {
        Ok(bytes)
    } else {
        Err(format!(
            "{bytes} is out of range: from 1 to {} bytes (1 MiB)",
            worker::MAX_RECORD_BYTES_CAP
        ))
    }
}

impl ProjectArgs {
    pub fn models(&self) -> Vec<ReadModel> {
        if self.all {
            ReadModel::ALL.to_vec()
        } else {
            let mut models = self.projections.clone();
            models.dedup();
            models
        }
    }
}

impl WorkerArgs {
    pub fn settings(&self, global: &Global, model: ReadModel) -> anyhow::Result<WorkerSettings> {
        Ok(WorkerSettings {
            model,
            kafka: ConsumerSettings {
                brokers: global.kafka()?,
                topics: global.topics.clone(),
                group_id: format!("{}.{}", self.group_prefix, model.name()),
                metadata_refresh: self.metadata_refresh,
                session_timeout: self.session_timeout,
                on_gap: self.on_gap,
                stuck: std::sync::Arc::default(),
            },
            batch_size: self.batch_size.max(1),
            fold: worker::FoldLimits {
                interval: self.fold_interval,
                bytes: self.fold_bytes,
            },
            batch_linger: self.batch_linger,
            max_backoff: self.max_backoff,
            max_record_bytes: self.max_record_bytes,
            max_queue_bytes: self.max_queue_bytes.max(1),
            state_cache_bytes: self.state_cache_bytes,
            indexes: worker::IndexBuild::AtStart,
            shutdown_timeout: self.shutdown_timeout,
            on_phase: None,
            cache_held: None,
            operator_paused: None,
            max_rate: None,
        })
    }
}

/// Runs the workers until `shutdown`; a failing projection never stops the others.
pub async fn run(global: Global, args: ProjectArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    // A bad Kafka setting stops the process before anything connects.
    global.kafka()?;
    let store = global.store().await?;
    let cache = global.invalidated_cache(Duration::from_secs(60), args.no_cache_invalidation)?;
    let invalidates = cache.as_ref().map(|_| global.redis_prefix.clone());
    let models = args.models();
    let health = Arc::new(WorkerHealth::new(&models));
    let listener = bind_metrics(args.metrics_listen).await?;
    let metrics_addr = listener.local_addr().context("metrics listener address")?;
    info!(listen = %metrics_addr, "Worker metrics and health listening.");
    let mut services = JoinSet::new();
    services.spawn(http::serve_worker(listener, Arc::clone(&health), shutdown.clone()).map(|_| ()));
    let probe = global.status_probe(&store)?;
    services.spawn(watch_health(
        probe,
        models.clone(),
        Arc::clone(&health),
        args.status_interval,
        shutdown.clone(),
    ));
    let mut workers = JoinSet::new();
    for model in models {
        let mut settings = args.worker.settings(&global, model)?;
        let (generation_tx, generation_rx) = tokio::sync::watch::channel(worker::Phase::default());
        settings.on_phase = Some(Arc::new(generation_tx));
        settings.cache_held = health.held_flag(model);
        settings.operator_paused = health.paused_flag(model);
        settings.kafka.stuck = health.stuck_board(model);
        let mut entry = WorkerEntry::new(model.name(), metrics_addr.to_string(), args.status_interval);
        entry.invalidates = invalidates.clone();
        services.spawn(heartbeat(
            store.clone(),
            entry,
            generation_rx,
            Arc::clone(&settings.kafka.stuck),
            shutdown.clone(),
        ));
        let (store, cache, token) = (store.clone(), cache.clone(), shutdown.child_token());
        workers.spawn(async move { (model, worker::run(settings, store, cache, token).await) });
    }
    let mut failed = Vec::new();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok((model, Ok(worker::Stopped::Shutdown))) => info!(projection = model.name(), "Worker finished."),
            Ok((model, Ok(worker::Stopped::ShutdownAbandonedBatch))) => warn!(
                projection = model.name(),
                "Worker stopped at the shutdown deadline; its unwritten batch will be read again on the next start."
            ),
            Ok((model, Err(e))) => {
                // Nothing a worker gives up on gets better in this process
                // (a fatal client error, a state no release can read, a
                // server that keeps answering wrongly): the whole process
                // ends non-zero so its supervisor restarts it, rather than
                // run on, healthy to its probes, with one projection stopped.
                error!(projection = model.name(), error = %e, "Worker cannot go on; the process exits so its supervisor restarts it.");
                failed.push(format!("{} ({e})", model.name()));
                shutdown.cancel();
            }
            Err(e) => {
                error!(error = %e, "Worker task panicked; the process exits.");
                failed.push(format!("a worker task ({e})"));
                shutdown.cancel();
            }
        }
    }
    shutdown.cancel();
    while services.join_next().await.is_some() {}
    if !failed.is_empty() {
        bail!("projections failed: {}", failed.join("; "));
    }
    Ok(())
}

/// Binds the worker's metrics address: the one given, or the default port
/// with a free port as fallback so several workers can share a host.
async fn bind_metrics(given: Option<SocketAddr>) -> anyhow::Result<tokio::net::TcpListener> {
    if let Some(addr) = given {
        return tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"));
    }
    let default = SocketAddr::from(([127, 0, 0, 1], DEFAULT_METRICS_PORT));
    match tokio::net::TcpListener::bind(default).await {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            warn!(taken = %default, "Default metrics port taken (another worker?); using a free port.");
            tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .context("cannot listen on any port for metrics")
        }
        Err(e) => Err(e).with_context(|| format!("cannot listen on {default}")),
    }
}

/// Keeps this worker's entry in the registry fresh: its metrics address
/// (for `courseview status`) and the generation it applies to (a rebuild
/// waits for live workers to follow its switch).
async fn heartbeat(
    store: Store,
    mut entry: WorkerEntry,
    mut generation: tokio::sync::watch::Receiver<worker::Phase>,
    stuck: Arc<crate::kafka::StuckBoard>,
    shutdown: CancellationToken,
) {
    loop {
        let phase = *generation.borrow_and_update();
        entry.stuck = stuck.now();
        (entry.generation, entry.applying, entry.paused_for) = (phase.generation, phase.applying, phase.paused_for);
        entry.heartbeat_at = chrono::Utc::now().timestamp_millis();
        if let Err(e) = store.put_worker(&entry).await {
            warn!(error = %e, "Cannot record this worker in the registry.");
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = generation.changed() => if changed.is_err() { break },
            () = tokio::time::sleep(Duration::from_millis(entry.stale_after_ms as u64 / 3)) => {}
        }
    }
    // Gone from the registry at once, so a rebuild does not wait for us.
    let _ = store.remove_worker(&entry.id).await;
}

/// Measures lag and stalls of this process's projections: lag gauges per
/// partition, the stalled gauge, and the worker's readiness.
async fn watch_health(
    probe: StatusProbe,
    models: Vec<ReadModel>,
    health: Arc<WorkerHealth>,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        for model in &models {
            let status = probe.projection(*model).await;
            match &status {
                Ok(s) => {
                    for p in &s.serving.partitions {
                        telemetry::consumer_lag(model.name(), &p.topic, p.partition, p.lag_events, p.lag_seconds);
                    }
                    telemetry::stalled(model.name(), s.state == State::Stalled);
                    telemetry::paused(model.name(), s.paused.is_some());
                    health.set_pause_reason(*model, s.paused.as_ref().and_then(|p| p.reason.clone()));
                }
                Err(e) => warn!(projection = model.name(), error = %e, "Cannot measure lag."),
            }
            // A gap fails readiness as a stall does: events were or may be missed.
            health.set(
                *model,
                status.is_ok_and(|s| matches!(s.state, State::Live | State::Rebuilding | State::Paused)),
            );
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
