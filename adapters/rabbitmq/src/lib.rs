//! # cloudbus-rabbitmq
//!
//! RabbitMQ for cloudbus: Amazon MQ for RabbitMQ and self-hosted brokers, on `lapin`
//! (AMQP 0-9-1).
//!
//! - `rabbitmq://<queue>`: a task queue; publishing puts messages in it, its subscribers
//!   compete for them.
//! - `rabbitmq://<exchange>?subscription=<queue>`: publish/subscribe; publishing goes to
//!   the exchange, each subscription is a queue bound to it and gets every message.
//!
//! The contract is the one every cloudbus transport keeps, at least once by default:
//!
//! - **Publishing**: persistent messages, publisher confirms always on (`publish` returns
//!   after the broker's confirm) and `mandatory` (a message no queue takes is an error,
//!   not a loss). Concurrent publishes share one channel with their confirms pipelined.
//! - **Queues**: durable quorum queues, whose delivery limit dead-letters at least once
//!   into `<queue>.dlq` after `max_deliveries`.
//! - **Settling**: ack; `nack(ZERO)` returns the message to the queue with its delivery
//!   count plus one; `nack(delay)` and delayed delivery go through delay queues (see
//!   [the delays](crate#delays)); `dead_letter` puts a copy with the reason into the
//!   dead-letter queue before acking the original. RabbitMQ has no lock that runs out, so
//!   the subscriber keeps one (`visibility`) and returns an unsettled message to the queue
//!   when it ends.
//! - **Recovery**: publishers and subscribers connect again with backoff by themselves.
//!
//! ## Delays
//!
//! Messages wait in quorum queues whose messages expire after a fixed time, one level per
//! power of two of 100 ms, and are dead-lettered onward to the next level and finally to
//! their queue (NServiceBus's design): a delay is rounded up to 100 ms, and is at most
//! about 77 days.
//!
//! ```no_run
//! use cloudbus_core::driver::TransportConfig;
//! use cloudbus_core::{Message, Publisher};
//! use cloudbus_rabbitmq::{RabbitMqConfig, RabbitMqPublisher};
//!
//! # async fn run() -> cloudbus_core::Result<()> {
//! // The server comes from RABBITMQ_URL (or the config's `uri`).
//! let config = RabbitMqConfig::from_url("rabbitmq://orders?create=true")?;
//! let publisher = RabbitMqPublisher::connect(&config).await?;
//! publisher.publish(Message::new("hello")).await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod client;
mod config;
mod error;
#[cfg(test)]
mod fuzz;
mod inspector;
mod mapping;
mod publisher;
mod subscriber;
mod topology;

pub use config::{
    DEAD_LETTER_QUEUE_SUFFIX, DEFAULT_URI, RabbitMqConfig, URI_ENV, dead_letter_queue,
};
pub use inspector::RabbitMqInspector;
pub use publisher::RabbitMqPublisher;
pub use subscriber::{RabbitMqSubscriber, create_subscription};

const TRANSPORT: &str = "rabbitmq";
