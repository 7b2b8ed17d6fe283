//! [`KafkaPublisher`]: an idempotent producer. `publish` returns once the broker has
//! acknowledged the record (acks from all in-sync replicas); librdkafka batches the records
//! of concurrent `publish` calls by itself (`linger`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use cloudbus_core::{Destination, Error, Message, Publisher, Result};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::TRANSPORT;
use crate::admin::ensure_topic;
use crate::client::{Context, settings};
use crate::config::KafkaConfig;
use crate::error::map_error;
use crate::mapping::{Record, encode};

/// Room for the record batch framing above `max_message_size` in the producer's own limit.
const FRAMING: usize = 64 * 1024;

/// Publishes to a Kafka topic.
pub struct KafkaPublisher {
    sender: Sender,
    max_message_size: usize,
    closed: AtomicBool,
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("topic", &self.sender.topic)
            .finish_non_exhaustive()
    }
}

/// An idempotent producer on one topic: what the publisher and a subscriber's
/// dead-lettering share.
#[derive(Clone)]
pub(crate) struct Sender {
    /// The producer; replaced by a new one after a fatal error, which ends a librdkafka
    /// producer for good (an idempotent producer fenced or out of sequence).
    producer: Arc<RwLock<Arc<FutureProducer<Context>>>>,
    /// What made the producer, to make its replacement.
    settings: Arc<(ClientConfig, Context)>,
    pub(crate) topic: String,
    timeout: std::time::Duration,
}

impl Sender {
    /// A producer for `topic` with `config`'s connection and limits.
    pub(crate) async fn connect(config: &KafkaConfig, topic: &str) -> Result<Sender> {
        let (mut settings, context) = settings(config).await?;
        settings
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", config.linger.as_millis().to_string())
            .set(
                "message.timeout.ms",
                config.publish_timeout.as_millis().max(1).to_string(),
            )
            .set(
                "message.max.bytes",
                (config.max_message_size + FRAMING).to_string(),
            );
        let producer: FutureProducer<Context> = settings
            .create_with_context(context.clone())
            .map_err(|e| map_error("connect", topic, e))?;
        Ok(Sender {
            producer: Arc::new(RwLock::new(Arc::new(producer))),
            settings: Arc::new((settings, context)),
            topic: topic.to_string(),
            timeout: config.publish_timeout,
        })
    }

