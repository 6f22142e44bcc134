//! `courseview status`: per projection and topic-partition, the stored
//! offset, high watermark and lag; generation, state, rebuild progress.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::{humantime_duration, Global};
use crate::status::ProjectionStatus;

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Print JSON (the body of `GET /projections`) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Refresh every this often until interrupted (in place on a terminal).
    #[arg(long, num_args = 0..=1, default_missing_value = "2s", value_parser = humantime_duration)]
    pub watch: Option<Duration>,
}

pub async fn run(global: Global, args: StatusArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = global.store().await?;
    let probe = global.status_probe(&store)?;
    let terminal = std::io::stdout().is_terminal();
    loop {
        let text = match probe.all().await {
            Ok(all) if args.json => serde_json::to_string_pretty(&serde_json::json!({"projections": all}))? + "\n",
            Ok(all) => table(&all),
            Err(e) if args.watch.is_some() => format!("status unavailable: {e}\n"),
            Err(e) => return Err(e.into()),
        };
        let Some(every) = args.watch else {
            return print_or_stop(&text).map(drop);
        };
        let shown = if terminal {
            // Clear and home: the table refreshes in place.
            format!("\x1b[2J\x1b[H{}\n{text}", chrono::Utc::now().format("%H:%M:%S"))
        } else {
            format!("{text}\n")
        };
        if !print_or_stop(&shown)? {
            return Ok(());
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// Writes to stdout; false when the reader went away (`status --watch |
/// head`), which ends the command quietly rather than with a panic.
fn print_or_stop(text: &str) -> anyhow::Result<bool> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Unix milliseconds as an RFC 3339 UTC time, for people.
pub(super) fn millis_to_rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(|| ms.to_string(), |t| t.to_rfc3339())
}

fn table(all: &[ProjectionStatus]) -> String {
    let mut out = String::new();
    for p in all {
        out.push_str(&format!(
            "{}  generation {}  {}  lag {} events\n",
            p.projection,
            p.serving.generation,
            serde_json::to_value(p.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            p.serving.lag_events
        ));
        if let Some(paused) = &p.paused {
            out.push_str(&format!(
                "  paused by {} at {}{}\n",
                paused.by,
                millis_to_rfc3339(paused.at),
                paused.reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
            ));
        }
        out.push_str("  topic                                   part    stored      high     lag  lag(s)\n");
        for part in &p.serving.partitions {
            out.push_str(&format!(
                "  {:<40} {:>4} {:>9} {:>9} {:>7} {:>7.1}{}{}\n",
                part.topic,
                part.partition,
                part.stored_offset,
                part.high_watermark,
                part.lag_events,
                part.lag_seconds,
                if part.stalled { "  STALLED" } else { "" },
                part.stuck
                    .as_ref()
                    .map(|why| format!("  STUCK {why}"))
                    .unwrap_or_default()
            ));
        }
        for w in &p.workers {
            out.push_str(&format!(
                "  worker {}  generation {}  metrics http://{}/metrics\n",
                w.id, w.generation, w.metrics_addr
            ));
        }
        if let Some(r) = &p.rebuild {
            let (done, total) = r.position.progress();
            out.push_str(&format!(
                "  rebuilding generation {}: {done}/{total} events, eta {}\n",
                r.position.generation,
                r.eta_seconds
                    .map_or_else(|| "unknown".to_owned(), |s| format!("{s:.0}s"))
            ));
        }
    }
    out
}
