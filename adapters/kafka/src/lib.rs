//! # cloudbus-kafka
//!
//! Kafka for cloudbus: Amazon MSK, Azure Event Hubs' Kafka endpoint, Confluent and
//! self-hosted clusters, on `rdkafka` (librdkafka). `kafka://<topic>` publishes;
//! `kafka://<topic>?subscription=<group>` receives through the consumer group `group`.
//!
//! The contract is the one every cloudbus transport keeps, built on what Kafka has (a log
//! per partition and one committed offset per group and partition):
//!
//! - **Publishing**: an idempotent producer (`acks=all`), so producer retries never
//!   duplicate; `publish` returns once the broker has acknowledged the record. The ordering
//!   key is the record key (one key, one partition, in order).
//! - **Settling**: see [`ledger`](crate#settlement) — acks commit only the contiguous
//!   settled prefix of each partition; `nack(delay)` redelivers the record in place, later
//!   records of its key waiting behind it; the maximum delivery count moves a record to the
//!   subscription's dead-letter topic `<topic>.<group>.dlq`; a partition's deliveries cannot
//!   be settled after the group moved it.
//! - **Replay**: a new subscription starts at `latest` (what is published from its
//!   creation on), `earliest` or a point in time (`start=`).
//!
//! ## Settlement
//!
//! Kafka has no broker-side locks; the subscriber that holds a partition keeps them. A
//! record received and not settled within `visibility` is handed out again; `extend` moves
//! that deadline. The record stays with this subscriber while the group assigns it the
//! partition: when the group moves the partition (a member joined, left or crashed), its
//! unsettled records go to the new owner, and settling them here is `LockLost`.
//!
//! ```no_run
//! use cloudbus_core::driver::TransportConfig;
//! use cloudbus_core::{Message, Publisher};
//! use cloudbus_kafka::{KafkaConfig, KafkaPublisher};
//!
//! # async fn run() -> cloudbus_core::Result<()> {
//! let config = KafkaConfig::from_url("kafka://orders?create=true&brokers=127.0.0.1:9092")?;
//! let publisher = KafkaPublisher::connect(&config).await?;
//! publisher.publish(Message::new("hello").with_ordering_key("customer-7")).await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod admin;
mod client;
mod config;
mod error;
#[cfg(test)]
mod fuzz;
mod inspector;
mod ledger;
mod mapping;
mod msk;
mod publisher;
mod subscriber;

pub use admin::create_subscription;
pub use config::{Auth, BROKERS_ENV, DEFAULT_BROKERS, EVENT_HUBS_ENV, KafkaConfig, PASSWORD_ENV};
pub use inspector::KafkaInspector;
pub use publisher::KafkaPublisher;
pub use subscriber::KafkaSubscriber;

const TRANSPORT: &str = "kafka";
