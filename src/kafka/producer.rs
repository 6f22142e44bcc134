//! A producer for the demo, the benchmarks and the tests.

use super::*;

/// A producer for the demo, the benchmarks and the tests.
#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer<Reporting>,
    report: Arc<ConnectionReport>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Producer")
    }
}

/// One record to produce.
#[derive(Debug, Clone, Default)]
pub struct Outgoing {
    pub topic: String,
    pub key: Option<String>,
    pub value: Option<String>,
    pub headers: Vec<(String, String)>,
    /// Headers whose key need not be UTF-8 (for fault tests: Kafka allows
    /// any bytes there, and so must courseview).
    pub raw_headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// The record's CreateTime in epoch ms; None: the time of sending.
    pub timestamp: Option<i64>,
}

impl Producer {
    pub fn new(brokers: impl Into<KafkaConnection>) -> Result<Producer, KafkaClientError> {
        let brokers = brokers.into();
        let mut config = brokers.config();
        config.set("linger.ms", "5").set("acks", "all");
        let report = brokers.report();
        let inner = brokers
            .finish(&mut config)
            .create_with_context(Reporting(Arc::clone(&report)))?;
        Ok(Producer { inner, report })
    }

    /// Sends and waits for the broker's acknowledgement.
    pub async fn send(&self, record: &Outgoing) -> Result<(i32, i64), KafkaClientError> {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &record.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        for (key, value) in &record.raw_headers {
            add_raw_header(&headers, key, value);
        }
        let mut future = FutureRecord::to(&record.topic).headers(headers);
        if let Some(key) = &record.key {
            future = future.key(key.as_bytes());
        }
        if let Some(value) = &record.value {
            future = future.payload(value.as_bytes());
        }
        if let Some(timestamp) = record.timestamp {
            future = future.timestamp(timestamp);
        }
        let delivery = self
            .inner
            .send(future, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| self.report.explain(e))?;
        self.report.recovered();
        Ok((delivery.partition, delivery.offset))
    }
}

/// Adds a header with any key bytes; rdkafka's `Header` only takes `&str`.
#[allow(unsafe_code)]
fn add_raw_header(headers: &OwnedHeaders, key: &[u8], value: &[u8]) {
    let native = std::ptr::from_ref(headers.as_borrowed())
        .cast::<rdkafka::types::RDKafkaHeaders>()
        .cast_mut();
    // An empty slice's pointer dangles; C's memcpy wants a real one even
    // for zero bytes.
    let one = [0_u8; 1];
    let ptr = |b: &[u8]| if b.is_empty() { one.as_ptr() } else { b.as_ptr() };
    // SAFETY: `headers` is ours and not yet handed to librdkafka; its
    // borrowed view is the `rd_kafka_headers_t` itself (see `raw_headers`).
    // librdkafka copies `key` and `value` (lengths given, no NUL needed),
    // and both pointers are valid for their lengths.
    unsafe {
        rdkafka::bindings::rd_kafka_header_add(
            native,
            ptr(key).cast(),
            key.len() as isize,
            ptr(value).cast(),
            value.len() as isize,
        );
    }
}
