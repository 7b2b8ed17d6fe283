//! The session accepter: locks sessions for a subscriber of a session-enabled entity, on
//! a connection of its own.

use std::time::Duration;

use azservicebus::{ServiceBusSessionReceiver, ServiceBusSessionReceiverOptions};
use cloudbus_core::Result;
use tokio::sync::mpsc;

use crate::credentials::Client;
use crate::error::map_error;

/// Locks a session each time the subscriber asks (`wanted`) and hands it over through
/// `found`: the pinned one, or the next available one. Runs on a connection of its own,
/// so waiting for a session never holds up receiving or settling.
pub(crate) async fn accept_sessions(
    client: Option<Client>,
    entity: String,
    subscription: Option<String>,
    pinned: Option<String>,
    options: ServiceBusSessionReceiverOptions,
    mut wanted: mpsc::Receiver<()>,
    found: mpsc::Sender<Result<ServiceBusSessionReceiver>>,
) {
    let Some(mut client) = client else {
        return;
    };
    let path = match &subscription {
        Some(s) => format!("{entity}/Subscriptions/{s}"),
        None => entity.clone(),
    };
    while wanted.recv().await.is_some() {
        loop {
            let accepted = match (&subscription, &pinned) {
                (None, Some(session)) => {
                    client
                        .accept_session_for_queue(entity.clone(), session.clone(), options.clone())
                        .await
                }
                (None, None) => {
                    client
                        .accept_next_session_for_queue(entity.clone(), options.clone())
                        .await
                }
                (Some(sub), Some(session)) => {
                    client
                        .accept_session_for_subscription(
                            entity.clone(),
                            sub.clone(),
                            session.clone(),
                            options.clone(),
                        )
                        .await
                }
                (Some(sub), None) => {
                    client
                        .accept_next_session_for_subscription(
                            entity.clone(),
                            sub.clone(),
                            options.clone(),
                        )
                        .await
                }
            };
            match accepted {
                Ok(receiver) => {
                    tracing::debug!(messaging.system = "servicebus", messaging.destination.name = %path, session = receiver.session_id(), "locked a session");
                    let _ = found.send(Ok(receiver)).await;
                    break;
                }
                Err(error) => {
                    let text = format!("{error:?} {error}").to_ascii_lowercase();
                    // No session became available within the broker's wait: ask again.
                    if text.contains("timeout") || text.contains("session-cannot-be-locked") {
                        tracing::debug!(messaging.system = "servicebus", messaging.destination.name = %path, "no session available yet");
                        continue;
                    }
                    let error = map_error("accept session", &error, "queue", &path);
                    let _ = found.send(Err(error)).await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
            }
        }
    }
    let _ = client.dispose().await;
}
