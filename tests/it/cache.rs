//! The Redis cache: bounded freshness, and no errors when Redis is gone.

use std::time::{Duration, Instant};

use courseview::read_model::ReadModel;
use serde_json::json;

use crate::helpers::{event, eventually, posted, Options, TestApp};
use crate::peers::{FreezingProxy, PrivateRedis};

#[tokio::test]
async fn a_course_updated_after_being_cached_is_served_fresh_within_one_second() {
    let app = TestApp::spawn().await;
    let worker = app.start_worker(ReadModel::Catalog);
    app.publish(&event(
        "CourseCreatedEvent",
        "f1",
        1,
        json!({"name": "Old name", "teacherId": "t"}),
    ))
    .await;
    app.publish(&event("CoursePostedEvent", "f1", 2, json!({}))).await;
    app.wait_applied(ReadModel::Catalog, 2).await;

    // Warm the cache and prove the answer really is cached in Redis.
    for _ in 0..2 {
        assert_eq!(app.get_json("/catalog/courses/f1").await.1["name"], "Old name");
        assert_eq!(
            app.get_json("/catalog/courses?limit=5").await.1["items"][0]["name"],
            "Old name"
        );
    }
    let mut redis = redis::Client::open(crate::helpers::redis_url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("cvtest:{}:*", app.id))
        .query_async(&mut redis)
        .await
        .expect("keys");
    assert!(
        keys.iter().any(|k| k.ends_with(":course:f1")),
        "course cached: {keys:?}"
    );

    app.publish(&event("CourseUpdatedEvent", "f1", 3, json!({"name": "New name"})))
        .await;
    // The moment MongoDB holds the new state, the 1 s freshness clock starts.
    eventually("the update in MongoDB", Duration::from_secs(30), || async {
        let dump = app.dump(ReadModel::Catalog).await;
        let name = dump
            .first()?
            .get_document("view")
            .ok()?
            .get_str("name")
            .ok()?
            .to_owned();
        (name == "New name").then_some(())
    })
    .await;
    let committed = Instant::now();
    eventually("fresh API answers", Duration::from_secs(1), || async {
        let one = app.get_json("/catalog/courses/f1").await.1;
        let list = app.get_json("/catalog/courses?limit=5").await.1;
        (one["name"] == "New name" && list["items"][0]["name"] == "New name").then_some(())
    })
    .await;
    assert!(committed.elapsed() <= Duration::from_secs(1));
    worker.stop().await;
}

/// A private redis-server, so stopping it does not disturb other tests.
#[tokio::test]
async fn with_redis_stopped_the_api_answers_from_mongodb() {
    let mut private = PrivateRedis::start();
    private.ready().await;
    let app = TestApp::with(Options {
        redis_url: Some(private.url()),
        ..Options::default()
    })
    .await;
    let worker = app.start_worker(ReadModel::Catalog);
    app.publish(&event(
        "CourseCreatedEvent",
        "r1",
        1,
        json!({"name": "Cached", "teacherId": "t"}),
    ))
    .await;
    app.publish(&event("CoursePostedEvent", "r1", 2, json!({}))).await;
    app.wait_applied(ReadModel::Catalog, 2).await;
    assert_eq!(app.get_json("/catalog/courses/r1").await.0, 200);

    private.child.kill().expect("stop redis");
    private.child.wait().expect("redis gone");
    app.publish(&event("CourseUpdatedEvent", "r1", 3, json!({"name": "Still served"})))
        .await;
    for path in ["/catalog/courses/r1", "/catalog/courses?limit=5", "/teachers/t/courses"] {
        let started = Instant::now();
        let (status, _) = app.get_json(path).await;
        assert_eq!(status, 200, "{path} answers without Redis");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{path} does not hang on Redis"
        );
    }
    // The worker cannot announce its write, so it holds it: MongoDB keeps
    // what every cache layer may still hold (DESIGN §6).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let offsets = app.store.load_offsets("catalog", 1).await.expect("offsets");
    assert_eq!(offsets.values().sum::<i64>(), 2, "nothing written unannounced");
    assert_eq!(app.get_json("/catalog/courses/r1").await.1["name"], "Cached");
    // Redis back: the batch is announced, written and served.
    private.restart();
    app.wait_applied(ReadModel::Catalog, 3).await;
    eventually("the update to be served", Duration::from_secs(2), || async {
        (app.get_json("/catalog/courses/r1").await.1["name"] == "Still served").then_some(())
    })
    .await;
    worker.stop().await;
}

