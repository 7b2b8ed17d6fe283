//! The harnesses of SQS and SNS, against LocalStack (or any endpoint given by
//! `CLOUDBUS_TEST_AWS_ENDPOINT`, default `http://127.0.0.1:4566`). Credentials and region
//! come from the standard AWS chain: `scripts/test` exports LocalStack's.

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_aws::{
    SnsConfig, SnsPublisher, SnsSubscriber, SqsConfig, SqsPublisher, SqsSubscriber,
    sqs_dead_letter_name,
};
use cloudbus_core::config::Start;
use cloudbus_core::driver::TransportConfig;
use cloudbus_core::{Result, message};
use cloudbus_testkit::{Entity, Features, Harness, Spec, Support};

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
    let mut config = SqsConfig::new(queue);
    config.endpoint = Some(endpoint());
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
    let mut config = SnsConfig::new(topic);
    config.subscription = subscription.map(str::to_string);
    config.endpoint = Some(endpoint());
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
