//! The harness of the in-memory transport: the reference every other harness copies.

use std::time::Duration;

use async_trait::async_trait;

use super::{Entity, Features, Harness, Spec, Support};
use crate::config::{Config, MemoryConfig};
use crate::{Result, message};

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
            ordering: Support::Yes,
            delayed_delivery: Support::Yes,
            time_to_live: Support::Yes,
            max_message_size: MemoryConfig::default().max_message_size,
            unit: Duration::from_millis(200),
        }
    }

    async fn create(&self, spec: &Spec) -> Result<Entity> {
        let base = MemoryConfig {
            entity: format!("conformance-{}", message::new_id()),
            visibility: spec.visibility,
            max_deliveries: spec.max_deliveries,
            ..MemoryConfig::default()
        };
        let subscriber = |subscription: Option<String>, dead_letter: bool| {
            Config::Memory(MemoryConfig {
                subscription,
                dead_letter,
                ..base.clone()
            })
        };
        let names: Vec<Option<String>> = if self.subscriptions == 0 {
            vec![None]
        } else {
            (1..=self.subscriptions)
                .map(|i| Some(format!("sub{i}")))
                .collect()
        };
        let entity = Entity {
            publisher: Config::Memory(base.clone()),
            subscribers: names.iter().map(|n| subscriber(n.clone(), false)).collect(),
            dead_letters: names.iter().map(|n| subscriber(n.clone(), true)).collect(),
        };
        // Subscriptions exist from when they are first opened: open them now, as a
        // deployment creates them before anyone publishes.
        for config in &entity.subscribers {
            crate::connect_subscriber(config).await?;
        }
        Ok(entity)
    }

    async fn missing(&self) -> Result<Entity> {
        let missing = MemoryConfig {
            entity: format!("missing-{}", message::new_id()),
            create: false,
            ..MemoryConfig::default()
        };
        let subscriber = Config::Memory(MemoryConfig {
            subscription: (self.subscriptions > 0).then(|| "sub1".to_string()),
            ..missing.clone()
        });
        Ok(Entity {
            publisher: Config::Memory(missing),
            subscribers: vec![subscriber.clone()],
            dead_letters: vec![subscriber],
        })
    }
}
