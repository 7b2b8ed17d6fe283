//! Azure Service Bus: `servicebus://<queue or topic>[?subscription=<name>]`, on the
//! `azservicebus` AMQP 1.0 client.
//!
//! `azservicebus` senders and receivers take `&mut self` for every call and are not `Sync`,
//! so each cloudbus publisher and subscriber owns one in a task of its own and talks to it
//! through a channel. A receiver's task also settles the messages it received (AMQP
//! settles on the receiving link), renews locks that [`Delivery::extend`] asked to keep,
//! and splits long receive waits into short slices so that settlements never wait long
//! behind an idle long poll.
//!
//! Settlement: ack = complete; `nack(ZERO)` = abandon; `nack(delay)` keeps the message
//! locked (renewing the lock) until the delay has passed and then abandons it, so it is
//! redelivered no sooner than the delay, with its delivery count plus one, in its place in
//! its session; `dead_letter` = dead-letter with reason and description; `extend` renews
//! the lock, repeatedly until the requested time. If the process dies meanwhile, the lock
//! simply expires and the message is redelivered (possibly before the nack delay).
//!
//! Ordering keys need a session-enabled entity (`?sessions=true`): the key is the session
//! id. Such an entity needs a session id on every message, so messages without a key go to
//! one of 16 `cloudbus-unordered-<n>` sessions (by a hash of the message id), which
//! subscribers report as "no ordering key".

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use std::panic::AssertUnwindSafe;

use async_trait::async_trait;
use azservicebus::core::BasicRetryPolicy;
use azservicebus::receiver::DeadLetterOptions;
use azservicebus::{
    ServiceBusClient, ServiceBusClientOptions, ServiceBusConnectionStringProperties,
    ServiceBusMessage, ServiceBusReceiveMode, ServiceBusReceivedMessage, ServiceBusReceiver,
    ServiceBusReceiverOptions, ServiceBusSender, ServiceBusSenderOptions,
    ServiceBusSessionReceiver, ServiceBusSessionReceiverOptions, SubQueue,
};
use azure_core::credentials::TokenCredential;
use azure_identity::{
    DefaultAzureCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use fe2o3_amqp_types::messaging::{ApplicationProperties, Body};
use fe2o3_amqp_types::primitives::{OrderedMap, SimpleValue, Value};
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};

use crate::batcher::{Batcher, Limits, SendBatch};
use crate::config::{Credential, ReceiveMode, Secret, ServiceBusConfig};
use crate::subscriber::{DeliveryInfo, Settle, check_receive_max};
use crate::{Delivery, Error, Message, Publisher, Result, Subscriber};

const TRANSPORT: &str = "servicebus";
/// The environment variable read when the config has no connection string.
pub const CONNECTION_STRING_ENV: &str = "AZURE_SERVICEBUS_CONNECTION_STRING";
/// The longest a receive waits in one call to the client, so that settlements queued
/// behind it wait at most this long.
const RECEIVE_SLICE: Duration = Duration::from_millis(500);
/// After the first message of a receive, how long to wait for more.
const FOLLOW_UP_WAIT: Duration = Duration::from_millis(10);
/// How often the receiver's task looks at locks to renew and delayed nacks to release.
const MAINTENANCE: Duration = Duration::from_millis(250);
/// A session not received from for this long is released (once its deliveries are settled).
const SESSION_IDLE: Duration = Duration::from_secs(1);
/// Renew a held lock when it has less than this left.
const RENEW_MARGIN: Duration = Duration::from_secs(2);
/// Service Bus limit on message ids and session ids.
const MAX_ID_LEN: usize = 128;
/// Allowance for the AMQP encoding around payload and properties, in the size check.
const ENCODING_OVERHEAD: usize = 256;

type Client = ServiceBusClient<BasicRetryPolicy>;

/// How to reach the namespace. Neither form is ever logged.
enum Connection {
    /// A connection string; `emulator` when it says `UseDevelopmentEmulator=true`.
    ConnectionString { secret: Secret, emulator: bool },
    /// A fully qualified namespace reached with an Entra ID token.
    Token {
        namespace: String,
        credential: Arc<dyn TokenCredential>,
    },
}

fn connection(config: &ServiceBusConfig) -> Result<Connection> {
    if let Some(namespace) = &config.namespace {
        if config.connection_string.is_some() {
            return Err(Error::config(
                "servicebus:// has both `connection_string` and `namespace`: set one (a \
                 connection string authenticates with its key; `namespace` with an Entra ID token)",
            ));
        }
        return Ok(Connection::Token {
            namespace: fully_qualified(namespace)?,
            credential: token_credential(config)?,
        });
    }
    let secret = match &config.connection_string {
        Some(secret) => secret.clone(),
        None => Secret::new(std::env::var(CONNECTION_STRING_ENV).map_err(|_| {
            Error::config(format!(
                "servicebus:// needs credentials: set {CONNECTION_STRING_ENV} or the \
                 `connection_string` config field, or `namespace` (with `credential`) for Entra ID"
            ))
        })?),
    };
    let properties =
        ServiceBusConnectionStringProperties::parse(secret.expose()).map_err(|_| {
            Error::config(
                "the Service Bus connection string is malformed (its contents are not shown): \
             expected Endpoint=sb://<namespace>/;SharedAccessKeyName=...;SharedAccessKey=... \
             or ...;SharedAccessSignature=...",
            )
        })?;
    let emulator = secret
        .expose()
        .split(';')
        .filter_map(|part| part.split_once('='))
        .any(|(k, v)| {
            k.trim().eq_ignore_ascii_case("UseDevelopmentEmulator")
                && v.trim().eq_ignore_ascii_case("true")
        });
    if emulator {
        let port = properties.endpoint().and_then(|e| e.port());
        if port.is_some_and(|p| p != 5672) {
            return Err(Error::Unsupported {
                transport: TRANSPORT,
                feature: format!(
                    "emulator port {}: the azservicebus client always dials port 5672; run the \
                     emulator on <host>:5672 (several can run side by side on distinct loopback \
                     addresses such as 127.0.0.7)",
                    port.unwrap_or_default()
                ),
            });
        }
    }
    Ok(Connection::ConnectionString { secret, emulator })
}

