//! `TestApp`: one isolated courseview (topics, groups, database, key prefix)
//! with its API served in-process on port 0.

use std::future::Future;
use std::process::Child;
use std::time::{Duration, Instant};

use courseview::cache::Cache;
use courseview::http::{self, ApiSettings, AppState};
use courseview::kafka::{create_topics, ConsumerSettings, Outgoing, Producer};
use courseview::mongo::Store;
use courseview::read_model::ReadModel;
use courseview::status::StatusProbe;
use courseview::worker::{self, WorkerSettings};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const TYPES: [&str; 5] = [
    "CourseCreatedEvent",
    "CourseUpdatedEvent",
    "CoursePostedEvent",
    "CourseUnpostedEvent",
    "CourseDeletedEvent",
];

pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}
pub fn mongodb_uri() -> String {
    std::env::var("MONGODB_URI").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".into())
}
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The port of the suite's Redis (for proxies in front of it).
pub fn mongodb_port() -> u16 {
    mongodb_uri()
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("MONGODB_URI ends in a port")
}

pub fn redis_port() -> u16 {
    redis_url()
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("REDIS_URL ends in a port")
}

/// A fresh id for names: topics, groups, databases, key prefixes.
pub fn unique(label: &str) -> String {
    format!(
        "{label}{}",
        uuid::Uuid::new_v4().simple().to_string().get(..12).unwrap_or("x")
    )
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub struct Worker {
    pub cancel: CancellationToken,
    pub task: JoinHandle<Result<worker::Stopped, worker::WorkerError>>,
}

impl Worker {
    /// Graceful stop: finish the batch, store offsets, leave the group.
    pub async fn stop(self) {
        self.cancel.cancel();
        let stopped = self.task.await.expect("worker task").expect("worker ends cleanly");
        assert_eq!(stopped, worker::Stopped::Shutdown);
    }
}

pub struct TestApp {
    pub id: String,
    pub store: Store,
    pub cache: Option<Cache>,
    pub producer: Producer,
    pub base_url: String,
    pub http: reqwest::Client,
    pub api_cancel: CancellationToken,
    pub probe: StatusProbe,
    pub mongodb_uri: String,
    /// The broker this app's topics live on.
    pub brokers: String,
    /// The API's in-process cache, if on.
    pub local: Option<std::sync::Arc<courseview::cache::LocalCache>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.api_cancel.cancel();
    }
}

