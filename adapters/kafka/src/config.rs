//! [`KafkaConfig`]: `kafka://<topic>[?subscription=<group>&...]`.

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::config::{ConfigUrl, Secret, Start};
use cloudbus_core::driver::{Connect, TransportConfig};
use cloudbus_core::{Error, Inspector, Publisher, Result, Subscriber};
use serde::{Deserialize, Serialize};

use crate::{KafkaInspector, KafkaPublisher, KafkaSubscriber};

/// The environment variable read for the brokers when the config names none.
pub const BROKERS_ENV: &str = "KAFKA_BROKERS";
/// The environment variable read for the SASL password when the config has none.
pub const PASSWORD_ENV: &str = "KAFKA_SASL_PASSWORD";
/// The environment variable read for an Event Hubs connection string when `auth` is
/// `event_hubs` and the config has none.
pub const EVENT_HUBS_ENV: &str = "EVENTHUBS_CONNECTION_STRING";
/// The brokers when neither the config nor [`BROKERS_ENV`] names any.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";

/// How a client authenticates to the brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Auth {
    /// No authentication (a broker on a private network or loopback). The default.
    #[default]
    None,
    /// SASL PLAIN with `username` and `password` (Confluent Cloud API keys).
    Plain,
    /// SASL SCRAM-SHA-256 with `username` and `password` (Amazon MSK, self-hosted).
    #[serde(rename = "scram_sha_256")]
    ScramSha256,
    /// SASL SCRAM-SHA-512 with `username` and `password` (Amazon MSK, self-hosted).
    #[serde(rename = "scram_sha_512")]
    ScramSha512,
    /// Azure Event Hubs' Kafka endpoint: SASL PLAIN with the namespace's connection string
    /// over TLS on port 9093; the brokers come from the connection string.
    EventHubs,
    /// Amazon MSK IAM: SASL OAUTHBEARER with a token signed (SigV4) from the standard AWS
    /// credential chain, over TLS.
    MskIam,
}

impl Auth {
    /// The option's value: `none`, `plain`, `scram_sha_256`, `scram_sha_512`,
    /// `event_hubs`, `msk_iam`.
    pub fn name(self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Plain => "plain",
            Auth::ScramSha256 => "scram_sha_256",
            Auth::ScramSha512 => "scram_sha_512",
            Auth::EventHubs => "event_hubs",
            Auth::MskIam => "msk_iam",
        }
    }
}