/// `my-ns` means `my-ns.servicebus.windows.net`; a name with a dot is taken as it is.
fn fully_qualified(namespace: &str) -> Result<String> {
    let namespace = namespace
        .trim()
        .trim_start_matches("sb://")
        .trim_end_matches('/');
    if namespace.is_empty() || namespace.contains(['/', ';', ' ', ':']) {
        return Err(Error::InvalidInput {
            transport: TRANSPORT,
            field: "namespace",
            rule: format!(
                "`{namespace}` is not a namespace host name: use <name>.servicebus.windows.net \
                 (or the bare <name> for the public cloud)"
            ),
        });
    }
    Ok(if namespace.contains('.') {
        namespace.to_string()
    } else {
        format!("{namespace}.servicebus.windows.net")
    })
}

/// The Entra ID credential `config.credential` names. Tokens are fetched (and refreshed) by
/// the client when it connects, so a missing identity shows up as `Unauthorized` then.
fn token_credential(config: &ServiceBusConfig) -> Result<Arc<dyn TokenCredential>> {
    let created: azure_core::Result<Arc<dyn TokenCredential>> = match config.credential {
        Credential::ManagedIdentity => {
            ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                user_assigned_id: config.client_id.clone().map(UserAssignedId::ClientId),
                ..Default::default()
            }))
            .map(|c| c as Arc<dyn TokenCredential>)
        }
        Credential::WorkloadIdentity => {
            WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
                client_id: config.client_id.clone(),
                ..Default::default()
            }))
            .map(|c| c as Arc<dyn TokenCredential>)
        }
        Credential::Developer => {
            DefaultAzureCredential::new().map(|c| c as Arc<dyn TokenCredential>)
        }
    };
    created.map_err(|e| {
        let needs = match config.credential {
            Credential::ManagedIdentity => "a managed identity on the Azure host",
            Credential::WorkloadIdentity => {
                "AZURE_TENANT_ID, AZURE_CLIENT_ID (or `client_id`) and AZURE_FEDERATED_TOKEN_FILE, \
                 as the AKS workload identity webhook sets them"
            }
            Credential::Developer => "the Azure CLI (`az login`) or the Azure Developer CLI",
        };
        Error::config(format!(
            "the Service Bus Entra ID credential `{:?}` cannot be created (it needs {needs}): {}",
            config.credential,
            redact(&e.to_string())
        ))
    })
}

async fn client(connection: &Connection) -> Result<Client> {
    let options = ServiceBusClientOptions::default();
    let (client, name) = match connection {
        Connection::ConnectionString {
            secret,
            emulator: true,
        } => (
            ServiceBusClient::<BasicRetryPolicy>::unsecured()
                .new_from_connection_string(secret.expose(), options)
                .await,
            "(from the connection string)",
        ),
        Connection::ConnectionString { secret, .. } => (
            ServiceBusClient::new_from_connection_string(secret.expose(), options).await,
            "(from the connection string)",
        ),
        Connection::Token {
            namespace,
            credential,
        } => (
            ServiceBusClient::new_from_token_credential(
                namespace.clone(),
                credential.clone(),
                options,
            )
            .await,
            namespace.as_str(),
        ),
    };
    client.map_err(|e| map_error("connect", &e, "namespace", name))
}

/// Blanks the values of `SharedAccessKey=` and `SharedAccessSignature=` in a client's
/// message, in case it quotes a connection string or token.
fn redact(text: &str) -> String {
    let mut out = text.to_string();
    for key in ["SharedAccessKey=", "SharedAccessSignature=", "sig="] {
        let mut from = 0;
        while let Some(at) = out[from..].find(key).map(|i| from + i + key.len()) {
            let end = out[at..]
                .find([';', '&', '"', ' ', ','])
                .map_or(out.len(), |i| at + i);
            out.replace_range(at..end, "<redacted>");
            from = at + "<redacted>".len();
        }
    }
    out
}

/// Maps a client error to a cloudbus error by its AMQP condition.
fn map_error(action: &str, error: &azure_core::Error, entity: &'static str, name: &str) -> Error {
    let credential = matches!(error.kind(), azure_core::error::ErrorKind::Credential);
    let text = redact(&format!("{error:?} {error}"));
    let error = redact(&error.to_string());
    let lower = text.to_ascii_lowercase();
    if lower.contains("not-found") || lower.contains("notfound") || lower.contains("not found") {
        return Error::NotFound {
            transport: TRANSPORT,
            entity,
            name: name.to_string(),
        };
    }
    if credential || lower.contains("unauthorized") || lower.contains("unauthorised") {
        return Error::Unauthorized {
            transport: TRANSPORT,
            message: format!("{action}: {error}"),
            source: None,
        };
    }
    if lower.contains("message-size-exceeded") {
        return Error::transport(
            TRANSPORT,
            format!("{action}: the broker refused the message as too large: {error}"),
            false,
            None,
        );
    }
    let permanent = [
        "invalid-field",
        "not-allowed",
        "not-implemented",
        "decode-error",
    ];
    let transient = !permanent.iter().any(|p| lower.contains(p));
    Error::transport(TRANSPORT, format!("{action}: {error}"), transient, None)
}

fn lock_lost(message_id: &str) -> Error {
    Error::LockLost {
        transport: TRANSPORT,
        message_id: message_id.to_string(),
    }
}

fn is_lock_lost(error: &azure_core::Error) -> bool {
    let text = format!("{error:?} {error}").to_ascii_lowercase();
    text.contains("lock-lost") || text.contains("locklost") || text.contains("lock lost")
}

fn closed(what: &'static str) -> Error {
    Error::closed(TRANSPORT, what)
}

/// Session ids given to messages without an ordering key on a session-enabled entity
/// (which needs a session id on every message): one of [`UNORDERED_SESSIONS`] sessions
/// chosen by a hash of the message id, so that unordered messages spread over a few
/// sessions that consumers can take in parallel, instead of one session each.
const UNORDERED_SESSION_PREFIX: &str = "cloudbus-unordered-";
/// How many sessions carry messages without an ordering key.
const UNORDERED_SESSIONS: u64 = 16;

fn unordered_session(message_id: &str) -> String {
    // FNV-1a: stable across processes and versions, unlike the std hasher.
    let hash = message_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{UNORDERED_SESSION_PREFIX}{}", hash % UNORDERED_SESSIONS)
}

