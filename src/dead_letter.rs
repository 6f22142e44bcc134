//! Dead letters: records that could not be decoded or applied, kept whole
//! (topic, partition, offset, key, raw value, headers, error) so they can be
//! listed and replayed.
//!
//! Bytes stay bytes (BSON binary): a record with a non-UTF-8 key or header is
//! exactly the kind that ends here, and a lossy copy could not be replayed.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::kafka::{Gap, GapKind};
use crate::record::Record;

/// How much of an oversized record a dead letter keeps. The whole record
/// stays in Kafka at the letter's topic/partition/offset.
pub const OVERSIZED_PREFIX: usize = 64 * 1024;

/// One header, as raw bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadHeader {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
}

/// One record that could not be decoded or applied.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub projection: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    // Defaults: a query may leave the bytes out (comparing positions only).
    #[serde(default, with = "serde_bytes")]
    pub key: Option<Vec<u8>>,
    #[serde(default, with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    #[serde(default)]
    pub headers: Vec<DeadHeader>,
    pub timestamp: Option<i64>,
    pub error: String,
    /// Set when the record was over the size limit: its size in bytes. The
    /// letter then keeps only the first bytes of key and value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated_from: Option<i64>,
    /// When it was stored; set by the store.
    #[serde(skip)]
    pub dead_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Set when the letter is not a record but a gap in the log: events
    /// the projection can never read (`offset` is its stored offset then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap: Option<GapLetter>,
    /// The generation that could not apply it (absent in letters written
    /// before generations were recorded): each generation keeps its own,
    /// so a rebuild can tell what it lost against the serving one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u32>,
}

/// The part of a dead letter that says which gap it is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GapLetter {
    pub kind: GapKind,
    /// The generation whose stored offset it was: a rebuild clears it.
    pub generation: u32,
    /// The partition's watermarks when the gap was found.
    pub low_watermark: i64,
    pub high_watermark: i64,
}

