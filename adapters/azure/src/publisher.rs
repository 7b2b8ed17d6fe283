//! [`ServiceBusPublisher`]: a sender in a task of its own, fed through a channel, with
//! automatic batching of concurrent `publish()` calls.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use azservicebus::{ServiceBusMessage, ServiceBusSender, ServiceBusSenderOptions};
use cloudbus_core::driver::batcher::{Batcher, Limits, SendBatch};
use cloudbus_core::{Destination, Error, Message, Publisher, Result};
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};

use crate::TRANSPORT;
use crate::client_thread::on_client_thread;
use crate::config::ServiceBusConfig;
use crate::credentials::{Client, client, connection};
use crate::error::{closed, map_error};
use crate::mapping::{ENCODING_OVERHEAD, to_servicebus};

enum SendCommand {
    Send(Vec<ServiceBusMessage>, oneshot::Sender<Result<()>>),
    Close(oneshot::Sender<()>),
}

/// Publishes to a Service Bus queue or topic.
pub struct ServiceBusPublisher {
    commands: mpsc::Sender<SendCommand>,
    batcher: Option<Batcher<ServiceBusMessage>>,
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
        let (commands, incoming) = mpsc::channel(64);
        let owned = config.clone();
        on_client_thread(move || async move {
            let (client, sender) = open_sender(&owned).await?;
            Ok(run_sender(owned, client, sender, incoming))
        })
        .await?;
        // One transfer at a time (the sender's link sends one after another anyway): what
        // is published meanwhile gathers into the next batch.
        let batcher = config.batching.then(|| {
            let limits = Limits {
                max_items: config.batch_size,
                max_bytes: config.max_message_size,
                linger: Duration::ZERO,
                max_calls: 1,
            };
            let commands = commands.clone();
            let send: SendBatch<ServiceBusMessage> = Arc::new(move |batch| {
                let (commands, len) = (commands.clone(), batch.len());
                Box::pin(async move { vec![send(&commands, batch).await; len] })
            });
            Batcher::start(TRANSPORT, "publisher", limits, send)
        });
        Ok(ServiceBusPublisher {
            commands,
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

/// Sends `messages` as one transfer through the sender's task.
async fn send(
    commands: &mpsc::Sender<SendCommand>,
    messages: Vec<ServiceBusMessage>,
) -> Result<()> {
    let (reply, outcome) = oneshot::channel();
    commands
        .send(SendCommand::Send(messages, reply))
        .await
        .map_err(|_| closed("publisher"))?;
    outcome.await.unwrap_or_else(|_| Err(closed("publisher")))
}

async fn run_sender(
    config: ServiceBusConfig,
    client: Client,
    sender: ServiceBusSender,
    mut commands: mpsc::Receiver<SendCommand>,
) {
    let mut link = Some((client, sender));
    while let Some(command) = commands.recv().await {
        match command {
            SendCommand::Send(messages, reply) => {
                if link.is_none() {
                    // The last send failed inside the client: reconnect.
                    link = open_sender(&config).await.ok();
                }
                let Some((_, sender)) = link.as_mut() else {
                    let _ = reply.send(Err(Error::transport(
                        TRANSPORT,
                        "cannot reconnect to Service Bus",
                        true,
                        None,
                    )));
                    continue;
                };
                let retry = messages.clone();
                let outcome = AssertUnwindSafe(sender.send_messages(messages))
                    .catch_unwind()
                    .await;
                let outcome = match outcome {
                    Ok(outcome) => {
                        outcome.map_err(|e| map_error("send", &e, "queue or topic", &config.entity))
                    }
                    Err(_) => {
                        // azservicebus 0.25 can panic when it retries a batch whose first
                        // attempt failed after sending. Reconnect and send once more: the
                        // messages may then arrive twice, which at-least-once allows (and
                        // duplicate detection by message id removes).
                        tracing::error!(
                            messaging.system = "servicebus",
                            messaging.destination.name = %config.entity,
                            "the Service Bus client panicked while sending; reconnecting and sending again"
                        );
                        link = open_sender(&config).await.ok();
                        match link.as_mut() {
                            Some((_, sender)) => {
                                match AssertUnwindSafe(sender.send_messages(retry))
                                    .catch_unwind()
                                    .await
                                {
                                    Ok(outcome) => outcome.map_err(|e| {
                                        map_error("send", &e, "queue or topic", &config.entity)
                                    }),
                                    Err(_) => {
                                        link = None;
                                        Err(internal_send_failure())
                                    }
                                }
                            }
                            None => Err(internal_send_failure()),
                        }
                    }
                };
                let _ = reply.send(outcome);
            }
            SendCommand::Close(reply) => {
                let _ = reply.send(());
                break;
            }
        }
    }
    if let Some((client, sender)) = link {
        let _ = sender.dispose().await;
        let _ = client.dispose().await;
    }
}

fn internal_send_failure() -> Error {
    Error::transport(
        TRANSPORT,
        "the Service Bus client failed internally while sending; the messages may or may not have been sent",
        true,
        None,
    )
}

async fn open_sender(config: &ServiceBusConfig) -> Result<(Client, ServiceBusSender)> {
    let connection = connection(config)?;
    let mut client = client(&connection).await?;
    let sender = client
        .create_sender(config.entity.clone(), ServiceBusSenderOptions::default())
        .await
        .map_err(|e| map_error("create sender", &e, "queue or topic", &config.entity))?;
    Ok((client, sender))
}

#[async_trait]
impl Publisher for ServiceBusPublisher {
    async fn publish(&self, message: Message) -> Result<String> {
        self.check_open()?;
        let converted = to_servicebus(&message, self.sessions, self.max_message_size)?;
        match &self.batcher {
            Some(batcher) => {
                let size = message.payload_and_attributes_len() + ENCODING_OVERHEAD;
                let session = converted.session_id().map(str::to_string);
                batcher.send(converted, size, session).await?;
            }
            None => send(&self.commands, vec![converted]).await?,
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
        let mut batches: Vec<(Vec<usize>, Vec<ServiceBusMessage>, usize)> = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            match to_servicebus(message, self.sessions, self.max_message_size) {
                Ok(converted) => {
                    let size = message.payload_and_attributes_len() + ENCODING_OVERHEAD;
                    match batches.last_mut() {
                        Some((positions, batch, bytes))
                            if *bytes + size <= self.max_message_size
                                && batch.first().and_then(|m| m.session_id())
                                    == converted.session_id() =>
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
        for (positions, batch, _) in batches {
            let outcome = send(&self.commands, batch).await;
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
        let (reply, done) = oneshot::channel();
        if self.commands.send(SendCommand::Close(reply)).await.is_ok() {
            let _ = done.await;
        }
        Ok(())
    }

    fn destination(&self) -> Destination {
        Destination::new(TRANSPORT, self.entity.clone())
    }
}
