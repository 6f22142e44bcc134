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
//! API processes may also keep answers in memory ([`super::LocalCache`]):
//! workers publish a notice on the scope's channel when they begin a write
//! and when they bump, and [`Cache::follow_notices`] applies them, fenced
//! so that a lost subscription turns the memory layer off.
//!
//! Redis is an optimisation: every failure here is logged, counted and
//! answered as a miss, and after a failure the cache is bypassed for a
//! moment so a dead Redis does not add a timeout to each request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

use super::local::LocalCache;
use super::notice::{Notice, FENCE_EVERY, WRITE_LEASE};
use crate::telemetry;

/// How often a run of Redis failures is logged again while it lasts.
const REMIND_EVERY: Duration = Duration::from_secs(60);

/// A failed Redis call, said by what the operator must fix.
trait RedisFailure {
    fn says(&self) -> &'static str;
    fn text(&self) -> String;
}

impl RedisFailure for redis::RedisError {
    fn says(&self) -> &'static str {
        match self.kind() {
            redis::ErrorKind::AuthenticationFailed => {
                "Redis authentication failed; check the user and password in REDIS_URL"
            }
            _ if self.code() == Some("NOPERM") => {
                "Redis refused a command: the ACL user lacks a command, key or channel courseview needs (README lists them)"
            }
            _ if self.is_io_error() && self.to_string().to_ascii_lowercase().contains("certificate") => {
                "Redis TLS failed; check REDIS_CA_FILE and the client certificate"
            }
            _ => "Redis unavailable",
        }
    }

    fn text(&self) -> String {
        self.to_string()
    }
}

/// A call that outlived the cache's time limit.
struct TimedOut;

impl RedisFailure for TimedOut {
    fn says(&self) -> &'static str {
        "Redis too slow"
    }

    fn text(&self) -> String {
        "timed out".into()
    }
}

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
local key = ARGV[1] .. epoch .. ARGV[2]
local found = redis.call('GET', key)
if not found then return {epoch} end
return {epoch, found, tostring(redis.call('PTTL', key))}
";

/// Stores an answer read under `epoch` (ARGV[4]), unless the epoch has
/// moved or a worker is writing (-1: the answer may be newer or older than
/// the epoch's, so it is not kept), or the key already holds a *different*
/// answer (0): two answers under one epoch mean the store changed between
/// two reads before the worker's bump arrived, and whichever was put last
/// could be the older. The key then holds a marker (`CONFLICT`) that
/// answers as a miss and takes no puts, so until the bump everyone reads
/// MongoDB, which never goes back. 1: the key holds this answer, for the
/// milliseconds that follow (its remaining TTL).
const PUT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if redis.call('GET', KEYS[2]) ~= ARGV[4] then return {-1} end
if redis.call('ZCOUNT', KEYS[3], now, '+inf') > 0 then return {-1} end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return {1, ARGV[2] * 1000} end
if redis.call('GET', KEYS[1]) == ARGV[1] then return {1, redis.call('PTTL', KEYS[1])} end
redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[2])
return {0}
";

/// A writer's lease (ARGV[1] ms from now on Redis' clock, the clock the
/// lookups compare it with), announced to subscribed API processes. The
/// epoch is dropped first: should the writer die before its bump, answers
/// cached before its write stay unreachable once the lease expires (a
/// reader then starts a fresh epoch). Under `maxmemory` with `noeviction`
/// the lease itself may be refused; dropping the epoch still announces the
/// write (readers then cannot start an epoch, so they bypass the cache).
const BEGIN_WRITE: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('DEL', KEYS[3])
redis.pcall('ZADD', KEYS[1], now + ARGV[1], ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 1
";

/// A new epoch, then the end of the writer's lease (if any), announced.
const BUMP: &str = r"
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then redis.call('ZREM', KEYS[2], ARGV[2]) end
redis.call('PUBLISH', KEYS[3], ARGV[3])
return 1
";

/// The bump under `noeviction` when the `SET` is refused: no epoch at all.
const DROP_EPOCH: &str = r"
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', KEYS[2], ARGV[1])
return 1
";

/// A subscription whose own fences stop coming back for this long is
/// presumed dead and replaced.
const SILENT_SUBSCRIPTION: Duration = Duration::from_secs(2);

/// The value of a key whose epoch saw two different answers.
const CONFLICT: &[u8] = b"!conflict";

/// A cache lookup's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Cached under the scope's current `epoch`, for `left` more (the
    /// entry's remaining TTL: a copy must not outlive it).
    Hit {
        epoch: String,
        bytes: Vec<u8>,
        left: Duration,
    },
    /// Not cached; store the answer under this epoch.
    Miss { epoch: String },
    /// A worker is writing this scope: go to MongoDB and do not store.
    Writing,
    /// Redis is not answering; go to MongoDB and do not store.
    Unavailable,
}

