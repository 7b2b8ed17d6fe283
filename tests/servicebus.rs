//! The conformance suite on Azure Service Bus, against the project's emulator: a queue, a
//! topic with two subscriptions, a session-enabled queue (ordering keys), and a queue read
//! through several receivers (`receivers=3`). Each test
//! starts its own emulator on a loopback address of its own, port 5672 (the azservicebus
//! client always dials 5672).

mod common;

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use cloudbus::config::{Config, ServiceBusConfig};
use cloudbus::testkit::{Entity, Features, Harness, Spec, Support};
use common::{config, start_emulator};
use servicebus_emulator::{
    EmulatorHandle, EntityProperties, QueueConfig, SubscriptionConfig, TopicConfig,
};

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Queue,
    Topic,
    Sessions,
    /// A queue whose subscribers open three receivers.
    Receivers,
}

struct ServiceBusHarness {
    kind: Kind,
    emulator: Mutex<Option<EmulatorHandle>>,
}

impl ServiceBusHarness {
    fn new(kind: Kind) -> Self {
        ServiceBusHarness {
            kind,
            emulator: Mutex::new(None),
        }
    }

    async fn connection_string(&self) -> String {
        if let Some(handle) = self.emulator.lock().expect("lock").as_ref() {
            return handle.connection_string();
        }
        let handle = start_emulator().await;
        let connection_string = handle.connection_string();
        *self.emulator.lock().expect("lock") = Some(handle);
        connection_string
    }

    fn with_emulator<T>(&self, f: impl FnOnce(&EmulatorHandle) -> T) -> T {
        f(self
            .emulator
            .lock()
            .expect("lock")
            .as_ref()
            .expect("emulator started"))
    }
}

#[async_trait]
impl Harness for ServiceBusHarness {
    fn features(&self) -> Features {
        Features {
            fan_out: if self.kind == Kind::Topic {
                Support::Yes
            } else {
                Support::No("a queue has no subscriptions; the topic harness covers fan-out")
            },
            ordering: if self.kind == Kind::Sessions {
                Support::Yes
            } else {
                Support::No("ordering keys need a session-enabled entity (the sessions harness)")
            },
            delayed_delivery: Support::Yes,
            time_to_live: Support::Yes,
            max_message_size: 256 * 1024,
            unit: Duration::from_secs(1),
        }
    }

    async fn create(&self, spec: &Spec) -> cloudbus::Result<Entity> {
        let connection_string = self.connection_string().await;
        let name = format!("cb-{}", cloudbus::message::new_id());
        let properties = EntityProperties {
            lock_duration: spec.visibility,
            max_delivery_count: spec.max_deliveries,
            requires_session: self.kind == Kind::Sessions,
            ..EntityProperties::default()
        };
        let base = ServiceBusConfig {
            sessions: self.kind == Kind::Sessions,
            receivers: if self.kind == Kind::Receivers { 3 } else { 1 },
            ..config(&connection_string, &name)
        };
        let subscribers: Vec<ServiceBusConfig> = match self.kind {
            Kind::Queue | Kind::Sessions | Kind::Receivers => {
                self.with_emulator(|e| {
                    e.create_queue(QueueConfig {
                        name: name.clone(),
                        properties: properties.clone(),
                    })
                })
                .expect("create queue");
                vec![base.clone()]
            }
            Kind::Topic => {
                let subscriptions = ["sub1", "sub2"];
                self.with_emulator(|e| {
                    e.create_topic(TopicConfig::new(
                        name.clone(),
                        subscriptions
                            .iter()
                            .map(|s| SubscriptionConfig {
                                properties: properties.clone(),
                                ..SubscriptionConfig::new(*s)
                            })
                            .collect(),
                    ))
                })
                .expect("create topic");
                subscriptions
                    .iter()
                    .map(|s| ServiceBusConfig {
                        subscription: Some(s.to_string()),
                        ..base.clone()
                    })
                    .collect()
            }
        };
        Ok(Entity {
            publisher: Config::ServiceBus(base.clone()),
            dead_letters: subscribers
                .iter()
                .map(|c| {
                    Config::ServiceBus(ServiceBusConfig {
                        dead_letter: true,
                        sessions: false,
                        ..c.clone()
                    })
                })
                .collect(),
            subscribers: subscribers.into_iter().map(Config::ServiceBus).collect(),
        })
    }

