//! The librdkafka configuration every client gets from a [`KafkaConfig`]: the brokers,
//! TLS and SASL (plain, SCRAM, Event Hubs, MSK IAM), and the client context that serves
//! MSK IAM tokens. Secrets go into librdkafka's configuration only, never into a log line
//! or an error.

use cloudbus_core::config::Secret;
use cloudbus_core::{Error, Result};
use rdkafka::ClientConfig;
use rdkafka::client::{ClientContext, OAuthToken};
use rdkafka::config::RDKafkaLogLevel;

use crate::config::{
    Auth, BROKERS_ENV, DEFAULT_BROKERS, EVENT_HUBS_ENV, KafkaConfig, PASSWORD_ENV,
};
use crate::msk::Signer;

/// What a client needs besides librdkafka's settings: the MSK IAM token signer, if any.
#[derive(Debug, Clone, Default)]
pub(crate) struct Context {
    signer: Option<Signer>,
}

/// librdkafka's own diagnostics (`debug` contexts) when set: `cgrp,protocol`, `all`...
pub const DEBUG_ENV: &str = "CLOUDBUS_KAFKA_DEBUG";

/// librdkafka's log lines as `tracing` events (target `librdkafka`).
pub(crate) fn log(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", facility, "{message}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility, "{message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
}

impl ClientContext for Context {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log(level, facility, message);
    }

    fn generate_oauth_token(
        &self,
        _config: Option<&str>,
    ) -> std::result::Result<OAuthToken, Box<dyn std::error::Error>> {
        let signer = self
            .signer
            .as_ref()
            .ok_or("OAUTHBEARER needs auth=msk_iam")?;
        let token = signer.token()?;
        Ok(OAuthToken {
            token: token.value,
            principal_name: String::new(),
            lifetime_ms: token.expires_ms,
        })
    }
}

/// Clients that only read and commit offsets (no group membership) need no rebalance hooks.
impl rdkafka::consumer::ConsumerContext for Context {}

/// librdkafka's settings for `config`, and the context to create the client with.
pub(crate) async fn settings(config: &KafkaConfig) -> Result<(ClientConfig, Context)> {
    let mut settings = ClientConfig::new();
    let mut context = Context::default();
    let tls = config.tls || matches!(config.auth, Auth::EventHubs | Auth::MskIam);
    // Event Hubs: the connection string names the namespace, which KAFKA_BROKERS (set for
    // a local broker, say) does not override; the `brokers` option does.
    let mut brokers = config.brokers.clone().or_else(|| {
        (config.auth != Auth::EventHubs)
            .then(|| std::env::var(BROKERS_ENV).ok())
            .flatten()
    });
    let sasl = match config.auth {
        Auth::None => None,
        Auth::Plain => Some("PLAIN"),
        Auth::ScramSha256 => Some("SCRAM-SHA-256"),
        Auth::ScramSha512 => Some("SCRAM-SHA-512"),
        Auth::EventHubs => Some("PLAIN"),
        Auth::MskIam => Some("OAUTHBEARER"),
    };
    match config.auth {
        Auth::None | Auth::MskIam => {}
        Auth::Plain | Auth::ScramSha256 | Auth::ScramSha512 => {
            let username = config.username.as_deref().ok_or_else(|| {
                Error::config(format!(
                    "auth={} needs `username` (and `password` or {PASSWORD_ENV})",
                    config.auth
                ))
            })?;
            let password = secret(&config.password, PASSWORD_ENV).ok_or_else(|| {
                Error::config(format!(
                    "auth={} needs a password: set the `password` config field or {PASSWORD_ENV} \
                     (never in a URL)",
                    config.auth
                ))
            })?;
            settings.set("sasl.username", username);
            settings.set("sasl.password", password.expose());
        }
        Auth::EventHubs => {
            let connection =
                secret(&config.connection_string, EVENT_HUBS_ENV).ok_or_else(|| {
                    Error::config(format!(
                        "auth=event_hubs needs the namespace's connection string: set the \
                     `connection_string` config field or {EVENT_HUBS_ENV} (never in a URL)"
                    ))
                })?;
            if brokers.is_none() {
                brokers = Some(event_hubs_brokers(connection.expose())?);
            }
            settings.set("sasl.username", "$ConnectionString");
            settings.set("sasl.password", connection.expose());
        }
    }
    if config.auth == Auth::MskIam {
        context.signer = Some(Signer::start(config.region.as_deref()).await?);
    }
    let protocol = match (tls, sasl.is_some()) {
        (false, false) => "plaintext",
        (true, false) => "ssl",
        (false, true) => "sasl_plaintext",
        (true, true) => "sasl_ssl",
    };
    settings.set(
        "bootstrap.servers",
        brokers.as_deref().unwrap_or(DEFAULT_BROKERS),
    );
    settings.set("security.protocol", protocol);
    if let Some(mechanism) = sasl {
        settings.set("sasl.mechanisms", mechanism);
    }
    if let Some(ca) = &config.tls_ca {
        settings.set("ssl.ca.location", ca);
    }
    // No topic appears because a client asked for it: create=true does that explicitly.
    settings.set("allow.auto.create.topics", "false");
    settings.set(
        "client.id",
        concat!("cloudbus-kafka/", env!("CARGO_PKG_VERSION")),
    );
    if let Ok(contexts) = std::env::var(DEBUG_ENV) {
        settings.set("debug", contexts);
        settings.set_log_level(RDKafkaLogLevel::Debug);
    }
    Ok((settings, context))
}

