//! Amazon SQS: `sqs://<queue>` publisher and subscriber.
//!
//! Settlement: ack deletes (through `DeleteMessageBatch`), `nack(delay)` and `extend(d)`
//! change the visibility timeout, `dead_letter` sends a copy with the reason to the queue's
//! dead-letter queue (from its `RedrivePolicy`) and only then deletes the original, so a
//! failure in between can duplicate the message but never lose it. The delivery count is
//! `ApproximateReceiveCount`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageAttributeValue, MessageSystemAttributeName,
    QueueAttributeName, SendMessageBatchRequestEntry,
};

use super::codec::{self, Encoded, Target};
use super::{
    BatchOutcome, EntryOutcomes, Subject, entry_error, long_poll_timeouts, map_error,
    publish_in_batches, sdk_config, start_batcher,
};
use crate::batcher::{Batcher, Limits, SendBatch};
use crate::config::SqsConfig;
use crate::subscriber::{
    DEAD_LETTER_DESCRIPTION, DEAD_LETTER_REASON, DeliveryInfo, Settle, check_receive_max,
};
use crate::{Attributes, Delivery, Error, Message, Publisher, Result, Subscriber};

const TRANSPORT: &str = "sqs";
/// SQS's largest message (body plus attributes), and its largest batch.
pub const MAX_MESSAGE_SIZE: usize = 1024 * 1024;
/// Entries per `SendMessageBatch` / `DeleteMessageBatch`.
const MAX_BATCH: usize = super::MAX_BATCH_ENTRIES;
/// The longest long poll SQS allows.
const MAX_WAIT: Duration = Duration::from_secs(20);
/// The longest visibility timeout SQS allows (12 hours).
const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 60 * 60);
/// Receive calls (long polls) a consumer may run at once on one subscriber.
const CONCURRENT_RECEIVES: usize = 16;
/// Concurrent `DeleteMessageBatch` calls per subscriber.
const DELETE_CONCURRENCY: usize = 8;
/// Under load, how long an ack may wait for others to share its `DeleteMessageBatch`.
const DELETE_LINGER: Duration = Duration::from_millis(5);

/// A resolved queue: the client, its URL and what cloudbus needs to know about it.
#[derive(Debug)]
pub(crate) struct Queue {
    client: Client,
    url: String,
    name: String,
    fifo: bool,
}

