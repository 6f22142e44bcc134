//! The API's in-process cache: answers held in memory in front of Redis
//! (DESIGN §5 "any in-process cache layer").
//!
//! An entry is served only while this process provably knows of every
//! change to its scope that could make it stale:
//! - Workers publish a notice on Redis pub/sub when they begin writing a
//!   batch and when they bump the epoch ([`super::Notice`]). Each notice
//!   moves the scope's *stamp*; an entry stored under an older stamp is
//!   never served again.
//! - The process publishes a *fence* on the same channel every
//!   [`super::FENCE_EVERY`]. Redis delivers one channel's messages to a subscriber
//!   in order, so receiving a fence sent at `t` proves that every notice
//!   published before `t` has been applied. Entries are served only until
//!   `t + TRUST`: a lost, slow or silently dead subscription turns the
//!   layer off within `TRUST`, and requests fall back to the per-request
//!   epoch check in Redis. That bounds staleness by `TRUST` (well inside
//!   DESIGN's 1 s) in every state of the subscription.
//! - A (re)subscription starts a new era: notices sent while it was down
//!   are lost, so nothing stored before it is served again.
//! - A request that learns of a change before its notice arrives (Redis
//!   shows another epoch, a writer, a conflict, or cannot be asked) moves
//!   the stamp itself before it serves what MongoDB says, so one process
//!   never serves a newer answer and then an older one.
//! - While a worker has announced a write and not yet its bump, the scope
//!   is served and stored from nothing here (even if Redis lost the
//!   lease); an announcement never ended expires with the lease.
//! - An entry lives no longer than the Redis entry it copies (its
//!   remaining TTL when copied, not a TTL from the copy), so a bump that
//!   never reached Redis leaves memory no staler than Redis.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::notice::{TRUST, WRITE_LEASE};
use super::read_through::Answer;

/// Which changes an answer was stored after: the subscription's era and
/// the scope's count of notices in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    era: u64,
    seq: u64,
}

/// What this process knows of one scope's changes in the current era.
/// A request reads it with atomics alone; notices (rare) take its lock.
#[derive(Debug, Default)]
struct ScopeState {
    /// Notices seen in this era.
    seq: AtomicU64,
    /// Until when (ms) some announced write may still be under way: the
    /// latest lease of the writers in `known`, 0 with none.
    writing_until: AtomicU64,
    known: Mutex<Known>,
}

#[derive(Debug, Default)]
struct Known {
    /// The Redis epoch the current stamp goes with.
    epoch: Option<String>,
    /// Writes announced and not yet ended: writer → until (ms).
    writing: HashMap<String, u64>,
}

impl ScopeState {
    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        // Nothing here can panic while holding the lock; stay usable anyway.
        self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn moved(&self) {
        self.seq.fetch_add(1, Ordering::AcqRel);
    }

    /// Recomputed under `known`'s lock, so two notices cannot interleave.
    fn set_writing(&self, known: &Known) {
        let until = known.writing.values().copied().max().unwrap_or(0);
        self.writing_until.store(until, Ordering::Release);
    }
}

/// The scopes of the current era. The era changes under the write lock,
/// so a stamp's era and its scope's count are read together.
#[derive(Debug, Default)]
struct Scopes {
    era: u64,
    scopes: HashMap<Box<str>, Arc<ScopeState>>,
}

/// An entry's key: its scope and the request within it. Looked up by
/// [`KeyRef`], so a lookup allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    scope: Box<str>,
    suffix: Box<str>,
}

/// Hashes as [`Key`] does (each `str` field in order).
#[derive(Hash)]
struct KeyRef<'a> {
    scope: &'a str,
    suffix: &'a str,
}

impl quick_cache::Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        *key.scope == *self.scope && *key.suffix == *self.suffix
    }
}

/// Weighs an entry by its bytes, so the layer is bounded in memory.
#[derive(Debug, Clone, Copy)]
struct EntryBytes;

/// An answer, the stamp it was stored under, and until when it may be
/// served (ms).
type Entry = (Stamp, Answer, u64);

