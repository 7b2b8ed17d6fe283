//! [`RabbitMqConfig`]: `rabbitmq://<queue>` or `rabbitmq://<exchange>?subscription=<queue>`.

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::config::{ConfigUrl, Secret};
use cloudbus_core::driver::{Connect, TransportConfig};
use cloudbus_core::{Error, Inspector, Publisher, Result, Subscriber};
use serde::{Deserialize, Serialize};

use crate::{RabbitMqInspector, RabbitMqPublisher, RabbitMqSubscriber};

/// The environment variable read for the server's URI when the config has none.
pub const URI_ENV: &str = "RABBITMQ_URL";
/// The server when neither the config nor [`URI_ENV`] names one: a local broker with
/// RabbitMQ's default user.
pub const DEFAULT_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The suffix of a queue's dead-letter queue: `<queue>.dlq`.
pub const DEAD_LETTER_QUEUE_SUFFIX: &str = ".dlq";

/// Options of the RabbitMQ transport.
///
/// - `rabbitmq://<queue>`: a task queue. Publishing puts messages in it; its subscribers
///   compete for them.
/// - `rabbitmq://<exchange>?subscription=<queue>`: publish/subscribe. Publishing goes to
///   the exchange; each subscription is a queue bound to it, and each gets every message.
///
/// A publisher of `rabbitmq://<name>` sends to the exchange `<name>` if there is one, else
/// to the queue `<name>`. The server comes from [`uri`](Self::uri) or `RABBITMQ_URL`.
///
/// ```
/// use cloudbus_core::driver::TransportConfig;
/// use cloudbus_rabbitmq::RabbitMqConfig;
///
/// let config = RabbitMqConfig::from_url("rabbitmq://orders?subscription=billing&create=true")?;
/// assert_eq!(config.queue(), "billing");
/// # Ok::<(), cloudbus_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RabbitMqConfig {
    /// The queue, or with `subscription` the exchange.
    pub name: String,
    /// The queue bound to the exchange `name` that a subscriber reads.
    pub subscription: Option<String>,
    /// The server: `amqp://user:password@host:port/vhost` (`amqps://` for TLS, as Amazon MQ
    /// requires); by default `RABBITMQ_URL`, else `amqp://guest:guest@127.0.0.1:5672/%2f`.
    /// A secret (it holds the password): never in a cloudbus URL, a log or an error.
    #[serde(skip_serializing)]
    pub uri: Option<Secret>,
    /// Declare what is missing: the queue (a durable quorum queue), its dead-letter queue,
    /// and for a subscription the exchange (durable, `fanout`) and the binding.
    /// Default `false`.
    pub create: bool,
    /// Address the queue's dead-letter queue `<queue>.dlq` instead: what
    /// [`TransportConfig::dead_letter_queue`] gives.
    pub dead_letter: bool,
    /// How long a received message stays with its receiver before the subscriber releases
    /// it to the queue again (RabbitMQ has no lock that expires: see the README). Default
    /// 30 s.
    #[serde(with = "cloudbus_core::config::duration")]
    pub visibility: Duration,
    /// Deliveries after which a message is moved to the dead-letter queue. Default 10.
    pub max_deliveries: u32,
    /// Largest message in bytes (body and headers). Default 16 MiB (RabbitMQ 4's default
    /// `max_message_size`).
    pub max_message_size: usize,
    /// The smallest window of unacknowledged messages the broker may send this subscriber
    /// (`basic.qos`). Beyond it, the subscriber widens the window as receive calls ask for
    /// more than it holds, so with the default 0 a consumer gets messages only for its free
    /// handler slots and leaves the rest in the queue for others. Set it to the consumer's
    /// concurrency for throughput: the window is then one consumer from the start (each
    /// further consumer on a channel costs the broker work per message). Default 0.
    pub prefetch: u16,
    /// Most messages a subscriber holds unsettled (handed out, or sent ahead and waiting),
    /// whatever receive calls ask for. Default 10,000.
    pub max_held: usize,
    /// How long a publish may wait for a connection and the broker's confirm before it
    /// fails with a transient error. Default 30 s.
    #[serde(with = "cloudbus_core::config::duration")]
    pub publish_timeout: Duration,
}

impl Default for RabbitMqConfig {
    fn default() -> Self {
        RabbitMqConfig {
            name: String::new(),
            subscription: None,
            uri: None,
            create: false,
            dead_letter: false,
            visibility: Duration::from_secs(30),
            max_deliveries: 10,
            max_message_size: 16 * 1024 * 1024,
            prefetch: 0,
            max_held: 10_000,
            publish_timeout: Duration::from_secs(30),
        }
    }
}

impl RabbitMqConfig {
    /// The defaults, on the queue (or exchange) `name`.
    pub fn new(name: impl Into<String>) -> Self {
        RabbitMqConfig {
            name: name.into(),
            ..RabbitMqConfig::default()
        }
    }

    /// The queue a subscriber reads: the subscription, else `name`; with `dead_letter`
    /// that queue's dead-letter queue.
    pub fn queue(&self) -> String {
        let queue = self.subscription.as_deref().unwrap_or(&self.name);
        if self.dead_letter {
            dead_letter_queue(queue)
        } else {
            queue.to_string()
        }
    }

