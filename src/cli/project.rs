//! `courseview project <projection>… | --all`: run projector workers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use futures::FutureExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{humantime_duration, Global};
use crate::http::{self, WorkerHealth};
use crate::kafka::ConsumerSettings;
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
    /// Address of this worker's /metrics, /healthz and /readyz.
    #[arg(long, env = "COURSEVIEW_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,
    /// How often the worker measures its lag (metrics) and stall (readiness).
    #[arg(long, env = "COURSEVIEW_STATUS_INTERVAL", default_value = "5s", value_parser = humantime_duration)]
    pub status_interval: Duration,
}

/// Consumer and batching settings of a projector worker.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Topics to consume: a `^regex`, or comma-separated names.
    #[arg(
        long,
        env = "COURSEVIEW_TOPICS",
        default_value = r"^(Course.*Event|outbox\.event\.Course)$"
    )]
    pub topics: String,
    /// Consumer group of a projection is `<prefix>.<projection>`.
    #[arg(long, env = "COURSEVIEW_GROUP_PREFIX", default_value = "courseview")]
    pub group_prefix: String,
    /// Most records applied per batch.
    #[arg(long, env = "COURSEVIEW_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: usize,
    /// How long a batch waits for more records after the first.
    #[arg(long, env = "COURSEVIEW_BATCH_LINGER", default_value = "20ms", value_parser = humantime_duration)]
    pub batch_linger: Duration,
    /// How often to look for new topics that match the regex.
    #[arg(long, env = "COURSEVIEW_METADATA_REFRESH", default_value = "30s", value_parser = humantime_duration)]
    pub metadata_refresh: Duration,
    /// Kafka consumer session timeout (how fast a dead worker's partitions move).
    #[arg(long, env = "COURSEVIEW_SESSION_TIMEOUT", default_value = "10s", value_parser = humantime_duration)]
    pub session_timeout: Duration,
    /// Longest pause between retries after a transient MongoDB failure.
    #[arg(long, env = "COURSEVIEW_MAX_BACKOFF", default_value = "5s", value_parser = humantime_duration)]
    pub max_backoff: Duration,
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
    pub fn settings(&self, global: &Global, model: ReadModel) -> WorkerSettings {
        WorkerSettings {
            model,
            kafka: ConsumerSettings {
                brokers: global.kafka_brokers.clone(),
                topics: global.topics.clone(),
                group_id: format!("{}.{}", self.group_prefix, model.name()),
                metadata_refresh: self.metadata_refresh,
                session_timeout: self.session_timeout,
            },
            batch_size: self.batch_size.max(1),
            batch_linger: self.batch_linger,
            max_backoff: self.max_backoff,
        }
    }
}

/// Runs the workers until `shutdown`; a failing projection never stops the others.
pub async fn run(global: Global, args: ProjectArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = global.store().await?;
    let cache = global.cache(Duration::from_secs(60))?;
    let models = args.models();
    let health = Arc::new(WorkerHealth::new(&models));
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_listen))?;
    info!(listen = %args.metrics_listen, "Worker metrics and health listening.");
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
        let settings = args.worker.settings(&global, model);
        let (store, cache, token) = (store.clone(), cache.clone(), shutdown.child_token());
        workers.spawn(async move { (model, worker::run(settings, store, cache, token).await) });
    }
    let mut failed = Vec::new();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok((model, Ok(()))) => info!(projection = model.name(), "Worker finished."),
            Ok((model, Err(e))) => {
                error!(projection = model.name(), error = %e, "Worker failed; other projections go on.");
                failed.push(model.name());
            }
            Err(e) => {
                error!(error = %e, "Worker task panicked.");
                failed.push("unknown");
            }
        }
    }
    shutdown.cancel();
    while services.join_next().await.is_some() {}
    if !failed.is_empty() {
        bail!("projections failed: {}", failed.join(", "));
    }
    Ok(())
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
                }
                Err(e) => warn!(projection = model.name(), error = %e, "Cannot measure lag."),
            }
            health.set(*model, status.map(|s| s.state != State::Stalled).unwrap_or(false));
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
