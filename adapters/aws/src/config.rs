//! [`SqsConfig`] (`sqs://`) and [`SnsConfig`] (`sns://`).

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::config::ConfigUrl;
use cloudbus_core::driver::{Connect, TransportConfig};
use cloudbus_core::{Destination, Error, Inspector, Publisher, Result, Subscriber};
use serde::{Deserialize, Serialize};

use crate::{SnsPublisher, SnsSubscriber, SqsInspector, SqsPublisher, SqsSubscriber};

/// Options of the SQS transport: `sqs://<queue-name or queue URL>[?region=..&endpoint=..&...]`.
///
/// ```
/// use cloudbus_aws::SqsConfig;
/// use cloudbus_core::driver::TransportConfig;
///
/// let config = SqsConfig::from_url("sqs://orders?endpoint=http://127.0.0.1:4566&create=true")?;
/// let mut same = SqsConfig::new("orders");
/// same.endpoint = Some("http://127.0.0.1:4566".into());
/// same.create = true;
/// assert_eq!(config, same);
/// # Ok::<(), cloudbus_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SqsConfig {
    /// The queue name (a `.fifo` suffix makes a FIFO queue) or its full URL.
    pub queue: String,
    /// AWS region; by default from the standard AWS configuration chain.
    pub region: Option<String>,
    /// Endpoint URL override, e.g. `http://127.0.0.1:4566` for LocalStack.
    pub endpoint: Option<String>,
    /// Create the queue (and its `-dlq` dead-letter queue) if missing. Default `false`.
    pub create: bool,
    /// Long-poll time of each receive call, at most 20 s. Default 20 s.
    #[serde(with = "cloudbus_core::config::duration")]
    pub wait: Duration,
    /// Visibility timeout for received messages; by default the queue's own.
    #[serde(with = "cloudbus_core::config::opt_duration")]
    pub visibility: Option<Duration>,
    /// With `create`: receives after which SQS moves a message to the dead-letter queue. Default 10.
    pub max_receive_count: u32,
    /// Coalesce concurrent `publish` calls into batch calls. Default `true`.
    pub batching: bool,
    /// With `batching`: how long a batch may wait to fill while other batch calls are in
    /// flight (a lone publish goes out at once; past the linger, a batch that is not full
    /// waits on only while more than one other call is in flight). Default 5 ms.
    #[serde(with = "cloudbus_core::config::duration")]
    pub linger: Duration,
    /// With `batching`: messages per batch call at most. Default and maximum 10.
    pub batch_size: usize,
}

impl Default for SqsConfig {
    fn default() -> Self {
        SqsConfig {
            queue: String::new(),
            region: None,
            endpoint: None,
            create: false,
            wait: Duration::from_secs(20),
            visibility: None,
            max_receive_count: 10,
            batching: true,
            linger: Duration::from_millis(5),
            batch_size: 10,
        }
    }
}

impl SqsConfig {
    /// The defaults, on the queue `queue` (a name or a queue URL).
    pub fn new(queue: impl Into<String>) -> Self {
        SqsConfig {
            queue: queue.into(),
            ..SqsConfig::default()
        }
    }
}

/// Options of the SNS transport: `sns://<topic name or ARN>[?subscription=<queue>&...]`.
///
/// Publishing goes to the topic; receiving goes through the SQS queue named by
/// `subscription`, which is subscribed to the topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SnsConfig {
    /// The topic name (a `.fifo` suffix makes a FIFO topic) or its ARN.
    pub topic: String,
    /// The SQS queue subscribed to the topic, for receiving.
    pub subscription: Option<String>,
    /// AWS region; by default from the standard AWS configuration chain.
    pub region: Option<String>,
    /// Endpoint URL override, e.g. `http://127.0.0.1:4566` for LocalStack.
    pub endpoint: Option<String>,
    /// Create the topic, the queue, the subscription and the queue policy if missing.
    pub create: bool,
    /// Long-poll time of each receive call, at most 20 s. Default 20 s.
    #[serde(with = "cloudbus_core::config::duration")]
    pub wait: Duration,
    /// Visibility timeout for received messages; by default the queue's own.
    #[serde(with = "cloudbus_core::config::opt_duration")]
    pub visibility: Option<Duration>,
    /// With `create`: receives after which SQS moves a message to the dead-letter queue. Default 10.
    pub max_receive_count: u32,
    /// Coalesce concurrent `publish` calls into batch calls. Default `true`.
    pub batching: bool,
    /// With `batching`: how long a batch may wait to fill while other batch calls are in
    /// flight (a lone publish goes out at once; past the linger, a batch that is not full
    /// waits on only while more than one other call is in flight). Default 5 ms.
    #[serde(with = "cloudbus_core::config::duration")]
    pub linger: Duration,
    /// With `batching`: messages per batch call at most. Default and maximum 10.
    pub batch_size: usize,
}

