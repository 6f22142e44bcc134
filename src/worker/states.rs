//! The states a worker remembers between batches, and its guess about
//! the courses it does not remember.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use courseview_projections::CourseState;

use crate::mongo::{Conflicts, DocWrite, Stored};

/// Recently written states with their revisions, least recently used
/// evicted first, bounded by bytes. A course's events live on several
/// topics and so arrive in different batches; remembering what we wrote
/// saves re-reading it. A stale entry (another worker wrote the course
/// since) is harmless: the revision guard rejects the write, and the
/// course is reloaded and reapplied.
#[derive(Debug)]
pub(super) struct StateCache {
    entries: quick_cache::sync::Cache<String, Stored, StateBytes>,
    /// Whether courses not remembered are presumed absent from the store
    /// (written as new, no load) rather than loaded first. Guessing wrong
    /// costs one refused statement and a reload, never a lost event: the
    /// write is guarded by revision 0. Learned after each first round.
    presume_absent: AtomicBool,
}

/// The states of one round's courses: those remembered, taken out of the
/// cache while in flight (a failed write must not leave a state behind
/// that the store does not have), and the ids not remembered.
#[derive(Debug, Default)]
pub(super) struct Checkout {
    pub known: HashMap<String, Stored>,
    pub missing: Vec<String>,
}

/// What a first round's guess came to: courses presumed new, and how many
/// of those the store refused (they existed after all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Guessed {
    pub presumed: usize,
    pub wrong: usize,
}

impl StateCache {
    /// Keeps about `bytes` of states (at least one byte's worth: none).
    pub fn new(bytes: u64) -> Self {
        Self::sized((bytes / 1024).max(16) as usize, bytes)
    }

    /// As [`StateCache::new`], with the number of entries expected (it
    /// decides how the cache shards its budget).
    pub fn sized(entries: usize, bytes: u64) -> Self {
        StateCache {
            entries: quick_cache::sync::Cache::with_weighter(entries, bytes.max(1), StateBytes),
            presume_absent: AtomicBool::new(true),
        }
    }

    pub fn checkout(&self, ids: &[String]) -> Checkout {
        let mut out = Checkout::default();
        for id in ids {
            match self.entries.remove(id) {
                Some((_, known)) => {
                    out.known.insert(id.clone(), known);
                }
                None => out.missing.push(id.clone()),
            }
        }
        out
    }

    /// Keeps what is now stored: the writes the store took, at their new
    /// revision, and the states the round left unchanged. Conflicted
    /// courses stay out, to be reloaded.
    pub fn commit(&self, writes: Vec<DocWrite>, unchanged: Vec<Stored>, conflicts: &Conflicts) {
        for w in writes.into_iter().filter(|w| !conflicts.contains(&w.id)) {
            self.entries.insert(
                w.id,
                Stored {
                    state: w.state,
                    rev: w.expected_rev + 1,
                },
            );
        }
        for s in unchanged {
            self.entries.insert(s.state.course_id.clone(), s);
        }
    }

    /// Whether a first round presumes courses not remembered to be new.
    pub fn presumes_absent(&self) -> bool {
        self.presume_absent.load(Relaxed)
    }

    /// How many of `presumed` a round's conflicts prove wrong.
    pub fn wrong_guesses(presumed: &HashSet<String>, conflicts: &Conflicts) -> usize {
        conflicts.0.iter().filter(|id| presumed.contains(*id)).count()
    }

    /// Learns from a first round: keep presuming while at most a quarter
    /// of the guesses miss; while loading first, try presuming again now
    /// and then, so a worker that met existing courses once does not load
    /// forever.
    pub fn learn(&self, guessed: Guessed, written: usize) {
        if guessed.presumed > 0 {
            self.presume_absent
                .store(guessed.wrong * 4 <= guessed.presumed, Relaxed);
        } else if !self.presumes_absent() && written > 0 {
            self.presume_absent.store(rand::random::<u8>() < 8, Relaxed);
        }
    }

    #[cfg(test)]
    fn weight(&self) -> u64 {
        self.entries.weight()
    }
}

/// Weighs a remembered state by the bytes it holds (an estimate: its text
/// fields plus a fixed overhead), so the cache is bounded in memory, not
/// in entries.
#[derive(Debug, Clone, Copy)]
struct StateBytes;

impl quick_cache::Weighter<String, Stored> for StateBytes {
    fn weight(&self, key: &String, value: &Stored) -> u64 {
        let bytes = state_bytes(&value.state) + std::mem::size_of::<Stored>() - std::mem::size_of::<CourseState>()
            + key.len()
            + 32
            // The cache's own entry.
            + 64;
        bytes as u64
    }
}

