//! The baselines of kafka://, written directly against `rdkafka` doing the same work as
//! cloudbus: an idempotent producer with `acks=all` from 16 tasks (one record at a time per
//! task, or 10), and one group consumer that processes each record and commits what it
//! processed (`store_offset` + auto-commit every second, as cloudbus commits every second).
//!
//! Needs a Kafka-compatible broker at `KAFKA_BROKERS` (default 127.0.0.1:9092): `kafka/start`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::harness::{self, BATCH, BODY, PUBLISH_TASKS, Report, Sink, Source};
use crate::plan::{Job, is_consume};

/// Partitions of every topic the bench makes.
pub const PARTITIONS: i32 = 4;
/// The consumer group of the consume scenarios.
pub const GROUP: &str = "bench";

pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Fails fast, with the fix, when no broker answers.
pub async fn check_broker() -> Result<()> {
    let brokers = brokers();
    let first = brokers.split(',').next().unwrap_or_default().to_string();
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(&first),
    )
    .await
    .map_err(|_| anyhow!("the Kafka broker at {first} did not answer within 5 s"))?
    .map_err(|e| {
        anyhow!(
            "no Kafka broker at {first} ({e}): start one with `kafka/start` (from the \
                 repository root), or set KAFKA_BROKERS"
        )
    })?;
    Ok(())
}

fn producer() -> Result<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // cloudbus's default
        .set("linger.ms", "1")
        .create()
        .context("creating the producer")
}

/// The parent's set-up: the job's topic, and for the consume scenarios its backlog.
pub async fn prepare(job: &Job) -> Result<()> {
    let admin = admin()?;
    let topic = NewTopic::new(&job.entity, PARTITIONS, TopicReplication::Fixed(-1));
    for outcome in admin
        .create_topics(&[topic], &AdminOptions::new())
        .await
        .context("creating the topic")?
    {
        outcome.map_err(|(name, code)| anyhow!("creating {name}: {code}"))?;
    }
    if is_consume(job.scenario) {
        let producer = Arc::new(producer()?);
        let sinks = (0..PUBLISH_TASKS)
            .map(|_| ProducerSink {
                producer: producer.clone(),
                topic: job.entity.clone(),
            })
            .collect();
        harness::publish::<ProducerSink>(sinks, job.messages, BATCH).await?;
    }
    Ok(())
}

/// Deletes the job's topic and the dead-letter topic its subscriber made (untimed): the
/// test broker keeps every record in memory.
pub async fn clean_up(job: &Job) -> Result<()> {
    let admin = admin()?;
    let dead_letters = format!("{}.{GROUP}.dlq", job.entity);
    let topics = [job.entity.as_str(), dead_letters.as_str()];
    for outcome in admin
        .delete_topics(&topics, &AdminOptions::new())
        .await
        .context("deleting the topics")?
    {
        match outcome {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((name, code)) => bail!("deleting {name}: {code}"),
        }
    }
    Ok(())
}

fn admin() -> Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .context("creating the admin client")
}

pub async fn run(job: &Job) -> Result<Report> {
    let n = job.messages;
    let elapsed = match job.scenario {
        "raw-single" | "raw-batch" => {
            let per_call = if job.scenario == "raw-batch" {
                BATCH
            } else {
                1
            };
            let producer = Arc::new(producer()?);
            let sinks = (0..PUBLISH_TASKS)
                .map(|_| ProducerSink {
                    producer: producer.clone(),
                    topic: job.entity.clone(),
                })
                .collect();
            harness::publish::<ProducerSink>(sinks, n, per_call).await?
        }
        "raw-consume" | "raw-consume-tasks" => {
            let consumer: StreamConsumer = ClientConfig::new()
                .set("bootstrap.servers", brokers())
                .set("group.id", GROUP)
                .set("auto.offset.reset", "earliest")
                .set("enable.auto.commit", "true")
                .set("enable.auto.offset.store", "false")
                .set("auto.commit.interval.ms", "1000")
                .set("partition.assignment.strategy", "cooperative-sticky")
                .set("session.timeout.ms", "6000")
                .create()
                .context("creating the consumer")?;
            consumer.subscribe(&[&job.entity])?;
            let progress = if job.scenario == "raw-consume" {
                harness::consume_counting(vec![ConsumerSource { consumer }], n).await?
            } else {
                consume_in_tasks(consumer, n).await?
            };
            return after_first(n, &progress);
        }
        other => bail!("no Kafka baseline `{other}`"),
    };
    Ok(Report::timed(n, elapsed))
}

/// The report of a consume scenario timed from its first record: a new group's first
/// assignment takes a few seconds on the test broker (half its session timeout), the same
/// for cloudbus and the raw loop, and is reported as a note.
pub fn after_first(n: usize, progress: &harness::Progress) -> Result<Report> {
    let (elapsed, first) = progress.elapsed_after_first()?;
    Ok(Report::timed(n, elapsed).with_note(Some(format!(
        "timed from the first record, which came after {:.2} s",
        first.as_secs_f64()
    ))))
}

/// Each record of a call is sent at once and awaited together: one record, or ten.
struct ProducerSink {
    producer: Arc<FutureProducer>,
    topic: String,
}

impl Sink for ProducerSink {
    async fn send(&mut self, n: usize) -> Result<()> {
        let sends = (0..n).map(|_| {
            self.producer.send(
                FutureRecord::<(), _>::to(&self.topic).payload(BODY),
                Timeout::After(Duration::from_secs(30)),
            )
        });
        for outcome in futures::future::join_all(sends).await {
            outcome.map_err(|(e, _)| anyhow!("produce: {e}"))?;
        }
        Ok(())
    }
}

/// Handles each record in a task of its own, at most [`TASKS`] at a time (as the
/// `Consumer` runs handlers), storing its offset when done.
async fn consume_in_tasks(consumer: StreamConsumer, n: usize) -> Result<harness::Progress> {
    let consumer = Arc::new(consumer);
    let progress = harness::Progress::start(n);
    let slots = Arc::new(tokio::sync::Semaphore::new(TASKS));
    let drain = async {
        for _ in 0..n {
            let permit = slots.clone().acquire_owned().await?;
            let record = consumer.recv().await?.detach();
            let (consumer, progress) = (consumer.clone(), progress.clone());
            tokio::spawn(async move {
                std::hint::black_box(record.payload());
                let _ = consumer.store_offset(record.topic(), record.partition(), record.offset());
                progress.add(1);
                drop(permit);
            });
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::select! {
        drained = drain => drained?,
        stalled = progress.stalled() => return Err(stalled),
    }
    // Every record is received; the last handlers finish.
    let _all = slots.acquire_many(TASKS as u32).await?;
    Ok(progress)
}

/// Concurrent handlers of the raw task loop, as many as the bench's `Consumer` runs.
const TASKS: usize = 80;

/// Receives up to ten records, processes each (reads its value) and stores its offset for
/// the next auto-commit.
struct ConsumerSource {
    consumer: StreamConsumer,
}

impl Source for ConsumerSource {
    async fn take(&mut self) -> Result<usize> {
        let mut taken = 0;
        while taken < BATCH {
            let record = if taken == 0 {
                self.consumer.recv().await?
            } else {
                match tokio::time::timeout(Duration::ZERO, self.consumer.recv()).await {
                    Ok(record) => record?,
                    Err(_) => break,
                }
            };
            std::hint::black_box(record.payload());
            self.consumer.store_offset_from_message(&record)?;
            taken += 1;
        }
        Ok(taken)
    }
}
