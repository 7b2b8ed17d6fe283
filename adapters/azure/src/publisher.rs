//! [`ServiceBusPublisher`]: a sender link with many transfers in flight, and automatic
//! batching of concurrent `publish()` calls.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cloudbus_core::driver::batcher::{Batcher, Limits, SendBatch};
use cloudbus_core::{Destination, Error, Message, Publisher, Result};
use fe2o3_amqp::link::Sender;
use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp_types::messaging::{Body, Outcome};
use fe2o3_amqp_types::primitives::Value;
use futures::StreamExt;
use tokio::sync::Mutex;

use crate::TRANSPORT;
use crate::config::ServiceBusConfig;
use crate::credentials::namespace;
use crate::error::{closed, map_amqp_error};
use crate::mapping::{ENCODING_OVERHEAD, session_of, to_servicebus};
use crate::protocol::codec::{AmqpMessage, transfer};
use crate::protocol::{Connection, Lost};

/// Pause before resending after a transient failure: from the first, doubling, to the last.
const RETRY_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));
/// Batches a publisher keeps in flight at once on its link.
const BATCHES_IN_FLIGHT: usize = 4;

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

/// Publishes to a Service Bus queue or topic.
pub struct ServiceBusPublisher {
    link: Arc<SendLink>,
    batcher: Option<Batcher<AmqpMessage>>,
    entity: String,
    sessions: bool,
    max_message_size: usize,
    closed: AtomicBool,
}

impl std::fmt::Debug for ServiceBusPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceBusPublisher")
            .field("entity", &self.entity)
            .finish_non_exhaustive()
    }
}

impl ServiceBusPublisher {
    /// Connects to the queue or topic `config` names.
    pub async fn connect(config: &ServiceBusConfig) -> Result<Self> {
        if config.subscription.is_some() || config.dead_letter {
            return Err(Error::config(format!(
                "a publisher sends to the queue or topic servicebus://{}: remove `subscription` \
                 and `/$deadletter` from its URL",
                config.entity
            )));
        }
        if config.batch_size == 0 {
            return Err(Error::config(
                "`batch_size=0`: a batch holds at least one message; use 1 or more (or batching=false)",
            ));
        }
        let connection = Connection::open(namespace(config)?, "publisher").await?;
        let link = Arc::new(SendLink {
            connection,
            path: config.entity.clone(),
            sender: Mutex::new(None),
            timeout: config.publish_timeout,
        });
        // Attach now, so that a missing entity is reported here.
        link.attached().await?;
        let batcher = config.batching.then(|| {
            let limits = Limits {
                max_items: config.batch_size,
                max_bytes: config.max_message_size,
                linger: Duration::ZERO,
                max_calls: BATCHES_IN_FLIGHT,
            };
            let link = link.clone();
            let send: SendBatch<AmqpMessage> = Arc::new(move |batch| {
                let (link, len) = (link.clone(), batch.len());
                Box::pin(async move { vec![link.send(batch).await; len] })
            });
            Batcher::start(TRANSPORT, "publisher", limits, send)
        });
        Ok(ServiceBusPublisher {
            link,
            batcher,
            entity: config.entity.clone(),
            sessions: config.uses_sessions(),
            max_message_size: config.max_message_size,
            closed: AtomicBool::new(false),
        })
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(closed("publisher"));
        }
        Ok(())
    }
}

/// The sender link of a publisher, attached again after a loss.
struct SendLink {
    connection: Connection,
    path: String,
    sender: Mutex<Option<(Sender, Lost)>>,
    /// `publish_timeout`: how long a send may retry and wait.
    timeout: Duration,
}

impl SendLink {
    /// Makes sure a live sender is attached.
    async fn attached(&self) -> Result<()> {
        let mut sender = self.sender.lock().await;
        self.attach_if_needed(&mut sender).await
    }

    async fn attach_if_needed(&self, sender: &mut Option<(Sender, Lost)>) -> Result<()> {
        if sender.as_ref().is_none_or(|(_, lost)| lost.is_gone()) {
            *sender = None;
            let name = format!(
                "cloudbus-sender-{}-{}",
                std::process::id(),
                NEXT_LINK.fetch_add(1, Ordering::Relaxed)
            );
            *sender = Some(self.connection.sender(name, &self.path).await?);
        }
        Ok(())
    }

