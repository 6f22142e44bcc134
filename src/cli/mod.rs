//! The command line: global connection settings and one file per subcommand.

pub mod dlq;
pub mod offsets;
pub mod pause;
pub mod produce;
pub mod project;
pub mod rebuild;
pub mod resume;
pub mod serve;
pub mod status;
pub mod token;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use anyhow::Context as _;

use crate::cache::{Cache, RedisTls};
use crate::kafka::{KafkaConfigError, KafkaConnection, PropertiesBuilder};
use crate::mongo::Store;
use crate::status::StatusProbe;
use crate::telemetry::LogFormat;

/// courseview: read models of course events, from Kafka to MongoDB, served
/// through a Redis-cached read-only HTTP API.
#[derive(Debug, Parser)]
#[command(name = "courseview", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run projector workers: consume course events and keep read models.
    Project(project::ProjectArgs),
    /// Serve the read-only query API.
    Serve(serve::ServeArgs),
    /// List or replay dead-lettered records.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Rebuild a projection from offset zero into a new generation, then switch readers to it.
    Rebuild(rebuild::RebuildArgs),
    /// Pause a projection: every worker stores its offsets and applies nothing until `resume`.
    Pause(pause::PauseArgs),
    /// Resume a paused projection from its stored offsets.
    Resume(resume::ResumeArgs),
    /// Move a paused projection's stored offsets: to a time, an offset, or the log's start.
    Offsets(offsets::OffsetsArgs),
    /// Print per projection and partition: stored offset, high watermark, lag, generation, rebuild progress.
    Status(status::StatusArgs),
    /// Produce a demo stream of course events (for docker compose and trying things out).
    Produce(produce::ProduceArgs),
    /// Mint an HS256 teacher-dashboard token with the API's shared secret (demos, development).
    Token(token::TokenArgs),
}

impl Command {
    /// The subcommand's name, as typed.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Project(_) => "project",
            Command::Serve(_) => "serve",
            Command::Dlq(_) => "dlq",
            Command::Rebuild(_) => "rebuild",
            Command::Pause(_) => "pause",
            Command::Resume(_) => "resume",
            Command::Offsets(_) => "offsets",
            Command::Status(_) => "status",
            Command::Produce(_) => "produce",
            Command::Token(_) => "token",
        }
    }
}

/// Connection settings every subcommand shares.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Kafka bootstrap servers, comma-separated.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092", global = true)]
    pub kafka_brokers: String,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The connection built from `kafka` (once: its clients share what
    /// they report).
    #[arg(skip)]
    pub kafka_connection: Arc<OnceLock<KafkaConnection>>,
    /// MongoDB connection string (credentials in it are never logged) [default: mongodb://127.0.0.1:27017].
    #[arg(long, env = "MONGODB_URI", global = true, hide_env_values = true)]
    pub mongodb_uri: Option<String>,
    /// File holding the MongoDB connection string (a mounted secret), instead of MONGODB_URI.
    #[arg(long, env = "MONGODB_URI_FILE", value_name = "FILE", global = true)]
    pub mongodb_uri_file: Option<PathBuf>,
    /// MongoDB database holding read models, checkpoints and dead letters.
    #[arg(long, env = "MONGODB_DATABASE", default_value = "courseview", global = true)]
    pub mongodb_database: String,
    /// How long to wait for MongoDB before an operation counts as failed.
    #[arg(long, env = "MONGODB_TIMEOUT", default_value = "2s", value_parser = humantime_duration, global = true)]
    pub mongodb_timeout: Duration,
    /// Redis URL of the API cache (`rediss://` for TLS); `none` disables caching [default: redis://127.0.0.1:6379].
    #[arg(long, env = "REDIS_URL", global = true, hide_env_values = true)]
    pub redis_url: Option<String>,
    /// File holding the Redis URL (a mounted secret), instead of REDIS_URL.
    #[arg(long, env = "REDIS_URL_FILE", value_name = "FILE", global = true)]
    pub redis_url_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify a `rediss://` server with; default: the Mozilla roots.
    #[arg(long, env = "REDIS_CA_FILE", value_name = "FILE", global = true)]
    pub redis_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for a Redis that requires one (`tls-auth-clients yes`).
    #[arg(
        long,
        env = "REDIS_CERT_FILE",
        value_name = "FILE",
        requires = "redis_key_file",
        global = true
    )]
    pub redis_cert_file: Option<PathBuf>,
    /// The Redis client certificate's private key (PEM).
    #[arg(
        long,
        env = "REDIS_KEY_FILE",
        value_name = "FILE",
        requires = "redis_cert_file",
        global = true
    )]
    pub redis_key_file: Option<PathBuf>,
    /// Prefix of every Redis key, so several installs can share one Redis.
    #[arg(long, env = "COURSEVIEW_REDIS_PREFIX", default_value = "courseview", global = true)]
    pub redis_prefix: String,
    /// Time limit of one Redis call; past it the cache is bypassed.
    #[arg(long, env = "REDIS_TIMEOUT", default_value = "100ms", value_parser = humantime_duration, global = true)]
    pub redis_timeout: Duration,
    /// Topics holding course events: a `^regex`, or comma-separated names.
    #[arg(
        long,
        env = "COURSEVIEW_TOPICS",
        default_value = r"^(Course.*Event|outbox\.event\.Course)$",
        global = true
    )]
    pub topics: String,
    /// A projection with a backlog and no progress for this long is reported stalled.
    #[arg(long, env = "COURSEVIEW_STALL_AFTER", default_value = "60s", value_parser = humantime_duration, global = true)]
    pub stall_after: Duration,
    /// Log format.
    #[arg(
        long,
        env = "COURSEVIEW_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
}

