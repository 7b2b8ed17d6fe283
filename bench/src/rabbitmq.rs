//! The baselines of rabbitmq://, written directly against `lapin` doing the same work as
//! cloudbus: persistent, mandatory messages from 16 tasks on one shared confirm-mode
//! channel, each task awaiting the confirms of what it sent (one message at a time, or 10),
//! and consumers of a durable quorum queue acking each delivery.
//!
//! Needs a RabbitMQ node at `RABBITMQ_URL` (default amqp://guest:guest@127.0.0.1:5672/%2f,
//! cloudbus's default): `export "$(rabbitmq/start --print)"`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use cloudbus::rabbitmq::{DEFAULT_URI, RabbitMqConfig, URI_ENV, dead_letter_queue};
use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use crate::harness::{self, BATCH, BODY, PUBLISH_TASKS, Report, Sink, Source};
use crate::plan::{Job, is_consume};

/// Concurrent handlers of the raw task loop and its prefetch: the bench `Consumer`'s
/// concurrency, whose free slots are the cloudbus subscriber's window.
const TASKS: usize = 80;

/// The server: `RABBITMQ_URL`, else cloudbus's default (which the children read too).
pub fn uri() -> String {
    std::env::var(URI_ENV).unwrap_or_else(|_| DEFAULT_URI.to_string())
}

async fn connect() -> Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name("cloudbus-bench".into());
    Connection::connect(&uri(), properties)
        .await
        .context("connecting to RabbitMQ")
}

/// Fails fast, with the fix, when no node answers.
pub async fn check_broker() -> Result<()> {
    let connection = tokio::time::timeout(Duration::from_secs(5), connect())
        .await
        .map_err(|_| anyhow!("RabbitMQ (RABBITMQ_URL) did not answer within 5 s"))?
        .map_err(|e| {
            anyhow!(
                "{e:#}: start a node with `export \"$(rabbitmq/start --print)\"` (from the \
                 repository root), or set RABBITMQ_URL"
            )
        })?;
    let _ = connection.close(200, "checked".into()).await;
    Ok(())
}

/// A channel in confirm mode on a new connection (kept alive by the returned connection).
async fn confirm_channel() -> Result<(Connection, Channel)> {
    let connection = connect().await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("turning on publisher confirms")?;
    Ok((connection, channel))
}

/// The parent's set-up: the job's queue, and for the consume scenarios its backlog (sent
/// with the raw client, untimed). The cloudbus scenarios' queues are declared by cloudbus
/// itself (`create`: a quorum queue with its delivery limit and dead-letter queue), the raw
/// scenarios' as a plain durable quorum queue.
pub async fn prepare(job: &Job) -> Result<()> {
    // Every scenario's queue is declared as cloudbus declares it (a quorum queue with a
    // delivery limit and at-least-once dead-lettering into `<queue>.dlq`), so the raw
    // loops and cloudbus make the broker do the same work per message.
    let mut config = RabbitMqConfig::new(&job.entity);
    config.create = true;
    cloudbus::rabbitmq::create_subscription(&config)
        .await
        .context("declaring the queue")?;
    if is_consume(job.scenario) {
        let (connection, channel) = confirm_channel().await?;
        harness::publish(sinks(&channel, &job.entity), job.messages, BATCH).await?;
        let _ = connection.close(200, "filled".into()).await;
    }
    Ok(())
}

