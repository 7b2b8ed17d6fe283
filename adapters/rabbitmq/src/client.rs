//! Connections to the server: the URI (a secret) and what may be shown of it, connecting
//! with backoff, and [`Sender`], a confirm-mode channel that reconnects by itself.

use std::sync::Arc;
use std::time::Duration;

use cloudbus_core::config::Secret;
use cloudbus_core::{Error, Result};
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::time::Instant;

use crate::TRANSPORT;
use crate::config::RabbitMqConfig;
use crate::error::{Subject, is_connection_failure, map_error};
use crate::topology::{Target, bind_delay_target, declare_delays};

/// First pause after a failed connection attempt; it doubles up to [`MAX_BACKOFF`].
pub(crate) const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between connection attempts.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The server: its URI, and the URI without user and password for messages.
pub(crate) struct Server {
    uri: Secret,
    shown: String,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Server {
    /// The server `config` names (its `uri`, else `RABBITMQ_URL`, else the default).
    pub(crate) fn new(config: &RabbitMqConfig) -> Result<Server> {
        let uri = config.server();
        let shown = shown(uri.expose())?;
        Ok(Server { uri, shown })
    }

    /// The URI without credentials: `amqp://host:port/vhost`.
    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }

    /// One connection attempt.
    pub(crate) async fn connect(&self) -> Result<Connection> {
        let properties = ConnectionProperties::default().with_connection_name("cloudbus".into());
        Connection::connect(self.uri.expose(), properties)
            .await
            .map_err(|e| {
                map_error(
                    "connecting to",
                    Subject {
                        entity: "server",
                        name: &self.shown,
                    },
                    e,
                )
            })
    }

    /// A channel on a new connection, retrying connection failures with backoff until
    /// `deadline` (errors that another attempt cannot cure return at once).
    pub(crate) async fn channel_by(&self, deadline: Instant) -> Result<(Connection, Channel)> {
        let mut backoff = MIN_BACKOFF;
        loop {
            let attempt = async {
                let connection = self.connect().await?;
                let channel = connection.create_channel().await.map_err(|e| {
                    map_error(
                        "opening a channel on",
                        Subject {
                            entity: "server",
                            name: &self.shown,
                        },
                        e,
                    )
                })?;
                Ok::<_, Error>((connection, channel))
            };
            let error = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(link)) => return Ok(link),
                Ok(Err(error)) => error,
                Err(_) => Error::transport(
                    TRANSPORT,
                    format!("no connection to {} in time", self.shown),
                    true,
                    None,
                ),
            };
            if !is_connection_failure(&error) || Instant::now() + backoff >= deadline {
                return Err(error);
            }
            tracing::warn!(server = %self.shown, %error, ?backoff, "connecting again");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// `amqp://host:port/vhost` of a URI, never its user or password.
fn shown(uri: &str) -> Result<String> {
    let invalid = || {
        Error::config(format!(
            "the RabbitMQ URI (the `uri` config field or {}) is not \
             amqp[s]://user:password@host[:port]/vhost",
            crate::URI_ENV
        ))
    };
    let url = url::Url::parse(uri).map_err(|_| invalid())?;
    if !matches!(url.scheme(), "amqp" | "amqps") {
        return Err(invalid());
    }
    let host = url.host_str().ok_or_else(invalid)?;
    let port = url
        .port()
        .unwrap_or(if url.scheme() == "amqps" { 5671 } else { 5672 });
    Ok(format!("{}://{host}:{port}{}", url.scheme(), url.path()))
}

/// A publishing channel in confirm mode that reconnects by itself: what the publisher and
/// a subscriber's copies (dead letters, delayed nacks) use. A connection of its own, so
/// that the broker's flow control of publishers never stalls a subscriber's acks.
pub(crate) struct Sender {
    server: Arc<Server>,
    link: tokio::sync::Mutex<Option<(Connection, Channel)>>,
    timeout: Duration,
    closed: std::sync::atomic::AtomicBool,
    /// Set once the delay queues and this sender's delay binding are declared.
    delays: tokio::sync::OnceCell<()>,
}

/// Where a message goes: an exchange and a routing key.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Route<'a> {
    pub(crate) exchange: &'a str,
    pub(crate) routing_key: &'a str,
}

