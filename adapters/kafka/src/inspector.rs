//! Looking into a topic or a subscription (a consumer group) without consuming it: peek
//! reads records from the group's position on a client that never joins the group nor
//! commits, and stats count the records past the group's position (its lag).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use cloudbus_core::config::Start;
use cloudbus_core::inspector::{Inspector, Peeked, Stats};
use cloudbus_core::{Destination, Error, Result};
use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::TRANSPORT;
use crate::admin::{REQUEST_TIMEOUT, ensure_topic, offsets_at};
use crate::client::{Context, settings};
use crate::config::KafkaConfig;
use crate::error::map_error;
use crate::mapping::decode;

/// The longest a peek reads.
const PEEK_TIMEOUT: Duration = Duration::from_secs(10);
/// A peek ends when no record came for this long.
const QUIET: Duration = Duration::from_secs(1);

/// What is read: a topic, and the group whose position counts (none: the whole log).
#[derive(Clone)]
struct Source {
    topic: String,
    group: Option<String>,
    partitions: Vec<i32>,
    /// Where the group starts on a partition it has not committed.
    start: Start,
}

/// Looks into a Kafka topic, a subscription (consumer group) or its dead-letter topic.
/// Peek and stats never join the group and never commit.
pub struct KafkaInspector {
    settings: ClientConfig,
    context: Context,
    source: Source,
    /// The subscription's dead-letter topic and the group that reads it.
    dead_letters: Option<Source>,
    destination: Destination,
}

impl KafkaInspector {
    /// Opens an inspector on what `config` names: `kafka://<topic>` (the records the log
    /// keeps), `?subscription=<group>` (those past the group's position), with
    /// `dead_letter` its dead-letter topic. It creates nothing.
    pub async fn connect(config: &KafkaConfig) -> Result<Self> {
        let (settings, context) = settings(config).await?;
        let (topic, group) = match config.source() {
            Ok((topic, group)) => (topic, Some(group)),
            Err(_) => (config.topic.clone(), None),
        };
        let partitions = ensure_topic(&settings, context.clone(), &topic, None).await?;
        let start = if config.dead_letter {
            Start::Earliest
        } else {
            config.start
        };
        let dead_letters = match (&group, config.dead_letter) {
            (Some(group), false) => {
                let dlq = KafkaConfig::dead_letter_topic(&topic, group);
                match ensure_topic(&settings, context.clone(), &dlq, None).await {
                    Ok(partitions) => Some(Source {
                        topic: dlq,
                        group: Some(KafkaConfig::dead_letter_group(group)),
                        partitions,
                        start: Start::Earliest,
                    }),
                    Err(Error::NotFound { .. }) => None,
                    Err(error) => return Err(error),
                }
            }
            _ => None,
        };
        let destination = match &config.subscription {
            Some(group) => {
                Destination::new(TRANSPORT, topic.clone()).with_subscription(group.clone())
            }
            None => Destination::new(TRANSPORT, topic.clone()),
        };
        Ok(KafkaInspector {
            settings,
            context,
            source: Source {
                topic,
                group,
                partitions,
                start,
            },
            dead_letters,
            destination,
        })
    }

    /// Runs `work` with a client of `source`'s group (one that never joins it) on a
    /// blocking thread: librdkafka's calls block.
    async fn with_client<T: Send + 'static>(
        &self,
        source: &Source,
        work: impl FnOnce(&BaseConsumer<Context>, &Source) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let mut settings = self.settings.clone();
        let group = source
            .group
            .clone()
            .unwrap_or_else(|| format!("cloudbus-inspect-{}", cloudbus_core::message::new_id()));
        settings
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest");
        let consumer: BaseConsumer<Context> = settings
            .create_with_context(self.context.clone())
            .map_err(|e| map_error("connect", &source.topic, e))?;
        let source = source.clone();
        tokio::task::spawn_blocking(move || work(&consumer, &source))
            .await
            .map_err(|e| {
                Error::transport(TRANSPORT, format!("inspecting failed: {e}"), true, None)
            })?
    }
}

/// Each partition's position (the group's committed offset, else where it starts; the
/// log's beginning without a group) and its end.
fn positions(consumer: &BaseConsumer<Context>, source: &Source) -> Result<Vec<(i32, i64, i64)>> {
    let topic = &source.topic;
    let mut watermarks = Vec::new();
    for &p in &source.partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, REQUEST_TIMEOUT)
            .map_err(|e| map_error("read the partition's offsets", topic, e))?;
        watermarks.push((p, low, high));
    }
    let committed: Vec<(i32, Option<i64>)> = match &source.group {
        None => watermarks.iter().map(|&(p, _, _)| (p, None)).collect(),
        Some(_) => {
            let mut all = TopicPartitionList::new();
            for &p in &source.partitions {
                all.add_partition(topic, p);
            }
            consumer
                .committed_offsets(all, REQUEST_TIMEOUT)
                .map_err(|e| map_error("read the committed offsets", topic, e))?
                .elements()
                .iter()
                .map(|e| {
                    let offset = match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    };
                    (e.partition(), offset)
                })
                .collect()
        }
    };
    let at = match (source.group.is_some(), source.start) {
        (true, Start::At(at)) => Some(offsets_at(consumer, topic, &source.partitions, at)?),
        _ => None,
    };
    Ok(watermarks
        .into_iter()
        .map(|(p, low, high)| {
            let committed = committed
                .iter()
                .find(|(q, _)| *q == p)
                .and_then(|(_, o)| *o);
            let position = match (committed, source.group.is_some(), source.start) {
                (Some(offset), _, _) => offset,
                (None, false, _) | (None, true, Start::Earliest) => low,
                (None, true, Start::Latest) => high,
                (None, true, Start::At(_)) => at
                    .as_ref()
                    .and_then(|found| found.iter().find(|(q, _)| *q == p).map(|(_, o)| *o))
                    .filter(|o| *o >= 0)
                    .unwrap_or(high),
            };
            (p, position.clamp(low, high), high)
        })
        .collect())
}