#[tokio::test]
async fn two_different_answers_under_one_epoch_are_never_served_from_the_cache() {
    use courseview::cache::{Lookup, Put};
    let (cache, scope) = isolated_cache();
    let Lookup::Miss { epoch } = cache.get(scope, "course:c1").await else {
        panic!("a fresh key misses")
    };
    // Two requests read MongoDB on either side of a write the worker has
    // not announced yet; the older answer is put last.
    assert!(matches!(
        cache.put(scope, &epoch, "course:c1", b"v59").await,
        Put::Stored { .. }
    ));
    assert_eq!(cache.put(scope, &epoch, "course:c1", b"v57").await, Put::Conflict);
    assert!(
        matches!(cache.get(scope, "course:c1").await, Lookup::Miss { .. }),
        "neither answer is served: the store is read until the bump"
    );
    cache.put(scope, &epoch, "course:c1", b"v59").await;
    assert!(matches!(cache.get(scope, "course:c1").await, Lookup::Miss { .. }));

    // The same answer twice is no conflict.
    assert!(matches!(
        cache.put(scope, &epoch, "course:c2", b"same").await,
        Put::Stored { .. }
    ));
    assert!(matches!(
        cache.put(scope, &epoch, "course:c2", b"same").await,
        Put::Stored { .. }
    ));
    assert!(matches!(cache.get(scope, "course:c2").await, Lookup::Hit { bytes, .. } if bytes == b"same"));
}

#[tokio::test]
async fn while_a_batch_is_being_written_nothing_is_served_or_stored_from_the_cache() {
    use courseview::cache::{Lookup, Put};
    let (cache, scope) = isolated_cache();
    let Lookup::Miss { epoch } = cache.get(scope, "course:c1").await else {
        panic!("a fresh key misses")
    };
    cache.put(scope, &epoch, "course:c1", b"v57").await;
    assert!(matches!(cache.get(scope, "course:c1").await, Lookup::Hit { bytes, .. } if bytes == b"v57"));

    assert!(cache.begin_write(scope, "worker-a").await);
    assert_eq!(
        cache.put(scope, &epoch, "course:c2", b"read during the write").await,
        Put::Stale,
        "an answer read while a worker writes is not kept"
    );
    assert_eq!(
        cache.get(scope, "course:c1").await,
        Lookup::Writing,
        "during the write every reader goes to MongoDB"
    );
    // Two workers: the first one's bump does not end the second one's write.
    assert!(cache.begin_write(scope, "worker-b").await);
    assert!(cache.bump_epoch_for(scope, Some("worker-a")).await);
    assert_eq!(cache.get(scope, "course:c1").await, Lookup::Writing);
    assert!(cache.bump_epoch_for(scope, Some("worker-b")).await);
    assert!(
        matches!(cache.get(scope, "course:c1").await, Lookup::Miss { .. }),
        "after the last bump, a new epoch: the old entry is gone"
    );
    assert_eq!(
        cache.put(scope, &epoch, "course:c1", b"read under the old epoch").await,
        Put::Stale,
        "an answer read under an epoch that has moved is not kept"
    );
}

/// A cache client with a key prefix of its own, and a scope in it.
fn isolated_cache() -> (courseview::cache::Cache, courseview::cache::Scope<'static>) {
    let cache = courseview::cache::Cache::new(
        &crate::helpers::redis_url(),
        &crate::helpers::unique("cvtest:cache"),
        Duration::from_millis(200),
        Duration::from_secs(60),
    )
    .expect("cache");
    let scope = courseview::cache::Scope {
        projection: "catalog",
        generation: 1,
    };
    (cache, scope)
}

