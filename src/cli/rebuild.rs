//! `courseview rebuild <projection>`: replay from offset 0 into a new
//! generation, switch readers when caught up, drop the old one after a grace
//! period. A progress bar on a terminal, log lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::project::WorkerArgs;
use super::{humantime_duration, Global};
use crate::read_model::ReadModel;
use crate::rebuild::{rebuild, Mode, ProgressSink, RebuildOptions};

#[derive(Debug, Clone, Args)]
pub struct RebuildArgs {
    /// The projection to rebuild.
    #[arg(value_enum)]
    pub projection: ReadModel,
    /// Drop the serving generation and replay into it (downtime; development
    /// only). Refused while live workers of the projection are registered:
    /// stop them first.
    #[arg(long)]
    pub in_place: bool,
    /// With --in-place: the projection's workers are stopped, even if the
    /// registry still lists them (an entry goes stale 3 status intervals
    /// after its last heartbeat).
    #[arg(long, requires = "in_place")]
    pub workers_stopped: bool,
    /// Compare with the serving generation once the new one lags by at most
    /// this many events (it switches when it has reached the serving offsets).
    #[arg(long, env = "COURSEVIEW_CATCH_UP_LAG", default_value_t = 100)]
    pub catch_up_lag: i64,
    /// How long the old generation outlives the switch (readers finishing with it).
    #[arg(long, env = "COURSEVIEW_REBUILD_GRACE", default_value = "60s", value_parser = humantime_duration)]
    pub grace: Duration,
    /// After the switch, how long to keep applying while the live workers follow.
    #[arg(long, env = "COURSEVIEW_HANDOVER_TIMEOUT", default_value = "30s", value_parser = humantime_duration)]
    pub handover_timeout: Duration,
    /// Rebuild even when some partition's log no longer starts at offset 0:
    /// the events retention removed are then missing from the new
    /// generation (refused by default, naming the partitions).
    #[arg(long)]
    pub allow_partial_history: bool,
    /// Switch even when the new generation dead-lettered records that the
    /// serving one applied (a lower --max-record-bytes, a stricter
    /// decoder): readers then lose those courses' changes. Refused by
    /// default, naming the records.
    #[arg(long)]
    pub accept_dead_letters: bool,
    /// Drop the generation a stopped rebuild left and replay anew from
    /// offset 0 (by default a rebuild resumes it), e.g. after changing
    /// what made it dead-letter records.
    #[arg(long, conflicts_with = "in_place")]
    pub restart: bool,
    /// Write without telling the API's cache (see `project --help`).
    #[arg(long, env = "COURSEVIEW_NO_CACHE_INVALIDATION")]
    pub no_cache_invalidation: bool,
    /// Events the rebuild applies per second, at most, so it leaves the
    /// store room for the live workers' writes; throttled, it also writes a
    /// tenth of a second's events at a time. `unlimited`: as fast as the
    /// store takes them, in large writes. The default kept a live worker's
    /// freshness p99 within 3× of idle on the reference machine
    /// (docs/PERFORMANCE.md); raise it for a store with room to spare.
    #[arg(long, env = "COURSEVIEW_REBUILD_MAX_RATE", default_value = "2000", value_parser = max_rate)]
    pub max_rate: MaxRate,
    /// Consumer and batching settings of the replaying worker.
    #[command(flatten)]
    pub worker: WorkerArgs,
}

/// indicatif on a terminal; a log line every few seconds otherwise.
enum Reporter {
    Bar(ProgressBar),
    Lines { last: Option<Instant> },
}

impl ProgressSink for Reporter {
    fn progress(&mut self, done: i64, total: i64) {
        match self {
            Reporter::Bar(bar) => {
                bar.set_length(total.max(0) as u64);
                bar.set_position(done.max(0) as u64);
            }
            Reporter::Lines { last } => {
                if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                    *last = Some(Instant::now());
                    info!(done, total, "Rebuild progress.");
                }
            }
        }
    }

    fn phase(&mut self, message: &str) {
        match self {
            Reporter::Bar(bar) => bar.println(message),
            Reporter::Lines { .. } => info!("Rebuild: {message}."),
        }
    }
}

/// Events per second, at most; `None`: unlimited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaxRate(pub Option<f64>);

fn max_rate(s: &str) -> Result<MaxRate, String> {
    if s == "unlimited" {
        return Ok(MaxRate(None));
    }
    match s.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 1.0 => Ok(MaxRate(Some(rate))),
        Ok(_) => Err("must be at least 1 event per second, or `unlimited`".into()),
        Err(e) => Err(format!("not a number of events per second, or `unlimited`: {e}")),
    }
}

pub async fn run(global: Global, args: RebuildArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = global.store().await?;
    let probe = global.status_probe(&store)?;
    let mut settings = args.worker.settings(&global, args.projection)?;
    if let MaxRate(Some(rate)) = args.max_rate {
        settings.max_rate = Some(rate);
        // Throttled, it also writes in small pieces: a tenth of a second's
        // events at a time, so no one write holds the store for long
        // beside the live workers' (a fold of 2 s at full speed is
        // thousands of documents in a few commands).
        settings.fold.interval = settings.fold.interval.min(Duration::from_millis(100));
        settings.batch_size = settings.batch_size.min((rate / 10.0).ceil().max(1.0) as usize);
    }
    let options = RebuildOptions {
        mode: if args.in_place { Mode::InPlace } else { Mode::BlueGreen },
        catch_up_lag: args.catch_up_lag.max(0),
        grace: args.grace,
        report_every: Duration::from_millis(500),
        handover_timeout: args.handover_timeout,
        allow_partial_history: args.allow_partial_history,
        workers_stopped: args.workers_stopped,
        accept_dead_letters: args.accept_dead_letters,
        restart: args.restart,
    };
    if let Some(paused) = store.pointer(args.projection.name()).await?.paused {
        // Allowed: a rebuild has its own consumer; the pause holds the
        // live workers, before and after the switch.
        eprintln!(
            "{} is paused (by {}{}): rebuilding anyway; its live workers stay paused, after the switch too, until `courseview resume {}`",
            args.projection,
            paused.by,
            paused.reason.map(|r| format!(": {r}")).unwrap_or_default(),
            args.projection
        );
    }
    let cache = global.invalidated_cache(Duration::from_secs(60), args.no_cache_invalidation)?;
    let mut reporter = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} events {per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Reporter::Bar(bar)
    } else {
        Reporter::Lines { last: None }
    };
    let report = rebuild(&settings, &store, cache, &probe, &options, &mut reporter, &shutdown).await?;
    if let Reporter::Bar(bar) = &reporter {
        bar.finish();
    }
    match report {
        Some(r) => eprintln!(
            "rebuilt {} into generation {} ({} events in {:.1}s, {:.0} events/s)",
            args.projection,
            r.to,
            r.events,
            r.elapsed.as_secs_f64(),
            r.events as f64 / r.elapsed.as_secs_f64().max(0.001)
        ),
        None => eprintln!("rebuild of {} interrupted; run it again to resume", args.projection),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_rate_takes_events_per_second_or_unlimited_and_refuses_the_rest_saying_why() {
        assert_eq!(max_rate("2000"), Ok(MaxRate(Some(2000.0))));
        assert_eq!(max_rate("unlimited"), Ok(MaxRate(None)));
        assert!(max_rate("0").expect_err("zero").contains("at least 1"));
        assert!(max_rate("1e-300")
            .expect_err("too small to pace")
            .contains("at least 1"));
        assert!(max_rate("fast").expect_err("words").contains("unlimited"));
    }
}
