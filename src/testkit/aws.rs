//! Harnesses for SQS and SNS, against LocalStack (or any endpoint given by
//! `CLOUDBUS_TEST_AWS_ENDPOINT`, default `http://127.0.0.1:4566`). Credentials and region
//! come from the standard AWS chain: `scripts/test` exports LocalStack's.

use std::time::Duration;

use async_trait::async_trait;

use super::{Entity, Features, Harness, Spec, Support};
use crate::adapters::aws::{sns, sqs};
use crate::config::{Config, SnsConfig, SqsConfig, sqs_dead_letter_name};
use crate::{Result, message};

/// The endpoint the AWS harnesses use.
pub fn endpoint() -> String {
    std::env::var("CLOUDBUS_TEST_AWS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4566".into())
}

fn unique(prefix: &str) -> String {
    // SQS names: at most 80 characters; the dead-letter queue adds "-dlq".
    format!("{prefix}-{}", message::new_id())
}

fn queue_config(queue: &str, spec: Option<&Spec>) -> SqsConfig {
    SqsConfig {
        queue: queue.to_string(),
        region: None,
        endpoint: Some(endpoint()),
        create: spec.is_some(),
        wait: Duration::from_secs(20),
        visibility: spec.map(|s| s.visibility),
        max_receive_count: spec.map_or(10, |s| s.max_deliveries),
        batching: true,
        linger: Duration::from_millis(5),
        batch_size: 10,
    }
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
            time_to_live: Support::Yes,
            max_message_size: sqs::MAX_MESSAGE_SIZE,
            unit: Duration::from_secs(1),
        }
    }

    async fn create(&self, spec: &Spec) -> Result<Entity> {
        let name = if self.fifo {
            format!("{}.fifo", unique("cb"))
        } else {
            unique("cb")
        };
        // Connecting a subscriber with create=true makes the queue and its dead-letter queue.
        let created = Config::Sqs(queue_config(&name, Some(spec)));
        crate::connect_subscriber(&created).await?;
        let plain = Config::Sqs(queue_config(&name, None));
        Ok(Entity {
            publisher: plain.clone(),
            subscribers: vec![created],
            dead_letters: vec![Config::Sqs(queue_config(
                &sqs_dead_letter_name(&name),
                None,
            ))],
        })
    }

    async fn missing(&self) -> Result<Entity> {
        let missing = Config::Sqs(queue_config(&unique("missing"), None));
        Ok(Entity {
            publisher: missing.clone(),
            subscribers: vec![missing.clone()],
            dead_letters: vec![missing],
        })
    }
}

/// An SNS topic with two subscribed SQS queues.
#[derive(Debug, Clone, Default)]
pub struct SnsHarness;

fn topic_config(topic: &str, subscription: Option<&str>, spec: Option<&Spec>) -> SnsConfig {
    SnsConfig {
        topic: topic.to_string(),
        subscription: subscription.map(str::to_string),
        region: None,
        endpoint: Some(endpoint()),
        create: spec.is_some(),
        wait: Duration::from_secs(20),
        visibility: spec.map(|s| s.visibility),
        max_receive_count: spec.map_or(10, |s| s.max_deliveries),
        batching: true,
        linger: Duration::from_millis(5),
        batch_size: 10,
    }
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
            time_to_live: Support::Yes,
            max_message_size: sns::MAX_MESSAGE_SIZE,
            unit: Duration::from_secs(1),
        }
    }

    async fn create(&self, spec: &Spec) -> Result<Entity> {
        let topic = unique("cb");
        let queues = [format!("{topic}-a"), format!("{topic}-b")];
        let mut subscribers = Vec::new();
        let mut dead_letters = Vec::new();
        for queue in &queues {
            let created = Config::Sns(topic_config(&topic, Some(queue), Some(spec)));
            crate::connect_subscriber(&created).await?;
            subscribers.push(created);
            dead_letters.push(Config::Sqs(queue_config(
                &sqs_dead_letter_name(queue),
                None,
            )));
        }
        Ok(Entity {
            publisher: Config::Sns(topic_config(&topic, None, None)),
            subscribers,
            dead_letters,
        })
    }

    async fn missing(&self) -> Result<Entity> {
        let topic = unique("missing");
        Ok(Entity {
            publisher: Config::Sns(topic_config(&topic, None, None)),
            subscribers: vec![Config::Sns(topic_config(&topic, Some(&topic), None))],
            dead_letters: vec![Config::Sqs(queue_config(&topic, None))],
        })
    }
}
