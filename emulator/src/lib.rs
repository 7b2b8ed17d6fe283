//! A Docker-free Azure Service Bus emulator speaking AMQP 1.0.
//!
//! Start an emulator on an address with a [`Topology`], point a Service Bus
//! client at [`EmulatorHandle::connection_string`], and shut it down when done:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use servicebus_emulator::{Emulator, QueueConfig, Topology};
//!
//! let topology = Topology { queues: vec![QueueConfig::new("orders")], ..Default::default() };
//! let emulator = Emulator::start("127.0.0.1:5672", topology).await?;
//! println!("{}", emulator.connection_string());
//! emulator.create_queue(QueueConfig::new("created-later"))?;
//! emulator.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! The server is written here on tokio (connection, session and link state
//! machines); `serde_amqp` and `fe2o3-amqp-types` encode and decode frames.

#![warn(missing_docs)]

pub mod broker;
pub mod cbs;
pub mod codec;
pub mod config;
pub mod connection;
pub mod filters;
pub mod link;
pub mod management;
pub mod message;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, ToSocketAddrs};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use broker::{Broker, BrokerError};
pub use config::{
    ConfigError, CorrelationFilter, EntityProperties, Filter, QueueConfig, Rule,
    SubscriptionConfig, TopicConfig, Topology,
};
pub use connection::ConnectionOptions;

/// Errors starting an emulator.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The address could not be bound.
    #[error("cannot listen: {0}")]
    Bind(#[from] std::io::Error),
    /// The topology is invalid.
    #[error("invalid topology: {0}")]
    Topology(#[from] BrokerError),
}

/// Entry point: see [`Emulator::start`].
#[derive(Debug)]
pub struct Emulator;

impl Emulator {
    /// Listen on `addr` with the given topology and default connection options.
    pub async fn start(
        addr: impl ToSocketAddrs,
        topology: Topology,
    ) -> Result<EmulatorHandle, StartError> {
        Self::start_with(addr, topology, ConnectionOptions::default()).await
    }

    /// Listen on `addr` with the given topology and connection options.
    pub async fn start_with(
        addr: impl ToSocketAddrs,
        topology: Topology,
        options: ConnectionOptions,
    ) -> Result<EmulatorHandle, StartError> {
        let broker = Arc::new(Broker::new(&topology)?);
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let opts = Arc::new(options);
        let task = tokio::spawn(run(listener, broker.clone(), opts, shutdown_rx));
        tracing::info!(address = %local_addr, "Service Bus emulator listening");
        Ok(EmulatorHandle {
            local_addr,
            broker,
            shutdown: shutdown_tx,
            task,
        })
    }
}

async fn run(
    listener: TcpListener,
    broker: Arc<Broker>,
    opts: Arc<ConnectionOptions>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    let sweeper = {
        let broker = broker.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                broker.sweep();
            }
        })
    };
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    next_id += 1;
                    tracing::debug!(connection = next_id, %peer, "accepted");
                    connections.spawn(connection::serve(stream, broker.clone(), opts.clone(), shutdown.clone(), next_id));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    // Give connections a moment to send their close frames.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.abort_all();
    sweeper.abort();
}

/// A running emulator.
#[derive(Debug)]
pub struct EmulatorHandle {
    local_addr: SocketAddr,
    broker: Arc<Broker>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl EmulatorHandle {
    /// The address the emulator listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A connection string for Service Bus clients (`UseDevelopmentEmulator=true`;
    /// the port is included unless it is 5672).
    pub fn connection_string(&self) -> String {
        connection_string(self.local_addr)
    }

    /// Create a queue at runtime.
    pub fn create_queue(&self, queue: QueueConfig) -> Result<(), BrokerError> {
        self.broker.create_queue(&queue)
    }

    /// Create a topic (with its subscriptions) at runtime.
    pub fn create_topic(&self, topic: TopicConfig) -> Result<(), BrokerError> {
        self.broker.create_topic(&topic)
    }

    /// Create a subscription on an existing topic at runtime.
    pub fn create_subscription(
        &self,
        topic: &str,
        subscription: SubscriptionConfig,
    ) -> Result<(), BrokerError> {
        self.broker.create_subscription(topic, &subscription)
    }

    /// Number of messages held by an entity path (e.g. `q`, `q/$DeadLetterQueue`,
    /// `t/Subscriptions/s`), in any state; `None` if there is no such entity.
    pub fn message_count(&self, entity: &str) -> Option<usize> {
        self.broker.message_count(entity)
    }

    /// Stop accepting, close every connection and wait for the server task.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// The connection string for an emulator listening on `addr` (an unspecified
/// address such as 0.0.0.0 is shown as `localhost`).
pub fn connection_string(addr: SocketAddr) -> String {
    let ip = addr.ip();
    let host = if ip.is_unspecified() {
        "localhost".to_string()
    } else if ip.is_ipv6() {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    let endpoint = if addr.port() == 5672 {
        host
    } else {
        format!("{host}:{}", addr.port())
    };
    format!(
        "Endpoint=sb://{endpoint};SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;"
    )
}

#[cfg(test)]
mod tests {
    use super::connection_string;

    #[test]
    fn connection_strings() {
        let cs = |a: &str| connection_string(a.parse().expect("socket address"));
        assert!(cs("127.0.0.1:5672").starts_with("Endpoint=sb://127.0.0.1;"));
        assert!(cs("127.0.0.1:5673").starts_with("Endpoint=sb://127.0.0.1:5673;"));
        assert!(cs("0.0.0.0:5672").starts_with("Endpoint=sb://localhost;"));
        assert!(cs("[::1]:5673").starts_with("Endpoint=sb://[::1]:5673;"));
        assert!(cs("[::1]:5672").starts_with("Endpoint=sb://[::1];"));
    }
}
