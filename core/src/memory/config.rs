//! [`MemoryConfig`]: `memory://<entity>[/$deadletter][?subscription=<name>&...]`.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{MemoryInspector, MemoryPublisher, MemorySubscriber};
use crate::config::{ConfigUrl, Start};
use crate::driver::{Connect, TransportConfig};
use crate::{Error, Inspector, Publisher, Result, Subscriber};

/// Options of the in-memory transport: `memory://<entity>[/$deadletter][?subscription=<name>&...]`.
///
/// Entities live in one process-wide broker and are shared by name. An entity is a queue
/// (competing consumers) until a subscription is opened on it; from then on it is a topic
/// and every subscription gets every message published to it.
///
/// ```
/// use std::time::Duration;
/// use cloudbus_core::driver::TransportConfig;
/// use cloudbus_core::memory::MemoryConfig;
///
/// let mut config = MemoryConfig::new("orders");
/// config.visibility = Duration::from_secs(5);
/// assert_eq!(MemoryConfig::from_url("memory://orders?visibility=5s")?, config);
/// # Ok::<(), cloudbus_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct MemoryConfig {
    /// The queue or topic name. `memory://` alone means `default`.
    pub entity: String,
    /// The subscription to receive from, making the entity a topic.
    pub subscription: Option<String>,
    /// Address the dead-letter queue of the queue or subscription (`/$deadletter` in a URL).
    pub dead_letter: bool,
    /// Create the entity (and subscription) if missing. Default `true`; with `false`, a
    /// missing entity is [`Error::NotFound`](crate::Error::NotFound).
    pub create: bool,
    /// How long a received message stays invisible before it is redelivered. Default 30 s.
    #[serde(with = "crate::config::duration")]
    pub visibility: Duration,
    /// Deliveries after which a message is dead-lettered. Default 10.
    pub max_deliveries: u32,
    /// Messages an entity holds at most (a publish beyond fails, transiently). Default 100,000.
    pub capacity: usize,
    /// Largest message in bytes (payload plus attribute keys and values). Default 1 MiB.
    pub max_message_size: usize,
    /// Where a new subscription starts: `latest` (the default: what is published after it
    /// is created), `earliest` (everything the topic's log still holds: a topic keeps its
    /// last `capacity` messages) or a time. An existing subscription goes on as it was.
    pub start: Start,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            entity: "default".to_string(),
            subscription: None,
            dead_letter: false,
            create: true,
            visibility: Duration::from_secs(30),
            max_deliveries: 10,
            capacity: 100_000,
            max_message_size: 1024 * 1024,
            start: Start::Latest,
        }
    }
}

impl MemoryConfig {
    /// The defaults, on the queue or topic `entity`.
    pub fn new(entity: impl Into<String>) -> Self {
        MemoryConfig {
            entity: entity.into(),
            ..MemoryConfig::default()
        }
    }
}

#[async_trait]
impl Connect for MemoryConfig {
    async fn connect_publisher(&self) -> Result<Box<dyn Publisher>> {
        Ok(Box::new(MemoryPublisher::connect(self).await?))
    }

    async fn connect_subscriber(&self) -> Result<Box<dyn Subscriber>> {
        Ok(Box::new(MemorySubscriber::connect(self).await?))
    }

    async fn connect_inspector(&self) -> Result<Box<dyn Inspector>> {
        Ok(Box::new(MemoryInspector::connect(self).await?))
    }
}

impl TransportConfig for MemoryConfig {
    const SCHEME: &'static str = "memory";
    type DeadLetters = MemoryConfig;

    fn from_config_url(url: &ConfigUrl) -> Result<Self> {
        let (entity, dead_letter) = url.dead_letter_path();
        let mut fields = vec![];
        if !entity.is_empty() {
            fields.push(("entity", entity));
        }
        if dead_letter {
            fields.push(("dead_letter", "true"));
        }
        url.deserialize(&fields)
    }

    fn with_subscription(&self, subscription: &str) -> Result<Self> {
        Ok(MemoryConfig {
            subscription: Some(subscription.to_string()),
            ..self.clone()
        })
    }

    fn dead_letter_queue(&self) -> Result<Self> {
        Ok(MemoryConfig {
            dead_letter: true,
            ..self.clone()
        })
    }

    /// The queue itself; a subscription's dead letters cannot go back to it alone (a
    /// publish reaches every subscription of the topic).
    fn redrive_target(&self) -> Result<Self> {
        match &self.subscription {
            None => Ok(MemoryConfig {
                dead_letter: false,
                ..self.clone()
            }),
            Some(subscription) => Err(Error::Unsupported {
                transport: "memory",
                feature: format!(
                    "redrive to the subscription `{subscription}` alone: a publish to \
                     memory://{} reaches every subscription; publish to the topic on purpose \
                     instead",
                    self.entity
                ),
            }),
        }
    }

    fn with_start(&self, start: Start) -> Result<Self> {
        Ok(MemoryConfig {
            start,
            ..self.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn url_defaults() {
        assert_eq!(
            MemoryConfig::from_url("memory://").unwrap(),
            MemoryConfig::default()
        );
    }

    #[test]
    fn url_with_options_and_dead_letter() {
        let m = MemoryConfig::from_url(
            "memory://events/$deadletter?subscription=audit&visibility=500ms&max_deliveries=3&create=false",
        )
        .unwrap();
        assert_eq!(m.entity, "events");
        assert!(m.dead_letter);
        assert_eq!(m.subscription.as_deref(), Some("audit"));
        assert_eq!(m.visibility, Duration::from_millis(500));
        assert_eq!(m.max_deliveries, 3);
        assert!(!m.create);
    }

    #[test]
    fn unknown_option_lists_valid_ones() {
        let text = MemoryConfig::from_url("memory://q?visibilty=5")
            .unwrap_err()
            .to_string();
        assert!(text.contains("`visibilty`"), "{text}");
        assert!(text.contains("visibility, max_deliveries"), "{text}");
        let bad = serde_json::from_value::<MemoryConfig>(serde_json::json!({
            "entity": "q", "visibilty": 1
        }));
        assert!(bad.unwrap_err().to_string().contains("visibilty"));
    }

    #[test]
    fn bad_values_name_the_option() {
        let text = MemoryConfig::from_url("memory://q?visibility=soon")
            .unwrap_err()
            .to_string();
        assert!(text.contains("`visibility`"), "{text}");
        assert!(matches!(
            MemoryConfig::from_url("other://q"),
            Err(Error::Config { .. })
        ));
    }
}
