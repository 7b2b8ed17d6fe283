//! The `<entity>/$management` operations cloudbus uses: renew-lock, renew-session-lock and
//! peek, over a request-response pair opened when first needed and again after a loss.

use std::sync::Arc;
use std::time::SystemTime;

use cloudbus_core::{Error, Result};
use fe2o3_amqp_types::primitives::{Array, OrderedMap, SimpleValue, Value};
use tokio::sync::Mutex;

use crate::TRANSPORT;
use crate::protocol::codec::{AmqpMessage, decode, from_millis};
use crate::protocol::rpc::{Reply, Rpc};
use crate::protocol::{Connection, Lost};

/// The management node of one entity path.
pub(crate) struct Management {
    connection: Connection,
    path: String,
    rpc: Mutex<Option<(Arc<Rpc>, Lost)>>,
}

impl Management {
    pub(crate) fn new(connection: Connection, path: String) -> Self {
        Management {
            connection,
            path,
            rpc: Mutex::new(None),
        }
    }

    /// Attaches the management links now (they are attached when first needed otherwise,
    /// and again after a loss), so that the first lock renewal costs one round trip, not
    /// the attach's several as well.
    pub(crate) async fn open(&self) -> Result<()> {
        self.rpc().await.map(|_| ())
    }

    /// The live request/reply link pair, attached if there is none.
    async fn rpc(&self) -> Result<(Arc<Rpc>, Lost)> {
        let mut slot = self.rpc.lock().await;
        match slot.as_ref() {
            Some((rpc, lost)) if !rpc.has_ended() && !lost.is_gone() => {
                Ok((rpc.clone(), lost.clone()))
            }
            _ => {
                let (rpc, lost) = self.connection.management(&self.path).await?;
                let rpc = Arc::new(rpc);
                *slot = Some((rpc.clone(), lost.clone()));
                Ok((rpc, lost))
            }
        }
    }

    async fn call(
        &self,
        operation: &str,
        link: Option<&str>,
        body: Vec<(&str, Value)>,
    ) -> Result<Reply> {
        let (rpc, mut lost) = self.rpc().await?;
        let mut properties = vec![("com.microsoft:server-timeout", SimpleValue::Uint(30_000))];
        if let Some(link) = link {
            properties.push((
                "associated-link-name",
                SimpleValue::String(link.to_string()),
            ));
        }
        let body = Value::Map(
            body.into_iter()
                .map(|(k, v)| (Value::String(k.to_string()), v))
                .collect::<OrderedMap<Value, Value>>(),
        );
        let reply = rpc
            .call(
                &format!("com.microsoft:{operation}"),
                properties,
                body,
                &mut lost,
            )
            .await?;
        match reply.status {
            200..=299 => Ok(reply),
            _ => Err(self.error(operation, &reply)),
        }
    }

    fn error(&self, operation: &str, reply: &Reply) -> Error {
        let condition = reply.condition.as_deref().unwrap_or_default();
        if condition.contains("lock-lost") || reply.status == 410 {
            return Error::LockLost {
                transport: TRANSPORT,
                message_id: String::new(),
            };
        }
        if condition.contains("not-found") || reply.status == 404 {
            return Error::NotFound {
                transport: TRANSPORT,
                entity: "queue or topic",
                name: self.path.clone(),
            };
        }
        if reply.status == 401 || reply.status == 403 {
            return Error::Unauthorized {
                transport: TRANSPORT,
                message: format!("{operation} on {}: {}", self.path, reply.description),
                source: None,
            };
        }
        Error::transport(
            TRANSPORT,
            format!(
                "{operation} on {}: status {} {condition}: {}",
                self.path, reply.status, reply.description
            ),
            reply.status >= 500 || reply.status == 408,
            None,
        )
    }

    /// Renews the locks of `tokens`, received on the link `link`: their new expiries.
    pub(crate) async fn renew_locks(
        &self,
        tokens: &[uuid::Uuid],
        link: &str,
    ) -> Result<Vec<SystemTime>> {
        let tokens = tokens
            .iter()
            .map(|t| Value::Uuid(fe2o3_amqp_types::primitives::Uuid::from(*t.as_bytes())))
            .collect();
        let reply = self
            .call(
                "renew-lock",
                Some(link),
                vec![("lock-tokens", Value::Array(Array(tokens)))],
            )
            .await?;
        Ok(items(field(&reply.body, "expirations"))
            .into_iter()
            .filter_map(|v| match v {
                Value::Timestamp(t) => Some(from_millis(t.milliseconds())),
                _ => None,
            })
            .collect())
    }

    /// Renews the lock of `session`: its new expiry.
    pub(crate) async fn renew_session_lock(&self, session: &str, link: &str) -> Result<SystemTime> {
        let reply = self
            .call(
                "renew-session-lock",
                Some(link),
                vec![("session-id", Value::String(session.to_string()))],
            )
            .await?;
        match field(&reply.body, "expiration") {
            Some(Value::Timestamp(t)) => Ok(from_millis(t.milliseconds())),
            _ => Err(Error::transport(
                TRANSPORT,
                format!(
                    "renew-session-lock on {}: no expiration in the reply",
                    self.path
                ),
                true,
                None,
            )),
        }
    }

    /// Up to `count` messages from sequence number `from` on, without locking them.
    pub(crate) async fn peek(&self, from: i64, count: usize) -> Result<Vec<AmqpMessage>> {
        let reply = self
            .call(
                "peek-message",
                None,
                vec![
                    ("from-sequence-number", Value::Long(from)),
                    (
                        "message-count",
                        Value::Int(i32::try_from(count).unwrap_or(i32::MAX)),
                    ),
                ],
            )
            .await?;
        if reply.status == 204 {
            return Ok(Vec::new());
        }
        items(field(&reply.body, "messages"))
            .into_iter()
            .filter_map(|item| match field(&item, "message") {
                Some(Value::Binary(bytes)) => Some(decode(bytes)),
                _ => None,
            })
            .collect()
    }
}

fn field<'a>(body: &'a Value, key: &str) -> Option<&'a Value> {
    match body {
        Value::Map(map) => map.iter().find_map(|(k, v)| match k {
            Value::String(s) | Value::Symbol(fe2o3_amqp_types::primitives::Symbol(s))
                if s == key =>
            {
                Some(v)
            }
            _ => None,
        }),
        _ => None,
    }
}

fn items(value: Option<&Value>) -> Vec<Value> {
    match value {
        Some(Value::Array(a)) => a.0.clone(),
        Some(Value::List(l)) => l.clone(),
        _ => Vec::new(),
    }
}