/// Up to `max` records of each partition from its position, oldest first over all. It
/// reads until each partition gave `max`, or nothing came for [`QUIET`]: the end of a
/// partition is not taken from its high watermark, which some brokers report late (tansu
/// after batches of several records).
fn read(consumer: &BaseConsumer<Context>, source: &Source, max: usize) -> Result<Vec<Peeked>> {
    let topic = &source.topic;
    let mut wanted = std::collections::HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for (p, position, _) in positions(consumer, source)? {
        wanted.insert(p, max);
        assignment
            .add_partition_offset(topic, p, Offset::Offset(position))
            .map_err(|e| map_error("peek", topic, e))?;
    }
    let mut peeked = Vec::new();
    if wanted.is_empty() || max == 0 {
        return Ok(peeked);
    }
    consumer
        .assign(&assignment)
        .map_err(|e| map_error("peek", topic, e))?;
    let deadline = Instant::now() + PEEK_TIMEOUT;
    let mut last = Instant::now();
    while wanted.values().any(|left| *left > 0)
        && Instant::now() < deadline
        && last.elapsed() < QUIET
    {
        let Some(polled) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let record = polled.map_err(|e| map_error("peek", topic, e))?;
        let Some(left) = wanted.get_mut(&record.partition()) else {
            continue;
        };
        last = Instant::now();
        if *left == 0 {
            continue;
        }
        *left -= 1;
        let (partition, offset) = (record.partition(), record.offset());
        let decoded = decode(record.key(), record.payload(), record.headers(), || {
            format!("{topic}/{partition}/{offset}")
        });
        let enqueued_at = record.timestamp().to_millis().map_or(UNIX_EPOCH, |ms| {
            UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
        });
        peeked.push(Peeked::new(
            decoded.message,
            0,
            enqueued_at,
            format!("{partition}:{offset}"),
        ));
    }
    peeked.sort_by_key(|p| p.enqueued_at);
    peeked.truncate(max);
    Ok(peeked)
}

/// Records past the positions.
fn lag(consumer: &BaseConsumer<Context>, source: &Source) -> Result<u64> {
    Ok(positions(consumer, source)?
        .iter()
        .map(|(_, position, high)| (high - position).max(0) as u64)
        .sum())
}

#[async_trait]
impl Inspector for KafkaInspector {
    /// Records from the group's position on (from the log's beginning without a
    /// subscription), read by a client that never joins the group nor commits. Kafka
    /// keeps no delivery count, so each shows 0.
    async fn peek(&self, max: usize) -> Result<Vec<Peeked>> {
        self.with_client(&self.source, move |consumer, source| {
            read(consumer, source, max)
        })
        .await
    }

    async fn stats(&self) -> Result<Stats> {
        let (waiting, oldest) = self
            .with_client(&self.source, |consumer, source| {
                let waiting = lag(consumer, source)?;
                let oldest = read(consumer, source, 1)?.first().map(|p| p.enqueued_at);
                Ok((waiting, oldest))
            })
            .await?;
        let mut stats = Stats::default()
            .with_waiting(Some(waiting))
            .with_oldest_age(
                oldest.map(|at| SystemTime::now().duration_since(at).unwrap_or_default()),
            )
            .not_reported(
                "in_flight",
                "Kafka does not lock records: those a subscriber holds unsettled count as waiting \
             until the group commits past them",
            );
        if stats.oldest_age.is_none() {
            stats = stats.not_reported("oldest_age", "no record waits");
        }
        match (&self.dead_letters, &self.source.group) {
            (Some(dead_letters), _) => {
                stats.dead_lettered = Some(self.with_client(dead_letters, lag).await?);
            }
            (None, None) => {
                stats = stats.not_reported(
                    "dead_lettered",
                    "dead-letter topics belong to subscriptions: add ?subscription=<group>",
                )
            }
            (None, Some(_)) => {
                stats = stats.not_reported(
                    "dead_lettered",
                    format!(
                        "no dead-letter topic {}",
                        self.destination
                            .subscription()
                            .map(|g| KafkaConfig::dead_letter_topic(&self.source.topic, g))
                            .unwrap_or_default()
                    ),
                )
            }
        }
        Ok(stats)
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }

    fn destination(&self) -> Destination {
        self.destination.clone()
    }
}
