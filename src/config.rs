//! Choosing a transport: a URL such as `sqs://orders?region=eu-west-1`, or a serde
//! [`Config`] that can come from TOML, YAML, JSON or the environment.
//!
//! Both forms carry the same options under the same names; a URL's query parameters are
//! the fields of the transport's config struct. Unknown parameters are an error that lists
//! the valid ones.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Error, Result};

/// The environment variable read by [`Config::from_env_or`].
pub const URL_ENV: &str = "CLOUDBUS_URL";

/// Which transport to use, and its options.
///
/// Parse one from a URL with [`Config::from_url`] (or `str::parse`), or deserialize it:
///
/// ```
/// let from_url: cloudbus::Config = "memory://orders?visibility=5s".parse()?;
/// let from_json: cloudbus::Config = serde_json::from_str(
///     r#"{ "transport": "memory", "entity": "orders", "visibility": "5s" }"#,
/// ).unwrap();
/// assert_eq!(from_url, from_json);
/// # Ok::<(), cloudbus::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "transport", rename_all = "lowercase")]
#[non_exhaustive]
pub enum Config {
    /// The in-process broker (`memory://`), always available.
    Memory(MemoryConfig),
    /// Amazon SQS (`sqs://`), feature `aws`.
    Sqs(SqsConfig),
    /// Amazon SNS fanning out to SQS queues (`sns://`), feature `aws`.
    Sns(SnsConfig),
    /// Azure Service Bus (`servicebus://`), feature `azure`.
    #[serde(rename = "servicebus")]
    ServiceBus(ServiceBusConfig),
}

/// Options of the in-memory transport: `memory://<entity>[/$deadletter][?subscription=<name>&...]`.
///
/// Entities live in one process-wide broker and are shared by name. An entity is a queue
/// (competing consumers) until a subscription is opened on it; from then on it is a topic
/// and every subscription gets every message published to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// The queue or topic name. `memory://` alone means `default`.
    #[serde(default = "default_entity")]
    pub entity: String,
    /// The subscription to receive from, making the entity a topic.
    #[serde(default)]
    pub subscription: Option<String>,
    /// Address the dead-letter queue of the queue or subscription (`/$deadletter` in a URL).
    #[serde(default)]
    pub dead_letter: bool,
    /// Create the entity (and subscription) if missing. Default `true`; with `false`, a
    /// missing entity is [`Error::NotFound`].
    #[serde(default = "yes")]
    pub create: bool,
    /// How long a received message stays invisible before it is redelivered. Default 30 s.
    #[serde(default = "default_visibility", with = "duration")]
    pub visibility: Duration,
    /// Deliveries after which a message is dead-lettered. Default 10.
    #[serde(default = "default_max_deliveries")]
    pub max_deliveries: u32,
    /// Messages an entity holds at most (a publish beyond fails, transiently). Default 100,000.
    #[serde(default = "default_capacity")]
    pub capacity: usize,
    /// Largest message in bytes (payload plus attribute keys and values). Default 1 MiB.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            entity: default_entity(),
            subscription: None,
            dead_letter: false,
            create: true,
            visibility: default_visibility(),
            max_deliveries: default_max_deliveries(),
            capacity: default_capacity(),
            max_message_size: default_max_message_size(),
        }
    }
}

