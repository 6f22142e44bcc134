//! The OpenAPI contract: the document served at `/openapi.json` matches the
//! router (routes and query parameters, both ways), and Schemathesis fuzzes
//! the live API against it over a seeded read model: every response must
//! conform (status codes, problem+json bodies, schemas), none may be a 5xx
//! or take over 2 s.

use std::collections::BTreeSet;
use std::time::Duration;

use courseview::http::{DashboardAuth, JwtSettings, QUERY_PARAMETERS};
use courseview::read_model::ReadModel;

use crate::helpers::{Options, TestApp};
use crate::peers::cache_dir;
use crate::pipeline::big_history;

const SECRET: &str = "contract-test-secret-0123456789";

#[tokio::test]
async fn every_route_and_query_parameter_is_in_the_document_and_the_other_way_round() {
    let app = TestApp::spawn().await;
    let (status, doc) = app.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths");

    // Every documented path is routed (the fallback's "no such resource"
    // would answer otherwise), and answers as documented.
    for (path, item) in paths {
        assert_ne!(
            courseview::http::route_template(path),
            "other",
            "{path} has no metrics label of its own"
        );
        let concrete = path.replace("{courseId}", "c1").replace("{teacherId}", "t1");
        let response = app.get(&concrete).await;
        let code = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        assert!(
            !body.contains("no such resource"),
            "{path} is documented but not routed"
        );
        assert!(
            item["get"]["responses"].get(code.to_string()).is_some(),
            "{path} answered {code}, which it does not document"
        );
    }
    // Every path a handler parses query parameters for is documented, with
    // exactly those parameters.
    for (path, accepted) in QUERY_PARAMETERS {
        let item = paths
            .get(*path)
            .unwrap_or_else(|| panic!("{path} is routed but not documented"));
        let documented: BTreeSet<&str> = item["get"]["parameters"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter(|p| p["in"] == "query")
                    .filter_map(|p| p["name"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        let accepted: BTreeSet<&str> = accepted.iter().copied().collect();
        assert_eq!(documented, accepted, "query parameters of {path}");
    }
    // And the documented paths with query parameters are exactly those.
    for (path, item) in paths {
        let has_query = item["get"]["parameters"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["in"] == "query"));
        if has_query {
            assert!(
                QUERY_PARAMETERS.iter().any(|(p, _)| p == path),
                "{path} documents query parameters its handler does not parse"
            );
        }
    }
}

#[tokio::test]
async fn schemathesis_finds_no_nonconforming_response_server_error_or_slow_answer() {
    let schemathesis = cache_dir().join("schemathesis/bin/schemathesis");
    assert!(
        schemathesis.exists(),
        "{} is missing: run the suite through scripts/test, which installs it",
        schemathesis.display()
    );
    let auth = DashboardAuth::from_settings(
        JwtSettings {
            hs256_secret: Some(SECRET.into()),
            teacher_claim: "sub".into(),
            leeway: Duration::from_secs(5),
            ..JwtSettings::default()
        },
        false,
    )
    .expect("auth");
    let app = TestApp::with(Options {
        dashboard: auth,
        // minVersion waits must end well inside the 2 s response bound.
        min_version_wait: Duration::from_millis(300),
        ..Options::default()
    })
    .await;
    let events = big_history("c", 40);
    app.project_all(ReadModel::Catalog, &events).await;
    app.project_all(ReadModel::TeacherCourses, &events).await;
    let now = chrono::Utc::now().timestamp();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "t1", "exp": now + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("token");
    let examples = std::env::var("SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "25".into());
    let seed = std::env::var("SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".into());
    let report = std::env::temp_dir().join(crate::helpers::unique("schemathesis-"));
    let args = vec![
        "run".to_owned(),
        format!("{}/openapi.json", app.base_url),
        "--checks".into(),
        "all".into(),
        // Authorization is the dashboard's own business (tested in auth.rs);
        // these checks assume any 401 without credentials is a bug of the schema.
        "--exclude-checks".into(),
        "ignored_auth,positive_data_acceptance".into(),
        "--max-response-time".into(),
        "2".into(),
        "--max-examples".into(),
        examples,
        "--seed".into(),
        seed,
        "--workers".into(),
        "1".into(),
        "--no-color".into(),
        "--report-dir".into(),
        report.display().to_string(),
        "-H".into(),
        format!("Authorization: Bearer {token}"),
    ];
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(schemathesis)
            .args(&args)
            .output()
            .expect("schemathesis runs")
    })
    .await
    .expect("joined");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let _ = std::fs::remove_dir_all(report);
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
