//! The cloudbus scenarios, the same on every transport: `publish()` / `publish_batch()`
//! from 16 tasks, and the `Consumer` draining a backlog.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use cloudbus::consumer::{CancellationToken, Consumer, Context, HandlerError};
use cloudbus::{Message, Publisher};

use crate::harness::{self, BATCH, BODY, PUBLISH_TASKS, Progress, Report, Sink};
use crate::plan::{Job, Transport};

/// The LocalStack options of every sqs:// and sns:// URL.
pub const AWS_QUERY: &str = "endpoint=http://127.0.0.1:4566&region=us-east-1";
/// Consumer concurrency in the consume scenarios.
const CONCURRENCY: usize = 80;
/// The consumer's long poll, the same as the raw receivers'.
const RECEIVE_WAIT: Duration = Duration::from_secs(1);

/// The cloudbus URL of the job's entity, for publishing or (`receive`) consuming.
pub fn url(job: &Job, receive: bool) -> String {
    match job.transport {
        // The broker holds what the publish scenarios send: room for all of it.
        Transport::Memory => format!(
            "memory://{}?capacity={}",
            job.entity,
            job.messages.max(100_000)
        ),
        Transport::Sqs => format!("sqs://{}?{AWS_QUERY}&create=true", job.entity),
        Transport::Sns if receive => {
            format!(
                "sns://{}?subscription={}&{AWS_QUERY}",
                job.entity,
                job.receive_queue()
            )
        }
        Transport::Sns => format!("sns://{}?{AWS_QUERY}", job.entity),
        // Default settings: one receive link.
        Transport::ServiceBus => format!("servicebus://{}", job.entity),
        Transport::Kafka if receive => format!(
            "kafka://{}?subscription={}&start=earliest&create=true&session_timeout=6s&brokers={}",
            job.entity,
            crate::kafka::GROUP,
            crate::kafka::brokers()
        ),
        Transport::Kafka => format!("kafka://{}?brokers={}", job.entity, crate::kafka::brokers()),
        // The server comes from RABBITMQ_URL, in the parent and here alike. The window is
        // the raw baseline's prefetch: the Consumer's concurrency, or 10 for receive(10).
        Transport::RabbitMq => format!(
            "rabbitmq://{}?create=true&prefetch={}",
            job.entity,
            if job.scenario == "cloudbus-receive" {
                10
            } else {
                CONCURRENCY
            }
        ),
    }
}

pub async fn run(job: &Job) -> Result<Report> {
    match job.scenario {
        "cloudbus-publish" => publish(job, 1).await,
        "cloudbus-publish-batch" => publish(job, BATCH).await,
        "cloudbus-publish-batch-16" => publish_from_16_publishers(job).await,
        "cloudbus-consume" | "cloudbus-drain-100k" => consume(job).await,
        "cloudbus-receive" => receive(job).await,
        other => bail!("no cloudbus scenario `{other}`"),
    }
}

/// The subscriber alone, as a raw loop uses its client: one task receiving up to ten
/// messages and acking each, without the `Consumer` runtime.
async fn receive(job: &Job) -> Result<Report> {
    let subscriber = cloudbus::connect_subscriber(url(job, true)).await?;
    let progress =
        harness::consume_counting(vec![SubscriberSource(subscriber)], job.messages).await?;
    if job.transport == Transport::Kafka {
        return crate::kafka::after_first(job.messages, &progress);
    }
    Ok(Report::timed(job.messages, progress.elapsed()?))
}

struct SubscriberSource(Box<dyn cloudbus::Subscriber>);

impl harness::Source for SubscriberSource {
    async fn take(&mut self) -> Result<usize> {
        let deliveries = self.0.receive(BATCH, RECEIVE_WAIT).await?;
        let n = deliveries.len();
        for delivery in deliveries {
            delivery.ack().await?;
        }
        Ok(n)
    }
}

