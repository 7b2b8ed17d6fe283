//! # cloudbus
//!
//! One [`Publisher`] / [`Subscriber`] API over Amazon SQS, Amazon SNS (fanning out to SQS
//! queues), Azure Service Bus, Kafka, RabbitMQ, and an in-process broker. A URL or a [`Config`] decides
//! which: switching clouds is a configuration change, not a rewrite.
//!
//! ## Quick start
//!
//! ```
//! use std::time::Duration;
//! use cloudbus::{Message, connect_publisher, connect_subscriber};
//!
//! # async fn run() -> cloudbus::Result<()> {
//! // memory:// is the embedded broker; sqs://, sns:// and servicebus:// take the same code.
//! let url = "memory://quickstart";
//! let publisher = connect_publisher(url).await?;
//! let subscriber = connect_subscriber(url).await?;
//!
//! publisher
//!     .publish(Message::new("hello").with_attribute("tenant", "acme"))
//!     .await?;
//!
//! for delivery in subscriber.receive(10, Duration::from_secs(5)).await? {
//!     assert_eq!(delivery.message().text(), Some("hello"));
//!     assert_eq!(delivery.delivery_count(), 1);
//!     delivery.ack().await?; // or nack(delay), dead_letter(reason, description)
//! }
//! # Ok(())
//! # }
//! # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
//! ```
//!
//! ## Guarantees
//!
//! - At-least-once: a message leaves its queue only when a delivery is acked (or
//!   dead-lettered). A delivery that is nacked, dropped, or whose lock expires comes back
//!   with its [`Delivery::delivery_count`] plus one.
//! - Bodies are bytes and round-trip byte-exact; attributes round-trip exactly or the
//!   publish fails with [`Error::InvalidAttribute`] naming the key and the rule.
//! - A transport that cannot do what a message asks returns [`Error::Unsupported`];
//!   limits are checked before any network call.
//!
//! ## Crates and cargo features
//!
//! This facade re-exports [`cloudbus-core`](cloudbus_core) (the API, the consumer runtime
//! and the in-process broker) and connects by URL to the adapters its features enable:
//!
//! - `aws`: `sqs://` and `sns://` ([`aws`], the `cloudbus-aws` crate).
//! - `azure`: `servicebus://` ([`azure`], the `cloudbus-azure` crate).
//! - `kafka`: `kafka://` ([`kafka`], the `cloudbus-kafka` crate).
//! - `rabbitmq`: `rabbitmq://` ([`rabbitmq`], the `cloudbus-rabbitmq` crate).
//!
//! The conformance suite every transport passes is the `cloudbus-testkit` crate.

#![warn(missing_docs)]

pub mod config;
mod connect;
#[cfg(test)]
mod fuzz;

/// Amazon SQS and SNS: the `cloudbus-aws` crate (feature `aws`).
#[cfg(feature = "aws")]
pub use cloudbus_aws as aws;
/// Azure Service Bus: the `cloudbus-azure` crate (feature `azure`).
#[cfg(feature = "azure")]
pub use cloudbus_azure as azure;
pub use cloudbus_core::{
    Attributes, Consumer, Delivery, Destination, Error, Inspector, Message, Peeked, Publisher,
    Result, Stats, Subscriber, SubscriberExt, consumer, driver, error, inspector, memory, message,
    publisher, subscriber,
};
/// Kafka: the `cloudbus-kafka` crate (feature `kafka`).
#[cfg(feature = "kafka")]
pub use cloudbus_kafka as kafka;
/// RabbitMQ: the `cloudbus-rabbitmq` crate (feature `rabbitmq`).
#[cfg(feature = "rabbitmq")]
pub use cloudbus_rabbitmq as rabbitmq;
pub use config::{Config, IntoConfig};
pub use connect::{connect_inspector, connect_publisher, connect_subscriber};

/// The README's examples, compiled and run as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
