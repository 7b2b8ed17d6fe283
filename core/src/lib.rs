//! # cloudbus-core
//!
//! The transport-neutral heart of [cloudbus](https://docs.rs/cloudbus): [`Message`], the
//! [`Publisher`] / [`Subscriber`] traits and [`Delivery`] settlement, [`Error`], the
//! consumer runtime ([`Consumer`]), the in-process broker ([`memory`]), configuration
//! helpers ([`config`]) and what adapter authors need ([`driver`]). It names no cloud
//! transport: each of those is a crate of its own that depends on this one, and the
//! `cloudbus` facade chooses between them by URL.
//!
//! Services normally depend on `cloudbus`, which re-exports all of this. Adapter authors
//! depend on this crate and on `cloudbus-testkit` (the conformance suite).
//!
//! ```
//! use std::time::Duration;
//! use cloudbus_core::memory::{MemoryConfig, MemoryPublisher, MemorySubscriber};
//! use cloudbus_core::{Message, Publisher, Subscriber};
//!
//! # async fn run() -> cloudbus_core::Result<()> {
//! let config = MemoryConfig::new("core-quickstart");
//! let publisher = MemoryPublisher::connect(&config).await?;
//! let subscriber = MemorySubscriber::connect(&config).await?;
//! publisher.publish(Message::new("hello")).await?;
//! for delivery in subscriber.receive(10, Duration::from_secs(5)).await? {
//!     assert_eq!(delivery.message().text(), Some("hello"));
//!     delivery.ack().await?;
//! }
//! # Ok(())
//! # }
//! # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
//! ```

#![warn(missing_docs)]

pub mod config;
pub mod consumer;
mod destination;
pub mod driver;
pub mod error;
pub mod inspector;
pub mod memory;
pub mod message;
pub mod publisher;
pub mod subscriber;

pub use consumer::Consumer;
pub use destination::Destination;
pub use error::{Error, Result};
pub use inspector::{Inspector, Peeked, Stats};
pub use message::{Attributes, Message};
pub use publisher::Publisher;
pub use subscriber::{Delivery, Subscriber, SubscriberExt};
