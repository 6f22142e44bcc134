//! `courseview offsets <projection> --to-time T | --to-offset T:P:O | --to-earliest [--dry-run]`:
//! moves a paused projection's stored offsets (serving generation), showing
//! the change partition by partition first. A rewind re-applies events,
//! which convergence makes harmless; a forward move skips events, so each
//! skipped range is first recorded as a gap of its own kind (`skipped`),
//! listed by `status` and `/projections` and cleared by a blue/green rebuild.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use clap::{ArgGroup, Args};

use super::Global;
use crate::kafka::Gap;
use crate::read_model::ReadModel;

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["to_time", "to_offset", "to_earliest"])))]
pub struct OffsetsArgs {
    /// The projection whose offsets move (it must be paused).
    #[arg(value_enum)]
    pub projection: ReadModel,
    /// Every partition to its first record at or after this time
    /// (RFC 3339, or Unix milliseconds), by Kafka's offsets-for-times; to
    /// the log's end where no record is that late.
    #[arg(long, value_parser = parse_time)]
    pub to_time: Option<i64>,
    /// One partition to an offset: TOPIC:PARTITION:OFFSET (repeatable).
    #[arg(long, value_parser = parse_position)]
    pub to_offset: Vec<(String, i32, i64)>,
    /// Every partition to the start of its log.
    #[arg(long)]
    pub to_earliest: bool,
    /// Show the change and make none.
    #[arg(long)]
    pub dry_run: bool,
}

fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("not RFC 3339 or Unix milliseconds: {e}"))
}

fn parse_position(s: &str) -> Result<(String, i32, i64), String> {
    let mut parts = s.rsplitn(3, ':');
    let (Some(offset), Some(partition), Some(topic)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("expected TOPIC:PARTITION:OFFSET".into());
    };
    let offset = offset.parse().map_err(|e| format!("offset {offset:?}: {e}"))?;
    let partition = partition.parse().map_err(|e| format!("partition {partition:?}: {e}"))?;
    Ok((topic.to_owned(), partition, offset))
}

pub async fn run(global: Global, args: OffsetsArgs) -> anyhow::Result<()> {
    let name = args.projection.name();
    let store = global.store().await?;
    let probe = global.status_probe(&store)?;
    let pointer = store.pointer(name).await?;
    if pointer.paused.is_none() {
        bail!("{name} is not paused: run `courseview pause {name}` first (running workers would store their own offsets over the move)");
    }
    let applying: Vec<String> = store
        .live_workers(Some(name))
        .await?
        .into_iter()
        .filter(|w| w.applying)
        .map(|w| format!("{} (metrics http://{})", w.id, w.metrics_addr))
        .collect();
    if !applying.is_empty() {
        bail!(
            "{name} is paused, but these workers are still applying (they hold within a second of the pause; try again): {}",
            applying.join(", ")
        );
    }
    if let Some(building) = pointer.building {
        bail!("a rebuild of {name} into generation {building} is under way: its worker stores offsets of its own, and its switch would leave this move on the old generation; run `offsets` before or after it");
    }
    let generation = pointer.generation;
    let logs = probe.logs().await.context("reading the partitions' watermarks")?;
    let stored = store.load_offsets(name, generation).await?;
    // No checkpoint: the worker starts such a partition at 0 (and records
    // a retention gap if the log starts later), so the move starts there too.
    let current = |topic: &str, partition: i32| stored.get(&(topic.to_owned(), partition)).copied().unwrap_or(0);
    if let Some(log) = logs.iter().find(|l| current(&l.topic, l.partition) > l.high) {
        bail!(
            "{}:{}: the stored offset {} lies beyond the log's end {} (a log reset): resume, and the worker records the reset first",
            log.topic,
            log.partition,
            current(&log.topic, log.partition),
            log.high
        );
    }

    // (topic, partition) -> (from, to, low, high)
    let mut moves: BTreeMap<(String, i32), (i64, i64)> = BTreeMap::new();
    if args.to_earliest {
        for log in &logs {
            moves.insert(
                (log.topic.clone(), log.partition),
                (current(&log.topic, log.partition), log.low),
            );
        }
    } else if let Some(millis) = args.to_time {
        let found = probe.offsets_for_time(logs.clone(), millis).await?;
        for log in &logs {
            let to = found
                .get(&(log.topic.clone(), log.partition))
                .copied()
                .unwrap_or(log.high);
            moves.insert(
                (log.topic.clone(), log.partition),
                (current(&log.topic, log.partition), to),
            );
        }
    } else {
        for (topic, partition, offset) in &args.to_offset {
            let Some(log) = logs.iter().find(|l| &l.topic == topic && l.partition == *partition) else {
                bail!("{topic}:{partition} is not a partition {name} reads");
            };
            if *offset < log.low || *offset > log.high {
                bail!(
                    "{topic}:{partition}: offset {offset} is outside its log {}..{}",
                    log.low,
                    log.high
                );
            }
            moves.insert((topic.clone(), *partition), (current(topic, *partition), *offset));
        }
    }

    println!("{name}, generation {generation}:");
    println!("  {:<40} {:>4} {:>10} {:>10}  change", "topic", "part", "stored", "new");
    for ((topic, partition), (from, to)) in &moves {
        let change = match to.cmp(from) {
            std::cmp::Ordering::Less => format!("rewind {} events (applied again)", from - to),
            std::cmp::Ordering::Greater => format!("skip {} events (recorded as skipped)", to - from),
            std::cmp::Ordering::Equal => "unchanged".to_owned(),
        };
        println!("  {topic:<40} {partition:>4} {from:>10} {to:>10}  {change}");
    }
    if args.dry_run {
        println!("dry run: nothing changed");
        return Ok(());
    }
    // Skips first: if this stops half way, no offset has passed a range
    // that is not recorded.
    for ((topic, partition), (from, to)) in &moves {
        if to > from {
            store
                .record_gap(name, generation, &Gap::skipped(topic, *partition, *from, *to), false)
                .await?;
        }
    }
    let changed: Vec<(String, i32, i64)> = moves
        .iter()
        .filter(|(_, (from, to))| from != to)
        .map(|((t, p), (_, to))| (t.clone(), *p, *to))
        .collect();
    store.set_offsets(name, generation, &changed).await?;
    // A worker that was joining when the pause came may flush once more:
    // look again after its pointer poll, and say so if one stored over us.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let now = store.load_offsets(name, generation).await?;
    let overwritten: Vec<String> = changed
        .iter()
        .filter(|(t, p, o)| now.get(&(t.clone(), *p)) != Some(o))
        .map(|(t, p, o)| format!("{t}:{p} (set {o}, now {:?})", now.get(&(t.clone(), *p))))
        .collect();
    if !overwritten.is_empty() {
        bail!(
            "a worker stored offsets over the move after it was made: {}; check `courseview status` and run `offsets` again",
            overwritten.join(", ")
        );
    }
    println!(
        "moved {} partition(s); `courseview resume {name}` goes on from there",
        changed.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_times_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_position("ops.CourseCreatedEvent:2:17"),
            Ok(("ops.CourseCreatedEvent".into(), 2, 17))
        );
        assert!(parse_position("topic:2").is_err());
        assert!(parse_position("topic:x:1")
            .expect_err("a bad partition")
            .contains("partition"));
        assert_eq!(parse_time("1764000000000"), Ok(1_764_000_000_000));
        assert_eq!(parse_time("2026-12-06T05:00:00Z"), Ok(1_796_533_200_000));
        assert!(parse_time("yesterday").expect_err("not a time").contains("RFC 3339"));
    }
}