/// A value never shown: not by `Debug`, `--help` or an error.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// How every Kafka client connects, beyond the bootstrap servers: any
/// librdkafka client property, and flags for the common ones.
#[derive(Debug, Clone, Default, Args)]
pub struct KafkaArgs {
    /// Kafka client properties file: `key=value` lines (as `kcat -F` and Kafka's `--command-config`), `#` comments.
    #[arg(
        long = "kafka-config",
        env = "COURSEVIEW_KAFKA_CONFIG",
        value_name = "FILE",
        global = true
    )]
    pub config_file: Option<PathBuf>,
    /// One Kafka client property, `key=value` (repeatable, as kcat); in the environment, `COURSEVIEW_KAFKA_X_<NAME>` (`_` for `.`).
    #[arg(short = 'X', value_name = "KEY=VALUE", global = true)]
    pub properties: Vec<String>,
    /// Kafka security protocol (`security.protocol`): plaintext, ssl, sasl_plaintext, sasl_ssl.
    #[arg(
        long = "kafka-security-protocol",
        env = "COURSEVIEW_KAFKA_SECURITY_PROTOCOL",
        global = true
    )]
    pub security_protocol: Option<String>,
    /// SASL mechanism (`sasl.mechanism`): PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER.
    #[arg(
        long = "kafka-sasl-mechanism",
        env = "COURSEVIEW_KAFKA_SASL_MECHANISM",
        global = true
    )]
    pub sasl_mechanism: Option<String>,
    /// SASL user name (`sasl.username`).
    #[arg(long = "kafka-username", env = "COURSEVIEW_KAFKA_USERNAME", global = true)]
    pub username: Option<String>,
    /// SASL password (`sasl.password`); prefer --kafka-password-file.
    #[arg(
        long = "kafka-password",
        env = "COURSEVIEW_KAFKA_PASSWORD",
        hide_env_values = true,
        conflicts_with = "password_file",
        global = true
    )]
    pub password: Option<Secret>,
    /// File holding the SASL password (a mounted secret; a trailing newline is ignored).
    #[arg(
        long = "kafka-password-file",
        env = "COURSEVIEW_KAFKA_PASSWORD_FILE",
        value_name = "FILE",
        global = true
    )]
    pub password_file: Option<PathBuf>,
    /// CA certificate(s) to verify the brokers with (`ssl.ca.location`, PEM); default: the system's.
    #[arg(
        long = "kafka-ca-file",
        env = "COURSEVIEW_KAFKA_CA_FILE",
        value_name = "FILE",
        global = true
    )]
    pub ca_file: Option<PathBuf>,
    /// Client certificate for mutual TLS (`ssl.certificate.location`, PEM).
    #[arg(
        long = "kafka-cert-file",
        env = "COURSEVIEW_KAFKA_CERT_FILE",
        value_name = "FILE",
        global = true
    )]
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (`ssl.key.location`, PEM).
    #[arg(
        long = "kafka-key-file",
        env = "COURSEVIEW_KAFKA_KEY_FILE",
        value_name = "FILE",
        global = true
    )]
    pub key_file: Option<PathBuf>,
}

