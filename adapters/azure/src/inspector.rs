//! Looking into a queue, a subscription or a dead-letter queue: peek, through the
//! broker's `peek-message` operation (nothing is locked, no delivery is counted). Service
//! Bus reports counts only through its management REST API, which cloudbus does not call.

use async_trait::async_trait;
use azservicebus::ServiceBusReceiver;
use cloudbus_core::inspector::{Inspector, Peeked, Stats};
use cloudbus_core::{Destination, Error, Result};
use tokio::sync::{mpsc, oneshot};

use crate::TRANSPORT;
use crate::client_thread::on_client_thread;
use crate::config::{ReceiveMode, ServiceBusConfig};
use crate::error::{closed, map_error};
use crate::mapping::from_servicebus;
use crate::receiver::Receivers;
use crate::subscriber::{entity_kind, open_receivers};

/// Why the counts are missing.
const NO_COUNTS: &str = "Service Bus reports counts only through its management REST API \
                         (`az servicebus queue show`, the portal, Service Bus Explorer), which \
                         cloudbus does not call; `cloudbus peek` shows the messages";

/// A request to the inspector's client thread.
enum Request {
    Peek(usize, oneshot::Sender<Result<Vec<Peeked>>>),
    Close(oneshot::Sender<()>),
}

/// Looks into a Service Bus queue, subscription or dead-letter queue.
pub struct ServiceBusInspector {
    requests: mpsc::Sender<Request>,
    destination: Destination,
}

impl ServiceBusInspector {
    /// Opens an inspector (a receive link that only peeks) on what `config` names.
    /// A session-enabled entity's messages are peeked through one session: set `session`.
    pub async fn connect(config: &ServiceBusConfig) -> Result<Self> {
        if config.uses_sessions() && !config.dead_letter {
            return Err(Error::Unsupported {
                transport: TRANSPORT,
                feature: format!(
                    "peek across the sessions of `{}`: Service Bus peeks a session-enabled \
                     entity one session at a time; peek its dead-letter queue, or receive",
                    config.path()
                ),
            });
        }
        let config = ServiceBusConfig {
            receive_mode: ReceiveMode::PeekLock,
            prefetch: 0,
            ..config.clone()
        };
        let destination = Destination::new(TRANSPORT, config.path());
        let (requests, incoming) = mpsc::channel(8);
        on_client_thread(move || async move {
            let (client, receivers) = open_receivers(&config).await?;
            let Receivers::Plain(receiver) = receivers else {
                return Err(closed("inspector"));
            };
            Ok(serve(config, client, *receiver, incoming))
        })
        .await?;
        Ok(ServiceBusInspector {
            requests,
            destination,
        })
    }

    async fn ask<T>(&self, request: impl FnOnce(oneshot::Sender<T>) -> Request) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(request(reply))
            .await
            .map_err(|_| closed("inspector"))?;
        answer.await.map_err(|_| closed("inspector"))
    }
}

/// The client thread's loop: one request at a time.
async fn serve(
    config: ServiceBusConfig,
    client: Option<crate::credentials::Client>,
    mut receiver: ServiceBusReceiver,
    mut incoming: mpsc::Receiver<Request>,
) {
    let path = config.path();
    while let Some(request) = incoming.recv().await {
        match request {
            Request::Peek(max, reply) => {
                let peeked = receiver
                    .peek_messages(u32::try_from(max).unwrap_or(u32::MAX), None)
                    .await
                    .map_err(|e| map_error("peek", &e, entity_kind(&config), &path))
                    .map(|messages| {
                        messages
                            .iter()
                            .map(|m| {
                                Peeked::new(
                                    from_servicebus(m, config.uses_sessions()),
                                    // The AMQP header counts earlier deliveries (the
                                    // SDK's accessor adds one, for a received message).
                                    m.raw_amqp_message()
                                        .header
                                        .as_ref()
                                        .map_or(0, |h| h.delivery_count),
                                    m.enqueued_time().into(),
                                    m.sequence_number().to_string(),
                                )
                            })
                            .collect()
                    });
                let _ = reply.send(peeked);
            }
            Request::Close(reply) => {
                let _ = reply.send(());
                break;
            }
        }
    }
    let _ = receiver.dispose().await;
    if let Some(client) = client {
        let _ = client.dispose().await;
    }
}

#[async_trait]
impl Inspector for ServiceBusInspector {
    async fn peek(&self, max: usize) -> Result<Vec<Peeked>> {
        self.ask(|reply| Request::Peek(max, reply)).await?
    }

    async fn stats(&self) -> Result<Stats> {
        Ok(Stats::default()
            .not_reported("waiting", NO_COUNTS)
            .not_reported("in_flight", NO_COUNTS)
            .not_reported("dead_lettered", NO_COUNTS)
            .not_reported("oldest_age", NO_COUNTS))
    }

    async fn close(&self) -> Result<()> {
        let _ = self.ask(Request::Close).await;
        Ok(())
    }

    fn destination(&self) -> Destination {
        self.destination.clone()
    }
}
