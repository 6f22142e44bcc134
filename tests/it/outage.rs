//! A MongoDB outage in the middle of a run: the worker retries with backoff,
//! never advances its offsets past what was written, and loses nothing.
//!
//! The outage is real: the test runs its own MongoDB-wire server (the same
//! nx-27017 that `scripts/services` installs) on a free port with its data on
//! disk, kills it with SIGKILL mid-stream and starts it again.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use courseview::read_model::ReadModel;

use crate::helpers::{clean_replay, eventually, unique, Options, Reaped, TestApp};
use crate::pipeline::big_history;

/// A private nx-27017 whose data survives restarts.
struct PrivateMongo {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    process: Option<Reaped>,
}

impl PrivateMongo {
    fn start() -> PrivateMongo {
        let cache = std::env::var_os("COURSEVIEW_CACHE").map_or_else(
            || PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/courseview"),
            PathBuf::from,
        );
        let binary = cache.join("nx-27017/bin/nx-27017");
        assert!(
            binary.exists(),
            "{} is missing: run the suite through scripts/test, which installs it",
            binary.display()
        );
        let dir = std::env::temp_dir().join(unique("courseview-outage-"));
        std::fs::create_dir_all(&dir).expect("data dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut mongo = PrivateMongo {
            binary,
            dir,
            port,
            process: None,
        };
        mongo.restart();
        mongo
    }

    fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}", self.port)
    }

    /// Starts the server on the same port and data, and waits until it listens.
    fn restart(&mut self) {
        let child = Command::new(&self.binary)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string(), "--data-dir"])
            .arg(self.dir.join("data"))
            .arg("--log-file")
            .arg(self.dir.join("server.log"))
            .arg("--pid-file")
            .arg(self.dir.join("server.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nx-27017 starts");
        self.process = Some(Reaped(child));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "nx-27017 did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no goodbye to the clients, as in a crash or a network cut.
    fn kill(&mut self) {
        drop(self.process.take());
    }
}

impl Drop for PrivateMongo {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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