/// The secret in the config field, or in the environment variable `env`.
fn secret(field: &Option<Secret>, env: &str) -> Option<Secret> {
    field
        .clone()
        .or_else(|| std::env::var(env).ok().map(Secret::new))
}

/// `<namespace>.servicebus.windows.net:9093` from an Event Hubs connection string's
/// `Endpoint=sb://<namespace>.servicebus.windows.net/`.
fn event_hubs_brokers(connection_string: &str) -> Result<String> {
    let endpoint = connection_string
        .split(';')
        .filter_map(|part| part.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("Endpoint"))
        .map(|(_, v)| v.trim());
    let host = endpoint
        .and_then(|e| e.strip_prefix("sb://"))
        .map(|e| e.trim_end_matches('/'))
        .filter(|h| !h.is_empty() && !h.contains(['/', ';']));
    match host {
        Some(host) => Ok(format!("{host}:9093")),
        None => Err(Error::config(
            "the Event Hubs connection string has no Endpoint=sb://<namespace>.servicebus.windows.net/ \
             (its contents are not shown)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudbus_core::driver::TransportConfig;

    fn get<'a>(settings: &'a ClientConfig, key: &str) -> Option<&'a str> {
        settings.get(key)
    }

    #[tokio::test]
    async fn plaintext_by_default() {
        let (settings, _) = settings(&KafkaConfig::from_url("kafka://t?brokers=b:1").unwrap())
            .await
            .unwrap();
        assert_eq!(get(&settings, "bootstrap.servers"), Some("b:1"));
        assert_eq!(get(&settings, "security.protocol"), Some("plaintext"));
        assert_eq!(get(&settings, "sasl.mechanisms"), None);
    }

    #[tokio::test]
    async fn scram_over_tls_with_the_password_from_the_config() {
        let mut config =
            KafkaConfig::from_url("kafka://t?auth=scram_sha_256&username=u&tls").unwrap();
        assert!(settings(&config).await.is_err() || std::env::var(PASSWORD_ENV).is_ok());
        config.password = Some(Secret::new("hunter2"));
        let (settings, _) = settings(&config).await.unwrap();
        assert_eq!(get(&settings, "security.protocol"), Some("sasl_ssl"));
        assert_eq!(get(&settings, "sasl.mechanisms"), Some("SCRAM-SHA-256"));
        assert_eq!(get(&settings, "sasl.username"), Some("u"));
        assert_eq!(get(&settings, "sasl.password"), Some("hunter2"));
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[tokio::test]
    async fn event_hubs_from_a_connection_string() {
        let mut config = KafkaConfig::from_url("kafka://hub?auth=event_hubs").unwrap();
        let connection = "Endpoint=sb://my-ns.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=topsecret";
        config.connection_string = Some(Secret::new(connection));
        let (settings, _) = settings(&config).await.unwrap();
        assert_eq!(
            get(&settings, "bootstrap.servers"),
            Some("my-ns.servicebus.windows.net:9093")
        );
        assert_eq!(get(&settings, "security.protocol"), Some("sasl_ssl"));
        assert_eq!(get(&settings, "sasl.mechanisms"), Some("PLAIN"));
        assert_eq!(get(&settings, "sasl.username"), Some("$ConnectionString"));
        assert_eq!(get(&settings, "sasl.password"), Some(connection));
        config.connection_string = Some(Secret::new("SharedAccessKey=topsecret"));
        let text = super::settings(&config).await.unwrap_err().to_string();
        assert!(
            text.contains("Endpoint") && !text.contains("topsecret"),
            "{text}"
        );
    }
}
