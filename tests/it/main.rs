//! Integration tests against the real services that `scripts/services`
//! starts (Redis, a Kafka-protocol broker, a MongoDB-wire server). Each test
//! isolates itself with its own topics, consumer groups, database and Redis
//! key prefix, so tests run in parallel and can be re-run.

mod api;
mod auth;
mod broker;
mod cache;
mod catchup;
mod chaos;
mod chart;
mod cli;
mod codecs;
mod contract;
mod cors;
mod debezium;
mod faults;
mod freshness;
mod gaps;
mod helpers;
mod mongo_compat;
mod operations;
mod outage;
mod outbox;
mod pause;
mod peers;
mod pipeline;
mod secured;
mod status_page;
mod tracing;