pub struct Options {
    pub redis_url: Option<String>,
    /// The broker of this app (the suite's by default).
    pub brokers: Option<String>,
    /// Brokers the API's status probe asks (the app's broker by default).
    pub status_brokers: Option<String>,
    pub request_timeout: Duration,
    /// How the teacher dashboard is guarded (public in most tests).
    pub dashboard: courseview::http::DashboardAuth,
    pub mongodb_uri: String,
    pub min_version_wait: Duration,
    pub stall_after: Duration,
    /// The API's in-process cache (on, as deployed).
    pub local_cache_bytes: u64,
    /// `q` searches and `minVersion` waits at once (the API's defaults).
    pub max_searches: usize,
    pub max_waits: usize,
    /// The API's port (any free one if `None`).
    pub api_port: Option<u16>,
    /// Origins that may read the API cross-origin.
    pub cors: courseview::http::cors::CorsSettings,
    /// TLS for the app's Redis (a `rediss://` `redis_url`).
    pub redis_tls: courseview::cache::RedisTls,
    /// Counts the API's reads (`find`) of read-model collections, through
    /// the driver's command monitoring.
    pub api_finds: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            redis_url: Some(redis_url()),
            brokers: None,
            status_brokers: None,
            request_timeout: Duration::from_secs(10),
            dashboard: courseview::http::DashboardAuth::Public,
            mongodb_uri: mongodb_uri(),
            min_version_wait: Duration::from_secs(2),
            stall_after: Duration::from_secs(60),
            local_cache_bytes: 8 << 20,
            max_searches: ApiSettings::default().max_searches,
            max_waits: ApiSettings::default().max_waits,
            api_finds: None,
            redis_tls: courseview::cache::RedisTls::default(),
            cors: courseview::http::cors::CorsSettings::default(),
            api_port: None,
        }
    }
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        TestApp::with(Options::default()).await
    }

    pub async fn with(options: Options) -> TestApp {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let id = unique("t");
        let database = format!("cv_{id}");
        let store = Store::connect(&options.mongodb_uri, &database, Duration::from_secs(2))
            .await
            .expect("store");
        let cache = options.redis_url.as_ref().map(|url| {
            Cache::with_tls(
                url,
                &options.redis_tls,
                &format!("cvtest:{id}"),
                Duration::from_millis(200),
                Duration::from_secs(60),
            )
            .expect("cache")
        });
        let mut topics: Vec<String> = TYPES.iter().map(|t| format!("{id}.{t}")).collect();
        topics.push(format!("{id}.outbox.event.Course"));
        let kafka = options.brokers.clone().unwrap_or_else(brokers);
        create_topics(&kafka, &topics, 2).await.expect("topics created");
        let settings = ApiSettings {
            min_version_wait: options.min_version_wait,
            request_timeout: options.request_timeout,
            max_searches: options.max_searches,
            max_waits: options.max_waits,
            cors: options.cors.clone(),
            ..ApiSettings::default()
        };
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", options.api_port.unwrap_or(0)))
            .await
            .expect("bind");
        let base_url = format!("http://{}", listener.local_addr().expect("addr"));
        let api_cancel = CancellationToken::new();
        let probe = StatusProbe::new(
            store.clone(),
            options.status_brokers.clone().unwrap_or_else(|| kafka.clone()),
            &format!(r"^{id}\.(Course.*Event|outbox\.event\.Course)$"),
            options.stall_after,
        )
        .expect("probe");
        let api_store = match &options.api_finds {
            None => store.clone(),
            Some(finds) => {
                let finds = std::sync::Arc::clone(finds);
                let mut driver = mongodb::options::ClientOptions::parse(&options.mongodb_uri)
                    .await
                    .expect("options");
                driver.command_event_handler = Some(mongodb::event::EventHandler::callback(move |event| {
                    if let mongodb::event::command::CommandEvent::Started(started) = event {
                        let read_model = started.command.get_str("find").is_ok_and(|c| c.contains("_g"));
                        if started.command_name == "find" && read_model {
                            finds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }));
                Store::with_options(driver, &database, Duration::from_secs(2)).expect("store")
            }
        };
        let state = AppState::new(api_store, cache.clone(), settings)
            .with_status(probe.clone())
            .with_auth(options.dashboard.clone())
            .with_local_cache(options.local_cache_bytes);
        let local = state.local_cache();
        tokio::spawn(http::serve(listener, state, api_cancel.clone()));
        TestApp {
            producer: Producer::new(&kafka).expect("producer"),
            brokers: kafka.clone(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
            id,
            store,
            cache,
            base_url,
            api_cancel,
            probe,
            mongodb_uri: options.mongodb_uri.clone(),
            local,
        }
    }

    pub fn topic(&self, name: &str) -> String {
        format!("{}.{name}", self.id)
    }

    pub fn topics_regex(&self) -> String {
        format!(r"^{}\.(Course.*Event|outbox\.event\.Course)$", self.id)
    }

    pub fn worker_settings(&self, model: ReadModel) -> WorkerSettings {
        WorkerSettings {
            model,
            kafka: ConsumerSettings {
                brokers: self.brokers.clone().into(),
                topics: self.topics_regex(),
                group_id: format!("{}.{}", self.id, model.name()),
                metadata_refresh: Duration::from_secs(1),
                session_timeout: Duration::from_secs(6),
                on_gap: courseview::kafka::OnGap::Stop,
                stuck: std::sync::Arc::default(),
            },
            batch_size: 200,
            batch_linger: Duration::from_millis(10),
            fold: courseview::worker::FoldLimits::default(),
            max_backoff: Duration::from_secs(1),
            max_record_bytes: worker::DEFAULT_MAX_RECORD_BYTES,
            max_queue_bytes: 16 * 1024 * 1024,
            state_cache_bytes: worker::DEFAULT_STATE_CACHE_BYTES,
            indexes: worker::IndexBuild::AtStart,
            shutdown_timeout: Duration::from_secs(10),
            on_phase: None,
            cache_held: None,
            operator_paused: None,
            max_rate: None,
        }
    }

    pub fn start_worker(&self, model: ReadModel) -> Worker {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(worker::run(
            self.worker_settings(model),
            self.store.clone(),
            self.cache.clone(),
            cancel.clone(),
        ));
        Worker { cancel, task }
    }

    /// Produces one event as the course service does: to its type's topic.
    pub async fn publish(&self, event: &Value) {
        let event_type = event["eventType"].as_str().expect("eventType");
        self.send(Outgoing {
            topic: self.topic(event_type),
            key: event["courseId"].as_str().map(str::to_owned),
            value: Some(event.to_string()),
            ..Outgoing::default()
        })
        .await;
    }

    /// Publishes `events` in order, each to its type's topic.
    pub async fn publish_all(&self, events: &[Value]) {
        for e in events {
            self.publish(e).await;
        }
    }

    /// Runs a `model` worker until it has applied `events`, then stops it.
    pub async fn project_all(&self, model: ReadModel, events: &[Value]) {
        let worker = self.start_worker(model);
        self.publish_all(events).await;
        self.wait_applied(model, events.len() as i64).await;
        worker.stop().await;
    }

    pub async fn send(&self, record: Outgoing) {
        self.producer.send(&record).await.expect("produced");
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base_url))
            .send()
            .await
            .expect("request")
    }

    /// The status of a GET to any URL (another process's endpoint).
    pub async fn get_raw(&self, url: &str) -> u16 {
        self.http.get(url).send().await.map_or(0, |r| r.status().as_u16())
    }

    /// The body of a GET to any URL (another process's `/metrics`, say).
    pub async fn get_text(&self, url: &str) -> String {
        self.http
            .get(url)
            .send()
            .await
            .expect("answered")
            .text()
            .await
            .expect("text")
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self.get(path).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Waits until no live worker of `model` is registered (a stopped
    /// worker's entry leaves the registry, by goodbye or by expiry).
    pub async fn no_live_workers(&self, model: ReadModel) {
        eventually("the worker gone from the registry", Duration::from_secs(30), || async {
            self.store
                .live_workers(Some(model.name()))
                .await
                .ok()?
                .is_empty()
                .then_some(())
        })
        .await;
    }

    /// The catalog read model, as a comparable value.
    pub async fn dump(&self, model: ReadModel) -> Vec<bson::Document> {
        let generation = self.store.serving_generation(model.name()).await.expect("generation");
        self.store
            .dump(&Store::collection_name(model.name(), generation))
            .await
            .expect("dump")
    }

    /// Every answer a student or teacher can get for these courses/teachers.
    pub async fn answers(&self, courses: &[String], teachers: &[String]) -> Value {
        let mut all = serde_json::Map::new();
        for path in [
            "/catalog/courses?sort=name&limit=100",
            "/catalog/courses?sort=newest&limit=100",
        ] {
            all.insert(path.into(), self.get_json(path).await.1);
        }
        for c in courses {
            let path = format!("/catalog/courses/{c}");
            let (status, body) = self.get_json(&path).await;
            all.insert(
                path,
                serde_json::json!({"status": status, "body": if status == 200 { body } else { Value::Null }}),
            );
        }
        for t in teachers {
            let path = format!("/teachers/{t}/courses?sort=name");
            all.insert(path.clone(), self.get_json(&path).await.1);
        }
        Value::Object(all)
    }

    /// Waits until the worker has stored offsets covering `count` records
    /// across this app's topics (so the read model reflects all of them).
    pub async fn wait_applied(&self, model: ReadModel, count: i64) {
        eventually(
            &format!("{} to apply {count} records", model.name()),
            Duration::from_secs(60),
            || async {
                let generation = self.store.serving_generation(model.name()).await.ok()?;
                let offsets = self.store.load_offsets(model.name(), generation).await.ok()?;
                let total: i64 = offsets.values().sum();
                (total >= count).then_some(())
            },
        )
        .await;
    }
}

impl TestApp {
    /// The global settings a `courseview` command of this app would use.
    pub fn global(&self) -> courseview::cli::Global {
        courseview::cli::Global {
            topics: self.topics_regex(),
            stall_after: Duration::from_secs(60),
            kafka_brokers: self.brokers.clone(),
            kafka: Default::default(),
            kafka_connection: Default::default(),
            mongodb_uri: Some(self.mongodb_uri.clone()),
            mongodb_uri_file: None,
            mongodb_database: self.store.database_name().to_owned(),
            mongodb_timeout: Duration::from_secs(2),
            redis_url: Some(redis_url()),
            redis_url_file: None,
            redis_prefix: format!("cvtest:{}", self.id),
            redis_timeout: Duration::from_millis(200),
            redis_ca_file: None,
            redis_cert_file: None,
            redis_key_file: None,
            log_format: courseview::telemetry::LogFormat::Text,
        }
    }

    /// A `courseview project <model>` process of this app with JSON logs on
    /// a pipe; `env` adds or overrides settings.
    pub fn worker_process(&self, model: ReadModel, env: &[(&str, &str)]) -> Reaped {
        self.process(&["project", model.name()], env)
    }

    /// A `courseview <args>` process of this app (its Kafka, MongoDB,
    /// Redis and worker settings) with JSON logs on a pipe.
    pub fn process(&self, args: &[&str], env: &[(&str, &str)]) -> Reaped {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_courseview"));
        command
            .args(args)
            .env("KAFKA_BROKERS", &self.brokers)
            .env("MONGODB_URI", &self.mongodb_uri)
            .env("MONGODB_DATABASE", self.store.database_name())
            .env("REDIS_URL", redis_url())
            .env("COURSEVIEW_REDIS_PREFIX", format!("cvtest:{}", self.id))
            .env("COURSEVIEW_TOPICS", self.topics_regex())
            .env("COURSEVIEW_GROUP_PREFIX", &self.id)
            .env("COURSEVIEW_SESSION_TIMEOUT", "6s")
            .env("COURSEVIEW_METADATA_REFRESH", "1s")
            .env("COURSEVIEW_BATCH_SIZE", "50")
            .env("COURSEVIEW_STATUS_INTERVAL", "500ms")
            .env("COURSEVIEW_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env_remove("COURSEVIEW_METRICS_LISTEN");
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("worker process starts");
        drain_logs(&mut child);
        Reaped(child)
    }
}

/// Log lines of the worker processes tests started, by pid.
type Logs = std::sync::Arc<std::sync::Mutex<Vec<Value>>>;
static PROCESS_LOGS: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<u32, Logs>>> =
    std::sync::LazyLock::new(Default::default);

/// Reads a child's stderr (JSON log lines) into memory from the start, so
/// the pipe never fills and blocks the process.
fn drain_logs(child: &mut std::process::Child) {
    use std::io::BufRead;
    let lines = Logs::default();
    let stderr = child.stderr.take().expect("stderr piped");
    let sink = std::sync::Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if let (Ok(v), Ok(mut all)) = (serde_json::from_str::<Value>(&line), sink.lock()) {
                all.push(v);
            }
        }
    });
    if let Ok(mut all) = PROCESS_LOGS.lock() {
        all.insert(child.id(), lines);
    }
}

