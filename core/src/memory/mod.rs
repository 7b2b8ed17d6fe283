//! The in-process broker behind `memory://`: the embedded default.
//!
//! One broker per process holds named entities. An entity is a *queue* (competing
//! consumers share its messages) until a subscription is opened on it; then it is a
//! *topic*, and each named subscription is a queue of its own that gets every message
//! published from then on. Every queue has a dead-letter queue.
//!
//! Semantics match the cloud transports: received messages are locked for the
//! subscriber's visibility timeout and come back with their delivery count plus one when
//! the lock expires or they are nacked; a message delivered `max_deliveries` times is
//! dead-lettered with reason [`MAX_DELIVERY_COUNT_EXCEEDED`](crate::subscriber::MAX_DELIVERY_COUNT_EXCEEDED); delayed messages stay invisible
//! until their time; expired messages (time to live) are discarded; messages with the same
//! ordering key are delivered one at a time, in publish order.
//!
//! Memory is bounded: each queue (and each dead-letter queue) holds at most `capacity`
//! messages of at most `max_message_size` bytes; a publish to a full queue fails with a
//! transient error, so a producer backs off instead of exhausting memory.

mod broker;
mod config;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use broker::{Entity, Queue, entity};
pub use config::MemoryConfig;

use crate::driver::check_receive_max;
use crate::inspector::{Inspector, Peeked, Stats};
use crate::{Delivery, Destination, Error, Message, Publisher, Result, Subscriber};

const TRANSPORT: &str = "memory";

/// A publisher on a memory queue or topic.
pub struct MemoryPublisher {
    entity: Arc<Entity>,
    name: String,
    max_message_size: usize,
    closed: AtomicBool,
}

impl MemoryPublisher {
    /// Opens a publisher on the queue or topic `config` names (creating it, unless
    /// `create` is off).
    pub async fn connect(config: &MemoryConfig) -> Result<Self> {
        if config.dead_letter {
            return Err(Error::config(format!(
                "memory://{}/$deadletter is read-only: publish to memory://{} instead",
                config.entity, config.entity
            )));
        }
        if config.subscription.is_some() {
            return Err(Error::config(format!(
                "a publisher sends to the topic memory://{}: remove `subscription` from its URL",
                config.entity
            )));
        }
        Ok(MemoryPublisher {
            entity: entity(config)?,
            name: config.entity.clone(),
            max_message_size: config.max_message_size,
            closed: AtomicBool::new(false),
        })
    }
}

#[async_trait]
impl Publisher for MemoryPublisher {
    async fn publish(&self, message: Message) -> Result<String> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed(TRANSPORT, "publisher"));
        }
        let size = message.payload_and_attributes_len();
        if size > self.max_message_size {
            return Err(Error::TooLarge {
                transport: TRANSPORT,
                size,
                limit: self.max_message_size,
            });
        }
        let id = message.id.clone();
        self.entity.publish(message)?;
        Ok(id)
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }

    fn destination(&self) -> Destination {
        Destination::new(TRANSPORT, self.name.clone())
    }
}

/// A subscriber on a memory queue, subscription or dead-letter queue.
pub struct MemorySubscriber {
    queue: Arc<Queue>,
    destination: Destination,
    visibility: Duration,
    closed: AtomicBool,
}

impl MemorySubscriber {
    /// Opens a subscriber on the queue, subscription or dead-letter queue `config` names
    /// (creating the entity and the subscription, unless `create` is off).
    pub async fn connect(config: &MemoryConfig) -> Result<Self> {
        let (queue, destination) = queue_of(config)?;
        Ok(MemorySubscriber {
            queue,
            destination,
            visibility: config.visibility,
            closed: AtomicBool::new(false),
        })
    }
}

/// The queue (of a queue entity, a subscription or a dead-letter queue) that `config`
/// receives from, and its destination.
fn queue_of(config: &MemoryConfig) -> Result<(Arc<Queue>, Destination)> {
    let entity = entity(config)?;
    let queue = entity.queue_for(config)?;
    let queue = if config.dead_letter {
        queue.dead_letter.clone().ok_or_else(|| {
            Error::config("a dead-letter queue has no dead-letter queue of its own")
        })?
    } else {
        queue
    };
    let name = if config.dead_letter {
        format!("{}{}", config.entity, crate::config::DEAD_LETTER_SUFFIX)
    } else {
        config.entity.clone()
    };
    let mut destination = Destination::new(TRANSPORT, name);
    if let Some(subscription) = &config.subscription {
        destination = destination.with_subscription(subscription.clone());
    }
    Ok((queue, destination))
}

/// Looks into a memory queue, subscription or dead-letter queue: peek and stats, without
/// taking anything.
pub struct MemoryInspector {
    queue: Arc<Queue>,
    destination: Destination,
}

impl MemoryInspector {
    /// Opens an inspector on the queue, subscription or dead-letter queue `config` names.
    /// It never creates one: a missing entity or subscription is
    /// [`Error::NotFound`] (the broker lives in the process, so another process's
    /// entities are not there).
    pub async fn connect(config: &MemoryConfig) -> Result<Self> {
        let existing = MemoryConfig {
            create: false,
            ..config.clone()
        };
        let (queue, destination) = queue_of(&existing)?;
        Ok(MemoryInspector { queue, destination })
    }
}