/// Deletes the job's queue and the dead-letter queue cloudbus declared with it (untimed).
pub async fn clean_up(job: &Job) -> Result<()> {
    let connection = connect().await?;
    for queue in [job.entity.clone(), dead_letter_queue(&job.entity)] {
        // A channel per queue: deleting one that is missing may close the channel.
        let channel = connection.create_channel().await?;
        if let Err(e) = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
        {
            let text = e.to_string();
            if !text.contains("NOT_FOUND") && !text.contains("404") {
                bail!("deleting the queue {queue}: {text}");
            }
        }
    }
    let _ = connection.close(200, "cleaned up".into()).await;
    Ok(())
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
            let (_connection, channel) = confirm_channel().await?;
            harness::publish(sinks(&channel, &job.entity), n, per_call).await?
        }
        "raw-consume" | "raw-consume-tasks" => {
            let connection = connect().await?;
            let channel = connection.create_channel().await?;
            let tasks = job.scenario == "raw-consume-tasks";
            let prefetch = if tasks { TASKS } else { BATCH };
            channel
                .basic_qos(prefetch as u16, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    job.entity.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .context("consuming")?;
            if tasks {
                consume_in_tasks(consumer, n).await?
            } else {
                harness::consume(vec![ConsumerSource { consumer }], n).await?
            }
        }
        other => bail!("no RabbitMQ baseline `{other}`"),
    };
    Ok(Report::timed(n, elapsed))
}

fn sinks(channel: &Channel, queue: &str) -> Vec<ChannelSink> {
    (0..PUBLISH_TASKS)
        .map(|_| ChannelSink {
            channel: channel.clone(),
            queue: queue.to_string(),
        })
        .collect()
}

/// Publishes the messages of a call at once (persistent, mandatory, to the queue through
/// the default exchange) and awaits their confirms together: one message, or ten.
struct ChannelSink {
    channel: Channel,
    queue: String,
}

impl Sink for ChannelSink {
    async fn send(&mut self, n: usize) -> Result<()> {
        let channel = &self.channel;
        let queue = self.queue.as_str();
        let sends = (0..n).map(|_| async move {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    BODY.as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .context("publish")?
                .await
                .context("publish confirm")?;
            match confirm {
                Confirmation::Ack(None) => Ok(()),
                Confirmation::Ack(Some(returned)) => {
                    bail!("the broker returned the message: {}", returned.reply_text)
                }
                Confirmation::Nack(_) => bail!("the broker nacked the message"),
                Confirmation::NotRequested => bail!("the channel is not in confirm mode"),
            }
        });
        for outcome in futures::future::join_all(sends).await {
            outcome?;
        }
        Ok(())
    }
}

/// Acks each delivery in a task of its own, at most [`TASKS`] at a time (as the `Consumer`
/// runs handlers; the prefetch is as large).
async fn consume_in_tasks(mut consumer: lapin::Consumer, n: usize) -> Result<Duration> {
    let progress = harness::Progress::start(n);
    let slots = Arc::new(tokio::sync::Semaphore::new(TASKS));
    let drain = async {
        for _ in 0..n {
            let permit = slots.clone().acquire_owned().await?;
            let delivery = consumer
                .next()
                .await
                .ok_or_else(|| anyhow!("the consumer ended"))??;
            let progress = progress.clone();
            tokio::spawn(async move {
                std::hint::black_box(&delivery.data);
                if delivery.ack(BasicAckOptions::default()).await.is_ok() {
                    progress.add(1);
                }
                drop(permit);
            });
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::select! {
        drained = drain => drained?,
        stalled = progress.stalled() => return Err(stalled),
    }
    // Every delivery is received; the last acks finish.
    let _all = slots.acquire_many(TASKS as u32).await?;
    progress.elapsed()
}

/// Receives up to ten deliveries (waiting for the first) and acks each in turn: the
/// cloudbus subscriber's `receive(10)` + `ack` loop, without cloudbus.
struct ConsumerSource {
    consumer: lapin::Consumer,
}

impl Source for ConsumerSource {
    async fn take(&mut self) -> Result<usize> {
        let mut taken = 0;
        while taken < BATCH {
            let delivery = if taken == 0 {
                self.consumer.next().await
            } else {
                match tokio::time::timeout(Duration::ZERO, self.consumer.next()).await {
                    Ok(delivery) => delivery,
                    Err(_) => break,
                }
            };
            let delivery = delivery.ok_or_else(|| anyhow!("the consumer ended"))??;
            std::hint::black_box(&delivery.data);
            delivery.ack(BasicAckOptions::default()).await?;
            taken += 1;
        }
        Ok(taken)
    }
}
