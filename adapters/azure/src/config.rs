//! [`ServiceBusConfig`]: `servicebus://<queue or topic>[/$deadletter][?subscription=<name>&...]`.

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::config::{ConfigUrl, Secret};
use cloudbus_core::driver::{Connect, TransportConfig};
use cloudbus_core::{Error, Inspector, Publisher, Result, Subscriber};
use serde::{Deserialize, Serialize};

use crate::{ServiceBusInspector, ServiceBusPublisher, ServiceBusSubscriber};

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
///
/// ```
/// use cloudbus_azure::ServiceBusConfig;
/// use cloudbus_core::config::Secret;
/// use cloudbus_core::driver::TransportConfig;
///
/// let mut config = ServiceBusConfig::from_url("servicebus://events?subscription=audit&receivers=2")?;
/// // Never in a URL: from a config file, or AZURE_SERVICEBUS_CONNECTION_STRING.
/// config.connection_string = Some(Secret::new("Endpoint=sb://127.0.0.1;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true;"));
/// assert_eq!(config.receivers, 2);
/// # Ok::<(), cloudbus_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ServiceBusConfig {
    /// The queue or topic name.
    pub entity: String,
    /// The subscription to receive from (for a topic).
    pub subscription: Option<String>,
    /// Connection string (SAS key or SAS token form); by default read from
    /// `AZURE_SERVICEBUS_CONNECTION_STRING`. Never in a URL. Leave it unset and set
    /// `namespace` to authenticate with Entra ID instead.
    #[serde(skip_serializing)]
    pub connection_string: Option<Secret>,
    /// The fully qualified namespace, e.g. `my-ns.servicebus.windows.net`, to reach with an
    /// Entra ID token from `credential` instead of a connection string. A bare name such as
    /// `my-ns` means `my-ns.servicebus.windows.net` (the public cloud).
    pub namespace: Option<String>,
    /// With `namespace`: where the Entra ID token comes from. Default `managed_identity`.
    pub credential: Credential,
    /// With `credential = managed_identity` or `workload_identity`: the client id of the
    /// identity (a user-assigned managed identity); by default the system-assigned identity,
    /// or `AZURE_CLIENT_ID` for workload identity.
    pub client_id: Option<String>,
    /// Peek-lock (default) or receive-and-delete.
    pub receive_mode: ReceiveMode,
    /// Messages the receiver may fetch ahead. Default 0.
    pub prefetch: u32,
    /// The entity requires sessions: ordering keys become session ids (messages without one
    /// get one of 16 `cloudbus-unordered-<n>` sessions), and a subscriber takes sessions
    /// one at a time. Implied by `session`.
    pub sessions: bool,
    /// Receive from this session (ordering key) only; implies `sessions`.
    pub session: Option<String>,
    /// Address the dead-letter queue of the queue or subscription (`/$deadletter` in a URL).
    pub dead_letter: bool,
    /// Largest message in bytes: 256 KiB on the standard tier (the default), up to 100 MiB on premium.
    pub max_message_size: usize,
    /// Coalesce concurrent `publish` calls into batches: a publisher keeps up to 4 transfers
    /// in flight, and the messages published meanwhile go together in the next one (no
    /// linger needed). Default `true`.
    pub batching: bool,
    /// With `batching`: messages per transfer at most. Default 100 (a batch is also
    /// limited to `max_message_size` bytes).
    pub batch_size: usize,
    /// Receive links a subscriber opens on its connection: a link serves one receive call
    /// at a time (settling meanwhile), so more links let a
    /// [`Consumer`](cloudbus_core::Consumer) keep several receives going at once. Default 1;
    /// at most 32; with `session` (one pinned session), 1.
    pub receivers: usize,
    /// How long a publish may take: it retries transient failures (a lost connection, a
    /// broker that is restarting or cannot be reached, one that does not answer) until
    /// then, and fails with a transient error after it. Default 60 s.
    #[serde(with = "cloudbus_core::config::duration")]
    pub publish_timeout: Duration,
}

