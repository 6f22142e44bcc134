//! What librdkafka says about reaching the cluster, said once per episode.
//!
//! A wrong password or an untrusted certificate makes librdkafka retry
//! every few seconds, and each attempt logs a `FAIL` line, a global error
//! and an "all brokers down" error. Here each failure is classified
//! (authentication, TLS, connection), reported in one line when it starts or
//! changes and then once a minute while it lasts; librdkafka's own lines go
//! to debug. Nothing librdkafka reports contains a password.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tracing::{debug, error, info, warn};

/// How often a failure that lasts is reported again.
const REMIND_EVERY: Duration = Duration::from_secs(60);

/// What kind of thing failed on the way to the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// SASL: wrong user or password, a mechanism the listener does not take.
    Authentication,
    /// TLS: certificate verification, handshake, a client certificate refused.
    Tls,
    /// The brokers cannot be reached at all.
    Connection,
}

impl Failure {
    fn of(error: &KafkaError, reason: &str) -> Option<Failure> {
        let code = error.rdkafka_error_code()?;
        match code {
            RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed => {
                Some(Failure::Authentication)
            }
            RDKafkaErrorCode::SSL => Some(Failure::Tls),
            // A TLS listener dropping a plaintext client, or the reverse.
            RDKafkaErrorCode::BrokerTransportFailure if reason.contains("SSL") => Some(Failure::Tls),
            RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::Resolve => Some(Failure::Connection),
            _ => None,
        }
    }

    fn says(self) -> &'static str {
        match self {
            Failure::Authentication => "Kafka authentication failed; check the SASL mechanism, user name and password",
            Failure::Tls => "Kafka TLS failed; check the CA (--kafka-ca-file), the client certificate and the listener",
            Failure::Connection => "Kafka brokers unreachable",
        }
    }
}

/// Whether a client error is a failure to reach the cluster (which the
/// client's context reports, once per episode).
pub fn reach_failure(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::SSL
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::Resolve
        )
    )
}

/// The failure being reported, and when it was last said.
#[derive(Debug, Default)]
pub struct ConnectionReport {
    current: Mutex<Option<(Failure, Instant)>>,
    /// Whether `current` is set: `recovered` runs on every success.
    any: std::sync::atomic::AtomicBool,
}

impl ConnectionReport {
    pub fn new() -> Arc<ConnectionReport> {
        Arc::default()
    }

    /// The failure seen last, if any since the last success.
    pub fn failing(&self) -> Option<Failure> {
        self.lock().map(|(f, _)| f)
    }

    /// Something got through: the episode, if any, is over.
    pub fn recovered(&self) {
        if !self.any.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        self.any.store(false, std::sync::atomic::Ordering::Relaxed);
        let mut current = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((failure, _)) = current.take() {
            info!(?failure, "Kafka reachable again.");
        }
    }

    /// A request's error, with what kept the cluster out of reach if
    /// anything did (a time-out alone says nothing about a bad password).
    pub fn explain(&self, error: KafkaError) -> super::KafkaClientError {
        match self.failing() {
            Some(failure) => super::KafkaClientError::Request(format!("{}: {error}", failure.says())),
            None => error.into(),
        }
    }

    fn lock(&self) -> Option<(Failure, Instant)> {
        *self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A global error from librdkafka. Returns whether it was a failure to
    /// reach the cluster (reported here, once per episode).
    pub fn error(&self, error: &KafkaError, reason: &str) -> bool {
        let Some(failure) = Failure::of(error, reason) else {
            // "All brokers down" follows each of the above; alone it is a
            // connection failure too, but says nothing new.
            if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
                debug!(%error, reason, "librdkafka");
                return true;
            }
            return false;
        };
        let mut current = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let due = match *current {
            Some((seen, at)) => seen != failure || at.elapsed() >= REMIND_EVERY,
            None => true,
        };
        self.any.store(true, std::sync::atomic::Ordering::Relaxed);
        if due {
            *current = Some((failure, Instant::now()));
            drop(current);
            match failure {
                Failure::Connection => warn!(reason, "{}; retrying with backoff.", failure.says()),
                _ => error!(reason, "{}; retrying with backoff.", failure.says()),
            }
        } else {
            debug!(%error, reason, "librdkafka");
        }
        true
    }

    /// A log line from librdkafka: a connection's `FAIL` is what `error`
    /// reports; the rest keeps librdkafka's level.
    pub fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            _ if fac == "FAIL" => debug!(target: "librdkafka", fac, "{message}"),
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                error!(target: "librdkafka", fac, "{message}");
            }
            RDKafkaLogLevel::Warning => warn!(target: "librdkafka", fac, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => info!(target: "librdkafka", fac, "{message}"),
            RDKafkaLogLevel::Debug => debug!(target: "librdkafka", fac, "{message}"),
        }
    }
}

/// The context of courseview's producers, admin clients and status reader.
#[derive(Debug, Clone, Default)]
pub struct Reporting(pub Arc<ConnectionReport>);

impl ClientContext for Reporting {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.0.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if !self.0.error(&error, reason) {
            error!(%error, reason, "Kafka client error.");
        }
    }
}

impl ConsumerContext for Reporting {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classified_by_what_the_operator_must_fix() {
        let global = |code| KafkaError::Global(code);
        assert_eq!(
            Failure::of(&global(RDKafkaErrorCode::Authentication), "SASL authentication error"),
            Some(Failure::Authentication)
        );
        assert_eq!(
            Failure::of(&global(RDKafkaErrorCode::SSL), "certificate verify failed"),
            Some(Failure::Tls)
        );
        assert_eq!(
            Failure::of(&global(RDKafkaErrorCode::BrokerTransportFailure), "Connection refused"),
            Some(Failure::Connection)
        );
        assert_eq!(Failure::of(&global(RDKafkaErrorCode::MessageTimedOut), ""), None);
    }

    #[test]
    fn a_failure_is_remembered_until_something_gets_through() {
        let report = ConnectionReport::new();
        assert!(report.error(&KafkaError::Global(RDKafkaErrorCode::Authentication), "bad"));
        assert!(report.error(&KafkaError::Global(RDKafkaErrorCode::Authentication), "bad"));
        assert_eq!(report.failing(), Some(Failure::Authentication));
        report.recovered();
        assert_eq!(report.failing(), None);
    }
}