/// Options of the SQS transport: `sqs://<queue-name or queue URL>[?region=..&endpoint=..&...]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqsConfig {
    /// The queue name (a `.fifo` suffix makes a FIFO queue) or its full URL.
    pub queue: String,
    /// AWS region; by default from the standard AWS configuration chain.
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint URL override, e.g. `http://127.0.0.1:4566` for LocalStack.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Create the queue (and its `-dlq` dead-letter queue) if missing. Default `false`.
    #[serde(default)]
    pub create: bool,
    /// Long-poll time of each receive call, at most 20 s. Default 20 s.
    #[serde(default = "default_sqs_wait", with = "duration")]
    pub wait: Duration,
    /// Visibility timeout for received messages; by default the queue's own.
    #[serde(default, with = "opt_duration")]
    pub visibility: Option<Duration>,
    /// With `create`: receives after which SQS moves a message to the dead-letter queue. Default 10.
    #[serde(default = "default_max_deliveries")]
    pub max_receive_count: u32,
    /// Coalesce concurrent `publish` calls into batch calls. Default `true`.
    #[serde(default = "yes")]
    pub batching: bool,
    /// With `batching`: how long a batch may wait to fill while other batch calls are in
    /// flight (a lone publish goes out at once; past the linger, a batch that is not full
    /// waits on only while more than one other call is in flight). Default 5 ms.
    #[serde(default = "default_linger", with = "duration")]
    pub linger: Duration,
    /// With `batching`: messages per batch call at most. Default and maximum 10.
    #[serde(default = "default_aws_batch_size")]
    pub batch_size: usize,
}

/// Options of the SNS transport: `sns://<topic name or ARN>[?subscription=<queue>&...]`.
///
/// Publishing goes to the topic; receiving goes through the SQS queue named by
/// `subscription`, which is subscribed to the topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnsConfig {
    /// The topic name (a `.fifo` suffix makes a FIFO topic) or its ARN.
    pub topic: String,
    /// The SQS queue subscribed to the topic, for receiving.
    #[serde(default)]
    pub subscription: Option<String>,
    /// AWS region; by default from the standard AWS configuration chain.
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint URL override, e.g. `http://127.0.0.1:4566` for LocalStack.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Create the topic, the queue, the subscription and the queue policy if missing.
    #[serde(default)]
    pub create: bool,
    /// Long-poll time of each receive call, at most 20 s. Default 20 s.
    #[serde(default = "default_sqs_wait", with = "duration")]
    pub wait: Duration,
    /// Visibility timeout for received messages; by default the queue's own.
    #[serde(default, with = "opt_duration")]
    pub visibility: Option<Duration>,
    /// With `create`: receives after which SQS moves a message to the dead-letter queue. Default 10.
    #[serde(default = "default_max_deliveries")]
    pub max_receive_count: u32,
    /// Coalesce concurrent `publish` calls into batch calls. Default `true`.
    #[serde(default = "yes")]
    pub batching: bool,
    /// With `batching`: how long a batch may wait to fill while other batch calls are in
    /// flight (a lone publish goes out at once; past the linger, a batch that is not full
    /// waits on only while more than one other call is in flight). Default 5 ms.
    #[serde(default = "default_linger", with = "duration")]
    pub linger: Duration,
    /// With `batching`: messages per batch call at most. Default and maximum 10.
    #[serde(default = "default_aws_batch_size")]
    pub batch_size: usize,
}

/// How a Service Bus receiver takes messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiveMode {
    /// Lock each message until it is settled (at-least-once). The default.
    #[default]
    PeekLock,
    /// Remove each message as it is received (at-most-once).
    ReceiveAndDelete,
}

/// Where a Service Bus Entra ID token comes from (used with [`ServiceBusConfig::namespace`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Credential {
    /// The managed identity of the Azure host (VM, App Service, Container Apps, Functions):
    /// how most production services authenticate. The default.
    #[default]
    ManagedIdentity,
    /// Azure Kubernetes Service workload identity: `AZURE_TENANT_ID`, `AZURE_CLIENT_ID` and
    /// `AZURE_FEDERATED_TOKEN_FILE`, as the AKS webhook sets them.
    WorkloadIdentity,
    /// A developer's sign-in: the Azure CLI (`az login`), then the Azure Developer CLI.
    Developer,
}

