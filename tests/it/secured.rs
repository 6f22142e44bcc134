//! Kafka over TLS and SASL, as managed clusters require: the real binary
//! against the Apache Kafka broker's secured listeners (`scripts/services`:
//! SASL_SSL with SCRAM-SHA-512, PLAIN and OAUTHBEARER on 9094; SSL with
//! client certificates required on 9095; SSL with an expired certificate on
//! 9096; a test CA under `run/tls`), and MongoDB and Redis over TLS.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use courseview::read_model::ReadModel;
use serde_json::Value;

use crate::helpers::{event, eventually, log_lines, posted, unique, TestApp};
use crate::peers::{cache_dir, free_port};

const SASL_SSL: &str = "127.0.0.1:9094";
const SSL: &str = "127.0.0.1:9095";
const EXPIRED: &str = "127.0.0.1:9096";

/// The CA and certificates `scripts/services` made.
fn tls(file: &str) -> String {
    let run = std::env::var_os("COURSEVIEW_RUN").map_or_else(|| cache_dir().join("run"), PathBuf::from);
    let path = run.join("tls").join(file);
    assert!(
        path.exists(),
        "{} is missing: run the suite through scripts/test",
        path.display()
    );
    path.display().to_string()
}

/// A SCRAM-SHA-512 user of this test's own, made through the broker.
pub fn scram_user() -> (String, String) {
    let (name, password) = (unique("scram-"), unique("pw-"));
    let made = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services"))
        .args(["scram-user", &name, &password])
        .status()
        .expect("scripts/services runs");
    assert!(made.success(), "the SCRAM user {name}");
    (name, password)
}

/// The environment of a courseview process of `app` that reaches Kafka
/// through the SASL_SSL listener as `user`, its password in a file.
pub fn scram_env(user: &str, password: &str) -> Vec<(String, String)> {
    let file = std::env::temp_dir().join(unique("kafka-password-"));
    std::fs::write(&file, format!("{password}\n")).expect("password file");
    vec![
        ("KAFKA_BROKERS".into(), SASL_SSL.into()),
        ("COURSEVIEW_KAFKA_SECURITY_PROTOCOL".into(), "sasl_ssl".into()),
        ("COURSEVIEW_KAFKA_SASL_MECHANISM".into(), "SCRAM-SHA-512".into()),
        ("COURSEVIEW_KAFKA_USERNAME".into(), user.into()),
        ("COURSEVIEW_KAFKA_PASSWORD_FILE".into(), file.display().to_string()),
        ("COURSEVIEW_KAFKA_CA_FILE".into(), tls("ca.pem")),
    ]
}

/// A one-shot `courseview` command of `app` with `env` on top.
fn command(app: &TestApp, args: &[&str], env: &[(String, String)]) -> std::process::Output {
    command_of(app, args, env).output().expect("courseview runs")
}