impl Default for ServiceBusConfig {
    fn default() -> Self {
        ServiceBusConfig {
            entity: String::new(),
            subscription: None,
            connection_string: None,
            namespace: None,
            credential: Credential::default(),
            client_id: None,
            receive_mode: ReceiveMode::default(),
            prefetch: 0,
            sessions: false,
            session: None,
            dead_letter: false,
            max_message_size: 256 * 1024,
            batching: true,
            batch_size: 100,
            receivers: 1,
            publish_timeout: Duration::from_secs(60),
        }
    }
}

impl ServiceBusConfig {
    /// The defaults, on the queue or topic `entity`.
    pub fn new(entity: impl Into<String>) -> Self {
        ServiceBusConfig {
            entity: entity.into(),
            ..ServiceBusConfig::default()
        }
    }

    /// Whether the entity is session-enabled: `sessions`, or a pinned `session`.
    pub(crate) fn uses_sessions(&self) -> bool {
        self.sessions || self.session.is_some()
    }

    /// The entity path a receiver opens: `<topic>/Subscriptions/<name>` or the queue.
    pub(crate) fn path(&self) -> String {
        match &self.subscription {
            Some(s) => format!("{}/Subscriptions/{s}", self.entity),
            None => self.entity.clone(),
        }
    }

    /// The path a receiver's link opens: [`Self::path`], or its dead-letter queue.
    pub(crate) fn receive_path(&self) -> String {
        if self.dead_letter {
            format!("{}/$DeadLetterQueue", self.path())
        } else {
            self.path()
        }
    }
}

#[async_trait]
impl Connect for ServiceBusConfig {
    async fn connect_publisher(&self) -> Result<Box<dyn Publisher>> {
        Ok(Box::new(ServiceBusPublisher::connect(self).await?))
    }

    async fn connect_subscriber(&self) -> Result<Box<dyn Subscriber>> {
        Ok(Box::new(ServiceBusSubscriber::connect(self).await?))
    }

    async fn connect_inspector(&self) -> Result<Box<dyn Inspector>> {
        Ok(Box::new(ServiceBusInspector::connect(self).await?))
    }
}

impl TransportConfig for ServiceBusConfig {
    const SCHEME: &'static str = "servicebus";
    type DeadLetters = ServiceBusConfig;

    fn from_config_url(url: &ConfigUrl) -> Result<Self> {
        url.entity("queue or topic")?;
        let (entity, dead_letter) = url.dead_letter_path();
        let mut fields = vec![("entity", entity)];
        if dead_letter {
            fields.push(("dead_letter", "true"));
        }
        url.deserialize(&fields)
    }

    fn with_subscription(&self, subscription: &str) -> Result<Self> {
        Ok(ServiceBusConfig {
            subscription: Some(subscription.to_string()),
            ..self.clone()
        })
    }

    /// The dead-letter sub-queue of the queue or subscription (it has no sessions).
    fn dead_letter_queue(&self) -> Result<Self> {
        Ok(ServiceBusConfig {
            dead_letter: true,
            sessions: false,
            session: None,
            ..self.clone()
        })
    }