/// Options of the Service Bus transport:
/// `servicebus://<queue or topic>[/$deadletter][?subscription=<name>&...]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceBusConfig {
    /// The queue or topic name.
    pub entity: String,
    /// The subscription to receive from (for a topic).
    #[serde(default)]
    pub subscription: Option<String>,
    /// Connection string (SAS key or SAS token form); by default read from
    /// `AZURE_SERVICEBUS_CONNECTION_STRING`. Leave it unset and set `namespace` to
    /// authenticate with Entra ID instead.
    #[serde(default, skip_serializing)]
    pub connection_string: Option<Secret>,
    /// The fully qualified namespace, e.g. `my-ns.servicebus.windows.net`, to reach with an
    /// Entra ID token from `credential` instead of a connection string. A bare name such as
    /// `my-ns` means `my-ns.servicebus.windows.net` (the public cloud).
    #[serde(default)]
    pub namespace: Option<String>,
    /// With `namespace`: where the Entra ID token comes from. Default `managed_identity`.
    #[serde(default)]
    pub credential: Credential,
    /// With `credential = managed_identity` or `workload_identity`: the client id of the
    /// identity (a user-assigned managed identity); by default the system-assigned identity,
    /// or `AZURE_CLIENT_ID` for workload identity.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Peek-lock (default) or receive-and-delete.
    #[serde(default)]
    pub receive_mode: ReceiveMode,
    /// Messages the receiver may fetch ahead. Default 0.
    #[serde(default)]
    pub prefetch: u32,
    /// The entity requires sessions: ordering keys become session ids (messages without one
    /// get their message id), and a subscriber takes sessions one at a time.
    #[serde(default)]
    pub sessions: bool,
    /// With `sessions`: receive from this session (ordering key) only.
    #[serde(default)]
    pub session: Option<String>,
    /// Address the dead-letter queue of the queue or subscription (`/$deadletter` in a URL).
    #[serde(default)]
    pub dead_letter: bool,
    /// Largest message in bytes: 256 KiB on the standard tier (the default), up to 100 MiB on premium.
    #[serde(default = "default_servicebus_max_message_size")]
    pub max_message_size: usize,
    /// Coalesce concurrent `publish` calls into batches: a publisher sends one transfer at a
    /// time, and the messages published meanwhile go together in the next one (no linger
    /// needed). Default `true`.
    #[serde(default = "yes")]
    pub batching: bool,
    /// With `batching`: messages per transfer at most. Default 100 (a batch is also
    /// limited to `max_message_size` bytes).
    #[serde(default = "default_servicebus_batch_size")]
    pub batch_size: usize,
    /// Receivers a subscriber opens, each a link on a connection of its own: a receiver
    /// serves one receive or settlement at a time, so more receivers let a
    /// [`Consumer`](crate::Consumer) keep several receives and settlements going at once.
    /// Default 1; at most 32; with `session` (one pinned session), 1.
    #[serde(default = "one")]
    pub receivers: usize,
}

