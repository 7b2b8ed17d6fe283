//! Looking into a queue or subscription without consuming it: [`Inspector`] shows messages
//! ([`Inspector::peek`]) and counts ([`Inspector::stats`]), as far as the transport can.
//!
//! What a broker cannot do is said, never guessed: `peek` fails with
//! [`Error::Unsupported`](crate::Error::Unsupported) where the broker cannot show a message
//! without taking it (SQS, RabbitMQ), and a figure of [`Stats`] that the broker does not
//! report is `None`, with the reason in [`Stats::not_reported`].

use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::{Destination, Message, Result};

/// A message looked at without being consumed: it stays where it is, unlocked, and its
/// delivery count does not change.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Peeked {
    /// The message, as a subscriber would receive it.
    pub message: Message,
    /// How many times it has been delivered so far (0: never).
    pub delivery_count: u32,
    /// When the broker accepted it.
    pub enqueued_at: SystemTime,
    /// Where the broker keeps it: a sequence number, or `partition:offset` on Kafka.
    pub transport_id: String,
}

impl Peeked {
    /// A peeked message with its broker facts.
    pub fn new(
        message: Message,
        delivery_count: u32,
        enqueued_at: SystemTime,
        transport_id: impl Into<String>,
    ) -> Peeked {
        Peeked {
            message,
            delivery_count,
            enqueued_at,
            transport_id: transport_id.into(),
        }
    }
}

/// What a transport reports about a queue or subscription. `None`: the transport does not
/// report that figure; [`Stats::not_reported`] says why.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Stats {
    /// Messages waiting to be delivered (delayed ones included where the broker counts
    /// them together).
    pub waiting: Option<u64>,
    /// Messages delivered and not yet settled (locked by a subscriber).
    pub in_flight: Option<u64>,
    /// Messages in the dead-letter queue.
    pub dead_lettered: Option<u64>,
    /// How long the oldest waiting message has waited.
    pub oldest_age: Option<Duration>,
    /// For each figure that is `None`: its field name and why the transport cannot say.
    pub not_reported: Vec<(&'static str, String)>,
}

impl Stats {
    /// With `waiting` set.
    pub fn with_waiting(mut self, waiting: Option<u64>) -> Stats {
        self.waiting = waiting;
        self
    }

    /// With `in_flight` set.
    pub fn with_in_flight(mut self, in_flight: Option<u64>) -> Stats {
        self.in_flight = in_flight;
        self
    }

    /// With `dead_lettered` set.
    pub fn with_dead_lettered(mut self, dead_lettered: Option<u64>) -> Stats {
        self.dead_lettered = dead_lettered;
        self
    }

    /// With `oldest_age` set.
    pub fn with_oldest_age(mut self, oldest_age: Option<Duration>) -> Stats {
        self.oldest_age = oldest_age;
        self
    }

    /// Records that `field` is not reported, and why.
    pub fn not_reported(mut self, field: &'static str, why: impl Into<String>) -> Stats {
        self.not_reported.push((field, why.into()));
        self
    }
}

/// Looks into a queue or subscription without consuming it. Object-safe: open one with
/// `cloudbus::connect_inspector` (or a transport's config through
/// [`Connect::connect_inspector`](crate::driver::Connect::connect_inspector)).
#[async_trait]
pub trait Inspector: Send + Sync {
    /// Up to `max` messages, oldest first, left where they are. Fails with
    /// [`Error::Unsupported`](crate::Error::Unsupported), without touching any message,
    /// where the broker can only show a message by delivering it.
    async fn peek(&self, max: usize) -> Result<Vec<Peeked>>;

    /// The counts the transport reports.
    async fn stats(&self) -> Result<Stats>;

    /// Releases the connection.
    async fn close(&self) -> Result<()>;

    /// What this inspector looks into.
    fn destination(&self) -> Destination;
}