impl std::fmt::Display for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Options of the Kafka transport: `kafka://<topic>` publishes;
/// `kafka://<topic>?subscription=<group>` receives through the consumer group `group`
/// (each group gets every message; the subscribers of one group share the topic's
/// partitions, as competing consumers).
///
/// ```
/// use cloudbus_core::driver::TransportConfig;
/// use cloudbus_kafka::KafkaConfig;
///
/// let config = KafkaConfig::from_url("kafka://orders?subscription=billing&start=earliest")?;
/// assert_eq!(config.subscription.as_deref(), Some("billing"));
/// # Ok::<(), cloudbus_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// The topic.
    pub topic: String,
    /// The consumer group to receive through.
    pub subscription: Option<String>,
    /// Bootstrap brokers, `host:port` separated by commas; by default `KAFKA_BROKERS`, else
    /// `127.0.0.1:9092` (for `auth = event_hubs`: the connection string's namespace on port
    /// 9093, whatever `KAFKA_BROKERS` says).
    pub brokers: Option<String>,
    /// Create the topic (and, for a subscriber, its dead-letter topic) if missing.
    /// Default `false`.
    pub create: bool,
    /// With `create`: partitions of a new topic. Default 4.
    pub partitions: i32,
    /// With `create`: replication factor of a new topic; by default the broker's.
    pub replication: Option<i32>,
    /// Address the subscription's dead-letter topic (`<topic>.<group>.dlq`), read through
    /// the group `<group>.dlq`: what [`TransportConfig::dead_letter_queue`] gives.
    pub dead_letter: bool,
    /// Where a new subscription starts: `latest` (the default: what is published after the
    /// subscriber first connects, which pins the group's position then), `earliest` (the
    /// topic's whole retention) or an RFC 3339 time. An existing group goes on from its
    /// committed offsets.
    pub start: Start,
    /// How long a received record stays with its receiver before the subscriber hands it
    /// out again (Kafka has no locks: see the README). Default 30 s.
    #[serde(with = "cloudbus_core::config::duration")]
    pub visibility: Duration,
    /// Deliveries after which a record is moved to the dead-letter topic. Default 10.
    pub max_deliveries: u32,
    /// Largest record in bytes (value, key and headers). Default 1,000,000 (the broker's
    /// default `message.max.bytes` leaves room for the batch framing).
    pub max_message_size: usize,
    /// How often the acknowledged prefix of each partition is committed. Default 1 s.
    #[serde(with = "cloudbus_core::config::duration")]
    pub commit_interval: Duration,
    /// Records taken from librdkafka and not yet settled, at most, for all the partitions
    /// the subscriber holds: beyond, it takes more only as records are settled (librdkafka
    /// itself prefetches up to its `queued.max.messages.kbytes`, 64 MiB). Default 10,000.
    pub max_buffered: usize,
    /// Consumer group session timeout: how long a crashed consumer keeps its partitions
    /// before the group hands them to the others; the subscriber heartbeats every third of
    /// it. Default 10 s.
    #[serde(with = "cloudbus_core::config::duration")]
    pub session_timeout: Duration,
    /// How long a publish may wait for the broker's acknowledgement (retries included)
    /// before it fails with a transient error. Default 30 s.
    #[serde(with = "cloudbus_core::config::duration")]
    pub publish_timeout: Duration,
    /// How long the producer waits for more records to fill a batch (librdkafka's
    /// `linger.ms`). Default 1 ms: a lone publish waits little, and under load records of
    /// concurrent publishes share requests.
    #[serde(with = "cloudbus_core::config::duration")]
    pub linger: Duration,
    /// Authentication: `none` (default), `plain`, `scram_sha_256`, `scram_sha_512`,
    /// `event_hubs`, `msk_iam`.
    pub auth: Auth,
    /// Encrypt with TLS. Default `false`; always on for `event_hubs` and `msk_iam`.
    pub tls: bool,
    /// A PEM file of CA certificates to trust instead of the system's.
    pub tls_ca: Option<String>,
    /// SASL user name for `plain` and `scram_*`.
    pub username: Option<String>,
    /// SASL password for `plain` and `scram_*`; by default `KAFKA_SASL_PASSWORD`. Never in
    /// a URL.
    #[serde(skip_serializing)]
    pub password: Option<Secret>,
    /// The Event Hubs namespace connection string for `auth = event_hubs`; by default
    /// `EVENTHUBS_CONNECTION_STRING`. Never in a URL.
    #[serde(skip_serializing)]
    pub connection_string: Option<Secret>,
    /// The AWS region of an MSK cluster for `auth = msk_iam`; by default from the AWS
    /// configuration chain.
    pub region: Option<String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            topic: String::new(),
            subscription: None,
            brokers: None,
            create: false,
            partitions: 4,
            replication: None,
            dead_letter: false,
            start: Start::Latest,
            visibility: Duration::from_secs(30),
            max_deliveries: 10,
            max_message_size: 1_000_000,
            commit_interval: Duration::from_secs(1),
            max_buffered: 10_000,
            session_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(30),
            linger: Duration::from_millis(1),
            auth: Auth::None,
            tls: false,
            tls_ca: None,
            username: None,
            password: None,
            connection_string: None,
            region: None,
        }
    }
}

impl KafkaConfig {
    /// The defaults, on the topic `topic`.
    pub fn new(topic: impl Into<String>) -> Self {
        KafkaConfig {
            topic: topic.into(),
            ..KafkaConfig::default()
        }
    }

    /// The dead-letter topic of a group on `topic`: `<topic>.<group>.dlq`.
    pub fn dead_letter_topic(topic: &str, group: &str) -> String {
        format!("{topic}.{group}.dlq")
    }

    /// The group that reads a dead-letter topic: `<group>.dlq`.
    pub(crate) fn dead_letter_group(group: &str) -> String {
        format!("{group}.dlq")
    }