/// The JSON log lines a worker process of [`TestApp::worker_process`] has
/// written so far (and will write).
pub fn log_lines(child: &mut Reaped) -> Logs {
    PROCESS_LOGS
        .lock()
        .ok()
        .and_then(|all| all.get(&child.id()).cloned())
        .expect("a process started by TestApp::worker_process")
}

/// Whether any collected log line has this message.
pub fn logged(lines: &std::sync::Mutex<Vec<Value>>, message: &str) -> bool {
    lines
        .lock()
        .map(|all| all.iter().any(|l| l["message"] == message))
        .unwrap_or(false)
}

/// Sends a signal to a process (`kill -s`), as an operator or supervisor does.
pub fn signal(child: &Reaped, name: &str) {
    let status = std::process::Command::new("kill")
        .args(["-s", name, &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -s {name}");
}

/// The catalog that `events` give on a fresh app: what every other way of
/// applying them (reordered, crashed, rebuilt, interrupted) must equal.
pub async fn clean_replay(events: &[Value]) -> Vec<bson::Document> {
    let clean = TestApp::spawn().await;
    clean.project_all(ReadModel::Catalog, events).await;
    clean.dump(ReadModel::Catalog).await
}

/// Builds an event as the course service publishes it.
pub fn event(kind: &str, course: &str, version: i64, extra: Value) -> Value {
    let mut v = serde_json::json!({
        "eventId": format!("{course}-v{version}"),
        "eventType": kind,
        "courseId": course,
        "version": version,
        "occurredAt": format!("2026-11-21T09:{:02}:{:02}.000Z", version / 60, version % 60),
    });
    if let (Value::Object(target), Value::Object(more)) = (&mut v, extra) {
        target.extend(more);
    }
    v
}

/// A scenario touching every rule: creations, renames, posting before
/// creation, unposting, re-posting, deletion. Returns (events in order,
/// course ids, teacher ids).
pub fn scenario() -> (Vec<Value>, Vec<String>, Vec<String>) {
    use serde_json::json;
    let created = |course: &str, name: &str, teacher: &str| {
        event(
            "CourseCreatedEvent",
            course,
            1,
            json!({
                "name": name, "thumbnail": format!("https://img/{course}.png"),
                "description": format!("About {name}"), "teacherId": teacher,
                "registeredAt": "2026-11-20T08:00:00Z"
            }),
        )
    };
    let events = vec![
        created("c1", "Rust 101", "t1"),
        event("CoursePostedEvent", "c1", 2, json!({})),
        event("CourseUpdatedEvent", "c1", 3, json!({"name": "Rust 102"})),
        created("c2", "Kafka Basics", "t1"),
        event(
            "CourseUpdatedEvent",
            "c2",
            2,
            json!({"description": "Logs all the way down"}),
        ),
        event("CoursePostedEvent", "c2", 3, json!({})),
        event("CourseUnpostedEvent", "c2", 4, json!({})),
        created("c3", "MongoDB Deep Dive", "t2"),
        event("CoursePostedEvent", "c3", 2, json!({})),
        event("CourseDeletedEvent", "c3", 3, json!({})),
        created("c4", "Async Rust", "t2"),
        event("CoursePostedEvent", "c4", 2, json!({})),
        event("CourseUnpostedEvent", "c4", 3, json!({})),
        event("CoursePostedEvent", "c4", 4, json!({})),
        created("c5", "Draft Only", "t2"),
    ];
    let courses = ["c1", "c2", "c3", "c4", "c5", "nope"].map(String::from).to_vec();
    let teachers = ["t1", "t2"].map(String::from).to_vec();
    (events, courses, teachers)
}

/// Kills the process when the test ends, even when it fails midway.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Parses Prometheus text exposition: every sample line is `name{labels} value`.
pub fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let sample = regex::Regex::new(r#"^([a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})?) (-?[0-9.eE+-]+|NaN|\+Inf|-Inf)$"#).expect("regex");
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let c = sample
                .captures(l)
                .unwrap_or_else(|| panic!("not Prometheus text: {l:?}"));
            (c[1].to_owned(), c[5].parse().expect("number"))
        })
        .collect()
}

pub fn sum_of(samples: &[(String, f64)], prefix: &str) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

/// Publishes a course's creation (at `version`) and posting.
pub async fn posted(app: &TestApp, course: &str, name: &str, version: i64) {
    app.publish(&event(
        "CourseCreatedEvent",
        course,
        version,
        serde_json::json!({"name": name, "teacherId": "t"}),
    ))
    .await;
    app.publish(&event("CoursePostedEvent", course, version + 1, serde_json::json!({})))
        .await;
}
