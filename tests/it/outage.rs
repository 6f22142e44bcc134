//! A MongoDB outage in the middle of a run: the worker retries with backoff,
//! never advances its offsets past what was written, and loses nothing.
//!
//! The outage is real: the test runs its own MongoDB-wire server (the same
//! nx-27017 that `scripts/services` installs) on a free port with its data on
//! disk, kills it with SIGKILL mid-stream and starts it again.

use std::time::Duration;

use courseview::read_model::ReadModel;

use crate::helpers::{clean_replay, eventually, Options, TestApp};
use crate::peers::PrivateMongo;
use crate::pipeline::big_history;

#[tokio::test]
async fn a_worker_waits_out_a_mongodb_outage_and_loses_nothing() {
    let events = big_history("o", 120);
    let (before, during) = events.split_at(events.len() / 2);
    let mut mongo = PrivateMongo::start();
    let app = TestApp::with(Options {
        mongodb_uri: mongo.uri(),
        ..Options::default()
    })
    .await;
    let worker = app.start_worker(ReadModel::Catalog);
    app.publish_all(before).await;
    app.wait_applied(ReadModel::Catalog, before.len() as i64).await;

    mongo.kill();
    app.publish_all(during).await;
    // Several backoff rounds (max 1 s) against a dead server.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!worker.task.is_finished(), "the worker gave up during the outage");

    mongo.restart();
    app.wait_applied(ReadModel::Catalog, events.len() as i64).await;
    eventually("the API to answer again", Duration::from_secs(10), || async {
        (app.get_json("/catalog/courses/o0001").await.0 == 200).then_some(())
    })
    .await;
    worker.stop().await;
    assert_eq!(
        app.dump(ReadModel::Catalog).await,
        clean_replay(&events).await,
        "the read model after the outage equals a clean replay"
    );
}

#[tokio::test]
async fn cached_answers_keep_coming_while_the_api_cannot_reach_mongodb() {
    let path = crate::peers::FreezingProxy::start(crate::helpers::mongodb_port()).await;
    let app = TestApp::with(Options {
        mongodb_uri: format!("mongodb://127.0.0.1:{}/?directConnection=true", path.port),
        ..Options::default()
    })
    .await;
    let events = big_history("frz", 5);
    app.project_all(ReadModel::Catalog, &events).await;
    let course = "/catalog/courses/frz0001";
    // Cached now (Redis, and the API's memory).
    for _ in 0..2 {
        assert_eq!(app.get_json(course).await.0, 200);
    }

    // MongoDB's path stalls (no reset, no answer): what is cached needs no
    // MongoDB, so it keeps being served, and fast, for as long as the last
    // pointer read is trusted (1 s; the request-side TTL alone is 250 ms).
    path.freeze();
    let mut slowest = Duration::ZERO;
    let until = std::time::Instant::now() + Duration::from_millis(600);
    while std::time::Instant::now() < until {
        let asked = std::time::Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(3), app.get_json(course)).await;
        slowest = slowest.max(asked.elapsed());
        assert_eq!(
            answer.map(|a| a.0).ok(),
            Some(200),
            "a cached course while MongoDB is away"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    path.thaw();
    assert!(
        slowest < Duration::from_millis(250),
        "cached answers never waited on MongoDB (slowest {slowest:?})"
    );
}

#[tokio::test]
async fn an_api_cut_off_from_mongodb_stops_serving_the_old_generation_within_a_second_of_a_switch() {
    let path = crate::peers::FreezingProxy::start(crate::helpers::mongodb_port()).await;
    let app = TestApp::with(Options {
        mongodb_uri: format!("mongodb://127.0.0.1:{}/?directConnection=true", path.port),
        // A request that reads the pointer itself waits on the frozen path
        // until this, then answers 503.
        request_timeout: Duration::from_secs(2),
        ..Options::default()
    })
    .await;
    let events = big_history("swi", 3);
    app.project_all(ReadModel::Catalog, &events).await;
    let course = "/catalog/courses/swi0001";
    for _ in 0..2 {
        let (status, body) = app.get_json(course).await;
        assert_eq!((status, body["name"].as_str()), (200, Some("Course 1")));
    }

    // Another client, on MongoDB's own path, builds a generation where the
    // course is renamed and switches readers to it while the API's path is
    // frozen (no answer, no reset: a half-open socket).
    let direct = courseview::mongo::Store::connect(
        &crate::helpers::mongodb_uri(),
        app.store.database_name(),
        Duration::from_secs(5),
    )
    .await
    .expect("direct store");
    let from = direct.serving_generation("catalog").await.expect("pointer");
    let to = direct
        .begin_rebuild("catalog")
        .await
        .expect("begin")
        .building
        .expect("building");
    let client = mongodb::Client::with_uri_str(crate::helpers::mongodb_uri())
        .await
        .expect("client");
    let db = client.database(app.store.database_name());
    let old = db.collection::<bson::Document>(&courseview::mongo::Store::collection_name("catalog", from));
    let new = db.collection::<bson::Document>(&courseview::mongo::Store::collection_name("catalog", to));
    let mut copied: Vec<bson::Document> =
        futures::TryStreamExt::try_collect(old.find(bson::doc! {}).await.expect("find"))
            .await
            .expect("docs");
    for doc in &mut copied {
        if doc.get_str("_id") == Ok("swi0001") {
            doc.get_document_mut("view").expect("view").insert("name", "Renamed");
        }
    }
    new.insert_many(copied).await.expect("new generation written");

    path.freeze();
    let now = chrono::Utc::now().timestamp_millis();
    assert!(direct
        .request_handover("catalog", from, to, now + 60_000)
        .await
        .expect("handover"));
    assert!(direct
        .switch_generation("catalog", from, to, now + 30_000)
        .await
        .expect("switch"));
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (status, body) = app.get_json(course).await;
    path.thaw();
    assert!(
        status == 503 || (status == 200 && body["name"] == "Renamed"),
        "1.5 s after the switch an API cut off from MongoDB answers 503 or the new generation, not the old one's {status} {body}"
    );
    // Once the path is back, the API serves the new generation.
    eventually("the new generation served", Duration::from_secs(10), || async {
        let (status, body) = app.get_json(course).await;
        (status == 200 && body["name"] == "Renamed").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_flood_of_projection_requests_while_kafka_does_not_answer_leaves_the_task_count_bounded() {
    // The API's status probe asks a "broker" that accepts and never answers.
    let silent = crate::peers::silent_listener();
    let app = TestApp::with(Options {
        status_brokers: Some(format!("127.0.0.1:{silent}")),
        ..Options::default()
    })
    .await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    // No kept-alive connections: the server's connection tasks end with
    // their requests, so what stays alive is what the requests left behind.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let url = format!("{}/projections", app.base_url);
    for round in 0..10 {
        let requests = (0..500).map(|_| client.get(&url).send());
        for answer in futures::future::join_all(requests).await {
            let status = answer.expect("every request is answered").status().as_u16();
            assert_eq!(status, 503, "Kafka does not answer: a fast 503 (round {round})");
        }
        // A measurement waits up to 5 s on the silent broker, longer than
        // a request waits (3 s): nothing may queue behind it past its request.
        eventually(
            "the tasks the round left behind end",
            Duration::from_millis(500),
            || async { (metrics.num_alive_tasks() <= before + 20).then_some(()) },
        )
        .await;
    }
}
