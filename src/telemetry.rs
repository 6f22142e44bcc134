//! Logs and metrics: tracing setup and every metric courseview emits, named
//! in one place. Labels are bounded: projection, event type, topic,
//! partition, route, status class — never a course id.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global tracing subscriber (`RUST_LOG` filters, default info).
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
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
                handle
            }
            Err(e) => panic!("invalid Prometheus bucket configuration: {e}"),
        }
    })
}

pub fn event_applied(projection: &'static str, event_type: &'static str) {
    counter!("courseview_events_applied_total", "projection" => projection, "type" => event_type).increment(1);
}

pub fn dead_letters(projection: &'static str, count: u64) {
    counter!("courseview_dead_letters_total", "projection" => projection).increment(count);
}

pub fn batch(projection: &'static str, size: usize, elapsed: Duration) {
    histogram!("courseview_batch_size", "projection" => projection).record(size as f64);
    histogram!("courseview_batch_seconds", "projection" => projection).record(elapsed.as_secs_f64());
}

pub fn write_conflicts(projection: &'static str, count: usize) {
    counter!("courseview_write_conflicts_total", "projection" => projection).increment(count as u64);
}

/// A transient failure retried: which system, and which operation (a fixed
/// set of names in the code, so the labels stay bounded).
pub fn transient_error(system: &'static str, op: &'static str) {
    counter!("courseview_transient_errors_total", "system" => system, "op" => op).increment(1);
}

pub fn consumer_lag(projection: &'static str, topic: &str, partition: i32, events: i64, seconds: f64) {
    let labels = [
        ("projection", projection.to_owned()),
        ("topic", topic.to_owned()),
        ("partition", partition.to_string()),
    ];
    gauge!("courseview_consumer_lag_events", &labels).set(events as f64);
    gauge!("courseview_consumer_lag_seconds", &labels).set(seconds);
}

pub fn stalled(projection: &'static str, stalled: bool) {
    gauge!("courseview_projection_stalled", "projection" => projection).set(if stalled { 1.0 } else { 0.0 });
}

pub fn cache_lookup(hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    counter!("courseview_cache_lookups_total", "result" => result).increment(1);
}

pub fn cache_error(op: &'static str) {
    counter!("courseview_cache_errors_total", "op" => op).increment(1);
}

pub fn http_request(route: String, status: u16, elapsed: Duration) {
    let labels = [("route", route), ("status", status.to_string())];
    counter!("courseview_http_requests_total", &labels).increment(1);
    histogram!("courseview_http_request_seconds", &labels).record(elapsed.as_secs_f64());
}
