//! The API's in-process cache: answers held in memory in front of Redis
//! (DESIGN §5 "any in-process cache layer").
//!
//! An entry is served only while this process provably knows of every
//! change to its scope that could make it stale:
//! - Workers publish a notice on Redis pub/sub when they begin writing a
//!   batch and when they bump the epoch ([`crate::cache`]). Each notice
//!   moves the scope's *stamp*; an entry stored under an older stamp is
//!   never served again.
//! - The process publishes a *fence* on the same channel every
//!   [`FENCE_EVERY`]. Redis delivers one channel's messages to a subscriber
//!   in order, so receiving a fence sent at `t` proves that every notice
//!   published before `t` has been applied. Entries are served only until
//!   `t + TRUST`: a lost, slow or silently dead subscription turns the
//!   layer off within `TRUST`, and requests fall back to the per-request
//!   epoch check in Redis. That bounds staleness by `TRUST` (well inside
//!   DESIGN's 1 s) in every state of the subscription.
//! - A (re)subscription starts a new era: notices sent while it was down
//!   are lost, so nothing stored before it is served again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// How often a process fences its subscription.
pub const FENCE_EVERY: Duration = Duration::from_millis(100);

/// How long after a fence was sent its proof holds.
pub const TRUST: Duration = Duration::from_millis(500);

/// Which changes an answer was stored after: the subscription's era and
/// the scope's count of notices in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    era: u64,
    seq: u64,
}

#[derive(Debug, Default)]
struct Stamps {
    era: u64,
    /// Notices seen per scope in this era.
    seqs: HashMap<String, u64>,
}

/// Weighs an entry by its bytes, so the layer is bounded in memory.
#[derive(Debug, Clone, Copy)]
struct EntryBytes;

impl quick_cache::Weighter<String, (Stamp, Bytes)> for EntryBytes {
    fn weight(&self, key: &String, value: &(Stamp, Bytes)) -> u64 {
        (key.len() + value.1.len() + 64) as u64
    }
}

/// In-process answers, keyed by scope and request; cheap to share.
pub struct LocalCache {
    entries: quick_cache::sync::Cache<String, (Stamp, Bytes), EntryBytes>,
    stamps: Mutex<Stamps>,
    /// Millis since `origin` until which entries may be served.
    trusted_until: AtomicU64,
    origin: Instant,
}

impl std::fmt::Debug for LocalCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCache")
            .field("bytes", &self.entries.weight())
            .finish_non_exhaustive()
    }
}

impl LocalCache {
    /// A layer holding at most about `max_bytes` of answers. It serves
    /// nothing until its subscription has delivered a fence.
    pub fn new(max_bytes: u64) -> Arc<LocalCache> {
        Arc::new(LocalCache {
            entries: quick_cache::sync::Cache::with_weighter(
                (max_bytes / 1024).max(16) as usize,
                max_bytes.max(1),
                EntryBytes,
            ),
            stamps: Mutex::new(Stamps::default()),
            trusted_until: AtomicU64::new(0),
            // Back-dated, so no fence time is ever near zero (see `fenced`).
            origin: Instant::now()
                .checked_sub(Duration::from_secs(3600))
                .unwrap_or_else(Instant::now),
        })
    }

    fn stamps(&self) -> std::sync::MutexGuard<'_, Stamps> {
        // Nothing here can panic while holding the lock; stay usable anyway.
        self.stamps.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Now, on the clock fences are stamped with.
    pub fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// The scope's stamp, if the layer may serve now; take it *before* the
    /// Redis call whose answer is to be stored.
    pub fn stamp(&self, scope: &str) -> Option<Stamp> {
        if self.now_ms() >= self.trusted_until.load(Ordering::Acquire) {
            return None;
        }
        let stamps = self.stamps();
        Some(Stamp {
            era: stamps.era,
            seq: stamps.seqs.get(scope).copied().unwrap_or(0),
        })
    }

    fn key(scope: &str, suffix: &str) -> String {
        format!("{scope}|{suffix}")
    }

    /// The answer stored for `suffix` under the scope's current stamp.
    pub fn get(&self, scope: &str, suffix: &str, stamp: Stamp) -> Option<Bytes> {
        let (stored, bytes) = self.entries.get(&Self::key(scope, suffix))?;
        (stored == stamp).then_some(bytes)
    }

    /// Stores an answer that was current when `stamp` was taken. A notice
    /// that arrived since has moved the scope's stamp, so the entry is
    /// never served.
    pub fn insert(&self, scope: &str, suffix: &str, stamp: Stamp, bytes: Bytes) {
        self.entries.insert(Self::key(scope, suffix), (stamp, bytes));
    }

