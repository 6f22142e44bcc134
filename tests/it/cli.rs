//! The operator commands as an operator runs them: the real binary, its
//! output read from a pipe.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use courseview::read_model::ReadModel;
use serde_json::{json, Value};

use crate::helpers::{event, redis_url, signal, Reaped, TestApp};

fn courseview(app: &TestApp, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_courseview"));
    command
        .args(args)
        .env("KAFKA_BROKERS", &app.brokers)
        .env("MONGODB_URI", &app.mongodb_uri)
        .env("MONGODB_DATABASE", app.store.database_name())
        .env("REDIS_URL", redis_url())
        .env("COURSEVIEW_REDIS_PREFIX", format!("cvtest:{}", app.id))
        .env("COURSEVIEW_TOPICS", app.topics_regex())
        .env("RUST_LOG", "warn");
    command
}

#[tokio::test]
async fn dlq_list_prints_json_lines_when_piped_and_show_prints_one_letter_whole() {
    let app = TestApp::spawn().await;
    app.send(courseview::kafka::Outgoing {
        topic: app.topic("CourseCreatedEvent"),
        key: Some("bad".into()),
        value: Some("{broken".into()),
        ..Default::default()
    })
    .await;
    app.project_all(
        ReadModel::Catalog,
        &[event(
            "CourseCreatedEvent",
            "ok",
            1,
            json!({"name": "Fine", "teacherId": "t"}),
        )],
    )
    .await;
    let output = courseview(&app, &["dlq", "list"]).output().expect("dlq list runs");
    assert!(output.status.success());
    let lines: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["value"], "{broken");
    let id = lines[0]["id"].as_str().expect("id");

    let output = courseview(&app, &["dlq", "show", id]).output().expect("dlq show runs");
    assert!(output.status.success());
    let letter: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(letter["key"].as_str(), Some("bad"));
    assert!(letter["error"].as_str().is_some_and(|e| e.contains("not valid JSON")));

    let missing = courseview(&app, &["dlq", "show", "catalog/nope/0/0"])
        .output()
        .expect("runs");
    assert!(!missing.status.success(), "an unknown id is an error");
}

#[tokio::test]
async fn status_watch_prints_a_fresh_status_each_interval_until_interrupted() {
    let app = TestApp::spawn().await;
    app.project_all(
        ReadModel::Catalog,
        &[event(
            "CourseCreatedEvent",
            "w1",
            1,
            json!({"name": "W", "teacherId": "t"}),
        )],
    )
    .await;
    let child = courseview(&app, &["status", "--json", "--watch", "300ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("status --watch runs");
    let mut child = Reaped(child);
    let stdout = child.stdout.take().expect("piped");
    let reports = tokio::task::spawn_blocking(move || {
        // Pretty JSON documents, one per refresh, each ending in "}".
        let mut documents = 0;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        while documents < 3 && reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            if line.trim_end() == "}" {
                documents += 1;
            }
            line.clear();
        }
        // Still reading: the command ends on Ctrl-C, not on a closed pipe.
        (documents, reader)
    });
    let (documents, _still_reading) = tokio::time::timeout(Duration::from_secs(30), reports)
        .await
        .expect("three refreshes in time")
        .expect("reader");
    assert_eq!(documents, 3);
    signal(&child, "INT");
    let status = exited(&mut child).await.expect("exits on Ctrl-C");
    assert!(status.success());

    // A reader that goes away (`status --watch | head -1`) ends it quietly.
    let mut child = Reaped(
        courseview(&app, &["status", "--json", "--watch", "300ms"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("status --watch runs"),
    );
    let stdout = child.stdout.take().expect("piped");
    let mut first = String::new();
    BufReader::new(stdout).read_line(&mut first).expect("a first line");
    let status = exited(&mut child).await.expect("exits once nobody reads");
    assert!(status.success(), "a closed pipe is no failure: {status:?}");
}

/// The child's exit status, if it exits within 10 s.
async fn exited(child: &mut Reaped) -> Result<std::process::ExitStatus, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(status) = child.0.try_wait().expect("wait") {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// `--max-record-bytes` beyond 1 MiB used to be clamped silently while its
/// help said "at most 4 MiB": now the help, the limit and the refusal agree.
#[tokio::test]
async fn a_record_limit_out_of_range_stops_the_worker_at_start_naming_the_setting() {
    let app = TestApp::spawn().await;
    for bad in ["4194304", "0"] {
        let output = courseview(&app, &["project", "catalog", "--max-record-bytes", bad])
            .output()
            .expect("courseview runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{bad} must be refused: {stderr}");
        assert!(
            stderr.contains("--max-record-bytes") && stderr.contains("from 1 to 1048576"),
            "names the setting and its range: {stderr}"
        );
    }
    let help = courseview(&app, &["project", "--help"]).output().expect("help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("1048576") && !help.contains("4 MiB"), "{help}");
}