    /// Sends `messages` as one transfer and waits until the broker accepted it, retrying
    /// transient failures for up to `publish_timeout`, and fails with a transient error
    /// when the broker has not confirmed by then (a broker that stalls). Reported sent only
    /// once accepted.
    async fn send(&self, messages: Vec<AmqpMessage>) -> Result<()> {
        let transfer = transfer(messages)?;
        let deadline = Instant::now() + self.timeout;
        let mut backoff = RETRY_BACKOFF.0;
        loop {
            let attempt = tokio::time::timeout_at(deadline.into(), self.try_send(&transfer));
            let outcome = attempt.await.unwrap_or_else(|_| {
                Err(Error::transport(
                    TRANSPORT,
                    format!(
                        "send: the broker did not confirm within publish_timeout ({:?}); \
                         it may still have taken the message",
                        self.timeout
                    ),
                    true,
                    None,
                ))
            });
            match outcome {
                Ok(()) => return Ok(()),
                Err(error) if error.is_transient() && Instant::now() + backoff < deadline => {
                    tracing::debug!(messaging.system = "servicebus", messaging.destination.name = %self.path, %error, "send failed; retrying");
                    // A busy broker refuses at once: do not hammer it.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_BACKOFF.1);
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn try_send(&self, transfer: &Sendable<Body<Value>>) -> Result<()> {
        let (delivery, mut lost) = {
            let mut slot = self.sender.lock().await;
            self.attach_if_needed(&mut slot).await?;
            let Some((sender, lost)) = slot.as_mut() else {
                return Err(closed("publisher"));
            };
            let lost = lost.clone();
            match sender.send_batchable_ref(transfer).await {
                Ok(delivery) => (delivery, lost),
                Err(e) => {
                    *slot = None;
                    return Err(self.error(&e));
                }
            }
        };
        let outcome = tokio::select! {
            outcome = delivery => outcome,
            () = lost.gone() => return Err(Error::transport(
                TRANSPORT,
                "the connection was lost before the broker confirmed the send",
                true,
                None,
            )),
        };
        match outcome {
            Ok(Outcome::Accepted(_)) => Ok(()),
            Ok(Outcome::Rejected(rejected)) => Err(map_amqp_error(
                "send",
                &format!("{:?}", rejected.error),
                "queue or topic",
                &self.path,
            )),
            Ok(other) => Err(Error::transport(
                TRANSPORT,
                format!("send: the broker did not accept the message ({other:?})"),
                true,
                None,
            )),
            Err(e) => {
                let mut slot = self.sender.lock().await;
                *slot = None;
                Err(self.error(&e))
            }
        }
    }

    fn error(&self, error: &fe2o3_amqp::link::SendError) -> Error {
        let text = format!("{error:?}");
        let mut mapped = map_amqp_error("send", &text, "queue or topic", &self.path);
        // A link or connection that ended is worth another attempt on a new one.
        if let Error::Transport { transient, .. } = &mut mapped {
            if !text.contains("message-size-exceeded") {
                *transient = true;
            }
        }
        mapped
    }
}

#[async_trait]
impl Publisher for ServiceBusPublisher {
    async fn publish(&self, message: Message) -> Result<String> {
        self.check_open()?;
        let converted = to_servicebus(&message, self.sessions, self.max_message_size)?;
        match &self.batcher {
            Some(batcher) => {
                let size = message.payload_and_attributes_len() + ENCODING_OVERHEAD;
                let session = session_of(&converted).map(str::to_string);
                batcher.send(converted, size, session).await?;
            }
            None => self.link.send(vec![converted]).await?,
        }
        Ok(message.id)
    }

    async fn publish_batch(&self, messages: Vec<Message>) -> Vec<Result<String>> {
        if let Err(error) = self.check_open() {
            return messages.iter().map(|_| Err(error.clone())).collect();
        }
        let mut outcomes: Vec<Option<Result<String>>> = messages.iter().map(|_| None).collect();
        // Batches are sent as one transfer, limited by the message size limit, with one
        // session id each (the partition key of a partitioned entity must be the same for
        // the whole batch).
        let mut batches: Vec<(Vec<usize>, Vec<AmqpMessage>, usize)> = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            match to_servicebus(message, self.sessions, self.max_message_size) {
                Ok(converted) => {
                    let size = message.payload_and_attributes_len() + ENCODING_OVERHEAD;
                    match batches.last_mut() {
                        Some((positions, batch, bytes))
                            if *bytes + size <= self.max_message_size
                                && batch.first().and_then(session_of) == session_of(&converted) =>
                        {
                            positions.push(i);
                            batch.push(converted);
                            *bytes += size;
                        }
                        _ => batches.push((vec![i], vec![converted], size)),
                    }
                }
                Err(error) => outcomes[i] = Some(Err(error)),
            }
        }
        // Up to BATCHES_IN_FLIGHT transfers at once.
        let sent = futures::stream::iter(batches.into_iter().map(|(positions, batch, _)| {
            let link = self.link.clone();
            async move { (positions, link.send(batch).await) }
        }))
        .buffer_unordered(BATCHES_IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
        for (positions, outcome) in sent {
            for i in positions {
                outcomes[i] = Some(outcome.clone().map(|()| messages[i].id.clone()));
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(closed("publisher"))))
            .collect()
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if let Some(batcher) = &self.batcher {
            batcher.close().await;
        }
        if let Some((sender, _)) = self.link.sender.lock().await.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), sender.close()).await;
        }
        self.link.connection.close().await;
        Ok(())
    }

    fn destination(&self) -> Destination {
        Destination::new(TRANSPORT, self.entity.clone())
    }
}