impl Default for SnsConfig {
    fn default() -> Self {
        let sqs = SqsConfig::default();
        SnsConfig {
            topic: String::new(),
            subscription: None,
            region: sqs.region,
            endpoint: sqs.endpoint,
            create: sqs.create,
            wait: sqs.wait,
            visibility: sqs.visibility,
            max_receive_count: sqs.max_receive_count,
            batching: sqs.batching,
            linger: sqs.linger,
            batch_size: sqs.batch_size,
        }
    }
}

impl SnsConfig {
    /// The defaults, on the topic `topic` (a name or an ARN).
    pub fn new(topic: impl Into<String>) -> Self {
        SnsConfig {
            topic: topic.into(),
            ..SnsConfig::default()
        }
    }

    /// The SQS queue a subscriber receives from: `queue` with this config's options.
    /// The subscription's queue name, or the error that says to add one.
    fn subscribed_queue(&self) -> Result<&str> {
        self.subscription.as_deref().ok_or_else(|| {
            Error::config(format!(
                "sns://{} names no subscription: add ?subscription=<queue> (a topic keeps no \
                 messages; its subscriptions' queues do)",
                self.topic
            ))
        })
    }

    pub(crate) fn queue(&self, queue: &str) -> SqsConfig {
        SqsConfig {
            queue: queue.to_string(),
            region: self.region.clone(),
            endpoint: self.endpoint.clone(),
            create: self.create,
            wait: self.wait,
            visibility: self.visibility,
            max_receive_count: self.max_receive_count,
            batching: self.batching,
            linger: self.linger,
            batch_size: self.batch_size,
        }
    }
}

/// The name of the dead-letter queue cloudbus creates for an SQS queue (or queue URL):
/// `<name>-dlq`, or `<base>-dlq.fifo` for a FIFO queue.
pub fn sqs_dead_letter_name(queue: &str) -> String {
    match queue.strip_suffix(".fifo") {
        Some(base) => format!("{base}-dlq.fifo"),
        None => format!("{queue}-dlq"),
    }
}

#[async_trait]
impl Connect for SqsConfig {
    async fn connect_publisher(&self) -> Result<Box<dyn Publisher>> {
        Ok(Box::new(SqsPublisher::connect(self).await?))
    }

    async fn connect_subscriber(&self) -> Result<Box<dyn Subscriber>> {
        Ok(Box::new(SqsSubscriber::connect(self).await?))
    }

    async fn connect_inspector(&self) -> Result<Box<dyn Inspector>> {
        Ok(Box::new(SqsInspector::connect(self).await?))
    }
}

impl TransportConfig for SqsConfig {
    const SCHEME: &'static str = "sqs";
    type DeadLetters = SqsConfig;

    fn from_config_url(url: &ConfigUrl) -> Result<Self> {
        url.deserialize(&[("queue", url.entity("queue")?)])
    }

    fn with_subscription(&self, _subscription: &str) -> Result<Self> {
        Err(Error::Unsupported {
            transport: "sqs",
            feature: "subscriptions (an SQS queue is not a topic; use sns:// for fan-out)".into(),
        })
    }

    /// The `<queue>-dlq` that `create=true` makes.
    fn dead_letter_queue(&self) -> Result<SqsConfig> {
        Ok(SqsConfig {
            queue: sqs_dead_letter_name(&self.queue),
            create: false,
            ..self.clone()
        })
    }

