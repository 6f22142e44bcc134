//! The query API's contract: parameters, pagination, problem details,
//! conditional requests, read-your-writes.

use std::time::{Duration, Instant};

use courseview::read_model::ReadModel;
use serde_json::{json, Value};

use crate::helpers::{event, posted, Options, TestApp};

/// Publishes `n` posted courses (teacher alternating t0/t1) and waits for them.
async fn seeded(n: usize) -> TestApp {
    let app = TestApp::spawn().await;
    let worker = app.start_worker(ReadModel::Catalog);
    for i in 0..n {
        let id = format!("p{i:02}");
        app.publish(&event(
            "CourseCreatedEvent",
            &id,
            1,
            json!({
                "name": format!("Course {:02}", n - i), "teacherId": format!("t{}", i % 2),
                "description": if i == 3 { "All about (async) Rust" } else { "Something else" },
            }),
        ))
        .await;
        let mut posted = event("CoursePostedEvent", &id, 2, json!({}));
        posted["occurredAt"] = json!(format!("2026-11-21T10:{i:02}:00Z"));
        app.publish(&posted).await;
    }
    app.wait_applied(ReadModel::Catalog, 2 * n as i64).await;
    worker.stop().await;
    app
}

async fn all_pages(app: &TestApp, first: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut path = first.to_owned();
    loop {
        let (status, body) = app.get_json(&path).await;
        assert_eq!(status, 200, "{path}: {body}");
        ids.extend(
            body["items"]
                .as_array()
                .expect("items")
                .iter()
                .map(|c| c["id"].as_str().expect("id").to_owned()),
        );
        match body["nextCursor"].as_str() {
            Some(cursor) => path = format!("{first}&cursor={cursor}"),
            None => return ids,
        }
    }
}

#[tokio::test]
async fn cursor_pagination_walks_every_course_once_in_each_sort_order() {
    let app = seeded(7).await;
    let newest = all_pages(&app, "/catalog/courses?sort=newest&limit=3").await;
    assert_eq!(newest, ["p06", "p05", "p04", "p03", "p02", "p01", "p00"]);
    let by_name = all_pages(&app, "/catalog/courses?sort=name&limit=2").await;
    // Course i is named "Course {7 - i}", so name order reverses id order.
    assert_eq!(by_name, ["p06", "p05", "p04", "p03", "p02", "p01", "p00"]);
    let of_t1 = all_pages(&app, "/catalog/courses?teacherId=t1&limit=2").await;
    assert_eq!(of_t1, ["p05", "p03", "p01"]);
    let (_, found) = app.get_json("/catalog/courses?q=(ASYNC)").await;
    let found: Vec<&str> = found["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|c| c["id"].as_str().expect("id"))
        .collect();
    assert_eq!(found, ["p03"], "q matches literally and case-insensitively");
}

#[tokio::test]
async fn responses_show_read_model_fields_and_never_bookkeeping() {
    let app = seeded(1).await;
    let (status, course) = app.get_json("/catalog/courses/p00").await;
    assert_eq!(status, 200);
    let mut keys: Vec<&str> = course.as_object().expect("object").keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "description",
            "id",
            "lastUpdatedAt",
            "name",
            "postedAt",
            "registeredAt",
            "teacherId",
            "thumbnail",
            "version"
        ]
    );
    assert_eq!(course["version"], 2);
    assert_eq!(course["postedAt"], "2026-11-21T10:00:00.000Z");
}

async fn assert_problem(app: &TestApp, path: &str, status: u16, parameter: Option<&str>) {
    let response = app.get(path).await;
    assert_eq!(response.status().as_u16(), status, "{path}");
    assert_eq!(response.headers()["content-type"], "application/problem+json", "{path}");
    let body: Value = response.json().await.expect("json body");
    assert_eq!(body["status"], status);
    assert!(body["title"].is_string() && body["detail"].is_string(), "{body}");
    if let Some(p) = parameter {
        assert_eq!(body["parameter"], p, "{path}: {body}");
        assert!(
            body["detail"].as_str().expect("detail").contains(p),
            "detail names {p}: {body}"
        );
    }
}

#[tokio::test]
async fn bad_parameters_get_400_problem_details_naming_the_parameter() {
    let app = TestApp::spawn().await;
    assert_problem(&app, "/catalog/courses?limit=0", 400, Some("limit")).await;
    assert_problem(&app, "/catalog/courses?limit=abc", 400, Some("limit")).await;
    assert_problem(&app, "/catalog/courses?sort=oldest", 400, Some("sort")).await;
    assert_problem(&app, "/catalog/courses?cursor=nonsense", 400, Some("cursor")).await;
    assert_problem(&app, "/catalog/courses?teacherId=", 400, Some("teacherId")).await;
    assert_problem(&app, "/catalog/courses?teacher_id=t1", 400, Some("teacher_id")).await;
    assert_problem(&app, "/catalog/courses/c1?minVersion=-3", 400, Some("minVersion")).await;
    assert_problem(&app, "/teachers/t1/courses?limit=-1", 400, Some("limit")).await;
    assert_problem(&app, "/catalog/courses/missing", 404, None).await;
    assert_problem(&app, "/no/such/route", 404, None).await;
}

