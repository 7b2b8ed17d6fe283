//! The harness of Service Bus against the project's emulator: a queue, a topic with two
//! subscriptions, a session-enabled queue (ordering keys), and a queue read through several
//! receivers (`receivers=3`). Each test starts its own emulator on a loopback address of
//! its own, port 5672 (the azservicebus client always dials 5672).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use cloudbus_azure::ServiceBusConfig;
use cloudbus_core::driver::TransportConfig;
use cloudbus_testkit::{Entity, FaultHarness, Features, Harness, Spec, Support};

use crate::emulator::{config, start_emulator};
use servicebus_emulator::{
    Emulator, EmulatorHandle, EntityProperties, QueueConfig, SubscriptionConfig, TopicConfig,
    Topology,
};

#[derive(Clone, Copy, PartialEq)]
pub enum Kind {
    Queue,
    Topic,
    Sessions,
    /// A queue whose subscribers open three receivers.
    Receivers,
}

pub struct ServiceBusHarness {
    kind: Kind,
    emulator: Mutex<Option<EmulatorHandle>>,
}

impl ServiceBusHarness {
    pub fn new(kind: Kind) -> Self {
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
            replay: Support::No("Service Bus keeps no log of delivered messages"),
            max_message_size: ServiceBusConfig::default().max_message_size,
            unit: Duration::from_secs(1),
            ..Features::default()
        }
    }

    async fn create(&self, spec: &Spec) -> cloudbus_core::Result<Entity> {
        let connection_string = self.connection_string().await;
        let name = format!("cb-{}", cloudbus_core::message::new_id());
        let properties = EntityProperties {
            lock_duration: spec.visibility,
            max_delivery_count: spec.max_deliveries,
            requires_session: self.kind == Kind::Sessions,
            ..EntityProperties::default()
        };
        let mut base = config(&connection_string, &name);
        if spec.replay {
            base = base.with_start(cloudbus_core::config::Start::Earliest)?;
        }
        base.sessions = self.kind == Kind::Sessions;
        base.receivers = if self.kind == Kind::Receivers { 3 } else { 1 };
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
                    .map(|s| {
                        base.with_subscription(s)
                            .expect("a topic has subscriptions")
                    })
                    .collect()
            }
        };
        Ok(subscribers
            .into_iter()
            .fold(Entity::new(base), |entity, subscriber| {
                let dead_letters = subscriber
                    .dead_letter_queue()
                    .expect("every queue and subscription has one");
                entity.with_subscriber(subscriber, dead_letters)
            }))
    }

    async fn missing(&self) -> cloudbus_core::Result<Entity> {
        let connection_string = self.connection_string().await;
        let missing = config(
            &connection_string,
            &format!("missing-{}", cloudbus_core::message::new_id()),
        );
        let mut subscriber = missing.clone();
        subscriber.subscription = (self.kind == Kind::Topic).then(|| "sub1".to_string());
        Ok(Entity::new(missing).with_subscriber(subscriber.clone(), subscriber))
    }
}

/// The fault suite's view of a queue harness: an emulator on a port of its own, reached
/// through the fault proxy.
#[async_trait]
impl FaultHarness for ServiceBusHarness {
    fn transport(&self) -> &'static str {
        "servicebus"
    }

    async fn broker(&self, _proxy_port: u16) -> cloudbus_core::Result<SocketAddr> {
        let handle = Emulator::start(SocketAddr::from(([127, 0, 0, 1], 0)), Topology::default())
            .await
            .map_err(|e| cloudbus_core::Error::config(format!("start the emulator: {e}")))?;
        let addr = handle.local_addr();
        *self.emulator.lock().expect("lock") = Some(handle);
        Ok(addr)
    }

    async fn create_at(
        &self,
        spec: &Spec,
        name: &str,
        addr: SocketAddr,
    ) -> cloudbus_core::Result<Entity> {
        let properties = EntityProperties {
            lock_duration: spec.visibility,
            max_delivery_count: spec.max_deliveries,
            ..EntityProperties::default()
        };
        self.with_emulator(|e| {
            e.create_queue(QueueConfig {
                name: name.to_string(),
                properties,
            })
        })
        .expect("create queue");
        self.entity_at(spec, name, addr)
    }

    fn entity_at(
        &self,
        _spec: &Spec,
        name: &str,
        addr: SocketAddr,
    ) -> cloudbus_core::Result<Entity> {
        let mut queue = config(&servicebus_emulator::connection_string(addr), name);
        queue.publish_timeout = self.publish_timeout();
        let dead_letters = queue.dead_letter_queue()?;
        Ok(Entity::new(queue.clone()).with_subscriber(queue, dead_letters))
    }

    fn outage(&self) -> Duration {
        // Longer than the publish timeout below; the AMQP idle timeout is longer still, so
        // the connections survive the stall (and are reconnected where they do not).
        Duration::from_secs(12)
    }

    fn publish_timeout(&self) -> Duration {
        Duration::from_secs(5)
    }
}
