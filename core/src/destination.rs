//! [`Destination`]: what a publisher sends to or a subscriber receives from, as telemetry
//! names it.

/// The transport and entity that telemetry names: the OpenTelemetry `messaging.system`
/// and `messaging.destination.name` (with `messaging.destination.subscription.name` for
/// a subscription).
///
/// Every [`Publisher`](crate::Publisher) and [`Subscriber`](crate::Subscriber) reports its
/// own (`destination()`), so the [`Consumer`](crate::Consumer) and
/// [`TracingPublisher`](crate::consumer::TracingPublisher) name it without being told.
///
/// ```
/// # async fn run() -> cloudbus_core::Result<()> {
/// use cloudbus_core::Subscriber;
/// use cloudbus_core::memory::{MemoryConfig, MemorySubscriber};
///
/// let mut config = MemoryConfig::new("doc-events");
/// config.subscription = Some("audit".into());
/// let subscriber = MemorySubscriber::connect(&config).await?;
/// let destination = subscriber.destination();
/// assert_eq!((destination.system(), destination.name()), ("memory", "doc-events"));
/// assert_eq!(destination.subscription(), Some("audit"));
/// # Ok(())
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    system: String,
    name: String,
    subscription: Option<String>,
}

impl Destination {
    /// A destination: `system` as OpenTelemetry names it (`aws_sqs`, `aws.sns`,
    /// `servicebus`, `memory`), `name` the queue or topic.
    pub fn new(system: impl Into<String>, name: impl Into<String>) -> Self {
        Destination {
            system: system.into(),
            name: name.into(),
            subscription: None,
        }
    }

    /// The same destination, received through a subscription.
    pub fn with_subscription(mut self, subscription: impl Into<String>) -> Self {
        self.subscription = Some(subscription.into());
        self
    }

    /// `messaging.system`.
    pub fn system(&self) -> &str {
        &self.system
    }

    /// `messaging.destination.name`: the queue or topic.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `messaging.destination.subscription.name`, for a subscription.
    pub fn subscription(&self) -> Option<&str> {
        self.subscription.as_deref()
    }

    /// The `destination` label of metrics: `topic/subscription` or the queue's name.
    pub(crate) fn label(&self) -> String {
        match &self.subscription {
            Some(subscription) => format!("{}/{subscription}", self.name),
            None => self.name.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_the_subscription() {
        let queue = Destination::new("memory", "orders");
        assert_eq!(queue.label(), "orders");
        let subscription = Destination::new("memory", "events").with_subscription("audit");
        assert_eq!(subscription.label(), "events/audit");
        assert_eq!(subscription.subscription(), Some("audit"));
    }
}