fn command_of(app: &TestApp, args: &[&str], env: &[(String, String)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_courseview"));
    command
        .args(args)
        .env("MONGODB_URI", &app.mongodb_uri)
        .env("MONGODB_DATABASE", app.store.database_name())
        .env("REDIS_URL", crate::helpers::redis_url())
        .env("COURSEVIEW_REDIS_PREFIX", format!("cvtest:{}", app.id))
        .env("COURSEVIEW_TOPICS", app.topics_regex())
        .env("COURSEVIEW_GROUP_PREFIX", &app.id)
        .env("RUST_LOG", "info")
        .env("RUST_BACKTRACE", "0");
    for (k, v) in env {
        command.env(k, v);
    }
    command
}

fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Until the catalog's serving generation has applied every record the
/// app's topics hold (read on the plaintext listener).
async fn caught_up(app: &TestApp) {
    eventually("the catalog caught up", Duration::from_secs(60), || async {
        let s = app.probe.projection(ReadModel::Catalog).await.ok()?;
        let held: i64 = s.serving.partitions.iter().map(|p| p.high_watermark).sum();
        (held > 0 && s.serving.lag_events == 0).then_some(())
    })
    .await;
}

/// Log lines whose message starts with `prefix` (and whose `field`, if
/// given, contains the text).
fn lines_saying(lines: &std::sync::Mutex<Vec<Value>>, prefix: &str, field: Option<(&str, &str)>) -> usize {
    lines
        .lock()
        .map(|all| {
            all.iter()
                .filter(|l| l["message"].as_str().is_some_and(|m| m.starts_with(prefix)))
                .filter(|l| field.is_none_or(|(name, text)| l[name].as_str().is_some_and(|v| v.contains(text))))
                .count()
        })
        .unwrap_or(0)
}

/// No log line of the worker holds `secret`.
fn never_logged(worker: &mut crate::helpers::Reaped, secret: &str) {
    let lines = log_lines(worker);
    let logged = lines
        .lock()
        .expect("logs")
        .iter()
        .any(|l| l.to_string().contains(secret));
    assert!(!logged, "the secret was logged");
}

fn says(output: &std::process::Output, what: &str) -> String {
    format!("{what}: {}\n{}", output.status, String::from_utf8_lossy(&output.stderr))
}

#[tokio::test]
async fn over_sasl_ssl_with_scram_produce_project_status_rebuild_and_dlq_replay_all_work() {
    let app = TestApp::spawn().await;
    let (user, password) = scram_user();
    let env = scram_env(&user, &password);

    let produced = command(
        &app,
        &[
            "produce",
            "--courses",
            "20",
            "--rate",
            "0",
            "--topic-prefix",
            &format!("{}.", app.id),
        ],
        &env,
    );
    assert!(produced.status.success(), "{}", says(&produced, "produce"));

    let mut worker = app.worker_process(ReadModel::Catalog, &as_refs(&env));
    caught_up(&app).await;
    let (code, page) = app.get_json("/catalog/courses?limit=100").await;
    assert_eq!(code, 200);
    assert!(
        page["items"].as_array().is_some_and(|items| !items.is_empty()),
        "posted demo courses are served: {page}"
    );

    let status = command(&app, &["status", "--json"], &env);
    assert!(status.status.success(), "{}", says(&status, "status"));
    let shown: Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert!(shown.to_string().contains(&app.topic("CourseCreatedEvent")), "{shown}");

    let before = app.store.serving_generation("catalog").await.expect("generation");
    let rebuilt = command(
        &app,
        &["rebuild", "catalog", "--handover-timeout", "20s", "--grace", "1s"],
        &env,
    );
    assert!(rebuilt.status.success(), "{}", says(&rebuilt, "rebuild"));
    let after = app.store.serving_generation("catalog").await.expect("generation");
    assert!(after > before, "the rebuild switched: {before} -> {after}");

    // A poison record (sent in plain), dead-lettered by the secured worker.
    app.send(courseview::kafka::Outgoing {
        topic: app.topic("CourseCreatedEvent"),
        key: Some("poison".into()),
        value: Some("{not json".into()),
        ..Default::default()
    })
    .await;
    eventually("the poison dead-lettered", Duration::from_secs(30), || async {
        let s = app.probe.projection(ReadModel::Catalog).await.ok()?;
        (s.dead_letters > 0).then_some(())
    })
    .await;
    let replayed = command(&app, &["dlq", "replay"], &env);
    assert!(replayed.status.success(), "{}", says(&replayed, "dlq replay"));
    assert!(
        String::from_utf8_lossy(&replayed.stderr).contains("0 replayed, 1 still failing"),
        "{}",
        says(&replayed, "dlq replay")
    );

    never_logged(&mut worker, &password);
    for output in [&produced, &status, &rebuilt, &replayed] {
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(!text.contains(&password), "the password was printed: {text}");
    }
}

#[tokio::test]
async fn plain_over_tls_oauthbearer_unsecured_jws_and_mutual_tls_each_reach_the_cluster() {
    let app = TestApp::spawn().await;
    posted(&app, "p1", "Secured", 1).await;
    let common = |brokers: &str, protocol: &str| {
        vec![
            ("KAFKA_BROKERS".to_owned(), brokers.to_owned()),
            ("COURSEVIEW_KAFKA_SECURITY_PROTOCOL".to_owned(), protocol.to_owned()),
            ("COURSEVIEW_KAFKA_CA_FILE".to_owned(), tls("ca.pem")),
        ]
    };
    let mut plain = common(SASL_SSL, "sasl_ssl");
    plain.extend([
        ("COURSEVIEW_KAFKA_SASL_MECHANISM".to_owned(), "PLAIN".to_owned()),
        ("COURSEVIEW_KAFKA_USERNAME".to_owned(), "courseview-plain".to_owned()),
        (
            "COURSEVIEW_KAFKA_PASSWORD".to_owned(),
            "courseview-plain-secret".to_owned(),
        ),
    ]);
    let mut oauth = common(SASL_SSL, "sasl_ssl");
    oauth.extend([
        ("COURSEVIEW_KAFKA_SASL_MECHANISM".to_owned(), "OAUTHBEARER".to_owned()),
        // librdkafka's unsecured JWS, checked by Kafka's unsecured validator.
        (
            "COURSEVIEW_KAFKA_X_ENABLE_SASL_OAUTHBEARER_UNSECURE_JWT".to_owned(),
            "true".to_owned(),
        ),
        (
            "COURSEVIEW_KAFKA_X_SASL_OAUTHBEARER_CONFIG".to_owned(),
            "principal=courseview".to_owned(),
        ),
    ]);
    let mut mutual = common(SSL, "ssl");
    mutual.extend([
        ("COURSEVIEW_KAFKA_CERT_FILE".to_owned(), tls("client.pem")),
        ("COURSEVIEW_KAFKA_KEY_FILE".to_owned(), tls("client.key")),
    ]);
    for (how, env) in [("PLAIN", &plain), ("OAUTHBEARER", &oauth), ("mutual TLS", &mutual)] {
        let mut worker = app.worker_process(ReadModel::Catalog, &as_refs(env));
        caught_up(&app).await;
        let status = command(&app, &["status", "--json"], env);
        assert!(status.status.success(), "{}", says(&status, how));
        drop(log_lines(&mut worker));
        drop(worker);
    }
    assert_eq!(app.get_json("/catalog/courses/p1").await.0, 200);

    // The same listener without the client certificate is refused.
    let refused = command(&app, &["status"], &common(SSL, "ssl"));
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Kafka TLS failed"),
        "{}",
        says(&refused, "no client certificate")
    );
}

