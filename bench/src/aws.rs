//! SQS and SNS on LocalStack: the raw-SDK and omniqueue scenarios, the latency scenario,
//! and the set-up (entities, pre-filled backlogs) the parent does before a scenario runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_sns::types::PublishBatchRequestEntry;
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageAttributeValue, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use cloudbus::{Message, Publisher as _, Subscriber as _};
use omniqueue::backends::{SqsBackend, SqsConsumer, SqsProducer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::cloud;
use crate::harness::{self, BATCH, BODY, CONSUME_TASKS, PUBLISH_TASKS, Report, Sink, Source};
use crate::plan::{Job, Transport, is_consume};

pub const ENDPOINT: &str = "http://127.0.0.1:4566";
pub const REGION: &str = "us-east-1";
const LOCALSTACK: &str = "127.0.0.1:4566";
/// Long poll of the raw and omniqueue receivers.
const RECEIVE_WAIT: Duration = Duration::from_secs(1);

/// Formats an SDK error with its sources, for `map_err`.
fn sdk<E: std::error::Error>(operation: &'static str) -> impl FnOnce(E) -> anyhow::Error {
    move |e| anyhow!("{operation}: {}", DisplayErrorContext(e))
}

/// Fails with the fix when LocalStack does not answer or lacks SQS or SNS.
pub async fn check_localstack() -> Result<()> {
    let fix =
        "start it with `localstack/start` (from the repository root; `localstack/stop` stops it)";
    let health = tokio::time::timeout(Duration::from_secs(5), async {
        let mut stream = tokio::net::TcpStream::connect(LOCALSTACK).await?;
        stream
            .write_all(b"GET /_localstack/health HTTP/1.0\r\nHost: 127.0.0.1:4566\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    })
    .await
    .map_err(|_| anyhow!("LocalStack at {ENDPOINT} did not answer within 5 s: {fix}"))?
    .map_err(|e| anyhow!("LocalStack is not reachable at {ENDPOINT} ({e}): {fix}"))?;
    let body = health.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    let status: serde_json::Value = serde_json::from_str(body).map_err(|_| {
        anyhow!("{ENDPOINT}/_localstack/health did not answer JSON: is it LocalStack? {fix}")
    })?;
    for service in ["sqs", "sns"] {
        let state = status["services"][service].as_str().unwrap_or("missing");
        if !matches!(state, "available" | "running") {
            bail!(
                "LocalStack at {ENDPOINT} reports {service} as `{state}`: {fix} (with SERVICES=sqs,sns)"
            );
        }
    }
    Ok(())
}

/// Raw SDK clients for LocalStack (credentials from the environment, which `main` fills).
pub struct Aws {
    sdk: SdkConfig,
    sqs: aws_sdk_sqs::Client,
    sns: aws_sdk_sns::Client,
}

impl Aws {
    pub async fn connect() -> Aws {
        let sdk = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(ENDPOINT)
            .load()
            .await;
        Aws {
            sqs: aws_sdk_sqs::Client::new(&sdk),
            sns: aws_sdk_sns::Client::new(&sdk),
            sdk,
        }
    }

    pub async fn create_queue(&self, name: &str) -> Result<String> {
        let out = self
            .sqs
            .create_queue()
            .queue_name(name)
            .send()
            .await
            .map_err(sdk("SQS CreateQueue"))?;
        out.queue_url()
            .map(str::to_string)
            .context("SQS CreateQueue returned no queue URL")
    }

    pub async fn queue_url(&self, name: &str) -> Result<String> {
        let out = self
            .sqs
            .get_queue_url()
            .queue_name(name)
            .send()
            .await
            .map_err(sdk("SQS GetQueueUrl"))?;
        out.queue_url()
            .map(str::to_string)
            .context("SQS GetQueueUrl returned no queue URL")
    }

    async fn queue_attribute(&self, url: &str, name: QueueAttributeName) -> Result<String> {
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(name.clone())
            .send()
            .await
            .map_err(sdk("SQS GetQueueAttributes"))?;
        out.attributes()
            .and_then(|attributes| attributes.get(&name))
            .cloned()
            .with_context(|| format!("SQS GetQueueAttributes returned no {name}"))
    }

    /// Creates (or finds) the topic and returns its ARN.
    pub async fn topic_arn(&self, name: &str) -> Result<String> {
        let out = self
            .sns
            .create_topic()
            .name(name)
            .send()
            .await
            .map_err(sdk("SNS CreateTopic"))?;
        out.topic_arn()
            .map(str::to_string)
            .context("SNS CreateTopic returned no ARN")
    }

    /// Creates the topic and the queue, lets the topic deliver to the queue and subscribes
    /// it with raw delivery; returns the topic ARN and the queue URL.
    pub async fn sns_topology(&self, topic: &str, queue: &str) -> Result<(String, String)> {
        let topic_arn = self.topic_arn(topic).await?;
        let queue_url = self.create_queue(queue).await?;
        let queue_arn = self
            .queue_attribute(&queue_url, QueueAttributeName::QueueArn)
            .await?;
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Principal": { "Service": "sns.amazonaws.com" },
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": { "ArnEquals": { "aws:SourceArn": topic_arn } },
            }],
        });
        self.sqs
            .set_queue_attributes()
            .queue_url(&queue_url)
            .attributes(QueueAttributeName::Policy, policy.to_string())
            .send()
            .await
            .map_err(sdk("SQS SetQueueAttributes"))?;
        self.sns
            .subscribe()
            .topic_arn(&topic_arn)
            .protocol("sqs")
            .endpoint(&queue_arn)
            .attributes("RawMessageDelivery", "true")
            .send()
            .await
            .map_err(sdk("SNS Subscribe"))?;
        Ok((topic_arn, queue_url))
    }

    /// Waits until the queue holds at least `n` visible messages (SNS delivers asynchronously).
    async fn wait_for_depth(&self, url: &str, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120 + n as u64 / 500);
        loop {
            let depth: usize = self
                .queue_attribute(url, QueueAttributeName::ApproximateNumberOfMessages)
                .await?
                .parse()
                .unwrap_or(0);
            if depth >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the subscribed queue holds {depth} of the {n} messages published to the topic"
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn sqs_sinks(&self, url: &str, batch: bool, envelope: bool) -> Vec<SqsSink> {
        let url: Arc<str> = url.into();
        (0..PUBLISH_TASKS)
            .map(|_| SqsSink {
                client: self.sqs.clone(),
                url: url.clone(),
                batch,
                envelope,
            })
            .collect()
    }

    fn sns_sinks(&self, topic_arn: &str, batch: bool) -> Vec<SnsSink> {
        let topic_arn: Arc<str> = topic_arn.into();
        (0..PUBLISH_TASKS)
            .map(|_| SnsSink {
                client: self.sns.clone(),
                topic_arn: topic_arn.clone(),
                batch,
            })
            .collect()
    }

    fn sqs_sources(&self, url: &str) -> Vec<SqsSource> {
        let url: Arc<str> = url.into();
        (0..CONSUME_TASKS)
            .map(|_| SqsSource {
                client: self.sqs.clone(),
                url: url.clone(),
            })
            .collect()
    }

    async fn omniqueue(&self, url: &str) -> Result<(SqsProducer, SqsConsumer)> {
        SqsBackend::builder(url)
            .sqs_config(aws_sdk_sqs::Config::from(&self.sdk))
            .build_pair()
            .await
            .map_err(|e| anyhow!("omniqueue SqsBackend: {e}"))
    }
}

/// The parent's untimed set-up: entities that must exist before the scenario's process
/// starts, and the backlog of consume scenarios (raw batch sends).
pub async fn prepare(job: &Job) -> Result<()> {
    let aws = Aws::connect().await;
    if job.transport == Transport::Sns {
        let (topic_arn, queue_url) = aws.sns_topology(&job.entity, job.receive_queue()).await?;
        if is_consume(job.scenario) {
            harness::publish(aws.sns_sinks(&topic_arn, true), job.messages, BATCH).await?;
            aws.wait_for_depth(&queue_url, job.messages).await?;
        }
        return Ok(());
    }
    let queue_url = match job.scenario {
        "raw-consume" | "omniqueue-consume" => aws.create_queue(&job.entity).await?,
        "cloudbus-consume" | "cloudbus-drain-100k" => {
            // cloudbus makes its queue (with a dead-letter queue) the way it always does.
            let subscriber = cloudbus::connect_subscriber(cloud::url(job, true)).await?;
            subscriber.close().await?;
            aws.queue_url(&job.entity).await?
        }
        _ => return Ok(()),
    };
    harness::publish(aws.sqs_sinks(&queue_url, true, false), job.messages, BATCH).await?;
    Ok(())
}

/// The parent's untimed clean-up after a scenario: deletes the queues and the topic it
/// made (their names start with the job's entity), so LocalStack does not keep every
/// round's messages in memory and slow down the scenarios after it.
pub async fn clean_up(job: &Job) -> Result<()> {
    let aws = Aws::connect().await;
    let queues = aws
        .sqs
        .list_queues()
        .queue_name_prefix(&job.entity)
        .send()
        .await
        .map_err(sdk("SQS ListQueues"))?;
    for url in queues.queue_urls() {
        aws.sqs
            .delete_queue()
            .queue_url(url)
            .send()
            .await
            .map_err(sdk("SQS DeleteQueue"))?;
    }
    if job.transport == Transport::Sns {
        let topic_arn = aws.topic_arn(&job.entity).await?;
        aws.sns
            .delete_topic()
            .topic_arn(topic_arn)
            .send()
            .await
            .map_err(sdk("SNS DeleteTopic"))?;
    }
    Ok(())
}

/// The raw-SDK and omniqueue scenarios of SQS and SNS.
pub async fn run(job: &Job) -> Result<Report> {
    let aws = Aws::connect().await;
    let n = job.messages;
    let elapsed = match (job.transport, job.scenario) {
        (
            Transport::Sqs,
            "raw-single" | "raw-batch" | "raw-batch-envelope" | "raw-batch-envelope-serial",
        ) => {
            let batch = job.scenario != "raw-single";
            let envelope = job.scenario.starts_with("raw-batch-envelope");
            let url = aws.create_queue(&job.entity).await?;
            let mut sinks = aws.sqs_sinks(&url, batch, envelope);
            if job.scenario == "raw-batch-envelope-serial" {
                sinks.truncate(1);
            }
            harness::publish(sinks, n, if batch { BATCH } else { 1 }).await?
        }
        (Transport::Sns, "raw-single" | "raw-batch") => {
            let batch = job.scenario == "raw-batch";
            let topic_arn = aws.topic_arn(&job.entity).await?;
            harness::publish(
                aws.sns_sinks(&topic_arn, batch),
                n,
                if batch { BATCH } else { 1 },
            )
            .await?
        }
        (_, "raw-consume") => {
            let url = aws.queue_url(job.receive_queue()).await?;
            harness::consume(aws.sqs_sources(&url), n).await?
        }
        (Transport::Sqs, "omniqueue") => {
            let url = aws.create_queue(&job.entity).await?;
            let producer = Arc::new(aws.omniqueue(&url).await?.0);
            let sinks = (0..PUBLISH_TASKS)
                .map(|_| OmniSink(producer.clone()))
                .collect();
            harness::publish::<OmniSink>(sinks, n, 1).await?
        }
        (Transport::Sqs, "omniqueue-consume") => {
            let url = aws.queue_url(&job.entity).await?;
            let consumer = Arc::new(aws.omniqueue(&url).await?.1);
            let sources = (0..CONSUME_TASKS)
                .map(|_| OmniSource(consumer.clone()))
                .collect();
            harness::consume::<OmniSource>(sources, n).await?
        }
        (Transport::Sqs, "latency") => return latency(&aws, job).await,
        (transport, scenario) => bail!("no raw scenario `{scenario}` on {}", transport.name()),
    };
    Ok(Report::timed(n, elapsed))
}

/// Sequential calls alternating raw SendMessage and cloudbus `publish()` without batching.
async fn latency(aws: &Aws, job: &Job) -> Result<Report> {
    let raw_url = aws.create_queue(&format!("{}-raw", job.entity)).await?;
    let url = format!("sqs://{}-cb?{}&create=true", job.entity, cloud::AWS_QUERY);
    let (publisher, note) = match cloudbus::connect_publisher(format!("{url}&batching=false")).await
    {
        Ok(publisher) => (publisher, None),
        Err(cloudbus::Error::Config { message, .. }) if message.contains("batching") => (
            cloudbus::connect_publisher(url).await?,
            Some(
                "`batching=false` not accepted yet: cloudbus measured with its defaults"
                    .to_string(),
            ),
        ),
        Err(e) => return Err(e.into()),
    };
    let report = harness::Latency::measure(
        async || {
            aws.sqs
                .send_message()
                .queue_url(&raw_url)
                .message_body(BODY)
                .send()
                .await
                .map(|_| ())
                .map_err(sdk("SQS SendMessage"))
        },
        async || {
            publisher
                .publish(Message::new(BODY))
                .await
                .map(|_| ())
                .context("cloudbus publish")
        },
    )
    .await?;
    publisher.close().await?;
    Ok(report.with_note(note))
}

/// SendMessage, or SendMessageBatch of up to 10.
struct SqsSink {
    client: aws_sdk_sqs::Client,
    url: Arc<str>,
    batch: bool,
    /// Each message carries a string attribute of the size of cloudbus's envelope
    /// (`cloudbus` = `{"id":"<uuid>"}`), so the broker does the same work per message.
    envelope: bool,
}

/// What cloudbus puts in its one SQS attribute for a message with only an id.
const ENVELOPE: &str = r#"{"id":"019ac0b5-3c1d-7c3e-9a47-7e1f0c2b8d11"}"#;

impl Sink for SqsSink {
    async fn send(&mut self, n: usize) -> Result<()> {
        if !self.batch {
            for _ in 0..n {
                self.client
                    .send_message()
                    .queue_url(&*self.url)
                    .message_body(BODY)
                    .send()
                    .await
                    .map_err(sdk("SQS SendMessage"))?;
            }
            return Ok(());
        }
        let entries = (0..n)
            .map(|i| {
                let entry = SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(BODY);
                let entry = if self.envelope {
                    let envelope = MessageAttributeValue::builder()
                        .data_type("String")
                        .string_value(ENVELOPE)
                        .build()?;
                    entry.message_attributes("cloudbus", envelope)
                } else {
                    entry
                };
                Ok::<_, anyhow::Error>(entry.build()?)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out = self
            .client
            .send_message_batch()
            .queue_url(&*self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(sdk("SQS SendMessageBatch"))?;
        if let Some(failed) = out.failed().first() {
            bail!(
                "SQS SendMessageBatch: {} of {n} failed, e.g. {}: {}",
                out.failed().len(),
                failed.code(),
                failed.message().unwrap_or_default()
            );
        }
        Ok(())
    }
}

/// Publish, or PublishBatch of up to 10.
struct SnsSink {
    client: aws_sdk_sns::Client,
    topic_arn: Arc<str>,
    batch: bool,
}

impl Sink for SnsSink {
    async fn send(&mut self, n: usize) -> Result<()> {
        if !self.batch {
            for _ in 0..n {
                self.client
                    .publish()
                    .topic_arn(&*self.topic_arn)
                    .message(BODY)
                    .send()
                    .await
                    .map_err(sdk("SNS Publish"))?;
            }
            return Ok(());
        }
        let entries = (0..n)
            .map(|i| {
                PublishBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message(BODY)
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out = self
            .client
            .publish_batch()
            .topic_arn(&*self.topic_arn)
            .set_publish_batch_request_entries(Some(entries))
            .send()
            .await
            .map_err(sdk("SNS PublishBatch"))?;
        if let Some(failed) = out.failed().first() {
            bail!(
                "SNS PublishBatch: {} of {n} failed, e.g. {}: {}",
                out.failed().len(),
                failed.code(),
                failed.message().unwrap_or_default()
            );
        }
        Ok(())
    }
}

/// ReceiveMessage (up to 10, long poll 1 s), then one DeleteMessageBatch of what came.
struct SqsSource {
    client: aws_sdk_sqs::Client,
    url: Arc<str>,
}

impl Source for SqsSource {
    async fn take(&mut self) -> Result<usize> {
        let out = self
            .client
            .receive_message()
            .queue_url(&*self.url)
            .max_number_of_messages(BATCH as i32)
            .wait_time_seconds(RECEIVE_WAIT.as_secs() as i32)
            .send()
            .await
            .map_err(sdk("SQS ReceiveMessage"))?;
        let messages = out.messages();
        if messages.is_empty() {
            return Ok(0);
        }
        let entries = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .set_receipt_handle(m.receipt_handle().map(str::to_string))
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out = self
            .client
            .delete_message_batch()
            .queue_url(&*self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(sdk("SQS DeleteMessageBatch"))?;
        if let Some(failed) = out.failed().first() {
            bail!(
                "SQS DeleteMessageBatch: {} failed, e.g. {}",
                out.failed().len(),
                failed.code()
            );
        }
        Ok(messages.len())
    }
}

/// omniqueue `send_raw`: one SendMessage per call.
struct OmniSink(Arc<SqsProducer>);

impl Sink for OmniSink {
    async fn send(&mut self, n: usize) -> Result<()> {
        for _ in 0..n {
            self.0
                .send_raw(BODY)
                .await
                .map_err(|e| anyhow!("omniqueue send_raw: {e}"))?;
        }
        Ok(())
    }
}

/// omniqueue `receive_all` (up to 10, 1 s), then `ack` of each (one DeleteMessage each).
struct OmniSource(Arc<SqsConsumer>);

impl Source for OmniSource {
    async fn take(&mut self) -> Result<usize> {
        let deliveries = self
            .0
            .receive_all(BATCH, RECEIVE_WAIT)
            .await
            .map_err(|e| anyhow!("omniqueue receive_all: {e}"))?;
        let n = deliveries.len();
        for delivery in deliveries {
            delivery
                .ack()
                .await
                .map_err(|(e, _)| anyhow!("omniqueue ack: {e}"))?;
        }
        Ok(n)
    }
}