/// What the heap holds for a state: each string or event id is its own
/// allocation with a header. (The first estimate counted text plus a flat
/// 512 bytes, and a 16 MiB budget held about 32 MiB: a 200 k replay peaked
/// at 88 MiB RSS with it, 56 MiB with 1 MiB.)
pub(super) fn state_bytes(s: &CourseState) -> usize {
    const ALLOCATION: usize = 32;
    let text = |t: &str| t.len() + ALLOCATION;
    let optional = |t: &Option<String>| t.as_deref().map_or(0, text);
    let stamp = |e: &str| e.len() + ALLOCATION;
    let registers = [
        s.name.as_ref().map(|n| text(&n.value) + stamp(&n.stamp.event_id)),
        s.teacher_id.as_ref().map(|t| text(&t.value) + stamp(&t.stamp.event_id)),
        s.thumbnail
            .as_ref()
            .map(|t| optional(&t.value) + stamp(&t.stamp.event_id)),
        s.description
            .as_ref()
            .map(|d| optional(&d.value) + stamp(&d.stamp.event_id)),
        s.registered_at.as_ref().map(|r| stamp(&r.stamp.event_id)),
        s.posting.as_ref().map(|p| stamp(&p.stamp.event_id)),
        s.deleted.as_ref().map(|d| stamp(&d.event_id)),
    ];
    std::mem::size_of::<CourseState>() + text(&s.course_id) + registers.iter().flatten().sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::decode;
    use crate::record::Record;
    use courseview_projections::CourseState;

    #[test]
    fn remembered_states_are_bounded_by_bytes_not_entries() {
        use quick_cache::Weighter as _;
        let big = |i: usize| {
            let value = serde_json::json!({
                "eventId": format!("e{i}"), "eventType": "CourseUpdatedEvent", "courseId": format!("c{i}"),
                "version": 1, "description": "x".repeat(1 << 20),
            });
            let record = Record {
                topic: "CourseUpdatedEvent".into(),
                value: Some(value.to_string().into_bytes()),
                ..Record::default()
            };
            let mut state = CourseState::new(format!("c{i}").as_str());
            state.apply(&decode(&record).expect("event"));
            (format!("c{i}"), Stored { state, rev: 1 })
        };
        let (key, value) = big(0);
        assert!(
            StateBytes.weight(&key, &value) > 1 << 20,
            "a 1 MiB description weighs over 1 MiB"
        );
        let cache = StateCache::sized(64, 8 << 20);
        let ids: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
        for i in 0..40 {
            let (_, v) = big(i);
            cache.commit(Vec::new(), vec![v], &Conflicts::default());
        }
        assert!(cache.weight() <= 8 << 20, "40 MiB of states kept within 8 MiB");
        assert!(cache.checkout(&ids).known.len() >= 4, "but not emptied either");
    }

    #[test]
    fn a_checked_out_state_is_gone_until_committed_and_a_conflict_stays_out() {
        let cache = StateCache::new(1 << 20);
        let stored = |id: &str, rev| Stored {
            state: CourseState::new(id),
            rev,
        };
        cache.commit(Vec::new(), vec![stored("a", 3), stored("b", 1)], &Conflicts::default());
        let ids = ["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let out = cache.checkout(&ids);
        assert_eq!(out.known.len(), 2);
        assert_eq!(out.missing, vec!["c".to_owned()]);
        // In flight: a second checkout finds nothing.
        assert!(cache.checkout(&ids).known.is_empty());
        let writes = ["a", "c"].map(|id| {
            DocWrite::new(
                crate::read_model::ReadModel::Catalog,
                id.into(),
                3,
                CourseState::new(id),
            )
        });
        cache.commit(writes.into(), Vec::new(), &Conflicts(vec!["c".into()]));
        let back = cache.checkout(&ids);
        assert_eq!(
            back.known.get("a").map(|s| s.rev),
            Some(4),
            "written at its next revision"
        );
        assert_eq!(
            back.missing,
            vec!["b".to_owned(), "c".to_owned()],
            "b was in flight, c conflicted"
        );
    }

    #[test]
    fn the_absent_guess_is_dropped_when_over_a_quarter_misses() {
        let cache = StateCache::new(1 << 20);
        assert!(cache.presumes_absent());
        cache.learn(Guessed { presumed: 8, wrong: 2 }, 6);
        assert!(cache.presumes_absent(), "a quarter wrong keeps it");
        cache.learn(Guessed { presumed: 8, wrong: 3 }, 5);
        assert!(!cache.presumes_absent(), "more than a quarter drops it");
    }
}
