//! `courseview dlq list|replay`: inspect and replay dead-lettered records.
//!
//! Replay decodes the stored record again (a fixed decoder or a fixed
//! producer bug may now accept it) and applies it to the serving generation
//! and, during a rebuild, to the generation being built (whose replay from
//! offset 0 dead-lettered the same record), before removing the letter.
//! Projections converge whatever the order, so a replayed event lands
//! correctly even after later events of the same course.

use clap::{Args, Subcommand};

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
                println!("{}", letter.to_json(&id));
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
                let Some(record) = letter.to_record() else {
                    failing += 1;
                    eprintln!(
                        "cannot replay {id}: the record was over the size limit and the letter keeps only its first bytes; raise --max-record-bytes and rebuild, or fix it at the source"
                    );
                    continue;
                };
                match decode(&record) {
                    Ok(event) => {
                        let pointer = store.pointer(model.name()).await?;
                        for generation in std::iter::once(pointer.generation).chain(pointer.building) {
                            let applier = Applier::new(model, store.clone(), cache.clone(), generation);
                            applier.apply_events(std::slice::from_ref(&event)).await?;
                            applier.bump_cache().await;
                        }
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