impl KafkaArgs {
    /// The connection every Kafka client of this process uses, checked:
    /// a bad property stops the process at start, naming it.
    pub fn connection(&self, servers: &str) -> Result<KafkaConnection, KafkaConfigError> {
        let mut b = PropertiesBuilder::default();
        if let Some(file) = &self.config_file {
            b.file(file)?;
        }
        b.environment(std::env::vars())?;
        for p in &self.properties {
            b.assignment(p, "-X")?;
        }
        let path = |p: &PathBuf| p.display().to_string();
        let flags = [
            (
                "security.protocol",
                "--kafka-security-protocol",
                self.security_protocol.clone(),
            ),
            ("sasl.mechanism", "--kafka-sasl-mechanism", self.sasl_mechanism.clone()),
            ("sasl.username", "--kafka-username", self.username.clone()),
            ("ssl.ca.location", "--kafka-ca-file", self.ca_file.as_ref().map(path)),
            (
                "ssl.certificate.location",
                "--kafka-cert-file",
                self.cert_file.as_ref().map(path),
            ),
            ("ssl.key.location", "--kafka-key-file", self.key_file.as_ref().map(path)),
        ];
        for (key, flag, value) in flags {
            if let Some(value) = value {
                b.set(key, &value, flag)?;
            }
        }
        if let Some(password) = &self.password {
            b.set("sasl.password", password.expose(), "--kafka-password")?;
        }
        if let Some(file) = &self.password_file {
            let text = read_secret_file(file).map_err(|error| KafkaConfigError::File {
                what: "the Kafka password file",
                path: path(file),
                error,
            })?;
            b.set("sasl.password", &text, "--kafka-password-file")?;
        }
        b.build(servers)
    }
}

/// A setting given as a value or as a file (the `_FILE` convention of
/// container images and Kubernetes secrets); both at once is an error. The
/// file's trailing newline is not part of the value. An empty value counts
/// as not given (so an override file can clear one for its `_FILE`).
pub fn value_or_file(name: &str, value: Option<&str>, file: Option<&Path>) -> anyhow::Result<Option<String>> {
    match (value.filter(|v| !v.is_empty()), file) {
        (Some(_), Some(_)) => anyhow::bail!("{name} and {name}_FILE are both set; give one"),
        (Some(value), None) => Ok(Some(value.to_owned())),
        (None, Some(file)) => {
            Ok(Some(read_secret_file(file).with_context(|| {
                format!("cannot read {name}_FILE {}", file.display())
            })?))
        }
        (None, None) => Ok(None),
    }
}

/// A secret kept in a file: its text without the trailing newline.
fn read_secret_file(file: &Path) -> std::io::Result<String> {
    let mut text = std::fs::read_to_string(file)?;
    text.truncate(text.trim_end_matches(['\r', '\n']).len());
    Ok(text)
}

impl Global {
    /// The MongoDB connection string, from MONGODB_URI or MONGODB_URI_FILE.
    pub fn mongodb_uri(&self) -> anyhow::Result<String> {
        Ok(value_or_file(
            "MONGODB_URI",
            self.mongodb_uri.as_deref(),
            self.mongodb_uri_file.as_deref(),
        )?
        .unwrap_or_else(|| "mongodb://127.0.0.1:27017".into()))
    }

    /// The Redis URL, from REDIS_URL or REDIS_URL_FILE.
    pub fn redis_url(&self) -> anyhow::Result<String> {
        Ok(
            value_or_file("REDIS_URL", self.redis_url.as_deref(), self.redis_url_file.as_deref())?
                .unwrap_or_else(|| "redis://127.0.0.1:6379".into()),
        )
    }

