//! Kafka: the only module that knows rdkafka. One file per job: `consumer`
//! (feeds the projections; `align` keeps its partitions in step by time),
//! `gap` (stored offsets the log does not hold),
//! `producer` (for the demo and tests), `admin` (topics and watermarks),
//! `config` (client properties), `report` (connection failure episodes);
//! here, the client error type they share.
//!
//! The consumer is a `BaseConsumer` polled on a dedicated OS thread. That
//! thread is where librdkafka runs rebalance callbacks, and there we may
//! block on MongoDB to read the projection's stored offsets and assign the
//! partitions exactly there: the stored offsets, not the group's, are the
//! source of truth (DESIGN §2).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedHeaders, BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

use crate::record::Record;
use report::{ConnectionReport, Reporting};

mod admin;
mod align;
pub mod config;
mod consumer;
mod gap;
mod producer;
pub mod report;
mod topic_id;

pub use admin::{create_topics, Inspector, PartitionLog};
pub use config::{KafkaConfigError, KafkaConnection, PropertiesBuilder};
use consumer::topic_subscription;
pub use consumer::{
    ByteBudget, Consumer, ConsumerSettings, Feed, HoldRequest, ReaderExit, StuckBoard, StuckPartition, READ_CHUNK,
    STUCK_AFTER,
};
pub use gap::{Gap, GapKind, OffsetSource, OffsetsUnavailable, OnGap};
pub use producer::{Outgoing, Producer};
pub use topic_id::topic_ids;

/// Kafka client errors. Broker trouble is transient; configuration is not.
#[derive(Debug, thiserror::Error)]
pub enum KafkaClientError {
    #[error("invalid Kafka configuration: {0}")]
    Config(String),
    #[error("Kafka request failed: {0}")]
    Request(String),
}

impl From<KafkaError> for KafkaClientError {
    fn from(e: KafkaError) -> Self {
        match e {
            KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) | KafkaError::Subscription(_) => {
                KafkaClientError::Config(e.to_string())
            }
            other => KafkaClientError::Request(other.to_string()),
        }
    }
}