/// What became of an answer offered to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The key holds this answer, for `left` more.
    Stored {
        left: Duration,
    },
    /// The key holds a different one (it now answers as a miss).
    Conflict,
    /// The epoch moved or a worker is writing: the answer was not kept,
    /// and answers of this scope held elsewhere may be stale.
    Stale,
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
    /// How long a write announcement holds without its bump.
    write_lease: Duration,
    /// Unix millis until which Redis is skipped.
    skip_until: AtomicU64,
    /// When the current run of failures was last logged (unix ms; 0: Redis
    /// answers): a wrong password is one line, not one per request.
    failing_since_said: AtomicU64,
    lookup: Script,
    put: Script,
    begin_write: Script,
    bump: Script,
    drop_epoch: Script,
}

impl Inner {
    /// A fresh connection slot and failure state over `client`.
    fn new(client: redis::Client, prefix: String, timeout: Duration, ttl: Duration, write_lease: Duration) -> Inner {
        Inner {
            client,
            conn: Mutex::new(None),
            prefix,
            timeout,
            ttl,
            write_lease,
            skip_until: AtomicU64::new(0),
            failing_since_said: AtomicU64::new(0),
            lookup: Script::new(LOOKUP),
            put: Script::new(PUT),
            begin_write: Script::new(BEGIN_WRITE),
            bump: Script::new(BUMP),
            drop_epoch: Script::new(DROP_EPOCH),
        }
    }
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

/// TLS beyond what a `rediss://` URL says: a private CA, a client
/// certificate (PEM bytes).
#[derive(Debug, Clone, Default)]
pub struct RedisTls {
    pub ca: Option<Vec<u8>>,
    /// Certificate and key, for servers that require client certificates.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl Cache {
    /// Never fails on an unreachable Redis: it connects on first use.
    pub fn new(url: &str, prefix: &str, timeout: Duration, ttl: Duration) -> Result<Cache, redis::RedisError> {
        Cache::with_tls(url, &RedisTls::default(), prefix, timeout, ttl)
    }