impl quick_cache::Weighter<Key, Entry> for EntryBytes {
    fn weight(&self, key: &Key, value: &Entry) -> u64 {
        (key.scope.len() + key.suffix.len() + value.1.body.len() + 96) as u64
    }
}

/// In-process answers, keyed by scope and request; cheap to share.
pub struct LocalCache {
    /// False with no bytes to hold: the notices are still followed, for
    /// [`LocalCache::changes`], but nothing is stored or served.
    enabled: bool,
    entries: quick_cache::sync::Cache<Key, Entry, EntryBytes>,
    /// Counts epoch bumps heard and resubscriptions (which may have lost
    /// some): `minVersion` waits re-read MongoDB when it moves.
    changes: tokio::sync::watch::Sender<u64>,
    /// Read by every request, written when a scope is first seen and on a
    /// resubscription: readers never wait on one another.
    scopes: RwLock<Scopes>,
    /// Oldest entry served (ms).
    max_age: u64,
    /// How long an announced write holds without its end (ms).
    lease: u64,
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
    /// A layer holding at most about `max_bytes` of answers (0: none),
    /// each for at most `max_age`. It serves nothing until its
    /// subscription has delivered a fence.
    pub fn new(max_bytes: u64, max_age: Duration) -> Arc<LocalCache> {
        Arc::new(LocalCache {
            enabled: max_bytes > 0,
            changes: tokio::sync::watch::Sender::new(0),
            entries: quick_cache::sync::Cache::with_weighter(
                (max_bytes / 1024).max(16) as usize,
                max_bytes.max(1),
                EntryBytes,
            ),
            scopes: RwLock::default(),
            max_age: max_age.as_millis() as u64,
            lease: WRITE_LEASE.as_millis() as u64,
            trusted_until: AtomicU64::new(0),
            // Back-dated, so no fence time is ever near zero (see `fenced`).
            origin: Instant::now()
                .checked_sub(Duration::from_secs(3600))
                .unwrap_or_else(Instant::now),
        })
    }

    fn read_scopes(&self) -> std::sync::RwLockReadGuard<'_, Scopes> {
        self.scopes.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_scopes(&self) -> std::sync::RwLockWriteGuard<'_, Scopes> {
        self.scopes.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The scope's state in this era, created on first sight.
    fn scope(&self, scope: &str) -> Arc<ScopeState> {
        if let Some(state) = self.read_scopes().scopes.get(scope) {
            return Arc::clone(state);
        }
        Arc::clone(self.write_scopes().scopes.entry(scope.into()).or_default())
    }

    /// Now, on the clock fences are stamped with.
    pub fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// The scope's stamp, if the layer may serve now; take it *before* the
    /// Redis call whose answer is to be stored.
    pub fn stamp(&self, scope: &str) -> Option<Stamp> {
        if !self.enabled || !self.trusted() {
            return None;
        }
        let now = self.now_ms();
        let scopes = self.read_scopes();
        let seq = match scopes.scopes.get(scope) {
            Some(state) if state.writing_until.load(Ordering::Acquire) > now => return None,
            Some(state) => state.seq.load(Ordering::Acquire),
            None => 0,
        };
        Some(Stamp { era: scopes.era, seq })
    }

    /// Whether every notice published until recently has been heard (a
    /// fence came back within [`TRUST`]).
    pub fn trusted(&self) -> bool {
        self.now_ms() < self.trusted_until.load(Ordering::Acquire)
    }

    /// Moves on every epoch bump heard and every resubscription.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The answer stored for `suffix` under the scope's current stamp.
    pub fn get(&self, scope: &str, suffix: &str, stamp: Stamp) -> Option<Answer> {
        let (stored, answer, until) = self.entries.get(&KeyRef { scope, suffix })?;
        (stored == stamp && self.now_ms() < until).then_some(answer)
    }

    /// Stores an answer that was current when `stamp` was taken, for `left`
    /// (what remains of the Redis entry it copies) or the layer's max age,
    /// whichever is shorter. A notice that arrived since has moved the
    /// scope's stamp, so the entry is never served.
    pub fn insert(&self, scope: &str, suffix: &str, stamp: Stamp, answer: Answer, left: Duration) {
        let lives = (left.as_millis() as u64).min(self.max_age);
        if !self.enabled || lives == 0 {
            return;
        }
        let key = Key {
            scope: scope.into(),
            suffix: suffix.into(),
        };
        self.entries.insert(key, (stamp, answer, self.now_ms() + lives));
    }

