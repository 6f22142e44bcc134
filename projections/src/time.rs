//! Times as the API shows them: RFC 3339, UTC, millisecond precision. A fixed
//! width means the text sorts like the instant it names.

use chrono::{DateTime, SecondsFormat};
use serde::Serializer;

use crate::event::Millis;

/// Formats epoch milliseconds as e.g. `2026-11-21T09:30:00.123Z`.
pub fn format(ms: Millis) -> String {
    DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub(crate) fn rfc3339<S: Serializer>(ms: &Millis, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*ms))
}

pub(crate) fn rfc3339_opt<S: Serializer>(ms: &Option<Millis>, s: S) -> Result<S::Ok, S::Error> {
    match ms {
        Some(ms) => s.serialize_str(&format(*ms)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc_with_milliseconds() {
        assert_eq!(super::format(1_763_717_400_123), "2025-11-21T09:30:00.123Z");
    }
}
