//! `courseview pause <projection> [--reason TEXT]`: every worker of the
//! projection stops applying within a second or so (it writes what it has
//! folded and stores its offsets first), keeps its process and health
//! endpoints, and applies nothing until `courseview resume`. The pause is
//! stored beside the projection's generation pointer, with who, when, why.

use clap::Args;

use super::Global;
use crate::mongo::PauseInfo;
use crate::read_model::ReadModel;

#[derive(Debug, Clone, Args)]
pub struct PauseArgs {
    /// The projection to pause.
    #[arg(value_enum)]
    pub projection: ReadModel,
    /// Why, for `status`, `/projections` and whoever resumes it.
    #[arg(long)]
    pub reason: Option<String>,
}

pub async fn run(global: Global, args: PauseArgs) -> anyhow::Result<()> {
    let store = global.store().await?;
    let pause = PauseInfo {
        by: operator(),
        at: chrono::Utc::now().timestamp_millis(),
        reason: args.reason,
    };
    match store.pause(args.projection.name(), &pause).await? {
        None => eprintln!(
            "paused {} (by {}{}); its workers write what they hold, store their offsets and apply nothing until `courseview resume {}`",
            args.projection,
            pause.by,
            pause.reason.map(|r| format!(": {r}")).unwrap_or_default(),
            args.projection
        ),
        Some(already) => eprintln!(
            "{} was already paused (by {} at {}{}); left as it was",
            args.projection,
            already.by,
            super::status::millis_to_rfc3339(already.at),
            already.reason.map(|r| format!(": {r}")).unwrap_or_default()
        ),
    }
    Ok(())
}

/// `user@host` of whoever runs the command.
fn operator() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{host}")
}
