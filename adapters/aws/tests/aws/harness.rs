//! The harnesses of SQS and SNS, against LocalStack (or any endpoint given by
//! `CLOUDBUS_TEST_AWS_ENDPOINT`, default `http://127.0.0.1:4566`). Credentials and region
//! come from the standard AWS chain: `scripts/test` exports LocalStack's.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use cloudbus_aws::{
    SnsConfig, SnsPublisher, SnsSubscriber, SqsConfig, SqsPublisher, SqsSubscriber,
    sqs_dead_letter_name,
};
use cloudbus_core::config::Start;
use cloudbus_core::driver::TransportConfig;
use cloudbus_core::{Result, message};
use cloudbus_testkit::{Entity, FaultHarness, Features, Harness, Spec, Support};

/// The endpoint the AWS harnesses use.
pub fn endpoint() -> String {
    std::env::var("CLOUDBUS_TEST_AWS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4566".into())
}

fn unique(prefix: &str) -> String {
    // SQS names: at most 80 characters; the dead-letter queue adds "-dlq".
    format!("{prefix}-{}", message::new_id())
}

/// A queue on the test endpoint; with a `spec`, created to it on connect.
fn queue_config(queue: &str, spec: Option<&Spec>) -> SqsConfig {
    queue_config_at(queue, spec, endpoint())
}

/// A queue reached through `endpoint`; with a `spec`, created to it on connect.
fn queue_config_at(queue: &str, spec: Option<&Spec>, endpoint: String) -> SqsConfig {
    let mut config = SqsConfig::new(queue);
    config.endpoint = Some(endpoint);
    if let Some(spec) = spec {
        config.create = true;
        config.visibility = Some(spec.visibility);
        config.max_receive_count = spec.max_deliveries;
    }
    config
}

/// SQS queues, standard or FIFO.
#[derive(Debug, Clone)]
pub struct SqsHarness {
    fifo: bool,
}

impl SqsHarness {
    /// Standard queues.
    pub fn standard() -> Self {
        SqsHarness { fifo: false }
    }

    /// FIFO queues (`.fifo`).
    pub fn fifo() -> Self {
        SqsHarness { fifo: true }
    }
}

#[async_trait]
impl Harness for SqsHarness {
    fn features(&self) -> Features {
        Features {
            fan_out: Support::No(
                "an SQS queue has no subscriptions; fan-out is sns:// (tested there)",
            ),
            ordering: if self.fifo {
                Support::Yes
            } else {
                Support::No("standard SQS queues do not order messages; use a .fifo queue")
            },
            delayed_delivery: if self.fifo {
                Support::No("SQS FIFO queues have no per-message delay")
            } else {
                Support::Yes
            },
            replay: Support::No("an SQS queue keeps no log of delivered messages"),
            max_message_size: SqsPublisher::MAX_MESSAGE_SIZE,
            unit: Duration::from_secs(1),
            ..Features::default()
        }
    }

    async fn create(&self, spec: &Spec) -> Result<Entity> {
        let name = if self.fifo {
            format!("{}.fifo", unique("cb"))
        } else {
            unique("cb")
        };
        // Connecting a subscriber with create=true makes the queue and its dead-letter queue.
        let mut created = queue_config(&name, Some(spec));
        if spec.replay {
            created = created.with_start(Start::Earliest)?;
        }
        SqsSubscriber::connect(&created).await?;
        Ok(Entity::new(queue_config(&name, None))
            .with_subscriber(created, queue_config(&sqs_dead_letter_name(&name), None)))
    }

    async fn missing(&self) -> Result<Entity> {
        let missing = queue_config(&unique("missing"), None);
        Ok(Entity::new(missing.clone()).with_subscriber(missing.clone(), missing))
    }
}

/// An SNS topic with two subscribed SQS queues.
#[derive(Debug, Clone, Default)]
pub struct SnsHarness;

/// A topic on the test endpoint, received through `subscription`; with a `spec`,
/// created to it on connect.
fn topic_config(topic: &str, subscription: Option<&str>, spec: Option<&Spec>) -> SnsConfig {
    topic_config_at(topic, subscription, spec, endpoint())
}

/// A topic reached through `endpoint`, received through `subscription`; with a `spec`,
/// created to it on connect.
fn topic_config_at(
    topic: &str,
    subscription: Option<&str>,
    spec: Option<&Spec>,
    endpoint: String,
) -> SnsConfig {
    let mut config = SnsConfig::new(topic);
    config.subscription = subscription.map(str::to_string);
    config.endpoint = Some(endpoint);
    if let Some(spec) = spec {
        config.create = true;
        config.visibility = Some(spec.visibility);
        config.max_receive_count = spec.max_deliveries;
    }
    config
}

