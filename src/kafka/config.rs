//! How every Kafka client courseview creates reaches the cluster: the
//! bootstrap servers and the client properties users give (a properties
//! file, `-X key=value`, the environment, first-class flags), checked once
//! at start.
//!
//! The properties are librdkafka's (`security.protocol`, `sasl.mechanism`,
//! `ssl.ca.location`, …), as `kcat -F` and Kafka's `--command-config`
//! files spell them. Properties courseview sets for correctness are
//! refused; secrets never appear in `Debug`, logs or errors.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rdkafka::ClientConfig;

use super::report::ConnectionReport;

/// Properties courseview sets itself because its guarantees rest on them,
/// each with the reason a user may not change it.
const RESERVED: &[(&str, &str)] = &[
    ("bootstrap.servers", "set it with --kafka-brokers (KAFKA_BROKERS)"),
    (
        "metadata.broker.list",
        "set the brokers with --kafka-brokers (KAFKA_BROKERS)",
    ),
    (
        "group.id",
        "each projection's consumer group is its name; offsets are stored in MongoDB",
    ),
    (
        "group.protocol",
        "courseview's rebalance callback needs the classic group protocol",
    ),
    (
        "group.instance.id",
        "static membership would keep a dead worker's partitions assigned",
    ),
    (
        "enable.auto.commit",
        "offsets are stored in MongoDB with the writes they cover",
    ),
    (
        "enable.auto.offset.store",
        "offsets are stored in MongoDB with the writes they cover",
    ),
    (
        "auto.offset.reset",
        "a gap in the log is detected and reported, never skipped by a reset",
    ),
    (
        "isolation.level",
        "aborted transactions must never be applied (read_committed)",
    ),
    ("enable.partition.eof", "courseview's consumers rely on its setting"),
    (
        "partition.assignment.strategy",
        "the eager rebalance callback assigns at stored offsets",
    ),
    ("transactional.id", "courseview's producers are not transactional"),
    ("acks", ACKS),
    ("request.required.acks", ACKS),
    ("api.version.request", API_VERSIONS),
    ("broker.version.fallback", API_VERSIONS),
    ("api.version.fallback.ms", API_VERSIONS),
    (
        "check.crcs",
        "librdkafka skips a batch that fails its CRC check and delivers the next, so later offsets would be stored past it",
    ),
];

const API_VERSIONS: &str = "without the broker's API versions librdkafka may fetch without an isolation level \
     (Fetch below v4), and would apply aborted transactions";

/// `fetch.max.bytes` of courseview's consumers; librdkafka refuses a
/// `receive.message.max.bytes` below it plus 512 when the consumer is
/// created, so `PropertiesBuilder::build` checks the pair at start.
pub(super) const FETCH_MAX_BYTES: i64 = 2_097_152;

const ACKS: &str = "a produced record counts as sent once every in-sync replica has it";

/// What librdkafka holds for each reserved property while a user's
/// property is checked: a user's property that changes any of them is an
/// alias or a `topic.` form of it (librdkafka strips that prefix), refused
/// like the name itself.
const SENTINELS: &[(&str, &str)] = &[
    ("bootstrap.servers", "sentinel:1"),
    ("group.id", "sentinel"),
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("auto.offset.reset", "error"),
    ("isolation.level", "read_committed"),
    ("enable.partition.eof", "false"),
    ("partition.assignment.strategy", "range,roundrobin"),
    ("acks", "all"),
    ("api.version.request", "true"),
    ("broker.version.fallback", "0.10.0"),
    ("api.version.fallback.ms", "0"),
    ("check.crcs", "false"),
];

/// Whether a property's value must never be shown.
pub fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("password")
        || key.contains("secret")
        || key.contains("passphrase")
        || key.contains("private.key")
        || key == "sasl.oauthbearer.config"
        || key == "ssl.key.pem"
        || key == "ssl_key"
}