impl Queue {
    fn subject(&self) -> Subject<'_> {
        Subject {
            transport: TRANSPORT,
            entity: "queue",
            name: &self.name,
        }
    }

    fn target(&self, max_size: usize) -> Target {
        Target {
            transport: TRANSPORT,
            fifo: self.fifo,
            delay: !self.fifo,
            max_size,
        }
    }

    async fn attributes(&self, names: &[QueueAttributeName]) -> Result<HashMap<String, String>> {
        let output = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .set_attribute_names(Some(names.to_vec()))
            .send()
            .await
            .map_err(|e| map_error(self.subject(), "GetQueueAttributes", e))?;
        Ok(output
            .attributes()
            .map(|a| {
                a.iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The queue's ARN.
    pub(crate) async fn arn(&self) -> Result<String> {
        self.attributes(&[QueueAttributeName::QueueArn])
            .await?
            .remove("QueueArn")
            .ok_or_else(|| {
                Error::transport(
                    TRANSPORT,
                    "GetQueueAttributes returned no QueueArn",
                    true,
                    None,
                )
            })
    }

    /// Adds to the queue's access policy a statement that lets the SNS topic `topic_arn`
    /// send to it, keeping the statements already there.
    pub(crate) async fn allow_topic(&self, queue_arn: &str, topic_arn: &str) -> Result<()> {
        let existing = self
            .attributes(&[QueueAttributeName::Policy])
            .await?
            .remove("Policy");
        let mut policy = existing
            .and_then(|p| serde_json::from_str::<serde_json::Value>(&p).ok())
            .filter(|p| p["Statement"].is_array())
            .unwrap_or_else(|| serde_json::json!({ "Version": "2012-10-17", "Statement": [] }));
        let sid = format!("cloudbus-{}", name_of(topic_arn));
        let statements = policy["Statement"].as_array_mut();
        let Some(statements) = statements else {
            return Ok(());
        };
        if statements.iter().any(|s| s["Sid"] == sid.as_str()) {
            return Ok(());
        }
        statements.push(serde_json::json!({
            "Sid": sid,
            "Effect": "Allow",
            "Principal": { "Service": "sns.amazonaws.com" },
            "Action": "sqs:SendMessage",
            "Resource": queue_arn,
            "Condition": { "ArnEquals": { "aws:SourceArn": topic_arn } },
        }));
        self.client
            .set_queue_attributes()
            .queue_url(&self.url)
            .attributes(QueueAttributeName::Policy, policy.to_string())
            .send()
            .await
            .map_err(|e| map_error(self.subject(), "SetQueueAttributes (Policy)", e))?;
        Ok(())
    }

    async fn send(&self, encoded: Encoded) -> Result<()> {
        self.client
            .send_message()
            .queue_url(&self.url)
            .message_body(encoded.body)
            .set_message_attributes(Some(attribute_map(encoded.attributes)?))
            .set_message_group_id(encoded.group_id)
            .set_message_deduplication_id(encoded.deduplication_id)
            .set_delay_seconds(encoded.delay_seconds)
            .send()
            .await
            .map_err(|e| map_error(self.subject(), "SendMessage", e))?;
        Ok(())
    }

    async fn change_visibility(&self, receipt: &str, by: Duration, message_id: &str) -> Result<()> {
        if by > MAX_VISIBILITY {
            return Err(Error::InvalidInput {
                transport: TRANSPORT,
                field: "delay",
                rule: format!(
                    "SQS keeps a message invisible for at most {} s (12 hours)",
                    MAX_VISIBILITY.as_secs()
                ),
            });
        }
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .visibility_timeout(ceil_secs(by))
            .send()
            .await
            .map_err(|e| receipt_error(self.subject(), "ChangeMessageVisibility", e, message_id))?;
        Ok(())
    }
}

/// Whole seconds, rounded up (SQS timers have a one-second granularity; rounding down
/// would redeliver early).
fn ceil_secs(d: Duration) -> i32 {
    d.as_secs_f64().ceil().min(i32::MAX as f64) as i32
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

/// Maps an error of a call made with a receipt handle: an invalid or expired receipt
/// means the lock was lost.
fn receipt_error<E>(
    subject: Subject<'_>,
    action: &str,
    error: aws_sdk_sqs::error::SdkError<E, aws_sdk_sqs::config::http::HttpResponse>,
    message_id: &str,
) -> Error
where
    E: aws_sdk_sqs::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let code = error.code().unwrap_or_default();
    let message = error.message().unwrap_or_default().to_ascii_lowercase();
    if code.contains("ReceiptHandleIsInvalid")
        || code.contains("MessageNotInflight")
        || message.contains("receipt handle")
        || message.contains("not in flight")
    {
        return Error::LockLost {
            transport: TRANSPORT,
            message_id: message_id.to_string(),
        };
    }
    map_error(subject, action, error)
}

/// The queue name in a queue URL or ARN (its last segment).
pub(crate) fn name_of(queue: &str) -> &str {
    queue
        .rsplit(['/', ':'])
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or(queue)
}

/// Connects a client and resolves (or, with `create`, creates) the queue.
pub(crate) async fn open(config: &SqsConfig) -> Result<Queue> {
    let sdk = sdk_config(config.region.as_deref(), config.endpoint.as_deref()).await;
    let client = Client::new(&sdk);
    let name = name_of(&config.queue).to_string();
    let fifo = name.ends_with(".fifo");
    let subject = Subject {
        transport: TRANSPORT,
        entity: "queue",
        name: &name,
    };
    let url = if config.queue.starts_with("https://") || config.queue.starts_with("http://") {
        config.queue.clone()
    } else if config.create {
        create(&client, &name, config).await?
    } else {
        client
            .get_queue_url()
            .queue_name(&name)
            .send()
            .await
            .map_err(|e| map_error(subject, "GetQueueUrl", e))?
            .queue_url()
            .unwrap_or_default()
            .to_string()
    };
    Ok(Queue {
        client,
        url,
        name,
        fifo,
    })
}

/// Creates the queue `name` with a dead-letter queue (`<name>-dlq`, or `<base>-dlq.fifo`)
/// and a redrive policy; returns the queue URL. Existing queues are used as they are.
async fn create(client: &Client, name: &str, config: &SqsConfig) -> Result<String> {
    let fifo = name.ends_with(".fifo");
    let dlq_name = crate::config::sqs_dead_letter_name(name);
    if dlq_name.len() > 80 {
        return Err(Error::config(format!(
            "queue name `{name}` is too long for create=true: SQS names are at most 80 \
             characters and the dead-letter queue adds `-dlq`, so use at most 76"
        )));
    }
    let mut dlq_attributes = HashMap::from([(
        QueueAttributeName::MessageRetentionPeriod,
        (14 * 24 * 3600).to_string(),
    )]);
    if fifo {
        dlq_attributes.insert(QueueAttributeName::FifoQueue, "true".into());
    }
    let dlq_url = create_queue(client, &dlq_name, dlq_attributes).await?;
    let dlq = Queue {
        client: client.clone(),
        url: dlq_url,
        name: dlq_name,
        fifo,
    };
    let dlq_arn = dlq.arn().await?;
    let redrive = serde_json::json!({
        "deadLetterTargetArn": dlq_arn,
        "maxReceiveCount": config.max_receive_count.max(1),
    });
    let mut attributes = HashMap::from([(QueueAttributeName::RedrivePolicy, redrive.to_string())]);
    if fifo {
        attributes.insert(QueueAttributeName::FifoQueue, "true".into());
    }
    if let Some(visibility) = config.visibility {
        attributes.insert(
            QueueAttributeName::VisibilityTimeout,
            ceil_secs(visibility).to_string(),
        );
    }
    create_queue(client, name, attributes).await
}

async fn create_queue(
    client: &Client,
    name: &str,
    attributes: HashMap<QueueAttributeName, String>,
) -> Result<String> {
    let subject = Subject {
        transport: TRANSPORT,
        entity: "queue",
        name,
    };
    match client
        .create_queue()
        .queue_name(name)
        .set_attributes(Some(attributes))
        .send()
        .await
    {
        Ok(output) => Ok(output.queue_url().unwrap_or_default().to_string()),
        Err(error)
            if error.code() == Some("QueueAlreadyExists")
                || error.code() == Some("QueueNameExists") =>
        {
            tracing::info!(
                messaging.system = "aws_sqs",
                messaging.destination.name = name,
                "queue exists with other attributes; using it as it is"
            );
            Ok(client
                .get_queue_url()
                .queue_name(name)
                .send()
                .await
                .map_err(|e| map_error(subject, "GetQueueUrl", e))?
                .queue_url()
                .unwrap_or_default()
                .to_string())
        }
        Err(error) => Err(map_error(subject, "CreateQueue", error)),
    }
}

/// Publishes to an SQS queue. With `batching` (the default), concurrent `publish` calls
/// share `SendMessageBatch` calls (see [`crate::config::SqsConfig::linger`]).
pub struct SqsPublisher {
    queue: Arc<Queue>,
    max_size: usize,
    batcher: Option<Batcher<Encoded>>,
    closed: AtomicBool,
}

impl std::fmt::Debug for SqsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsPublisher")
            .field("queue", &self.queue.name)
            .field("batching", &self.batcher.is_some())
            .finish_non_exhaustive()
    }
}

impl SqsPublisher {
    /// Connects to the queue `config` names.
    pub async fn connect(config: &SqsConfig) -> Result<Self> {
        let queue = Arc::new(open(config).await?);
        let max_size = queue
            .attributes(&[QueueAttributeName::MaximumMessageSize])
            .await?
            .get("MaximumMessageSize")
            .and_then(|v| v.parse().ok())
            .unwrap_or(MAX_MESSAGE_SIZE)
            .min(MAX_MESSAGE_SIZE);
        let batch_queue = queue.clone();
        let batcher = start_batcher(
            TRANSPORT,
            config.batching,
            config.linger,
            config.batch_size,
            MAX_MESSAGE_SIZE,
            move |batch| send_batch(batch_queue.clone(), batch),
        )?;
        Ok(SqsPublisher {
            queue,
            max_size,
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

/// One `SendMessageBatch` call; entry ids are positions in `batch`.
async fn send_batch(queue: Arc<Queue>, batch: Vec<Encoded>) -> BatchOutcome {
    let mut entries = Vec::with_capacity(batch.len());
    for (i, encoded) in batch.into_iter().enumerate() {
        let entry = attribute_map(encoded.attributes).and_then(|attributes| {
            SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(encoded.body)
                .set_message_attributes(Some(attributes))
                .set_message_group_id(encoded.group_id)
                .set_message_deduplication_id(encoded.deduplication_id)
                .set_delay_seconds(encoded.delay_seconds)
                .build()
                .map_err(|e| Error::transport(TRANSPORT, e.to_string(), false, None))
        });
        entries.push(entry?);
    }
    let output = queue
        .client
        .send_message_batch()
        .queue_url(&queue.url)
        .set_entries(Some(entries))
        .send()
        .await
        .map_err(|e| map_error(queue.subject(), "SendMessageBatch", e))?;
    Ok(EntryOutcomes {
        succeeded: output
            .successful()
            .iter()
            .map(|e| e.id().to_string())
            .collect(),
        failed: output
            .failed()
            .iter()
            .map(|f| {
                let error = entry_error(
                    TRANSPORT,
                    "SendMessageBatch",
                    f.code(),
                    f.message(),
                    f.sender_fault(),
                );
                (f.id().to_string(), error)
            })
            .collect(),
    })
}

#[async_trait]
impl Publisher for SqsPublisher {
    async fn publish(&self, message: Message) -> Result<String> {
        self.check_open()?;
        let encoded = codec::encode(&message, self.queue.target(self.max_size), true)?;
        match &self.batcher {
            Some(batcher) => {
                let size = encoded.size;
                batcher.send(encoded, size, None).await?;
            }
            None => self.queue.send(encoded).await?,
        }
        Ok(message.id)
    }

    async fn publish_batch(&self, messages: Vec<Message>) -> Vec<Result<String>> {
        if let Err(error) = self.check_open() {
            return messages.iter().map(|_| Err(error.clone())).collect();
        }
        let target = self.queue.target(self.max_size);
        publish_in_batches(&messages, target, MAX_BATCH, MAX_MESSAGE_SIZE, |batch| {
            send_batch(self.queue.clone(), batch)
        })
        .await
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        if let Some(batcher) = &self.batcher {
            batcher.close().await;
        }
        Ok(())
    }
}

/// Receives from an SQS queue.
pub struct SqsSubscriber {
    shared: Arc<Shared>,
    max_wait: Duration,
    closed: AtomicBool,
}

/// What a subscriber and its deliveries share.
struct Shared {
    queue: Queue,
    /// The visibility timeout receives ask for, or the queue's own.
    visibility: Option<Duration>,
    queue_visibility: Duration,
    dead_letter: Option<Queue>,
    deleter: Deleter,
    /// Unwrap SNS notification envelopes (queues subscribed to a topic without raw delivery).
    sns_envelopes: bool,
}

impl SqsSubscriber {
    /// Connects to the queue `config` names.
    pub async fn connect(config: &SqsConfig) -> Result<Self> {
        Self::connect_with(config, false).await
    }

    /// Connects; `sns_envelopes` unwraps SNS notification envelopes.
    pub(crate) async fn connect_with(config: &SqsConfig, sns_envelopes: bool) -> Result<Self> {
        let queue = open(config).await?;
        let attributes = queue
            .attributes(&[
                QueueAttributeName::VisibilityTimeout,
                QueueAttributeName::RedrivePolicy,
            ])
            .await?;
        let queue_visibility = attributes
            .get("VisibilityTimeout")
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(30), Duration::from_secs);
        let dead_letter = match attributes.get("RedrivePolicy") {
            Some(policy) => dead_letter_queue(&queue, policy).await?,
            None => None,
        };
        let deleter = Deleter::start(queue.client.clone(), queue.url.clone(), queue.name.clone());
        Ok(SqsSubscriber {
            shared: Arc::new(Shared {
                queue,
                visibility: config.visibility,
                queue_visibility,
                dead_letter,
                deleter,
                sns_envelopes,
            }),
            max_wait: config.wait.min(MAX_WAIT),
            closed: AtomicBool::new(false),
        })
    }
}

/// Resolves the dead-letter queue named by a redrive policy.
async fn dead_letter_queue(queue: &Queue, policy: &str) -> Result<Option<Queue>> {
    let Some(arn) = serde_json::from_str::<serde_json::Value>(policy)
        .ok()
        .and_then(|p| p["deadLetterTargetArn"].as_str().map(str::to_string))
    else {
        return Ok(None);
    };
    // arn:aws:sqs:<region>:<account>:<name>
    let parts: Vec<&str> = arn.split(':').collect();
    let (Some(account), Some(name)) = (parts.get(4), parts.get(5)) else {
        return Ok(None);
    };
    let subject = Subject {
        transport: TRANSPORT,
        entity: "queue",
        name,
    };
    let url = queue
        .client
        .get_queue_url()
        .queue_name(*name)
        .queue_owner_aws_account_id(*account)
        .send()
        .await
        .map_err(|e| map_error(subject, "GetQueueUrl (dead-letter queue)", e))?
        .queue_url()
        .unwrap_or_default()
        .to_string();
    Ok(Some(Queue {
        client: queue.client.clone(),
        url,
        name: name.to_string(),
        fifo: name.ends_with(".fifo"),
    }))
}

#[async_trait]
impl Subscriber for SqsSubscriber {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        check_receive_max(TRANSPORT, max)?;
        let deadline = Instant::now() + wait;
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(Error::closed(TRANSPORT, "subscriber"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let deliveries = self.receive_once(max, left.min(self.max_wait)).await?;
            if !deliveries.is_empty() || Instant::now() >= deadline {
                return Ok(deliveries);
            }
        }
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }

    /// Each receive is a long poll of its own.
    fn concurrent_receives(&self) -> usize {
        CONCURRENT_RECEIVES
    }
}

impl SqsSubscriber {
    /// The queue this subscriber receives from.
    pub(crate) fn queue(&self) -> &Queue {
        &self.shared.queue
    }

    async fn receive_once(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let shared = &self.shared;
        let received_at = SystemTime::now();
        let wait_seconds = ceil_secs(wait).min(20);
        let mut request = shared
            .queue
            .client
            .receive_message()
            .queue_url(&shared.queue.url)
            .max_number_of_messages(max.min(MAX_BATCH) as i32)
            .wait_time_seconds(wait_seconds)
            .set_visibility_timeout(shared.visibility.map(ceil_secs))
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp);
        if shared.queue.fifo {
            // Only FIFO queues have them; not asking spares the broker work on the others.
            request = request
                .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
                .message_system_attribute_names(MessageSystemAttributeName::MessageDeduplicationId);
        }
        let output = request
            .customize()
            .config_override(
                aws_sdk_sqs::config::Builder::default()
                    .timeout_config(long_poll_timeouts(Duration::from_secs(wait_seconds as u64))),
            )
            .send()
            .await
            .map_err(|e| map_error(shared.queue.subject(), "ReceiveMessage", e))?;
        let locked_until = received_at + shared.visibility.unwrap_or(shared.queue_visibility);
        let mut deliveries = Vec::new();
        for raw in output.messages() {
            let (Some(receipt), Some(transport_id)) = (raw.receipt_handle(), raw.message_id())
            else {
                continue;
            };
            let system = raw.attributes();
            let system_attribute =
                |name: MessageSystemAttributeName| system.and_then(|a| a.get(&name)).cloned();
            let mut body = raw.body().unwrap_or_default().to_string();
            let mut attributes: Attributes = raw
                .message_attributes()
                .map(|attributes| {
                    attributes
                        .iter()
                        .map(|(k, v)| (k.clone(), attribute_text(v)))
                        .collect()
                })
                .unwrap_or_default();
            let mut id = transport_id.to_string();
            if shared.sns_envelopes {
                if let Some((message, envelope_attributes, message_id)) =
                    codec::unwrap_sns_envelope(&body)
                {
                    body = message;
                    attributes.extend(envelope_attributes);
                    id = message_id;
                }
            }
            let decoded = codec::decode(
                &body,
                attributes,
                &id,
                system_attribute(MessageSystemAttributeName::MessageGroupId),
                system_attribute(MessageSystemAttributeName::MessageDeduplicationId),
            );
            if decoded.expired {
                tracing::debug!(
                    messaging.system = "aws_sqs",
                    messaging.destination.name = %shared.queue.name,
                    messaging.message.id = %decoded.message.id,
                    "discarding a message past its time to live"
                );
                // Best effort: if the delete fails, the message is discarded again next time.
                let _ = shared
                    .deleter
                    .delete(receipt.to_string(), &decoded.message.id)
                    .await;
                continue;
            }
            let info = DeliveryInfo {
                delivery_count: system_attribute(
                    MessageSystemAttributeName::ApproximateReceiveCount,
                )
                .and_then(|c| c.parse().ok())
                .unwrap_or(1),
                enqueued_at: codec::sent_timestamp(
                    system_attribute(MessageSystemAttributeName::SentTimestamp).as_deref(),
                ),
                transport_id: transport_id.to_string(),
                locked_until: Some(locked_until),
            };
            let settle = SqsSettle {
                shared: shared.clone(),
                receipt: receipt.to_string(),
                message: decoded.message.clone(),
            };
            deliveries.push(Delivery::new(decoded.message, info, Box::new(settle)));
        }
        Ok(deliveries)
    }
}

/// The text of a received attribute: strings and numbers as they are, binary as base64.
fn attribute_text(value: &MessageAttributeValue) -> String {
    use base64::Engine;
    match (value.string_value(), value.binary_value()) {
        (Some(text), _) => text.to_string(),
        (None, Some(blob)) => base64::engine::general_purpose::STANDARD.encode(blob.as_ref()),
        (None, None) => String::new(),
    }
}

struct SqsSettle {
    shared: Arc<Shared>,
    receipt: String,
    message: Message,
}

#[async_trait]
impl Settle for SqsSettle {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.shared
            .deleter
            .delete(self.receipt, &self.message.id)
            .await
    }

    async fn nack(self: Box<Self>, delay: Duration) -> Result<()> {
        self.shared
            .queue
            .change_visibility(&self.receipt, delay, &self.message.id)
            .await
    }

    async fn dead_letter(self: Box<Self>, reason: &str, description: &str) -> Result<()> {
        let Some(dead_letter) = &self.shared.dead_letter else {
            return Err(Error::Unsupported {
                transport: TRANSPORT,
                feature: format!(
                    "dead-lettering from queue `{}`: it has no RedrivePolicy naming a \
                     dead-letter queue (connect once with create=true, or configure one)",
                    self.shared.queue.name
                ),
            });
        };
        let mut copy = self.message.clone();
        copy.deliver_at = None;
        copy.attributes
            .insert(DEAD_LETTER_REASON.to_string(), reason.to_string());
        copy.attributes
            .insert(DEAD_LETTER_DESCRIPTION.to_string(), description.to_string());
        let encoded = codec::encode(&copy, dead_letter.target(MAX_MESSAGE_SIZE), false)?;
        // Copy first, then delete: a failure in between duplicates, never loses.
        dead_letter.send(encoded).await?;
        self.shared
            .deleter
            .delete(self.receipt, &self.message.id)
            .await
    }

    async fn extend(&mut self, by: Duration) -> Result<SystemTime> {
        self.shared
            .queue
            .change_visibility(&self.receipt, by, &self.message.id)
            .await?;
        Ok(SystemTime::now() + by)
    }
}

/// Deletes messages in batches: acks go through a [`Batcher`] into `DeleteMessageBatch`
/// calls of up to ten, [`DELETE_CONCURRENCY`] at a time. A lone ack goes out at once;
/// under load a batch waits up to [`DELETE_LINGER`] to fill, so a busy consumer makes one
/// call per ten messages, as a hand-written receive/delete loop does.
struct Deleter {
    batcher: Batcher<DeleteRequest>,
}

/// One delete: the receipt handle, and the message id (for errors).
struct DeleteRequest {
    receipt: String,
    message_id: String,
}

impl Deleter {
    fn start(client: Client, url: String, name: String) -> Deleter {
        let limits = Limits {
            max_items: MAX_BATCH,
            max_bytes: usize::MAX,
            linger: DELETE_LINGER,
            max_calls: DELETE_CONCURRENCY,
        };
        let (url, name): (Arc<str>, Arc<str>) = (url.into(), name.into());
        let send: SendBatch<DeleteRequest> = Arc::new(move |batch| {
            let (client, url, name) = (client.clone(), url.clone(), name.clone());
            Box::pin(async move { delete_batch(&client, &url, &name, batch).await })
        });
        Deleter {
            batcher: Batcher::start(TRANSPORT, "subscriber", limits, send),
        }
    }

    async fn delete(&self, receipt: String, message_id: &str) -> Result<()> {
        let request = DeleteRequest {
            receipt,
            message_id: message_id.to_string(),
        };
        self.batcher.send(request, 0, None).await
    }
}

/// One `DeleteMessageBatch` call; one outcome per request, in order.
async fn delete_batch(
    client: &Client,
    url: &str,
    name: &str,
    batch: Vec<DeleteRequest>,
) -> Vec<Result<()>> {
    let subject = Subject {
        transport: TRANSPORT,
        entity: "queue",
        name,
    };
    let mut entries = Vec::with_capacity(batch.len());
    for (i, request) in batch.iter().enumerate() {
        match DeleteMessageBatchRequestEntry::builder()
            .id(i.to_string())
            .receipt_handle(&request.receipt)
            .build()
        {
            Ok(entry) => entries.push(entry),
            Err(e) => tracing::error!(error = %e, "cannot build a DeleteMessageBatch entry"),
        }
    }
    let output = client
        .delete_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await;
    let output = match output {
        Ok(output) => output,
        Err(error) => {
            let error = map_error(subject, "DeleteMessageBatch", error);
            return vec![Err(error); batch.len()];
        }
    };
    let mut outcomes: Vec<Result<()>> = vec![Ok(()); batch.len()];
    for failed in output.failed() {
        let Some(i) = failed
            .id()
            .parse::<usize>()
            .ok()
            .filter(|i| *i < batch.len())
        else {
            continue;
        };
        outcomes[i] = Err(if failed.code().contains("ReceiptHandleIsInvalid") {
            Error::LockLost {
                transport: TRANSPORT,
                message_id: batch[i].message_id.clone(),
            }
        } else {
            entry_error(
                TRANSPORT,
                "DeleteMessageBatch",
                failed.code(),
                failed.message(),
                failed.sender_fault(),
            )
        });
    }
    outcomes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_from_urls_and_arns() {
        assert_eq!(name_of("orders"), "orders");
        assert_eq!(
            name_of("https://sqs.us-east-1.amazonaws.com/123456789012/orders.fifo"),
            "orders.fifo"
        );
        assert_eq!(
            name_of("arn:aws:sqs:us-east-1:123456789012:orders-dlq"),
            "orders-dlq"
        );
    }

    #[test]
    fn visibility_rounds_up() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
        assert_eq!(ceil_secs(Duration::ZERO), 0);
    }
}