/// Scripts Redis has run: each one is an API lookup or put (or a worker's
/// announcement).
async fn scripts_run(redis: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(redis)
        .await
        .expect("info");
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

/// Waits until MongoDB holds `name` for the course; returns that instant.
async fn committed(app: &TestApp, name: &str) -> Instant {
    eventually("the update in MongoDB", Duration::from_secs(30), || async {
        let dump = app.dump(ReadModel::Catalog).await;
        dump.iter()
            .any(|d| d.get_document("view").ok().and_then(|v| v.get_str("name").ok()) == Some(name))
            .then_some(())
    })
    .await;
    Instant::now()
}

/// A private Redis (its connection), an app on it with a catalog worker,
/// and one posted course the worker has applied.
async fn posted_on_private_redis(
    course: &str,
    name: &str,
) -> (
    PrivateRedis,
    redis::aio::MultiplexedConnection,
    TestApp,
    crate::helpers::Worker,
) {
    let private = PrivateRedis::start();
    let redis = private.ready().await;
    let app = TestApp::with(Options {
        redis_url: Some(private.url()),
        ..Options::default()
    })
    .await;
    let worker = app.start_worker(ReadModel::Catalog);
    posted(&app, course, name, 1).await;
    app.wait_applied(ReadModel::Catalog, 2).await;
    (private, redis, app, worker)
}

/// Until the API's memory layer holds the course's answer.
async fn held_in_memory(app: &TestApp, course: &str) {
    let local = app.local.clone().expect("the memory layer is on");
    let generation = app.store.serving_generation("catalog").await.expect("pointer");
    let base = app.cache.as_ref().expect("redis").base(courseview::cache::Scope {
        projection: "catalog",
        generation,
    });
    let suffix = format!("course:{course}");
    eventually("the course held in memory", Duration::from_secs(10), || async {
        assert_eq!(app.get_json(&format!("/catalog/courses/{course}")).await.0, 200);
        let stamp = local.stamp(&base)?;
        local.get(&base, &suffix, stamp).map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn a_cached_course_is_served_from_process_memory_and_a_worker_notice_refreshes_it() {
    let (_private, mut redis, app, worker) = posted_on_private_redis("m1", "In memory").await;
    held_in_memory(&app, "m1").await;

    let before = scripts_run(&mut redis).await;
    for _ in 0..100 {
        assert_eq!(app.get_json("/catalog/courses/m1").await.1["name"], "In memory");
    }
    let asked = scripts_run(&mut redis).await - before;
    // A fence delayed past its trust window sends a request to Redis; a
    // layer that is not there sends all 100.
    assert!(asked <= 10, "{asked} of 100 cached reads went to Redis");

    app.publish(&event("CourseUpdatedEvent", "m1", 3, json!({"name": "Renamed"})))
        .await;
    let at = committed(&app, "Renamed").await;
    eventually("the new name through memory", Duration::from_secs(1), || async {
        (app.get_json("/catalog/courses/m1").await.1["name"] == "Renamed").then_some(())
    })
    .await;
    assert!(at.elapsed() <= Duration::from_secs(1));
    worker.stop().await;
}

#[tokio::test]
async fn a_memory_answer_expires_with_its_redis_entry_not_a_ttl_after_it_was_copied() {
    // The memory layer's last line of defence, for a change no notice
    // announced, is the Redis entry's TTL. An answer copied from Redis late
    // in its life must not then live a whole TTL more in memory.
    let (_private, mut redis, app, worker) = posted_on_private_redis("x1", "Copied late").await;
    worker.stop().await;
    held_in_memory(&app, "x1").await;

    // The Redis entry has 500 ms left; memory forgets, then copies it back.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("cvtest:{}:*:course:x1", app.id))
        .query_async(&mut redis)
        .await
        .expect("keys");
    assert_eq!(keys.len(), 1, "one cached entry: {keys:?}");
    let _: () = redis::cmd("PEXPIRE")
        .arg(&keys[0])
        .arg(500)
        .query_async(&mut redis)
        .await
        .expect("pexpire");
    let local = app.local.clone().expect("the memory layer is on");
    let generation = app.store.serving_generation("catalog").await.expect("pointer");
    let base = app.cache.as_ref().expect("redis").base(courseview::cache::Scope {
        projection: "catalog",
        generation,
    });
    local.notice(&base);
    held_in_memory(&app, "x1").await;

    // A change no worker announced (the bump never reached Redis).
    let client = mongodb::Client::with_uri_str(&app.mongodb_uri).await.expect("client");
    let collection = courseview::mongo::Store::collection_name("catalog", generation);
    client
        .database(app.store.database_name())
        .collection::<bson::Document>(&collection)
        .update_one(bson::doc! {}, bson::doc! {"$set": {"view.name": "Changed unannounced"}})
        .await
        .expect("changed in MongoDB");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        app.get_json("/catalog/courses/x1").await.1["name"],
        "Changed unannounced",
        "served from memory after its Redis entry expired"
    );
}

#[tokio::test]
async fn a_stalled_notice_subscription_stops_memory_answers_within_the_freshness_bound() {
    // The API reaches Redis through a proxy that will stall; the worker
    // reaches it directly, so its notices are published but never arrive.
    let proxy = FreezingProxy::start(crate::helpers::redis_port()).await;
    let app = TestApp::with(Options {
        redis_url: Some(proxy.url()),
        ..Options::default()
    })
    .await;
    let direct = courseview::cache::Cache::new(
        &crate::helpers::redis_url(),
        &format!("cvtest:{}", app.id),
        Duration::from_millis(200),
        Duration::from_secs(60),
    )
    .expect("cache");
    let cancel = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(courseview::worker::run(
        app.worker_settings(ReadModel::Catalog),
        app.store.clone(),
        Some(direct),
        cancel.clone(),
    ));
    posted(&app, "s1", "Before the stall", 1).await;
    app.wait_applied(ReadModel::Catalog, 2).await;
    held_in_memory(&app, "s1").await;

    proxy.freeze();
    app.publish(&event(
        "CourseUpdatedEvent",
        "s1",
        3,
        json!({"name": "After the stall"}),
    ))
    .await;
    let at = committed(&app, "After the stall").await;
    eventually(
        "the new name despite the lost notice",
        Duration::from_secs(1),
        || async { (app.get_json("/catalog/courses/s1").await.1["name"] == "After the stall").then_some(()) },
    )
    .await;
    assert!(at.elapsed() <= Duration::from_secs(1));
    cancel.cancel();
    let _ = worker.await;
}

/// What the memory layer's fences rest on: Redis delivers one channel's
/// messages to a subscriber in the order it executed the PUBLISHes, even
/// when they come from different connections. A notice published before
/// a fence is therefore never received after it.
#[tokio::test]
async fn redis_delivers_one_channels_messages_in_publish_order_across_connections() {
    use futures::StreamExt as _;
    use redis::AsyncCommands as _;
    let client = redis::Client::open(crate::helpers::redis_url()).expect("client");
    let channel = crate::helpers::unique("cvtest:order");
    let mut subscriber = client.get_async_pubsub().await.expect("pubsub");
    subscriber.subscribe(&channel).await.expect("subscribe");
    let mut messages = subscriber.into_on_message();
    let mut worker = client.get_multiplexed_async_connection().await.expect("worker");
    let mut api = client.get_multiplexed_async_connection().await.expect("api");
    const ROUNDS: usize = 500;
    for i in 0..ROUNDS {
        // The "worker" publishes, then (after Redis answered) the "API" fences.
        let _: i64 = worker.publish(&channel, format!("n {i}")).await.expect("notice");
        let _: i64 = api.publish(&channel, format!("f {i}")).await.expect("fence");
    }
    let mut received = Vec::with_capacity(2 * ROUNDS);
    while received.len() < 2 * ROUNDS {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("every message arrives")
            .expect("subscription open");
        received.push(String::from_utf8_lossy(message.get_payload_bytes()).into_owned());
    }
    let expected: Vec<String> = (0..ROUNDS).flat_map(|i| [format!("n {i}"), format!("f {i}")]).collect();
    assert_eq!(received, expected);
}

/// Status, headers (but `date`) and body of a GET.
async fn answer(app: &TestApp, path: &str, headers: &[(&str, &str)]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut request = app.http.get(format!("{}{path}", app.base_url));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("answered");
    let status = response.status().as_u16();
    let mut named: Vec<(String, String)> = response
        .headers()
        .iter()
        .filter(|(name, _)| *name != "date")
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap_or("?").to_owned()))
        .collect();
    named.sort();
    (status, named, response.bytes().await.expect("body").to_vec())
}

#[tokio::test]
async fn a_course_answered_from_memory_ahead_of_the_router_is_the_answer_the_router_gives() {
    let (_private, _redis, app, worker) = posted_on_private_redis("r1", "Routed").await;
    // `minVersion` always goes through the router and its handler, and
    // stops memory serving the generation until its next lookup: so each
    // answer through the router comes first, then memory is filled again.
    let routed = answer(&app, "/catalog/courses/r1?minVersion=1", &[]).await;
    assert_eq!(routed.0, 200);
    let etag = routed
        .1
        .iter()
        .find(|(name, _)| name == "etag")
        .map(|(_, value)| value.clone())
        .expect("an ETag");
    let revalidated = [("if-none-match", etag.as_str())];
    let routed_304 = answer(&app, "/catalog/courses/r1?minVersion=1", &revalidated).await;
    assert_eq!(routed_304.0, 304, "If-None-Match with the ETag: {routed_304:?}");
    held_in_memory(&app, "r1").await;
    assert_eq!(
        answer(&app, "/catalog/courses/r1", &[]).await,
        routed,
        "a course held in memory"
    );
    assert_eq!(
        answer(&app, "/catalog/courses/r1", &revalidated).await,
        routed_304,
        "a 304 from memory"
    );
    // A percent-encoded id is decoded by the router: the same course.
    assert_eq!(answer(&app, "/catalog/courses/r%31", &[]).await, routed, "r%31");

    // A course the catalog does not list is cached as absent: the second
    // 404 comes from memory, the first from MongoDB through the router.
    let unknown = answer(&app, "/catalog/courses/nowhere", &[]).await;
    assert_eq!(unknown.0, 404);
    eventually("the absent course held in memory", Duration::from_secs(10), || async {
        let local = app.local.clone()?;
        let generation = app.store.serving_generation("catalog").await.ok()?;
        let base = app.cache.as_ref()?.base(courseview::cache::Scope {
            projection: "catalog",
            generation,
        });
        local.get(&base, "course:nowhere", local.stamp(&base)?).map(|_| ())
    })
    .await;
    assert_eq!(
        answer(&app, "/catalog/courses/nowhere", &[]).await,
        unknown,
        "a 404 from memory"
    );

    // Counted in the request metrics under the route's template.
    let served = |text: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.starts_with("courseview_http_requests_total{")
                    && l.contains("route=\"/catalog/courses/{courseId}\"")
                    && l.contains("status=\"200\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let before = served(&app.get_text(&format!("{}/metrics", app.base_url)).await);
    for _ in 0..20 {
        assert_eq!(answer(&app, "/catalog/courses/r1", &[]).await.0, 200);
    }
    let after = served(&app.get_text(&format!("{}/metrics", app.base_url)).await);
    assert!(after - before >= 20.0, "{} requests counted of 20", after - before);
    worker.stop().await;
}