/// A secret string (a connection string or key). Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }

    /// The secret itself. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Config {
    /// Parses a URL such as `memory://orders`, `sqs://orders?region=eu-west-1` or
    /// `servicebus://events?subscription=audit`.
    pub fn from_url(url: &str) -> Result<Config> {
        let parsed = ParsedUrl::parse(url)?;
        match parsed.scheme.as_str() {
            "memory" => memory_from_url(parsed).map(Config::Memory),
            "sqs" => sqs_from_url(parsed).map(Config::Sqs),
            "sns" => sns_from_url(parsed).map(Config::Sns),
            "servicebus" => servicebus_from_url(parsed).map(Config::ServiceBus),
            other => Err(Error::config(format!(
                "unknown scheme `{other}://` in `{}`; use memory://, sqs://, sns:// or servicebus://",
                redact_url(url)
            ))),
        }
    }

    /// Reads the URL from the `CLOUDBUS_URL` environment variable, or uses `default` when
    /// it is unset or empty.
    pub fn from_env_or(default: &str) -> Result<Config> {
        match std::env::var(URL_ENV) {
            Ok(url) if !url.trim().is_empty() => Config::from_url(url.trim()),
            _ => Config::from_url(default),
        }
    }

    /// The same entity with `subscription` set: the way to receive from a topic.
    /// Fails for SQS, whose queues have no subscriptions.
    pub fn with_subscription(&self, subscription: &str) -> Result<Config> {
        let mut config = self.clone();
        match &mut config {
            Config::Memory(c) => c.subscription = Some(subscription.to_string()),
            Config::Sns(c) => c.subscription = Some(subscription.to_string()),
            Config::ServiceBus(c) => c.subscription = Some(subscription.to_string()),
            Config::Sqs(_) => {
                return Err(Error::Unsupported {
                    transport: "sqs",
                    feature: "subscriptions (an SQS queue is not a topic; use sns:// for fan-out)"
                        .into(),
                });
            }
        }
        Ok(config)
    }

    /// The dead-letter queue of the queue or subscription this config receives from: for
    /// SQS (and the queue of an SNS subscription), the `<queue>-dlq` that `create=true` makes.
    pub fn dead_letter_queue(&self) -> Result<Config> {
        match self {
            Config::Memory(c) => Ok(Config::Memory(MemoryConfig {
                dead_letter: true,
                ..c.clone()
            })),
            Config::Sqs(c) => Ok(Config::Sqs(SqsConfig {
                queue: sqs_dead_letter_name(&c.queue),
                create: false,
                ..c.clone()
            })),
            Config::Sns(c) => {
                let queue = c.subscription.as_ref().ok_or_else(|| {
                    Error::config(format!(
                        "sns://{} has no subscription, so no dead-letter queue: add ?subscription=<queue>",
                        c.topic
                    ))
                })?;
                Ok(Config::Sqs(SqsConfig {
                    queue: sqs_dead_letter_name(queue),
                    region: c.region.clone(),
                    endpoint: c.endpoint.clone(),
                    create: false,
                    wait: c.wait,
                    visibility: c.visibility,
                    max_receive_count: c.max_receive_count,
                    batching: c.batching,
                    linger: c.linger,
                    batch_size: c.batch_size,
                }))
            }
            Config::ServiceBus(c) => Ok(Config::ServiceBus(ServiceBusConfig {
                dead_letter: true,
                sessions: false,
                session: None,
                ..c.clone()
            })),
        }
    }

    /// The transport's name: `memory`, `sqs`, `sns` or `servicebus`.
    pub fn transport(&self) -> &'static str {
        match self {
            Config::Memory(_) => "memory",
            Config::Sqs(_) => "sqs",
            Config::Sns(_) => "sns",
            Config::ServiceBus(_) => "servicebus",
        }
    }
}

impl std::str::FromStr for Config {
    type Err = Error;

    fn from_str(url: &str) -> Result<Config> {
        Config::from_url(url)
    }
}

/// Anything [`crate::connect_publisher`] and [`crate::connect_subscriber`] accept: a URL
/// (`&str`, `String`) or a [`Config`].
pub trait IntoConfig {
    /// Converts into a [`Config`], validating it.
    fn into_config(self) -> Result<Config>;
}

impl IntoConfig for &str {
    fn into_config(self) -> Result<Config> {
        Config::from_url(self)
    }
}

impl IntoConfig for String {
    fn into_config(self) -> Result<Config> {
        Config::from_url(&self)
    }
}

impl IntoConfig for &String {
    fn into_config(self) -> Result<Config> {
        Config::from_url(self)
    }
}

impl IntoConfig for Config {
    fn into_config(self) -> Result<Config> {
        Ok(self)
    }
}

impl IntoConfig for &Config {
    fn into_config(self) -> Result<Config> {
        Ok(self.clone())
    }
}

/// The suffix of a path that addresses the dead-letter queue of a queue or subscription.
pub const DEAD_LETTER_SUFFIX: &str = "/$deadletter";