async fn connect_sinks(
    job: &Job,
    per_call: usize,
) -> Result<(Arc<dyn Publisher>, Vec<PublisherSink>)> {
    let publisher: Arc<dyn Publisher> = cloudbus::connect_publisher(url(job, false)).await?.into();
    let sinks = (0..PUBLISH_TASKS)
        .map(|_| PublisherSink {
            publisher: publisher.clone(),
            batch: per_call > 1,
        })
        .collect();
    Ok((publisher, sinks))
}

async fn publish(job: &Job, per_call: usize) -> Result<Report> {
    let (publisher, sinks) = connect_sinks(job, per_call).await?;
    let elapsed = harness::publish(sinks, job.messages, per_call).await?;
    publisher.close().await?;
    Ok(Report::timed(job.messages, elapsed))
}

/// `publish_batch()` of 10 from 16 tasks with a publisher (a connection) each, the shape of
/// the raw Service Bus baseline's 16 clients: the ratio to `cloudbus-publish-batch`, which
/// shares one publisher, shows what the connection count is worth.
async fn publish_from_16_publishers(job: &Job) -> Result<Report> {
    let mut sinks = Vec::with_capacity(PUBLISH_TASKS);
    for _ in 0..PUBLISH_TASKS {
        let publisher: Arc<dyn Publisher> =
            cloudbus::connect_publisher(url(job, false)).await?.into();
        sinks.push(PublisherSink {
            publisher,
            batch: true,
        });
    }
    let publishers: Vec<_> = sinks.iter().map(|s| s.publisher.clone()).collect();
    let elapsed = harness::publish(sinks, job.messages, BATCH).await?;
    for publisher in publishers {
        publisher.close().await?;
    }
    Ok(Report::timed(job.messages, elapsed))
}

/// Runs the consumer until it has handled the backlog; the parent filled it, except on
/// memory:// where the broker lives in this process.
async fn consume(job: &Job) -> Result<Report> {
    let n = job.messages;
    let _filled = if job.transport == Transport::Memory {
        let (publisher, sinks) = connect_sinks(job, BATCH).await?;
        harness::publish(sinks, n, BATCH).await?;
        Some(publisher)
    } else {
        None
    };
    let consumer = Consumer::builder(cloudbus::connect_subscriber(url(job, true)).await?)
        .concurrency(CONCURRENCY)
        .receive_wait(RECEIVE_WAIT)
        .shutdown_timeout(Duration::from_secs(10))
        .build()?;
    let shutdown = CancellationToken::new();
    let progress = Progress::start(n);
    let handler = {
        let (progress, shutdown) = (progress.clone(), shutdown.clone());
        move |_message: Message, _context: Context| {
            let (progress, shutdown) = (progress.clone(), shutdown.clone());
            async move {
                if progress.add(1) {
                    shutdown.cancel();
                }
                Ok::<(), HandlerError>(())
            }
        }
    };
    let started = Instant::now();
    tokio::select! {
        _summary = consumer.run(handler, shutdown.clone()) => {}
        stalled = progress.stalled() => {
            shutdown.cancel();
            return Err(stalled);
        }
    }
    if job.transport == Transport::Kafka {
        return crate::kafka::after_first(n, &progress);
    }
    let note = format!(
        "run() returned after {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(Report::timed(n, progress.elapsed()?).with_note(Some(note)))
}

/// `publish()` of one message, or `publish_batch()` of up to 10.
struct PublisherSink {
    publisher: Arc<dyn Publisher>,
    batch: bool,
}

impl Sink for PublisherSink {
    async fn send(&mut self, n: usize) -> Result<()> {
        if !self.batch {
            for _ in 0..n {
                self.publisher.publish(Message::new(BODY)).await?;
            }
            return Ok(());
        }
        let messages = (0..n).map(|_| Message::new(BODY)).collect();
        let outcomes = self.publisher.publish_batch(messages).await;
        if let Some(Err(e)) = outcomes.into_iter().find(Result::is_err) {
            return Err(e.into());
        }
        Ok(())
    }
}
