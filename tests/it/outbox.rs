//! The course service's side of the transactional outbox, played with plain
//! SQL over a real connection to MariaDB, and Debezium's outbox router
//! registered through Kafka Connect's REST API.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{eventually, unique, TestApp};

pub fn mariadb_port() -> u16 {
    std::env::var("MARIADB_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3306)
}

pub fn connect_url() -> String {
    std::env::var("CONNECT_URL").unwrap_or_else(|_| "http://127.0.0.1:8083".into())
}

/// The user `scripts/services` creates, with the grants Debezium needs.
const USER: &str = "courseview";
const PASSWORD: &str = "courseview";

/// A database of the course service's own: its `course` and `outbox` tables.
#[derive(Debug, Clone)]
pub struct CourseService {
    pub database: String,
    pub port: u16,
}

/// Quotes a string as a MariaDB literal (backslashes are escapes there).
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

fn opt_literal(v: Option<&Value>) -> String {
    v.and_then(Value::as_str).map_or_else(|| "NULL".into(), literal)
}

impl CourseService {
    pub fn create(port: u16) -> CourseService {
        let service = CourseService {
            database: unique("courses_"),
            port,
        };
        service
            .sql_in(None, &format!("CREATE DATABASE {}", service.database))
            .expect("database created");
        service
            .sql(include_str!("../../docs/debezium/outbox-schema.sql"))
            .expect("tables created");
        service
    }

    /// Runs SQL in this service's database; Err carries the client's message.
    pub fn sql(&self, statements: &str) -> Result<String, String> {
        self.sql_in(Some(&self.database), statements)
    }

    fn sql_in(&self, database: Option<&str>, statements: &str) -> Result<String, String> {
        let mut command = Command::new("mariadb");
        command
            .args(["--protocol=tcp", "-h", "127.0.0.1", "-N", "-B"])
            .arg(format!("-P{}", self.port))
            .arg(format!("-u{USER}"))
            .arg(format!("-p{PASSWORD}"));
        if let Some(db) = database {
            command.arg(format!("-D{db}"));
        }
        let out = command
            .arg("-e")
            .arg(statements)
            .stdin(Stdio::null())
            .output()
            .expect("the mariadb client runs");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The statements the course service runs for one domain event: its
    /// change to `course`, and the event in `outbox`.
    fn statements(event: &Value) -> String {
        Self::traced_statements(event, None)
    }

    /// As [`Self::statements`], the outbox row carrying a trace context in
    /// Debezium's tracing column.
    fn traced_statements(event: &Value, traceparent: Option<&str>) -> String {
        let course = event["courseId"].as_str().expect("courseId");
        let kind = event["eventType"].as_str().expect("eventType");
        let id = event["eventId"].as_str().expect("eventId");
        // The payload column: the event without what the router carries
        // elsewhere (id in a header, the course id as the key, the type).
        let mut payload = event.clone();
        let fields = payload.as_object_mut().expect("object");
        for routed in ["eventId", "courseId", "eventType"] {
            fields.remove(routed);
        }
        let change = match kind {
            "CourseCreatedEvent" => format!(
                "INSERT INTO course (course_id, name, thumbnail, description, teacher_id, registered_at, last_updated_at)
                 VALUES ({c}, {n}, {t}, {d}, {tc}, NOW(3), NOW(3));",
                c = literal(course),
                n = opt_literal(event.get("name")),
                t = opt_literal(event.get("thumbnail")),
                d = opt_literal(event.get("description")),
                tc = opt_literal(event.get("teacherId")),
            ),
            "CourseUpdatedEvent" => {
                let mut sets = vec!["last_updated_at = NOW(3)".to_owned()];
                for (field, column) in [("name", "name"), ("thumbnail", "thumbnail"), ("description", "description")] {
                    if let Some(v) = event.get(field) {
                        sets.push(format!("{column} = {}", opt_literal(Some(v))));
                    }
                }
                format!("UPDATE course SET {} WHERE course_id = {};", sets.join(", "), literal(course))
            }
            "CoursePostedEvent" => format!("UPDATE course SET posted = TRUE WHERE course_id = {};", literal(course)),
            "CourseUnpostedEvent" => {
                format!("UPDATE course SET posted = FALSE WHERE course_id = {};", literal(course))
            }
            "CourseDeletedEvent" => format!("DELETE FROM course WHERE course_id = {};", literal(course)),
            other => panic!("not a course event: {other}"),
        };
        format!(
            "{change}
             INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, tracingspancontext)
             VALUES ({id}, 'Course', {course}, {kind}, {payload}, {context});",
            context = traceparent.map_or_else(
                || "NULL".to_owned(),
                |t| literal(&format!("#written by the course service\ntraceparent={t}\n"))
            ),
            id = literal(id),
            course = literal(course),
            kind = literal(kind),
            payload = literal(&payload.to_string()),
        )
    }

    /// One committed transaction per event, as the course service does.
    pub fn commit(&self, event: &Value) -> Result<String, String> {
        self.sql(&format!("START TRANSACTION; {} COMMIT;", Self::statements(event)))
    }

    /// As [`Self::commit`], the outbox row carrying `traceparent`.
    pub fn commit_traced(&self, event: &Value, traceparent: &str) -> Result<String, String> {
        self.sql(&format!(
            "START TRANSACTION; {} COMMIT;",
            Self::traced_statements(event, Some(traceparent))
        ))
    }

    /// The same writes, rolled back: nothing of them may ever show.
    pub fn roll_back(&self, events: &[Value]) {
        let body: String = events.iter().map(Self::statements).collect();
        self.sql(&format!("START TRANSACTION; {body} ROLLBACK;"))
            .expect("rolled back");
    }
}

/// How the router's records reach Kafka: the four wire forms of DESIGN §1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireForm {
    StringConverter,
    JsonNoSchemas,
    JsonWithSchemas,
    ExpandedPayload,
}

