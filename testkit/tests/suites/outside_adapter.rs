//! An adapter written outside the cloudbus crates, the way a third party writes one: its
//! own configuration type, publisher and subscriber (thin wrappers over the memory
//! transport here), and a harness; the public testkit runs the whole conformance suite on
//! it.

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::driver::Connect;
use cloudbus_core::memory::{MemoryConfig, MemoryInspector, MemoryPublisher, MemorySubscriber};
use cloudbus_core::{
    Delivery, Destination, Error, Inspector, Message, Publisher, Result, Subscriber, message,
};
use cloudbus_testkit::{Entity, Features, Harness, Spec, Support};

/// The adapter's configuration: which queue, and whether it is the dead-letter queue.
#[derive(Debug, Clone)]
struct WrappedConfig(MemoryConfig);

#[async_trait]
impl Connect for WrappedConfig {
    async fn connect_publisher(&self) -> Result<Box<dyn Publisher>> {
        Ok(Box::new(WrappedPublisher(
            MemoryPublisher::connect(&self.0).await?,
        )))
    }

    async fn connect_subscriber(&self) -> Result<Box<dyn Subscriber>> {
        Ok(Box::new(WrappedSubscriber(
            MemorySubscriber::connect(&self.0).await?,
        )))
    }

    async fn connect_inspector(&self) -> Result<Box<dyn Inspector>> {
        Ok(Box::new(MemoryInspector::connect(&self.0).await?))
    }
}

struct WrappedPublisher(MemoryPublisher);

#[async_trait]
impl Publisher for WrappedPublisher {
    async fn publish(&self, message: Message) -> Result<String> {
        self.0.publish(message).await
    }

    async fn close(&self) -> Result<()> {
        self.0.close().await
    }

    fn destination(&self) -> Destination {
        Destination::new("wrapped", self.0.destination().name())
    }
}

struct WrappedSubscriber(MemorySubscriber);

#[async_trait]
impl Subscriber for WrappedSubscriber {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        self.0.receive(max, wait).await
    }

    async fn close(&self) -> Result<()> {
        self.0.close().await
    }

    fn destination(&self) -> Destination {
        Destination::new("wrapped", self.0.destination().name())
    }
}

/// Fresh queues of the wrapped adapter.
struct WrappedHarness;

fn config(name: &str, create: bool, dead_letter: bool, spec: Option<&Spec>) -> WrappedConfig {
    let mut config = MemoryConfig::new(name);
    config.create = create;
    config.dead_letter = dead_letter;
    if let Some(spec) = spec {
        config.visibility = spec.visibility;
        config.max_deliveries = spec.max_deliveries;
    }
    WrappedConfig(config)
}

#[async_trait]
impl Harness for WrappedHarness {
    fn features(&self) -> Features {
        Features {
            fan_out: Support::No("the wrapped adapter serves queues only"),
            replay: Support::No("the wrapped adapter serves queues only, and queues keep no log"),
            unit: Duration::from_millis(200),
            spurious_redeliveries: false,
            ..Features::default()
        }
    }

    async fn create(&self, spec: &Spec) -> Result<Entity> {
        let name = format!("wrapped-{}", message::new_id());
        if spec.replay {
            return Err(Error::Unsupported {
                transport: "wrapped",
                feature: "replay: the wrapped adapter serves queues, which keep no log".into(),
            });
        }
        Ok(
            Entity::new(config(&name, true, false, Some(spec))).with_subscriber(
                config(&name, true, false, Some(spec)),
                config(&name, true, true, Some(spec)),
            ),
        )
    }

    async fn missing(&self) -> Result<Entity> {
        let name = format!("missing-{}", message::new_id());
        Ok(
            Entity::new(config(&name, false, false, None)).with_subscriber(
                config(&name, false, false, None),
                config(&name, false, true, None),
            ),
        )
    }
}

cloudbus_testkit::conformance_tests!(WrappedHarness);
