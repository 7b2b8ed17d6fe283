//! The harness of RabbitMQ, against the broker of `rabbitmq/start` (`RABBITMQ_URL`): a
//! quorum queue per case, or an exchange with two subscriptions for fan-out.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::config::{Secret, Start};
use cloudbus_core::driver::TransportConfig;
use cloudbus_core::{Result, message};
use cloudbus_rabbitmq::{RabbitMqConfig, create_subscription};
use cloudbus_testkit::{Entity, FaultHarness, Features, Harness, Spec, Support};

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

/// The test broker's URI (`RABBITMQ_URL`), split around its `host:port`.
fn broker_uri() -> Result<(String, SocketAddr, String)> {
    let uri = std::env::var(cloudbus_rabbitmq::URI_ENV)
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let bad = || {
        cloudbus_core::Error::config(
            "RABBITMQ_URL: the fault suite needs amqp://<user>:<password>@<ip>:<port>/<vhost>",
        )
    };
    let at = uri.rfind('@').ok_or_else(bad)? + 1;
    let end = uri[at..].find('/').map_or(uri.len(), |i| at + i);
    let addr = uri[at..end].parse().map_err(|_| bad())?;
    Ok((uri[..at].to_string(), addr, uri[end..].to_string()))
}

/// The fault suite on a quorum queue, through the fault proxy in front of the test broker.
#[async_trait]
impl FaultHarness for RabbitMqHarness {
    fn transport(&self) -> &'static str {
        "rabbitmq"
    }

    async fn broker(&self, _proxy_port: u16) -> Result<SocketAddr> {
        broker_uri().map(|(_, addr, _)| addr)
    }

    async fn create_at(&self, spec: &Spec, name: &str, addr: SocketAddr) -> Result<Entity> {
        let entity = self.entity_at(spec, name, addr)?;
        entity.subscriber(0).await?.close().await?;
        Ok(entity)
    }

    fn entity_at(&self, spec: &Spec, name: &str, addr: SocketAddr) -> Result<Entity> {
        let (before, _, after) = broker_uri()?;
        let mut queue = config(name);
        queue.uri = Some(Secret::new(format!("{before}{addr}{after}")));
        queue.create = true;
        queue.visibility = spec.visibility;
        queue.max_deliveries = spec.max_deliveries;
        queue.publish_timeout = self.publish_timeout();
        let dead_letters = queue.dead_letter_queue()?;
        Ok(Entity::new(queue.clone()).with_subscriber(queue, dead_letters))
    }

    fn outage(&self) -> Duration {
        Duration::from_secs(12)
    }

    fn publish_timeout(&self) -> Duration {
        Duration::from_secs(5)
    }
}