/// A URL split into scheme, path (percent-decoded) and query parameters, with helpers that
/// take parameters by name so that leftovers can be reported as unknown.
struct ParsedUrl {
    original: String,
    scheme: String,
    path: String,
    params: BTreeMap<String, String>,
}

impl ParsedUrl {
    fn parse(url: &str) -> Result<ParsedUrl> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            Error::config(format!(
                "`{}` is not a cloudbus URL: expected <scheme>://<name>, e.g. memory://orders or sqs://orders",
                redact_url(url)
            ))
        })?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let path = percent_encoding::percent_decode_str(path)
            .decode_utf8()
            .map_err(|_| {
                Error::config(format!(
                    "the name in `{}` is not valid UTF-8 after percent-decoding",
                    redact_url(url)
                ))
            })?
            .into_owned();
        let mut params = BTreeMap::new();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            if params.insert(key.to_string(), value.to_string()).is_some() {
                return Err(Error::config(format!(
                    "query parameter `{key}` is given twice in `{}`",
                    redact_url(url)
                )));
            }
        }
        Ok(ParsedUrl {
            original: redact_url(url),
            scheme: scheme.to_ascii_lowercase(),
            path,
            params,
        })
    }

    fn take(&mut self, key: &str) -> Option<String> {
        self.params.remove(key)
    }

    fn take_bool(&mut self, key: &str, default: bool) -> Result<bool> {
        match self.take(key).as_deref() {
            None => Ok(default),
            Some("" | "true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(other) => Err(Error::config(format!(
                "`{key}={other}` in `{}`: expected true or false",
                self.original
            ))),
        }
    }

    fn take_parsed<T: std::str::FromStr>(&mut self, key: &str, default: T) -> Result<T> {
        match self.take(key) {
            None => Ok(default),
            Some(value) => value.parse().map_err(|_| {
                Error::config(format!(
                    "`{key}={value}` in `{}`: expected a whole number",
                    self.original
                ))
            }),
        }
    }

    fn take_duration(&mut self, key: &str) -> Result<Option<Duration>> {
        match self.take(key) {
            None => Ok(None),
            Some(value) => parse_duration(&value).map(Some).map_err(|rule| {
                Error::config(format!("`{key}={value}` in `{}`: {rule}", self.original))
            }),
        }
    }

    /// Fails if any parameter was not taken, listing the valid ones.
    fn finish(self, valid: &[&str]) -> Result<()> {
        match self.params.keys().next() {
            None => Ok(()),
            Some(unknown) => Err(Error::config(format!(
                "unknown query parameter `{unknown}` in `{}`; valid parameters for {}:// are: {}",
                self.original,
                self.scheme,
                valid.join(", ")
            ))),
        }
    }

    /// The path, which must name an entity.
    fn entity(&self, what: &str) -> Result<String> {
        if self.path.is_empty() {
            return Err(Error::config(format!(
                "`{}` names no {what}: use {}://<{what}>",
                self.original, self.scheme
            )));
        }
        Ok(self.path.clone())
    }
}

fn memory_from_url(mut url: ParsedUrl) -> Result<MemoryConfig> {
    let defaults = MemoryConfig::default();
    let mut entity = if url.path.is_empty() {
        default_entity()
    } else {
        url.path.clone()
    };
    let dead_letter = match entity.strip_suffix(DEAD_LETTER_SUFFIX) {
        Some(base) => {
            entity = base.to_string();
            true
        }
        None => false,
    };
    let config = MemoryConfig {
        entity,
        subscription: url.take("subscription"),
        dead_letter,
        create: url.take_bool("create", defaults.create)?,
        visibility: url
            .take_duration("visibility")?
            .unwrap_or(defaults.visibility),
        max_deliveries: url.take_parsed("max_deliveries", defaults.max_deliveries)?,
        capacity: url.take_parsed("capacity", defaults.capacity)?,
        max_message_size: url.take_parsed("max_message_size", defaults.max_message_size)?,
    };
    url.finish(&[
        "subscription",
        "create",
        "visibility",
        "max_deliveries",
        "capacity",
        "max_message_size",
    ])?;
    Ok(config)
}

