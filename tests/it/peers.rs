//! Private instances of the real peers, for tests that stop, kill or
//! misconfigure a server: each on a free port, with its own data, killed
//! when the test ends.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::helpers::{unique, Reaped};

/// A free TCP port on 127.0.0.1 (free when asked; the caller binds it soon).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A port that accepts connections and never answers: a peer that hangs.
pub fn silent_listener() -> u16 {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().map_while(Result::ok) {
            held.push(stream);
        }
    });
    port
}

/// Where `scripts/services` caches the peers it installed.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("COURSEVIEW_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/courseview"),
        PathBuf::from,
    )
}

fn installed(relative: &str) -> PathBuf {
    let binary = cache_dir().join(relative);
    assert!(
        binary.exists(),
        "{} is missing: run the suite through scripts/test, which installs it",
        binary.display()
    );
    binary
}

fn wait_listening(port: u16, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_port_free(port: u16) {
    // The broker cannot rebind a port for about a second after it stopped.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "port {port} stayed taken");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A private nx-27017 whose data survives restarts.
pub struct PrivateMongo {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    process: Option<Reaped>,
}

impl PrivateMongo {
    pub fn start() -> PrivateMongo {
        let binary = installed("nx-27017/bin/nx-27017");
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

    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}", self.port)
    }

    /// Starts the server on the same port and data, and waits until it listens.
    pub fn restart(&mut self) {
        wait_port_free(self.port);
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
        wait_listening(self.port, "nx-27017");
    }

    /// The running server process.
    pub fn process(&self) -> &Reaped {
        self.process.as_ref().expect("nx-27017 is running")
    }

    /// SIGKILL: no goodbye to the clients, as in a crash or a network cut.
    pub fn kill(&mut self) {
        drop(self.process.take());
    }
}

impl Drop for PrivateMongo {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct PrivateRedis {
    pub child: Child,
    pub port: u16,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        PrivateRedis::start_with(&[])
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Waits until it answers, and returns a connection to it.
    pub async fn ready(&self) -> redis::aio::MultiplexedConnection {
        let url = self.url();
        crate::helpers::eventually("private redis", Duration::from_secs(10), || async {
            let client = redis::Client::open(url.as_str()).ok()?;
            client.get_multiplexed_async_connection().await.ok()
        })
        .await
    }

    /// With extra `redis-server` arguments (`--maxmemory 4mb`, …).
    pub fn start_with(extra: &[&str]) -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("port")
            .local_addr()
            .expect("addr")
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        PrivateRedis { child, port }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private nisshi broker with a durable SQLite store, so a restart keeps
/// topics, records, watermarks and committed offsets.
pub struct PrivateBroker {
    binary: PathBuf,
    /// Kafka's `group.initial.rebalance.delay.ms`: how long a new group's
    /// first rebalance waits for more members.
    rebalance_delay: &'static str,
    dir: PathBuf,
    pub port: u16,
    process: Option<Reaped>,
}

impl PrivateBroker {
    pub fn start() -> PrivateBroker {
        PrivateBroker::with_rebalance_delay("0s")
    }

    /// With Kafka's default of 3 s, assignments come seconds after a join.
    pub fn with_rebalance_delay(rebalance_delay: &'static str) -> PrivateBroker {
        let binary = installed("nisshi/bin/nisshi");
        let dir = std::env::temp_dir().join(unique("courseview-broker-"));
        std::fs::create_dir_all(&dir).expect("broker dir");
        let mut broker = PrivateBroker {
            binary,
            rebalance_delay,
            dir,
            port: free_port(),
            process: None,
        };
        broker.restart();
        broker
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        wait_port_free(self.port);
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::File::create(self.dir.join("broker.log")).expect("log file");
        let child = Command::new(&self.binary)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            // nisshi reads the SQLite path relative to its working directory.
            .args(["--storage-engine", "sqlite://nisshi.db"])
            .current_dir(&self.dir)
            .args(["--group-initial-rebalance-delay", self.rebalance_delay])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nisshi starts");
        self.process = Some(Reaped(child));
        wait_listening(self.port, "nisshi");
    }

    /// SIGKILL, as in a crash.
    pub fn kill(&mut self) {
        drop(self.process.take());
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP proxy to a local port that can freeze: it stops forwarding in
/// both directions and keeps every connection open, as a stalled network
/// path does (no FIN, no RST: the client only notices by waiting).
pub struct FreezingProxy {
    pub port: u16,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FreezingProxy {
    pub async fn start(target: u16) -> FreezingProxy {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let frozen = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&frozen);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, Arc::clone(&flag)));
                tokio::spawn(pump(server_read, client_write, Arc::clone(&flag)));
            }
        });
        FreezingProxy { port, frozen }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let held = || async {
        while frozen.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        held().await;
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just before a freeze are held with the rest.
        held().await;
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
