//! `courseview serve`: the read-only query API.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{humantime_duration, Global};
use crate::http::{self, ApiSettings, AppState};

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "COURSEVIEW_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Lifetime of a cache entry; freshness does not depend on it (see README).
    #[arg(long, env = "COURSEVIEW_CACHE_TTL", default_value = "60s", value_parser = humantime_duration)]
    pub cache_ttl: Duration,
    /// Items per page when `limit` is absent.
    #[arg(long, env = "COURSEVIEW_DEFAULT_LIMIT", default_value_t = 20)]
    pub default_limit: i64,
    /// Cap on `limit`.
    #[arg(long, env = "COURSEVIEW_MAX_LIMIT", default_value_t = 100)]
    pub max_limit: i64,
    /// Longest wait of `?minVersion=` before answering 409.
    #[arg(long, env = "COURSEVIEW_MIN_VERSION_WAIT", default_value = "2s", value_parser = humantime_duration)]
    pub min_version_wait: Duration,
}

pub async fn run(global: Global, args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = global.store().await?;
    let cache = global.cache(args.cache_ttl)?;
    let settings = ApiSettings {
        default_limit: args.default_limit.max(1),
        max_limit: args.max_limit.max(1),
        min_version_wait: args.min_version_wait,
        ..ApiSettings::default()
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    info!(listen = %args.listen, "API listening.");
    let state = AppState::new(store.clone(), cache, settings).with_status(global.status_probe(&store)?);
    http::serve(listener, state, shutdown).await?;
    info!("API stopped.");
    Ok(())
}