/// A setting that stops the process at start; it names the property and
/// where it came from, never a secret's value.
#[derive(Debug, thiserror::Error)]
pub enum KafkaConfigError {
    #[error("Kafka client property {key:?} ({source_name}) is set by courseview: {reason}")]
    Reserved {
        key: String,
        source_name: String,
        reason: &'static str,
    },
    #[error("Kafka client property {key:?} ({source_name}) sets {reserved:?}, which courseview sets: {reason}")]
    Alias {
        key: String,
        source_name: String,
        reserved: &'static str,
        reason: &'static str,
    },
    #[error("Kafka client property {key:?} is given twice: by {first} and by {second}")]
    Twice { key: String, first: String, second: String },
    #[error("{source_name}: {problem}")]
    Malformed { source_name: String, problem: String },
    #[error("Kafka client property {key:?} ({source_name}): {problem}")]
    Refused {
        key: String,
        source_name: String,
        problem: String,
    },
    #[error("cannot read {what} {path}: {error}")]
    File {
        what: &'static str,
        path: String,
        error: std::io::Error,
    },
}

/// One client property and where it was given (for error messages).
#[derive(Clone)]
struct Property {
    key: String,
    value: String,
    source: String,
}

impl fmt::Debug for Property {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = if is_secret(&self.key) {
            "[redacted]"
        } else {
            &self.value
        };
        write!(f, "{}={shown} ({})", self.key, self.source)
    }
}

/// Where the Kafka cluster is and the extra client properties every client
/// gets; cheap to clone.
#[derive(Clone)]
pub struct KafkaConnection {
    servers: String,
    properties: Arc<Vec<Property>>,
    /// Shared by every client made from this connection, so a process
    /// says a failure to get in once, not once per client.
    report: Arc<ConnectionReport>,
}

impl fmt::Debug for KafkaConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConnection")
            .field("servers", &self.servers)
            .field("properties", &self.properties)
            .finish()
    }
}

impl From<&str> for KafkaConnection {
    fn from(servers: &str) -> Self {
        KafkaConnection {
            servers: servers.to_owned(),
            properties: Arc::default(),
            report: ConnectionReport::new(),
        }
    }
}

impl From<&String> for KafkaConnection {
    fn from(servers: &String) -> Self {
        servers.as_str().into()
    }
}

impl From<String> for KafkaConnection {
    fn from(servers: String) -> Self {
        servers.as_str().into()
    }
}

impl From<&KafkaConnection> for KafkaConnection {
    fn from(connection: &KafkaConnection) -> Self {
        connection.clone()
    }
}

/// Collects properties from their sources, in order; a property given by
/// two sources is an error, so none silently wins.
#[derive(Debug, Default)]
pub struct PropertiesBuilder {
    properties: Vec<Property>,
}