    /// The queue itself; a subscription's dead letters cannot go back to it alone (a
    /// message sent to the topic reaches every subscription whose rules match).
    fn redrive_target(&self) -> Result<Self> {
        match &self.subscription {
            None => Ok(ServiceBusConfig {
                dead_letter: false,
                ..self.clone()
            }),
            Some(subscription) => Err(Error::Unsupported {
                transport: "servicebus",
                feature: format!(
                    "redrive to the subscription `{subscription}` alone: a message sent to \
                     the topic `{}` reaches every subscription whose rules match; send to the \
                     topic on purpose instead",
                    self.entity
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let s = ServiceBusConfig::from_url(
            "servicebus://events?subscription=a&receive_mode=receive_and_delete",
        )
        .unwrap();
        assert_eq!(s.receive_mode, ReceiveMode::ReceiveAndDelete);
        assert_eq!(s.namespace, None);
        assert_eq!(s.credential, Credential::ManagedIdentity);
        let dlq = ServiceBusConfig::from_url("servicebus://orders/$deadletter").unwrap();
        assert!(dlq.dead_letter && dlq.entity == "orders");
        assert!(ServiceBusConfig::from_url("servicebus://").is_err());
        let timed = ServiceBusConfig::from_url("servicebus://orders?publish_timeout=5s").unwrap();
        assert_eq!(timed.publish_timeout, std::time::Duration::from_secs(5));
        assert_eq!(dlq.publish_timeout, std::time::Duration::from_secs(60));
    }

    #[test]
    fn receivers_option() {
        let receivers = |url: &str| ServiceBusConfig::from_url(url).unwrap().receivers;
        assert_eq!(receivers("servicebus://orders"), 1);
        assert_eq!(receivers("servicebus://orders?receivers=4"), 4);
        let from_json: ServiceBusConfig = serde_json::from_value(serde_json::json!({
            "entity": "orders", "receivers": 2
        }))
        .unwrap();
        assert_eq!(from_json.receivers, 2);
        let text = ServiceBusConfig::from_url("servicebus://orders?receivers=many")
            .unwrap_err()
            .to_string();
        assert!(text.contains("receivers"), "{text}");
    }

    #[test]
    fn entra_id_options() {
        let s = ServiceBusConfig::from_url(
            "servicebus://orders?namespace=my-ns.servicebus.windows.net&credential=workload_identity&client_id=abc",
        )
        .unwrap();
        assert_eq!(s.namespace.as_deref(), Some("my-ns.servicebus.windows.net"));
        assert_eq!(s.credential, Credential::WorkloadIdentity);
        assert_eq!(s.client_id.as_deref(), Some("abc"));
        let from_json: ServiceBusConfig = serde_json::from_value(serde_json::json!({
            "entity": "orders", "namespace": "my-ns", "credential": "developer"
        }))
        .unwrap();
        assert_eq!(from_json.credential, Credential::Developer);
        let text =
            ServiceBusConfig::from_url("servicebus://orders?namespace=n&credential=password")
                .unwrap_err()
                .to_string();
        assert!(text.contains("`credential`"), "{text}");
        assert!(text.contains("managed_identity"), "{text}");
    }

    #[test]
    fn a_pinned_session_means_a_session_enabled_entity_however_it_is_configured() {
        let from_url = ServiceBusConfig::from_url("servicebus://q?session=s1").unwrap();
        let from_json: ServiceBusConfig =
            serde_json::from_value(serde_json::json!({"entity": "q", "session": "s1"})).unwrap();
        assert_eq!(from_url, from_json);
        assert!(from_url.uses_sessions() && from_json.uses_sessions());
        assert!(!ServiceBusConfig::new("q").uses_sessions());
        let dlq = from_url.dead_letter_queue().unwrap();
        assert!(dlq.dead_letter && !dlq.uses_sessions());
    }

    #[test]
    fn a_connection_string_is_never_taken_from_a_url_nor_shown() {
        let text = ServiceBusConfig::from_url(
            "servicebus://q?connection_string=Endpoint%3Dsb%3A%2F%2Fx%3BSharedAccessKey%3Dtopsecret",
        )
        .unwrap_err()
        .to_string();
        assert!(
            text.contains("`connection_string`") && text.contains("secret"),
            "{text}"
        );
        assert!(!text.contains("topsecret"), "{text}");
        let mut config = ServiceBusConfig::new("q");
        config.connection_string = Some(Secret::new("Endpoint=sb://x;SharedAccessKey=topsecret"));
        assert!(!format!("{config:?}").contains("topsecret"));
        assert!(
            !serde_json::to_string(&config)
                .unwrap()
                .contains("topsecret")
        );
    }
}
