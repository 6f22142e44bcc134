//! Cross-origin reads in a real browser: headless Chromium loads a page
//! from another origin (another port) whose script `fetch`es the API; the
//! browser enforces what the API's CORS answers say.

use courseview::read_model::ReadModel;
use serde_json::json;

use crate::helpers::{event, Options, TestApp};
use crate::status_page::chromium;

/// Serves one page whose script fetches `url` (with a bearer token if
/// `token`) and writes what came back, or the browser's refusal, into
/// `#out`. Returns the page's origin.
async fn page(url: String, token: bool) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let origin = format!("http://{}", listener.local_addr().expect("addr"));
    let headers = if token {
        r#"{headers: {Authorization: "Bearer any"}}"#
    } else {
        "{}"
    };
    let html = format!(
        r#"<html><body><pre id="out">pending</pre><script>
fetch("{url}", {headers})
  .then(r => r.json())
  .then(j => {{ document.getElementById("out").textContent = "read:" + JSON.stringify(j); }})
  .catch(e => {{ document.getElementById("out").textContent = "refused:" + e; }});
</script></body></html>"#
    );
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || async move { axum::response::Html(html) }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    origin
}

/// What the page at `origin` wrote after its script ran.
async fn outcome(origin: &str) -> String {
    let output = chromium(&["--dump-dom", &format!("{origin}/")]).await;
    let dom = String::from_utf8_lossy(&output.stdout).into_owned();
    let start = dom
        .find("<pre id=\"out\">")
        .map(|i| i + "<pre id=\"out\">".len())
        .unwrap_or(0);
    dom[start..].split("</pre>").next().unwrap_or("").to_owned()
}

#[tokio::test]
async fn listed_origins_read_the_catalog_and_the_dashboard_in_a_browser_and_others_are_refused() {
    // The pages name the API's URL and the API lists the pages' origins:
    // pick the API's port first.
    let api_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let api_port = api_listener.local_addr().expect("addr").port();
    drop(api_listener);
    let catalog_url = format!("http://127.0.0.1:{api_port}/catalog/courses/c1");
    let dashboard_url = format!("http://127.0.0.1:{api_port}/teachers/t1/courses");
    let listed = page(catalog_url.clone(), false).await;
    let unlisted = page(catalog_url, false).await;
    let teacher_app = page(dashboard_url.clone(), true).await;
    let catalog_only_to_dashboard = page(dashboard_url, true).await;

    let cors =
        courseview::http::cors::CorsSettings::parse(&format!("{listed},{catalog_only_to_dashboard}"), &teacher_app)
            .expect("origins");
    let app = TestApp::with(Options {
        cors,
        api_port: Some(api_port),
        ..Options::default()
    })
    .await;
    let teacher = app.start_worker(ReadModel::TeacherCourses);
    app.project_all(
        ReadModel::Catalog,
        &[
            event(
                "CourseCreatedEvent",
                "c1",
                1,
                json!({"name": "Across origins", "teacherId": "t1"}),
            ),
            event("CoursePostedEvent", "c1", 2, json!({})),
        ],
    )
    .await;
    app.wait_applied(ReadModel::TeacherCourses, 2).await;
    teacher.stop().await;

    let read = outcome(&listed).await;
    assert!(
        read.starts_with("read:") && read.contains("Across origins"),
        "listed origin: {read}"
    );
    let refused = outcome(&unlisted).await;
    assert!(refused.starts_with("refused:"), "unlisted origin: {refused}");
    let dashboard = outcome(&teacher_app).await;
    assert!(
        dashboard.starts_with("read:"),
        "dashboard origin with Authorization: {dashboard}"
    );
    let not_dashboard = outcome(&catalog_only_to_dashboard).await;
    assert!(
        not_dashboard.starts_with("refused:"),
        "a catalog origin at the dashboard: {not_dashboard}"
    );

    // Without the preflight's headers, OPTIONS is a method like any other.
    let plain = app
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/catalog/courses/c1", app.base_url))
        .send()
        .await
        .expect("options");
    assert_eq!(plain.status(), 405);
    let preflight = app
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/catalog/courses/c1", app.base_url))
        .header("Origin", &listed)
        .header("Access-Control-Request-Method", "GET")
        .send()
        .await
        .expect("preflight");
    assert_eq!(preflight.status(), 200);
    assert_eq!(
        preflight
            .headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some(listed.as_str())
    );
}
