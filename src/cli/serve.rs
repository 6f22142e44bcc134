//! `courseview serve`: the read-only query API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{humantime_duration, Global};
use crate::http::cors::CorsSettings;
use crate::http::{self, ApiSettings, AppState, DashboardAuth, JwtSettings};

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "COURSEVIEW_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Lifetime of a cache entry; freshness does not depend on it (see README).
    #[arg(long, env = "COURSEVIEW_CACHE_TTL", default_value = "60s", value_parser = humantime_duration)]
    pub cache_ttl: Duration,
    /// Bytes of answers each API process keeps in memory in front of Redis
    /// (0: none). Kept fresh by Redis pub/sub notices from the workers.
    #[arg(long, env = "COURSEVIEW_LOCAL_CACHE_BYTES", default_value_t = 8 << 20)]
    pub local_cache_bytes: u64,
    /// Items per page when `limit` is absent.
    #[arg(long, env = "COURSEVIEW_DEFAULT_LIMIT", default_value_t = 20)]
    pub default_limit: i64,
    /// Cap on `limit`.
    #[arg(long, env = "COURSEVIEW_MAX_LIMIT", default_value_t = 100)]
    pub max_limit: i64,
    /// Longest wait of `?minVersion=` before answering 409.
    #[arg(long, env = "COURSEVIEW_MIN_VERSION_WAIT", default_value = "2s", value_parser = humantime_duration)]
    pub min_version_wait: Duration,
    /// `q` searches that may read MongoDB at once; more get a fast 503 with
    /// Retry-After (cached reads are never limited).
    #[arg(long, env = "COURSEVIEW_MAX_SEARCHES", default_value_t = 4)]
    pub max_searches: usize,
    /// `minVersion` waits that may run at once; more get a fast 503.
    #[arg(long, env = "COURSEVIEW_MAX_WAITS", default_value_t = 16)]
    pub max_waits: usize,
    /// Teacher dashboard tokens: HS256 shared secret (at least 16 bytes).
    #[arg(long, env = "COURSEVIEW_JWT_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<String>,
    /// File holding the HS256 shared secret (a mounted secret), instead of COURSEVIEW_JWT_SECRET.
    #[arg(long, env = "COURSEVIEW_JWT_SECRET_FILE", value_name = "FILE")]
    pub jwt_hs256_secret_file: Option<PathBuf>,
    /// Teacher dashboard tokens: a PEM public key file (RSA → RS256, EC P-256 → ES256).
    #[arg(long, env = "COURSEVIEW_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// Teacher dashboard tokens: a JWKS file (`{"keys":[…]}`), keys picked by `kid`.
    #[arg(long, env = "COURSEVIEW_JWT_JWKS")]
    pub jwt_jwks: Option<PathBuf>,
    /// Required `iss` of dashboard tokens.
    #[arg(long, env = "COURSEVIEW_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` of dashboard tokens.
    #[arg(long, env = "COURSEVIEW_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// The token claim that names the teacher.
    #[arg(long, env = "COURSEVIEW_JWT_TEACHER_CLAIM", default_value = "sub")]
    pub jwt_teacher_claim: String,
    /// Clock skew allowed on `exp` and `nbf`.
    #[arg(long, env = "COURSEVIEW_JWT_LEEWAY", default_value = "30s", value_parser = humantime_duration)]
    pub jwt_leeway: Duration,
    /// Origins (comma-separated, e.g. `https://shop.example.com`; `*`: any) whose pages may read the catalog cross-origin. Off by default.
    #[arg(long, env = "COURSEVIEW_CORS_ORIGINS", default_value = "")]
    pub cors_origins: String,
    /// Origins whose pages may read teacher dashboards cross-origin, with `Authorization` (never `*`).
    #[arg(long, env = "COURSEVIEW_CORS_DASHBOARD_ORIGINS", default_value = "")]
    pub cors_dashboard_origins: String,
    /// DEVELOPMENT ONLY: serve every teacher's dashboard, drafts included, without a token.
    #[arg(long, env = "COURSEVIEW_DASHBOARD_PUBLIC")]
    pub dashboard_public: bool,
}

impl ServeArgs {
    /// The dashboard guard these settings describe.
    pub fn dashboard_auth(&self) -> anyhow::Result<DashboardAuth> {
        let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let settings = JwtSettings {
            hs256_secret: super::value_or_file(
                "COURSEVIEW_JWT_SECRET",
                self.jwt_hs256_secret.as_deref(),
                self.jwt_hs256_secret_file.as_deref(),
            )?,
            public_key_pem: self.jwt_public_key.as_ref().map(read).transpose()?,
            jwks_json: self
                .jwt_jwks
                .as_ref()
                .map(|p| read(p).map(|b| String::from_utf8_lossy(&b).into_owned()))
                .transpose()?,
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            teacher_claim: self.jwt_teacher_claim.clone(),
            leeway: self.jwt_leeway,
        };
        Ok(DashboardAuth::from_settings(settings, self.dashboard_public)?)
    }
}

pub async fn run(global: Global, args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = global.store().await?;
    let cache = global.cache(args.cache_ttl)?;
    let settings = ApiSettings {
        default_limit: args.default_limit.max(1),
        max_limit: args.max_limit.max(1),
        min_version_wait: args.min_version_wait,
        max_searches: args.max_searches.max(1),
        max_waits: args.max_waits.max(1),
        cors: CorsSettings::parse(&args.cors_origins, &args.cors_dashboard_origins)?,
        ..ApiSettings::default()
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    info!(listen = %args.listen, "API listening.");
    let auth = args.dashboard_auth()?;
    match &auth {
        DashboardAuth::Off => warn!("Teacher dashboard off: no token key configured (see --help)."),
        DashboardAuth::Public => {
            warn!("Teacher dashboard PUBLIC: every teacher's drafts are readable (development only).")
        }
        DashboardAuth::Jwt(_) => info!("Teacher dashboard requires bearer tokens."),
    }
    let state = AppState::new(store.clone(), cache, settings)
        .with_status(global.status_probe(&store)?)
        .with_auth(auth)
        .with_local_cache(args.local_cache_bytes);
    http::serve(listener, state, shutdown).await?;
    info!("API stopped.");
    Ok(())
}