fn sqs_from_url(mut url: ParsedUrl) -> Result<SqsConfig> {
    let config = SqsConfig {
        queue: url.entity("queue")?,
        region: url.take("region"),
        endpoint: url.take("endpoint"),
        create: url.take_bool("create", false)?,
        wait: url.take_duration("wait")?.unwrap_or(default_sqs_wait()),
        visibility: url.take_duration("visibility")?,
        max_receive_count: url.take_parsed("max_receive_count", default_max_deliveries())?,
        batching: url.take_bool("batching", true)?,
        linger: url.take_duration("linger")?.unwrap_or(default_linger()),
        batch_size: url.take_parsed("batch_size", default_aws_batch_size())?,
    };
    url.finish(&[
        "region",
        "endpoint",
        "create",
        "wait",
        "visibility",
        "max_receive_count",
        "batching",
        "linger",
        "batch_size",
    ])?;
    Ok(config)
}

fn sns_from_url(mut url: ParsedUrl) -> Result<SnsConfig> {
    let config = SnsConfig {
        topic: url.entity("topic")?,
        subscription: url.take("subscription"),
        region: url.take("region"),
        endpoint: url.take("endpoint"),
        create: url.take_bool("create", false)?,
        wait: url.take_duration("wait")?.unwrap_or(default_sqs_wait()),
        visibility: url.take_duration("visibility")?,
        max_receive_count: url.take_parsed("max_receive_count", default_max_deliveries())?,
        batching: url.take_bool("batching", true)?,
        linger: url.take_duration("linger")?.unwrap_or(default_linger()),
        batch_size: url.take_parsed("batch_size", default_aws_batch_size())?,
    };
    url.finish(&[
        "subscription",
        "region",
        "endpoint",
        "create",
        "wait",
        "visibility",
        "max_receive_count",
        "batching",
        "linger",
        "batch_size",
    ])?;
    Ok(config)
}

fn servicebus_from_url(mut url: ParsedUrl) -> Result<ServiceBusConfig> {
    let receive_mode = match url.take("receive_mode").as_deref() {
        None | Some("peek_lock") => ReceiveMode::PeekLock,
        Some("receive_and_delete") => ReceiveMode::ReceiveAndDelete,
        Some(other) => {
            return Err(Error::config(format!(
                "`receive_mode={other}` in `{}`: expected peek_lock or receive_and_delete",
                url.original
            )));
        }
    };
    let mut entity = url.entity("queue or topic")?;
    let dead_letter = match entity.strip_suffix(DEAD_LETTER_SUFFIX) {
        Some(base) => {
            entity = base.to_string();
            true
        }
        None => false,
    };
    let session = url.take("session");
    let credential = match url.take("credential").as_deref() {
        None | Some("managed_identity") => Credential::ManagedIdentity,
        Some("workload_identity") => Credential::WorkloadIdentity,
        Some("developer") => Credential::Developer,
        Some(other) => {
            return Err(Error::config(format!(
                "`credential={other}` in `{}`: expected managed_identity, workload_identity or developer",
                url.original
            )));
        }
    };
    let config = ServiceBusConfig {
        entity,
        subscription: url.take("subscription"),
        connection_string: None,
        namespace: url.take("namespace"),
        credential,
        client_id: url.take("client_id"),
        receive_mode,
        prefetch: url.take_parsed("prefetch", 0)?,
        sessions: url.take_bool("sessions", false)? || session.is_some(),
        session,
        dead_letter,
        max_message_size: url
            .take_parsed("max_message_size", default_servicebus_max_message_size())?,
        batching: url.take_bool("batching", true)?,
        batch_size: url.take_parsed("batch_size", default_servicebus_batch_size())?,
        receivers: url.take_parsed("receivers", one())?,
    };
    url.finish(&[
        "subscription",
        "receive_mode",
        "prefetch",
        "sessions",
        "session",
        "max_message_size",
        "namespace",
        "credential",
        "client_id",
        "batching",
        "batch_size",
        "receivers",
    ])?;
    Ok(config)
}

