//! `courseview dlq list|replay`: inspect and replay dead-lettered records.
//!
//! Replay decodes the stored record again (a fixed decoder or a fixed
//! producer bug may now accept it) and applies it straight to the serving
//! generation. Projections converge whatever the order, so a replayed event
//! lands correctly even after later events of the same course.

use clap::{Args, Subcommand};
use serde_json::json;

use super::Global;
use crate::decode::decode;
use crate::read_model::ReadModel;
use crate::worker::Applier;

#[derive(Debug, Clone, Subcommand)]
pub enum DlqCommand {
    /// Print dead letters as JSON lines, oldest first.
    List(DlqFilter),
    /// Decode and apply dead letters again; those that now apply are removed.
    Replay(DlqFilter),
}

#[derive(Debug, Clone, Args)]
pub struct DlqFilter {
    /// Only this projection's dead letters.
    #[arg(long, value_enum)]
    pub projection: Option<ReadModel>,
    /// At most this many.
    #[arg(long, default_value_t = 1000)]
    pub limit: i64,
}

pub async fn run(global: Global, command: DlqCommand) -> anyhow::Result<()> {
    let store = global.store().await?;
    match command {
        DlqCommand::List(filter) => {
            let letters = store
                .dead_letters(filter.projection.map(ReadModel::name), filter.limit)
                .await?;
            for (id, letter) in letters {
                println!("{}", json!({"id": id, "letter": letter}));
            }
        }
        DlqCommand::Replay(filter) => {
            let cache = global.cache(std::time::Duration::from_secs(60))?;
            let letters = store
                .dead_letters(filter.projection.map(ReadModel::name), filter.limit)
                .await?;
            let (mut replayed, mut failing) = (0, 0);
            for (id, letter) in letters {
                let Ok(model) = letter.projection.parse::<ReadModel>() else {
                    continue;
                };
                match decode(&letter.to_record()) {
                    Ok(event) => {
                        let generation = store.serving_generation(model.name()).await?;
                        let applier = Applier::new(model, store.clone(), cache.clone(), generation);
                        applier.apply_events(std::slice::from_ref(&event)).await?;
                        applier.bump_cache().await;
                        store.remove_dead_letter(&id).await?;
                        replayed += 1;
                        eprintln!("replayed {id}");
                    }
                    Err(e) => {
                        failing += 1;
                        eprintln!("still failing {id}: {e}");
                    }
                }
            }
            eprintln!("{replayed} replayed, {failing} still failing");
        }
    }
    Ok(())
}