/// A worker that cannot get in: unready, still running and retrying, the
/// cause said once (not once per retry), the secret never.
async fn cannot_get_in(app: &TestApp, env: &[(String, String)], cause: &str, reason: &str, secret: &str) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut with_listen = env.to_vec();
    with_listen.push(("COURSEVIEW_METRICS_LISTEN".into(), listen));
    let mut worker = app.worker_process(ReadModel::Catalog, &as_refs(&with_listen));
    let lines = log_lines(&mut worker);
    let said = || lines_saying(&lines, cause, Some(("reason", reason)));
    eventually(cause, Duration::from_secs(20), || async { (said() > 0).then_some(()) }).await;
    eventually("the worker unready", Duration::from_secs(20), || async {
        (app.get_raw(&format!("http://127.0.0.1:{port}/readyz")).await == 503).then_some(())
    })
    .await;
    // librdkafka retries within seconds, and used to log each attempt.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(said(), 1, "{cause:?} said once per episode");
    assert!(
        worker.try_wait().expect("wait").is_none(),
        "the worker keeps running and retrying"
    );
    never_logged(&mut worker, secret);
}

#[tokio::test]
async fn a_wrong_password_an_untrusted_ca_or_an_expired_certificate_is_said_once_leaves_the_worker_unready() {
    let app = TestApp::spawn().await;
    app.publish(&event(
        "CourseCreatedEvent",
        "w1",
        1,
        serde_json::json!({"name": "W", "teacherId": "t"}),
    ))
    .await;
    let (user, password) = scram_user();
    let wrong = format!("{password}-but-wrong");
    cannot_get_in(
        &app,
        &scram_env(&user, &wrong),
        "Kafka authentication failed",
        "invalid credentials",
        &wrong,
    )
    .await;

    let mut untrusted = scram_env(&user, &password);
    for (k, v) in &mut untrusted {
        if k == "COURSEVIEW_KAFKA_CA_FILE" {
            *v = tls("untrusted-ca.pem");
        }
    }
    cannot_get_in(
        &app,
        &untrusted,
        "Kafka TLS failed",
        "certificate verify failed",
        &password,
    )
    .await;

    // The broker's EXPIRED listener presents a certificate of the trusted
    // CA that expired yesterday. (librdkafka's reason does not say which
    // check failed, expiry or trust: OpenSSL's verify result is not in it.)
    let expired = vec![
        ("KAFKA_BROKERS".to_owned(), EXPIRED.to_owned()),
        ("COURSEVIEW_KAFKA_SECURITY_PROTOCOL".to_owned(), "ssl".to_owned()),
        ("COURSEVIEW_KAFKA_CA_FILE".to_owned(), tls("ca.pem")),
    ];
    cannot_get_in(
        &app,
        &expired,
        "Kafka TLS failed",
        "certificate verify failed",
        &password,
    )
    .await;
}

