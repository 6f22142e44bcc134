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

pub fn installed(relative: &str) -> PathBuf {
    let binary = cache_dir().join(relative);
    assert!(
        binary.exists(),
        "{} is missing: run the suite through scripts/test, which installs it",
        binary.display()
    );
    binary
}

fn wait_listening(port: u16, what: &str) {
    wait_listening_for(port, what, Duration::from_secs(30));
}

fn wait_listening_for(port: u16, what: &str, within: Duration) {
    let deadline = std::time::Instant::now() + within;
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
        PrivateRedis {
            child: Self::spawn(port, extra),
            port,
        }
    }

    /// TLS only (the plaintext port off) on `port`, with the server
    /// certificate of `scripts/services`' test CA; `extra` adds arguments
    /// (`--tls-auth-clients yes`, `--aclfile …`).
    pub fn start_tls(tls_dir: &std::path::Path, extra: &[&str]) -> PrivateRedis {
        let mut redis = PrivateRedis::start_with(&[]);
        let _ = redis.child.kill();
        let _ = redis.child.wait();
        wait_port_free(redis.port);
        let file = |name: &str| tls_dir.join(name).display().to_string();
        let tls_port = redis.port.to_string();
        let mut args = vec![
            "--port".to_owned(),
            "0".to_owned(),
            "--tls-port".to_owned(),
            tls_port,
            "--tls-cert-file".to_owned(),
            file("server.pem"),
            "--tls-key-file".to_owned(),
            file("server.key"),
            "--tls-ca-cert-file".to_owned(),
            file("ca.pem"),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        redis.child = Self::spawn(redis.port, &refs);
        wait_listening(redis.port, "redis (TLS)");
        redis
    }

    /// A fresh, empty server on the same port (it keeps nothing on disk).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        wait_port_free(self.port);
        self.child = Self::spawn(self.port, &[]);
    }

    fn spawn(port: u16, extra: &[&str]) -> Child {
        Command::new("redis-server")
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
            .expect("redis-server runs")
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where `scripts/services` put Apache Kafka (its `lib/` classpath and
/// log4j2 configuration), for private brokers.
fn kafka_home() -> PathBuf {
    installed("kafka/current")
}

/// A private Apache Kafka cluster of KRaft nodes, each a combined broker and
/// controller on ports of its own, with logs on disk: a node restarted keeps
/// its records, its topics and the groups' committed offsets.
pub struct PrivateBroker {
    dir: PathBuf,
    nodes: Vec<KafkaNode>,
}

struct KafkaNode {
    id: u32,
    port: u16,
    process: Option<Reaped>,
}

impl PrivateBroker {
    /// One node, replication factor 1.
    pub fn start() -> PrivateBroker {
        PrivateBroker::cluster(1, "0")
    }

    /// One node whose new groups wait `delay_ms` for more members before
    /// their first rebalance (Kafka's default is 3,000).
    pub fn with_rebalance_delay(delay_ms: &'static str) -> PrivateBroker {
        PrivateBroker::cluster(1, delay_ms)
    }

    /// `size` nodes forming one KRaft quorum; internal topics replicated to
    /// all of them, `min.insync.replicas` 2 once there are three.
    pub fn cluster(size: u32, rebalance_delay_ms: &str) -> PrivateBroker {
        let home = kafka_home();
        let dir = std::env::temp_dir().join(unique("courseview-kafka-"));
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let voters = ports
            .iter()
            .enumerate()
            .map(|(i, (_, controller))| format!("{}@127.0.0.1:{controller}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let replication = size.min(3);
        let min_isr = if size >= 3 { 2 } else { 1 };
        let cluster_id = "Y291cnNldmlldy10ZXN0LQ";
        let mut nodes = Vec::new();
        for (i, (port, controller)) in ports.iter().enumerate() {
            let id = u32::try_from(i).expect("few nodes") + 1;
            let node_dir = dir.join(format!("node-{id}"));
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let config = format!(
                "process.roles=broker,controller\n\
                 node.id={id}\n\
                 controller.quorum.voters={voters}\n\
                 listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
                 advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
                 controller.listener.names=CONTROLLER\n\
                 inter.broker.listener.name=PLAINTEXT\n\
                 listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
                 log.dirs={log}\n\
                 num.partitions=1\n\
                 default.replication.factor={replication}\n\
                 min.insync.replicas={min_isr}\n\
                 offsets.topic.replication.factor={replication}\n\
                 offsets.topic.num.partitions=3\n\
                 transaction.state.log.replication.factor={replication}\n\
                 transaction.state.log.min.isr={min_isr}\n\
                 transaction.state.log.num.partitions=3\n\
                 share.coordinator.state.topic.replication.factor={replication}\n\
                 share.coordinator.state.topic.min.isr={min_isr}\n\
                 group.initial.rebalance.delay.ms={rebalance_delay_ms}\n\
                 # One failover per fault: leadership does not move back on its own.\n\
                 auto.leader.rebalance.enable=false\n",
                log = node_dir.join("log").display(),
            );
            let properties = node_dir.join("server.properties");
            std::fs::write(&properties, config).expect("server.properties");
            let formatted = Command::new("java")
                .arg("-cp")
                .arg(home.join("lib/*"))
                .arg(log4j(&home))
                .args(["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c"])
                .arg(&properties)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("kafka storage tool runs");
            assert!(formatted.success(), "formatting {} failed", node_dir.display());
            nodes.push(KafkaNode {
                id,
                port: *port,
                process: None,
            });
        }
        let mut broker = PrivateBroker { dir, nodes };
        for i in 0..broker.nodes.len() {
            broker.spawn(i);
        }
        broker.wait_ready();
        broker
    }

    /// Every node's address, as `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts every stopped node again on its ports and data.
    pub fn restart(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].process.is_none() {
                self.spawn(i);
            }
        }
        self.wait_ready();
    }

    /// SIGKILL of every node, as in a crash of the whole cluster.
    pub fn kill(&mut self) {
        for node in &mut self.nodes {
            drop(node.process.take());
        }
    }

    /// SIGKILL of one node (by Kafka node id).
    pub fn kill_node(&mut self, id: u32) {
        if let Some(node) = self.nodes.iter_mut().find(|n| n.id == id) {
            drop(node.process.take());
        }
    }

    fn spawn(&mut self, index: usize) {
        let home = kafka_home();
        let node = &self.nodes[index];
        wait_port_free(node.port);
        let node_dir = self.dir.join(format!("node-{}", node.id));
        let log = std::fs::File::create(node_dir.join("broker.log")).expect("log file");
        let child = Command::new("java")
            .args(["-Xms128m", "-Xmx384m", "-XX:+UseG1GC", "-cp"])
            .arg(home.join("lib/*"))
            .arg(log4j(&home))
            .arg("kafka.Kafka")
            .arg(node_dir.join("server.properties"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("kafka starts");
        self.nodes[index].process = Some(Reaped(child));
    }

    /// Until every running node lists every running node in its metadata:
    /// a socket that accepts is not yet a broker that has joined the quorum.
    fn wait_ready(&self) {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let running: Vec<&KafkaNode> = self.nodes.iter().filter(|n| n.process.is_some()).collect();
        // A node opens its broker port only once the quorum has a leader:
        // three JVMs starting together on two busy cores take a while, so
        // the whole wait shares one deadline rather than 30 s per port.
        let deadline = std::time::Instant::now() + Duration::from_secs(150);
        for node in &running {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            wait_listening_for(
                node.port,
                &format!("kafka node {} (log: {})", node.id, self.dir.display()),
                left,
            );
            let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", format!("127.0.0.1:{}", node.port))
                .create()
                .expect("metadata client");
            loop {
                let seen = consumer
                    .fetch_metadata(None, Duration::from_secs(2))
                    .map(|m| m.brokers().len())
                    .unwrap_or(0);
                if seen >= running.len() {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "kafka node {} never saw {} brokers (log: {})",
                    node.id,
                    running.len(),
                    self.dir.display()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn log4j(home: &std::path::Path) -> std::ffi::OsString {
    let mut arg = std::ffi::OsString::from("-Dlog4j2.configurationFile=");
    arg.push(home.join("log4j2.properties"));
    arg
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

    /// Forwards again, what was held first.
    pub fn thaw(&self) {
        self.frozen.store(false, std::sync::atomic::Ordering::SeqCst);
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

/// A private MariaDB with the binlog Debezium reads, its data kept across
/// restarts, and the `courseview` user of `scripts/services`.
pub struct PrivateMariaDb {
    dir: PathBuf,
    pub port: u16,
    process: Option<Reaped>,
}

impl PrivateMariaDb {
    pub fn start() -> PrivateMariaDb {
        let dir = std::env::temp_dir().join(unique("courseview-mariadb-"));
        std::fs::create_dir_all(dir.join("data")).expect("data dir");
        let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
        let installed = Command::new("mariadb-install-db")
            .arg(format!("--user={user}"))
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg("--auth-root-authentication-method=normal")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("mariadb-install-db runs");
        assert!(installed.success(), "mariadb-install-db in {}", dir.display());
        let mut db = PrivateMariaDb {
            dir,
            port: free_port(),
            process: None,
        };
        db.restart();
        let created = Command::new("mariadb")
            .arg(format!("--socket={}", db.socket().display()))
            .args(["-uroot", "-e"])
            .arg(
                "CREATE USER 'courseview'@'%' IDENTIFIED BY 'courseview';
                 CREATE USER 'courseview'@'localhost' IDENTIFIED BY 'courseview';
                 GRANT ALL PRIVILEGES ON *.* TO 'courseview'@'%';
                 GRANT ALL PRIVILEGES ON *.* TO 'courseview'@'localhost';",
            )
            .status()
            .expect("mariadb client runs");
        assert!(created.success(), "the courseview user");
        db
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("mariadb.sock")
    }

    /// Starts the server on the same port and data, and waits until it listens.
    pub fn restart(&mut self) {
        wait_port_free(self.port);
        let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
        let log = std::fs::File::create(self.dir.join("server.log")).expect("log file");
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--user={user}"))
            .arg(format!("--datadir={}", self.dir.join("data").display()))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--port={}", self.port))
            .arg(format!("--socket={}", self.socket().display()))
            .args(["--server-id=1", "--binlog-format=ROW", "--binlog-row-image=FULL"])
            .arg(format!("--log-bin={}", self.dir.join("data/binlog").display()))
            .args(["--innodb-buffer-pool-size=32M", "--performance-schema=OFF"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mariadbd starts");
        self.process = Some(Reaped(child));
        wait_listening(self.port, "mariadb");
    }

    /// SIGKILL, as in a crash of the course service's database.
    pub fn kill(&mut self) {
        drop(self.process.take());
    }
}

impl Drop for PrivateMariaDb {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private Kafka Connect worker (distributed mode, its own group and
/// internal topics) with `scripts/services`' plugin path, for tests that
/// kill it.
pub struct PrivateConnect {
    dir: PathBuf,
    pub port: u16,
    process: Option<Reaped>,
}

impl PrivateConnect {
    pub fn start(brokers: &str) -> PrivateConnect {
        let dir = std::env::temp_dir().join(unique("courseview-connect-"));
        std::fs::create_dir_all(&dir).expect("connect dir");
        let port = free_port();
        let id = unique("connect-");
        let config = format!(
            "bootstrap.servers={brokers}\n\
             group.id={id}\n\
             listeners=http://127.0.0.1:{port}\n\
             rest.advertised.host.name=127.0.0.1\n\
             rest.advertised.port={port}\n\
             plugin.path={plugins}\n\
             key.converter=org.apache.kafka.connect.storage.StringConverter\n\
             value.converter=org.apache.kafka.connect.storage.StringConverter\n\
             config.storage.topic={id}-configs\n\
             offset.storage.topic={id}-offsets\n\
             status.storage.topic={id}-status\n\
             config.storage.replication.factor=1\n\
             offset.storage.replication.factor=1\n\
             status.storage.replication.factor=1\n\
             offset.storage.partitions=1\n\
             status.storage.partitions=1\n\
             offset.flush.interval.ms=1000\n\
             scheduled.rebalance.max.delay.ms=0\n",
            plugins = installed("connect-plugins/current").display(),
        );
        std::fs::write(dir.join("connect.properties"), config).expect("connect.properties");
        let mut connect = PrivateConnect {
            dir,
            port,
            process: None,
        };
        connect.restart();
        connect
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("connect.log")
    }

    /// Starts the worker again; it rejoins its group and resumes its
    /// connectors from the offsets it last flushed.
    pub fn restart(&mut self) {
        let home = kafka_home();
        wait_port_free(self.port);
        let log = std::fs::File::create(self.dir.join("connect.log")).expect("log file");
        let child = Command::new("java")
            .args(["-Xms128m", "-Xmx512m", "-XX:+UseG1GC", "-cp"])
            .arg(home.join("lib/*"))
            .arg(log4j(&home))
            .arg("org.apache.kafka.connect.cli.ConnectDistributed")
            .arg(self.dir.join("connect.properties"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("connect starts");
        self.process = Some(Reaped(child));
        // A JVM that scans every plugin's jars: past 30 s on two busy cores
        // (a cold run builds beside the suite).
        wait_listening_for(self.port, "kafka connect", Duration::from_secs(120));
    }

    /// SIGKILL: offsets not yet flushed are lost, so records are sent again.
    pub fn kill(&mut self) {
        drop(self.process.take());
    }
}

impl Drop for PrivateConnect {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// TLS in front of a plain TCP server (stunnel, as a MongoDB behind a TLS
/// terminator): server certificate of `scripts/services`' test CA, and
/// with `client_certificates` a client certificate of that CA required.
pub struct PrivateStunnel {
    dir: PathBuf,
    pub port: u16,
    process: Option<Reaped>,
}

impl PrivateStunnel {
    pub fn start(tls_dir: &std::path::Path, target: u16, client_certificates: bool) -> PrivateStunnel {
        let dir = std::env::temp_dir().join(unique("courseview-stunnel-"));
        std::fs::create_dir_all(&dir).expect("stunnel dir");
        let port = free_port();
        let file = |name: &str| tls_dir.join(name).display().to_string();
        let mut conf = format!(
            "foreground = yes\npid =\n[tls]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{target}\ncert = {}\nkey = {}\n",
            file("server.pem"),
            file("server.key")
        );
        if client_certificates {
            conf.push_str(&format!(
                "CAfile = {}\nverifyChain = yes\nrequireCert = yes\n",
                file("ca.pem")
            ));
        }
        std::fs::write(dir.join("stunnel.conf"), conf).expect("stunnel.conf");
        let child = Command::new("stunnel4")
            .arg(dir.join("stunnel.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("stunnel4 runs (scripts/services installs it)");
        wait_listening(port, "stunnel");
        PrivateStunnel {
            dir,
            port,
            process: Some(Reaped(child)),
        }
    }
}

impl Drop for PrivateStunnel {
    fn drop(&mut self) {
        drop(self.process.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
