//! What adapter authors need, apart from what services call: how a delivery is settled
//! ([`Settle`]), what a transport knows about a delivery ([`DeliveryInfo`], used with
//! [`Delivery::new`](crate::Delivery::new)), the argument checks every transport makes,
//! automatic batching ([`batcher`]), and the two traits that plug a transport into the
//! `cloudbus` facade's table and into the conformance suite: [`Connect`] and
//! [`TransportConfig`].
//!
//! A transport is one crate that depends on this core only. It owns one configuration
//! struct per URL scheme; that struct implements [`TransportConfig`] (and so [`Connect`]),
//! and its publisher and subscriber types are built with
//! `XPublisher::connect(&XConfig)` / `XSubscriber::connect(&XConfig)`.

pub mod batcher;

use std::fmt::Debug;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{ConfigUrl, Start};
use crate::{Error, Inspector, Publisher, Result, Subscriber};

/// How a transport settles one delivery. Implemented by adapters; services use the
/// methods of [`Delivery`](crate::Delivery) instead.
#[async_trait]
pub trait Settle: Send + Sync {
    /// Removes the message for good.
    async fn ack(self: Box<Self>) -> Result<()>;
    /// Makes the message available again no sooner than `delay` from now.
    async fn nack(self: Box<Self>, delay: Duration) -> Result<()>;
    /// Moves the message to the dead-letter queue, recording `reason` and `description`
    /// in the [`DEAD_LETTER_REASON`](crate::subscriber::DEAD_LETTER_REASON) and
    /// [`DEAD_LETTER_DESCRIPTION`](crate::subscriber::DEAD_LETTER_DESCRIPTION) attributes.
    async fn dead_letter(self: Box<Self>, reason: &str, description: &str) -> Result<()>;
    /// Keeps the message locked for `by` from now; returns the new lock expiry.
    async fn extend(&mut self, by: Duration) -> Result<SystemTime>;
}

/// What a transport knows about a delivery besides the message: used by adapters to
/// build a [`Delivery`](crate::Delivery).
#[derive(Debug, Clone)]
pub struct DeliveryInfo {
    /// How many times the message has been delivered, 1 on first delivery.
    pub delivery_count: u32,
    /// When the broker enqueued the message.
    pub enqueued_at: SystemTime,
    /// The transport's own id for the message (SQS MessageId, Service Bus sequence number...).
    pub transport_id: String,
    /// When the lock on this delivery expires, if the transport tells.
    pub locked_until: Option<SystemTime>,
}

/// Checks the `max` argument of [`Subscriber::receive`]: at least 1.
pub fn check_receive_max(transport: &'static str, max: usize) -> Result<()> {
    if max == 0 {
        return Err(Error::InvalidInput {
            transport,
            field: "max",
            rule: "receive at least 1 message".into(),
        });
    }
    Ok(())
}

/// Something that can open a publisher and a subscriber: a transport's configuration.
/// Object-safe, so a conformance harness can hand out `Box<dyn Connect>` for any adapter,
/// including ones written outside this workspace.
#[async_trait]
pub trait Connect: Debug + Send + Sync {
    /// Opens a publisher on what this configuration names.
    async fn connect_publisher(&self) -> Result<Box<dyn Publisher>>;
    /// Opens a subscriber on what this configuration names.
    async fn connect_subscriber(&self) -> Result<Box<dyn Subscriber>>;
    /// Opens an [`Inspector`] on the queue or subscription this configuration names (it
    /// creates nothing). A transport that can tell nothing returns `Unsupported`.
    async fn connect_inspector(&self) -> Result<Box<dyn Inspector>>;
}

/// A transport's configuration: one struct per URL scheme, parsed from a URL and from
/// serde through the same `Deserialize`, so both take the same options with the same
/// defaults. The `cloudbus` facade lists every implementation in its table.
///
/// The conventions: `#[serde(default, deny_unknown_fields)]` (the `Default` impl is the
/// one place for defaults), `#[non_exhaustive]` with public fields, secrets as
/// [`Secret`](crate::config::Secret) (which a URL cannot carry).
pub trait TransportConfig:
    Connect + Clone + PartialEq + Serialize + DeserializeOwned + 'static
{
    /// The URL scheme, which is also the configuration's `transport` tag: `sqs`.
    const SCHEME: &'static str;

    /// Where a subscriber on this configuration finds its dead-letter queue: for most
    /// transports the same type, for SNS an SQS queue.
    type DeadLetters: TransportConfig;

    /// Builds the configuration from a URL of this scheme, usually with one
    /// [`ConfigUrl::deserialize`] call that adds the path as the entity's name.
    fn from_config_url(url: &ConfigUrl) -> Result<Self>;

    /// The same entity received through `subscription` (the way to receive from a topic),
    /// or `Unsupported` where the entity cannot have subscriptions.
    fn with_subscription(&self, subscription: &str) -> Result<Self>;

    /// The dead-letter queue of the queue or subscription this configuration receives from.
    fn dead_letter_queue(&self) -> Result<Self::DeadLetters>;

    /// Where to publish a dead letter of this queue or subscription so that it comes back
    /// to this queue or subscription only (redrive): the queue itself, or the queue behind
    /// a subscription (SNS, RabbitMQ). `Unsupported` where only the topic can be published
    /// to, whose every subscription would get the copy; the error says so.
    fn redrive_target(&self) -> Result<Self::DeadLetters>;

    /// The same subscription, starting at `start` when it is created: how to replay a
    /// topic. `Unsupported` (the default) for transports that keep no log of delivered
    /// messages.
    fn with_start(&self, start: Start) -> Result<Self> {
        match start {
            Start::Latest => Ok(self.clone()),
            other => Err(Error::Unsupported {
                transport: Self::SCHEME,
                feature: format!(
                    "replay (start={other}): {}:// keeps no log of delivered messages, so a \
                     subscription can only start at the messages published after it was created",
                    Self::SCHEME
                ),
            }),
        }
    }

    /// Parses a URL of this scheme: `SqsConfig::from_url("sqs://orders?create=true")`.
    fn from_url(url: &str) -> Result<Self> {
        let parsed = ConfigUrl::parse(url)?;
        if parsed.scheme() != Self::SCHEME {
            return Err(Error::config(format!(
                "`{}` is not a {}:// URL",
                parsed.redacted(),
                Self::SCHEME
            )));
        }
        Self::from_config_url(&parsed)
    }
}
