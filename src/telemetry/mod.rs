//! Logs and metrics: tracing setup and every metric courseview emits, named
//! in one place. Labels are bounded: projection, event type, topic,
//! partition, route, status class — never a course id.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, Layer};

pub mod traces;

// Metric names: stable (dashboards and alerts depend on them), documented
// in the README, and held to docs/grafana/courseview.json by a test.
const EVENTS_APPLIED_TOTAL: &str = "courseview_events_applied_total";
const DEAD_LETTERS_TOTAL: &str = "courseview_dead_letters_total";
const DOCUMENTS_WRITTEN_TOTAL: &str = "courseview_documents_written_total";
const GAPS_TOTAL: &str = "courseview_gaps_total";
const BATCH_SIZE: &str = "courseview_batch_size";
const BATCH_SECONDS: &str = "courseview_batch_seconds";
const WRITE_CONFLICTS_TOTAL: &str = "courseview_write_conflicts_total";
const TRANSIENT_ERRORS_TOTAL: &str = "courseview_transient_errors_total";
const CONSUMER_LAG_EVENTS: &str = "courseview_consumer_lag_events";
const CONSUMER_LAG_SECONDS: &str = "courseview_consumer_lag_seconds";
const PROJECTION_STALLED: &str = "courseview_projection_stalled";
const PROJECTION_PAUSED: &str = "courseview_projection_paused";
const PARTITION_STUCK: &str = "courseview_partition_stuck";
const CACHE_LOOKUPS_TOTAL: &str = "courseview_cache_lookups_total";
const CACHE_ERRORS_TOTAL: &str = "courseview_cache_errors_total";
const HTTP_REQUESTS_TOTAL: &str = "courseview_http_requests_total";
const HTTP_REQUEST_SECONDS: &str = "courseview_http_request_seconds";
const HTTP_BUSY_TOTAL: &str = "courseview_http_busy_total";

/// Every metric courseview emits.
pub const METRIC_NAMES: &[&str] = &[
    EVENTS_APPLIED_TOTAL,
    DOCUMENTS_WRITTEN_TOTAL,
    DEAD_LETTERS_TOTAL,
    GAPS_TOTAL,
    BATCH_SIZE,
    BATCH_SECONDS,
    WRITE_CONFLICTS_TOTAL,
    TRANSIENT_ERRORS_TOTAL,
    CONSUMER_LAG_EVENTS,
    CONSUMER_LAG_SECONDS,
    PROJECTION_STALLED,
    PROJECTION_PAUSED,
    PARTITION_STUCK,
    CACHE_LOOKUPS_TOTAL,
    CACHE_ERRORS_TOTAL,
    HTTP_REQUESTS_TOTAL,
    HTTP_REQUEST_SECONDS,
    HTTP_BUSY_TOTAL,
];

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global tracing subscriber (`RUST_LOG` filters, default
/// info), exporting spans over OTLP when the `OTEL_*` variables ask for it
/// (as `service` unless `OTEL_SERVICE_NAME` names it). Keep the guard
/// until the process ends: dropping it sends the spans still buffered.
pub fn init_tracing(format: LogFormat, service: &str) -> Result<TracingGuard, traces::TraceSetupError> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn"));
    let provider = traces::exporter(service)?;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    let otel = provider.as_ref().map(traces::layer);
    // `RUST_LOG` filters the logs only: traces have their own filter.
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
    Ok(TracingGuard { provider })
}

/// Flushes and stops the trace exporter when dropped.
#[derive(Debug)]
#[must_use = "dropping the guard stops exporting traces"]
pub struct TracingGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("courseview: traces not all exported at exit: {e}");
            }
        }
    }
}

/// The process-wide Prometheus recorder; installed on first use so tests
/// that run many apps in one process share it.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let seconds = [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        let sizes = [1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), &sizes))
            .map(PrometheusBuilder::build_recorder);
        match recorder {
            Ok(recorder) => {
                let handle = recorder.handle();
                // Err means another recorder is installed (a test harness):
                // we still render ours, which then stays empty.
                let _ = metrics::set_global_recorder(recorder);
                // Histogram samples are kept raw until drained into their
                // buckets, which only a scrape or an upkeep does: without a
                // scraper they grew with every request (the API's peak RSS
                // rose with its request rate in the bench). Once a second
                // bounds them to a second's worth.
                let upkeep = handle.clone();
                let spawned = std::thread::Builder::new()
                    .name("metrics-upkeep".into())
                    .spawn(move || loop {
                        std::thread::sleep(Duration::from_secs(1));
                        upkeep.run_upkeep();
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "metrics upkeep not started: histograms drain only when scraped");
                }
                handle
            }
            Err(e) => panic!("invalid Prometheus bucket configuration: {e}"),
        }
    })
}

pub fn events_applied(projection: &'static str, event_type: &'static str, count: u64) {
    counter!(EVENTS_APPLIED_TOTAL, "projection" => projection, "type" => event_type).increment(count);
}

/// Course documents a flush wrote: against events applied, what folding saves.
pub fn documents_written(projection: &'static str, count: u64) {
    counter!(DOCUMENTS_WRITTEN_TOTAL, "projection" => projection).increment(count);
}

pub fn dead_letters(projection: &'static str, count: u64) {
    counter!(DEAD_LETTERS_TOTAL, "projection" => projection).increment(count);
}

