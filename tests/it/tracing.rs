//! OpenTelemetry traces against a real Jaeger (v2 all-in-one, which
//! `scripts/services` builds and starts): a record's trace context, sent
//! on a per-type topic or through Debezium's outbox, is found in Jaeger as
//! a link of the worker's CONSUMER span, whose children are its MongoDB
//! write, offset store and Redis announcement; an API request continues
//! its caller's `traceparent`.

use std::time::Duration;

use courseview::kafka::Outgoing;
use courseview::read_model::ReadModel;
use serde_json::{json, Value};

use crate::helpers::{event, eventually, unique, Reaped, TestApp};
use crate::outbox::{connect_url, connector_config, mariadb_port, register, unregister, CourseService, WireForm};

fn otlp_endpoint() -> String {
    std::env::var("JAEGER_OTLP").unwrap_or_else(|_| "http://127.0.0.1:4318".into())
}

fn jaeger_query() -> String {
    std::env::var("JAEGER_QUERY").unwrap_or_else(|_| "http://127.0.0.1:16686".into())
}

/// A caller's W3C context: a fresh trace id and span id.
fn caller_context() -> (String, String, String) {
    let trace = format!("{:032x}", rand::random::<u128>() | 1);
    let span = format!("{:016x}", rand::random::<u64>() | 1);
    let header = format!("00-{trace}-{span}-01");
    (trace, span, header)
}

/// Settings that export this process's spans to the test Jaeger as
/// `service`, without the SDK's default 5 s batching delay; its logs at
/// warnings only (`RUST_LOG` filters logs, not traces).
fn traced(service: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_endpoint()),
        ("OTEL_SERVICE_NAME", service.to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ("RUST_LOG", "warn".to_owned()),
    ]
}

fn traced_worker(app: &TestApp, service: &str) -> Reaped {
    let env = traced(service);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    app.worker_process(ReadModel::Catalog, &env)
}

fn tag<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["tags"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)
        .map(|t| &t["value"])
}

