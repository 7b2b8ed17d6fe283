//! # cloudbus-azure
//!
//! Azure Service Bus for cloudbus: `servicebus://<queue or topic>[?subscription=<name>]`,
//! on a thin Service Bus client of its own over AMQP 1.0 ([`fe2o3-amqp`](https://docs.rs/fe2o3-amqp)).
//!
//! A publisher, subscriber or inspector keeps one connection (reconnected with backoff
//! when it drops) and runs on the caller's runtime. A publisher keeps several batch
//! transfers in flight on one sender link. A subscriber's receive links (`receivers`) each
//! have a task that receives and settles (AMQP settles on the receiving link) without
//! waiting behind a pending receive, and renews locks that
//! [`Delivery::extend`](cloudbus_core::Delivery::extend) asked to keep.
//!
//! Settlement: ack = complete; `nack(ZERO)` = abandon; `nack(delay)` keeps the message
//! locked (renewing the lock) until the delay has passed and then abandons it, so it is
//! redelivered no sooner than the delay, with its delivery count plus one, in its place in
//! its session; `dead_letter` = dead-letter with reason and description; `extend` renews
//! the lock, repeatedly until the requested time. If the process dies meanwhile, the lock
//! simply expires and the message is redelivered (possibly before the nack delay).
//!
//! Ordering keys need a session-enabled entity (`?sessions=true`): the key is the session
//! id. Such an entity needs a session id on every message, so messages without a key go to
//! one of 16 `cloudbus-unordered-<n>` sessions (by a hash of the message id), which
//! subscribers report as "no ordering key".
//!
//! ```no_run
//! use cloudbus_azure::{ServiceBusConfig, ServiceBusPublisher};
//! use cloudbus_core::driver::TransportConfig;
//! use cloudbus_core::{Message, Publisher};
//!
//! # async fn run() -> cloudbus_core::Result<()> {
//! // Credentials from AZURE_SERVICEBUS_CONNECTION_STRING, or `namespace` for Entra ID.
//! let config = ServiceBusConfig::from_url("servicebus://orders")?;
//! let publisher = ServiceBusPublisher::connect(&config).await?;
//! publisher.publish(Message::new("hello")).await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod config;
mod credentials;
mod error;
#[cfg(test)]
mod fuzz;
mod inspector;
mod mapping;
mod protocol;
mod publisher;
mod receiver;
mod settle;
mod subscriber;

pub use config::{Credential, ReceiveMode, ServiceBusConfig};
pub use inspector::ServiceBusInspector;
pub use publisher::ServiceBusPublisher;
pub use subscriber::ServiceBusSubscriber;

const TRANSPORT: &str = "servicebus";
/// The environment variable read when the config has no connection string.
pub const CONNECTION_STRING_ENV: &str = "AZURE_SERVICEBUS_CONNECTION_STRING";