    /// The queue itself.
    fn redrive_target(&self) -> Result<SqsConfig> {
        Ok(SqsConfig {
            create: false,
            ..self.clone()
        })
    }
}

#[async_trait]
impl Connect for SnsConfig {
    async fn connect_publisher(&self) -> Result<Box<dyn Publisher>> {
        Ok(Box::new(SnsPublisher::connect(self).await?))
    }

    async fn connect_subscriber(&self) -> Result<Box<dyn Subscriber>> {
        Ok(Box::new(SnsSubscriber::connect(self).await?))
    }

    /// Looks into the subscription's queue.
    async fn connect_inspector(&self) -> Result<Box<dyn Inspector>> {
        let queue = self.subscribed_queue()?;
        let inspector = SqsInspector::connect(&self.queue(queue)).await?;
        let destination = Destination::new("sns", self.topic.clone()).with_subscription(queue);
        Ok(Box::new(inspector.with_destination(destination)))
    }
}

impl TransportConfig for SnsConfig {
    const SCHEME: &'static str = "sns";
    type DeadLetters = SqsConfig;

    fn from_config_url(url: &ConfigUrl) -> Result<Self> {
        url.deserialize(&[("topic", url.entity("topic")?)])
    }

    fn with_subscription(&self, subscription: &str) -> Result<Self> {
        Ok(SnsConfig {
            subscription: Some(subscription.to_string()),
            ..self.clone()
        })
    }

    /// The `<queue>-dlq` of the subscribed queue, which `create=true` makes.
    fn dead_letter_queue(&self) -> Result<SqsConfig> {
        self.queue(self.subscribed_queue()?).dead_letter_queue()
    }

    /// The subscribed queue: a copy sent there reaches this subscription only.
    fn redrive_target(&self) -> Result<SqsConfig> {
        self.queue(self.subscribed_queue()?).redrive_target()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let s = SqsConfig::from_url(
            "sqs://orders.fifo?region=eu-west-1&endpoint=http://127.0.0.1:4566&wait=5",
        )
        .unwrap();
        assert_eq!(s.queue, "orders.fifo");
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:4566"));
        assert_eq!(s.wait, Duration::from_secs(5));
        let s = SnsConfig::from_url("sns://events?subscription=audit").unwrap();
        assert_eq!(s.subscription.as_deref(), Some("audit"));
        assert!(SqsConfig::from_url("sqs://").is_err());
        let text = SqsConfig::from_url("sqs://q?create=maybe")
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("`create`") && text.contains("maybe"),
            "{text}"
        );
    }

    #[test]
    fn serde_configs_read_durations_as_seconds_or_text() {
        let s: SqsConfig = serde_json::from_value(serde_json::json!({
            "queue": "orders", "create": true, "visibility": 45, "linger": "2ms"
        }))
        .unwrap();
        assert_eq!(s.visibility, Some(Duration::from_secs(45)));
        assert_eq!(s.linger, Duration::from_millis(2));
        assert!(s.create);
    }

    #[test]
    fn dead_letter_queues() {
        assert_eq!(sqs_dead_letter_name("orders"), "orders-dlq");
        assert_eq!(sqs_dead_letter_name("orders.fifo"), "orders-dlq.fifo");
        let sqs = SqsConfig::from_url("sqs://orders?create=true").unwrap();
        let dlq = sqs.dead_letter_queue().unwrap();
        assert_eq!((dlq.queue.as_str(), dlq.create), ("orders-dlq", false));
        let sns = SnsConfig::from_url("sns://events?subscription=audit&region=r").unwrap();
        let dlq = sns.dead_letter_queue().unwrap();
        assert_eq!(
            (dlq.queue.as_str(), dlq.region.as_deref()),
            ("audit-dlq", Some("r"))
        );
        assert!(
            SnsConfig::from_url("sns://events")
                .unwrap()
                .dead_letter_queue()
                .is_err()
        );
        assert!(matches!(
            sqs.with_subscription("x"),
            Err(Error::Unsupported { .. })
        ));
    }
}