#[async_trait]
impl Inspector for MemoryInspector {
    async fn peek(&self, max: usize) -> Result<Vec<Peeked>> {
        Ok(self.queue.peek(max))
    }

    async fn stats(&self) -> Result<Stats> {
        let (waiting, in_flight, oldest_age) = self.queue.counts();
        let mut stats = Stats {
            waiting: Some(waiting),
            in_flight: Some(in_flight),
            oldest_age,
            ..Stats::default()
        };
        match &self.queue.dead_letter {
            Some(dead_letter) => stats.dead_lettered = Some(dead_letter.counts().0),
            None => stats = stats.not_reported("dead_lettered", "a dead-letter queue has none"),
        }
        if oldest_age.is_none() {
            stats = stats.not_reported("oldest_age", "no message waits");
        }
        Ok(stats)
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }

    fn destination(&self) -> Destination {
        self.destination.clone()
    }
}

#[async_trait]
impl Subscriber for MemorySubscriber {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        check_receive_max(TRANSPORT, max)?;
        let deadline = Instant::now() + wait;
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(Error::closed(TRANSPORT, "subscriber"));
            }
            // Register for wake-ups before looking, so a publish in between is not missed.
            let changed = self.queue.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (deliveries, next_event) = self.queue.take(max, self.visibility);
            let now = Instant::now();
            if !deliveries.is_empty() || now >= deadline {
                return Ok(deliveries);
            }
            let until = next_event.map_or(deadline, |at| at.min(deadline));
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(until.into()) => {}
            }
        }
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }

    /// A receive locks messages only in the step that returns them: dropping it while it
    /// waits takes nothing.
    fn receive_is_cancel_safe(&self) -> bool {
        true
    }

    fn destination(&self) -> Destination {
        self.destination.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn destinations_name_the_queue_the_subscription_and_the_dead_letter_queue() {
        let queue = MemoryConfig::new("destination-orders");
        let publisher = MemoryPublisher::connect(&queue).await.unwrap();
        assert_eq!(
            publisher.destination(),
            Destination::new("memory", "destination-orders")
        );
        let subscriber = MemorySubscriber::connect(&queue).await.unwrap();
        assert_eq!(subscriber.destination(), publisher.destination());
        let mut dead_letters = queue.clone();
        dead_letters.dead_letter = true;
        let subscriber = MemorySubscriber::connect(&dead_letters).await.unwrap();
        assert_eq!(
            subscriber.destination().name(),
            "destination-orders/$deadletter"
        );
        let mut subscription = MemoryConfig::new("destination-events");
        subscription.subscription = Some("audit".into());
        let subscriber = MemorySubscriber::connect(&subscription).await.unwrap();
        assert_eq!(
            subscriber.destination(),
            Destination::new("memory", "destination-events").with_subscription("audit")
        );
    }

    #[tokio::test]
    async fn an_inspector_counts_and_peeks_without_taking() {
        let queue = MemoryConfig::new("inspected-queue");
        let publisher = MemoryPublisher::connect(&queue).await.unwrap();
        for text in ["a", "b", "c"] {
            publisher.publish(Message::new(text)).await.unwrap();
        }
        let inspector = MemoryInspector::connect(&queue).await.unwrap();
        let peeked = inspector.peek(2).await.unwrap();
        let texts: Vec<_> = peeked.iter().map(|p| p.message.text()).collect();
        assert_eq!(texts, [Some("a"), Some("b")]);
        assert!(peeked.iter().all(|p| p.delivery_count == 0));

        let subscriber = MemorySubscriber::connect(&queue).await.unwrap();
        let mut taken = subscriber.receive(2, Duration::ZERO).await.unwrap();
        assert_eq!(taken[0].delivery_count(), 1, "peeking counted no delivery");
        let stats = inspector.stats().await.unwrap();
        assert_eq!(
            (stats.waiting, stats.in_flight, stats.dead_lettered),
            (Some(1), Some(2), Some(0))
        );
        assert!(stats.oldest_age.is_some());
        taken
            .remove(0)
            .dead_letter("Poison", "for the test")
            .await
            .unwrap();
        assert_eq!(inspector.stats().await.unwrap().dead_lettered, Some(1));
        let dead_letters = MemoryInspector::connect(&MemoryConfig {
            dead_letter: true,
            ..queue.clone()
        })
        .await
        .unwrap();
        let peeked = dead_letters.peek(10).await.unwrap();
        assert_eq!(peeked[0].message.attributes["DeadLetterReason"], "Poison");
        let stats = dead_letters.stats().await.unwrap();
        assert_eq!(stats.dead_lettered, None);
        assert_eq!(stats.not_reported[0].0, "dead_lettered");

        let missing = MemoryInspector::connect(&MemoryConfig::new("inspected-missing")).await;
        assert!(matches!(missing, Err(Error::NotFound { .. })));
    }
}
