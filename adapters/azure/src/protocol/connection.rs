//! One AMQP connection to a namespace, with one AMQP session for its links, reconnected
//! when it is lost: every link is authorized first by a `$cbs` put-token for its path,
//! and the tokens are put again before they expire.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use cloudbus_core::{Error, Result};
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{Connection as AmqpConnection, Session};
use fe2o3_amqp_types::primitives::{SimpleValue, Timestamp, Value};
use tokio::sync::{Mutex, MutexGuard, watch};

use crate::TRANSPORT;
use crate::protocol::Lost;
use crate::protocol::rpc::Rpc;
use crate::protocol::token::TokenSource;

/// Longest a connection attempt (TCP, TLS, AMQP open, the `$cbs` links) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The idle timeout announced to the broker: it must send something this often, so that a
/// half-open connection is noticed.
const IDLE_TIMEOUT_MS: u32 = 60_000;
/// Tokens are put again when they have less than this left.
const TOKEN_RENEW_MARGIN: Duration = Duration::from_secs(300);
/// How often a connection's watcher looks at its state and tokens.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// Backoff between failed connection attempts: from the first, doubling, to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// Where the namespace is and how to authenticate with it. Never logged.
#[derive(Clone, Debug)]
pub(crate) struct Namespace {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) tls: bool,
    pub(crate) auth: TokenSource,
}

/// What a receiver link is: its name, source (address and filters), settle mode and
/// link properties.
pub(crate) struct ReceiverSpec {
    pub(crate) name: String,
    pub(crate) source: fe2o3_amqp_types::messaging::Source,
    /// Peek-lock (settled by the receiver, mode second) or receive-and-delete (settled by
    /// the broker).
    pub(crate) peek_lock: bool,
    pub(crate) properties: Option<fe2o3_amqp_types::definitions::Fields>,
}

impl ReceiverSpec {
    async fn attach(
        self,
        session: &mut SessionHandle<()>,
    ) -> std::result::Result<Receiver, fe2o3_amqp::link::ReceiverAttachError> {
        use fe2o3_amqp_types::definitions::{ReceiverSettleMode, SenderSettleMode};
        let mut builder = Receiver::builder()
            .name(self.name)
            .source(self.source)
            .target(fe2o3_amqp_types::messaging::Target::builder().build())
            .credit_mode(fe2o3_amqp::link::receiver::CreditMode::Manual)
            .auto_accept(false)
            .verify_incoming_source(false);
        builder = if self.peek_lock {
            builder
                .sender_settle_mode(SenderSettleMode::Unsettled)
                .receiver_settle_mode(ReceiverSettleMode::Second)
        } else {
            builder
                .sender_settle_mode(SenderSettleMode::Settled)
                .receiver_settle_mode(ReceiverSettleMode::First)
        };
        if let Some(properties) = self.properties {
            builder = builder.properties(properties);
        }
        builder.attach(session).await
    }
}

/// A reconnecting connection, shared by the links of one publisher, subscriber or inspector.
#[derive(Clone)]
pub(crate) struct Connection {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: Namespace,
    /// What the connection serves, in its container id and in logs.
    purpose: &'static str,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    live: Option<Live>,
    /// Failed attempts since the last success, and when the last one ended.
    failures: u32,
    last_failure: Option<Instant>,
    closed: bool,
}

struct Live {
    connection: ConnectionHandle<()>,
    session: SessionHandle<()>,
    cbs: Rpc,
    lost: Lost,
    gone: watch::Sender<bool>,
    /// Authorized paths and when their tokens expire.
    authorized: HashMap<String, SystemTime>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.watcher.abort();
        let _ = self.gone.send(true);
    }
}

impl Connection {
    /// Connects to `namespace` (once: a failure is returned).
    pub(crate) async fn open(namespace: Namespace, purpose: &'static str) -> Result<Connection> {
        let connection = Connection {
            inner: Arc::new(Inner {
                namespace,
                purpose,
                state: Mutex::new(State::default()),
            }),
        };
        drop(connection.live().await?);
        Ok(connection)
    }

