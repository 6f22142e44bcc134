//! `courseview dlq list|show|replay`: inspect and replay dead-lettered
//! records. `list` prints a table on a terminal and JSON lines when piped,
//! as Kafka's own tools do.
//!
//! Replay decodes the stored record again (a fixed decoder or a fixed
//! producer bug may now accept it) and applies it to the serving generation
//! and, during a rebuild, to the generation being built (whose replay from
//! offset 0 dead-lettered the same record), before removing the letter.
//! Projections converge whatever the order, so a replayed event lands
//! correctly even after later events of the same course.

use std::io::IsTerminal;

use anyhow::bail;
use clap::{Args, Subcommand};

use crate::dead_letter::DeadLetter;

use super::Global;
use crate::decode::decode;
use crate::read_model::ReadModel;
use crate::worker::Applier;

#[derive(Debug, Clone, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first: a table on a terminal, JSON lines when piped.
    List(DlqFilter),
    /// Print one dead letter whole (JSON), by id.
    Show {
        /// The letter's id, as `list` prints it (projection/g<generation>/topic/partition/offset;
        /// projection/topic/partition/offset for a letter written before letters carried their generation).
        id: String,
    },
    /// Decode and apply dead letters again; those that now apply are removed.
    Replay(ReplayArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// Only this letter.
    #[arg(long, conflicts_with_all = ["projection", "limit"])]
    pub id: Option<String>,
    /// Write without telling the API's cache (see `project --help`).
    #[arg(long, env = "COURSEVIEW_NO_CACHE_INVALIDATION")]
    pub no_cache_invalidation: bool,
    #[command(flatten)]
    pub filter: DlqFilter,
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
            if std::io::stdout().is_terminal() {
                print!("{}", table(&letters));
            } else {
                for (id, letter) in letters {
                    println!("{}", letter.to_json(&id));
                }
            }
        }
        DlqCommand::Show { id } => match store.dead_letter(&id).await? {
            Some(letter) => println!("{}", serde_json::to_string_pretty(&letter.to_json(&id))?),
            None => bail!("no dead letter {id:?}"),
        },
        DlqCommand::Replay(ReplayArgs {
            id,
            filter,
            no_cache_invalidation,
        }) => {
            let cache = global.invalidated_cache(std::time::Duration::from_secs(60), no_cache_invalidation)?;
            let letters = match &id {
                Some(id) => match store.dead_letter(id).await? {
                    Some(letter) => vec![(id.clone(), letter)],
                    None => bail!("no dead letter {id:?}"),
                },
                None => {
                    store
                        .dead_letters(filter.projection.map(ReadModel::name), filter.limit)
                        .await?
                }
            };
            let (mut replayed, mut failing) = (0, 0);
            let mut replayed_positions = std::collections::HashSet::new();
            for (id, letter) in letters {
                let Ok(model) = letter.projection.parse::<ReadModel>() else {
                    continue;
                };
                if letter.gap.is_some() {
                    eprintln!(
                        "not replaying {id}: it is a gap in the log, not a record ({}); a rebuild clears it",
                        letter.error
                    );
                    continue;
                }
                let position = (
                    letter.projection.clone(),
                    letter.topic.clone(),
                    letter.partition,
                    letter.offset,
                );
                if replayed_positions.contains(&position) {
                    // Another generation's letter of a record just replayed into every generation.
                    continue;
                }
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
                        let mut settled = vec![
                            id.clone(),
                            DeadLetter::unversioned_id(
                                &letter.projection,
                                &letter.topic,
                                letter.partition,
                                letter.offset,
                            ),
                        ];
                        for generation in std::iter::once(pointer.generation).chain(pointer.building) {
                            let applier = Applier::new(model, store.clone(), cache.clone(), generation);
                            applier.apply_events(std::slice::from_ref(&event)).await?;
                            applier.bump_cache().await;
                            settled.push(DeadLetter::record_id(
                                &letter.projection,
                                generation,
                                &letter.topic,
                                letter.partition,
                                letter.offset,
                            ));
                        }
                        // Applied to every generation: each one's letter of it is settled.
                        store.remove_dead_letters(&settled).await?;
                        replayed_positions.insert(position);
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

/// Dead letters as a table for people: id, when, error, value preview.
fn table(letters: &[(String, DeadLetter)]) -> String {
    let mut out = format!("{:<60} {:<20} {:<50} {}\n", "ID", "DEAD AT", "ERROR", "VALUE");
    for (id, letter) in letters {
        let when = letter
            .dead_at
            .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default();
        let value = letter
            .value
            .as_deref()
            .map(|v| String::from_utf8_lossy(v).chars().take(40).collect::<String>())
            .unwrap_or_default()
            .replace(['\n', '\r'], " ");
        let error: String = letter.error.chars().take(50).collect();
        out.push_str(&format!(
            "{id:<60} {:<20} {error:<50} {value}\n",
            when.get(..19).unwrap_or(&when)
        ));
    }
    out.push_str(&format!("{} dead letter(s)\n", letters.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Record;

    #[test]
    fn the_table_shows_one_row_per_letter_with_its_error_and_a_value_preview() {
        let record = Record {
            topic: "CourseCreatedEvent".into(),
            offset: 3,
            value: Some(b"{not json\nat all".to_vec()),
            ..Record::default()
        };
        let letter = DeadLetter::new("catalog", &record, "value is not valid JSON");
        let text = table(&[(letter.id(), letter)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[1].starts_with("catalog/CourseCreatedEvent/0/3"));
        assert!(lines[1].contains("value is not valid JSON") && lines[1].contains("{not json at all"));
    }
}
