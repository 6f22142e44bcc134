//! OpenTelemetry traces, off unless an OTLP endpoint is configured through
//! the standard `OTEL_*` variables. The worker opens one CONSUMER span per
//! flush, linked to the context each record carries; the API continues an
//! incoming `traceparent`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;

use crate::record::Record;

/// Whether spans are exported; read on hot paths, so a plain flag.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The header Debezium's outbox router fills from the outbox table's
/// `tracingspancontext` column (placed as a header by the connector's
/// `table.fields.additional.placement`): `java.util.Properties` text
/// holding `traceparent` (and `tracestate`) lines.
pub const DEBEZIUM_CONTEXT_HEADER: &str = "tracingspancontext";

/// The SDK's default limit of links per span; links beyond it are dropped
/// by the SDK, so the worker stops collecting there.
pub const MAX_LINKS: usize = 128;

/// True once [`exporter`] built a provider.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Why tracing could not start: a setting the operator must fix.
#[derive(Debug, thiserror::Error)]
pub enum TraceSetupError {
    #[error("OTEL_EXPORTER_OTLP_PROTOCOL={0:?}: courseview exports OTLP over HTTP only (\"http/protobuf\", port 4318 by default)")]
    Protocol(String),
    #[error("cannot build the OTLP trace exporter (check OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT): {0}")]
    Exporter(String),
}

/// Whether the environment asks for traces: an OTLP endpoint is set, the
/// SDK is not disabled and the traces exporter is not `none`.
fn wanted(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let none = var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) && !disabled && !none
}

/// The tracer provider the environment asks for, or `None` when tracing
/// is off. `service` names the service unless `OTEL_SERVICE_NAME` does.
/// Call before the async runtime starts: the exporter's blocking HTTP
/// client has a runtime of its own.
pub fn exporter(service: &str) -> Result<Option<SdkTracerProvider>, TraceSetupError> {
    let var = |name: &str| std::env::var(name).ok();
    if !wanted(var) {
        return Ok(None);
    }
    for name in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
        if let Some(protocol) = var(name) {
            if protocol.trim() != "http/protobuf" {
                return Err(TraceSetupError::Protocol(protocol));
            }
        }
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| TraceSetupError::Exporter(e.to_string()))?;
    let mut resource = Resource::builder();
    if var("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(Some(provider))
}

/// The spans that start a trace: a worker's flush and an API request.
/// Other spans are exported only below one of them, so the periodic work
/// around them (pointer polls, heartbeats, status) adds no trace of its own.
const ROOTS: &[&str] = &["process", "request"];

/// The `tracing` layer that turns spans into OpenTelemetry spans.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    // Decided per span (not cached per callsite): the same callsite may run
    // inside a root or outside one.
    // Its own filter, not `RUST_LOG`'s: quieter logs keep their traces.
    // Spans and events up to INFO (the DEBUG request span of tower-http's
    // default is not made while exporting).
    let inside_a_root = tracing_subscriber::filter::DynFilterFn::new(|meta, cx| {
        *meta.level() <= tracing::Level::INFO
            && ((meta.is_span() && ROOTS.contains(&meta.name())) || cx.lookup_current().is_some())
    })
    .with_max_level_hint(tracing::level_filters::LevelFilter::INFO);
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("courseview"))
        .with_filter(inside_a_root)
}

/// A record's headers as a propagator reads them. Debezium's properties
/// text, when present, is read as if its lines were headers.
struct RecordHeaders<'a> {
    record: &'a Record,
    debezium: HashMap<String, String>,
}

impl<'a> RecordHeaders<'a> {
    fn new(record: &'a Record) -> Self {
        let debezium = match record.header(DEBEZIUM_CONTEXT_HEADER) {
            Ok(Some(text)) => java_properties(text),
            _ => HashMap::new(),
        };
        RecordHeaders { record, debezium }
    }
}

impl Extractor for RecordHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        // The record's own W3C headers first: the producer that sent it.
        match self.record.header(key) {
            Ok(Some(value)) => Some(value),
            _ => self.debezium.get(key).map(String::as_str),
        }
    }

    fn keys(&self) -> Vec<&str> {
        let own = self
            .record
            .headers
            .iter()
            .filter_map(|(k, _)| std::str::from_utf8(k).ok());
        own.chain(self.debezium.keys().map(String::as_str)).collect()
    }
}

/// `key=value` lines of `java.util.Properties` text (comments and blank
/// lines skipped; `:` also separates, as in Java). Trace contexts hold no
/// escapes, so none are decoded.
fn java_properties(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#') && !line.starts_with('!'))
        .filter_map(|line| {
            let at = line.find(['=', ':'])?;
            Some((line[..at].trim().to_owned(), line[at + 1..].trim().to_owned()))
        })
        .collect()
}

/// The trace context a record carries (W3C `traceparent`/`tracestate`
/// headers, or Debezium's outbox tracing header), when it carries a valid one.
pub fn record_context(record: &Record) -> Option<SpanContext> {
    let cx = TraceContextPropagator::new().extract(&RecordHeaders::new(record));
    let span = cx.span().span_context().clone();
    span.is_valid().then_some(span)
}

/// The trace context of incoming HTTP headers, to continue.
pub fn http_context(headers: &axum::http::HeaderMap) -> opentelemetry::Context {
    struct Headers<'a>(&'a axum::http::HeaderMap);
    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(axum::http::HeaderName::as_str).collect()
        }
    }
    TraceContextPropagator::new().extract(&Headers(headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn record(headers: &[(&str, &str)]) -> Record {
        Record {
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec())))
                .collect(),
            ..Record::default()
        }
    }

    #[test]
    fn a_w3c_traceparent_header_gives_the_record_its_context() {
        let cx = record_context(&record(&[("traceparent", TRACEPARENT)])).expect("a context");
        assert_eq!(cx.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(cx.span_id().to_string(), "00f067aa0ba902b7");
        assert!(cx.is_remote());
    }

    #[test]
    fn debezium_outbox_properties_give_the_record_its_context() {
        let props = format!("#Sun Dec 06 05:00:00 UTC 2026\ntraceparent={TRACEPARENT}\ntracestate=vendor=value\n");
        let cx = record_context(&record(&[(DEBEZIUM_CONTEXT_HEADER, &props)])).expect("a context");
        assert_eq!(cx.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(cx.trace_state().get("vendor"), Some("value"));
    }

    #[test]
    fn records_without_a_valid_context_have_none() {
        assert!(record_context(&record(&[])).is_none());
        assert!(record_context(&record(&[("traceparent", "00-garbage")])).is_none());
        let zero = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        assert!(record_context(&record(&[("traceparent", zero)])).is_none());
    }

    #[test]
    fn tracing_is_on_only_with_an_endpoint_and_not_disabled() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
        };
        assert!(!wanted(env(&[])));
        assert!(wanted(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")])));
        assert!(wanted(env(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/v1/traces"
        )])));
        assert!(!wanted(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SDK_DISABLED", "true")
        ])));
        assert!(!wanted(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_TRACES_EXPORTER", "none")
        ])));
        assert!(!wanted(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])));
    }
}
