//! The harness of the in-memory transport: the reference every other harness copies.

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::config::Start;
use cloudbus_core::driver::TransportConfig;
use cloudbus_core::memory::{MemoryConfig, MemorySubscriber};
use cloudbus_core::{Result, message};

use super::{Entity, Features, Harness, Spec, Support};

/// Runs the suite on `memory://`, as a queue or as a topic with two subscriptions.
#[derive(Debug, Clone)]
pub struct MemoryHarness {
    subscriptions: usize,
}

impl MemoryHarness {
    /// Entities are queues.
    pub fn queue() -> Self {
        MemoryHarness { subscriptions: 0 }
    }

    /// Entities are topics with two subscriptions.
    pub fn topic() -> Self {
        MemoryHarness { subscriptions: 2 }
    }

    /// The subscription names of an entity: none for a queue.
    fn names(&self) -> Vec<Option<String>> {
        if self.subscriptions == 0 {
            vec![None]
        } else {
            (1..=self.subscriptions)
                .map(|i| Some(format!("sub{i}")))
                .collect()
        }
    }
}

/// An entity on `base`: its queue, or each of its subscriptions, with dead-letter queues.
fn entity(base: &MemoryConfig, names: Vec<Option<String>>) -> Entity {
    let subscriber = |subscription: Option<String>, dead_letter: bool| {
        let mut config = base.clone();
        config.subscription = subscription;
        config.dead_letter = dead_letter;
        config
    };
    names
        .into_iter()
        .fold(Entity::new(base.clone()), |entity, name| {
            entity.with_subscriber(subscriber(name.clone(), false), subscriber(name, true))
        })
}

#[async_trait]
impl Harness for MemoryHarness {
    fn features(&self) -> Features {
        Features {
            fan_out: if self.subscriptions > 1 {
                Support::Yes
            } else {
                Support::No("a memory queue has no subscriptions; the topic harness covers fan-out")
            },
            replay: if self.subscriptions > 0 {
                Support::Yes
            } else {
                Support::No("a memory queue keeps no log; topics do (the topic harness)")
            },
            max_message_size: MemoryConfig::default().max_message_size,
            unit: Duration::from_millis(200),
            spurious_redeliveries: false,
            ..Features::default()
        }
    }

    async fn create(&self, spec: &Spec) -> Result<Entity> {
        let mut base = MemoryConfig::new(format!("conformance-{}", message::new_id()));
        base.visibility = spec.visibility;
        base.max_deliveries = spec.max_deliveries;
        // Subscriptions exist from when they are first opened: open them now, as a
        // deployment creates them before anyone publishes.
        for name in self.names().into_iter().flatten() {
            let mut subscription = base.clone();
            subscription.subscription = Some(name);
            MemorySubscriber::connect(&subscription).await?;
        }
        if spec.replay {
            // A subscription of its own that replays the topic's log, created when the
            // case first opens it (a queue refuses it).
            let replay = base.with_start(Start::Earliest)?;
            let name = (self.subscriptions > 0).then(|| "replay".to_string());
            if name.is_none() {
                MemorySubscriber::connect(&replay).await?;
            }
            return Ok(entity(&replay, vec![name]));
        }
        Ok(entity(&base, self.names()))
    }

    async fn missing(&self) -> Result<Entity> {
        let mut missing = MemoryConfig::new(format!("missing-{}", message::new_id()));
        missing.create = false;
        let name = (self.subscriptions > 0).then(|| "sub1".to_string());
        Ok(entity(&missing, vec![name]))
    }
}
