//! The API's cache (DESIGN §5): [`redis`], epoch-keyed cache-aside in
//! Redis that workers invalidate; [`local`], answers held in this process's
//! memory in front of it; [`notice`], the pub/sub protocol that keeps
//! memory honest; [`read_through`], the two-tier lookup the API calls.

pub mod local;
pub mod notice;
pub mod read_through;
pub mod redis;

pub use local::LocalCache;
pub use notice::{Notice, FENCE_EVERY, TRUST, WRITE_LEASE};
pub use read_through::{Answer, ReadThrough, ABSENT};
pub use redis::{Cache, Lookup, Put, RedisTls, Scope};