#[async_trait]
impl Harness for SnsHarness {
    fn features(&self) -> Features {
        Features {
            fan_out: Support::Yes,
            ordering: Support::No(
                "standard SNS topics do not order messages; FIFO needs a .fifo topic and queues",
            ),
            delayed_delivery: Support::No("SNS has no per-message delivery delay"),
            replay: Support::No("SNS keeps no log; its subscriptions are SQS queues"),
            max_message_size: SnsPublisher::MAX_MESSAGE_SIZE,
            unit: Duration::from_secs(1),
            ..Features::default()
        }
    }

    async fn create(&self, spec: &Spec) -> Result<Entity> {
        let topic = unique("cb");
        let queues = [format!("{topic}-a"), format!("{topic}-b")];
        let mut entity = Entity::new(topic_config(&topic, None, None));
        for queue in &queues {
            let mut created = topic_config(&topic, Some(queue), Some(spec));
            if spec.replay {
                created = created.with_start(Start::Earliest)?;
            }
            SnsSubscriber::connect(&created).await?;
            entity =
                entity.with_subscriber(created, queue_config(&sqs_dead_letter_name(queue), None));
        }
        Ok(entity)
    }

    async fn missing(&self) -> Result<Entity> {
        let topic = unique("missing");
        Ok(
            Entity::new(topic_config(&topic, None, None)).with_subscriber(
                topic_config(&topic, Some(&topic), None),
                queue_config(&topic, None),
            ),
        )
    }
}

/// Where LocalStack listens, from [`endpoint`]: the fault proxy goes in front of it.
fn broker() -> Result<SocketAddr> {
    let endpoint = endpoint();
    let authority = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .replace("localhost", "127.0.0.1");
    authority.parse().map_err(|e| {
        cloudbus_core::Error::config(format!(
            "CLOUDBUS_TEST_AWS_ENDPOINT={endpoint}: the fault suite needs http://<ip>:<port> ({e})"
        ))
    })
}

/// The SDK's operation timeout, as the adapter configures its clients: what bounds a
/// publish to an endpoint that does not answer (attempts time out after 10 s).
const AWS_OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// An outage longer than the SDK's attempt timeout (10 s).
const AWS_OUTAGE: Duration = Duration::from_secs(12);

/// The fault suite on SQS: LocalStack through the fault proxy.
#[async_trait]
impl FaultHarness for SqsHarness {
    fn transport(&self) -> &'static str {
        if self.fifo { "sqs fifo" } else { "sqs" }
    }

    async fn broker(&self, _proxy_port: u16) -> Result<SocketAddr> {
        broker()
    }

    async fn create_at(&self, spec: &Spec, name: &str, addr: SocketAddr) -> Result<Entity> {
        let entity = self.entity_at(spec, name, addr)?;
        entity.subscriber(0).await?.close().await?;
        Ok(entity)
    }

    fn entity_at(&self, spec: &Spec, name: &str, addr: SocketAddr) -> Result<Entity> {
        let name = if self.fifo {
            format!("{name}.fifo")
        } else {
            name.to_string()
        };
        let at = || format!("http://{addr}");
        Ok(
            Entity::new(queue_config_at(&name, None, at())).with_subscriber(
                queue_config_at(&name, Some(spec), at()),
                queue_config_at(&sqs_dead_letter_name(&name), None, at()),
            ),
        )
    }

    fn outage(&self) -> Duration {
        AWS_OUTAGE
    }

    fn publish_timeout(&self) -> Duration {
        AWS_OPERATION_TIMEOUT
    }
}

/// The fault suite on SNS: a topic with one subscribed queue, LocalStack through the
/// fault proxy (its delivery from the topic to the queue stays inside LocalStack).
#[async_trait]
impl FaultHarness for SnsHarness {
    fn transport(&self) -> &'static str {
        "sns"
    }

    async fn broker(&self, _proxy_port: u16) -> Result<SocketAddr> {
        broker()
    }

    async fn create_at(&self, spec: &Spec, name: &str, addr: SocketAddr) -> Result<Entity> {
        let entity = self.entity_at(spec, name, addr)?;
        entity.subscriber(0).await?.close().await?;
        Ok(entity)
    }

    fn entity_at(&self, spec: &Spec, name: &str, addr: SocketAddr) -> Result<Entity> {
        let queue = format!("{name}-a");
        let at = || format!("http://{addr}");
        Ok(
            Entity::new(topic_config_at(name, None, None, at())).with_subscriber(
                topic_config_at(name, Some(&queue), Some(spec), at()),
                queue_config_at(&sqs_dead_letter_name(&queue), None, at()),
            ),
        )
    }

    fn outage(&self) -> Duration {
        AWS_OUTAGE
    }

    fn publish_timeout(&self) -> Duration {
        AWS_OPERATION_TIMEOUT
    }
}