impl DeadLetter {
    /// Keeps the record byte for byte.
    pub fn new(projection: &str, record: &Record, error: &str) -> Self {
        DeadLetter {
            projection: projection.to_owned(),
            topic: record.topic.clone(),
            partition: record.partition,
            offset: record.offset,
            key: record.key.clone(),
            value: record.value.clone(),
            headers: record
                .headers
                .iter()
                .map(|(k, v)| DeadHeader {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            timestamp: record.timestamp,
            error: error.to_owned(),
            truncated_from: None,
            dead_at: None,
            gap: None,
            generation: None,
        }
    }

    /// A gap in the log of generation `generation`, as a letter of its own kind.
    pub fn gap(projection: &str, generation: u32, gap: &Gap) -> Self {
        let mut letter = DeadLetter::new(projection, &Record::default(), &gap.describe());
        letter.topic.clone_from(&gap.topic);
        letter.partition = gap.partition;
        letter.offset = gap.stored;
        letter.generation = Some(generation);
        letter.gap = Some(GapLetter {
            kind: gap.kind,
            generation,
            low_watermark: gap.low,
            high_watermark: gap.high,
        });
        letter
    }

    /// A record over the size limit: its first bytes, so the letter itself
    /// always fits in one MongoDB document.
    pub fn oversized(projection: &str, record: &Record, error: &str) -> Self {
        let prefix = |b: &Option<Vec<u8>>| b.as_ref().map(|b| b[..b.len().min(OVERSIZED_PREFIX)].to_vec());
        let mut letter = DeadLetter::new(projection, &Record::default(), error);
        letter.topic.clone_from(&record.topic);
        letter.partition = record.partition;
        letter.offset = record.offset;
        letter.timestamp = record.timestamp;
        letter.key = prefix(&record.key);
        letter.value = prefix(&record.value);
        letter.headers = record
            .headers
            .iter()
            .take(64)
            .map(|(k, v)| DeadHeader {
                key: k[..k.len().min(256)].to_vec(),
                value: prefix(v).map(|mut v| {
                    v.truncate(1024);
                    v
                }),
            })
            .collect();
        letter.truncated_from = Some(i64::try_from(record.size()).unwrap_or(i64::MAX));
        letter
    }

    /// The letter as written by generation `generation`.
    #[must_use]
    pub fn of_generation(mut self, generation: u32) -> Self {
        self.generation = Some(generation);
        self
    }

    /// Stable id, so that a batch replayed after a crash stores it once.
    pub fn id(&self) -> String {
        let record = format!("{}/{}/{}/{}", self.projection, self.topic, self.partition, self.offset);
        match (&self.gap, self.generation) {
            // Found again at every assignment; recorded once.
            (Some(g), _) => format!("{record}/{}-g{}", g.kind.name(), g.generation),
            (None, Some(generation)) => {
                Self::record_id(&self.projection, generation, &self.topic, self.partition, self.offset)
            }
            (None, None) => record,
        }
    }

    /// The id of a record's letter written by `generation`.
    pub fn record_id(projection: &str, generation: u32, topic: &str, partition: i32, offset: i64) -> String {
        format!("{projection}/g{generation}/{topic}/{partition}/{offset}")
    }

    /// The id a letter of this record had before letters carried their
    /// generation.
    pub fn unversioned_id(projection: &str, topic: &str, partition: i32, offset: i64) -> String {
        format!("{projection}/{topic}/{partition}/{offset}")
    }

    /// The record as it was consumed, for replay; `None` when the letter
    /// keeps only a prefix of it.
    pub fn to_record(&self) -> Option<Record> {
        if self.truncated_from.is_some() || self.gap.is_some() {
            return None;
        }
        Some(Record {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            key: self.key.clone(),
            value: self.value.clone(),
            headers: self.headers.iter().map(|h| (h.key.clone(), h.value.clone())).collect(),
            timestamp: self.timestamp,
        })
    }

    /// JSON for people and tools: bytes as text when they are UTF-8, else
    /// as `{"base64": …}`.
    pub fn to_json(&self, id: &str) -> Value {
        fn bytes(b: &[u8]) -> Value {
            match std::str::from_utf8(b) {
                Ok(text) => Value::String(text.to_owned()),
                Err(_) => {
                    use base64::Engine as _;
                    json!({"base64": base64::engine::general_purpose::STANDARD.encode(b)})
                }
            }
        }
        let opt = |b: &Option<Vec<u8>>| b.as_deref().map_or(Value::Null, bytes);
        json!({
            "id": id,
            "projection": self.projection,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": opt(&self.key),
            "value": opt(&self.value),
            "headers": self.headers.iter().map(|h| json!([bytes(&h.key), opt(&h.value)])).collect::<Vec<_>>(),
            "timestamp": self.timestamp,
            "error": self.error,
            "truncatedFrom": self.truncated_from,
            "generation": self.generation,
            "gap": self.gap.as_ref().map(|g| json!({
                "kind": g.kind,
                "generation": g.generation,
                "lowWatermark": g.low_watermark,
                "highWatermark": g.high_watermark,
            })),
            "deadAt": self.dead_at.map(|d| d.timestamp_millis()),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A record with bytes no text type could keep.
    pub(crate) fn poison() -> Record {
        Record {
            topic: "CourseCreatedEvent".into(),
            partition: 1,
            offset: 7,
            key: Some(vec![0xff, b'k']),
            value: Some(b"{oops\xfe".to_vec()),
            headers: vec![(b"id".to_vec(), Some(b"e".to_vec())), (vec![0xc3, 0x28], None)],
            timestamp: Some(5),
        }
    }

    #[test]
    fn a_dead_letter_is_named_by_its_record_and_shows_bytes_as_base64() {
        let record = poison();
        let letter = DeadLetter::new("catalog", &record, "bad");
        assert_eq!(letter.to_record(), Some(record));
        assert_eq!(letter.id(), "catalog/CourseCreatedEvent/1/7");
        assert_eq!(
            letter.clone().of_generation(3).id(),
            "catalog/g3/CourseCreatedEvent/1/7",
            "each generation keeps its own letter of a record"
        );
        assert_eq!(letter.to_json("x")["key"]["base64"], "/2s=");
    }

    #[test]
    fn an_oversized_record_keeps_a_prefix_and_cannot_be_replayed_from_the_letter() {
        let mut record = poison();
        record.value = Some(vec![b'a'; OVERSIZED_PREFIX * 3]);
        let letter = DeadLetter::oversized("catalog", &record, "too large");
        assert_eq!(letter.value.as_ref().map(Vec::len), Some(OVERSIZED_PREFIX));
        assert_eq!(letter.truncated_from, Some(record.size() as i64));
        assert_eq!(letter.to_record(), None);
    }
}