#[tokio::test]
async fn anything_but_get_or_head_is_405_with_allow_header() {
    let app = TestApp::spawn().await;
    for method in [
        reqwest::Method::POST,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
        reqwest::Method::PATCH,
    ] {
        let response = app
            .http
            .request(method.clone(), format!("{}/catalog/courses", app.base_url))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status().as_u16(), 405, "{method}");
        assert_eq!(response.headers()["allow"], "GET, HEAD");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
    }
    let head = app
        .http
        .head(format!("{}/catalog/courses", app.base_url))
        .send()
        .await
        .expect("request");
    assert_eq!(head.status().as_u16(), 200);
}

#[tokio::test]
async fn mongodb_unreachable_is_503_and_health_stays_up() {
    let app = TestApp::with(Options {
        mongodb_uri: "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=300".into(),
        redis_url: None,
        ..Options::default()
    })
    .await;
    let started = Instant::now();
    let response = app.get("/catalog/courses").await;
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let body: Value = response.json().await.expect("json");
    assert!(!body.to_string().contains("127.0.0.1"), "no internals leak: {body}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(app.get("/readyz").await.status().as_u16(), 503);
    assert_eq!(app.get("/healthz").await.status().as_u16(), 200);
}

#[tokio::test]
async fn etag_revalidation_answers_304_and_large_responses_gzip_when_accepted() {
    use std::io::Read as _;
    let app = seeded(12).await;
    let first = app.get("/catalog/courses/p01").await;
    assert_eq!(first.headers()["cache-control"], "no-cache");
    let etag = first.headers()["etag"].to_str().expect("etag").to_owned();
    let again = app
        .http
        .get(format!("{}/catalog/courses/p01", app.base_url))
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("request");
    assert_eq!(again.status().as_u16(), 304);

    // A client that shows the encoding as sent.
    let raw = reqwest::Client::builder().no_gzip().build().expect("client");
    let url = format!("{}/catalog/courses?limit=100", app.base_url);
    let plain = raw.get(&url).send().await.expect("request");
    assert!(
        plain.headers().get("content-encoding").is_none(),
        "gzip only when accepted"
    );
    let plain_etag = plain.headers()["etag"].clone();
    let plain: Value = plain.json().await.expect("json");
    assert_eq!(plain["items"].as_array().map(Vec::len), Some(12));
    // Twice: the second is compressed once already (memoized).
    for _ in 0..2 {
        let zipped = raw
            .get(&url)
            .header("accept-encoding", "br;q=1.0, gzip;q=0.8")
            .send()
            .await
            .expect("request");
        assert_eq!(zipped.headers()["content-encoding"], "gzip");
        assert_eq!(zipped.headers()["etag"], plain_etag, "one ETag per content");
        let bytes = zipped.bytes().await.expect("body");
        let mut text = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut text)
            .expect("valid gzip");
        assert_eq!(serde_json::from_str::<Value>(&text).expect("json"), plain);
    }
    let refused = raw
        .get(&url)
        .header("accept-encoding", "gzip;q=0")
        .send()
        .await
        .expect("request");
    assert!(refused.headers().get("content-encoding").is_none(), "q=0 refuses gzip");
}