impl WireForm {
    fn converters(self) -> Value {
        let string = "org.apache.kafka.connect.storage.StringConverter";
        let json_converter = "org.apache.kafka.connect.json.JsonConverter";
        match self {
            WireForm::StringConverter => json!({"key.converter": string, "value.converter": string}),
            WireForm::JsonNoSchemas | WireForm::ExpandedPayload => json!({
                "key.converter": json_converter, "key.converter.schemas.enable": "false",
                "value.converter": json_converter, "value.converter.schemas.enable": "false",
            }),
            WireForm::JsonWithSchemas => json!({
                "key.converter": json_converter, "key.converter.schemas.enable": "true",
                "value.converter": json_converter, "value.converter.schemas.enable": "true",
            }),
        }
    }
}

/// The connector settings of `docs/debezium/outbox-connector.json`, which
/// docker-compose.yml registers too, with this test's names filled in.
pub fn connector_config(app: &TestApp, service: &CourseService, form: WireForm, brokers: &str) -> Value {
    let template = include_str!("../../docs/debezium/outbox-connector.json");
    let filled = template
        .replace("${DATABASE_HOST}", "127.0.0.1")
        .replace("${DATABASE_PORT}", &service.port.to_string())
        .replace("${DATABASE_USER}", USER)
        .replace("${DATABASE_PASSWORD}", PASSWORD)
        .replace("${DATABASE_NAME}", &service.database)
        .replace("${KAFKA_BROKERS}", brokers)
        .replace("${TOPIC_PREFIX}", &format!("{}.", app.id))
        .replace(
            "${SERVER_ID}",
            &(10_000 + rand::random::<u32>() % 1_000_000_000).to_string(),
        );
    let mut settings: serde_json::Map<String, Value> =
        serde_json::from_str(&filled).expect("connector template is JSON");
    if let Value::Object(converters) = form.converters() {
        settings.extend(converters);
    }
    if form == WireForm::ExpandedPayload {
        settings.insert("transforms.outbox.table.expand.json.payload".into(), json!("true"));
    }
    json!({"name": format!("{}-outbox", app.id), "config": settings})
}

/// Registers a connector and waits until it and its task run.
pub async fn register(http: &reqwest::Client, connect: &str, config: &Value) -> String {
    let name = config["name"].as_str().expect("name").to_owned();
    // A worker that is starting or rebalancing answers 404, 409 or 500 for a while.
    eventually(
        &format!("Connect to take connector {name}"),
        Duration::from_secs(120),
        || async {
            let response = http
                .post(format!("{connect}/connectors"))
                .json(config)
                .send()
                .await
                .ok()?;
            let status = response.status();
            if status.as_u16() == 400 || status.as_u16() == 422 {
                panic!(
                    "connector {name} refused: {}",
                    response.text().await.unwrap_or_default()
                );
            }
            status.is_success().then_some(())
        },
    )
    .await;
    wait_running(http, connect, &name).await;
    name
}

/// Until the connector and its one task report RUNNING.
pub async fn wait_running(http: &reqwest::Client, connect: &str, name: &str) {
    eventually(
        &format!("connector {name} running"),
        Duration::from_secs(120),
        || async {
            let status: Value = http
                .get(format!("{connect}/connectors/{name}/status"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            if let Some(trace) = status["tasks"][0]["trace"].as_str() {
                panic!("connector {name} failed: {trace}");
            }
            (status["connector"]["state"] == "RUNNING" && status["tasks"][0]["state"] == "RUNNING").then_some(())
        },
    )
    .await;
}

pub async fn unregister(http: &reqwest::Client, connect: &str, name: &str) {
    let _ = http.delete(format!("{connect}/connectors/{name}")).send().await;
}

/// As an operator's automation does: restarts the connector's failed tasks
/// (Debezium stops its task when the database goes away at the wrong
/// moment) until they run; returns how many restarts it took.
pub async fn restart_until_running(http: &reqwest::Client, connect: &str, name: &str) -> u32 {
    let mut restarts = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let status: Value = match http.get(format!("{connect}/connectors/{name}/status")).send().await {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        let task = status["tasks"][0]["state"].as_str().unwrap_or("");
        if status["connector"]["state"] == "RUNNING" && task == "RUNNING" {
            return restarts;
        }
        if task == "FAILED" || status["connector"]["state"] == "FAILED" {
            let _ = http
                .post(format!(
                    "{connect}/connectors/{name}/restart?includeTasks=true&onlyFailed=true"
                ))
                .send()
                .await;
            restarts += 1;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "connector {name} never ran again: {status}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
