//! `GET /status` in a real browser: headless Chromium (Debian's) loads the
//! page while a rebuild runs, runs its script, and the rendered DOM must show
//! what an operator needs. Also leaves a screenshot in target/status.png.

use std::process::Command;
use std::time::Duration;

use courseview::read_model::ReadModel;
use courseview::rebuild::{rebuild, ProgressSink, RebuildOptions};
use tokio_util::sync::CancellationToken;

use crate::helpers::{eventually, unique, TestApp};
use crate::pipeline::big_history;

const CHROMIUM: &str = "/usr/bin/chromium";

/// Chromium as the machine's probe runs it: headless, no sandbox (root),
/// and none of the background traffic a closed network refuses. Off the
/// async threads: the API it loads is served by this test's runtime.
pub async fn chromium(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || chromium_blocking(&args))
        .await
        .expect("chromium thread")
}

fn chromium_blocking(args: &[String]) -> std::process::Output {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run the suite through scripts/test, which installs it"
    );
    let profile = std::env::temp_dir().join(unique("chromium-"));
    let output = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("chromium runs");
    let _ = std::fs::remove_dir_all(profile);
    output
}

struct Quiet;

impl ProgressSink for Quiet {
    fn progress(&mut self, _done: i64, _total: i64) {}
    fn phase(&mut self, _message: &str) {}
}

#[tokio::test]
async fn the_status_page_shows_state_lag_partitions_and_a_running_rebuild_in_a_browser() {
    let app = TestApp::spawn().await;
    // Enough that the rebuild below (one record per batch) runs for minutes.
    let events = big_history("s", 1500);
    app.project_all(ReadModel::Catalog, &events).await;
    app.send(courseview::kafka::Outgoing {
        topic: app.topic("CourseCreatedEvent"),
        value: Some("{broken".into()),
        ..Default::default()
    })
    .await;

    // A slow rebuild: tiny batches, so it is still running when the page loads.
    let mut settings = app.worker_settings(ReadModel::Catalog);
    settings.batch_size = 1;
    settings.batch_linger = Duration::ZERO;
    // And no folding: each record written on its own.
    settings.fold = courseview::worker::FoldLimits {
        interval: Duration::ZERO,
        bytes: 0,
    };
    let options = RebuildOptions {
        allow_partial_history: false,
        workers_stopped: false,
        accept_dead_letters: false,
        restart: false,
        mode: courseview::rebuild::Mode::BlueGreen,
        catch_up_lag: 0,
        grace: Duration::from_secs(1),
        report_every: Duration::from_millis(100),
        handover_timeout: Duration::from_secs(5),
    };
    let cancel = CancellationToken::new();
    let running = {
        let (store, cache, probe, cancel) = (app.store.clone(), app.cache.clone(), app.probe.clone(), cancel.clone());
        tokio::spawn(async move { rebuild(&settings, &store, cache, &probe, &options, &mut Quiet, &cancel).await })
    };
    eventually("rebuild progress to be published", Duration::from_secs(30), || async {
        let pointer = app.store.pointer("catalog").await.ok()?;
        pointer.rebuild.filter(|p| p.done > 0).map(|_| ())
    })
    .await;

    let url = format!("{}/status", app.base_url);
    let screenshot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/status.png");
    chromium(&[
        "--window-size=1200,900",
        &format!("--screenshot={}", screenshot.display()),
        &url,
    ])
    .await;
    let dom = chromium(&["--dump-dom", &url]).await;
    let html = String::from_utf8_lossy(&dom.stdout);
    cancel.cancel();
    let _ = running.await;

    for expected in [
        r#"id="projection-catalog""#,
        r#"class="state rebuilding""#,
        "Rebuilding generation 2",
        "<progress",
        "serving generation",
        "dead letters",
        &app.topic("CourseCreatedEvent"),
        r#"id="cache" class="cache-up""#,
    ] {
        assert!(html.contains(expected), "the page lacks {expected:?}:\n{html}");
    }
    assert!(
        html.contains(r#"<span id="error" class="error"></span>"#),
        "the page reports an error: {html}"
    );
}
