//! Amazon SNS: `sns://<topic>` publisher; `sns://<topic>?subscription=<queue>` receives
//! through an SQS queue subscribed to the topic.
//!
//! With `create=true` cloudbus creates the topic, the queue (with its dead-letter queue),
//! the queue policy that lets the topic deliver, and the subscription with
//! `RawMessageDelivery=true`, so attributes arrive as SQS message attributes. Queues that
//! someone else subscribed without raw delivery receive SNS's JSON envelope, which the
//! subscriber unwraps (only when it really is one).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sns::Client;
use aws_sdk_sns::types::{MessageAttributeValue, PublishBatchRequestEntry};
use cloudbus_core::driver::batcher::Batcher;
use cloudbus_core::{Delivery, Destination, Error, Message, Publisher, Result, Subscriber};

use crate::batch::{
    BatchOutcome, EntryOutcomes, MAX_BATCH_ENTRIES, entry_error, publish_in_batches, start_batcher,
};
use crate::client::sdk_config;
use crate::codec::{self, Encoded, Target};
use crate::config::SnsConfig;
use crate::error::{Subject, map_error};
use crate::queue::name_of;
use crate::sqs::SqsSubscriber;

const TRANSPORT: &str = "sns";
/// SNS's largest message (body plus attributes), and its largest batch.
const MAX_MESSAGE_SIZE: usize = 256 * 1024;
/// Entries per `PublishBatch`.
const MAX_BATCH: usize = MAX_BATCH_ENTRIES;

/// Publishes to an SNS topic. With `batching` (the default), concurrent `publish` calls
/// share `PublishBatch` calls (see [`SnsConfig::linger`]).
pub struct SnsPublisher {
    topic: Arc<Topic>,
    batcher: Option<Batcher<Encoded>>,
    closed: AtomicBool,
}

impl std::fmt::Debug for SnsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnsPublisher")
            .field("topic", &self.topic.name)
            .field("batching", &self.batcher.is_some())
            .finish_non_exhaustive()
    }
}

/// A resolved topic.
#[derive(Debug)]
struct Topic {
    client: Client,
    arn: String,
    name: String,
    fifo: bool,
}

async fn topic_arn(client: &Client, config: &SnsConfig) -> Result<String> {
    let name = name_of(&config.topic).to_string();
    let subject = Subject {
        transport: TRANSPORT,
        entity: "topic",
        name: &name,
    };
    if config.topic.starts_with("arn:") {
        return Ok(config.topic.clone());
    }
    if config.create {
        let mut request = client.create_topic().name(&name);
        if name.ends_with(".fifo") {
            request = request.attributes("FifoTopic", "true");
        }
        let output = request
            .send()
            .await
            .map_err(|e| map_error(subject, "CreateTopic", e))?;
        return Ok(output.topic_arn().unwrap_or_default().to_string());
    }
    let mut pages = client.list_topics().into_paginator().send();
    let suffix = format!(":{name}");
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| map_error(subject, "ListTopics", e))?;
        if let Some(arn) = page
            .topics()
            .iter()
            .filter_map(|t| t.topic_arn())
            .find(|arn| arn.ends_with(&suffix))
        {
            return Ok(arn.to_string());
        }
    }
    Err(Error::NotFound {
        transport: TRANSPORT,
        entity: "topic",
        name,
    })
}

impl SnsPublisher {
    /// SNS's largest message: body plus attribute names, types and values, in bytes.
    pub const MAX_MESSAGE_SIZE: usize = MAX_MESSAGE_SIZE;

    /// Connects to the topic `config` names.
    pub async fn connect(config: &SnsConfig) -> Result<Self> {
        if config.subscription.is_some() {
            return Err(Error::config(format!(
                "a publisher sends to the topic sns://{}: remove `subscription` from its URL",
                config.topic
            )));
        }
        let sdk = sdk_config(config.region.as_deref(), config.endpoint.as_deref()).await;
        let client = Client::new(&sdk);
        let arn = topic_arn(&client, config).await?;
        let name = name_of(&arn).to_string();
        let topic = Arc::new(Topic {
            client,
            fifo: name.ends_with(".fifo"),
            arn,
            name,
        });
        let batch_topic = topic.clone();
        let batcher = start_batcher(
            TRANSPORT,
            config.batching,
            config.linger,
            config.batch_size,
            MAX_MESSAGE_SIZE,
            move |batch| send_batch(batch_topic.clone(), batch),
        )?;
        Ok(SnsPublisher {
            topic,
            batcher,
            closed: AtomicBool::new(false),
        })
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed(TRANSPORT, "publisher"));
        }
        Ok(())
    }
}

impl Topic {
    fn subject(&self) -> Subject<'_> {
        Subject {
            transport: TRANSPORT,
            entity: "topic",
            name: &self.name,
        }
    }

    fn target(&self) -> Target {
        Target {
            transport: TRANSPORT,
            fifo: self.fifo,
            delay: false,
            max_size: MAX_MESSAGE_SIZE,
        }
    }
}

