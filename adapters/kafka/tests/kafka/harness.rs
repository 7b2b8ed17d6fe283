//! The harness of Kafka, against the broker of `kafka/start` (or `KAFKA_BROKERS`): a topic
//! of four partitions per case with one subscription (consumer group), or two for fan-out.

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::config::Start;
use cloudbus_core::driver::TransportConfig;
use cloudbus_core::{Result, message};
use cloudbus_kafka::{KafkaConfig, create_subscription};
use cloudbus_testkit::{Entity, Features, Harness, Spec, Support};

/// A topic with one group, or with two groups (fan-out).
#[derive(Debug, Clone)]
pub struct KafkaHarness {
    groups: usize,
}

impl KafkaHarness {
    /// One subscription per topic.
    pub fn topic() -> Self {
        KafkaHarness { groups: 1 }
    }

    /// Two subscriptions per topic, each of which gets every message.
    pub fn fan_out() -> Self {
        KafkaHarness { groups: 2 }
    }
}

/// The brokers of the tests: `KAFKA_BROKERS`, else the default.
pub fn brokers() -> String {
    std::env::var(cloudbus_kafka::BROKERS_ENV)
        .unwrap_or_else(|_| cloudbus_kafka::DEFAULT_BROKERS.to_string())
}

/// A config for the test broker; `session_timeout` short, as tansu's first assignment of a
/// group takes about half of it.
pub fn config(topic: &str) -> KafkaConfig {
    cloudbus_testkit::log_to_stderr();
    let mut config = KafkaConfig::new(topic);
    config.session_timeout = Duration::from_secs(6);
    config
}

#[async_trait]
impl Harness for KafkaHarness {
    fn features(&self) -> Features {
        Features {
            fan_out: if self.groups > 1 {
                Support::Yes
            } else {
                Support::No("one subscription per topic here; the fan-out harness has two")
            },
            delayed_delivery: Support::No("a Kafka record is readable as soon as it is written"),
            competing_subscribers: Support::No(
                "a consumer group shares partitions among its members, not messages",
            ),
            max_message_size: KafkaConfig::default().max_message_size,
            unit: Duration::from_secs(1),
            ..Features::default()
        }
    }

    async fn create(&self, spec: &Spec) -> Result<Entity> {
        let topic = format!("cb-{}", message::new_id());
        let mut base = config(&topic);
        base.create = true;
        base.visibility = spec.visibility;
        base.max_deliveries = spec.max_deliveries;
        let mut entity = Entity::new(base.clone());
        for g in 1..=self.groups {
            let mut group = base.with_subscription(&format!("{topic}-g{g}"))?;
            if spec.replay {
                // Created when the case first opens it, after it has published.
                group = group.with_start(Start::Earliest)?;
            } else {
                // The subscription exists from now on, as it would after a deployment.
                create_subscription(&group).await?;
            }
            let dead_letters = group.dead_letter_queue()?;
            entity = entity.with_subscriber(group, dead_letters);
        }
        Ok(entity)
    }

    async fn missing(&self) -> Result<Entity> {
        let topic = format!("missing-{}", message::new_id());
        let group = config(&topic).with_subscription("g")?;
        Ok(Entity::new(config(&topic)).with_subscriber(group.clone(), group.dead_letter_queue()?))
    }
}