#[tokio::test]
async fn a_property_courseview_sets_or_does_not_know_stops_the_process_at_start_naming_it() {
    let app = TestApp::spawn().await;
    for (args, named) in [
        (
            vec!["-X", "enable.auto.commit=true", "project", "catalog"],
            "enable.auto.commit",
        ),
        (
            vec!["-X", "isolation.level=read_uncommitted", "status"],
            "isolation.level",
        ),
        (vec!["-X", "sasl.mechansim=PLAIN", "status"], "sasl.mechansim"),
        (vec!["-X", "api.version.request=false", "status"], "api.version.request"),
        (
            vec!["-X", "broker.version.fallback=0.9.0", "status"],
            "broker.version.fallback",
        ),
        (vec!["-X", "check.crcs=true", "status"], "check.crcs"),
        (
            vec!["-X", "receive.message.max.bytes=1000000", "project", "catalog"],
            "receive.message.max.bytes",
        ),
    ] {
        let output = command(&app, &args, &[]);
        assert!(!output.status.success(), "{args:?} refused");
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(text.contains(named), "{args:?}: {text}");
    }
    // A secret's value never shows, even in an error about it.
    let output = command(
        &app,
        &["-X", "sasl.password=hunter2", "--kafka-password", "hunter2", "status"],
        &[],
    );
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!text.contains("hunter2"), "{text}");
}

// ---- Redis over TLS, with an ACL user ----------------------------------

/// What courseview needs of Redis, as an operator would grant it: the
/// commands its scripts call, its keys and its notice channel only.
const COURSEVIEW_ACL: &str = "user courseview on >cv-redis-secret resetchannels ~cvtest:* &cvtest:* -@all \
    +ping +hello +client|setname +evalsha +eval +script|load +script|exists \
    +publish +subscribe +unsubscribe +time +get +set +del +pttl +zadd +zrem +zcount";