/// The name of the dead-letter queue cloudbus creates for an SQS queue (or queue URL):
/// `<name>-dlq`, or `<base>-dlq.fifo` for a FIFO queue.
pub fn sqs_dead_letter_name(queue: &str) -> String {
    match queue.strip_suffix(".fifo") {
        Some(base) => format!("{base}-dlq.fifo"),
        None => format!("{queue}-dlq"),
    }
}

/// A URL with any `user:password@` part replaced, for error messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(start), Some(at)) if at > start => {
            format!("{}://<redacted>@{}", &url[..start], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// Parses a duration: a number of seconds (`30`, `0.5`) or a human-readable duration
/// (`500ms`, `2m`, `1h 30m`).
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds)
            .map_err(|_| format!("`{text}` is not a valid number of seconds"));
    }
    humantime::parse_duration(text).map_err(|e| {
        format!("`{text}` is not a duration ({e}); use seconds (30) or a unit (500ms, 2m)")
    })
}

fn default_entity() -> String {
    "default".to_string()
}
fn yes() -> bool {
    true
}
fn default_visibility() -> Duration {
    Duration::from_secs(30)
}
fn default_max_deliveries() -> u32 {
    10
}
fn default_capacity() -> usize {
    100_000
}
fn default_max_message_size() -> usize {
    1024 * 1024
}
fn default_sqs_wait() -> Duration {
    Duration::from_secs(20)
}
fn default_linger() -> Duration {
    Duration::from_millis(5)
}

fn default_aws_batch_size() -> usize {
    10
}

fn one() -> usize {
    1
}

fn default_servicebus_batch_size() -> usize {
    100
}

fn default_servicebus_max_message_size() -> usize {
    256 * 1024
}

/// Serde for durations: a number of seconds or a human-readable string; written as a string.
mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(f64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Seconds(s) => s.to_string(),
            Raw::Text(t) => t,
        };
        parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// Serde for optional durations, as [`duration`].
mod opt_duration {
    use super::*;

