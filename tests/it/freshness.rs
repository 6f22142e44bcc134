//! Every write the worker makes is announced to the cache first (DESIGN §6),
//! so no API answer stays older than a committed batch for longer than 1 s
//! (DESIGN §5), whatever happens to the worker's connection to Redis.

use std::time::{Duration, Instant};

use courseview::cache::Scope;
use courseview::read_model::ReadModel;
use courseview::worker::Applier;
use serde_json::{json, Value};

use crate::helpers::{event, eventually, TestApp};
use crate::peers::{free_port, FreezingProxy};

/// The catalog name MongoDB holds for `course` now.
async fn stored_name(app: &TestApp, course: &str) -> Option<String> {
    app.dump(ReadModel::Catalog)
        .await
        .into_iter()
        .find(|d| d.get_str("_id") == Ok(course))
        .and_then(|d| {
            d.get_document("view")
                .ok()
                .and_then(|v| v.get_str("name").ok().map(str::to_owned))
        })
}

async fn answered_name(app: &TestApp, course: &str) -> Value {
    app.get_json(&format!("/catalog/courses/{course}")).await.1["name"].clone()
}

async fn listed_name(app: &TestApp, course: &str) -> Option<Value> {
    let (_, page) = app.get_json("/catalog/courses?sort=name&limit=100").await;
    page["items"]
        .as_array()?
        .iter()
        .find(|c| c["id"] == course)
        .map(|c| c["name"].clone())
}

#[tokio::test]
async fn a_worker_whose_redis_does_not_answer_holds_its_batch_until_it_can_announce_it() {
    let app = TestApp::spawn().await;
    let redis_port = crate::helpers::redis_port();
    // The worker reaches Redis through a path that can stop answering; the
    // API's own path stays up (a one-sided partition).
    let path = FreezingProxy::start(redis_port).await;
    let metrics = free_port();
    let listen = format!("127.0.0.1:{metrics}");
    let worker = app.worker_process(
        ReadModel::Catalog,
        &[
            ("REDIS_URL", path.url().as_str()),
            ("COURSEVIEW_METRICS_LISTEN", listen.as_str()),
            ("COURSEVIEW_MAX_BACKOFF", "500ms"),
        ],
    );
    app.publish_all(&[
        event("CourseCreatedEvent", "p1", 1, json!({"name": "v1", "teacherId": "t1"})),
        event("CoursePostedEvent", "p1", 2, json!({})),
    ])
    .await;
    app.wait_applied(ReadModel::Catalog, 2).await;
    // Primed: the page and the course are cached at v1.
    for _ in 0..2 {
        assert_eq!(answered_name(&app, "p1").await, "v1");
        assert_eq!(listed_name(&app, "p1").await, Some(json!("v1")));
    }

    path.freeze();
    app.publish(&event("CourseUpdatedEvent", "p1", 3, json!({"name": "v3"})))
        .await;
    // While it cannot announce, the worker writes nothing and is not ready.
    eventually("the held worker to be unready", Duration::from_secs(20), || async {
        (app.get_raw(&format!("http://127.0.0.1:{metrics}/readyz")).await == 503).then_some(())
    })
    .await;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(
            stored_name(&app, "p1").await.as_deref(),
            Some("v1"),
            "nothing written unannounced"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    path.thaw();
    // Once written, v3 shows everywhere within 1 s of reaching MongoDB.
    let written = eventually("the batch to be written", Duration::from_secs(30), || async {
        (stored_name(&app, "p1").await.as_deref() == Some("v3")).then(Instant::now)
    })
    .await;
    loop {
        let (by_id, listed) = (answered_name(&app, "p1").await, listed_name(&app, "p1").await);
        if by_id == "v3" && listed == Some(json!("v3")) {
            break;
        }
        assert!(
            written.elapsed() < Duration::from_secs(1),
            "an answer older than the write 1 s on: by id {by_id}, listed {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(worker);
}

#[tokio::test]
async fn a_writer_that_dies_between_its_write_and_its_bump_revives_no_older_answer() {
    let app = TestApp::spawn().await;
    app.project_all(
        ReadModel::Catalog,
        &[
            event("CourseCreatedEvent", "q1", 1, json!({"name": "v1", "teacherId": "t1"})),
            event("CoursePostedEvent", "q1", 2, json!({})),
        ],
    )
    .await;
    for _ in 0..2 {
        assert_eq!(answered_name(&app, "q1").await, "v1");
        assert_eq!(listed_name(&app, "q1").await, Some(json!("v1")));
    }
    // A worker takes the lease, writes v3 and is killed before its bump.
    let lease = Duration::from_secs(1);
    let cache = app.cache.clone().expect("cache").with_write_lease(lease);
    let scope = Scope {
        projection: "catalog",
        generation: 1,
    };
    assert!(cache.begin_write(scope, "killed-writer").await, "announced");
    let renamed = event("CourseUpdatedEvent", "q1", 3, json!({"name": "v3"}));
    let record = courseview::record::Record {
        topic: "CourseUpdatedEvent".into(),
        value: Some(renamed.to_string().into_bytes()),
        ..courseview::record::Record::default()
    };
    let decoded = courseview::decode::decode(&record).expect("decodes");
    Applier::new(ReadModel::Catalog, app.store.clone(), None, 1)
        .apply_events(&[decoded])
        .await
        .expect("written without a bump");
    // The lease runs out with no bump ever coming.
    tokio::time::sleep(lease + Duration::from_millis(500)).await;
    for _ in 0..3 {
        assert_eq!(answered_name(&app, "q1").await, "v3", "by id, after the lease");
        assert_eq!(
            listed_name(&app, "q1").await,
            Some(json!("v3")),
            "listed, after the lease"
        );
    }
}

#[tokio::test]
async fn a_worker_without_a_cache_refuses_to_start_unless_told_it_is_deliberate() {
    let app = TestApp::spawn().await;
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_courseview"))
        .args(["project", "catalog"])
        .env("KAFKA_BROKERS", &app.brokers)
        .env("MONGODB_URI", &app.mongodb_uri)
        .env("MONGODB_DATABASE", app.store.database_name())
        .env("REDIS_URL", "none")
        .env("COURSEVIEW_TOPICS", app.topics_regex())
        .env("COURSEVIEW_GROUP_PREFIX", &app.id)
        .output()
        .expect("courseview runs");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "REDIS_URL=none without --no-cache-invalidation must not run"
    );
    assert!(said.contains("--no-cache-invalidation"), "says what to do: {said}");

    let deliberate = app.worker_process(
        ReadModel::Catalog,
        &[("REDIS_URL", "none"), ("COURSEVIEW_NO_CACHE_INVALIDATION", "true")],
    );
    app.publish(&event(
        "CourseCreatedEvent",
        "n1",
        1,
        json!({"name": "n", "teacherId": "t"}),
    ))
    .await;
    app.wait_applied(ReadModel::Catalog, 1).await;
    // The API, with a cache, names the worker that does not invalidate it.
    let (code, body) = app.get_json("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body["workersNotInvalidatingThisCache"].to_string().contains("no cache"),
        "{body}"
    );
    drop(deliberate);
}
