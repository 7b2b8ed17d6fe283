//! [`ServiceBusSubscriber`]: one or more receive links on one connection, each served by
//! a task of its own that receives and settles (see [`crate::receiver`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::driver::check_receive_max;
use cloudbus_core::{Delivery, Destination, Error, Result, Subscriber};
use tokio::sync::{mpsc, oneshot};

use crate::TRANSPORT;
use crate::config::{ReceiveMode, ServiceBusConfig};
use crate::credentials::namespace;
use crate::error::closed;
use crate::protocol::Connection;
use crate::protocol::management::Management;
use crate::receiver::{Command, ReceiverTask};

/// The most messages a receive call of the [`Consumer`](cloudbus_core::Consumer) asks for.
const RECEIVE_BATCH: usize = 100;

/// Receives from a Service Bus queue, subscription or dead-letter queue, through
/// `receivers` receive links on one connection.
pub struct ServiceBusSubscriber {
    connection: Connection,
    receivers: Vec<ReceiverHandle>,
    destination: Destination,
    closed: AtomicBool,
}

impl std::fmt::Debug for ServiceBusSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceBusSubscriber")
            .field("destination", &self.destination)
            .field("receivers", &self.receivers.len())
            .finish_non_exhaustive()
    }
}

/// One receive link's task, which settles what it received.
struct ReceiverHandle {
    commands: mpsc::Sender<Command>,
    /// Receive calls given to this receiver and not answered yet.
    receiving: AtomicUsize,
}

/// Most receive links per subscriber.
pub const MAX_RECEIVERS: usize = 32;

impl ServiceBusSubscriber {
    /// Connects to the queue, subscription or dead-letter queue `config` names.
    pub async fn connect(config: &ServiceBusConfig) -> Result<Self> {
        if config.receivers == 0 || config.receivers > MAX_RECEIVERS {
            return Err(Error::config(format!(
                "`receivers={}`: a subscriber opens 1 to {MAX_RECEIVERS} receive links; use 1 \
                 unless one link cannot keep up",
                config.receivers
            )));
        }
        if config.receivers > 1 && config.session.is_some() && !config.dead_letter {
            return Err(Error::config(format!(
                "`receivers={}` with `session`: only one receiver at a time can hold a \
                 session's lock; use receivers=1, or leave `session` out to take sessions \
                 as they come",
                config.receivers
            )));
        }
        let connection = Connection::open(namespace(config)?, "subscriber").await?;
        let management = Arc::new(Management::new(connection.clone(), config.receive_path()));
        let mut receivers = Vec::with_capacity(config.receivers);
        for _ in 0..config.receivers {
            let (commands, incoming) = mpsc::channel(256);
            let mut task = ReceiverTask::new(
                config,
                connection.clone(),
                management.clone(),
                commands.downgrade(),
            );
            if let Err(error) = task.open().await {
                connection.close().await;
                return Err(error);
            }
            tokio::spawn(task.run(incoming));
            receivers.push(ReceiverHandle {
                commands,
                receiving: AtomicUsize::new(0),
            });
        }
        if config.receive_mode == ReceiveMode::PeekLock {
            // Lock renewals go through it: attach it before the first one is due.
            if let Err(error) = management.open().await {
                tracing::debug!(messaging.system = "servicebus", %error, "cannot attach the management link yet; it is attached when first needed");
            }
        }
        let name = if config.dead_letter {
            format!(
                "{}{}",
                config.entity,
                cloudbus_core::config::DEAD_LETTER_SUFFIX
            )
        } else {
            config.entity.clone()
        };
        let mut destination = Destination::new(TRANSPORT, name);
        if let Some(subscription) = &config.subscription {
            destination = destination.with_subscription(subscription.clone());
        }
        Ok(ServiceBusSubscriber {
            connection,
            receivers,
            destination,
            closed: AtomicBool::new(false),
        })
    }
}

/// Counts a receive call against its receiver until the call ends or is dropped.
struct Receiving<'a>(&'a AtomicUsize);

impl<'a> Receiving<'a> {
    fn start(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Receiving(count)
    }
}

impl Drop for Receiving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[async_trait]
impl Subscriber for ServiceBusSubscriber {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(closed("subscriber"));
        }
        check_receive_max(TRANSPORT, max)?;
        // The receiver with the fewest receive calls waiting: each serves one at a time.
        let receiver = self
            .receivers
            .iter()
            .min_by_key(|r| r.receiving.load(Ordering::Acquire))
            .ok_or_else(|| closed("subscriber"))?;
        let _receiving = Receiving::start(&receiver.receiving);
        let (reply, outcome) = oneshot::channel();
        receiver
            .commands
            .send(Command::Receive { max, wait, reply })
            .await
            .map_err(|_| closed("subscriber"))?;
        outcome.await.unwrap_or_else(|_| Err(closed("subscriber")))
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let closes = self.receivers.iter().map(|receiver| async move {
            let (reply, done) = oneshot::channel();
            if receiver.commands.send(Command::Close(reply)).await.is_ok() {
                let _ = done.await;
            }
        });
        futures::future::join_all(closes).await;
        self.connection.close().await;
        Ok(())
    }

    /// One receive at a time per receive link (`receivers` in the configuration).
    fn concurrent_receives(&self) -> usize {
        self.receivers.len()
    }

    /// A receive call grants its link credit for all it asks, and the broker streams them.
    fn receive_batch(&self) -> usize {
        RECEIVE_BATCH
    }

    fn destination(&self) -> Destination {
        self.destination.clone()
    }
}

#[cfg(test)]
mod tests {
    use cloudbus_core::driver::TransportConfig;

    use super::*;

    #[tokio::test]
    async fn receivers_out_of_range_or_with_a_pinned_session_are_config_errors() {
        for (url, expected) in [
            ("servicebus://q?receivers=0", "1 to 32"),
            ("servicebus://q?receivers=33", "1 to 32"),
            (
                "servicebus://q?sessions=true&session=s1&receivers=2",
                "only one receiver at a time can hold a session",
            ),
        ] {
            // Refused before any connection is attempted (no broker listens here).
            let error = ServiceBusSubscriber::connect(&servicebus_config(url))
                .await
                .err()
                .unwrap_or_else(|| panic!("{url}: connected"));
            assert!(matches!(error, Error::Config { .. }), "{url}: {error:?}");
            assert!(error.to_string().contains(expected), "{url}: {error}");
        }
    }

    fn servicebus_config(url: &str) -> ServiceBusConfig {
        ServiceBusConfig::from_url(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }
}