/// Converts a cloudbus message for the wire, checking limits first.
fn to_servicebus(message: &Message, sessions: bool, limit: usize) -> Result<ServiceBusMessage> {
    let invalid = |field: &'static str, rule: String| Error::InvalidInput {
        transport: TRANSPORT,
        field,
        rule,
    };
    if message.id.is_empty() || message.id.len() > MAX_ID_LEN {
        return Err(invalid(
            "id",
            format!("Service Bus message ids are 1 to {MAX_ID_LEN} characters"),
        ));
    }
    if message
        .deduplication_id
        .as_ref()
        .is_some_and(|d| d != &message.id)
    {
        return Err(Error::Unsupported {
            transport: TRANSPORT,
            feature: "a deduplication id other than the message id: Service Bus detects \
                      duplicates by message id, so set the message id instead"
                .into(),
        });
    }
    let session_id = match (&message.ordering_key, sessions) {
        (Some(key), true) => Some(key.clone()),
        (None, true) => Some(unordered_session(&message.id)),
        (None, false) => None,
        (Some(_), false) => {
            return Err(Error::Unsupported {
                transport: TRANSPORT,
                feature: "ordering keys on an entity without sessions: create it with \
                          RequiresSession and connect with ?sessions=true"
                    .into(),
            });
        }
    };
    if session_id.as_ref().is_some_and(|s| s.len() > MAX_ID_LEN) {
        return Err(invalid(
            "ordering_key",
            format!("Service Bus session ids are at most {MAX_ID_LEN} characters"),
        ));
    }
    let headers = [
        &message.content_type,
        &message.correlation_id,
        &message.subject,
    ];
    let size = message.payload_and_attributes_len()
        + message.id.len()
        + headers
            .iter()
            .filter_map(|h| h.as_ref())
            .map(String::len)
            .sum::<usize>()
        + session_id.as_ref().map_or(0, String::len)
        + ENCODING_OVERHEAD;
    if size > limit {
        return Err(Error::TooLarge {
            transport: TRANSPORT,
            size,
            limit,
        });
    }
    let mut out = ServiceBusMessage::new(message.payload.to_vec());
    out.set_message_id(message.id.clone())
        .map_err(|e| invalid("id", e.to_string()))?;
    out.set_content_type(message.content_type.clone());
    out.set_correlation_id(message.correlation_id.clone());
    out.set_subject(message.subject.clone());
    if let Some(session_id) = session_id {
        out.set_session_id(session_id)
            .map_err(|e| invalid("ordering_key", e.to_string()))?;
    }
    if let Some(ttl) = message.time_to_live {
        out.set_time_to_live(ttl)
            .map_err(|e| invalid("time_to_live", e.to_string()))?;
    }
    if let Some(at) = message.deliver_at.filter(|at| *at > SystemTime::now()) {
        out.set_scheduled_enqueue_time(at.into());
    }
    if !message.attributes.is_empty() {
        let map: OrderedMap<String, SimpleValue> = message
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), SimpleValue::String(v.clone())))
            .collect();
        *out.application_properties_mut() = Some(ApplicationProperties(map));
    }
    Ok(out)
}

/// The text form of an application property from another producer: numbers and booleans
/// as written, timestamps as unix milliseconds, uuids hyphenated, binary as base64.
fn simple_text(value: &SimpleValue) -> String {
    use base64::Engine;
    match value {
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.0.clone(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Float(n) => n.to_string(),
        SimpleValue::Double(n) => n.to_string(),
        SimpleValue::Char(c) => c.to_string(),
        SimpleValue::Timestamp(t) => t.milliseconds().to_string(),
        SimpleValue::Uuid(u) => uuid::Uuid::from_bytes(*u.as_inner()).to_string(),
        SimpleValue::Binary(b) => {
            base64::engine::general_purpose::STANDARD.encode(b.as_ref() as &[u8])
        }
        SimpleValue::Null => String::new(),
        other => format!("{other:?}"),
    }
}

/// Converts a received message; `sessions` says whether a session id is an ordering key.
fn from_servicebus(received: &ServiceBusReceivedMessage, sessions: bool) -> Message {
    let raw = received.raw_amqp_message();
    let payload: Vec<u8> = match &raw.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
        Body::Value(value) => match &value.0 {
            Value::String(s) => s.clone().into_bytes(),
            Value::Binary(b) => b.to_vec(),
            other => format!("{other:?}").into_bytes(),
        },
        other => format!("{other:?}").into_bytes(),
    };
    let id = received
        .message_id()
        .map(|id| id.into_owned())
        .unwrap_or_else(|| received.sequence_number().to_string());
    let mut message = Message::new(payload).with_id(id.clone());
    if let Some(ApplicationProperties(properties)) = received.application_properties() {
        message.attributes = properties
            .iter()
            .map(|(k, v)| (k.clone(), simple_text(v)))
            .collect();
    }
    message.content_type = received.content_type().map(str::to_string);
    message.correlation_id = received.correlation_id().map(|c| c.into_owned());
    message.subject = received.subject().map(str::to_string);
    message.ordering_key = received
        .session_id()
        .filter(|s| sessions && !s.starts_with(UNORDERED_SESSION_PREFIX))
        .map(str::to_string);
    message.time_to_live = received.time_to_live();
    message
}

/// Runs a client on a thread of its own with a current-thread tokio runtime: `open`
/// connects and returns the task to run; its error is returned here.
///
/// fe2o3-amqp 0.14 (under azservicebus) registers a sent delivery as awaiting settlement
/// only after the frame has left; on a multi-threaded runtime the broker's reply can arrive
/// first and be lost, and a send then hangs until azservicebus retries it and panics
/// ("called after complete"). With all of a client's tasks on one thread that cannot happen.
async fn on_client_thread<F, Open, Task>(open: F) -> Result<()>
where
    F: FnOnce() -> Open + Send + 'static,
    Open: std::future::Future<Output = Result<Task>> + Send + 'static,
    Task: std::future::Future<Output = ()> + Send + 'static,
{
    let (ready, opened) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("cloudbus-servicebus".into())
        .stack_size(8 * 1024 * 1024)
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready.send(Err(Error::transport(
                        TRANSPORT,
                        format!("cannot start the client's runtime: {e}"),
                        true,
                        None,
                    )));
                    return;
                }
            };
            // Spawned rather than run by block_on, so that the (large) client futures live
            // on the heap, not on this thread's stack.
            let client = runtime.spawn(async move {
                match open().await {
                    Ok(task) => {
                        let _ = ready.send(Ok(()));
                        task.await;
                    }
                    Err(error) => {
                        let _ = ready.send(Err(error));
                    }
                }
            });
            let _ = runtime.block_on(client);
        });
    if let Err(e) = spawned {
        return Err(Error::transport(
            TRANSPORT,
            format!("cannot start the client's thread: {e}"),
            true,
            None,
        ));
    }
    opened.await.unwrap_or_else(|_| Err(closed("client")))
}