    /// The Kafka cluster and client properties, checked.
    pub fn kafka(&self) -> anyhow::Result<KafkaConnection> {
        if let Some(connection) = self.kafka_connection.get() {
            return Ok(connection.clone());
        }
        let connection = self.kafka.connection(&self.kafka_brokers)?;
        Ok(self.kafka_connection.get_or_init(|| connection).clone())
    }

    pub async fn store(&self) -> anyhow::Result<Store> {
        let uri = self.mongodb_uri()?;
        Store::connect(&uri, &self.mongodb_database, self.mongodb_timeout)
            .await
            .map_err(|e| anyhow::anyhow!("MONGODB_URI: {}", redact_url_error(&e.to_string(), &uri)))
    }

    /// Status of projections from MongoDB checkpoints and Kafka watermarks.
    pub fn status_probe(&self, store: &Store) -> anyhow::Result<StatusProbe> {
        Ok(StatusProbe::new(
            store.clone(),
            self.kafka()?,
            &self.topics,
            self.stall_after,
        )?)
    }

    /// The cache, unless disabled with `--redis-url none`.
    /// The cache a command that writes read models must announce its writes
    /// to. Without one (`REDIS_URL=none`) the API's cached answers would go
    /// stale for their TTL, so that needs `--no-cache-invalidation`.
    pub fn invalidated_cache(&self, ttl: Duration, deliberately_without: bool) -> anyhow::Result<Option<Cache>> {
        if deliberately_without {
            tracing::warn!("--no-cache-invalidation: API answers are fresh only within the cache TTL.");
            return Ok(None);
        }
        match self.cache(ttl)? {
            Some(cache) => Ok(Some(cache)),
            None => anyhow::bail!(
                "REDIS_URL=none: this command would write without invalidating the API's cache, whose answers \
                 would then stay stale for up to their TTL; give it the API's REDIS_URL and COURSEVIEW_REDIS_PREFIX, \
                 or pass --no-cache-invalidation (COURSEVIEW_NO_CACHE_INVALIDATION=true) if no API caches"
            ),
        }
    }

    pub fn cache(&self, ttl: Duration) -> anyhow::Result<Option<Cache>> {
        let url = self.redis_url()?;
        if url == "none" {
            return Ok(None);
        }
        let read = |what: &str, path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
        };
        let tls = RedisTls {
            ca: self
                .redis_ca_file
                .as_ref()
                .map(|p| read("REDIS_CA_FILE", p))
                .transpose()?,
            client: match (&self.redis_cert_file, &self.redis_key_file) {
                (Some(cert), Some(key)) => Some((read("REDIS_CERT_FILE", cert)?, read("REDIS_KEY_FILE", key)?)),
                _ => None,
            },
        };
        if (tls.ca.is_some() || tls.client.is_some()) && !url.starts_with("rediss://") {
            anyhow::bail!("REDIS_CA_FILE / REDIS_CERT_FILE are for TLS: REDIS_URL must start with rediss://");
        }
        let cache = Cache::with_tls(&url, &tls, &self.redis_prefix, self.redis_timeout, ttl)
            .map_err(|e| anyhow::anyhow!("REDIS_URL: {}", redact_url_error(&e.to_string(), &url)))?;
        Ok(Some(cache))
    }
}

/// An error about a URL, without the URL (it may hold a password).
fn redact_url_error(error: &str, url: &str) -> String {
    if url.is_empty() {
        error.to_owned()
    } else {
        error.replace(url, "<the URL>")
    }
}

/// Parses `250ms`, `2s`, `1m`, or a bare number of seconds.
pub fn humantime_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 250ms, 2s or 1m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(humantime_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(humantime_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(humantime_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(humantime_duration("soon").is_err());
    }

    #[test]
    fn topics_given_after_the_subcommand_are_the_ones_used() {
        for args in [
            ["courseview", "project", "catalog", "--topics", "^x$"],
            ["courseview", "rebuild", "catalog", "--topics", "^x$"],
            ["courseview", "--topics", "^x$", "project", "catalog"],
        ] {
            let cli = Cli::try_parse_from(args).expect("parses");
            assert_eq!(cli.global.topics, "^x$", "{args:?}");
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