    pub fn serialize<S: Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super::duration")] Duration);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_url_defaults() {
        let Config::Memory(m) = Config::from_url("memory://").unwrap() else {
            panic!("not memory")
        };
        assert_eq!(m, MemoryConfig::default());
    }

    #[test]
    fn memory_url_with_options_and_dead_letter() {
        let c = Config::from_url(
            "memory://events/$deadletter?subscription=audit&visibility=500ms&max_deliveries=3&create=false",
        )
        .unwrap();
        let Config::Memory(m) = c else { panic!() };
        assert_eq!(m.entity, "events");
        assert!(m.dead_letter);
        assert_eq!(m.subscription.as_deref(), Some("audit"));
        assert_eq!(m.visibility, Duration::from_millis(500));
        assert_eq!(m.max_deliveries, 3);
        assert!(!m.create);
    }

    #[test]
    fn unknown_parameter_lists_valid_ones() {
        let e = Config::from_url("memory://q?visibilty=5").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("`visibilty`"), "{text}");
        assert!(text.contains("visibility, max_deliveries"), "{text}");
    }

    #[test]
    fn bad_values_name_the_parameter() {
        let text = Config::from_url("memory://q?visibility=soon")
            .unwrap_err()
            .to_string();
        assert!(text.contains("visibility=soon"), "{text}");
        let text = Config::from_url("sqs://q?create=maybe")
            .unwrap_err()
            .to_string();
        assert!(text.contains("create=maybe"), "{text}");
    }

    #[test]
    fn unknown_scheme_and_missing_scheme() {
        assert!(matches!(
            Config::from_url("kafka://x"),
            Err(Error::Config { .. })
        ));
        assert!(matches!(
            Config::from_url("orders"),
            Err(Error::Config { .. })
        ));
    }

    #[test]
    fn cloud_urls_parse() {
        let Config::Sqs(s) = Config::from_url(
            "sqs://orders.fifo?region=eu-west-1&endpoint=http://127.0.0.1:4566&wait=5",
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(s.queue, "orders.fifo");
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:4566"));
        assert_eq!(s.wait, Duration::from_secs(5));
        let Config::Sns(s) = Config::from_url("sns://events?subscription=audit").unwrap() else {
            panic!()
        };
        assert_eq!(s.subscription.as_deref(), Some("audit"));
        let Config::ServiceBus(s) =
            Config::from_url("servicebus://events?subscription=a&receive_mode=receive_and_delete")
                .unwrap()
        else {
            panic!()
        };
        assert_eq!(s.receive_mode, ReceiveMode::ReceiveAndDelete);
        assert_eq!(s.namespace, None);
        assert_eq!(s.credential, Credential::ManagedIdentity);
        assert!(Config::from_url("sqs://").is_err());
    }

    #[test]
    fn servicebus_receivers_option() {
        let receivers = |url: &str| match Config::from_url(url).unwrap() {
            Config::ServiceBus(s) => s.receivers,
            _ => panic!(),
        };
        assert_eq!(receivers("servicebus://orders"), 1);
        assert_eq!(receivers("servicebus://orders?receivers=4"), 4);
        let from_json: Config = serde_json::from_value(serde_json::json!({
            "transport": "servicebus", "entity": "orders", "receivers": 2
        }))
        .unwrap();
        let Config::ServiceBus(s) = from_json else {
            panic!()
        };
        assert_eq!(s.receivers, 2);
        let text = Config::from_url("servicebus://orders?receivers=many")
            .unwrap_err()
            .to_string();
        assert!(text.contains("receivers"), "{text}");
    }

    #[test]
    fn servicebus_entra_id_options() {
        let Config::ServiceBus(s) = Config::from_url(
            "servicebus://orders?namespace=my-ns.servicebus.windows.net&credential=workload_identity&client_id=abc",
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(s.namespace.as_deref(), Some("my-ns.servicebus.windows.net"));
        assert_eq!(s.credential, Credential::WorkloadIdentity);
        assert_eq!(s.client_id.as_deref(), Some("abc"));
        let from_json: Config = serde_json::from_value(serde_json::json!({
            "transport": "servicebus", "entity": "orders",
            "namespace": "my-ns", "credential": "developer"
        }))
        .unwrap();
        let Config::ServiceBus(s) = from_json else {
            panic!()
        };
        assert_eq!(s.credential, Credential::Developer);
        let text = Config::from_url("servicebus://orders?namespace=n&credential=password")
            .unwrap_err()
            .to_string();
        assert!(text.contains("credential=password"), "{text}");
        assert!(text.contains("managed_identity"), "{text}");
    }

    #[test]
    fn config_from_json_and_toml_like_values() {
        let c: Config = serde_json::from_value(serde_json::json!({
            "transport": "sqs", "queue": "orders", "create": true, "visibility": 45
        }))
        .unwrap();
        let Config::Sqs(s) = c else { panic!() };
        assert_eq!(s.visibility, Some(Duration::from_secs(45)));
        assert!(s.create);
        let bad = serde_json::from_value::<Config>(serde_json::json!({
            "transport": "memory", "entity": "q", "visibilty": 1
        }));
        assert!(bad.unwrap_err().to_string().contains("visibilty"));
    }

    #[test]
    fn secrets_never_show() {
        let s = Secret::new("Endpoint=sb://x;SharedAccessKey=abc123");
        assert!(!format!("{s:?} {s}").contains("abc123"));
        let text = Config::from_url("kafka://user:hunter2@host/q")
            .unwrap_err()
            .to_string();
        assert!(!text.contains("hunter2"), "{text}");
    }
}