    fn producer(&self) -> Arc<FutureProducer<Context>> {
        self.producer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// After `error` from a send on `used`: if librdkafka reports a fatal error, or the
    /// broker refuses the producer's idempotence state (a producer whose records timed out
    /// bumps its epoch, and a broker that does not take the bump answers `ProducerFenced`
    /// to every later record), `used` can send nothing more, so a new producer takes its
    /// place (once, however many sends failed).
    fn replace_if_fatal(&self, used: &Arc<FutureProducer<Context>>, error: &KafkaError) {
        let stuck = error.rdkafka_error_code().filter(|code| {
            matches!(
                code,
                RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::OutOfOrderSequenceNumber
                    | RDKafkaErrorCode::UnknownProducerId
            )
        });
        let Some((code, reason)) = used
            .client()
            .fatal_error()
            .or_else(|| stuck.map(|code| (code, error.to_string())))
        else {
            return;
        };
        let mut slot = self
            .producer
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !Arc::ptr_eq(&slot, used) {
            return;
        }
        let (settings, context) = &*self.settings;
        match settings.create_with_context(context.clone()) {
            Ok(producer) => {
                tracing::warn!(messaging.system = "kafka", messaging.destination.name = %self.topic, ?code, %reason, "the producer failed fatally; publishing through a new one");
                *slot = Arc::new(producer);
            }
            Err(error) => {
                tracing::warn!(messaging.system = "kafka", messaging.destination.name = %self.topic, ?code, %reason, %error, "the producer failed fatally and a new one cannot be made");
            }
        }
    }

    /// Writes one record; done when the broker has acknowledged it. Fails with a transient
    /// error once `publish_timeout` has passed without an acknowledgement: librdkafka's
    /// `message.timeout.ms` says so itself, and where it does not (an idempotent producer
    /// whose broker cannot be reached keeps its records past it), the publish gives up
    /// [`ACK_GRACE`] later.
    pub(crate) async fn send(&self, record: &Record) -> Result<()> {
        let headers = record.owned_headers();
        let mut future = FutureRecord::to(&self.topic)
            .payload(&record.value)
            .headers(headers);
        if let Some(key) = &record.key {
            future = future.key(key);
        }
        let producer = self.producer();
        let send = producer.send(future, Timeout::After(self.timeout));
        match tokio::time::timeout(self.timeout + ACK_GRACE, send).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((error, _))) => {
                self.replace_if_fatal(&producer, &error);
                Err(produce_error(&self.topic, error))
            }
            Err(_) => Err(Error::transport(
                TRANSPORT,
                format!(
                    "publish to `{}`: no acknowledgement within publish_timeout ({:?}); the \
                     record may or may not have been written",
                    self.topic, self.timeout
                ),
                true,
                None,
            )),
        }
    }

    /// Sends what librdkafka still holds, for up to the publish timeout.
    pub(crate) async fn flush(&self) -> Result<()> {
        let producer = self.producer();
        let timeout = self.timeout;
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || producer.flush(Timeout::After(timeout)))
            .await
            .map_err(|e| Error::transport(TRANSPORT, format!("flush failed: {e}"), true, None))?
            .map_err(|e| map_error("flush", &topic, e))
    }
}

/// How long after `publish_timeout` a publish waits for librdkafka's own verdict.
const ACK_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// A failed produce: a timeout means the record may or may not have been written.
fn produce_error(topic: &str, error: KafkaError) -> Error {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageTimedOut) => Error::transport(
            TRANSPORT,
            format!(
                "publish to `{topic}` timed out before the broker acknowledged it; the record \
                 may or may not have been written"
            ),
            true,
            Some(Arc::new(error)),
        ),
        Some(RDKafkaErrorCode::QueueFull) => Error::transport(
            TRANSPORT,
            format!("the producer's queue for `{topic}` is full; publish more slowly or retry"),
            true,
            Some(Arc::new(error)),
        ),
        _ => map_error("publish", topic, error),
    }
}

impl KafkaPublisher {
    /// Connects to the topic `config` names (creating it with `create`).
    pub async fn connect(config: &KafkaConfig) -> Result<Self> {
        if config.subscription.is_some() || config.dead_letter {
            return Err(Error::config(format!(
                "a publisher writes to the topic kafka://{}: remove `subscription` and \
                 `dead_letter` from its configuration",
                config.topic
            )));
        }
        let (settings, context) = settings(config).await?;
        ensure_topic(
            &settings,
            context,
            &config.topic,
            config
                .create
                .then_some((config.partitions, config.replication)),
        )
        .await?;
        Ok(KafkaPublisher {
            sender: Sender::connect(config, &config.topic).await?,
            max_message_size: config.max_message_size,
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

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, message: Message) -> Result<String> {
        self.check_open()?;
        let record = encode(&message, self.max_message_size)?;
        self.sender.send(&record).await?;
        Ok(message.id)
    }

    /// All records go to librdkafka at once and are batched together.
    async fn publish_batch(&self, messages: Vec<Message>) -> Vec<Result<String>> {
        if let Err(error) = self.check_open() {
            return messages.iter().map(|_| Err(error.clone())).collect();
        }
        let sends = messages.iter().map(|message| async move {
            let record = encode(message, self.max_message_size)?;
            self.sender.send(&record).await?;
            Ok(message.id.clone())
        });
        futures::future::join_all(sends).await
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.sender.flush().await
    }

    fn destination(&self) -> Destination {
        Destination::new(TRANSPORT, self.sender.topic.clone())
    }
}
