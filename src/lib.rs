//! courseview: the read side of CQRS for a course platform.
//!
//! Course events flow from Kafka through projector workers into MongoDB read
//! models, which a Redis-cached, read-only axum API serves.
//!
//! - [`decode`]: Kafka records → course events (per-type topics, Debezium outbox).
//! - `courseview_projections` (the `projections/` crate): the read models as pure code.
//! - [`read_model`]: the projections by name, as the worker and API run them.
//! - [`worker`]: consume, apply in batches, store offsets; exactly-once effect
//!   (`applier`, `states`, `consume`, `follow`).
//! - [`rebuild`]: replay into a new generation beside the serving one, switch
//!   (a `Mode` and the `Phase`s it runs).
//! - [`kafka`], [`mongo`], [`cache`] (Redis and the in-process layer), [`http`]:
//!   one module per external system, a folder of one file per job where it
//!   holds several (`kafka`: config, consumer, gap, topic_id (DescribeTopics
//!   through librdkafka's C API), admin, producer, report; `mongo`: pointer, read
//!   models, checkpoints and topic ids, dead letters, registry, queries, and
//!   nothing outside it names BSON; `cache`:
//!   redis, local, notice, read-through; `http`: routes, params, respond,
//!   snapshot, auth, cors, error).
//! - [`cli`]: one file per subcommand; [`shutdown`], [`telemetry`]: cross-cutting.

pub mod cache;
pub mod cli;
pub mod dead_letter;
pub mod decode;
pub mod http;
pub mod kafka;
pub mod mongo;
pub mod read_model;
pub mod rebuild;
pub mod record;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod worker;