    /// As [`Cache::new`]; `rediss://` URLs verify the server with `tls.ca`
    /// (else the Mozilla roots) and present `tls.client` if given.
    pub fn with_tls(
        url: &str,
        tls: &RedisTls,
        prefix: &str,
        timeout: Duration,
        ttl: Duration,
    ) -> Result<Cache, redis::RedisError> {
        let client = if tls.ca.is_none() && tls.client.is_none() {
            redis::Client::open(url)?
        } else {
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: tls
                        .client
                        .clone()
                        .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                            client_cert,
                            client_key,
                        }),
                    root_cert: tls.ca.clone(),
                },
            )?
        };
        Ok(Cache {
            inner: Arc::new(Inner::new(client, prefix.to_owned(), timeout, ttl, WRITE_LEASE)),
        })
    }

    /// With another write lease than [`WRITE_LEASE`] (for tests that wait
    /// one out). Only the lease this client takes changes.
    #[must_use]
    pub fn with_write_lease(self, lease: Duration) -> Cache {
        let i = &self.inner;
        Cache {
            inner: Arc::new(Inner::new(i.client.clone(), i.prefix.clone(), i.timeout, i.ttl, lease)),
        }
    }

    /// The key prefix of every key and channel of this cache.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The key prefix of a scope; also its name in notices.
    pub fn base(&self, scope: Scope<'_>) -> String {
        // On every cached API read: pieces pushed, not formatted.
        let mut generation = itoa::Buffer::new();
        let generation = generation.format(scope.generation);
        let mut base = String::with_capacity(self.inner.prefix.len() + scope.projection.len() + generation.len() + 3);
        for piece in [self.inner.prefix.as_str(), ":", scope.projection, ":g", generation] {
            base.push_str(piece);
        }
        base
    }

    /// The channel of write notices and fences.
    fn notices(&self) -> String {
        format!("{}:notices", self.inner.prefix)
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
            // No retries inside the driver: its backoff would outlast the
            // time limit and hide why it failed (a wrong password); ours is `BACKOFF`.
            .set_number_of_retries(0);
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

    fn failed(&self, op: &'static str, error: &dyn RedisFailure) {
        telemetry::cache_error(op);
        let now = now_millis();
        let said = self.inner.failing_since_said.load(Ordering::Relaxed);
        if said == 0 || now.saturating_sub(said) >= REMIND_EVERY.as_millis() as u64 {
            self.inner.failing_since_said.store(now, Ordering::Relaxed);
            warn!(op, error = %error.text(), "{}; serving from MongoDB, retrying.", error.says());
        } else {
            debug!(op, error = %error.text(), "Redis call failed.");
        }
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
            Ok(Some(Ok(v))) => {
                if self.inner.failing_since_said.swap(0, Ordering::Relaxed) != 0 {
                    info!("Redis answers again.");
                }
                Some(v)
            }
            Ok(Some(Err(e))) => {
                self.failed(op, &e);
                // A connection that lost its authentication (a rotated
                // password) never regains it by reconnecting on its own:
                // the next call after the backoff connects afresh.
                if e.kind() == redis::ErrorKind::AuthenticationFailed {
                    *self.inner.conn.lock().await = None;
                }
                None
            }
            // Connecting failed; already counted.
            Ok(None) => None,
            Err(_) => {
                self.failed(op, &TimedOut);
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
        if found.is_empty() {
            return Lookup::Writing;
        }
        // PTTL: -1 (no TTL) never happens here, -2 (gone) cannot in one script.
        let left = if found.len() == 3 {
            let ms = found
                .pop()
                .and_then(|ms| std::str::from_utf8(&ms).ok()?.parse::<u64>().ok());
            Duration::from_millis(ms.unwrap_or(0))
        } else {
            Duration::ZERO
        };
        let bytes = if found.len() == 2 { found.pop() } else { None };
        let epoch = found.pop().map(|e| String::from_utf8_lossy(&e).into_owned());
        match (epoch, bytes) {
            // Two answers met under this epoch: read the store until the bump.
            (Some(epoch), Some(bytes)) if bytes == CONFLICT => {
                telemetry::cache_lookup("redis", false);
                Lookup::Miss { epoch }
            }
            (Some(epoch), Some(bytes)) => {
                telemetry::cache_lookup("redis", true);
                Lookup::Hit { epoch, bytes, left }
            }
            (Some(epoch), None) => {
                telemetry::cache_lookup("redis", false);
                Lookup::Miss { epoch }
            }
            (None, _) => Lookup::Unavailable,
        }
    }

    /// Stores an answer read after `epoch` was observed.
    #[instrument(skip_all, fields(projection = scope.projection))]
    pub async fn put(&self, scope: Scope<'_>, epoch: &str, suffix: &str, bytes: &[u8]) -> Put {
        let base = self.base(scope);
        let key = format!("{base}:e{epoch}:{suffix}");
        let ttl = self.inner.ttl.as_secs().max(1);
        let script = &self.inner.put;
        let outcome: Option<Vec<i64>> = self
            .call("put", |mut conn| async move {
                script
                    .key(key)
                    .key(format!("{base}:epoch"))
                    .key(format!("{base}:writers"))
                    .arg(bytes)
                    .arg(ttl)
                    .arg(CONFLICT)
                    .arg(epoch)
                    .invoke_async(&mut conn)
                    .await
            })
            .await;
        match outcome.as_deref() {
            Some([1, left]) => Put::Stored {
                left: Duration::from_millis(u64::try_from(*left).unwrap_or(0)),
            },
            Some([0]) => Put::Conflict,
            Some(_) => Put::Stale,
            None => Put::Unavailable,
        }
    }

    /// Announces that `writer` is about to write a batch of the scope: until
    /// its [`Cache::bump_epoch`] (or `WRITE_LEASE` passes, if it dies), the
    /// API neither serves nor stores cached answers of the scope. Without
    /// it, keys filled before the write and keys filled after it could be
    /// served side by side for the moment until the bump, and a reader
    /// could see a course at v59 on a list page and then at v57 by id.
    /// `false`: Redis did not take it, so the write must wait (DESIGN §6).
    #[instrument(skip_all, fields(projection = scope.projection))]
    pub async fn begin_write(&self, scope: Scope<'_>, writer: &str) -> bool {
        let base = self.base(scope);
        let lease = self.inner.write_lease.as_millis() as u64;
        let script = &self.inner.begin_write;
        let channel = self.notices();
        let added: Option<i64> = self
            .call("begin write", |mut conn| async move {
                script
                    .key(format!("{base}:writers"))
                    .key(channel)
                    .key(format!("{base}:epoch"))
                    .arg(lease)
                    .arg(writer)
                    .arg(
                        Notice::WriteBegan {
                            writer: writer.to_owned(),
                            scope: base.clone(),
                        }
                        .to_string(),
                    )
                    .invoke_async(&mut conn)
                    .await
            })
            .await;
        added.is_some()
    }

    /// Makes every cached answer of the scope obsolete; a projector calls it
    /// after each committed batch. Returns whether Redis took it.
    ///
    /// Under `maxmemory` with `noeviction` Redis refuses the `SET`; deleting
    /// the epoch is still allowed, and readers that find no epoch and cannot
    /// set one bypass the cache, so freshness holds even then.
    pub async fn bump_epoch(&self, scope: Scope<'_>) -> bool {
        self.bump_epoch_for(scope, None).await
    }

    /// [`Cache::bump_epoch`], then ends `writer`'s write (in that order: the
    /// new epoch is in place before answers may be cached again).
    #[instrument(name = "bump_epoch", skip_all, fields(projection = scope.projection))]
    pub async fn bump_epoch_for(&self, scope: Scope<'_>, writer: Option<&str>) -> bool {
        let base = self.base(scope);
        let key = format!("{base}:epoch");
        let channel = self.notices();
        let notice = Notice::Bumped {
            writer: writer.map(str::to_owned),
            scope: base.clone(),
        }
        .to_string();
        let epoch = new_epoch();
        let script = &self.inner.bump;
        let set: Option<i64> = self
            .call("bump", |mut conn| {
                let (key, channel, notice, epoch) = (key.clone(), channel.clone(), notice.clone(), epoch.clone());
                async move {
                    script
                        .key(key)
                        .key(format!("{base}:writers"))
                        .key(channel)
                        .arg(epoch)
                        .arg(writer.unwrap_or(""))
                        .arg(notice)
                        .invoke_async(&mut conn)
                        .await
                }
            })
            .await;
        if set.is_some() {
            debug!(epoch, "Cache epoch bumped.");
            return true;
        }
        // Skip the backoff window: this is the call that must get through.
        self.inner.skip_until.store(0, Ordering::Relaxed);
        let script = &self.inner.drop_epoch;
        let deleted: Option<i64> = self
            .call("bump", |mut conn| async move {
                script.key(key).key(channel).arg(notice).invoke_async(&mut conn).await
            })
            .await;
        deleted.is_some()
    }
}

impl Cache {
    /// Keeps `local` in step with the workers' notices until `cancel`:
    /// subscribes, fences the subscription every `FENCE_EVERY`, and
    /// resubscribes (a new era) when it ends or its fences stop coming
    /// back. While it is down `local` serves nothing.
    pub async fn follow_notices(&self, local: Arc<LocalCache>, cancel: CancellationToken) {
        let me = format!("{:016x}", rand::random::<u64>());
        let channel = self.notices();
        while !cancel.is_cancelled() {
            local.distrust();
            let subscribe = async {
                let mut pubsub = self.inner.client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let pubsub = match tokio::time::timeout(self.inner.timeout, subscribe).await {
                Ok(Ok(pubsub)) => pubsub,
                failed => {
                    let error = failed.map_or_else(|_| "timed out".to_owned(), |r| format!("{:?}", r.err()));
                    warn!(error, "Cannot subscribe to cache notices; memory layer off.");
                    telemetry::cache_error("subscribe");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(BACKOFF) => continue,
                    }
                }
            };
            // Notices sent while unsubscribed are lost: forget everything.
            local.new_era();
            debug!("Following cache notices.");
            let mut messages = pubsub.into_on_message();
            let mut fence = tokio::time::interval(FENCE_EVERY);
            fence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut heard = std::time::Instant::now();
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = fence.tick() => {
                        if heard.elapsed() > SILENT_SUBSCRIPTION {
                            warn!("Cache notices went silent; resubscribing.");
                            telemetry::cache_error("notices");
                            break;
                        }
                        let payload = Notice::Fence { from: me.clone(), sent_ms: local.now_ms() }.to_string();
                        let channel = channel.clone();
                        let _: Option<i64> = self
                            .call("fence", |mut conn| async move { conn.publish(channel, payload).await })
                            .await;
                    }
                    message = messages.next() => {
                        let Some(message) = message else {
                            warn!("Cache notices subscription closed; resubscribing.");
                            break;
                        };
                        let payload = String::from_utf8_lossy(message.get_payload_bytes());
                        match payload.parse::<Notice>() {
                            Ok(Notice::Fence { from, sent_ms }) if from == me => {
                                local.fenced(sent_ms);
                                heard = std::time::Instant::now();
                            }
                            Ok(Notice::Fence { .. }) | Err(_) => {}
                            Ok(Notice::WriteBegan { writer, scope }) => local.write_began(&scope, &writer),
                            Ok(Notice::Bumped { writer, scope }) => local.bumped(&scope, writer.as_deref()),
                            Ok(Notice::Unknown { scope }) => local.notice(&scope),
                        }
                    }
                }
            }
        }
    }
}

impl Cache {
    /// How long an entry lives in Redis.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }
}
