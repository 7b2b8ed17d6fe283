//! The [`Subscriber`] trait, [`Delivery`] and its settlement, and a stream helper.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};

use crate::driver::{DeliveryInfo, Settle};
use crate::{Destination, Error, Message, Result};

/// The attribute that carries the reason on a dead-lettered message, on every transport
/// (the name Service Bus uses).
pub const DEAD_LETTER_REASON: &str = "DeadLetterReason";
/// The attribute that carries the description on a dead-lettered message, on every transport.
pub const DEAD_LETTER_DESCRIPTION: &str = "DeadLetterErrorDescription";
/// The attribute that says where a dead-lettered message was, on transports that record it
/// apart from the broker's own properties (Kafka: `<topic>/<partition>/<offset>`).
pub const DEAD_LETTER_SOURCE: &str = "DeadLetterSource";
/// The reason given when a transport dead-letters a message that reached its maximum
/// delivery count (where the transport records a reason).
pub const MAX_DELIVERY_COUNT_EXCEEDED: &str = "MaxDeliveryCountExceeded";

/// Receives messages from a queue or a subscription.
///
/// Object-safe: services hold a `Box<dyn Subscriber>` (from `cloudbus::connect_subscriber`,
/// or a transport's `XSubscriber::connect`).
/// Each received message is a [`Delivery`] that must be settled: [`Delivery::ack`] removes
/// it; anything else (a nack, an error, a crash, a dropped delivery) makes it come back.
#[async_trait]
pub trait Subscriber: Send + Sync {
    /// Receives up to `max` messages, waiting up to `wait` for the first one to arrive.
    /// Returns an empty vector when none arrived in time.
    ///
    /// Each delivery is locked (invisible to other receivers) until it is settled or its
    /// lock expires, after which it is delivered again with its delivery count plus one.
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>>;

    /// Stops receiving and releases the connection. Later calls fail with
    /// [`Error::Closed`]. Unsettled deliveries come back after their locks expire.
    async fn close(&self) -> Result<()>;

    /// Whether dropping a [`receive`](Subscriber::receive) future before it completes is
    /// harmless: `true` when the transport locks messages only in the step that returns
    /// them (the in-memory broker). `false`, the default, when the broker may go on taking
    /// messages for a call the client gave up on, as an SQS long poll does after the client
    /// hangs up (those messages stay invisible until their lock expires). The
    /// [`Consumer`](crate::Consumer) lets a receive call in progress at shutdown finish
    /// (within its shutdown deadline) and releases what it returns, unless this is `true`.
    fn receive_is_cancel_safe(&self) -> bool {
        false
    }

    /// How many [`receive`](Subscriber::receive) calls can usefully run at once: more than
    /// one when each is an independent request to the broker (SQS long polls), `1` (the
    /// default) when the transport serves them one after another. The
    /// [`Consumer`](crate::Consumer) runs at most this many.
    fn concurrent_receives(&self) -> usize {
        1
    }

    /// The most messages one [`receive`](Subscriber::receive) call usefully asks for: 10
    /// (the default, SQS's limit per request), more where the broker streams a call's
    /// messages under one grant of credit (Service Bus). The
    /// [`Consumer`](crate::Consumer) asks for no more per call.
    fn receive_batch(&self) -> usize {
        10
    }

    /// What this subscriber receives from, as telemetry names it.
    fn destination(&self) -> Destination;
}

/// A received message, locked for this receiver until it is settled.
///
/// Settling consumes the delivery, so a message cannot be settled twice. A delivery that is
/// dropped without being settled is not lost: its lock expires and the message is
/// delivered again.
pub struct Delivery {
    message: Message,
    delivery_count: u32,
    enqueued_at: SystemTime,
    transport_id: String,
    locked_until: Option<SystemTime>,
    settle: Box<dyn Settle>,
}

