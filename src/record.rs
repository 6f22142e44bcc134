//! A consumed Kafka record as owned data, so that decoding, dead letters and
//! replay need no Kafka client types.

/// One record as it was read from a topic-partition. Everything is kept as
/// raw bytes: a dead letter must hold exactly what was consumed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// Header keys as bytes: Kafka does not promise UTF-8 there.
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Create or log-append time in milliseconds since the epoch, when known.
    pub timestamp: Option<i64>,
}

/// A header that a decoder wanted to read as text but could not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotUtf8 {
    pub header: String,
}

impl Record {
    /// The first header of that name, as UTF-8 text. `Err` when its value
    /// is not UTF-8 (a poison record, never silently ignored).
    pub fn header(&self, name: &str) -> Result<Option<&str>, NotUtf8> {
        match self.headers.iter().find(|(k, _)| k == name.as_bytes()) {
            None | Some((_, None)) => Ok(None),
            Some((_, Some(v))) => std::str::from_utf8(v).map(Some).map_err(|_| NotUtf8 {
                header: name.to_owned(),
            }),
        }
    }

    /// The first header key that is not UTF-8, shown lossily.
    pub fn non_utf8_header_key(&self) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| std::str::from_utf8(k).is_err())
            .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
    }

    /// Bytes of key, value and headers: what the record size limit counts.
    pub fn size(&self) -> usize {
        let len = |b: &Option<Vec<u8>>| b.as_ref().map_or(0, Vec::len);
        len(&self.key) + len(&self.value) + self.headers.iter().map(|(k, v)| k.len() + len(v)).sum::<usize>()
    }

    /// `topic/partition/offset`, the record's identity in logs and dead letters.
    pub fn position(&self) -> String {
        format!("{}/{}/{}", self.topic, self.partition, self.offset)
    }
}
