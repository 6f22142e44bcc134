//! courseview: the read side of CQRS for a course platform.
//!
//! Course events flow from Kafka through projector workers into MongoDB read
//! models, which a Redis-cached, read-only axum API serves.
//!
//! - [`decode`]: Kafka records → course events (per-type topics, Debezium outbox).
//! - `courseview_projections` (the `projections/` crate): the read models as pure code.
//! - [`read_model`]: the projections by name, as the worker and API run them.
//! - [`worker`]: consume, apply in batches, store offsets; exactly-once effect.
//! - [`kafka`], [`mongo`], [`cache`] (Redis), [`http`]: one module per external system.
//! - [`cli`]: one file per subcommand; [`shutdown`], [`telemetry`]: cross-cutting.

pub mod cache;
pub mod cli;
pub mod dead_letter;
pub mod decode;
pub mod http;
pub mod kafka;
pub mod local_cache;
pub mod mongo;
pub mod read_model;
pub mod rebuild;
pub mod record;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod worker;
