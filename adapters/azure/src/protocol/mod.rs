//! A thin Service Bus client over AMQP 1.0 (fe2o3-amqp): the connection with its claims-based
//! authorization, request-response links for `$cbs` and `$management`, and the wire
//! formats Service Bus adds to AMQP (batches, lock tokens, broker annotations).

pub(crate) mod codec;
pub(crate) mod connection;
pub(crate) mod management;
pub(crate) mod rpc;
pub(crate) mod token;

pub(crate) use connection::{Connection, Namespace};

/// Tells when a connection is gone: every link on it is dead then, though fe2o3's futures
/// on those links may stay pending, so waits on a link race this.
#[derive(Clone, Debug)]
pub(crate) struct Lost(pub(crate) tokio::sync::watch::Receiver<bool>);

impl Lost {
    /// Resolves once the connection is gone.
    pub(crate) async fn gone(&mut self) {
        if self.0.wait_for(|gone| *gone).await.is_err() {
            // The connection's state was dropped: gone as well.
        }
    }

    /// Whether the connection is gone.
    pub(crate) fn is_gone(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }
}
