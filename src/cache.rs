//! Redis: cache-aside in front of the API's MongoDB reads (DESIGN §5).
//!
//! Freshness comes from an epoch per projection generation, not from TTLs.
//! Every cache key embeds the epoch; a projector bumps it after each
//! committed batch. The API reads the epoch *before* it reads MongoDB and
//! stores what it read under that epoch, so a value read before a batch
//! landed can only be cached under an epoch that the batch has already made
//! obsolete. After the bump no response comes from an older entry: the
//! bound is the bump's round trip, far inside DESIGN's 1 s.
//!
//! Redis is an optimisation: every failure here is logged, counted and
//! answered as a miss, and after a failure the cache is bypassed for a
//! moment so a dead Redis does not add a timeout to each request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use tokio::sync::Mutex;
use tracing::{debug, instrument, warn};

use crate::telemetry;

/// How long a writer's announcement holds if it never ends it (a crash).
const WRITE_LEASE: Duration = Duration::from_secs(30);

/// How long to skip Redis after it failed.
const BACKOFF: Duration = Duration::from_millis(500);

/// Reads the epoch and the entry under it in one round trip. While a worker
/// is writing a batch (a live lease in the writers set) it answers nothing:
/// the caller reads MongoDB and stores nothing. A missing
/// epoch (never set, or evicted under `maxmemory`) is replaced by a fresh
/// random one, so entries cached under any earlier epoch stay unreachable.
/// Epochs are random rather than counted for exactly that reason: a
/// counter that restarts after eviction would revive old entries.
const LOOKUP: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if redis.call('ZCOUNT', KEYS[2], now, '+inf') > 0 then return {} end
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  redis.call('SET', KEYS[1], ARGV[3])
  return {ARGV[3]}
end
local found = redis.call('GET', ARGV[1] .. epoch .. ARGV[2])
if not found then return {epoch} end
return {epoch, found}
";

/// Stores an answer unless the key already holds a *different* one: two
/// answers under one epoch mean the store changed between two reads before
/// the worker's bump arrived, and whichever was put last could be the older.
/// The key then holds a marker (`CONFLICT`) that answers as a miss and takes
/// no puts, so until the bump everyone reads MongoDB, which never goes back.
const PUT: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[2])
end
return 0
";

/// The value of a key whose epoch saw two different answers.
const CONFLICT: &[u8] = b"!conflict";

/// A cache lookup's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Hit(Vec<u8>),
    /// Not cached; store the answer under this epoch.
    Miss {
        epoch: String,
    },
    /// Redis is not answering; go to MongoDB and do not store.
    Unavailable,
}

/// Cache-aside client; cheap to clone.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    conn: Mutex<Option<ConnectionManager>>,
    prefix: String,
    timeout: Duration,
    ttl: Duration,
    /// Unix millis until which Redis is skipped.
    skip_until: AtomicU64,
    lookup: Script,
    put: Script,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("prefix", &self.inner.prefix).finish()
    }
}

/// A namespace of keys: one projection generation.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub projection: &'a str,
    pub generation: u32,
}