    /// Redis answered under `epoch`: if that is not the epoch the scope's
    /// stamp goes with, a change happened whose notice has not arrived yet,
    /// and the stamp moves now.
    pub fn observe_epoch(&self, scope: &str, epoch: &str) {
        let state = self.scope(scope);
        let mut known = state.known();
        match &known.epoch {
            Some(seen) if seen == epoch => {}
            Some(_) => {
                state.moved();
                known.epoch = Some(epoch.to_owned());
            }
            // First sight in this era: entries, if any, were stored under it.
            None => known.epoch = Some(epoch.to_owned()),
        }
    }

    /// `writer` announced a write of the scope: nothing is served or
    /// stored for it until the write ends or its lease runs out.
    pub fn write_began(&self, scope: &str, writer: &str) {
        let now = self.now_ms();
        let state = self.scope(scope);
        let mut known = state.known();
        // Ended by their leases: forgotten here, not on every request.
        known.writing.retain(|_, until| *until > now);
        known.writing.insert(writer.to_owned(), now + self.lease);
        state.set_writing(&known);
        state.moved();
    }

    /// The scope's epoch was bumped, ending `writer`'s write if named.
    pub fn bumped(&self, scope: &str, writer: Option<&str>) {
        let state = self.scope(scope);
        let mut known = state.known();
        known.epoch = None;
        if let Some(writer) = writer {
            known.writing.remove(writer);
            state.set_writing(&known);
        }
        state.moved();
        drop(known);
        self.changes.send_modify(|n| *n += 1);
    }

    /// A worker began or ended a write of the scope (or a request learned
    /// of one from Redis): nothing stored before is served again.
    pub fn notice(&self, scope: &str) {
        self.scope(scope).moved();
    }