    /// The live connection, connecting (after a backoff if the last attempt failed) when
    /// there is none or it was lost.
    async fn live(&self) -> Result<MutexGuard<'_, State>> {
        let mut state = self.inner.state.lock().await;
        if state.closed {
            return Err(Error::closed(TRANSPORT, self.inner.purpose));
        }
        if state
            .live
            .as_ref()
            .is_some_and(|l| !l.lost.is_gone() && !l.connection.is_closed())
        {
            return Ok(state);
        }
        if let Some(old) = state.live.take() {
            tracing::info!(messaging.system = "servicebus", host = %self.inner.namespace.host, purpose = self.inner.purpose, "the Service Bus connection was lost; reconnecting");
            let _ = old.gone.send(true);
            close_quietly(old);
        }
        if let Some(at) = state.last_failure {
            let backoff = BACKOFF
                .0
                .saturating_mul(1 << state.failures.min(6))
                .min(BACKOFF.1);
            tokio::time::sleep_until((at + backoff).into()).await;
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, self.connect()).await {
            Ok(Ok(live)) => {
                state.failures = 0;
                state.last_failure = None;
                state.live = Some(live);
                Ok(state)
            }
            outcome => {
                state.failures = state.failures.saturating_add(1);
                state.last_failure = Some(Instant::now());
                Err(match outcome {
                    Ok(Err(error)) => error,
                    _ => Error::transport(
                        TRANSPORT,
                        format!(
                            "cannot connect to {}:{} within {CONNECT_TIMEOUT:?}",
                            self.inner.namespace.host, self.inner.namespace.port
                        ),
                        true,
                        None,
                    ),
                })
            }
        }
    }

    async fn connect(&self) -> Result<Live> {
        let ns = &self.inner.namespace;
        let unreachable = |e: &dyn std::fmt::Display| {
            Error::transport(
                TRANSPORT,
                format!("cannot connect to {}:{}: {e}", ns.host, ns.port),
                true,
                None,
            )
        };
        let tcp = tokio::net::TcpStream::connect((ns.host.as_str(), ns.port))
            .await
            .map_err(|e| unreachable(&e))?;
        let _ = tcp.set_nodelay(true);
        let container = format!("cloudbus-{}-{}", self.inner.purpose, uuid::Uuid::new_v4());
        let builder = AmqpConnection::builder()
            .container_id(container)
            .hostname(ns.host.as_str())
            .sasl_profile(SaslProfile::Anonymous)
            .max_frame_size(65_536)
            .idle_time_out(IDLE_TIMEOUT_MS);
        let mut connection = if ns.tls {
            let server = rustls::pki_types::ServerName::try_from(ns.host.clone())
                .map_err(|e| unreachable(&e))?;
            let stream = tls_connector()
                .map_err(|e| unreachable(&e))?
                .connect(server, tcp)
                .await
                .map_err(|e| unreachable(&e))?;
            builder.open_with_stream(stream).await
        } else {
            builder.open_with_stream(tcp).await
        }
        .map_err(|e| unreachable(&format!("{e:?}")))?;
        let mut session = Session::begin(&mut connection)
            .await
            .map_err(|e| unreachable(&format!("{e:?}")))?;
        let (gone, lost) = watch::channel(false);
        let cbs = Rpc::open(&mut session, "$cbs", Some(gone.clone())).await?;
        let watcher = tokio::spawn(watch(Arc::downgrade(&self.inner)));
        Ok(Live {
            connection,
            session,
            cbs,
            lost: Lost(lost),
            gone,
            authorized: HashMap::new(),
            watcher,
        })
    }

    /// Attaches a sender to `path`.
    pub(crate) async fn sender(&self, name: String, path: &str) -> Result<(Sender, Lost)> {
        let mut state = self.live().await?;
        let live = live_of(&mut state)?;
        authorize(&self.inner.namespace, live, path).await?;
        let sender = Sender::builder()
            .name(name)
            .target(path.to_string())
            .attach(&mut live.session)
            .await
            .map_err(|e| attach_error(path, &e))?;
        Ok((sender, live.lost.clone()))
    }

    /// Attaches a receiver that `spec` describes to `path`, on the shared session or on
    /// `own` (see [`Connection::own_session`]).
    pub(crate) async fn receiver(
        &self,
        path: &str,
        spec: ReceiverSpec,
        own: Option<&mut SessionHandle<()>>,
    ) -> Result<(Receiver, Lost)> {
        let lost;
        let receiver = match own {
            Some(session) => {
                lost = self
                    .live()
                    .await
                    .map(|mut s| live_of(&mut s).map(|l| l.lost.clone()))??;
                spec.attach(session).await
            }
            None => {
                let mut state = self.live().await?;
                let live = live_of(&mut state)?;
                authorize(&self.inner.namespace, live, path).await?;
                lost = live.lost.clone();
                spec.attach(&mut live.session).await
            }
        }
        .map_err(|e| attach_error(path, &e))?;
        Ok((receiver, lost))
    }

    /// Begins an AMQP session of its own (for a session receiver, whose attach may wait for
    /// a session to become free without holding up the other links) after authorizing `path`.
    pub(crate) async fn own_session(&self, path: &str) -> Result<(SessionHandle<()>, Lost)> {
        let mut state = self.live().await?;
        let live = live_of(&mut state)?;
        authorize(&self.inner.namespace, live, path).await?;
        let session = Session::begin(&mut live.connection)
            .await
            .map_err(|e| attach_error(path, &e))?;
        Ok((session, live.lost.clone()))
    }

    /// Opens a request-response pair to `<path>/$management`.
    pub(crate) async fn management(&self, path: &str) -> Result<(Rpc, Lost)> {
        let node = format!("{path}/$management");
        let mut state = self.live().await?;
        let live = live_of(&mut state)?;
        authorize(&self.inner.namespace, live, path).await?;
        authorize(&self.inner.namespace, live, &node).await?;
        let rpc = Rpc::open(&mut live.session, &node, None).await?;
        Ok((rpc, live.lost.clone()))
    }

    /// Closes the connection; its links end with it.
    pub(crate) async fn close(&self) {
        let mut state = self.inner.state.lock().await;
        state.closed = true;
        if let Some(mut live) = state.live.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), live.connection.close()).await;
        }
    }
}

