//! The two-tier read-through the API serves answers by: memory, then
//! Redis, then the loader (MongoDB), storing what it loaded in both.

use std::sync::Arc;

use axum::http::HeaderValue;
use bytes::Bytes;

use super::{Cache, LocalCache, Lookup, Put, Scope};
use crate::telemetry;

/// An answer cached as absent (a 404), so hot misses stay cheap.
pub const ABSENT: &[u8] = b"-";

/// An answer and its ETag, the quoted XXH3 of its bytes: computed once
/// when the answer is loaded or copied from Redis, not on every hit.
/// (XXH3: stable across processes and releases, as an ETag shared by
/// replicas must be.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub body: Bytes,
    pub hash: u64,
    pub etag: HeaderValue,
}

impl Answer {
    pub fn new(body: Bytes) -> Self {
        let hash = xxhash_rust::xxh3::xxh3_64(&body);
        let etag = HeaderValue::from_str(&format!("\"{hash:016x}\"")).expect("quoted hex is a header value");
        Answer { body, hash, etag }
    }
}

/// An answer, or `None` for one cached as absent.
fn present(answer: Answer) -> Option<Answer> {
    (answer.body != ABSENT).then_some(answer)
}

/// The API's caches, either of which may be off.
#[derive(Debug, Clone, Default)]
pub struct ReadThrough {
    pub redis: Option<Cache>,
    pub local: Option<Arc<LocalCache>>,
}

impl ReadThrough {
    /// Serves an answer of `scope` from the caches, or from `load` and
    /// caches it. `None` from `load` (a 404) is cached too.
    pub async fn get_or_load<F, Fut, E>(&self, scope: Scope<'_>, suffix: &str, load: F) -> Result<Option<Answer>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Option<Vec<u8>>, E>>,
    {
        let Some(cache) = &self.redis else {
            return Ok(load().await?.map(|body| Answer::new(Bytes::from(body))));
        };
        let base = cache.base(scope);
        // Taken before Redis is asked, so a notice arriving meanwhile
        // keeps what Redis answers out of memory.
        let local = self.local.as_deref().and_then(|l| Some((l, l.stamp(&base)?)));
        if let Some((local, stamp)) = local {
            if let Some(answer) = local.get(&base, suffix, stamp) {
                telemetry::cache_lookup("memory", true);
                return Ok(present(answer));
            }
            telemetry::cache_lookup("memory", false);
        }
        let epoch = match cache.get(scope, suffix).await {
            Lookup::Hit { epoch, bytes, left } => {
                let answer = Answer::new(Bytes::from(bytes));
                if let Some((local, stamp)) = local {
                    local.observe_epoch(&base, &epoch);
                    local.insert(&base, suffix, stamp, answer.clone(), left);
                }
                return Ok(present(answer));
            }
            Lookup::Miss { epoch } => {
                if let Some((local, _)) = local {
                    local.observe_epoch(&base, &epoch);
                }
                Some(epoch)
            }
            // What MongoDB answers now may be newer than what memory holds
            // (a write under way, or Redis cannot tell): stop serving
            // memory before serving it.
            Lookup::Writing | Lookup::Unavailable => {
                self.forget(&base);
                None
            }
        };
        let loaded = load().await?.map(|body| Answer::new(Bytes::from(body)));
        if let Some(epoch) = epoch {
            let bytes = loaded.as_ref().map_or(Bytes::from_static(ABSENT), |a| a.body.clone());
            match cache.put(scope, &epoch, suffix, &bytes).await {
                Put::Stored { left } => {
                    if let Some((local, stamp)) = local {
                        let answer = loaded.clone().unwrap_or_else(|| Answer::new(bytes));
                        local.insert(&base, suffix, stamp, answer, left);
                    }
                }
                // The store changed since the lookup (a write began or
                // ended, two answers met), or Redis cannot tell: as above.
                Put::Stale | Put::Conflict | Put::Unavailable => self.forget(&base),
            }
        }
        Ok(loaded)
    }

    /// What memory may serve for `scope` and `suffix` now, without asking
    /// Redis (`Some(None)`: cached as absent); `None` when memory holds
    /// nothing it may serve, and [`ReadThrough::get_or_load`] must look
    /// (only hits are counted here, so a miss is counted once, there).
    pub fn memory(&self, scope: Scope<'_>, suffix: &str) -> Option<Option<Answer>> {
        let (cache, local) = (self.redis.as_ref()?, self.local.as_deref()?);
        let base = cache.base(scope);
        let answer = local.get(&base, suffix, local.stamp(&base)?)?;
        telemetry::cache_lookup("memory", true);
        Some(present(answer))
    }

    /// Serves nothing of `scope` from memory until its next lookup: an
    /// answer read from MongoDB outside the cache (`minVersion`) may be
    /// newer than what memory holds.
    pub fn forget_scope(&self, scope: Scope<'_>) {
        if let Some(cache) = &self.redis {
            self.forget(&cache.base(scope));
        }
    }

    fn forget(&self, base: &str) {
        if let Some(local) = &self.local {
            local.notice(base);
        }
    }
}