    /// The subscription was (re)established: notices may have been lost.
    pub fn new_era(&self) {
        let mut scopes = self.write_scopes();
        scopes.era += 1;
        scopes.scopes.clear();
        drop(scopes);
        self.entries.clear();
        self.changes.send_modify(|n| *n += 1);
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
    use bytes::Bytes;

    const MINUTE: Duration = Duration::from_secs(60);

    fn answer(body: &'static [u8]) -> Answer {
        Answer::new(Bytes::from_static(body))
    }

    fn fenced_cache() -> Arc<LocalCache> {
        let cache = LocalCache::new(1 << 20, Duration::from_secs(60));
        cache.fenced(cache.now_ms());
        cache
    }

    #[test]
    fn nothing_is_served_before_the_first_fence() {
        let cache = LocalCache::new(1 << 20, Duration::from_secs(60));
        assert_eq!(cache.stamp("catalog:g1"), None);
        cache.fenced(cache.now_ms());
        assert!(cache.stamp("catalog:g1").is_some());
    }

    #[test]
    fn an_answer_stored_before_a_notice_is_never_served_after_it() {
        let cache = fenced_cache();
        let stamp = cache.stamp("s").expect("trusted");
        cache.insert("s", "course:c1", stamp, answer(b"v1"), MINUTE);
        assert_eq!(cache.get("s", "course:c1", stamp), Some(answer(b"v1")));
        cache.notice("s");
        let now = cache.stamp("s").expect("trusted");
        assert_eq!(cache.get("s", "course:c1", now), None);
    }

    #[test]
    fn an_answer_whose_lookup_raced_a_notice_is_stored_but_never_served() {
        let cache = fenced_cache();
        let before = cache.stamp("s").expect("trusted");
        cache.notice("s"); // arrives while the Redis call is in flight
        cache.insert("s", "course:c1", before, answer(b"old"), MINUTE);
        let now = cache.stamp("s").expect("trusted");
        assert_eq!(cache.get("s", "course:c1", now), None);
    }

    #[test]
    fn a_notice_for_one_scope_leaves_the_others_served() {
        let cache = fenced_cache();
        let a = cache.stamp("a").expect("trusted");
        cache.insert("a", "k", a, answer(b"x"), MINUTE);
        cache.notice("b");
        assert_eq!(
            cache.get("a", "k", cache.stamp("a").expect("trusted")),
            Some(answer(b"x"))
        );
    }

    #[test]
    fn a_resubscription_forgets_everything() {
        let cache = fenced_cache();
        let stamp = cache.stamp("s").expect("trusted");
        cache.insert("s", "k", stamp, answer(b"x"), MINUTE);
        cache.new_era();
        let now = cache.stamp("s").expect("trusted");
        assert_ne!(now, stamp);
        assert_eq!(cache.get("s", "k", now), None);
    }

    #[test]
    fn trust_lapses_when_fences_stop_coming_back() {
        let cache = LocalCache::new(1 << 20, Duration::from_secs(60));
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
    fn an_epoch_seen_in_redis_before_its_notice_moves_the_stamp() {
        let cache = fenced_cache();
        cache.observe_epoch("s", "e1");
        let stamp = cache.stamp("s").expect("trusted");
        cache.insert("s", "page", stamp, answer(b"v57"), MINUTE);
        cache.observe_epoch("s", "e1");
        assert_eq!(cache.stamp("s"), Some(stamp), "the same epoch changes nothing");
        // Another request's lookup shows the bump; its notice is late.
        cache.observe_epoch("s", "e2");
        let now = cache.stamp("s").expect("trusted");
        assert_eq!(cache.get("s", "page", now), None);
    }

    #[test]
    fn an_announced_write_stops_the_scope_until_its_bump() {
        let cache = fenced_cache();
        cache.write_began("s", "w1");
        cache.write_began("s", "w2");
        assert_eq!(cache.stamp("s"), None);
        cache.bumped("s", Some("w1"));
        assert_eq!(cache.stamp("s"), None, "w2 still writes");
        cache.bumped("s", Some("w2"));
        assert!(cache.stamp("s").is_some());
    }

    #[test]
    fn entries_older_than_the_max_age_are_not_served() {
        let cache = LocalCache::new(1 << 20, Duration::ZERO);
        cache.fenced(cache.now_ms());
        let stamp = cache.stamp("s").expect("trusted");
        cache.insert("s", "k", stamp, answer(b"x"), MINUTE);
        assert_eq!(cache.get("s", "k", stamp), None);
    }

    #[test]
    fn an_entry_lives_no_longer_than_what_was_left_of_its_redis_entry() {
        let cache = fenced_cache();
        let stamp = cache.stamp("s").expect("trusted");
        cache.insert("s", "short", stamp, answer(b"x"), Duration::from_millis(30));
        cache.insert("s", "gone", stamp, answer(b"y"), Duration::ZERO);
        assert!(cache.get("s", "short", stamp).is_some());
        assert_eq!(cache.get("s", "gone", stamp), None);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(cache.get("s", "short", stamp), None);
    }

    #[test]
    fn a_layer_of_no_bytes_serves_nothing_but_still_tells_of_bumps() {
        let cache = LocalCache::new(0, Duration::from_secs(60));
        cache.fenced(cache.now_ms());
        assert!(cache.trusted());
        assert_eq!(cache.stamp("s"), None);
        let changes = cache.changes();
        cache.notice("s");
        assert!(
            !changes.has_changed().expect("open"),
            "a request's own notice is no bump"
        );
        cache.bumped("s", Some("w1"));
        assert!(changes.has_changed().expect("open"));
    }

    #[test]
    fn the_layer_is_bounded_by_bytes() {
        let cache = LocalCache::new(64 * 1024, Duration::from_secs(60));
        let stamp = cache.stamp("s");
        let stamp = stamp.unwrap_or(Stamp { era: 0, seq: 0 });
        for i in 0..1000 {
            cache.insert(
                "s",
                &format!("k{i}"),
                stamp,
                Answer::new(Bytes::from(vec![0u8; 1024])),
                MINUTE,
            );
        }
        assert!(cache.weight() <= 64 * 1024, "held {} bytes", cache.weight());
    }
}