impl PropertiesBuilder {
    /// One property from `source` (a flag's name, `-X`, a file and line).
    pub fn set(&mut self, key: &str, value: &str, source: &str) -> Result<&mut Self, KafkaConfigError> {
        let key = key.trim();
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            // Not the text itself: a line like `sasl.password: a=b` would
            // show part of the secret.
            return Err(KafkaConfigError::Malformed {
                source_name: source.to_owned(),
                problem: "not a client property name before '='".into(),
            });
        }
        // librdkafka takes `topic.<name>` for a topic-level `<name>`.
        let canonical = key.strip_prefix("topic.").unwrap_or(key);
        if let Some((_, reason)) = RESERVED.iter().find(|(k, _)| *k == canonical) {
            return Err(KafkaConfigError::Reserved {
                key: key.to_owned(),
                source_name: source.to_owned(),
                reason,
            });
        }
        if let Some(first) = self
            .properties
            .iter()
            .find(|p| p.key.strip_prefix("topic.").unwrap_or(&p.key) == canonical)
        {
            return Err(KafkaConfigError::Twice {
                key: key.to_owned(),
                first: first.source.clone(),
                second: source.to_owned(),
            });
        }
        self.properties.push(Property {
            key: key.to_owned(),
            value: value.to_owned(),
            source: source.to_owned(),
        });
        Ok(self)
    }

    /// `key=value` (as `-X` takes it).
    pub fn assignment(&mut self, assignment: &str, source: &str) -> Result<&mut Self, KafkaConfigError> {
        let Some((key, value)) = assignment.split_once('=') else {
            return Err(KafkaConfigError::Malformed {
                source_name: source.to_owned(),
                problem: "expected key=value".into(),
            });
        };
        self.set(key, value.trim(), source)
    }

    /// The lines of a properties file: `key=value`, blank lines and
    /// comments (`#`, `!`) allowed. A bad line is named by its number, not
    /// its text (it may hold a secret).
    pub fn file_text(&mut self, text: &str, path: &str) -> Result<&mut Self, KafkaConfigError> {
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
                continue;
            }
            self.assignment(line, &format!("{path} line {}", n + 1))?;
        }
        Ok(self)
    }

    /// A properties file.
    pub fn file(&mut self, path: &Path) -> Result<&mut Self, KafkaConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| KafkaConfigError::File {
            what: "the Kafka client properties file",
            path: path.display().to_string(),
            error,
        })?;
        self.file_text(&text, &path.display().to_string())
    }

    /// Every `COURSEVIEW_KAFKA_X_<NAME>` variable, `<NAME>` lowercased with
    /// `_` for `.` (`COURSEVIEW_KAFKA_X_SSL_CA_LOCATION` is
    /// `ssl.ca.location`): properties for containers.
    pub fn environment(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<&mut Self, KafkaConfigError> {
        let mut vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        vars.sort();
        for (name, value) in vars {
            let key = name[ENV_PREFIX.len()..].to_ascii_lowercase().replace('_', ".");
            self.set(&key, &value, &name)?;
        }
        Ok(self)
    }

    /// Checks every property against librdkafka (an unknown name or a bad
    /// value is an error naming it) and builds the connection.
    pub fn build(self, servers: &str) -> Result<KafkaConnection, KafkaConfigError> {
        let mut sentinels = ClientConfig::new();
        for (k, v) in SENTINELS {
            sentinels.set(*k, *v);
        }
        let baseline: Vec<Option<String>> = match sentinels.create_native_config() {
            Ok(native) => SENTINELS.iter().map(|(k, _)| native.get(k).ok()).collect(),
            Err(_) => vec![None; SENTINELS.len()],
        };
        for p in &self.properties {
            let mut config = sentinels.clone();
            config.set(&p.key, &p.value);
            let native = config.create_native_config();
            if let Ok(native) = &native {
                for ((reserved, _), before) in SENTINELS.iter().zip(&baseline) {
                    if native.get(reserved).ok() != *before {
                        let reason = RESERVED.iter().find(|(k, _)| k == reserved).map_or("", |(_, r)| *r);
                        return Err(KafkaConfigError::Alias {
                            key: p.key.clone(),
                            source_name: p.source.clone(),
                            reserved,
                            reason,
                        });
                    }
                }
            }
            if let Err(e) = native {
                let problem = match e {
                    // librdkafka's text may quote the value.
                    _ if is_secret(&p.key) => "librdkafka refused it (the value is a secret, not shown)".to_owned(),
                    rdkafka::error::KafkaError::ClientConfig(_, description, _, _) => description,
                    other => other.to_string(),
                };
                return Err(KafkaConfigError::Refused {
                    key: p.key.clone(),
                    source_name: p.source.clone(),
                    problem,
                });
            }
        }
        self.check_receive_limit()?;
        Ok(KafkaConnection {
            servers: servers.to_owned(),
            properties: Arc::new(self.properties),
            report: ConnectionReport::new(),
        })
    }
}

impl PropertiesBuilder {
    /// librdkafka checks `receive.message.max.bytes` against
    /// `fetch.max.bytes` only when a consumer is created, long after start:
    /// check the pair here, with courseview's fetch size where the user
    /// gave none.
    fn check_receive_limit(&self) -> Result<(), KafkaConfigError> {
        let given = |key: &str| self.properties.iter().find(|p| p.key == key);
        let number = |p: &Property| {
            p.value.trim().parse::<i64>().map_err(|_| KafkaConfigError::Refused {
                key: p.key.clone(),
                source_name: p.source.clone(),
                problem: "not a number of bytes".into(),
            })
        };
        // Unset, librdkafka raises it to fit the fetch size itself.
        let Some(limit) = given("receive.message.max.bytes") else {
            return Ok(());
        };
        let fetch = given("fetch.max.bytes")
            .map(number)
            .transpose()?
            .unwrap_or(FETCH_MAX_BYTES);
        let (receive, source) = (number(limit)?, limit.source.clone());
        if receive < fetch + 512 {
            return Err(KafkaConfigError::Refused {
                key: "receive.message.max.bytes".into(),
                source_name: source,
                problem: format!(
                    "{receive} is below fetch.max.bytes ({fetch}) + 512, which librdkafka requires of a consumer; raise it or lower fetch.max.bytes"
                ),
            });
        }
        Ok(())
    }
}