impl Route<'_> {
    fn describe(&self) -> String {
        if self.exchange.is_empty() {
            format!("the queue `{}`", self.routing_key)
        } else {
            format!("the exchange `{}`", self.exchange)
        }
    }
}

impl Sender {
    /// A sender on `server`; it connects at its first use, or at [`Sender::open`].
    pub(crate) fn new(server: Arc<Server>, timeout: Duration) -> Sender {
        Sender {
            server,
            link: tokio::sync::Mutex::new(None),
            timeout,
            closed: std::sync::atomic::AtomicBool::new(false),
            delays: tokio::sync::OnceCell::new(),
        }
    }

    /// The delay queues, and the binding that delivers delayed messages to the entity
    /// `name` of `kind`: declared at the first delayed message. A sender serves one entity.
    pub(crate) async fn ensure_delays(&self, kind: Target, name: &str) -> Result<()> {
        self.delays
            .get_or_try_init(|| async {
                let channel = self.open(Instant::now() + self.timeout).await?;
                declare_delays(&channel).await?;
                bind_delay_target(&channel, kind, name).await
            })
            .await
            .map(|_| ())
    }

    /// The channel, connecting (with backoff, until `deadline`) if there is none or it died.
    pub(crate) async fn open(&self, deadline: Instant) -> Result<Channel> {
        let mut link = self.link.lock().await;
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::closed(TRANSPORT, "publisher"));
        }
        if let Some((_, channel)) = link.as_ref() {
            if channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        if let Some((connection, _)) = link.take() {
            close_in_background(connection);
        }
        let (connection, channel) = self.server.channel_by(deadline).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| {
                map_error(
                    "turning on publisher confirms on",
                    Subject {
                        entity: "server",
                        name: self.server.shown(),
                    },
                    e,
                )
            })?;
        *link = Some((connection, channel.clone()));
        Ok(channel)
    }

    /// Publishes one persistent, mandatory message; done when the broker has confirmed it.
    /// A lost connection is retried on a new one until the publish timeout (so a message
    /// may be stored twice, never reported stored when it was not).
    pub(crate) async fn send(
        &self,
        route: Route<'_>,
        body: &[u8],
        properties: &BasicProperties,
    ) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut backoff = MIN_BACKOFF;
        loop {
            let channel = tokio::time::timeout_at(deadline, self.open(deadline))
                .await
                .map_err(|_| {
                    Error::transport(
                        TRANSPORT,
                        format!("no channel to {} in time", route.describe()),
                        true,
                        None,
                    )
                })??;
            let outcome = tokio::time::timeout_at(
                deadline,
                publish_once(&channel, route, body, properties.clone()),
            )
            .await;
            let error = match outcome {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(error)) => error,
                Err(_) => {
                    // The connection may be half-open: the next publish opens a new one.
                    self.reset(&channel).await;
                    return Err(Error::transport(
                        TRANSPORT,
                        format!(
                            "publish to {} was not confirmed within {:?}; it may or may not \
                             have been stored",
                            route.describe(),
                            self.timeout
                        ),
                        true,
                        None,
                    ));
                }
            };
            if !is_connection_failure(&error) || Instant::now() + backoff >= deadline {
                return Err(error);
            }
            tracing::warn!(to = %route.describe(), %error, "publish failed; publishing again on a new connection");
            self.reset(&channel).await;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Drops the link if it is still `failed`'s, so that the next use reconnects.
    async fn reset(&self, failed: &Channel) {
        let mut link = self.link.lock().await;
        if link.as_ref().is_some_and(|(_, c)| c.id() == failed.id()) {
            if let Some((connection, _)) = link.take() {
                close_in_background(connection);
            }
        }
    }

    /// Waits (up to the publish timeout) for the confirms of publishes in flight, then
    /// closes the connection; later sends fail with `Closed`.
    pub(crate) async fn close(&self) {
        let mut link = self.link.lock().await;
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some((connection, channel)) = link.take() {
            let _ = tokio::time::timeout(self.timeout, channel.wait_for_confirms()).await;
            close_connection(&connection, "closed").await;
        }
    }
}

