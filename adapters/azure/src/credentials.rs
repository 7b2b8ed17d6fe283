//! How to reach the namespace: a connection string (SAS key or token, or the emulator's),
//! or a namespace with an Entra ID token credential; and the client made from it.

use std::sync::Arc;

use azservicebus::core::BasicRetryPolicy;
use azservicebus::{
    ServiceBusClient, ServiceBusClientOptions, ServiceBusConnectionStringProperties,
};
use azure_core::credentials::TokenCredential;
use azure_identity::{
    DefaultAzureCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use cloudbus_core::config::Secret;
use cloudbus_core::{Error, Result};

use crate::config::{Credential, ServiceBusConfig};
use crate::error::map_error;
use crate::{CONNECTION_STRING_ENV, TRANSPORT};

pub(crate) type Client = ServiceBusClient<BasicRetryPolicy>;

/// How to reach the namespace. Neither form is ever logged.
pub(crate) enum Connection {
    /// A connection string; `emulator` when it says `UseDevelopmentEmulator=true`.
    ConnectionString { secret: Secret, emulator: bool },
    /// A fully qualified namespace reached with an Entra ID token.
    Token {
        namespace: String,
        credential: Arc<dyn TokenCredential>,
    },
}

pub(crate) fn connection(config: &ServiceBusConfig) -> Result<Connection> {
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
pub(crate) fn fully_qualified(namespace: &str) -> Result<String> {
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
pub(crate) fn token_credential(config: &ServiceBusConfig) -> Result<Arc<dyn TokenCredential>> {
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

pub(crate) async fn client(connection: &Connection) -> Result<Client> {
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
pub(crate) fn redact(text: &str) -> String {
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

#[cfg(test)]
mod tests {
    use cloudbus_core::driver::TransportConfig;

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

    fn servicebus_config(url: &str) -> ServiceBusConfig {
        ServiceBusConfig::from_url(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }
}
