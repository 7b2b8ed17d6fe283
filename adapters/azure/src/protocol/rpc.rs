//! Request and response over a pair of links (AMQP's management pattern), as `$cbs` and
//! `<entity>/$management` use it: many requests in flight, replies matched by correlation
//! id.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cloudbus_core::{Error, Result};
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp_types::messaging::{
    ApplicationProperties, Body, Message, MessageId, Properties, Source, Target,
};
use fe2o3_amqp_types::primitives::{SimpleValue, Value};
use tokio::sync::{Mutex, oneshot, watch};

use crate::TRANSPORT;
use crate::protocol::Lost;

/// How long a request waits for its reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

static NEXT_NODE: AtomicU64 = AtomicU64::new(1);

/// A reply: its status code and description, error condition and body.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: i32,
    pub(crate) description: String,
    pub(crate) condition: Option<String>,
    pub(crate) body: Value,
}

type Pending = Arc<std::sync::Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>>;

/// A request-response link pair to one node.
pub(crate) struct Rpc {
    node: String,
    sender: Mutex<Sender>,
    pending: Pending,
    next_id: AtomicU64,
    reply_to: String,
    /// Whether the reply link has ended (the pair must be opened again).
    ended: watch::Receiver<bool>,
    replies: tokio::task::JoinHandle<()>,
}

impl Drop for Rpc {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

impl Rpc {
    /// Attaches the pair to `node` on `session`. `on_end` is told when the reply link ends.
    pub(crate) async fn open(
        session: &mut SessionHandle<()>,
        node: &str,
        on_end: Option<watch::Sender<bool>>,
    ) -> Result<Rpc> {
        let n = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
        let reply_to = format!("cloudbus-rpc-{}-{n}", std::process::id());
        let sender = Sender::builder()
            .name(format!("{reply_to}-sender"))
            .target(Target::builder().address(node.to_string()).build())
            .source(Source::builder().address(reply_to.clone()).build())
            .attach(session)
            .await
            .map_err(|e| link_error("attach a request link to", node, &e))?;
        let mut receiver = Receiver::builder()
            .name(format!("{reply_to}-receiver"))
            .source(Source::builder().address(node.to_string()).build())
            .target(Target::builder().address(reply_to.clone()).build())
            .attach(session)
            .await
            .map_err(|e| link_error("attach a reply link to", node, &e))?;
        let pending: Pending = Arc::new(std::sync::Mutex::new(Some(HashMap::new())));
        let (end, ended) = watch::channel(false);
        let replies = tokio::spawn({
            let pending = pending.clone();
            async move {
                loop {
                    let delivery = match receiver.recv::<Body<Value>>().await {
                        Ok(delivery) => delivery,
                        Err(_) => break,
                    };
                    let _ = receiver.accept(&delivery).await;
                    let message = delivery.into_message();
                    let id = match message
                        .properties
                        .as_ref()
                        .and_then(|p| p.correlation_id.as_ref())
                    {
                        Some(MessageId::Ulong(id)) => *id,
                        _ => continue,
                    };
                    let reply = reply_of(message);
                    let waiter = pending
                        .lock()
                        .ok()
                        .and_then(|mut p| p.as_mut().and_then(|p| p.remove(&id)));
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(reply);
                    }
                }
                // Fail every request still waiting, and refuse new ones.
                if let Ok(mut p) = pending.lock() {
                    p.take();
                }
                let _ = end.send(true);
                if let Some(on_end) = on_end {
                    let _ = on_end.send(true);
                }
            }
        });
        Ok(Rpc {
            node: node.to_string(),
            sender: Mutex::new(sender),
            pending,
            next_id: AtomicU64::new(1),
            reply_to,
            ended,
            replies,
        })
    }

    /// Whether the pair has ended.
    pub(crate) fn has_ended(&self) -> bool {
        *self.ended.borrow()
    }

    /// Sends a request with `properties` (besides `operation`) and `body`, and waits for its
    /// reply (up to 30 s, or until `lost` says the connection is gone).
    pub(crate) async fn call(
        &self,
        operation: &str,
        properties: Vec<(&str, SimpleValue)>,
        body: Value,
        lost: &mut Lost,
    ) -> Result<Reply> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, replied) = oneshot::channel();
        match self.pending.lock() {
            Ok(mut p) => match p.as_mut() {
                Some(p) => {
                    p.insert(id, reply);
                }
                None => return Err(self.ended_error()),
            },
            Err(_) => return Err(self.ended_error()),
        }
        let mut application = ApplicationProperties::builder()
            .insert("operation", SimpleValue::String(operation.to_string()));
        for (key, value) in properties {
            application = application.insert(key, value);
        }
        let request = Message::builder()
            .properties(
                Properties::builder()
                    .message_id(MessageId::Ulong(id))
                    .reply_to(self.reply_to.clone())
                    .build(),
            )
            .application_properties(application.build())
            .value(body)
            .build();
        let exchange = async {
            let delivery = {
                let mut sender = self.sender.lock().await;
                sender.send_batchable(request).await
            };
            match delivery {
                Ok(delivery) => {
                    let _ = delivery.await;
                }
                Err(e) => return Err(link_error("send a request to", &self.node, &e)),
            }
            replied.await.map_err(|_| self.ended_error())
        };
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(REPLY_TIMEOUT, exchange) => outcome,
            () = lost.gone() => Ok(Err(self.ended_error())),
        };
        if let Ok(mut p) = self.pending.lock() {
            if let Some(p) = p.as_mut() {
                p.remove(&id);
            }
        }
        match outcome {
            Ok(outcome) => outcome,
            Err(_) => Err(Error::transport(
                TRANSPORT,
                format!(
                    "{operation} on {}: no reply within {REPLY_TIMEOUT:?}",
                    self.node
                ),
                true,
                None,
            )),
        }
    }

    fn ended_error(&self) -> Error {
        Error::transport(
            TRANSPORT,
            format!(
                "the link pair to {} ended (the connection was lost?)",
                self.node
            ),
            true,
            None,
        )
    }
}

fn reply_of(message: Message<Body<Value>>) -> Reply {
    let properties = message
        .application_properties
        .map(|a| a.0)
        .unwrap_or_default();
    let text = |keys: &[&str]| {
        keys.iter().find_map(|k| match properties.get(*k) {
            Some(SimpleValue::String(s)) => Some(s.clone()),
            Some(SimpleValue::Symbol(s)) => Some(s.0.clone()),
            _ => None,
        })
    };
    let status = ["statusCode", "status-code"]
        .iter()
        .find_map(|k| match properties.get(*k) {
            Some(SimpleValue::Int(n)) => Some(*n),
            Some(SimpleValue::Uint(n)) => i32::try_from(*n).ok(),
            Some(SimpleValue::Long(n)) => i32::try_from(*n).ok(),
            Some(SimpleValue::Short(n)) => Some(i32::from(*n)),
            _ => None,
        })
        .unwrap_or(0);
    let body = match message.body {
        Body::Value(v) => v.0,
        _ => Value::Null,
    };
    Reply {
        status,
        description: text(&["statusDescription", "status-description"]).unwrap_or_default(),
        condition: text(&["errorCondition", "error-condition"]),
        body,
    }
}

pub(crate) fn link_error(action: &str, node: &str, error: &dyn std::fmt::Debug) -> Error {
    crate::error::map_amqp_error(
        &format!("{action} {node}"),
        &format!("{error:?}"),
        "queue or topic",
        node,
    )
}