// ---------------------------------------------------------------------------------------
// Publisher

enum SendCommand {
    Send(Vec<ServiceBusMessage>, oneshot::Sender<Result<()>>),
    Close(oneshot::Sender<()>),
}

/// Publishes to a Service Bus queue or topic.
pub struct ServiceBusPublisher {
    commands: mpsc::Sender<SendCommand>,
    batcher: Option<Batcher<ServiceBusMessage>>,
    entity: String,
    sessions: bool,
    max_message_size: usize,
    closed: AtomicBool,
}

impl std::fmt::Debug for ServiceBusPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceBusPublisher")
            .field("entity", &self.entity)
            .finish_non_exhaustive()
    }
}

impl ServiceBusPublisher {
    /// Connects to the queue or topic `config` names.
    pub async fn connect(config: &ServiceBusConfig) -> Result<Self> {
        if config.subscription.is_some() || config.dead_letter {
            return Err(Error::config(format!(
                "a publisher sends to the queue or topic servicebus://{}: remove `subscription` \
                 and `/$deadletter` from its URL",
                config.entity
            )));
        }
        if config.batch_size == 0 {
            return Err(Error::config(
                "`batch_size=0`: a batch holds at least one message; use 1 or more (or batching=false)",
            ));
        }
        let (commands, incoming) = mpsc::channel(64);
        let owned = config.clone();
        on_client_thread(move || async move {
            let (client, sender) = open_sender(&owned).await?;
            Ok(run_sender(owned, client, sender, incoming))
        })
        .await?;
        // One transfer at a time (the sender's link sends one after another anyway): what
        // is published meanwhile gathers into the next batch.
        let batcher = config.batching.then(|| {
            let limits = Limits {
                max_items: config.batch_size,
                max_bytes: config.max_message_size,
                linger: Duration::ZERO,
                max_calls: 1,
            };
            let commands = commands.clone();
            let send: SendBatch<ServiceBusMessage> = Arc::new(move |batch| {
                let (commands, len) = (commands.clone(), batch.len());
                Box::pin(async move { vec![send(&commands, batch).await; len] })
            });
            Batcher::start(TRANSPORT, "publisher", limits, send)
        });
        Ok(ServiceBusPublisher {
            commands,
            batcher,
            entity: config.entity.clone(),
            sessions: config.sessions,
            max_message_size: config.max_message_size,
            closed: AtomicBool::new(false),
        })
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(closed("publisher"));
        }
        Ok(())
    }
}

/// Sends `messages` as one transfer through the sender's task.
async fn send(
    commands: &mpsc::Sender<SendCommand>,
    messages: Vec<ServiceBusMessage>,
) -> Result<()> {
    let (reply, outcome) = oneshot::channel();
    commands
        .send(SendCommand::Send(messages, reply))
        .await
        .map_err(|_| closed("publisher"))?;
    outcome.await.unwrap_or_else(|_| Err(closed("publisher")))
}

async fn run_sender(
    config: ServiceBusConfig,
    client: Client,
    sender: ServiceBusSender,
    mut commands: mpsc::Receiver<SendCommand>,
) {
    let mut link = Some((client, sender));
    while let Some(command) = commands.recv().await {
        match command {
            SendCommand::Send(messages, reply) => {
                if link.is_none() {
                    // The last send failed inside the client: reconnect.
                    link = open_sender(&config).await.ok();
                }
                let Some((_, sender)) = link.as_mut() else {
                    let _ = reply.send(Err(Error::transport(
                        TRANSPORT,
                        "cannot reconnect to Service Bus",
                        true,
                        None,
                    )));
                    continue;
                };
                let retry = messages.clone();
                let outcome = AssertUnwindSafe(sender.send_messages(messages))
                    .catch_unwind()
                    .await;
                let outcome = match outcome {
                    Ok(outcome) => {
                        outcome.map_err(|e| map_error("send", &e, "queue or topic", &config.entity))
                    }
                    Err(_) => {
                        // azservicebus 0.25 can panic when it retries a batch whose first
                        // attempt failed after sending. Reconnect and send once more: the
                        // messages may then arrive twice, which at-least-once allows (and
                        // duplicate detection by message id removes).
                        tracing::error!(
                            messaging.system = "servicebus",
                            messaging.destination.name = %config.entity,
                            "the Service Bus client panicked while sending; reconnecting and sending again"
                        );
                        link = open_sender(&config).await.ok();
                        match link.as_mut() {
                            Some((_, sender)) => {
                                match AssertUnwindSafe(sender.send_messages(retry))
                                    .catch_unwind()
                                    .await
                                {
                                    Ok(outcome) => outcome.map_err(|e| {
                                        map_error("send", &e, "queue or topic", &config.entity)
                                    }),
                                    Err(_) => {
                                        link = None;
                                        Err(internal_send_failure())
                                    }
                                }
                            }
                            None => Err(internal_send_failure()),
                        }
                    }
                };
                let _ = reply.send(outcome);
            }
            SendCommand::Close(reply) => {
                let _ = reply.send(());
                break;
            }
        }
    }
    if let Some((client, sender)) = link {
        let _ = sender.dispose().await;
        let _ = client.dispose().await;
    }
}

fn internal_send_failure() -> Error {
    Error::transport(
        TRANSPORT,
        "the Service Bus client failed internally while sending; the messages may or may not have been sent",
        true,
        None,
    )
}