fn live_of<'a>(state: &'a mut MutexGuard<'_, State>) -> Result<&'a mut Live> {
    state.live.as_mut().ok_or_else(|| {
        Error::transport(TRANSPORT, "the Service Bus connection was lost", true, None)
    })
}

fn close_quietly(mut old: Live) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(1), old.connection.close()).await;
    });
}

/// Puts a token for `path` if it has none that lasts long enough.
async fn authorize(namespace: &Namespace, live: &mut Live, path: &str) -> Result<()> {
    if live
        .authorized
        .get(path)
        .is_some_and(|expires| *expires > SystemTime::now() + TOKEN_RENEW_MARGIN)
    {
        return Ok(());
    }
    let audience = format!("sb://{}/{path}", namespace.host);
    let token = namespace.auth.token(&audience).await?;
    let mut lost = live.lost.clone();
    let reply = live
        .cbs
        .call(
            "put-token",
            vec![
                ("type", SimpleValue::String(token.kind.to_string())),
                ("name", SimpleValue::String(audience.clone())),
                (
                    "expiration",
                    SimpleValue::Timestamp(Timestamp::from_milliseconds(
                        token
                            .expires
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
                    )),
                ),
            ],
            Value::String(token.value.expose().to_string()),
            &mut lost,
        )
        .await?;
    match reply.status {
        200 | 202 => {
            live.authorized.insert(path.to_string(), token.expires);
            Ok(())
        }
        401 | 403 => Err(Error::Unauthorized {
            transport: TRANSPORT,
            message: format!(
                "the namespace refused the token for {path}: {}",
                reply.description
            ),
            source: None,
        }),
        404 => Err(Error::NotFound {
            transport: TRANSPORT,
            entity: "queue or topic",
            name: path.to_string(),
        }),
        status => Err(Error::transport(
            TRANSPORT,
            format!(
                "put-token for {path}: status {status}: {}",
                reply.description
            ),
            true,
            None,
        )),
    }
}

/// Watches a live connection: notices that it closed (so that the next call reconnects)
/// and puts tokens again before they expire.
async fn watch(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let Ok(mut state) = inner.state.try_lock() else {
            continue;
        };
        let Some(live) = state.live.as_mut() else {
            return;
        };
        if live.connection.is_closed() || live.cbs.has_ended() {
            let _ = live.gone.send(true);
            return;
        }
        let due: Vec<String> = live
            .authorized
            .iter()
            .filter(|(_, expires)| **expires <= SystemTime::now() + TOKEN_RENEW_MARGIN)
            .map(|(path, _)| path.clone())
            .collect();
        for path in due {
            if let Err(error) = authorize(&inner.namespace, live, &path).await {
                tracing::warn!(messaging.system = "servicebus", path = %path, %error, "cannot renew the token");
            }
        }
    }
}

fn attach_error(path: &str, error: &dyn std::fmt::Debug) -> Error {
    crate::error::map_amqp_error("attach", &format!("{error:?}"), "queue or topic", path)
}

/// TLS with rustls on the ring provider and the webpki roots: built here, because rustls's
/// default builder panics when two crypto providers are linked (the AWS SDK links aws-lc).
fn tls_connector() -> std::result::Result<tokio_rustls::TlsConnector, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
