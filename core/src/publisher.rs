//! The [`Publisher`] trait.

use async_trait::async_trait;

use crate::{Destination, Message, Result};

/// Sends messages to a queue or topic.
///
/// Object-safe: services hold a `Box<dyn Publisher>` (from `cloudbus::connect_publisher`, or
/// a transport's `XPublisher::connect`) and
/// never name the transport. All methods take `&self`, so one publisher can be shared by
/// many tasks (wrap it in an `Arc`).
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes one message and returns its id once the broker has accepted it.
    ///
    /// Input is validated before any network call: a message that is too large, has an
    /// invalid attribute or a field the transport cannot carry fails with
    /// [`crate::Error::TooLarge`], [`crate::Error::InvalidAttribute`],
    /// [`crate::Error::InvalidInput`] or [`crate::Error::Unsupported`].
    async fn publish(&self, message: Message) -> Result<String>;

    /// Publishes many messages, in as few calls as the transport allows, and returns one
    /// outcome per message in input order: the id, or why that message did not go.
    ///
    /// A batch can partly fail; every `Err` entry is a message the broker did not accept,
    /// and every `Ok` entry one it did.
    async fn publish_batch(&self, messages: Vec<Message>) -> Vec<Result<String>> {
        let mut outcomes = Vec::with_capacity(messages.len());
        for message in messages {
            outcomes.push(self.publish(message).await);
        }
        outcomes
    }

    /// Flushes anything buffered and releases the connection. Later calls fail with
    /// [`crate::Error::Closed`]. Closing twice is harmless.
    async fn close(&self) -> Result<()>;

    /// What this publisher sends to, as telemetry names it.
    fn destination(&self) -> Destination;
}

#[async_trait]
impl<T: Publisher + ?Sized> Publisher for Box<T> {
    async fn publish(&self, message: Message) -> Result<String> {
        (**self).publish(message).await
    }

    async fn publish_batch(&self, messages: Vec<Message>) -> Vec<Result<String>> {
        (**self).publish_batch(messages).await
    }

    async fn close(&self) -> Result<()> {
        (**self).close().await
    }

    fn destination(&self) -> Destination {
        (**self).destination()
    }
}

#[async_trait]
impl<T: Publisher + ?Sized> Publisher for std::sync::Arc<T> {
    async fn publish(&self, message: Message) -> Result<String> {
        (**self).publish(message).await
    }

    async fn publish_batch(&self, messages: Vec<Message>) -> Vec<Result<String>> {
        (**self).publish_batch(messages).await
    }

    async fn close(&self) -> Result<()> {
        (**self).close().await
    }

    fn destination(&self) -> Destination {
        (**self).destination()
    }
}
