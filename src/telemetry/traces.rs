//! OpenTelemetry traces, off unless an OTLP endpoint is configured through
//! the standard `OTEL_*` variables. The worker opens one CONSUMER span per
//! flush, linked to the context each record carries; the API continues an
//! incoming `traceparent`.

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

/// Longest `traceparent` read (a valid one is 55 bytes; room for future
/// versions): a longer one is ignored, not parsed.
const MAX_TRACEPARENT: usize = 512;
/// Longest Debezium context header (or `tracestate`) read.
const MAX_CONTEXT_TEXT: usize = 4096;

/// One source's `traceparent` and `tracestate`, as a propagator reads them.
struct W3c {
    traceparent: String,
    tracestate: Option<String>,
}

impl Extractor for W3c {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(&self.traceparent),
            "tracestate" => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// The context's two values from one source, never mixed: the record's own
/// W3C headers (the producer that sent it) when it has a `traceparent`,
/// else Debezium's properties text.
fn w3c(record: &Record) -> Option<W3c> {
    let text = |name: &str, max: usize| record.header(name).ok().flatten().filter(|v| v.len() <= max);
    if record.header("traceparent").ok().flatten().is_some() {
        return Some(W3c {
            traceparent: text("traceparent", MAX_TRACEPARENT)?.to_owned(),
            tracestate: text("tracestate", MAX_CONTEXT_TEXT).map(str::to_owned),
        });
    }
    let properties = text(DEBEZIUM_CONTEXT_HEADER, MAX_CONTEXT_TEXT)?;
    Some(W3c {
        traceparent: java_property(properties, "traceparent").filter(|v| v.len() <= MAX_TRACEPARENT)?,
        tracestate: java_property(properties, "tracestate"),
    })
}

/// The value of `key` in `java.util.Properties` text as `Properties.store`
/// writes it: `key=value` lines (`:` also separates), comments and blank
/// lines skipped, backslash escapes (`\=`, `\:`, `\uXXXX`, …) decoded.
fn java_property(text: &str, key: &str) -> Option<String> {
    text.lines()
        .map(str::trim_start)
        .filter(|line| !line.is_empty() && !line.starts_with('#') && !line.starts_with('!'))
        .find_map(|line| {
            let at = separator(line)?;
            (unescape(line[..at].trim_end()) == key).then(|| unescape(line[at + 1..].trim_start()))
        })
}

/// The first `=` or `:` not escaped by a backslash.
fn separator(line: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '=' | ':' => return Some(i),
            _ => {}
        }
    }
    None
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\u{c}'),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                if let Some(c) = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                    out.push(c);
                }
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// The trace context a record carries (W3C `traceparent`/`tracestate`
/// headers, or Debezium's outbox tracing header), when it carries a valid one.
pub fn record_context(record: &Record) -> Option<SpanContext> {
    let cx = TraceContextPropagator::new().extract(&w3c(record)?);
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
    fn debezium_properties_as_java_stores_them_are_unescaped() {
        // What `Properties.store` writes: `=` and `:` in values escaped.
        let props = format!("#Sun Dec 06\ntraceparent={TRACEPARENT}\ntracestate=vendor\\=value,other\\=x\\u0031\n");
        let cx = record_context(&record(&[(DEBEZIUM_CONTEXT_HEADER, &props)])).expect("a context");
        assert_eq!(cx.trace_state().get("vendor"), Some("value"));
        assert_eq!(cx.trace_state().get("other"), Some("x1"));
        assert_eq!(java_property("a\\:b\\=c=d\\:e", "a:b=c"), Some("d:e".to_owned()));
    }

    #[test]
    fn a_records_own_traceparent_is_never_mixed_with_debeziums_tracestate() {
        let props = "traceparent=00-11111111111111111111111111111111-2222222222222222-01\ntracestate=vendor=debezium\n";
        let cx = record_context(&record(&[
            ("traceparent", TRACEPARENT),
            (DEBEZIUM_CONTEXT_HEADER, props),
        ]))
        .expect("a context");
        assert_eq!(cx.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            cx.trace_state().get("vendor"),
            None,
            "Debezium's state is another context's"
        );
    }

    #[test]
    fn oversized_context_headers_are_ignored_unparsed() {
        let long = format!("{TRACEPARENT}{}", "-".repeat(1 << 20));
        assert!(record_context(&record(&[("traceparent", &long)])).is_none());
        let props = format!("traceparent={TRACEPARENT}\n#{}", "x".repeat(8192));
        assert!(record_context(&record(&[(DEBEZIUM_CONTEXT_HEADER, &props)])).is_none());
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
