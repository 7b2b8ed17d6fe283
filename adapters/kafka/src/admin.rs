//! What happens before publishing or subscribing: the topic must exist (or, with
//! `create`, is created), and a new subscription is pinned to its start position.
//!
//! A consumer group remembers only committed offsets, so a group that never committed has
//! no position: librdkafka would start it at `auto.offset.reset` whenever it first gets a
//! partition, and a crash before its first commit would move that start. So the first
//! subscriber of a group commits its start (`latest`, `earliest` or the offsets at a time)
//! for every partition without a committed offset, before joining: the subscription then
//! exists from that moment, as a queue or a Service Bus subscription does, and nothing
//! published after it is skipped.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cloudbus_core::config::Start;
use cloudbus_core::{Error, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, ClientContext};

use crate::TRANSPORT;
use crate::client::settings;
use crate::config::KafkaConfig;
use crate::error::map_error;

/// How long a metadata or offsets request may take.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates the subscription `config` names without joining its group: with `create`, the
/// topic and the subscription's dead-letter topic; then the group's start position, pinned
/// for every partition without a committed offset. What a deployment runs before the
/// service starts, and what [`KafkaSubscriber::connect`](crate::KafkaSubscriber::connect)
/// does first.
pub async fn create_subscription(config: &KafkaConfig) -> Result<()> {
    let (topic, group) = config.source()?;
    let (settings, context) = settings(config).await?;
    let create = config
        .create
        .then_some((config.partitions, config.replication));
    let partitions = ensure_topic(&settings, context.clone(), &topic, create).await?;
    if !config.dead_letter {
        let dlq = KafkaConfig::dead_letter_topic(&topic, &group);
        ensure_topic(&settings, context.clone(), &dlq, create).await?;
    }
    pin_start(
        &settings,
        context,
        &topic,
        &group,
        &partitions,
        config.start,
    )
    .await
}

