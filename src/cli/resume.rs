//! `courseview resume <projection>`: clears a pause; every worker of the
//! projection goes on from its stored offsets within a second or so.

use clap::Args;

use super::Global;
use crate::read_model::ReadModel;

#[derive(Debug, Clone, Args)]
pub struct ResumeArgs {
    /// The projection to resume.
    #[arg(value_enum)]
    pub projection: ReadModel,
}

pub async fn run(global: Global, args: ResumeArgs) -> anyhow::Result<()> {
    let store = global.store().await?;
    match store.resume(args.projection.name()).await? {
        Some(was) => eprintln!(
            "resumed {} (paused by {} at {}{}); its workers go on from their stored offsets",
            args.projection,
            was.by,
            super::status::millis_to_rfc3339(was.at),
            was.reason.map(|r| format!(": {r}")).unwrap_or_default()
        ),
        None => eprintln!("{} was not paused; nothing to do", args.projection),
    }
    Ok(())
}