    /// The server's URI: the config's, else `RABBITMQ_URL`, else [`DEFAULT_URI`].
    pub(crate) fn server(&self) -> Secret {
        self.uri.clone().unwrap_or_else(|| {
            Secret::new(std::env::var(URI_ENV).unwrap_or_else(|_| DEFAULT_URI.to_string()))
        })
    }

    /// Checks the names before anything is sent.
    pub(crate) fn check(&self) -> Result<()> {
        check_name("name", &self.name)?;
        if let Some(subscription) = &self.subscription {
            check_name("subscription", subscription)?;
        }
        if self.max_deliveries == 0 {
            return Err(Error::config("rabbitmq: max_deliveries must be at least 1"));
        }
        if self.max_held == 0 {
            return Err(Error::config("rabbitmq: max_held must be at least 1"));
        }
        Ok(())
    }
}

/// The dead-letter queue of `queue`: `<queue>.dlq`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}{DEAD_LETTER_QUEUE_SUFFIX}")
}

/// Queue and exchange names: 1 to 255 bytes (leaving room for `.dlq`), and not the
/// broker's reserved `amq.` prefix.
fn check_name(field: &'static str, name: &str) -> Result<()> {
    let limit = 255 - DEAD_LETTER_QUEUE_SUFFIX.len();
    if name.is_empty() || name.len() > limit {
        return Err(Error::InvalidInput {
            transport: crate::TRANSPORT,
            field,
            rule: format!(
                "a queue or exchange name has 1 to {limit} bytes (255, less room for the \
                 `.dlq` of its dead-letter queue); `{name}` has {}",
                name.len()
            ),
        });
    }
    if name.starts_with("amq.") || name.starts_with("cloudbus.") {
        return Err(Error::InvalidInput {
            transport: crate::TRANSPORT,
            field,
            rule: format!(
                "`{name}`: names starting with `amq.` are the broker's, and with `cloudbus.` \
                 the delay queues'; choose another name"
            ),
        });
    }
    Ok(())
}

#[async_trait]
impl Connect for RabbitMqConfig {
    async fn connect_publisher(&self) -> Result<Box<dyn Publisher>> {
        Ok(Box::new(RabbitMqPublisher::connect(self).await?))
    }

    async fn connect_subscriber(&self) -> Result<Box<dyn Subscriber>> {
        Ok(Box::new(RabbitMqSubscriber::connect(self).await?))
    }

    async fn connect_inspector(&self) -> Result<Box<dyn Inspector>> {
        Ok(Box::new(RabbitMqInspector::connect(self).await?))
    }
}

impl TransportConfig for RabbitMqConfig {
    const SCHEME: &'static str = "rabbitmq";
    type DeadLetters = RabbitMqConfig;

    fn from_config_url(url: &ConfigUrl) -> Result<Self> {
        url.deserialize(&[("name", url.entity("queue or exchange")?)])
    }

    fn with_subscription(&self, subscription: &str) -> Result<Self> {
        Ok(RabbitMqConfig {
            subscription: Some(subscription.to_string()),
            ..self.clone()
        })
    }

    /// The queue's (or the subscription's) dead-letter queue `<queue>.dlq`.
    fn dead_letter_queue(&self) -> Result<Self> {
        if self.dead_letter {
            return Err(Error::config(format!(
                "rabbitmq://{} already addresses the dead-letter queue `{}`",
                self.name,
                self.queue()
            )));
        }
        Ok(RabbitMqConfig {
            dead_letter: true,
            ..self.clone()
        })
    }

    /// The queue itself, for a subscription too: a publish to the queue (through the
    /// default exchange) reaches this subscription only.
    fn redrive_target(&self) -> Result<Self> {
        Ok(RabbitMqConfig {
            name: self
                .subscription
                .clone()
                .unwrap_or_else(|| self.name.clone()),
            subscription: None,
            dead_letter: false,
            create: false,
            ..self.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_defaults() {
        let config = RabbitMqConfig::from_url("rabbitmq://orders").unwrap();
        assert_eq!(config, RabbitMqConfig::new("orders"));
        assert_eq!(config.queue(), "orders");
        let config = RabbitMqConfig::from_url(
            "rabbitmq://events?subscription=billing&create&prefetch=64&visibility=10s&max_deliveries=3",
        )
        .unwrap();
        assert_eq!(config.queue(), "billing");
        assert_eq!((config.create, config.prefetch), (true, 64));
        assert_eq!(config.visibility, Duration::from_secs(10));
        assert_eq!(config.dead_letter_queue().unwrap().queue(), "billing.dlq");
        assert!(RabbitMqConfig::from_url("rabbitmq://").is_err());
    }

    #[test]
    fn the_uri_is_a_secret_never_taken_from_a_url() {
        let text = RabbitMqConfig::from_url("rabbitmq://q?uri=amqp://u:hunter2@h/v")
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("secret") && !text.contains("hunter2"),
            "{text}"
        );
        let mut config = RabbitMqConfig::new("q");
        config.uri = Some(Secret::new("amqp://u:hunter2@h/v"));
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "amq.direct", "cloudbus.delay.3"] {
            let error = RabbitMqConfig::new(bad).check().unwrap_err();
            assert!(
                matches!(error, Error::InvalidInput { field: "name", .. }),
                "{error}"
            );
        }
        let long = "q".repeat(252);
        assert!(RabbitMqConfig::new(long).check().is_err());
        assert!(RabbitMqConfig::new("q".repeat(251)).check().is_ok());
    }
}
