//! [`ServiceBusSubscriber`]: one or more receivers, each a task on a client thread of its
//! own that receives and settles (see [`crate::receiver`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use azservicebus::{
    ServiceBusReceiveMode, ServiceBusReceiverOptions, ServiceBusSessionReceiverOptions, SubQueue,
};
use cloudbus_core::driver::check_receive_max;
use cloudbus_core::{Delivery, Destination, Error, Result, Subscriber};
use tokio::sync::{mpsc, oneshot};

use crate::TRANSPORT;
use crate::client_thread::on_client_thread;
use crate::config::{ReceiveMode, ServiceBusConfig};
use crate::credentials::{Client, client, connection};
use crate::error::{closed, map_error};
use crate::receiver::{Command, ReceiverTask, Receivers};
use crate::sessions::accept_sessions;

/// Receives from a Service Bus queue, subscription or dead-letter queue, through
/// `receivers` receivers (each a link on a connection and client thread of its own).
pub struct ServiceBusSubscriber {
    receivers: Vec<ReceiverHandle>,
    destination: Destination,
    closed: AtomicBool,
}

/// One receiver's task, which settles what it received.
struct ReceiverHandle {
    commands: mpsc::Sender<Command>,
    /// Receive calls given to this receiver and not answered yet.
    receiving: AtomicUsize,
}

/// Most receivers per subscriber: each is a connection and a thread.
pub const MAX_RECEIVERS: usize = 32;

impl ServiceBusSubscriber {
    /// Connects to the queue, subscription or dead-letter queue `config` names.
    pub async fn connect(config: &ServiceBusConfig) -> Result<Self> {
        if config.receivers == 0 || config.receivers > MAX_RECEIVERS {
            return Err(Error::config(format!(
                "`receivers={}`: a subscriber opens 1 to {MAX_RECEIVERS} receivers (each a \
                 connection of its own); use 1 unless one receiver cannot keep up",
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
        let opened =
            futures::future::join_all((0..config.receivers).map(|_| open_receiver(config))).await;
        let mut receivers = Vec::with_capacity(opened.len());
        let mut failure = None;
        for outcome in opened {
            match outcome {
                Ok(commands) => receivers.push(ReceiverHandle {
                    commands,
                    receiving: AtomicUsize::new(0),
                }),
                Err(error) => failure = failure.or(Some(error)),
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
        let subscriber = ServiceBusSubscriber {
            receivers,
            destination,
            closed: AtomicBool::new(false),
        };
        match failure {
            None => Ok(subscriber),
            Some(error) => {
                subscriber.close().await?;
                Err(error)
            }
        }
    }
}

/// Starts one receiver's task on a client thread of its own; its command channel.
async fn open_receiver(config: &ServiceBusConfig) -> Result<mpsc::Sender<Command>> {
    let (commands, incoming) = mpsc::channel(256);
    let weak = commands.downgrade();
    let config = config.clone();
    on_client_thread(move || async move {
        let (client, receivers) = open_receivers(&config).await?;
        Ok(ReceiverTask::new(config, client, receivers, weak).run(incoming))
    })
    .await?;
    Ok(commands)
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

/// Connects and opens the receiver (or, for sessions, starts the session accepter).
pub(crate) async fn open_receivers(
    config: &ServiceBusConfig,
) -> Result<(Option<Client>, Receivers)> {
    let connection = connection(config)?;
    let client = client(&connection).await?;
    let receive_mode = match config.receive_mode {
        ReceiveMode::PeekLock => ServiceBusReceiveMode::PeekLock,
        ReceiveMode::ReceiveAndDelete => ServiceBusReceiveMode::ReceiveAndDelete,
    };
    let path = config.path();
    let mut client = Some(client);
    let receivers = if config.uses_sessions() && !config.dead_letter {
        let (found, accepted) = mpsc::channel(1);
        let (want, wanted) = mpsc::channel(1);
        let accepter = tokio::spawn(accept_sessions(
            client.take(),
            config.entity.clone(),
            config.subscription.clone(),
            config.session.clone(),
            ServiceBusSessionReceiverOptions {
                prefetch_count: config.prefetch,
                receive_mode,
                identifier: None,
            },
            wanted,
            found,
        ));
        Receivers::Sessions {
            want,
            requested: false,
            accepted,
            accepter,
            pinned: config.session.is_some(),
            current: None,
            draining: Vec::new(),
        }
    } else {
        let options = ServiceBusReceiverOptions {
            prefetch_count: config.prefetch,
            receive_mode,
            identifier: None,
            sub_queue: if config.dead_letter {
                SubQueue::DeadLetter
            } else {
                SubQueue::None
            },
        };
        let Some(client) = client.as_mut() else {
            return Err(closed("subscriber"));
        };
        let receiver = match &config.subscription {
            Some(s) => {
                client
                    .create_receiver_for_subscription(config.entity.clone(), s.clone(), options)
                    .await
            }
            None => {
                client
                    .create_receiver_for_queue(config.entity.clone(), options)
                    .await
            }
        }
        .map_err(|e| map_error("create receiver", &e, entity_kind(config), &path))?;
        Receivers::Plain(Box::new(receiver))
    };
    Ok((client, receivers))
}

pub(crate) fn entity_kind(config: &ServiceBusConfig) -> &'static str {
    if config.subscription.is_some() {
        "subscription"
    } else {
        "queue"
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
        Ok(())
    }

    /// One receive at a time per receiver (`receivers` in the configuration).
    fn concurrent_receives(&self) -> usize {
        self.receivers.len()
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