/// A fresh epoch: random, so it never equals one used before.
fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Cache {
    /// Never fails on an unreachable Redis: it connects on first use.
    pub fn new(url: &str, prefix: &str, timeout: Duration, ttl: Duration) -> Result<Cache, redis::RedisError> {
        Ok(Cache {
            inner: Arc::new(Inner {
                client: redis::Client::open(url)?,
                conn: Mutex::new(None),
                prefix: prefix.to_owned(),
                timeout,
                ttl,
                skip_until: AtomicU64::new(0),
                lookup: Script::new(LOOKUP),
                put: Script::new(PUT),
            }),
        })
    }

    fn base(&self, scope: Scope<'_>) -> String {
        format!("{}:{}:g{}", self.inner.prefix, scope.projection, scope.generation)
    }

    async fn connection(&self) -> Option<ConnectionManager> {
        if now_millis() < self.inner.skip_until.load(Ordering::Relaxed) {
            return None;
        }
        let mut slot = self.inner.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Some(conn.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.inner.timeout)
            .set_response_timeout(self.inner.timeout)
            .set_number_of_retries(1);
        match ConnectionManager::new_with_config(self.inner.client.clone(), config).await {
            Ok(conn) => {
                *slot = Some(conn.clone());
                Some(conn)
            }
            Err(e) => {
                self.failed("connect", &e);
                None
            }
        }
    }

    fn failed(&self, op: &'static str, error: &dyn std::fmt::Display) {
        warn!(op, error = %error, "Redis unavailable; serving from MongoDB.");
        telemetry::cache_error(op);
        self.inner
            .skip_until
            .store(now_millis() + BACKOFF.as_millis() as u64, Ordering::Relaxed);
    }

    /// Runs a Redis call, connecting included, within the cache's timeout,
    /// turning failure into `None`.
    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let attempt = async {
            let conn = self.connection().await?;
            Some(f(conn).await)
        };
        match tokio::time::timeout(self.inner.timeout, attempt).await {
            Ok(Some(Ok(v))) => Some(v),
            Ok(Some(Err(e))) => {
                self.failed(op, &e);
                None
            }
            // Connecting failed; already counted.
            Ok(None) => None,
            Err(_) => {
                self.failed(op, &"timed out");
                None
            }
        }
    }

    /// Whether Redis answers a PING within the cache's timeout.
    pub async fn ping(&self) -> bool {
        let pong: Option<String> = self
            .call("ping", |mut conn| async move {
                redis::cmd("PING").query_async(&mut conn).await
            })
            .await;
        pong.is_some()
    }

    /// Looks up `suffix` under the scope's current epoch.
    #[instrument(skip_all, fields(projection = scope.projection))]
    pub async fn get(&self, scope: Scope<'_>, suffix: &str) -> Lookup {
        let base = self.base(scope);
        let epoch_key = format!("{base}:epoch");
        let writers_key = format!("{base}:writers");
        let head = format!("{base}:e");
        let tail = format!(":{suffix}");
        let script = &self.inner.lookup;
        let fresh = new_epoch();
        let found: Option<Vec<Vec<u8>>> = self
            .call("get", |mut conn| async move {
                script
                    .key(epoch_key)
                    .key(writers_key)
                    .arg(head)
                    .arg(tail)
                    .arg(fresh)
                    .invoke_async(&mut conn)
                    .await
            })
            .await;
        let Some(mut found) = found else {
            return Lookup::Unavailable;
        };
        let bytes = if found.len() == 2 { found.pop() } else { None };
        let epoch = found.pop().map(|e| String::from_utf8_lossy(&e).into_owned());
        match (epoch, bytes) {
            // Two answers met under this epoch: read the store until the bump.
            (Some(epoch), Some(bytes)) if bytes == CONFLICT => {
                telemetry::cache_lookup(false);
                Lookup::Miss { epoch }
            }
            (Some(_), Some(bytes)) => {
                telemetry::cache_lookup(true);
                Lookup::Hit(bytes)
            }
            (Some(epoch), None) => {
                telemetry::cache_lookup(false);
                Lookup::Miss { epoch }
            }
            (None, _) => Lookup::Unavailable,
        }
    }

    /// Stores an answer read after `epoch` was observed.
    #[instrument(skip_all, fields(projection = scope.projection))]
    pub async fn put(&self, scope: Scope<'_>, epoch: &str, suffix: &str, bytes: &[u8]) {
        let key = format!("{}:e{epoch}:{suffix}", self.base(scope));
        let ttl = self.inner.ttl.as_secs().max(1);
        let script = &self.inner.put;
        let _: Option<i64> = self
            .call("put", |mut conn| async move {
                script
                    .key(key)
                    .arg(bytes)
                    .arg(ttl)
                    .arg(CONFLICT)
                    .invoke_async(&mut conn)
                    .await
            })
            .await;
    }

    /// Announces that `writer` is about to write a batch of the scope: until
    /// its [`Cache::bump_epoch`] (or `WRITE_LEASE` passes, if it dies), the
    /// API neither serves nor stores cached answers of the scope. Without
    /// it, keys filled before the write and keys filled after it could be
    /// served side by side for the moment until the bump, and a reader
    /// could see a course at v59 on a list page and then at v57 by id.
    #[instrument(skip_all, fields(projection = scope.projection))]
    pub async fn begin_write(&self, scope: Scope<'_>, writer: &str) -> bool {
        let key = format!("{}:writers", self.base(scope));
        let until = now_millis() + WRITE_LEASE.as_millis() as u64;
        let added: Option<i64> = self
            .call(
                "begin write",
                |mut conn| async move { conn.zadd(key, writer, until).await },
            )
            .await;
        added.is_some()
    }

    /// Makes every cached answer of the scope obsolete; a projector calls it
    /// after each committed batch. Returns whether Redis took it.
    ///
    /// Under `maxmemory` with `noeviction` Redis refuses the `SET`; deleting
    /// the epoch is still allowed, and readers that find no epoch and cannot
    /// set one bypass the cache, so freshness holds even then.
    #[instrument(skip_all, fields(projection = scope.projection))]
    pub async fn bump_epoch(&self, scope: Scope<'_>) -> bool {
        self.bump_epoch_for(scope, None).await
    }

    /// [`Cache::bump_epoch`], then ends `writer`'s write (in that order: the
    /// new epoch is in place before answers may be cached again).
    pub async fn bump_epoch_for(&self, scope: Scope<'_>, writer: Option<&str>) -> bool {
        let key = format!("{}:epoch", self.base(scope));
        let writers = format!("{}:writers", self.base(scope));
        let epoch = new_epoch();
        let set: Option<()> = self
            .call("bump", |mut conn| {
                let (key, epoch) = (key.clone(), epoch.clone());
                async move { conn.set(key, epoch).await }
            })
            .await;
        if set.is_some() {
            debug!(epoch, "Cache epoch bumped.");
            if let Some(writer) = writer {
                let _: Option<i64> = self
                    .call("end write", |mut conn| async move { conn.zrem(writers, writer).await })
                    .await;
            }
            return true;
        }
        // Skip the backoff window: this is the call that must get through.
        self.inner.skip_until.store(0, Ordering::Relaxed);
        let deleted: Option<()> = self.call("bump", |mut conn| async move { conn.del(key).await }).await;
        deleted.is_some()
    }
}
