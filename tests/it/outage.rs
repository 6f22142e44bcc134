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
