//! Choosing a transport: a URL such as `sqs://orders?region=eu-west-1`, or a serde
//! [`Config`] that can come from TOML, YAML, JSON or the environment.
//!
//! Both forms carry the same options under the same names, parsed by the same code: a
//! URL's query options are deserialized into the transport's configuration struct, just as
//! a config file is. Unknown options are an error that lists the valid ones.
//!
//! [`Config`] is the table of transports: one variant per URL scheme, each holding its
//! adapter's configuration struct, each behind the cargo feature of its adapter.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

pub use cloudbus_core::config::*;
use cloudbus_core::driver::{Connect, TransportConfig};
use cloudbus_core::memory::MemoryConfig;
use cloudbus_core::{Error, Inspector, Publisher, Result, Subscriber};

/// The environment variable read by [`Config::from_env_or`].
pub const URL_ENV: &str = "CLOUDBUS_URL";

/// The table of transports: `Variant(adapter config) = "scheme", feature "cargo feature"`.
/// From it come the [`Config`] enum, URL and serde parsing, connecting, and the error for a
/// scheme whose feature this build lacks. Adding a transport is one row here, its crate,
/// and its cargo feature.
macro_rules! transports {
    (
        $(#[doc = $memory_doc:literal])*
        Memory($memory:ty) = "memory";
        $(
            $(#[doc = $doc:literal])*
            $variant:ident($config:ty) = $scheme:literal, feature $feature:literal;
        )*
    ) => {
        /// Which transport to use, and its options.
        ///
        /// Parse one from a URL with [`Config::from_url`] (or `str::parse`), or deserialize
        /// it (the `transport` field names the scheme):
        ///
        /// ```
        /// let from_url: cloudbus::Config = "memory://orders?visibility=5s".parse()?;
        /// let from_json: cloudbus::Config = serde_json::from_str(
        ///     r#"{ "transport": "memory", "entity": "orders", "visibility": "5s" }"#,
        /// ).unwrap();
        /// assert_eq!(from_url, from_json);
        /// # Ok::<(), cloudbus::Error>(())
        /// ```
        #[derive(Debug, Clone, PartialEq, Serialize)]
        #[serde(tag = "transport")]
        #[non_exhaustive]
        // A config is made once per connection; its variants stay plain structs that
        // services match and build, not boxes.
        #[allow(clippy::large_enum_variant)]
        pub enum Config {
            $(#[doc = $memory_doc])*
            #[serde(rename = "memory")]
            Memory($memory),
            $(
                $(#[doc = $doc])*
                #[cfg(feature = $feature)]
                #[serde(rename = $scheme)]
                $variant($config),
            )*
        }

        /// Every scheme, with the cargo feature it needs (`None`: always there).
        const SCHEMES: &[(&str, Option<&str>)] = &[
            ("memory", None),
            $(($scheme, Some($feature)),)*
        ];

        impl Config {
            /// The transport's name, which is also its URL scheme: `memory`, `sqs`, ...
            pub fn transport(&self) -> &'static str {
                match self {
                    Config::Memory(_) => "memory",
                    $(
                        #[cfg(feature = $feature)]
                        Config::$variant(_) => $scheme,
                    )*
                }
            }

            /// The configuration as its [`Connect`] (what opens publishers and subscribers).
            fn connector(&self) -> &dyn Connect {
                match self {
                    Config::Memory(c) => c,
                    $(
                        #[cfg(feature = $feature)]
                        Config::$variant(c) => c,
                    )*
                }
            }

            /// The same entity with `subscription` set: the way to receive from a topic.
            /// Fails (`Unsupported`) where the entity cannot have subscriptions (SQS).
            pub fn with_subscription(&self, subscription: &str) -> Result<Config> {
                match self {
                    Config::Memory(c) => c.with_subscription(subscription).map(Config::from),
                    $(
                        #[cfg(feature = $feature)]
                        Config::$variant(c) => c.with_subscription(subscription).map(Config::from),
                    )*
                }
            }

            /// The dead-letter queue of the queue or subscription this config receives
            /// from: for SQS (and the queue of an SNS subscription), the `<queue>-dlq` that
            /// `create=true` makes.
            pub fn dead_letter_queue(&self) -> Result<Config> {
                match self {
                    Config::Memory(c) => c.dead_letter_queue().map(Config::from),
                    $(
                        #[cfg(feature = $feature)]
                        Config::$variant(c) => c.dead_letter_queue().map(Config::from),
                    )*
                }
            }

            /// Where dead letters of this queue or subscription go back to, so that only it
            /// gets them again: the queue itself, or the queue behind a subscription (SNS,
            /// RabbitMQ). `Unsupported` where only the topic can be published to (memory,
            /// Service Bus and Kafka subscriptions), whose every subscription would get them.
            pub fn redrive_target(&self) -> Result<Config> {
                match self {
                    Config::Memory(c) => c.redrive_target().map(Config::from),
                    $(
                        #[cfg(feature = $feature)]
                        Config::$variant(c) => c.redrive_target().map(Config::from),
                    )*
                }
            }

            /// The same subscription, starting at `start` when it is created: how a service
            /// replays a topic (Kafka, memory topics); `Unsupported` where the transport keeps
            /// no log.
            pub fn with_start(&self, start: Start) -> Result<Config> {
                match self {
                    Config::Memory(c) => c.with_start(start).map(Config::from),
                    $(
                        #[cfg(feature = $feature)]
                        Config::$variant(c) => c.with_start(start).map(Config::from),
                    )*
                }
            }

            /// The transport's config from a parsed URL, or why there is none.
            fn parse(url: &ConfigUrl) -> Result<Config> {
                match url.scheme() {
                    "memory" => <$memory>::from_config_url(url).map(Config::Memory),
                    $(
                        #[cfg(feature = $feature)]
                        $scheme => <$config>::from_config_url(url).map(Config::$variant),
                    )*
                    other => Err(unavailable(other, url.redacted())),
                }
            }

            /// The transport's config from serde options (`transport` already taken out).
            fn deserialize_options(transport: &str, options: serde_json::Value) -> Result<Config> {
                let invalid = |error: serde_json::Error| {
                    Error::config(format!("transport `{transport}`: {error}"))
                };
                match transport {
                    "memory" => serde_json::from_value(options).map(Config::Memory).map_err(invalid),
                    $(
                        #[cfg(feature = $feature)]
                        $scheme => serde_json::from_value(options).map(Config::$variant).map_err(invalid),
                    )*
                    other => Err(unavailable(other, &format!("transport = \"{other}\""))),
                }
            }
        }

        impl From<$memory> for Config {
            fn from(config: $memory) -> Config {
                Config::Memory(config)
            }
        }

        impl IntoConfig for $memory {
            fn into_config(self) -> Result<Config> {
                Ok(Config::Memory(self))
            }
        }

        $(
            #[cfg(feature = $feature)]
            impl From<$config> for Config {
                fn from(config: $config) -> Config {
                    Config::$variant(config)
                }
            }

            #[cfg(feature = $feature)]
            impl IntoConfig for $config {
                fn into_config(self) -> Result<Config> {
                    Ok(Config::$variant(self))
                }
            }
        )*
    };
}

transports! {
    /// The in-process broker (`memory://`), always available.
    Memory(MemoryConfig) = "memory";
    /// Amazon SQS (`sqs://`), feature `aws`.
    Sqs(cloudbus_aws::SqsConfig) = "sqs", feature "aws";
    /// Amazon SNS fanning out to SQS queues (`sns://`), feature `aws`.
    Sns(cloudbus_aws::SnsConfig) = "sns", feature "aws";
    /// Azure Service Bus (`servicebus://`), feature `azure`.
    ServiceBus(cloudbus_azure::ServiceBusConfig) = "servicebus", feature "azure";
    /// Kafka (`kafka://`): Amazon MSK, Azure Event Hubs, Confluent, self-hosted; feature `kafka`.
    Kafka(cloudbus_kafka::KafkaConfig) = "kafka", feature "kafka";
    /// RabbitMQ (`rabbitmq://`): Amazon MQ for RabbitMQ, self-hosted; feature `rabbitmq`.
    RabbitMq(cloudbus_rabbitmq::RabbitMqConfig) = "rabbitmq", feature "rabbitmq";
}

/// The error for a scheme this build cannot use: unknown, or its feature is off.
fn unavailable(scheme: &str, what: &str) -> Error {
    match SCHEMES.iter().find(|(known, _)| *known == scheme) {
        Some((_, Some(feature))) => Error::config(format!(
            "{scheme}:// needs the cargo feature `{feature}`, which this build lacks: add \
             `features = [\"{feature}\"]` to the cloudbus dependency in Cargo.toml (in `{what}`)"
        )),
        _ => {
            let known: Vec<String> = SCHEMES.iter().map(|(s, _)| format!("{s}://")).collect();
            Error::config(format!(
                "unknown transport `{scheme}` in `{what}`; cloudbus knows {}",
                known.join(", ")
            ))
        }
    }
}

impl Config {
    /// Parses a URL such as `memory://orders`, `sqs://orders?region=eu-west-1` or
    /// `servicebus://events?subscription=audit`.
    pub fn from_url(url: &str) -> Result<Config> {
        Config::parse(&ConfigUrl::parse(url)?)
    }

    /// Reads the URL from the `CLOUDBUS_URL` environment variable, or uses `default` when
    /// it is unset or empty.
    pub fn from_env_or(default: &str) -> Result<Config> {
        match std::env::var(URL_ENV) {
            Ok(url) if !url.trim().is_empty() => Config::from_url(url.trim()),
            _ => Config::from_url(default),
        }
    }

    /// Opens a publisher on what this configuration names.
    pub async fn connect_publisher(&self) -> Result<Box<dyn Publisher>> {
        self.connector().connect_publisher().await
    }

    /// Opens a subscriber on what this configuration names.
    pub async fn connect_subscriber(&self) -> Result<Box<dyn Subscriber>> {
        self.connector().connect_subscriber().await
    }

    /// Opens an inspector (peek and stats, consuming nothing) on the queue or subscription
    /// this configuration names.
    pub async fn connect_inspector(&self) -> Result<Box<dyn Inspector>> {
        self.connector().connect_inspector().await
    }
}

impl<'de> Deserialize<'de> for Config {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let mut options = serde_json::Map::deserialize(d)?;
        let transport = match options.remove("transport") {
            Some(serde_json::Value::String(transport)) => transport,
            _ => {
                let known: Vec<&str> = SCHEMES.iter().map(|(s, _)| *s).collect();
                return Err(D::Error::custom(format!(
                    "missing field `transport`: one of {}",
                    known.join(", ")
                )));
            }
        };
        Config::deserialize_options(&transport, serde_json::Value::Object(options))
            .map_err(D::Error::custom)
    }
}

impl std::str::FromStr for Config {
    type Err = Error;

    fn from_str(url: &str) -> Result<Config> {
        Config::from_url(url)
    }
}

/// Anything [`crate::connect_publisher`] and [`crate::connect_subscriber`] accept: a URL
/// (`&str`, `String`), a [`Config`], or a transport's own configuration struct.
pub trait IntoConfig {
    /// Converts into a [`Config`], validating it.
    fn into_config(self) -> Result<Config>;
}

impl IntoConfig for &str {
    fn into_config(self) -> Result<Config> {
        Config::from_url(self)
    }
}

impl IntoConfig for String {
    fn into_config(self) -> Result<Config> {
        Config::from_url(&self)
    }
}

impl IntoConfig for &String {
    fn into_config(self) -> Result<Config> {
        Config::from_url(self)
    }
}

impl IntoConfig for Config {
    fn into_config(self) -> Result<Config> {
        Ok(self)
    }
}

impl IntoConfig for &Config {
    fn into_config(self) -> Result<Config> {
        Ok(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_scheme_and_missing_scheme() {
        let text = Config::from_url("nats://x").unwrap_err().to_string();
        assert!(
            text.contains("unknown transport `nats`") && text.contains("memory://"),
            "{text}"
        );
        assert!(matches!(
            Config::from_url("orders"),
            Err(Error::Config { .. })
        ));
        let missing: std::result::Result<Config, _> =
            serde_json::from_value(serde_json::json!({"entity": "q"}));
        assert!(missing.unwrap_err().to_string().contains("transport"));
    }

    #[test]
    fn a_url_and_serde_give_the_same_memory_config() {
        let from_url: Config = "memory://orders?visibility=5s&max_deliveries=3"
            .parse()
            .unwrap();
        let from_toml_like: Config = serde_json::from_value(serde_json::json!({
            "transport": "memory", "entity": "orders", "visibility": 5, "max_deliveries": 3
        }))
        .unwrap();
        assert_eq!(from_url, from_toml_like);
        assert_eq!(from_url.transport(), "memory");
        let bad = serde_json::from_value::<Config>(serde_json::json!({
            "transport": "memory", "entity": "q", "visibilty": 1
        }));
        assert!(bad.unwrap_err().to_string().contains("visibilty"));
    }

    #[test]
    fn secrets_never_show_in_errors() {
        let text = Config::from_url("nats://user:hunter2@host/q")
            .unwrap_err()
            .to_string();
        assert!(!text.contains("hunter2"), "{text}");
    }

    /// Each scheme whose feature is off names the feature to enable, from a URL and from
    /// serde alike.
    #[test]
    fn a_scheme_without_its_feature_names_the_feature() {
        for (scheme, feature) in SCHEMES {
            let Some(feature) = feature else { continue };
            let enabled = Config::from_url(&format!("{scheme}://x")).is_ok();
            if enabled {
                continue;
            }
            for text in [
                Config::from_url(&format!("{scheme}://x"))
                    .unwrap_err()
                    .to_string(),
                serde_json::from_value::<Config>(serde_json::json!({"transport": scheme}))
                    .unwrap_err()
                    .to_string(),
            ] {
                assert!(
                    text.contains(&format!("cargo feature `{feature}`")),
                    "{scheme}: {text}"
                );
            }
        }
    }

    /// Every option of every transport, once in a URL and once in serde (JSON): the same
    /// struct. (Before URL and serde shared one parser, `servicebus://q?session=x` turned
    /// `sessions` on and `session = "x"` in a config file did not.)
    #[test]
    fn every_option_from_a_url_and_from_serde_is_the_same_struct() {
        use serde_json::json;
        #[allow(unused_mut)]
        let mut cases = vec![
            (
                "memory://orders/$deadletter?subscription=s&create=false&visibility=5s&max_deliveries=3&capacity=7&max_message_size=9",
                json!({"transport": "memory", "entity": "orders", "dead_letter": true,
                    "subscription": "s", "create": false, "visibility": "5s",
                    "max_deliveries": 3, "capacity": 7, "max_message_size": 9}),
            ),
            ("memory://", json!({"transport": "memory"})),
        ];
        #[cfg(feature = "aws")]
        cases.extend([
            (
                "sqs://orders?region=r&endpoint=http://e&create=true&wait=3s&visibility=4s&max_receive_count=2&batching=false&linger=1ms&batch_size=5",
                json!({"transport": "sqs", "queue": "orders", "region": "r",
                    "endpoint": "http://e", "create": true, "wait": "3s", "visibility": "4s",
                    "max_receive_count": 2, "batching": false, "linger": "1ms", "batch_size": 5}),
            ),
            (
                "sns://t?subscription=q&region=r&endpoint=http://e&create=true&wait=3s&visibility=4s&max_receive_count=2&batching=false&linger=1ms&batch_size=5",
                json!({"transport": "sns", "topic": "t", "subscription": "q", "region": "r",
                    "endpoint": "http://e", "create": true, "wait": "3s", "visibility": "4s",
                    "max_receive_count": 2, "batching": false, "linger": "1ms", "batch_size": 5}),
            ),
        ]);
        #[cfg(feature = "azure")]
        cases.extend([
            (
                "servicebus://q?subscription=s&receive_mode=receive_and_delete&prefetch=3&session=x&max_message_size=9&namespace=n&credential=developer&client_id=c&batching=false&batch_size=5&receivers=2",
                json!({"transport": "servicebus", "entity": "q", "subscription": "s",
                    "receive_mode": "receive_and_delete", "prefetch": 3, "session": "x",
                    "max_message_size": 9, "namespace": "n", "credential": "developer",
                    "client_id": "c", "batching": false, "batch_size": 5, "receivers": 2}),
            ),
            (
                "servicebus://q/$deadletter?sessions=true",
                json!({"transport": "servicebus", "entity": "q", "dead_letter": true,
                    "sessions": true}),
            ),
        ]);
        for (url, json) in cases {
            let from_url = Config::from_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            let from_serde: Config =
                serde_json::from_value(json).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(from_url, from_serde, "{url}");
        }
    }
}