#[tokio::test]
async fn min_version_returns_as_soon_as_the_version_lands_and_times_out_cleanly() {
    let app = TestApp::with(Options {
        min_version_wait: Duration::from_millis(1500),
        ..Options::default()
    })
    .await;
    let worker = app.start_worker(ReadModel::Catalog);
    posted(&app, "rw", "RYW", 1).await;
    app.wait_applied(ReadModel::Catalog, 2).await;

    // Ask for version 3 before it exists, then publish it.
    let waiting = {
        let (http, url) = (
            app.http.clone(),
            format!("{}/catalog/courses/rw?minVersion=3", app.base_url),
        );
        tokio::spawn(async move { http.get(url).send().await.expect("request") })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.publish(&event("CourseUpdatedEvent", "rw", 3, json!({"name": "RYW v3"})))
        .await;
    let response = waiting.await.expect("join");
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        (body["name"].as_str(), body["version"].as_i64()),
        (Some("RYW v3"), Some(3))
    );

    let started = Instant::now();
    let response = app.get("/catalog/courses/rw?minVersion=99").await;
    let elapsed = started.elapsed();
    assert_eq!(response.status().as_u16(), 409);
    let problem: Value = response.json().await.expect("json");
    assert_eq!(
        (problem["wantedVersion"].as_i64(), problem["appliedVersion"].as_i64()),
        (Some(99), Some(3))
    );
    assert!(
        elapsed >= Duration::from_millis(1400) && elapsed < Duration::from_secs(5),
        "bounded wait: {elapsed:?}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_min_version_wait_rereads_mongodb_when_a_bump_is_heard_not_every_few_milliseconds() {
    let finds = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let app = TestApp::with(Options {
        min_version_wait: Duration::from_secs(4),
        api_finds: Some(std::sync::Arc::clone(&finds)),
        ..Options::default()
    })
    .await;
    let worker = app.start_worker(ReadModel::Catalog);
    posted(&app, "nw", "Noticed", 1).await;
    app.wait_applied(ReadModel::Catalog, 2).await;

    let count = || finds.load(std::sync::atomic::Ordering::Relaxed);
    let before = count();
    let waiting = {
        let (http, url) = (
            app.http.clone(),
            format!("{}/catalog/courses/nw?minVersion=3", app.base_url),
        );
        tokio::spawn(async move { http.get(url).send().await.expect("request") })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let idle = count() - before;
    // One read, then one per 250 ms re-check (for writers that announce
    // nothing); polling every 25 ms read about 60 times.
    assert!(idle <= 9, "{idle} reads of MongoDB in 1.5 s of one idle wait");

    let published = Instant::now();
    app.publish(&event("CourseUpdatedEvent", "nw", 3, json!({"name": "Noticed v3"})))
        .await;
    let response = waiting.await.expect("join");
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["version"].as_i64(), Some(3));
    assert!(
        published.elapsed() < Duration::from_secs(2),
        "answered {:?} after the publish",
        published.elapsed()
    );
    worker.stop().await;
}

/// Expensive kinds of request are bounded: past their limit they get a fast
/// 503 problem with Retry-After, and cached reads keep answering meanwhile.
#[tokio::test]
async fn a_flood_of_searches_and_version_waits_gets_fast_503s_while_cached_reads_answer() {
    let app = TestApp::with(Options {
        max_searches: 2,
        max_waits: 3,
        min_version_wait: Duration::from_millis(800),
        ..Options::default()
    })
    .await;
    let mut events = Vec::new();
    for i in 0..50 {
        let id = format!("b{i:02}");
        events.push(event(
            "CourseCreatedEvent",
            &id,
            1,
            json!({"name": format!("Course {i}"), "teacherId": "t1"}),
        ));
        events.push(event("CoursePostedEvent", &id, 2, json!({})));
    }
    app.project_all(ReadModel::Catalog, &events).await;
    assert_eq!(app.get("/catalog/courses/b00").await.status(), 200, "primed");

    let searches = (0..40).map(|i| {
        let app = &app;
        async move {
            let started = Instant::now();
            let r = app.get(&format!("/catalog/courses?q=nomatch{i}")).await;
            (
                r.status().as_u16(),
                r.headers().get("retry-after").cloned(),
                started.elapsed(),
            )
        }
    });
    let waits = (0..20).map(|_| {
        let app = &app;
        async move {
            let started = Instant::now();
            let r = app.get("/catalog/courses/b01?minVersion=99").await;
            (
                r.status().as_u16(),
                r.headers().get("retry-after").cloned(),
                started.elapsed(),
            )
        }
    });
    let cached = async {
        let mut slowest = Duration::ZERO;
        for _ in 0..30 {
            let started = Instant::now();
            assert_eq!(
                app.get("/catalog/courses/b00").await.status(),
                200,
                "a cached read answers"
            );
            slowest = slowest.max(started.elapsed());
        }
        slowest
    };
    let (searched, waited, slowest) = futures::join!(
        futures::future::join_all(searches),
        futures::future::join_all(waits),
        cached
    );
    for (kind, answers, ok) in [("search", &searched, 200), ("minVersion", &waited, 409)] {
        let busy: Vec<_> = answers.iter().filter(|(s, _, _)| *s == 503).collect();
        assert!(!busy.is_empty(), "{kind}: some were refused past the limit");
        assert!(
            busy.iter()
                .all(|(_, retry, took)| retry.is_some() && *took < Duration::from_millis(500)),
            "{kind}: refusals are fast and say when to retry: {busy:?}"
        );
        assert!(
            answers.iter().all(|(s, _, _)| *s == 503 || *s == ok),
            "{kind}: the rest were served: {answers:?}"
        );
    }
    assert!(
        slowest < Duration::from_millis(500),
        "cached reads kept answering: slowest {slowest:?}"
    );
    let (status, problem) = app.get_json("/catalog/courses?q=again").await;
    assert_eq!(status, 200, "permits come back: {problem}");
}