    /// A worker began or ended a write of the scope (or a request learned
    /// of one from Redis): nothing stored before is served again.
    pub fn notice(&self, scope: &str) {
        let mut stamps = self.stamps();
        *stamps.seqs.entry(scope.to_owned()).or_insert(0) += 1;
    }

    /// The subscription was (re)established: notices may have been lost.
    pub fn new_era(&self) {
        let mut stamps = self.stamps();
        stamps.era += 1;
        stamps.seqs.clear();
        drop(stamps);
        self.entries.clear();
    }

    /// This process's fence sent at `sent_ms` came back: every notice
    /// published before it has been applied.
    pub fn fenced(&self, sent_ms: u64) {
        let until = sent_ms + TRUST.as_millis() as u64;
        self.trusted_until.fetch_max(until, Ordering::AcqRel);
    }

    /// Stops serving at once (the subscription is gone).
    pub fn distrust(&self) {
        self.trusted_until.store(0, Ordering::Release);
    }

    /// Bytes held.
    pub fn weight(&self) -> u64 {
        self.entries.weight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fenced_cache() -> Arc<LocalCache> {
        let cache = LocalCache::new(1 << 20);
        cache.fenced(cache.now_ms());
        cache
    }

    #[test]
    fn nothing_is_served_before_the_first_fence() {
        let cache = LocalCache::new(1 << 20);
        assert_eq!(cache.stamp("catalog:g1"), None);
        cache.fenced(cache.now_ms());
        assert!(cache.stamp("catalog:g1").is_some());
    }

    #[test]
    fn an_answer_stored_before_a_notice_is_never_served_after_it() {
        let cache = fenced_cache();
        let stamp = cache.stamp("s").expect("trusted");
        cache.insert("s", "course:c1", stamp, Bytes::from_static(b"v1"));
        assert_eq!(cache.get("s", "course:c1", stamp), Some(Bytes::from_static(b"v1")));
        cache.notice("s");
        let now = cache.stamp("s").expect("trusted");
        assert_eq!(cache.get("s", "course:c1", now), None);
    }

    #[test]
    fn an_answer_whose_lookup_raced_a_notice_is_stored_but_never_served() {
        let cache = fenced_cache();
        let before = cache.stamp("s").expect("trusted");
        cache.notice("s"); // arrives while the Redis call is in flight
        cache.insert("s", "course:c1", before, Bytes::from_static(b"old"));
        let now = cache.stamp("s").expect("trusted");
        assert_eq!(cache.get("s", "course:c1", now), None);
    }

    #[test]
    fn a_notice_for_one_scope_leaves_the_others_served() {
        let cache = fenced_cache();
        let a = cache.stamp("a").expect("trusted");
        cache.insert("a", "k", a, Bytes::from_static(b"x"));
        cache.notice("b");
        assert_eq!(
            cache.get("a", "k", cache.stamp("a").expect("trusted")),
            Some(Bytes::from_static(b"x"))
        );
    }

    #[test]
    fn a_resubscription_forgets_everything() {
        let cache = fenced_cache();
        let stamp = cache.stamp("s").expect("trusted");
        cache.insert("s", "k", stamp, Bytes::from_static(b"x"));
        cache.new_era();
        let now = cache.stamp("s").expect("trusted");
        assert_ne!(now, stamp);
        assert_eq!(cache.get("s", "k", now), None);
    }

    #[test]
    fn trust_lapses_when_fences_stop_coming_back() {
        let cache = LocalCache::new(1 << 20);
        // A fence sent longer than TRUST ago proves nothing about now.
        let long_ago = cache.now_ms() - TRUST.as_millis() as u64 - 1;
        cache.fenced(long_ago);
        assert_eq!(cache.stamp("s"), None);
        cache.fenced(cache.now_ms());
        assert!(cache.stamp("s").is_some());
        cache.distrust();
        assert_eq!(cache.stamp("s"), None);
    }

    #[test]
    fn the_layer_is_bounded_by_bytes() {
        let cache = LocalCache::new(64 * 1024);
        let stamp = cache.stamp("s");
        let stamp = stamp.unwrap_or(Stamp { era: 0, seq: 0 });
        for i in 0..1000 {
            cache.insert("s", &format!("k{i}"), stamp, Bytes::from(vec![0u8; 1024]));
        }
        assert!(cache.weight() <= 64 * 1024, "held {} bytes", cache.weight());
    }
}
