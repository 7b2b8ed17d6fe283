//! Looking into a queue, a subscription or a dead-letter queue: peek, through the
//! broker's `peek-message` operation (nothing is locked, no delivery is counted). Service
//! Bus reports counts only through its management REST API, which cloudbus does not call.

use async_trait::async_trait;
use cloudbus_core::inspector::{Inspector, Peeked, Stats};
use cloudbus_core::{Destination, Error, Result};

use crate::TRANSPORT;
use crate::config::ServiceBusConfig;
use crate::credentials::namespace;
use crate::mapping::from_servicebus;
use crate::protocol::Connection;
use crate::protocol::codec::received;
use crate::protocol::management::Management;

/// Why the counts are missing.
const NO_COUNTS: &str = "Service Bus reports counts only through its management REST API \
                         (`az servicebus queue show`, the portal, Service Bus Explorer), which \
                         cloudbus does not call; `cloudbus peek` shows the messages";

/// Looks into a Service Bus queue, subscription or dead-letter queue.
pub struct ServiceBusInspector {
    connection: Connection,
    management: Management,
    sessions: bool,
    destination: Destination,
}

impl std::fmt::Debug for ServiceBusInspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceBusInspector")
            .field("destination", &self.destination)
            .finish_non_exhaustive()
    }
}

impl ServiceBusInspector {
    /// Opens an inspector (the entity's management node, which peeks) on what `config`
    /// names. A session-enabled entity's messages are peeked one session at a time, which
    /// cloudbus does not offer: peek its dead-letter queue, or receive.
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
        let connection = Connection::open(namespace(config)?, "inspector").await?;
        let path = config.receive_path();
        let management = Management::new(connection.clone(), path.clone());
        // Reach the entity now, so that a missing one is reported here.
        management.peek(0, 1).await?;
        Ok(ServiceBusInspector {
            connection,
            management,
            sessions: config.uses_sessions(),
            destination: Destination::new(TRANSPORT, config.path()),
        })
    }
}

#[async_trait]
impl Inspector for ServiceBusInspector {
    /// The first `max` messages, from the head each time.
    async fn peek(&self, max: usize) -> Result<Vec<Peeked>> {
        let messages = self.management.peek(0, max).await?;
        Ok(messages
            .iter()
            .map(|m| {
                let facts = received(m, &[]);
                Peeked::new(
                    from_servicebus(m, self.sessions),
                    // The AMQP header counts earlier deliveries.
                    facts.delivery_count.saturating_sub(1),
                    facts.enqueued_at,
                    facts.sequence_number.to_string(),
                )
            })
            .collect())
    }

    async fn stats(&self) -> Result<Stats> {
        Ok(Stats::default()
            .not_reported("waiting", NO_COUNTS)
            .not_reported("in_flight", NO_COUNTS)
            .not_reported("dead_lettered", NO_COUNTS)
            .not_reported("oldest_age", NO_COUNTS))
    }

    async fn close(&self) -> Result<()> {
        self.connection.close().await;
        Ok(())
    }

    fn destination(&self) -> Destination {
        self.destination.clone()
    }
}