/// A gap between a projection's stored offsets and the log, each time a
/// worker finds it (it is recorded once; this counts the findings).
pub fn gap(projection: &'static str, kind: &'static str) {
    counter!(GAPS_TOTAL, "projection" => projection, "kind" => kind).increment(1);
}

/// An expensive request (`search`, `minVersion`) refused because its
/// class had no permit left.
pub fn expensive_refused(class: &'static str) {
    counter!(HTTP_BUSY_TOTAL, "class" => class).increment(1);
}

pub fn batch(projection: &'static str, size: usize, elapsed: Duration) {
    histogram!(BATCH_SIZE, "projection" => projection).record(size as f64);
    histogram!(BATCH_SECONDS, "projection" => projection).record(elapsed.as_secs_f64());
}

pub fn write_conflicts(projection: &'static str, count: usize) {
    counter!(WRITE_CONFLICTS_TOTAL, "projection" => projection).increment(count as u64);
}

/// A transient failure retried: which system, and which operation (a fixed
/// set of names in the code, so the labels stay bounded).
pub fn transient_error(system: &'static str, op: &'static str) {
    counter!(TRANSIENT_ERRORS_TOTAL, "system" => system, "op" => op).increment(1);
}

pub fn consumer_lag(projection: &'static str, topic: &str, partition: i32, events: i64, seconds: f64) {
    let labels = [
        ("projection", projection.to_owned()),
        ("topic", topic.to_owned()),
        ("partition", partition.to_string()),
    ];
    gauge!(CONSUMER_LAG_EVENTS, &labels).set(events as f64);
    gauge!(CONSUMER_LAG_SECONDS, &labels).set(seconds);
}

pub fn stalled(projection: &'static str, stalled: bool) {
    gauge!(PROJECTION_STALLED, "projection" => projection).set(if stalled { 1.0 } else { 0.0 });
}

/// 1 while an operator has the projection paused.
pub fn paused(projection: &'static str, paused: bool) {
    gauge!(PROJECTION_PAUSED, "projection" => projection).set(if paused { 1.0 } else { 0.0 });
}

/// A partition whose fetch keeps failing at one offset (1), or not (0).
/// Labelled by consumer group (one per projection, and per rebuild).
pub fn partition_stuck(group: &str, topic: &str, partition: i32, stuck: bool) {
    gauge!(PARTITION_STUCK, "group" => group.to_owned(), "topic" => topic.to_owned(), "partition" => partition.to_string())
        .set(if stuck { 1.0 } else { 0.0 });
}

/// A lookup in one cache layer: `memory` (this process) or `redis`.
pub fn cache_lookup(layer: &'static str, hit: bool) {
    // On every API request: the handle is looked up once per thread, not
    // built and hashed from its labels each time.
    thread_local! {
        static HANDLES: RefCell<HashMap<(&'static str, bool), Counter>> = RefCell::default();
    }
    HANDLES.with_borrow_mut(|handles| {
        handles
            .entry((layer, hit))
            .or_insert_with(|| {
                let result = if hit { "hit" } else { "miss" };
                counter!(CACHE_LOOKUPS_TOTAL, "layer" => layer, "result" => result)
            })
            .increment(1);
    });
}

pub fn cache_error(op: &'static str) {
    counter!(CACHE_ERRORS_TOTAL, "op" => op).increment(1);
}

/// The request counter and latency histogram of one (route, status).
type RequestHandles = (Counter, Histogram);

/// A request answered; `route` is its template (bounded, no ids).
pub fn http_request(route: &'static str, status: u16, elapsed: Duration) {
    thread_local! {
        static HANDLES: RefCell<HashMap<(&'static str, u16), RequestHandles>> = RefCell::default();
    }
    HANDLES.with_borrow_mut(|handles| {
        let (requests, seconds) = handles.entry((route, status)).or_insert_with(|| {
            let labels = [("route", route.to_owned()), ("status", status.to_string())];
            (
                counter!(HTTP_REQUESTS_TOTAL, &labels),
                histogram!(HTTP_REQUEST_SECONDS, &labels),
            )
        });
        requests.increment(1);
        seconds.record(elapsed.as_secs_f64());
    });
}

#[cfg(test)]
mod tests {
    use super::METRIC_NAMES;

    /// `courseview_…` names in a text, without histogram suffixes.
    fn mentioned(text: &str) -> std::collections::BTreeSet<String> {
        regex::Regex::new(r"courseview_[a-z_]+")
            .expect("regex")
            .find_iter(text)
            .map(|m| {
                let name = m.as_str();
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name)
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn the_grafana_dashboard_uses_only_metrics_courseview_emits() {
        let dashboard = include_str!("../../docs/grafana/courseview.json");
        let json: serde_json::Value = serde_json::from_str(dashboard).expect("the dashboard is JSON");
        assert!(json["panels"].as_array().is_some_and(|p| !p.is_empty()));
        for name in mentioned(dashboard) {
            assert!(
                METRIC_NAMES.contains(&name.as_str()),
                "the dashboard uses unknown metric {name}"
            );
        }
    }

    #[test]
    fn every_metric_is_documented_in_the_readme() {
        let readme = mentioned(include_str!("../../README.md"));
        for name in METRIC_NAMES {
            assert!(readme.contains(*name), "{name} is not documented in the README");
        }
    }
}