/// How long closing a connection may wait for the broker's answer; a half-open connection
/// never answers.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes a connection, waiting for the broker's answer up to [`CLOSE_TIMEOUT`].
pub(crate) async fn close_connection(connection: &Connection, reason: &str) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, reason.into())).await;
}

/// Closes a connection that is no longer used, without waiting.
pub(crate) fn close_in_background(connection: Connection) {
    tokio::spawn(async move { close_connection(&connection, "reconnecting").await });
}

/// `work` (broker calls on a new channel), failing with a transient error at `deadline`:
/// a broker that accepted the connection and then went silent must not hang the caller.
pub(crate) async fn by_deadline<T>(
    deadline: Instant,
    what: &str,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout_at(deadline, work)
        .await
        .unwrap_or_else(|_| {
            Err(Error::transport(
                TRANSPORT,
                format!("{what}: the broker did not answer in time"),
                true,
                None,
            ))
        })
}

async fn publish_once(
    channel: &Channel,
    route: Route<'_>,
    body: &[u8],
    properties: BasicProperties,
) -> Result<()> {
    let subject = if route.exchange.is_empty() {
        Subject {
            entity: "queue",
            name: route.routing_key,
        }
    } else {
        Subject {
            entity: "exchange",
            name: route.exchange,
        }
    };
    let confirm = channel
        .basic_publish(
            route.exchange.into(),
            route.routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            body,
            properties,
        )
        .await
        .map_err(|e| map_error("publishing to", subject, e))?
        .await
        .map_err(|e| map_error("publishing to", subject, e))?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(if route.exchange.is_empty() {
            Error::NotFound {
                transport: TRANSPORT,
                entity: "queue",
                name: route.routing_key.to_string(),
            }
        } else {
            Error::Transport {
                transport: TRANSPORT,
                message: format!(
                    "no queue is bound to the exchange `{}`, so the broker returned the \
                     message ({} {}) instead of storing it; subscribe first (a subscription \
                     with create=true binds its queue)",
                    route.exchange, returned.reply_code, returned.reply_text
                ),
                transient: false,
                source: None,
            }
        }),
        Confirmation::Nack(_) => Err(Error::transport(
            TRANSPORT,
            format!(
                "the broker refused to store the message for {} (a full queue, or an \
                 internal error); retry later",
                route.describe()
            ),
            true,
            None,
        )),
        Confirmation::NotRequested => Err(Error::transport(
            TRANSPORT,
            "the channel is not in confirm mode".to_string(),
            false,
            None,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shown_uri_has_no_credentials() {
        assert_eq!(
            shown("amqps://admin:hunter2@b-1.mq.us-east-1.amazonaws.com/prod").unwrap(),
            "amqps://b-1.mq.us-east-1.amazonaws.com:5671/prod"
        );
        assert_eq!(
            shown("amqp://guest:guest@127.0.0.1:5673/%2f").unwrap(),
            "amqp://127.0.0.1:5673/%2f"
        );
        let error = shown("http://u:hunter2@h/").unwrap_err().to_string();
        assert!(
            !error.contains("hunter2") && error.contains("RABBITMQ_URL"),
            "{error}"
        );
        assert!(
            shown("not a uri hunter2")
                .unwrap_err()
                .to_string()
                .contains("amqp")
        );
    }
}