    /// The topic and group a subscriber reads: the subscription's, or its dead-letter
    /// topic's with `dead_letter`.
    pub(crate) fn source(&self) -> Result<(String, String)> {
        let group = self.subscription.clone().ok_or_else(|| {
            Error::config(format!(
                "kafka://{} has no subscription: receive through a consumer group, \
                 kafka://{}?subscription=<group>",
                self.topic, self.topic
            ))
        })?;
        Ok(if self.dead_letter {
            (
                KafkaConfig::dead_letter_topic(&self.topic, &group),
                KafkaConfig::dead_letter_group(&group),
            )
        } else {
            (self.topic.clone(), group)
        })
    }
}

#[async_trait]
impl Connect for KafkaConfig {
    async fn connect_publisher(&self) -> Result<Box<dyn Publisher>> {
        Ok(Box::new(KafkaPublisher::connect(self).await?))
    }

    async fn connect_subscriber(&self) -> Result<Box<dyn Subscriber>> {
        Ok(Box::new(KafkaSubscriber::connect(self).await?))
    }

    async fn connect_inspector(&self) -> Result<Box<dyn Inspector>> {
        Ok(Box::new(KafkaInspector::connect(self).await?))
    }
}

impl TransportConfig for KafkaConfig {
    const SCHEME: &'static str = "kafka";
    type DeadLetters = KafkaConfig;

    fn from_config_url(url: &ConfigUrl) -> Result<Self> {
        url.deserialize(&[("topic", url.entity("topic")?)])
    }

    fn with_subscription(&self, subscription: &str) -> Result<Self> {
        Ok(KafkaConfig {
            subscription: Some(subscription.to_string()),
            ..self.clone()
        })
    }

    /// The subscription's dead-letter topic, read from its beginning.
    fn dead_letter_queue(&self) -> Result<Self> {
        self.source()?;
        Ok(KafkaConfig {
            dead_letter: true,
            start: Start::Earliest,
            ..self.clone()
        })
    }

    /// `Unsupported`: a subscription is a consumer group, and a record published to the
    /// topic reaches every group.
    fn redrive_target(&self) -> Result<Self> {
        Err(Error::Unsupported {
            transport: "kafka",
            feature: format!(
                "redrive to one subscription: a consumer group reads the topic, so a record \
                 published to kafka://{} reaches every group of it; publish to the topic on \
                 purpose instead",
                self.topic
            ),
        })
    }

    fn with_start(&self, start: Start) -> Result<Self> {
        Ok(KafkaConfig {
            start,
            ..self.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_defaults() {
        let config = KafkaConfig::from_url("kafka://orders").unwrap();
        assert_eq!(config, KafkaConfig::new("orders"));
        let config = KafkaConfig::from_url(
            "kafka://orders?subscription=billing&brokers=a:9092,b:9092&create&partitions=8&start=earliest&auth=scram_sha_512&username=u&tls",
        )
        .unwrap();
        assert_eq!(config.brokers.as_deref(), Some("a:9092,b:9092"));
        assert_eq!(
            (config.partitions, config.create, config.tls),
            (8, true, true)
        );
        assert_eq!(config.start, Start::Earliest);
        assert_eq!(config.auth, Auth::ScramSha512);
        assert!(KafkaConfig::from_url("kafka://").is_err());
    }

    #[test]
    fn secrets_never_come_from_a_url() {
        for option in ["password=hunter2", "connection_string=hunter2"] {
            let text = KafkaConfig::from_url(&format!("kafka://t?{option}"))
                .unwrap_err()
                .to_string();
            assert!(
                text.contains("secret") && !text.contains("hunter2"),
                "{text}"
            );
        }
    }

    #[test]
    fn the_dead_letter_topic_of_a_subscription() {
        let config = KafkaConfig::from_url("kafka://orders?subscription=billing").unwrap();
        let dlq = config.dead_letter_queue().unwrap();
        assert_eq!(
            dlq.source().unwrap(),
            ("orders.billing.dlq".to_string(), "billing.dlq".to_string())
        );
        assert_eq!(dlq.start, Start::Earliest);
        assert!(KafkaConfig::new("orders").dead_letter_queue().is_err());
    }
}