async fn open_sender(config: &ServiceBusConfig) -> Result<(Client, ServiceBusSender)> {
    let connection = connection(config)?;
    let mut client = client(&connection).await?;
    let sender = client
        .create_sender(config.entity.clone(), ServiceBusSenderOptions::default())
        .await
        .map_err(|e| map_error("create sender", &e, "queue or topic", &config.entity))?;
    Ok((client, sender))
}

#[async_trait]
impl Publisher for ServiceBusPublisher {
    async fn publish(&self, message: Message) -> Result<String> {
        self.check_open()?;
        let converted = to_servicebus(&message, self.sessions, self.max_message_size)?;
        match &self.batcher {
            Some(batcher) => {
                let size = message.payload_and_attributes_len() + ENCODING_OVERHEAD;
                let session = converted.session_id().map(str::to_string);
                batcher.send(converted, size, session).await?;
            }
            None => send(&self.commands, vec![converted]).await?,
        }
        Ok(message.id)
    }

    async fn publish_batch(&self, messages: Vec<Message>) -> Vec<Result<String>> {
        if let Err(error) = self.check_open() {
            return messages.iter().map(|_| Err(error.clone())).collect();
        }
        let mut outcomes: Vec<Option<Result<String>>> = messages.iter().map(|_| None).collect();
        // Batches are sent as one transfer, limited by the message size limit, with one
        // session id each (the partition key of a partitioned entity must be the same for
        // the whole batch).
        let mut batches: Vec<(Vec<usize>, Vec<ServiceBusMessage>, usize)> = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            match to_servicebus(message, self.sessions, self.max_message_size) {
                Ok(converted) => {
                    let size = message.payload_and_attributes_len() + ENCODING_OVERHEAD;
                    match batches.last_mut() {
                        Some((positions, batch, bytes))
                            if *bytes + size <= self.max_message_size
                                && batch.first().and_then(|m| m.session_id())
                                    == converted.session_id() =>
                        {
                            positions.push(i);
                            batch.push(converted);
                            *bytes += size;
                        }
                        _ => batches.push((vec![i], vec![converted], size)),
                    }
                }
                Err(error) => outcomes[i] = Some(Err(error)),
            }
        }
        for (positions, batch, _) in batches {
            let outcome = send(&self.commands, batch).await;
            for i in positions {
                outcomes[i] = Some(outcome.clone().map(|()| messages[i].id.clone()));
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(closed("publisher"))))
            .collect()
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if let Some(batcher) = &self.batcher {
            batcher.close().await;
        }
        let (reply, done) = oneshot::channel();
        if self.commands.send(SendCommand::Close(reply)).await.is_ok() {
            let _ = done.await;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Subscriber

enum Command {
    Receive {
        max: usize,
        wait: Duration,
        reply: oneshot::Sender<Result<Vec<Delivery>>>,
    },
    Settle {
        token: uuid::Uuid,
        how: Settlement,
        reply: oneshot::Sender<Result<SystemTime>>,
    },
    Close(oneshot::Sender<()>),
}

enum Settlement {
    Complete,
    Abandon,
    /// Keep locked until the delay passed, then abandon.
    AbandonAfter(Duration),
    DeadLetter {
        reason: String,
        description: String,
    },
    /// Keep locked for this long from now.
    Extend(Duration),
}

/// Receives from a Service Bus queue, subscription or dead-letter queue, through
/// `receivers` receivers (each a link on a connection and client thread of its own).
pub struct ServiceBusSubscriber {
    receivers: Vec<ReceiverHandle>,
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
        let subscriber = ServiceBusSubscriber {
            receivers,
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
        let task = ReceiverTask {
            path: entity_path(&config),
            sessions: config.sessions,
            config,
            client,
            receivers,
            in_flight: HashMap::new(),
            commands: weak,
            backlog: VecDeque::new(),
            last_receive: Instant::now(),
        };
        Ok(task.run(incoming))
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

fn entity_path(config: &ServiceBusConfig) -> String {
    match &config.subscription {
        Some(s) => format!("{}/Subscriptions/{s}", config.entity),
        None => config.entity.clone(),
    }
}

/// Connects and opens the receiver (or, for sessions, starts the session accepter).
async fn open_receivers(config: &ServiceBusConfig) -> Result<(Option<Client>, Receivers)> {
    let connection = connection(config)?;
    let client = client(&connection).await?;
    let receive_mode = match config.receive_mode {
        ReceiveMode::PeekLock => ServiceBusReceiveMode::PeekLock,
        ReceiveMode::ReceiveAndDelete => ServiceBusReceiveMode::ReceiveAndDelete,
    };
    let path = entity_path(config);
    let mut client = Some(client);
    let receivers = if config.sessions && !config.dead_letter {
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

fn entity_kind(config: &ServiceBusConfig) -> &'static str {
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
}

/// The receivers a subscriber task owns.
enum Receivers {
    Plain(Box<ServiceBusReceiver>),
    /// After shutdown.
    Closed,
    Sessions {
        /// Asks the accepter task for a session.
        want: mpsc::Sender<()>,
        /// A session was asked for and not yet handed over.
        requested: bool,
        /// Sessions locked by the accepter task, handed over one at a time.
        accepted: mpsc::Receiver<Result<ServiceBusSessionReceiver>>,
        accepter: tokio::task::JoinHandle<()>,
        /// Receiving from one given session only.
        pinned: bool,
        /// The session being received from.
        current: Option<Box<ServiceBusSessionReceiver>>,
        /// Sessions no longer received from, kept until their deliveries are settled.
        draining: Vec<ServiceBusSessionReceiver>,
    },
}

/// A received, unsettled message.
struct InFlight {
    message: ServiceBusReceivedMessage,
    /// The session it came from (its receiver settles it).
    session: Option<String>,
    /// Keep the lock until then (extend, or a delayed nack).
    hold_until: Option<Instant>,
    /// Abandon when the hold ends (a delayed nack).
    abandon_after_hold: bool,
}

struct ReceiverTask {
    /// What to reconnect to after a failure of the client.
    config: ServiceBusConfig,
    /// The connection; `None` once shut down.
    client: Option<Client>,
    path: String,
    sessions: bool,
    receivers: Receivers,
    in_flight: HashMap<uuid::Uuid, InFlight>,
    /// For building deliveries; weak, so dropping the subscriber ends the task.
    commands: mpsc::WeakSender<Command>,
    /// Commands that arrived while a receive was in progress.
    backlog: VecDeque<Command>,
    /// When a receive last ended: a session not received from for a while is released.
    last_receive: Instant,
}

/// One settlement operation on whichever receiver owns the message.
macro_rules! on_receiver {
    ($task:expr, $session:expr, |$r:ident| $body:expr) => {{
        match &mut $task.receivers {
            Receivers::Closed => None,
            Receivers::Plain($r) => Some($body),
            Receivers::Sessions {
                current, draining, ..
            } => {
                let owner = current
                    .iter_mut()
                    .map(|r| &mut **r)
                    .chain(draining.iter_mut())
                    .find(|r| Some(r.session_id()) == $session.as_deref());
                match owner {
                    Some($r) => Some($body),
                    None => None,
                }
            }
        }
    }};
}

/// Receives on a plain or session receiver: waits up to `slice` for the first message,
/// then takes whatever else is there at once (the client waits for all `max` otherwise).
macro_rules! quick_receive {
    ($receiver:expr, $max:expr, $slice:expr, $path:expr) => {{
        async {
            let mut got = $receiver
                .receive_messages_with_max_wait_time(1, $slice)
                .await
                .map_err(|e| map_error("receive", &e, "queue", $path))?;
            if !got.is_empty() && $max > 1 {
                let more = $receiver
                    .receive_messages_with_max_wait_time($max - 1, FOLLOW_UP_WAIT)
                    .await
                    .map_err(|e| map_error("receive", &e, "queue", $path))?;
                got.extend(more);
            }
            Ok::<_, Error>(got)
        }
        .await
    }};
}

impl ReceiverTask {
    async fn run(mut self, mut incoming: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(MAINTENANCE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let command = match self.backlog.pop_front() {
                Some(command) => command,
                None => tokio::select! {
                    command = incoming.recv() => match command {
                        Some(command) => command,
                        None => break,
                    },
                    _ = tick.tick() => {
                        self.maintain().await;
                        continue;
                    }
                },
            };
            match command {
                Command::Receive { max, wait, reply } => {
                    let outcome = AssertUnwindSafe(self.receive(max, wait, &mut incoming))
                        .catch_unwind()
                        .await;
                    let outcome = match outcome {
                        Ok(outcome) => outcome,
                        Err(_) => self.recover().await,
                    };
                    let _ = reply.send(outcome);
                }
                Command::Settle { token, how, reply } => {
                    let outcome = AssertUnwindSafe(self.settle(token, how))
                        .catch_unwind()
                        .await;
                    let outcome = match outcome {
                        Ok(outcome) => outcome,
                        Err(_) => self.recover::<SystemTime>().await,
                    };
                    let _ = reply.send(outcome);
                }
                Command::Close(reply) => {
                    self.shutdown().await;
                    let _ = reply.send(());
                    return;
                }
            }
        }
        self.shutdown().await;
    }

    /// After the client panicked: drop its state (unsettled deliveries lose their locks and
    /// are redelivered), reconnect, and report a transient error for the failed call.
    async fn recover<T>(&mut self) -> Result<T> {
        tracing::error!(
            messaging.system = "servicebus",
            messaging.destination.name = %self.path,
            "the Service Bus client panicked; reconnecting (unsettled deliveries will be redelivered)"
        );
        self.in_flight.clear();
        let _ = AssertUnwindSafe(self.shutdown()).catch_unwind().await;
        match open_receivers(&self.config).await {
            Ok((client, receivers)) => {
                self.client = client;
                self.receivers = receivers;
            }
            Err(error) => {
                tracing::error!(%error, "cannot reconnect to Service Bus; will retry on the next call");
            }
        }
        Err(Error::transport(
            TRANSPORT,
            "the Service Bus client failed internally; reconnected, please retry",
            true,
            None,
        ))
    }

    async fn shutdown(&mut self) {
        let receivers = std::mem::replace(&mut self.receivers, Receivers::Closed);
        match receivers {
            Receivers::Plain(receiver) => {
                let _ = receiver.dispose().await;
            }
            Receivers::Sessions {
                accepter,
                current,
                draining,
                ..
            } => {
                accepter.abort();
                for receiver in current.into_iter().map(|r| *r).chain(draining) {
                    let _ = receiver.dispose().await;
                }
            }
            Receivers::Closed => {}
        }
        if let Some(client) = self.client.take() {
            let _ = client.dispose().await;
        }
    }

    /// Receives up to `max` messages within `wait`, in slices, settling queued commands
    /// between slices.
    async fn receive(
        &mut self,
        max: usize,
        wait: Duration,
        incoming: &mut mpsc::Receiver<Command>,
    ) -> Result<Vec<Delivery>> {
        if matches!(self.receivers, Receivers::Closed) {
            // An earlier reconnect failed: try again.
            let (client, receivers) = open_receivers(&self.config).await?;
            self.client = client;
            self.receivers = receivers;
        }
        let deadline = Instant::now() + wait;
        loop {
            while let Ok(command) = incoming.try_recv() {
                match command {
                    Command::Settle { token, how, reply } => {
                        let _ = reply.send(self.settle(token, how).await);
                    }
                    other => self.backlog.push_back(other),
                }
            }
            self.maintain().await;
            let left = deadline.saturating_duration_since(Instant::now());
            let slice = left.clamp(Duration::from_millis(20), RECEIVE_SLICE);
            let received = self
                .receive_slice(max.min(u32::MAX as usize) as u32, slice)
                .await;
            self.last_receive = Instant::now();
            let received = received?;
            if !received.is_empty() || Instant::now() >= deadline {
                return Ok(self.deliveries(received));
            }
        }
    }

    async fn receive_slice(
        &mut self,
        max: u32,
        slice: Duration,
    ) -> Result<Vec<(ServiceBusReceivedMessage, Option<String>)>> {
        let path = self.path.clone();
        match &mut self.receivers {
            Receivers::Closed => Err(closed("subscriber")),
            Receivers::Plain(receiver) => Ok(quick_receive!(receiver, max, slice, &path)?
                .into_iter()
                .map(|m| (m, None))
                .collect()),
            Receivers::Sessions {
                want,
                requested,
                accepted,
                pinned,
                current,
                draining,
                ..
            } => {
                if current.is_none() {
                    if !*requested {
                        *requested = want.try_send(()).is_ok();
                    }
                    match tokio::time::timeout(slice, accepted.recv()).await {
                        Err(_) => return Ok(Vec::new()),
                        Ok(None) => return Err(closed("subscriber")),
                        Ok(Some(Err(error))) => {
                            *requested = false;
                            return Err(error);
                        }
                        Ok(Some(Ok(receiver))) => {
                            *requested = false;
                            *current = Some(Box::new(receiver));
                        }
                    }
                }
                let Some(receiver) = current.as_mut() else {
                    return Ok(Vec::new());
                };
                let session = receiver.session_id().to_string();
                let got = quick_receive!(receiver, max, slice, &session)?;
                if got.is_empty() && !*pinned {
                    // The session has nothing more right now: take another one next time, and
                    // keep this one locked until its deliveries are settled (that keeps order).
                    if let Some(done) = current.take() {
                        draining.push(*done);
                    }
                }
                Ok(got
                    .into_iter()
                    .map(|m| (m, Some(session.clone())))
                    .collect())
            }
        }
    }

    fn deliveries(
        &mut self,
        received: Vec<(ServiceBusReceivedMessage, Option<String>)>,
    ) -> Vec<Delivery> {
        let mut deliveries = Vec::with_capacity(received.len());
        for (raw, session) in received {
            let message = from_servicebus(&raw, self.sessions);
            let token = uuid::Uuid::from_bytes(*raw.lock_token().as_inner());
            let info = DeliveryInfo {
                delivery_count: raw.delivery_count().unwrap_or(1),
                enqueued_at: raw.enqueued_time().into(),
                transport_id: raw.sequence_number().to_string(),
                locked_until: raw.locked_until().map(Into::into),
            };
            let Some(commands) = self.commands.upgrade() else {
                continue;
            };
            let settle = ServiceBusSettle {
                commands,
                token,
                message_id: message.id.clone(),
            };
            self.in_flight.insert(
                token,
                InFlight {
                    message: raw,
                    session,
                    hold_until: None,
                    abandon_after_hold: false,
                },
            );
            deliveries.push(Delivery::new(message, info, Box::new(settle)));
        }
        deliveries
    }

    async fn settle(&mut self, token: uuid::Uuid, how: Settlement) -> Result<SystemTime> {
        let Some(entry) = self.in_flight.get_mut(&token) else {
            return Err(lock_lost(&token.to_string()));
        };
        let message_id = entry
            .message
            .message_id()
            .map(|m| m.into_owned())
            .unwrap_or_default();
        match how {
            Settlement::Extend(by) => {
                entry.hold_until = Some(Instant::now() + by);
                self.renew(token).await?;
                return Ok(SystemTime::now() + by);
            }
            Settlement::AbandonAfter(delay) => {
                entry.hold_until = Some(Instant::now() + delay);
                entry.abandon_after_hold = true;
                let short = entry
                    .message
                    .locked_until()
                    .map(SystemTime::from)
                    .and_then(|l| l.duration_since(SystemTime::now()).ok())
                    .is_none_or(|left| left < RENEW_MARGIN);
                if short {
                    self.renew(token).await?;
                }
                return Ok(SystemTime::now());
            }
            _ => {}
        }
        let Some(entry) = self.in_flight.remove(&token) else {
            return Err(lock_lost(&message_id));
        };
        let session = entry.session.clone();
        let message = entry.message;
        let outcome = on_receiver!(self, session, |r| match &how {
            Settlement::Complete => r.complete_message(&message).await,
            Settlement::DeadLetter {
                reason,
                description,
            } => {
                r.dead_letter_message(
                    &message,
                    DeadLetterOptions {
                        dead_letter_reason: Some(reason.clone()),
                        dead_letter_error_description: Some(description.clone()),
                        properties_to_modify: None,
                    },
                )
                .await
            }
            _ => r.abandon_message(&message, None).await,
        });
        self.release_drained_sessions().await;
        match outcome {
            None => Err(lock_lost(&message_id)),
            Some(Ok(())) => Ok(SystemTime::now()),
            Some(Err(e)) if is_lock_lost(&e) => Err(lock_lost(&message_id)),
            Some(Err(e)) => Err(map_error("settle", &e, "queue", &self.path)),
        }
    }

    async fn renew(&mut self, token: uuid::Uuid) -> Result<()> {
        let Some(entry) = self.in_flight.get_mut(&token) else {
            return Err(lock_lost(&token.to_string()));
        };
        let session = entry.session.clone();
        let message = &mut entry.message;
        let outcome = on_receiver!(self, session, |r| r.renew_message_lock(message).await);
        match outcome {
            Some(Ok(())) => Ok(()),
            None => Err(lock_lost(&token.to_string())),
            Some(Err(e)) if is_lock_lost(&e) => {
                self.in_flight.remove(&token);
                Err(lock_lost(&token.to_string()))
            }
            Some(Err(e)) => Err(map_error("renew lock", &e, "queue", &self.path)),
        }
    }

    /// Renews held locks that are about to expire, abandons delayed nacks whose delay has
    /// passed, and forgets deliveries whose lock expired (they are redelivered).
    async fn maintain(&mut self) {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut expired = Vec::new();
        let mut to_abandon = Vec::new();
        let mut to_renew = Vec::new();
        for (token, entry) in &self.in_flight {
            let locked_until: Option<SystemTime> = entry.message.locked_until().map(Into::into);
            let left = locked_until.and_then(|l| l.duration_since(wall).ok());
            let held = entry.hold_until.is_some_and(|until| until > now);
            let hold_ended = entry.hold_until.is_some_and(|until| until <= now);
            if hold_ended && entry.abandon_after_hold {
                to_abandon.push(*token);
            } else if held && left.is_none_or(|l| l < RENEW_MARGIN) {
                to_renew.push(*token);
            } else if !held && left.is_none() && locked_until.is_some() {
                expired.push(*token);
            }
        }
        for token in expired {
            self.in_flight.remove(&token);
        }
        for token in to_renew {
            if let Err(error) = self.renew(token).await {
                tracing::warn!(messaging.system = "servicebus", messaging.destination.name = %self.path, %error, "cannot renew a held lock");
            }
        }
        for token in to_abandon {
            if let Some(entry) = self.in_flight.get_mut(&token) {
                entry.hold_until = None;
            }
            if let Err(error) = self.settle(token, Settlement::Abandon).await {
                tracing::warn!(messaging.system = "servicebus", messaging.destination.name = %self.path, %error, "cannot abandon a nacked message after its delay");
            }
        }
        // Session locks: renew those of sessions we still receive from or settle in.
        if let Receivers::Sessions {
            current,
            draining,
            requested,
            accepted,
            ..
        } = &mut self.receivers
        {
            // A session asked for arrived between receives: take it now so its lock is renewed.
            if current.is_none() && *requested {
                if let Ok(Ok(receiver)) = accepted.try_recv() {
                    *requested = false;
                    *current = Some(Box::new(receiver));
                }
            }
            // Nobody receives: stop holding the session (it is released once its deliveries
            // are settled), so that other consumers can take it.
            if now.duration_since(self.last_receive) > SESSION_IDLE {
                if let Some(idle) = current.take() {
                    draining.push(*idle);
                }
            }
            for receiver in current
                .iter_mut()
                .map(|r| &mut **r)
                .chain(draining.iter_mut())
            {
                let left = SystemTime::from(receiver.session_locked_until())
                    .duration_since(wall)
                    .unwrap_or_default();
                if left < RENEW_MARGIN {
                    if let Err(error) = receiver.renew_session_lock().await {
                        tracing::warn!(messaging.system = "servicebus", session = receiver.session_id(), %error, "cannot renew a session lock");
                    }
                }
            }
        }
        // Holds that ended without an abandon (extend) just stop being renewed.
        for entry in self.in_flight.values_mut() {
            if entry.hold_until.is_some_and(|until| until <= now) && !entry.abandon_after_hold {
                entry.hold_until = None;
            }
        }
        self.release_drained_sessions().await;
    }

    /// Closes session receivers that are no longer received from and have nothing unsettled.
    async fn release_drained_sessions(&mut self) {
        let Receivers::Sessions { draining, .. } = &mut self.receivers else {
            return;
        };
        let busy: Vec<String> = self
            .in_flight
            .values()
            .filter_map(|e| e.session.clone())
            .collect();
        let (keep, release): (Vec<_>, Vec<_>) = std::mem::take(draining)
            .into_iter()
            .partition(|r| busy.iter().any(|s| s == r.session_id()));
        *draining = keep;
        for receiver in release {
            let _ = receiver.dispose().await;
        }
    }
}

/// Locks a session each time the subscriber asks (`wanted`) and hands it over through
/// `found`: the pinned one, or the next available one. Runs on a connection of its own,
/// so waiting for a session never holds up receiving or settling.
async fn accept_sessions(
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

struct ServiceBusSettle {
    commands: mpsc::Sender<Command>,
    token: uuid::Uuid,
    message_id: String,
}

impl ServiceBusSettle {
    async fn request(&self, how: Settlement) -> Result<SystemTime> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_from_client_messages() {
        let text = redact(
            "bad: Endpoint=sb://x/;SharedAccessKeyName=root;SharedAccessKey=abc123==;EntityPath=q sig=zzz&se=1",
        );
        assert!(!text.contains("abc123") && !text.contains("zzz"), "{text}");
        assert!(text.contains("SharedAccessKeyName=root"), "{text}");
    }

    #[test]
    fn unordered_sessions_are_stable_and_few() {
        assert_eq!(unordered_session("a"), unordered_session("a"));
        let distinct: std::collections::HashSet<String> = (0..1000)
            .map(|i| unordered_session(&i.to_string()))
            .collect();
        assert_eq!(distinct.len() as u64, UNORDERED_SESSIONS);
        assert!(
            distinct
                .iter()
                .all(|s| s.starts_with(UNORDERED_SESSION_PREFIX))
        );
    }

    #[test]
    fn connection_strings_select_tls_and_check_the_port() {
        let config = |cs: &str| {
            let mut config = servicebus_config("servicebus://q");
            config.connection_string = Some(Secret::new(cs));
            config
        };
        let emulator = connection(&config(
            "Endpoint=sb://127.0.0.7;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true;",
        ))
        .unwrap();
        assert!(matches!(
            emulator,
            Connection::ConnectionString { emulator: true, .. }
        ));
        let cloud = connection(&config(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=v",
        ))
        .unwrap();
        assert!(matches!(
            cloud,
            Connection::ConnectionString {
                emulator: false,
                ..
            }
        ));
        let other_port = connection(&config(
            "Endpoint=sb://localhost:5673;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true;",
        ));
        assert!(matches!(other_port, Err(Error::Unsupported { .. })));
        let text = format!("{:?}", config("Endpoint=sb://x;SharedAccessKey=topsecret"));
        assert!(!text.contains("topsecret"), "{text}");
    }

    fn servicebus_config(url: &str) -> ServiceBusConfig {
        match crate::Config::from_url(url) {
            Ok(crate::Config::ServiceBus(config)) => config,
            other => panic!("{other:?}"),
        }
    }

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

    #[test]
    fn a_namespace_selects_an_entra_id_credential() {
        for (url, expected) in [
            (
                "servicebus://q?namespace=my-ns",
                "my-ns.servicebus.windows.net",
            ),
            (
                "servicebus://q?namespace=sb://my-ns.servicebus.chinacloudapi.cn/&client_id=abc",
                "my-ns.servicebus.chinacloudapi.cn",
            ),
            (
                "servicebus://q?namespace=my-ns&credential=developer",
                "my-ns.servicebus.windows.net",
            ),
        ] {
            match connection(&servicebus_config(url)) {
                Ok(Connection::Token { namespace, .. }) => assert_eq!(namespace, expected, "{url}"),
                Ok(_) => panic!("{url}: not a token credential"),
                Err(error) => panic!("{url}: {error}"),
            }
        }
        let mut both = servicebus_config("servicebus://q?namespace=my-ns");
        both.connection_string = Some(Secret::new("Endpoint=sb://x;SharedAccessKey=k"));
        let text = connection(&both)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(text.contains("set one"), "{text}");
        let bad = connection(&servicebus_config("servicebus://q?namespace=a;b"));
        assert!(matches!(bad, Err(Error::InvalidInput { field, .. }) if field == "namespace"));
    }
}
