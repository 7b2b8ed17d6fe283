//! Amazon SQS: `sqs://<queue>` publisher and subscriber.
//!
//! Settlement: ack deletes (through `DeleteMessageBatch`), `nack(delay)` and `extend(d)`
//! change the visibility timeout, `dead_letter` sends a copy with the reason to the queue's
//! dead-letter queue (from its `RedrivePolicy`) and only then deletes the original, so a
//! failure in between can duplicate the message but never lose it. The delivery count is
//! `ApproximateReceiveCount`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageAttributeValue, MessageSystemAttributeName,
    QueueAttributeName, SendMessageBatchRequestEntry,
};
use cloudbus_core::driver::batcher::{Batcher, Limits, SendBatch};
use cloudbus_core::driver::{DeliveryInfo, Settle, check_receive_max};
use cloudbus_core::subscriber::{DEAD_LETTER_DESCRIPTION, DEAD_LETTER_REASON};
use cloudbus_core::{
    Attributes, Delivery, Destination, Error, Message, Publisher, Result, Subscriber,
};

use crate::batch::{
    BatchOutcome, EntryOutcomes, MAX_BATCH_ENTRIES, entry_error, publish_in_batches, start_batcher,
};
use crate::client::long_poll_timeouts;
use crate::codec::{self, Encoded};
use crate::config::SqsConfig;
use crate::error::{Subject, map_error};
use crate::queue::{Queue, attribute_map, ceil_secs, dead_letter_queue, open};

const TRANSPORT: &str = "sqs";
/// The OpenTelemetry `messaging.system` of SQS.
pub(crate) const SYSTEM: &str = "aws_sqs";
/// SQS's largest message (body plus attributes), and its largest batch.
pub(crate) const MAX_MESSAGE_SIZE: usize = 1024 * 1024;
/// Entries per `SendMessageBatch` / `DeleteMessageBatch`.
const MAX_BATCH: usize = MAX_BATCH_ENTRIES;
/// The longest long poll SQS allows.
const MAX_WAIT: Duration = Duration::from_secs(20);
/// Receive calls (long polls) a consumer may run at once on one subscriber.
const CONCURRENT_RECEIVES: usize = 16;
/// Concurrent `DeleteMessageBatch` calls per subscriber.
const DELETE_CONCURRENCY: usize = 8;
/// Under load, how long an ack may wait for others to share its `DeleteMessageBatch`.
const DELETE_LINGER: Duration = Duration::from_millis(5);

/// Publishes to an SQS queue. With `batching` (the default), concurrent `publish` calls
/// share `SendMessageBatch` calls (see [`SqsConfig::linger`]).
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
    /// SQS's largest message: body plus attribute names, types and values, in bytes (a
    /// queue's `MaximumMessageSize` may be lower).
    pub const MAX_MESSAGE_SIZE: usize = MAX_MESSAGE_SIZE;

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

    fn destination(&self) -> Destination {
        Destination::new(SYSTEM, self.queue.name.clone())
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

    fn destination(&self) -> Destination {
        Destination::new(SYSTEM, self.shared.queue.name.clone())
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
                    messaging.system = SYSTEM,
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