/// The spans Jaeger holds for `service`.
async fn spans_of(http: &reqwest::Client, service: &str) -> Vec<Value> {
    let url = format!("{}/api/traces?service={service}&limit=1000&lookback=1h", jaeger_query());
    let Ok(response) = http.get(url).send().await else {
        return Vec::new();
    };
    let body: Value = response.json().await.unwrap_or_default();
    body["data"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|trace| trace["spans"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// Waits for the worker's CONSUMER span linked to `trace`/`parent`, and
/// returns it with every span of its own trace.
async fn process_span_linked_to(
    http: &reqwest::Client,
    service: &str,
    trace: &str,
    parent: &str,
) -> (Value, Vec<Value>) {
    eventually(
        "Jaeger to hold the worker's span linked to the record's trace",
        Duration::from_secs(60),
        || async {
            let spans = spans_of(http, service).await;
            let linked = spans.iter().find(|s| {
                s["operationName"].as_str().is_some_and(|n| n.starts_with("process"))
                    && s["references"]
                        .as_array()
                        .is_some_and(|refs| refs.iter().any(|r| r["traceID"] == trace && r["spanID"] == parent))
            })?;
            let own: Vec<Value> = spans
                .iter()
                .filter(|s| s["traceID"] == linked["traceID"])
                .cloned()
                .collect();
            // Its children are exported as they end, a moment before it.
            let names = descendant_names(linked, &own);
            ["write_states", "store_offsets", "bump_epoch"]
                .iter()
                .all(|n| names.iter().any(|m| m == n))
                .then(|| (linked.clone(), own))
        },
    )
    .await
}

/// Operation names of every span below `root` in `spans`.
fn descendant_names(root: &Value, spans: &[Value]) -> Vec<String> {
    let mut below = vec![root["spanID"].clone()];
    let mut names = Vec::new();
    let mut grew = true;
    while grew {
        grew = false;
        for s in spans {
            let child_of_known = s["references"].as_array().is_some_and(|refs| {
                refs.iter().any(|r| {
                    r["refType"] == "CHILD_OF" && r["traceID"] == root["traceID"] && below.contains(&r["spanID"])
                })
            });
            if child_of_known && !below.contains(&s["spanID"]) {
                below.push(s["spanID"].clone());
                names.push(s["operationName"].as_str().unwrap_or_default().to_owned());
                grew = true;
            }
        }
    }
    names
}

fn assert_consumer_span(span: &Value, topic: &str) {
    assert_eq!(
        span["operationName"],
        format!("process {topic}"),
        "named by its topic: {span}"
    );
    assert_eq!(tag(span, "span.kind"), Some(&json!("consumer")), "{span}");
    assert_eq!(tag(span, "messaging.system"), Some(&json!("kafka")), "{span}");
    assert_eq!(tag(span, "messaging.operation.type"), Some(&json!("process")), "{span}");
    assert_eq!(tag(span, "messaging.destination.name"), Some(&json!(topic)), "{span}");
    assert!(
        tag(span, "messaging.consumer.group.name")
            .and_then(Value::as_str)
            .is_some_and(|g| g.contains("catalog")),
        "the consumer group: {span}"
    );
    assert!(
        tag(span, "messaging.batch.message_count")
            .and_then(Value::as_i64)
            .is_some_and(|n| n >= 1),
        "the batch size: {span}"
    );
}

#[tokio::test]
async fn a_records_traceparent_links_the_workers_consumer_span_whose_children_are_its_writes() {
    let app = TestApp::spawn().await;
    let service = unique("courseview-worker-test");
    let mut worker = traced_worker(&app, &service);
    let (trace, parent, header) = caller_context();
    let created = event(
        "CourseCreatedEvent",
        "traced",
        1,
        json!({"name": "Traced", "teacherId": "t1"}),
    );
    let topic = app.topic("CourseCreatedEvent");
    app.send(Outgoing {
        topic: topic.clone(),
        key: Some("traced".into()),
        value: Some(created.to_string()),
        headers: vec![("traceparent".into(), header)],
        ..Outgoing::default()
    })
    .await;
    app.wait_applied(ReadModel::Catalog, 1).await;

    let (span, own) = process_span_linked_to(&app.http, &service, &trace, &parent).await;
    assert_consumer_span(&span, &topic);
    assert!(
        span["references"]
            .as_array()
            .is_some_and(|r| r.iter().all(|r| r["refType"] != "CHILD_OF")),
        "a root span (links, no parent): {span}"
    );
    let names = descendant_names(&span, &own);
    for child in ["write_states", "store_offsets", "begin_write", "bump_epoch"] {
        assert!(
            names.iter().any(|n| n == child),
            "{child} below the consumer span: {names:?}"
        );
    }
    crate::helpers::signal(&worker, "TERM");
    let _ = worker.0.wait();
}

#[tokio::test]
async fn an_outbox_rows_tracing_column_links_the_workers_span_to_the_course_services_trace() {
    let app = TestApp::spawn().await;
    let service_name = unique("courseview-outbox-test");
    let service = CourseService::create(mariadb_port());
    let connect = connect_url();
    let name = register(
        &app.http,
        &connect,
        &connector_config(&app, &service, WireForm::StringConverter, &app.brokers),
    )
    .await;
    let mut worker = traced_worker(&app, &service_name);
    crate::debezium::warm_up(&app, &service).await;
    let (trace, parent, header) = caller_context();
    let created = event(
        "CourseCreatedEvent",
        "outboxed",
        1,
        json!({"name": "Outboxed", "teacherId": "t1"}),
    );
    service.commit_traced(&created, &header).expect("committed");

    let (span, _) = process_span_linked_to(&app.http, &service_name, &trace, &parent).await;
    assert_consumer_span(&span, &app.topic("outbox.event.Course"));
    unregister(&app.http, &connect, &name).await;
    crate::helpers::signal(&worker, "TERM");
    let _ = worker.0.wait();
}

#[tokio::test]
async fn an_api_request_continues_its_callers_traceparent() {
    let app = TestApp::spawn().await;
    app.project_all(
        ReadModel::Catalog,
        &[
            event(
                "CourseCreatedEvent",
                "read",
                1,
                json!({"name": "Read", "teacherId": "t1"}),
            ),
            event("CoursePostedEvent", "read", 2, json!({})),
        ],
    )
    .await;
    let service = unique("courseview-api-test");
    let port = crate::peers::free_port();
    let mut env = traced(&service);
    env.push(("COURSEVIEW_LISTEN", format!("127.0.0.1:{port}")));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut server = app.process(&["serve"], &env);
    let base = format!("http://127.0.0.1:{port}");
    let (trace, parent, header) = caller_context();
    let status = eventually("the traced API to answer", Duration::from_secs(30), || async {
        let response = app
            .http
            .get(format!("{base}/catalog/courses/read"))
            .header("traceparent", &header)
            .send()
            .await
            .ok()?;
        Some(response.status().as_u16())
    })
    .await;
    assert_eq!(status, 200);

    let span = eventually("Jaeger to hold the request's span", Duration::from_secs(60), || async {
        let url = format!("{}/api/traces/{trace}", jaeger_query());
        let body: Value = app.http.get(url).send().await.ok()?.json().await.ok()?;
        body["data"][0]["spans"]
            .as_array()?
            .iter()
            .find(|s| s["operationName"] == "GET /catalog/courses/{courseId}")
            .cloned()
    })
    .await;
    assert_eq!(span["traceID"], trace, "the caller's trace goes on");
    assert!(
        span["references"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["refType"] == "CHILD_OF" && r["spanID"] == parent)),
        "a child of the caller's span: {span}"
    );
    assert_eq!(tag(&span, "span.kind"), Some(&json!("server")), "{span}");
    assert_eq!(tag(&span, "http.response.status_code"), Some(&json!(200)), "{span}");
    crate::helpers::signal(&server, "TERM");
    let _ = server.0.wait();
}

#[test]
fn an_otlp_protocol_courseview_cannot_speak_stops_it_at_start_naming_the_setting() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_courseview"))
        .args(["status"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_endpoint())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .output()
        .expect("courseview runs");
    assert!(!out.status.success(), "it must not start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL"),
        "names the setting: {stderr}"
    );
}