impl Delivery {
    /// Builds a delivery. For adapter authors (see [`crate::driver`]).
    pub fn new(message: Message, info: DeliveryInfo, settle: Box<dyn Settle>) -> Self {
        Delivery {
            message,
            delivery_count: info.delivery_count,
            enqueued_at: info.enqueued_at,
            transport_id: info.transport_id,
            locked_until: info.locked_until,
            settle,
        }
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// How many times this message has been delivered, including this time (1 on first delivery).
    pub fn delivery_count(&self) -> u32 {
        self.delivery_count
    }

    /// When the broker enqueued the message.
    pub fn enqueued_at(&self) -> SystemTime {
        self.enqueued_at
    }

    /// The transport's own id for this message (not the cloudbus [`Message::id`]).
    pub fn transport_id(&self) -> &str {
        &self.transport_id
    }

    /// When the lock on this delivery expires, where the transport tells.
    pub fn locked_until(&self) -> Option<SystemTime> {
        self.locked_until
    }

    /// Removes the message: processing succeeded.
    pub async fn ack(self) -> Result<()> {
        self.settle.ack().await
    }

    /// Returns the message to the queue, to be delivered again no sooner than `delay`
    /// from now, with its delivery count plus one. `Duration::ZERO` redelivers at once.
    pub async fn nack(self, delay: Duration) -> Result<()> {
        self.settle.nack(delay).await
    }

    /// Moves the message to the dead-letter queue. The copy there carries `reason` and
    /// `description` in the [`DEAD_LETTER_REASON`] and [`DEAD_LETTER_DESCRIPTION`] attributes.
    pub async fn dead_letter(self, reason: &str, description: &str) -> Result<()> {
        self.settle.dead_letter(reason, description).await
    }

    /// Keeps the message locked (invisible to other receivers) for `by` from now.
    pub async fn extend(&mut self, by: Duration) -> Result<()> {
        let until = self.settle.extend(by).await?;
        self.locked_until = Some(until);
        Ok(())
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("delivery_count", &self.delivery_count)
            .field("enqueued_at", &self.enqueued_at)
            .field("transport_id", &self.transport_id)
            .field("locked_until", &self.locked_until)
            .finish_non_exhaustive()
    }
}

/// Helpers available on every [`Subscriber`].
pub trait SubscriberExt: Subscriber {
    /// An endless stream of deliveries, fetched `batch` at a time with long polls of `wait`.
    ///
    /// Errors are yielded as `Err` items and the stream goes on (a transient error does not
    /// end it); it ends after yielding [`Error::Closed`].
    ///
    /// ```
    /// # async fn run() -> cloudbus_core::Result<()> {
    /// use std::time::Duration;
    /// use futures::StreamExt;
    /// use cloudbus_core::SubscriberExt;
    ///
    /// use cloudbus_core::memory::{MemoryConfig, MemoryPublisher, MemorySubscriber};
    /// # use cloudbus_core::Publisher;
    ///
    /// let config = MemoryConfig::new("doc-stream");
    /// let subscriber = MemorySubscriber::connect(&config).await?;
    /// let mut deliveries = subscriber.stream(10, Duration::from_secs(1));
    /// # let publisher = MemoryPublisher::connect(&config).await?;
    /// # publisher.publish(cloudbus_core::Message::new("hi")).await?;
    /// while let Some(delivery) = deliveries.next().await {
    ///     let delivery = delivery?;
    ///     println!("{:?}", delivery.message().text());
    ///     delivery.ack().await?;
    /// #   break;
    /// }
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
    /// ```
    fn stream(&self, batch: usize, wait: Duration) -> BoxStream<'_, Result<Delivery>>
    where
        Self: Sized,
    {
        deliveries(self, batch, wait)
    }
}

impl<S: Subscriber> SubscriberExt for S {}

/// The stream of [`SubscriberExt::stream`], for a `dyn Subscriber`.
pub fn deliveries(
    subscriber: &(impl Subscriber + ?Sized),
    batch: usize,
    wait: Duration,
) -> BoxStream<'_, Result<Delivery>> {
    struct State {
        buffer: VecDeque<Delivery>,
        done: bool,
    }
    let state = State {
        buffer: VecDeque::new(),
        done: false,
    };
    stream::unfold(state, move |mut state| async move {
        loop {
            if let Some(delivery) = state.buffer.pop_front() {
                return Some((Ok(delivery), state));
            }
            if state.done {
                return None;
            }
            match subscriber.receive(batch, wait).await {
                Ok(batch) => state.buffer.extend(batch),
                Err(error) => {
                    state.done = matches!(error, Error::Closed { .. });
                    return Some((Err(error), state));
                }
            }
        }
    })
    .boxed()
}

#[async_trait]
impl<T: Subscriber + ?Sized> Subscriber for Box<T> {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        (**self).receive(max, wait).await
    }

    async fn close(&self) -> Result<()> {
        (**self).close().await
    }

    fn receive_is_cancel_safe(&self) -> bool {
        (**self).receive_is_cancel_safe()
    }

    fn concurrent_receives(&self) -> usize {
        (**self).concurrent_receives()
    }

    fn receive_batch(&self) -> usize {
        (**self).receive_batch()
    }

    fn destination(&self) -> Destination {
        (**self).destination()
    }
}

#[async_trait]
impl<T: Subscriber + ?Sized> Subscriber for std::sync::Arc<T> {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        (**self).receive(max, wait).await
    }

    async fn close(&self) -> Result<()> {
        (**self).close().await
    }

    fn receive_is_cancel_safe(&self) -> bool {
        (**self).receive_is_cancel_safe()
    }

    fn concurrent_receives(&self) -> usize {
        (**self).concurrent_receives()
    }

    fn receive_batch(&self) -> usize {
        (**self).receive_batch()
    }

    fn destination(&self) -> Destination {
        (**self).destination()
    }
}
