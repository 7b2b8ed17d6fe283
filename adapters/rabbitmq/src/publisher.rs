//! [`RabbitMqPublisher`]: persistent, mandatory messages on a confirm-mode channel;
//! `publish` returns once the broker has confirmed the message. Concurrent `publish` calls
//! share the channel, their confirms pipelined.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use cloudbus_core::{Destination, Error, Message, Result};
use tokio::time::Instant;

use crate::TRANSPORT;
use crate::client::{Route, Sender, Server, by_deadline, close_connection};
use crate::config::RabbitMqConfig;
use crate::mapping::{DELAY_TARGET, encode, long_string};
use crate::topology::{Target, declare_queue, entry, exchange_exists, queue_exists, target};

/// Publishes to a RabbitMQ queue (through the default exchange) or exchange.
pub struct RabbitMqPublisher {
    sender: Sender,
    name: String,
    kind: Target,
    max_message_size: usize,
    closed: AtomicBool,
}

impl std::fmt::Debug for RabbitMqPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqPublisher")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl RabbitMqPublisher {
    /// Connects to the exchange `config.name` if there is one, else to the queue of that
    /// name (declaring the queue, with `create`, if neither exists).
    pub async fn connect(config: &RabbitMqConfig) -> Result<Self> {
        config.check()?;
        if config.subscription.is_some() || config.dead_letter {
            return Err(Error::config(format!(
                "a publisher sends to rabbitmq://{}: remove `subscription` and `dead_letter` \
                 from its configuration",
                config.name
            )));
        }
        let server = Arc::new(Server::new(config)?);
        let deadline = Instant::now() + config.publish_timeout;
        let (connection, channel) = server.channel_by(deadline).await?;
        let found = by_deadline(deadline, "looking up the exchange or queue", async {
            if exchange_exists(&channel, &config.name).await? {
                return Ok(Target::Exchange);
            }
            // The failed lookup closed that channel.
            let channel = connection.create_channel().await.map_err(|e| {
                Error::transport(TRANSPORT, format!("opening a channel: {e}"), true, None)
            })?;
            if config.create {
                declare_queue(&channel, &config.name, config.max_deliveries).await?;
            } else {
                queue_exists(&channel, &config.name).await?;
            }
            Ok::<_, Error>(Target::Queue)
        })
        .await;
        close_connection(&connection, "looked up").await;
        let kind = found?;
        let sender = Sender::new(server, config.publish_timeout);
        sender.open(deadline).await?;
        Ok(RabbitMqPublisher {
            sender,
            name: config.name.clone(),
            kind,
            max_message_size: config.max_message_size,
            closed: AtomicBool::new(false),
        })
    }

    fn check(&self, message: &Message) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed(TRANSPORT, "publisher"));
        }
        if message.ordering_key.is_some() {
            return Err(Error::Unsupported {
                transport: TRANSPORT,
                feature: "ordering keys: competing consumers of a RabbitMQ queue take \
                          messages of one key at once, so their order cannot hold; publish \
                          without ordering_key, or use Service Bus sessions or Kafka"
                    .into(),
            });
        }
        if message.deduplication_id.is_some() {
            return Err(Error::Unsupported {
                transport: TRANSPORT,
                feature: "duplicate detection: RabbitMQ has none; publish without \
                          deduplication_id and make the handler idempotent"
                    .into(),
            });
        }
        Ok(())
    }

    async fn send(&self, message: &Message) -> Result<String> {
        self.check(message)?;
        let delay = message
            .deliver_at
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .map(entry)
            .transpose()?
            .flatten();
        match delay {
            None => {
                let out = encode(message, self.max_message_size, true)?;
                let route = match self.kind {
                    Target::Queue => Route {
                        exchange: "",
                        routing_key: &self.name,
                    },
                    Target::Exchange => Route {
                        exchange: &self.name,
                        routing_key: "",
                    },
                };
                self.sender.send(route, &out.body, &out.properties).await?;
            }
            Some((exchange, routing_key)) => {
                let out = encode(message, self.max_message_size, false)?;
                let mut headers = out.properties.headers().clone().unwrap_or_default();
                headers.insert(
                    DELAY_TARGET.into(),
                    long_string(target(self.kind, &self.name)),
                );
                let properties = out.properties.with_headers(headers);
                self.sender.ensure_delays(self.kind, &self.name).await?;
                let route = Route {
                    exchange: &exchange,
                    routing_key: &routing_key,
                };
                self.sender.send(route, &out.body, &properties).await?;
            }
        }
        Ok(message.id.clone())
    }
}

#[async_trait]
impl cloudbus_core::Publisher for RabbitMqPublisher {
    async fn publish(&self, message: Message) -> Result<String> {
        self.send(&message).await
    }

    /// All messages go out at once on the channel, their confirms awaited together.
    async fn publish_batch(&self, messages: Vec<Message>) -> Vec<Result<String>> {
        futures::future::join_all(messages.iter().map(|m| self.send(m))).await
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.sender.close().await;
        Ok(())
    }

    fn destination(&self) -> Destination {
        Destination::new(TRANSPORT, self.name.clone())
    }
}