    async fn missing(&self) -> cloudbus::Result<Entity> {
        let connection_string = self.connection_string().await;
        let missing = config(
            &connection_string,
            &format!("missing-{}", cloudbus::message::new_id()),
        );
        let subscriber = ServiceBusConfig {
            subscription: (self.kind == Kind::Topic).then(|| "sub1".to_string()),
            ..missing.clone()
        };
        Ok(Entity {
            publisher: Config::ServiceBus(missing),
            subscribers: vec![Config::ServiceBus(subscriber.clone())],
            dead_letters: vec![Config::ServiceBus(subscriber)],
        })
    }
}

mod queue {
    cloudbus::conformance_tests!(super::ServiceBusHarness::new(super::Kind::Queue));
}

mod topic {
    cloudbus::conformance_tests!(super::ServiceBusHarness::new(super::Kind::Topic));
}

/// The session-enabled queue (ordering keys become session ids).
mod sessions {
    cloudbus::conformance_tests!(super::ServiceBusHarness::new(super::Kind::Sessions));
}

/// A queue read through three receivers, each on a connection of its own.
mod receivers {
    cloudbus::conformance_tests!(super::ServiceBusHarness::new(super::Kind::Receivers));
}

mod consumer_queue {
    cloudbus::consumer_tests!(super::ServiceBusHarness::new(super::Kind::Queue));
}

mod consumer_topic {
    cloudbus::consumer_tests!(super::ServiceBusHarness::new(super::Kind::Topic));
}

mod consumer_receivers {
    cloudbus::consumer_tests!(super::ServiceBusHarness::new(super::Kind::Receivers));
}

/// 10,000 messages through one cloudbus subscriber: none lost, every queued message
/// delivered and completed once, none left behind. (A publish retried after a failed
/// first attempt may queue a copy: at-least-once allows that, so the copies are counted and
/// must be consumed too.)
#[test]
fn soak_10000_messages_through_one_subscriber() {
    cloudbus::testkit::run(async {
        let emulator = start_emulator().await;
        emulator
            .create_queue(QueueConfig::new("soak"))
            .expect("queue");
        let queue = Config::ServiceBus(config(&emulator.connection_string(), "soak"));
        let publisher = cloudbus::connect_publisher(&queue)
            .await
            .expect("publisher");
        let messages: Vec<cloudbus::Message> = (0..10_000)
            .map(|i| cloudbus::Message::new(format!("soak {i}")))
            .collect();
        let sent: std::collections::HashSet<String> =
            messages.iter().map(|m| m.id.clone()).collect();
        for chunk in messages.chunks(500) {
            for outcome in publisher.publish_batch(chunk.to_vec()).await {
                outcome.expect("publish");
            }
        }
        let queued = emulator.message_count("soak").expect("queue exists");
        assert!(
            queued >= sent.len() && queued < sent.len() + 500,
            "{queued} queued for {} published (copies come from one retried batch at most)",
            sent.len()
        );
        let subscriber = cloudbus::connect_subscriber(&queue)
            .await
            .expect("subscriber");
        let mut seen = std::collections::HashSet::new();
        let mut delivered = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(240);
        while delivered < queued {
            assert!(
                std::time::Instant::now() < deadline,
                "stuck after {delivered} of {queued} deliveries ({} of {} ids)",
                seen.len(),
                sent.len()
            );
            for delivery in subscriber
                .receive(10, Duration::from_secs(2))
                .await
                .expect("receive")
            {
                assert_eq!(delivery.delivery_count(), 1, "redelivered: {delivery:?}");
                seen.insert(delivery.message().id.clone());
                delivered += 1;
                delivery.ack().await.expect("ack");
            }
        }
        assert_eq!(seen, sent, "every message");
        // azservicebus's complete returns once its disposition is sent, not when the broker
        // has applied it (under load the emulator lags by some milliseconds): wait for it.
        let settling = std::time::Instant::now() + Duration::from_secs(10);
        while emulator.message_count("soak") != Some(0) && std::time::Instant::now() < settling {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            emulator.message_count("soak"),
            Some(0),
            "nothing left behind"
        );
        emulator.shutdown().await;
    });
}
