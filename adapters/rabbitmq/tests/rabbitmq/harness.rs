//! The harness of RabbitMQ, against the broker of `rabbitmq/start` (`RABBITMQ_URL`): a
//! quorum queue per case, or an exchange with two subscriptions for fan-out.

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::config::Start;
use cloudbus_core::driver::TransportConfig;
use cloudbus_core::{Result, message};
use cloudbus_rabbitmq::{RabbitMqConfig, create_subscription};
use cloudbus_testkit::{Entity, Features, Harness, Spec, Support};

/// A task queue, or an exchange with two subscriptions (fan-out).
#[derive(Debug, Clone)]
pub struct RabbitMqHarness {
    subscriptions: usize,
}

impl RabbitMqHarness {
    /// A task queue: publish to it, receive from it.
    pub fn queue() -> Self {
        RabbitMqHarness { subscriptions: 0 }
    }

    /// An exchange with two subscriptions, each of which gets every message.
    pub fn fan_out() -> Self {
        RabbitMqHarness { subscriptions: 2 }
    }
}

/// A config for the test broker (`RABBITMQ_URL`).
pub fn config(name: &str) -> RabbitMqConfig {
    cloudbus_testkit::log_to_stderr();
    RabbitMqConfig::new(name)
}

#[async_trait]
impl Harness for RabbitMqHarness {
    fn features(&self) -> Features {
        Features {
            fan_out: if self.subscriptions > 1 {
                Support::Yes
            } else {
                Support::No("a task queue; the fan-out harness has an exchange")
            },
            ordering: Support::No(
                "competing consumers of a queue take messages of one key at once",
            ),
            replay: Support::No("queues keep no log of delivered messages"),
            max_message_size: RabbitMqConfig::default().max_message_size,
            unit: Duration::from_secs(1),
            spurious_redeliveries: false,
            close_may_raise_counts: true,
            ..Features::default()
        }
    }

    async fn create(&self, spec: &Spec) -> Result<Entity> {
        let name = format!("cb-{}", message::new_id());
        let mut base = config(&name);
        base.create = true;
        base.visibility = spec.visibility;
        base.max_deliveries = spec.max_deliveries;
        let subscriptions: Vec<RabbitMqConfig> = if self.subscriptions == 0 {
            vec![base.clone()]
        } else {
            (1..=self.subscriptions)
                .map(|s| base.with_subscription(&format!("{name}-s{s}")))
                .collect::<Result<_>>()?
        };
        let mut entity = Entity::new(base.clone());
        for subscription in subscriptions {
            if spec.replay {
                subscription.with_start(Start::Earliest)?;
            }
            // The subscription exists from now on, as it would after a deployment.
            create_subscription(&subscription).await?;
            let dead_letters = subscription.dead_letter_queue()?;
            entity = entity.with_subscriber(subscription, dead_letters);
        }
        Ok(entity)
    }

    async fn missing(&self) -> Result<Entity> {
        let name = format!("missing-{}", message::new_id());
        let queue = config(&name);
        Ok(Entity::new(queue.clone()).with_subscriber(queue.clone(), queue.dead_letter_queue()?))
    }
}