/// A TLS-only Redis requiring client certificates, whose default user is
/// off: only `courseview` (above) and `inspector` (everything, for the
/// test's own look at the keys) get in.
fn tls_redis() -> crate::peers::PrivateRedis {
    let acl = std::env::temp_dir().join(unique("redis-acl-"));
    std::fs::write(
        &acl,
        format!("user default off\n{COURSEVIEW_ACL}\nuser inspector on >inspector-secret ~* &* +@all\n"),
    )
    .expect("acl file");
    crate::peers::PrivateRedis::start_tls(
        &tls_dir(),
        &["--tls-auth-clients", "yes", "--aclfile", &acl.display().to_string()],
    )
}

fn redis_tls() -> courseview::cache::RedisTls {
    let read = |f: &str| std::fs::read(tls(f)).expect("pem");
    courseview::cache::RedisTls {
        ca: Some(read("ca.pem")),
        client: Some((read("client.pem"), read("client.key"))),
    }
}

fn redis_env(url: &str) -> Vec<(String, String)> {
    vec![
        ("REDIS_URL".into(), url.into()),
        ("REDIS_CA_FILE".into(), tls("ca.pem")),
        ("REDIS_CERT_FILE".into(), tls("client.pem")),
        ("REDIS_KEY_FILE".into(), tls("client.key")),
    ]
}

#[tokio::test]
async fn redis_over_tls_with_a_client_certificate_and_an_acl_user_caches_and_stays_fresh() {
    let redis = tls_redis();
    let url = format!("rediss://courseview:cv-redis-secret@127.0.0.1:{}", redis.port);
    let app = TestApp::with(crate::helpers::Options {
        redis_url: Some(url.clone()),
        redis_tls: redis_tls(),
        ..crate::helpers::Options::default()
    })
    .await;
    let mut worker = app.worker_process(ReadModel::Catalog, &as_refs(&redis_env(&url)));
    posted(&app, "r1", "Over TLS", 1).await;
    app.wait_applied(ReadModel::Catalog, 2).await;
    for _ in 0..2 {
        assert_eq!(app.get_json("/catalog/courses/r1").await.1["name"], "Over TLS");
    }
    let inspector = redis::Client::build_with_tls(
        format!("rediss://inspector:inspector-secret@127.0.0.1:{}", redis.port),
        redis::TlsCertificates {
            client_tls: redis_tls()
                .client
                .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }),
            root_cert: redis_tls().ca,
        },
    )
    .expect("client");
    let mut conn = inspector.get_multiplexed_async_connection().await.expect("over TLS");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("cvtest:{}:*:course:r1", app.id))
        .query_async(&mut conn)
        .await
        .expect("keys");
    assert_eq!(keys.len(), 1, "the answer is cached in the TLS Redis: {keys:?}");

    app.publish(&event(
        "CourseUpdatedEvent",
        "r1",
        3,
        serde_json::json!({"name": "Renamed over TLS"}),
    ))
    .await;
    app.wait_applied(ReadModel::Catalog, 3).await;
    let at = std::time::Instant::now();
    eventually("the new name", Duration::from_secs(1), || async {
        (app.get_json("/catalog/courses/r1").await.1["name"] == "Renamed over TLS").then_some(())
    })
    .await;
    assert!(at.elapsed() <= Duration::from_secs(1));
    let lines = log_lines(&mut worker);
    let refused = lines.lock().expect("logs").iter().any(|l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Redis") && !m.starts_with("Redis answers"))
    });
    assert!(!refused, "the worker's Redis calls all went through the ACL");
}

