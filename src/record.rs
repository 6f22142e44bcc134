//! A consumed Kafka record as owned data, so that decoding, dead letters and
//! replay need no Kafka client types.

/// One record as it was read from a topic-partition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Create or log-append time in milliseconds since the epoch, when known.
    pub timestamp: Option<i64>,
}

impl Record {
    /// The first header of that name holding UTF-8 text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .find_map(|(_, v)| v.as_deref().and_then(|v| std::str::from_utf8(v).ok()))
    }

    /// `topic/partition/offset`, the record's identity in logs and dead letters.
    pub fn position(&self) -> String {
        format!("{}/{}/{}", self.topic, self.partition, self.offset)
    }
}
