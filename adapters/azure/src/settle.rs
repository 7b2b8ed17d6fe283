//! [`ServiceBusSettle`]: a delivery's settlement, sent to the receiver task that took it.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use cloudbus_core::driver::Settle;
use cloudbus_core::{Error, Result};
use tokio::sync::{mpsc, oneshot};

use crate::error::lock_lost;
use crate::receiver::{Command, Settlement};

pub(crate) struct ServiceBusSettle {
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) token: uuid::Uuid,
    pub(crate) message_id: String,
    /// The broker settled it on delivery: `ack` has nothing to do, the rest cannot be done.
    pub(crate) receive_and_delete: bool,
}

impl ServiceBusSettle {
    async fn request(&self, how: Settlement) -> Result<SystemTime> {
        if self.receive_and_delete {
            return match how {
                Settlement::Complete => Ok(SystemTime::now()),
                _ => Err(Error::Unsupported {
                    transport: crate::TRANSPORT,
                    feature: "nack, dead_letter and extend in receive_and_delete mode: the \
                              broker deleted the message when it delivered it; use peek_lock"
                        .into(),
                }),
            };
        }
        let (reply, outcome) = oneshot::channel();
        self.commands
            .send(Command::Settle {
                token: self.token,
                how,
                reply,
            })
            .await
            .map_err(|_| lock_lost(&self.message_id))?;
        outcome
            .await
            .unwrap_or_else(|_| Err(lock_lost(&self.message_id)))
            .map_err(|e| match e {
                Error::LockLost { .. } => lock_lost(&self.message_id),
                other => other,
            })
    }
}

#[async_trait]
impl Settle for ServiceBusSettle {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.request(Settlement::Complete).await.map(|_| ())
    }

    async fn nack(self: Box<Self>, delay: Duration) -> Result<()> {
        let how = if delay.is_zero() {
            Settlement::Abandon
        } else {
            Settlement::AbandonAfter(delay)
        };
        self.request(how).await.map(|_| ())
    }

    async fn dead_letter(self: Box<Self>, reason: &str, description: &str) -> Result<()> {
        self.request(Settlement::DeadLetter {
            reason: reason.to_string(),
            description: description.to_string(),
        })
        .await
        .map(|_| ())
    }

    async fn extend(&mut self, by: Duration) -> Result<SystemTime> {
        self.request(Settlement::Extend(by)).await
    }
}