#[tokio::test]
async fn a_wrong_redis_password_is_said_once_and_the_api_answers_from_mongodb_within_the_timeout() {
    let redis = tls_redis();
    let url = |password: &str| format!("rediss://courseview:{password}@127.0.0.1:{}", redis.port);
    let app = TestApp::with(crate::helpers::Options {
        redis_url: Some(url("not-the-password")),
        redis_tls: redis_tls(),
        ..crate::helpers::Options::default()
    })
    .await;
    // The course is written by a worker that has the password.
    let _writer = app.worker_process(ReadModel::Catalog, &as_refs(&redis_env(&url("cv-redis-secret"))));
    posted(&app, "m1", "From MongoDB", 1).await;
    app.wait_applied(ReadModel::Catalog, 2).await;
    for _ in 0..5 {
        let at = std::time::Instant::now();
        let (code, body) = app.get_json("/catalog/courses/m1").await;
        assert_eq!((code, body["name"].as_str()), (200, Some("From MongoDB")));
        // REDIS_TIMEOUT is 200 ms here; MongoDB answers in a few ms.
        assert!(at.elapsed() < Duration::from_secs(1), "answered in {:?}", at.elapsed());
    }

    // A worker of its own database (so it has records to apply and
    // announce) and group, with the wrong password.
    let mut env = redis_env(&url("not-the-password"));
    env.push(("MONGODB_DATABASE".into(), unique("cv_denied_")));
    env.push(("COURSEVIEW_GROUP_PREFIX".into(), unique("denied-")));
    let mut denied = app.worker_process(ReadModel::Catalog, &as_refs(&env));
    let lines = log_lines(&mut denied);
    let said = || lines_saying(&lines, "Redis authentication failed", None);
    eventually("the wrong password said", Duration::from_secs(20), || async {
        (said() > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(said(), 1, "said once, not once per retry");
    never_logged(&mut denied, "not-the-password");
}

// ---- MongoDB over TLS ----------------------------------------------------

fn tls_dir() -> PathBuf {
    PathBuf::from(tls("ca.pem")).parent().expect("tls dir").to_path_buf()
}

fn tls_uri(port: u16, ca: &str, client: bool) -> String {
    let mut uri = format!(
        "mongodb://127.0.0.1:{port}/?tls=true&tlsCAFile={}&directConnection=true",
        tls(ca)
    );
    if client {
        uri.push_str(&format!("&tlsCertificateKeyFile={}", tls("client-bundle.pem")));
    }
    uri
}

#[tokio::test]
async fn mongodb_over_tls_with_server_authentication_and_with_client_certificates_projects_and_serves() {
    for client in [false, true] {
        let terminator = crate::peers::PrivateStunnel::start(&tls_dir(), crate::helpers::mongodb_port(), client);
        let app = TestApp::with(crate::helpers::Options {
            mongodb_uri: tls_uri(terminator.port, "ca.pem", client),
            ..crate::helpers::Options::default()
        })
        .await;
        let _worker = app.worker_process(ReadModel::Catalog, &[]);
        posted(&app, "t1", "Stored over TLS", 1).await;
        app.wait_applied(ReadModel::Catalog, 2).await;
        let (code, body) = app.get_json("/catalog/courses/t1").await;
        assert_eq!(
            (code, body["name"].as_str()),
            (200, Some("Stored over TLS")),
            "client certificate: {client}"
        );
        assert_eq!(app.get_raw(&format!("{}/readyz", app.base_url)).await, 200);
    }
}

#[tokio::test]
async fn mongodb_behind_tls_with_an_untrusted_ca_or_no_client_certificate_is_a_clear_error_and_not_ready() {
    let terminator = crate::peers::PrivateStunnel::start(&tls_dir(), crate::helpers::mongodb_port(), true);
    for (ca, client, says) in [
        ("untrusted-ca.pem", true, "UnknownIssuer"),
        ("ca.pem", false, "CertificateRequired"),
    ] {
        let app = TestApp::with(crate::helpers::Options {
            mongodb_uri: tls_uri(terminator.port, ca, client),
            ..crate::helpers::Options::default()
        })
        .await;
        assert_eq!(
            app.get_raw(&format!("{}/readyz", app.base_url)).await,
            503,
            "{ca} {client}"
        );
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut worker = app.worker_process(ReadModel::Catalog, &[("COURSEVIEW_METRICS_LISTEN", listen.as_str())]);
        let lines = log_lines(&mut worker);
        let said = || {
            lines
                .lock()
                .map(|all| all.iter().any(|l| l.to_string().contains(says) && l["level"] != "INFO"))
                .unwrap_or(false)
        };
        eventually("the TLS failure said", Duration::from_secs(30), || async {
            said().then_some(())
        })
        .await;
        eventually("the worker unready", Duration::from_secs(20), || async {
            (app.get_raw(&format!("http://127.0.0.1:{port}/readyz")).await == 503).then_some(())
        })
        .await;
    }
}

// ---- Secrets from files --------------------------------------------------

/// A file holding `value` and a newline, as a mounted secret does.
fn secret_file(value: &str) -> String {
    let file = std::env::temp_dir().join(unique("secret-"));
    std::fs::write(&file, format!("{value}\n")).expect("secret file");
    file.display().to_string()
}

/// `courseview serve` of `app`'s database with settings from `env` only
/// (no MONGODB_URI, REDIS_URL or JWT secret unless `env` gives them).
fn serve(app: &TestApp, port: u16, env: &[(&str, String)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_courseview"));
    command
        .arg("serve")
        .env_remove("MONGODB_URI")
        .env_remove("REDIS_URL")
        .env_remove("COURSEVIEW_JWT_SECRET")
        .env("MONGODB_DATABASE", app.store.database_name())
        .env("COURSEVIEW_REDIS_PREFIX", format!("cvtest:{}", app.id))
        .env("COURSEVIEW_TOPICS", app.topics_regex())
        .env("COURSEVIEW_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_BACKTRACE", "0");
    for (k, v) in env {
        command.env(k, v);
    }
    command
}

#[tokio::test]
async fn the_uri_the_redis_url_and_the_jwt_secret_are_read_from_files_and_both_ways_is_refused() {
    let app = TestApp::spawn().await;
    app.project_all(
        ReadModel::Catalog,
        &[event(
            "CourseCreatedEvent",
            "f1",
            1,
            serde_json::json!({"name": "Filed", "teacherId": "t-files"}),
        )],
    )
    .await;
    let secret = "a-shared-secret-of-32-bytes-long";
    // Places only the files name (not the defaults the suite also runs).
    let terminator = crate::peers::PrivateStunnel::start(&tls_dir(), crate::helpers::mongodb_port(), false);
    let redis = crate::peers::PrivateRedis::start();
    let mut redis_conn = redis.ready().await;
    let files = [
        (
            "MONGODB_URI_FILE",
            secret_file(&tls_uri(terminator.port, "ca.pem", false)),
        ),
        ("REDIS_URL_FILE", secret_file(&redis.url())),
        ("COURSEVIEW_JWT_SECRET_FILE", secret_file(secret)),
    ];
    let port = free_port();
    let server = crate::helpers::Reaped(
        serve(&app, port, &files)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("serve starts"),
    );
    let base = format!("http://127.0.0.1:{port}");
    eventually("the API ready", Duration::from_secs(20), || async {
        (app.get_raw(&format!("{base}/readyz")).await == 200).then_some(())
    })
    .await;
    let token = Command::new(env!("CARGO_BIN_EXE_courseview"))
        .args(["token", "--teacher", "t-files", "--secret", secret])
        .output()
        .expect("token");
    let token = String::from_utf8_lossy(&token.stdout).trim().to_owned();
    let dashboard = format!("{base}/teachers/t-files/courses");
    let with = app
        .http
        .get(&dashboard)
        .bearer_auth(&token)
        .send()
        .await
        .expect("dashboard");
    assert_eq!(with.status(), 200, "the secret from its file verifies the token");
    let without = app.http.get(&dashboard).send().await.expect("dashboard");
    assert_eq!(without.status(), 401);
    assert_eq!(app.get_raw(&format!("{base}/catalog/courses/f1")).await, 404);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("cvtest:{}:*", app.id))
        .query_async(&mut redis_conn)
        .await
        .expect("keys");
    assert!(!keys.is_empty(), "the Redis named by REDIS_URL_FILE holds the answer");
    drop(terminator);
    eventually(
        "unready without the MongoDB the file names",
        Duration::from_secs(20),
        || async { (app.get_raw(&format!("{base}/readyz")).await == 503).then_some(()) },
    )
    .await;
    drop(server);

    for (name, file) in &files {
        let direct = name.trim_end_matches("_FILE");
        let output = serve(
            &app,
            free_port(),
            &[(*name, file.clone()), (direct, "given-too".into())],
        )
        .output()
        .expect("serve runs");
        assert!(!output.status.success(), "{name} and {direct} both given");
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(text.contains(direct) && text.contains(name), "{text}");
        assert!(
            !text.contains("given-too") && !text.contains(secret),
            "no value shown: {text}"
        );
    }
}

/// A stand-in identity provider's token endpoint (OAuth 2.0 client
/// credentials): records each request and issues an unsecured JWS, which
/// the broker's unsecured OAUTHBEARER validator accepts. Returns its URL and
/// the requests seen (the Authorization header and the form body).
async fn token_endpoint() -> (String, std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>) {
    use base64::Engine as _;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/token", listener.local_addr().expect("addr"));
    let log = std::sync::Arc::clone(&seen);
    let app = axum::Router::new().route(
        "/token",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let log = std::sync::Arc::clone(&log);
            async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                log.lock().expect("log").push((auth, body));
                let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
                let now = chrono::Utc::now().timestamp();
                let token = format!(
                    "{}.{}.",
                    b64(serde_json::json!({"alg": "none"})),
                    b64(serde_json::json!({"sub": "courseview-oidc", "iat": now, "exp": now + 3600}))
                );
                axum::Json(serde_json::json!({"access_token": token, "token_type": "bearer", "expires_in": 3600}))
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

#[tokio::test]
async fn oauthbearer_with_oidc_client_credentials_gets_its_token_from_the_identity_provider() {
    use base64::Engine as _;
    let app = TestApp::spawn().await;
    posted(&app, "o1", "Via OIDC", 1).await;
    let (url, seen) = token_endpoint().await;
    let env: Vec<(String, String)> = [
        ("KAFKA_BROKERS", SASL_SSL.to_owned()),
        ("COURSEVIEW_KAFKA_SECURITY_PROTOCOL", "sasl_ssl".to_owned()),
        ("COURSEVIEW_KAFKA_SASL_MECHANISM", "OAUTHBEARER".to_owned()),
        ("COURSEVIEW_KAFKA_CA_FILE", tls("ca.pem")),
        ("COURSEVIEW_KAFKA_X_SASL_OAUTHBEARER_METHOD", "oidc".to_owned()),
        (
            "COURSEVIEW_KAFKA_X_SASL_OAUTHBEARER_CLIENT_ID",
            "courseview-client".to_owned(),
        ),
        (
            "COURSEVIEW_KAFKA_X_SASL_OAUTHBEARER_CLIENT_SECRET",
            "oidc-client-secret".to_owned(),
        ),
        ("COURSEVIEW_KAFKA_X_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL", url),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    // Off the runtime that serves the token endpoint.
    let mut run = command_of(&app, &["status", "--json"], &env);
    let status = tokio::task::spawn_blocking(move || run.output().expect("courseview runs"))
        .await
        .expect("joined");
    assert!(status.status.success(), "{}", says(&status, "status over OIDC"));
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(shown.contains(&app.topic("CourseCreatedEvent")), "{shown}");
    let requests = seen.lock().expect("seen").clone();
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("courseview-client:oidc-client-secret")
    );
    assert!(
        requests
            .iter()
            .any(|(auth, body)| *auth == basic && body.contains("grant_type=client_credentials")),
        "a client-credentials request with the client's id and secret: {requests:?}"
    );
    assert!(!String::from_utf8_lossy(&status.stderr).contains("oidc-client-secret"));
}
