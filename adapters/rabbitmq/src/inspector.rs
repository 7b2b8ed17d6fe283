//! Looking into a queue: the counts AMQP reports (`queue.declare` with `passive`). A
//! message can only be shown by delivering it, so `peek` is `Unsupported`.

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::inspector::{Inspector, Peeked, Stats};
use cloudbus_core::{Destination, Error, Result};
use lapin::Connection;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio::time::Instant;

use crate::TRANSPORT;
use crate::client::{Server, by_deadline, close_connection};
use crate::config::{RabbitMqConfig, dead_letter_queue};
use crate::error::{Subject, map_error};

/// Looks into a RabbitMQ queue (a task queue, a subscription's queue or a dead-letter
/// queue): messages ready, and in its dead-letter queue.
pub struct RabbitMqInspector {
    connection: Connection,
    queue: String,
    dead_letters: Option<String>,
    timeout: Duration,
    destination: Destination,
}

impl RabbitMqInspector {
    /// Opens an inspector on the queue `config` names; it declares nothing, so a missing
    /// queue is `NotFound`.
    pub async fn connect(config: &RabbitMqConfig) -> Result<Self> {
        config.check()?;
        let server = Server::new(config)?;
        let deadline = Instant::now() + config.publish_timeout;
        let (connection, _) = server.channel_by(deadline).await?;
        let inspector = RabbitMqInspector {
            connection,
            queue: config.queue(),
            dead_letters: (!config.dead_letter).then(|| dead_letter_queue(&config.queue())),
            timeout: config.publish_timeout,
            destination: match &config.subscription {
                Some(subscription) => Destination::new(TRANSPORT, config.name.clone())
                    .with_subscription(subscription.clone()),
                None => Destination::new(TRANSPORT, config.queue()),
            },
        };
        if let Err(error) = inspector.ready(&inspector.queue).await {
            inspector.close().await?;
            return Err(error);
        }
        Ok(inspector)
    }

    /// The messages ready in `queue` (a passive declare, on a channel of its own: a
    /// missing queue closes the channel).
    async fn ready(&self, queue: &str) -> Result<u64> {
        let subject = Subject {
            entity: "queue",
            name: queue,
        };
        by_deadline(
            Instant::now() + self.timeout,
            "looking up the queue",
            async {
                let channel = self
                    .connection
                    .create_channel()
                    .await
                    .map_err(|e| map_error("opening a channel for", subject, e))?;
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                let declared = channel
                    .queue_declare(queue.into(), passive, FieldTable::default())
                    .await
                    .map_err(|e| map_error("looking up", subject, e))?;
                let _ = channel.close(200, "inspected".into()).await;
                Ok(u64::from(declared.message_count()))
            },
        )
        .await
    }
}

#[async_trait]
impl Inspector for RabbitMqInspector {
    async fn peek(&self, _max: usize) -> Result<Vec<Peeked>> {
        Err(Error::Unsupported {
            transport: TRANSPORT,
            feature: format!(
                "peek on `{}`: RabbitMQ shows a message only by delivering it, which counts \
                 a delivery; receive it and release it instead (a released message goes to \
                 the back of the queue)",
                self.queue
            ),
        })
    }

    async fn stats(&self) -> Result<Stats> {
        let mut stats = Stats::default().with_waiting(Some(self.ready(&self.queue).await?));
        match &self.dead_letters {
            Some(dead_letters) => match self.ready(dead_letters).await {
                Ok(count) => stats.dead_lettered = Some(count),
                Err(Error::NotFound { .. }) => {
                    stats = stats.not_reported(
                        "dead_lettered",
                        format!("the queue has no dead-letter queue `{dead_letters}`"),
                    )
                }
                Err(error) => return Err(error),
            },
            None => stats = stats.not_reported("dead_lettered", "a dead-letter queue has none"),
        }
        Ok(stats
            .not_reported(
                "in_flight",
                "AMQP counts only ready messages; the management API (messages_unacknowledged) \
                 has the rest",
            )
            .not_reported("oldest_age", "AMQP does not report message ages"))
    }

    async fn close(&self) -> Result<()> {
        close_connection(&self.connection, "inspected").await;
        Ok(())
    }

    fn destination(&self) -> Destination {
        self.destination.clone()
    }
}