/// One `PublishBatch` call; entry ids are positions in `batch`.
async fn send_batch(topic: Arc<Topic>, batch: Vec<Encoded>) -> BatchOutcome {
    let mut entries = Vec::with_capacity(batch.len());
    for (i, encoded) in batch.into_iter().enumerate() {
        let entry = PublishBatchRequestEntry::builder()
            .id(i.to_string())
            .message(encoded.body)
            .set_message_attributes(Some(attribute_map(encoded.attributes)?))
            .set_message_group_id(encoded.group_id)
            .set_message_deduplication_id(encoded.deduplication_id)
            .build()
            .map_err(|e| Error::transport(TRANSPORT, e.to_string(), false, None))?;
        entries.push(entry);
    }
    let output = topic
        .client
        .publish_batch()
        .topic_arn(&topic.arn)
        .set_publish_batch_request_entries(Some(entries))
        .send()
        .await
        .map_err(|e| map_error(topic.subject(), "PublishBatch", e))?;
    Ok(EntryOutcomes {
        succeeded: output
            .successful()
            .iter()
            .filter_map(|e| e.id().map(str::to_string))
            .collect(),
        failed: output
            .failed()
            .iter()
            .map(|f| {
                let error = entry_error(
                    TRANSPORT,
                    "PublishBatch",
                    f.code(),
                    f.message(),
                    f.sender_fault(),
                );
                (f.id().to_string(), error)
            })
            .collect(),
    })
}

fn attribute_map(
    attributes: Vec<(String, String)>,
) -> Result<HashMap<String, MessageAttributeValue>> {
    attributes
        .into_iter()
        .map(|(key, value)| {
            let value = MessageAttributeValue::builder()
                .data_type("String")
                .string_value(value)
                .build()
                .map_err(|e| {
                    Error::transport(TRANSPORT, format!("attribute `{key}`: {e}"), false, None)
                })?;
            Ok((key, value))
        })
        .collect()
}

#[async_trait]
impl Publisher for SnsPublisher {
    async fn publish(&self, message: Message) -> Result<String> {
        self.check_open()?;
        let topic = &self.topic;
        let encoded = codec::encode(&message, topic.target(), true)?;
        if let Some(batcher) = &self.batcher {
            let size = encoded.size;
            batcher.send(encoded, size, None).await?;
            return Ok(message.id);
        }
        topic
            .client
            .publish()
            .topic_arn(&topic.arn)
            .message(encoded.body)
            .set_message_attributes(Some(attribute_map(encoded.attributes)?))
            .set_message_group_id(encoded.group_id)
            .set_message_deduplication_id(encoded.deduplication_id)
            .send()
            .await
            .map_err(|e| map_error(topic.subject(), "Publish", e))?;
        Ok(message.id)
    }

    async fn publish_batch(&self, messages: Vec<Message>) -> Vec<Result<String>> {
        if let Err(error) = self.check_open() {
            return messages.iter().map(|_| Err(error.clone())).collect();
        }
        publish_in_batches(
            &messages,
            self.topic.target(),
            MAX_BATCH,
            MAX_MESSAGE_SIZE,
            |batch| send_batch(self.topic.clone(), batch),
        )
        .await
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        if let Some(batcher) = &self.batcher {
            batcher.close().await;
        }
        Ok(())
    }

    fn destination(&self) -> Destination {
        Destination::new("aws.sns", self.topic.name.clone())
    }
}

/// Receives what is published to an SNS topic, through the SQS queue subscribed to it
/// (`subscription`). With `create`, connecting sets up the topic, the queue (with its
/// dead-letter queue), the queue policy and the raw-delivery subscription first.
pub struct SnsSubscriber {
    queue: SqsSubscriber,
}

impl SnsSubscriber {
    /// Connects to the queue subscribed to the topic `config` names.
    pub async fn connect(config: &SnsConfig) -> Result<Self> {
        let Some(queue) = &config.subscription else {
            return Err(Error::config(format!(
                "sns://{} has no subscription: receive with sns://{}?subscription=<queue name>",
                config.topic, config.topic
            )));
        };
        let subscriber = SqsSubscriber::connect_with(&config.queue(queue), true).await?;
        if config.create {
            let sdk = sdk_config(config.region.as_deref(), config.endpoint.as_deref()).await;
            let client = Client::new(&sdk);
            let topic_arn = topic_arn(&client, config).await?;
            let queue = subscriber.queue();
            let queue_arn = queue.arn().await?;
            queue.allow_topic(&queue_arn, &topic_arn).await?;
            let subject = Subject {
                transport: TRANSPORT,
                entity: "topic",
                name: &config.topic,
            };
            client
                .subscribe()
                .topic_arn(&topic_arn)
                .protocol("sqs")
                .endpoint(&queue_arn)
                .attributes("RawMessageDelivery", "true")
                .return_subscription_arn(true)
                .send()
                .await
                .map_err(|e| map_error(subject, "Subscribe", e))?;
        }
        Ok(SnsSubscriber { queue: subscriber })
    }
}

#[async_trait]
impl Subscriber for SnsSubscriber {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        self.queue.receive(max, wait).await
    }

    async fn close(&self) -> Result<()> {
        self.queue.close().await
    }

    fn concurrent_receives(&self) -> usize {
        self.queue.concurrent_receives()
    }

    /// Receiving from a topic's subscription is receiving from its SQS queue.
    fn destination(&self) -> Destination {
        self.queue.destination()
    }
}
