//! The notice protocol on the cache's pub/sub channel, and the timings
//! both sides of it keep: workers announce writes and bumps, API processes
//! fence their own subscription.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// How often an API process fences its subscription.
pub const FENCE_EVERY: Duration = Duration::from_millis(100);

/// How long after a fence was sent its proof holds.
pub const TRUST: Duration = Duration::from_millis(500);

/// How long a writer's announcement holds if it never ends it (a crash).
pub const WRITE_LEASE: Duration = Duration::from_secs(30);

/// One message on the notice channel: `<kind> <who> <rest>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// An API process's fence: `from` is the process, `sent_ms` when it
    /// was sent (its own clock).
    Fence { from: String, sent_ms: u64 },
    /// A worker began writing a batch of the scope.
    WriteBegan { writer: String, scope: String },
    /// The scope's epoch was bumped, by a worker (ending its write) or by
    /// someone else.
    Bumped { writer: Option<String>, scope: String },
    /// A kind this version does not know, naming a scope: assume the worst
    /// for it.
    Unknown { scope: String },
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::Fence { from, sent_ms } => write!(f, "f {from} {sent_ms}"),
            Notice::WriteBegan { writer, scope } => write!(f, "w {writer} {scope}"),
            Notice::Bumped { writer, scope } => write!(f, "b {} {scope}", writer.as_deref().unwrap_or("-")),
            Notice::Unknown { scope } => write!(f, "? - {scope}"),
        }
    }
}

/// A message that is not a notice at all (fewer than three parts, or a
/// fence whose time is not a number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotANotice;

impl FromStr for Notice {
    type Err = NotANotice;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.splitn(3, ' ');
        let (Some(kind), Some(who), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(NotANotice);
        };
        Ok(match kind {
            "f" => Notice::Fence {
                from: who.to_owned(),
                sent_ms: rest.parse().map_err(|_| NotANotice)?,
            },
            "w" => Notice::WriteBegan {
                writer: who.to_owned(),
                scope: rest.to_owned(),
            },
            "b" => Notice::Bumped {
                writer: (who != "-").then(|| who.to_owned()),
                scope: rest.to_owned(),
            },
            _ => Notice::Unknown { scope: rest.to_owned() },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_notice_reads_back_as_it_was_written() {
        for notice in [
            Notice::Fence {
                from: "00ab".into(),
                sent_ms: 1_700_000_000_123,
            },
            Notice::WriteBegan {
                writer: "host/1/catalog".into(),
                scope: "cv:catalog:g2".into(),
            },
            Notice::Bumped {
                writer: Some("host/1/catalog".into()),
                scope: "cv:catalog:g2".into(),
            },
            Notice::Bumped {
                writer: None,
                scope: "cv:catalog:g2".into(),
            },
        ] {
            assert_eq!(notice.to_string().parse::<Notice>(), Ok(notice));
        }
    }

    #[test]
    fn an_unknown_kind_still_names_its_scope_and_garbage_is_no_notice() {
        assert_eq!(
            "z who cv:catalog:g1".parse::<Notice>(),
            Ok(Notice::Unknown {
                scope: "cv:catalog:g1".into()
            })
        );
        assert_eq!("f me soon".parse::<Notice>(), Err(NotANotice));
        assert_eq!("b".parse::<Notice>(), Err(NotANotice));
    }
}