/// The partitions of `topic`; with `create`, a missing topic is created first.
pub(crate) async fn ensure_topic<C: ClientContext + 'static>(
    settings: &ClientConfig,
    context: C,
    topic: &str,
    create: Option<(i32, Option<i32>)>,
) -> Result<Vec<i32>> {
    let admin: Arc<AdminClient<C>> = Arc::new(
        settings
            .create_with_context(context)
            .map_err(|e| map_error("connect", topic, e))?,
    );
    if let Some(partitions) = partitions_of(&admin, topic).await? {
        return Ok(partitions);
    }
    let Some((partitions, replication)) = create else {
        return Err(Error::NotFound {
            transport: TRANSPORT,
            entity: "topic",
            name: topic.to_string(),
        });
    };
    let new = NewTopic::new(
        topic,
        partitions,
        TopicReplication::Fixed(replication.unwrap_or(-1)),
    );
    let outcome = admin
        .create_topics(
            &[new],
            &AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT)),
        )
        .await
        .map_err(|e| map_error("create topic", topic, e))?;
    for result in outcome {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(map_error(
                    "create topic",
                    topic,
                    rdkafka::error::KafkaError::AdminOp(code),
                ));
            }
        }
    }
    tracing::info!(
        messaging.system = "kafka",
        messaging.destination.name = topic,
        partitions,
        "created the topic"
    );
    // A new topic's partitions show in the metadata once its leaders are elected.
    let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
    loop {
        if let Some(partitions) = partitions_of(&admin, topic).await? {
            return Ok(partitions);
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::transport(
                TRANSPORT,
                format!("created the topic `{topic}`, but it did not show in the metadata"),
                true,
                None,
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The partitions of `topic` from the metadata, or `None` when it does not exist.
async fn partitions_of<C: ClientContext + 'static>(
    admin: &Arc<AdminClient<C>>,
    topic: &str,
) -> Result<Option<Vec<i32>>> {
    let (admin, name) = (admin.clone(), topic.to_string());
    let metadata = tokio::task::spawn_blocking(move || {
        admin.inner().fetch_metadata(Some(&name), REQUEST_TIMEOUT)
    })
    .await
    .map_err(|e| {
        Error::transport(
            TRANSPORT,
            format!("reading the metadata failed: {e}"),
            true,
            None,
        )
    })?
    .map_err(|e| map_error("read the metadata", topic, e))?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match found.error() {
        None => {}
        Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => {
            return Ok(None);
        }
        Some(code) => {
            return Err(map_error(
                "read the metadata",
                topic,
                rdkafka::error::KafkaError::MetadataFetch(code.into()),
            ));
        }
    }
    let partitions: Vec<i32> = found.partitions().iter().map(|p| p.id()).collect();
    Ok((!partitions.is_empty()).then_some(partitions))
}

/// Commits `start` for every partition of `topic` the group `group` has no committed
/// offset for. A group that already has members committed its own: their commits win.
async fn pin_start<C: rdkafka::consumer::ConsumerContext + 'static>(
    settings: &ClientConfig,
    context: C,
    topic: &str,
    group: &str,
    partitions: &[i32],
    start: Start,
) -> Result<()> {
    let mut settings = settings.clone();
    settings
        .set("group.id", group)
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer<C> = settings
        .create_with_context(context)
        .map_err(|e| map_error("connect", topic, e))?;
    let topic = topic.to_string();
    let partitions = partitions.to_vec();
    let group = group.to_string();
    tokio::task::spawn_blocking(move || {
        let mut all = TopicPartitionList::new();
        for &p in &partitions {
            all.add_partition(&topic, p);
        }
        let committed = consumer
            .committed_offsets(all, REQUEST_TIMEOUT)
            .map_err(|e| map_error("read the committed offsets", &topic, e))?;
        let missing: Vec<i32> = committed
            .elements()
            .iter()
            .filter(|e| !matches!(e.offset(), Offset::Offset(_)))
            .map(|e| e.partition())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut pinned = TopicPartitionList::new();
        let at = match start {
            Start::At(at) => Some(at),
            _ => None,
        };
        let found_at = match at {
            Some(at) => Some(offsets_at(&consumer, &topic, &missing, at)?),
            None => None,
        };
        for &p in &missing {
            let (low, high) = consumer
                .fetch_watermarks(&topic, p, REQUEST_TIMEOUT)
                .map_err(|e| map_error("read the partition's offsets", &topic, e))?;
            let offset = match start {
                Start::Earliest => low,
                Start::Latest => high,
                // No record at or after the time: from the end.
                Start::At(_) => found_at
                    .as_ref()
                    .and_then(|found| found.iter().find(|(q, _)| *q == p).map(|(_, o)| *o))
                    .filter(|o| *o >= 0)
                    .unwrap_or(high),
            };
            pinned
                .add_partition_offset(&topic, p, Offset::Offset(offset))
                .map_err(|e| map_error("pin the subscription's start", &topic, e))?;
        }
        match consumer.commit(&pinned, CommitMode::Sync) {
            Ok(()) => tracing::info!(
                messaging.system = "kafka",
                messaging.destination.name = %topic,
                messaging.consumer.group.name = %group,
                %start,
                "created the subscription: pinned its start"
            ),
            // The group has members, which commit their own positions.
            Err(error) => tracing::debug!(
                messaging.system = "kafka",
                messaging.destination.name = %topic,
                messaging.consumer.group.name = %group,
                %error,
                "the group's start was not pinned (it has members)"
            ),
        }
        Ok(())
    })
    .await
    .map_err(|e| {
        Error::transport(
            TRANSPORT,
            format!("pinning the start failed: {e}"),
            true,
            None,
        )
    })?
}

/// The first offset at or after `at` in each partition (-1 where there is none).
pub(crate) fn offsets_at<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partitions: &[i32],
    at: SystemTime,
) -> Result<Vec<(i32, i64)>> {
    let millis = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut query = TopicPartitionList::new();
    for &p in partitions {
        query
            .add_partition_offset(topic, p, Offset::Offset(millis))
            .map_err(|e| map_error("look up offsets by time", topic, e))?;
    }
    let found = consumer
        .offsets_for_times(query, REQUEST_TIMEOUT)
        .map_err(|e| map_error("look up offsets by time", topic, e))?;
    Ok(found
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) => o,
                _ => -1,
            };
            (e.partition(), offset)
        })
        .collect())
}
