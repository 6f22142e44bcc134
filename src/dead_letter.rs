//! Dead letters: records that could not be decoded or applied, kept whole
//! (topic, partition, offset, key, raw value, headers, error) so they can be
//! listed and replayed.

use serde::{Deserialize, Serialize};

use crate::record::Record;

/// One record that could not be decoded or applied.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub projection: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<String>,
    #[serde(default)]
    pub headers: Vec<(String, Option<String>)>,
    pub timestamp: Option<i64>,
    pub error: String,
    /// When it was stored; set by the store.
    #[serde(default, skip_serializing)]
    pub dead_at: Option<bson::DateTime>,
}

impl DeadLetter {
    /// Keeps the record as text (lossy only for non-UTF-8 bytes, which no
    /// JSON event can contain anyway).
    pub fn new(projection: &str, record: &Record, error: &str) -> Self {
        let text = |b: &Option<Vec<u8>>| b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
        DeadLetter {
            projection: projection.to_owned(),
            topic: record.topic.clone(),
            partition: record.partition,
            offset: record.offset,
            key: text(&record.key),
            value: text(&record.value),
            headers: record.headers.iter().map(|(k, v)| (k.clone(), text(v))).collect(),
            timestamp: record.timestamp,
            error: error.to_owned(),
            dead_at: None,
        }
    }

    /// Stable id, so that a batch replayed after a crash stores it once.
    pub fn id(&self) -> String {
        format!("{}/{}/{}/{}", self.projection, self.topic, self.partition, self.offset)
    }

    /// The record as it was consumed, for replay.
    pub fn to_record(&self) -> Record {
        let bytes = |s: &Option<String>| s.as_ref().map(|s| s.as_bytes().to_vec());
        Record {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            key: bytes(&self.key),
            value: bytes(&self.value),
            headers: self.headers.iter().map(|(k, v)| (k.clone(), bytes(v))).collect(),
            timestamp: self.timestamp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_gives_back_the_record_it_was_made_from() {
        let record = Record {
            topic: "CourseCreatedEvent".into(),
            partition: 1,
            offset: 7,
            key: Some(b"c-1".to_vec()),
            value: Some(b"{oops".to_vec()),
            headers: vec![("id".into(), Some(b"e".to_vec())), ("empty".into(), None)],
            timestamp: Some(5),
        };
        let letter = DeadLetter::new("catalog", &record, "bad");
        assert_eq!(letter.to_record(), record);
        assert_eq!(letter.id(), "catalog/CourseCreatedEvent/1/7");
    }
}