/// The environment variables that carry client properties.
pub const ENV_PREFIX: &str = "COURSEVIEW_KAFKA_X_";

impl KafkaConnection {
    /// The bootstrap servers.
    pub fn servers(&self) -> &str {
        &self.servers
    }

    /// What the clients of this connection have found on the way in.
    pub fn report(&self) -> Arc<ConnectionReport> {
        Arc::clone(&self.report)
    }

    /// A client configuration with the bootstrap servers; pass it through
    /// [`KafkaConnection::finish`] after courseview's own settings.
    pub fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.servers);
        config
    }

    /// Adds the user's properties last, so they win over courseview's
    /// tuning (reserved properties never got this far).
    pub fn finish<'a>(&self, config: &'a mut ClientConfig) -> &'a mut ClientConfig {
        for p in self.properties.iter() {
            config.set(&p.key, &p.value);
        }
        // librdkafka's OpenSSL is built in: without a CA given, look for the
        // system's bundle where distributions keep it (managed clusters
        // present certificates of public CAs).
        let tls = self
            .property("security.protocol")
            .is_some_and(|p| p.eq_ignore_ascii_case("ssl") || p.eq_ignore_ascii_case("sasl_ssl"));
        if tls && self.property("ssl.ca.location").is_none() && self.property("ssl.ca.pem").is_none() {
            config.set("ssl.ca.location", "probe");
        }
        config
    }

    /// A property the user gave, if any.
    pub fn property(&self, key: &str) -> Option<&str> {
        self.properties.iter().find(|p| p.key == key).map(|p| p.value.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_properties_file_takes_comments_and_blank_lines() {
        let mut b = PropertiesBuilder::default();
        b.file_text(
            "# managed Kafka\n\nsecurity.protocol=SASL_SSL\n! old style\nsasl.mechanism = SCRAM-SHA-512\n",
            "kafka.properties",
        )
        .expect("parses");
        let c = b.build("b:9092").expect("valid");
        assert_eq!(c.property("security.protocol"), Some("SASL_SSL"));
        assert_eq!(c.property("sasl.mechanism"), Some("SCRAM-SHA-512"));
    }

    #[test]
    fn a_property_courseview_sets_for_correctness_is_refused_with_the_reason() {
        for key in ["enable.auto.commit", "isolation.level", "group.id", "auto.offset.reset"] {
            let mut b = PropertiesBuilder::default();
            let e = b.assignment(&format!("{key}=x"), "-X").expect_err("refused");
            let text = e.to_string();
            assert!(text.contains(key) && text.contains("set by courseview"), "{text}");
        }
    }

    #[test]
    fn an_alias_or_topic_form_of_a_reserved_property_is_refused_too() {
        for (assignment, reserved) in [
            ("topic.auto.offset.reset=earliest", "auto.offset.reset"),
            ("request.required.acks=1", "acks"),
            ("topic.acks=1", "acks"),
            ("topic.isolation.level=read_uncommitted", "isolation.level"),
        ] {
            let mut b = PropertiesBuilder::default();
            let text = match b.assignment(assignment, "-X") {
                Err(e) => e.to_string(),
                Ok(b) => std::mem::take(b).build("b:9092").expect_err("an alias").to_string(),
            };
            assert!(text.contains(reserved), "{assignment}: {text}");
        }
        let mut b = PropertiesBuilder::default();
        b.assignment("fetch.wait.max.ms=100", "-X").expect("well formed");
        b.build("b:9092").expect("tuning is the user's");
    }

    #[test]
    fn properties_that_would_apply_aborted_or_corrupt_batches_are_refused_with_the_reason() {
        for (assignment, named, reason) in [
            (
                "api.version.request=false",
                "api.version.request",
                "aborted transactions",
            ),
            (
                "broker.version.fallback=0.9.0",
                "broker.version.fallback",
                "aborted transactions",
            ),
            (
                "api.version.fallback.ms=60000",
                "api.version.fallback.ms",
                "aborted transactions",
            ),
            ("check.crcs=true", "check.crcs", "skips a batch"),
        ] {
            let mut b = PropertiesBuilder::default();
            let text = match b.assignment(assignment, "-X") {
                Err(e) => e.to_string(),
                Ok(b) => std::mem::take(b).build("b:9092").expect_err("refused").to_string(),
            };
            assert!(text.contains(named) && text.contains(reason), "{assignment}: {text}");
        }
    }

    #[test]
    fn a_receive_limit_below_the_fetch_size_is_refused_at_start_not_at_subscribe() {
        let refused = |lines: &[&str]| {
            let mut b = PropertiesBuilder::default();
            for line in lines {
                b.assignment(line, "-X").expect("well formed");
            }
            b.build("b:9092").err().map(|e| e.to_string())
        };
        let text = refused(&["receive.message.max.bytes=1000000"]).expect("below courseview's 2 MiB fetch");
        assert!(
            text.contains("receive.message.max.bytes") && text.contains("2097152"),
            "{text}"
        );
        let text = refused(&["receive.message.max.bytes=100000", "fetch.max.bytes=99800"]).expect("below + 512");
        assert!(text.contains("fetch.max.bytes (99800)"), "{text}");
        assert_eq!(
            refused(&["receive.message.max.bytes=2097664"]),
            None,
            "exactly fetch + 512"
        );
        assert_eq!(
            refused(&["fetch.max.bytes=200000000"]),
            None,
            "librdkafka raises an unset limit itself"
        );
        assert!(
            refused(&["receive.message.max.bytes=lots"]).is_some_and(|t| t.contains("receive.message.max.bytes")),
            "not a number"
        );
    }

    #[test]
    fn an_unknown_property_is_an_error_naming_it() {
        let mut b = PropertiesBuilder::default();
        b.assignment("sasl.mechansim=PLAIN", "-X").expect("well formed");
        let text = b.build("b:9092").expect_err("unknown").to_string();
        assert!(text.contains("sasl.mechansim"), "{text}");
    }

    #[test]
    fn a_malformed_line_is_named_by_number_not_by_its_text() {
        let mut b = PropertiesBuilder::default();
        let text = b
            .file_text("security.protocol=SSL\nhunter2-no-equals\n", "k.properties")
            .expect_err("malformed")
            .to_string();
        assert!(text.contains("k.properties line 2"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn the_properties_librdkafka_calls_sensitive_are_secrets() {
        for key in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
            "sasl.oauthbearer.assertion.private.key.passphrase",
            "sasl.oauthbearer.assertion.private.key.pem",
        ] {
            assert!(is_secret(key), "{key}");
        }
        assert!(!is_secret("sasl.username"));
    }

    #[test]
    fn a_secret_never_shows_in_debug_or_errors() {
        let mut b = PropertiesBuilder::default();
        b.assignment("sasl.password=hunter2", "-X").expect("ok");
        let c = b.build("b:9092").expect("valid");
        assert!(!format!("{c:?}").contains("hunter2"));
        // A bad value of a secret property: librdkafka's text is not shown.
        let mut b = PropertiesBuilder::default();
        b.assignment("ssl.key.password=", "-X").expect("ok");
        let mut b2 = PropertiesBuilder::default();
        b2.assignment("sasl.oauthbearer.client.secret=hunter2", "-X")
            .expect("ok");
        for built in [b.build("b:9092"), b2.build("b:9092")] {
            if let Err(e) = built {
                assert!(!e.to_string().contains("hunter2"), "{e}");
            }
        }
        let twice = {
            let mut b = PropertiesBuilder::default();
            b.set("sasl.password", "hunter2", "--kafka-password").expect("ok");
            b.set("sasl.password", "hunter3", "-X").expect_err("twice").to_string()
        };
        assert!(!twice.contains("hunter"), "{twice}");
    }

    #[test]
    fn environment_variables_name_properties_with_underscores_for_dots() {
        let mut b = PropertiesBuilder::default();
        b.environment([
            ("COURSEVIEW_KAFKA_X_SSL_CA_LOCATION".to_owned(), "/ca.pem".to_owned()),
            ("UNRELATED".to_owned(), "x".to_owned()),
        ])
        .expect("ok");
        let c = b.build("b:9092").expect("valid");
        assert_eq!(c.property("ssl.ca.location"), Some("/ca.pem"));
    }

    #[test]
    fn a_property_given_twice_is_an_error_naming_both_places() {
        let mut b = PropertiesBuilder::default();
        b.set("sasl.username", "a", "--kafka-username").expect("ok");
        let text = b.assignment("sasl.username=b", "-X").expect_err("twice").to_string();
        assert!(text.contains("--kafka-username") && text.contains("-X"), "{text}");
    }
}
