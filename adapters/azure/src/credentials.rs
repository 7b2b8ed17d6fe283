//! How to reach the namespace: a connection string (SAS key or token, or the emulator's),
//! or a namespace with an Entra ID token credential.

use std::sync::Arc;

use azure_core::credentials::TokenCredential;
use azure_identity::{
    DefaultAzureCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use cloudbus_core::config::Secret;
use cloudbus_core::{Error, Result};

use crate::config::{Credential, ServiceBusConfig};
use crate::protocol::Namespace;
use crate::protocol::token::TokenSource;
use crate::{CONNECTION_STRING_ENV, TRANSPORT};

/// The port of AMQP over TLS, and of plain AMQP (the emulator's).
const AMQPS_PORT: u16 = 5671;
const AMQP_PORT: u16 = 5672;

/// Where the namespace is and how to authenticate: from the connection string (its
/// `Endpoint`, with the port it gives, plain TCP when `UseDevelopmentEmulator=true`), or
/// the `namespace` with an Entra ID credential.
pub(crate) fn namespace(config: &ServiceBusConfig) -> Result<Namespace> {
    if let Some(namespace) = &config.namespace {
        if config.connection_string.is_some() {
            return Err(Error::config(
                "servicebus:// has both `connection_string` and `namespace`: set one (a \
                 connection string authenticates with its key; `namespace` with an Entra ID token)",
            ));
        }
        return Ok(Namespace {
            host: fully_qualified(namespace)?,
            port: AMQPS_PORT,
            tls: true,
            auth: TokenSource::EntraId(token_credential(config)?),
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
    parse_connection_string(&secret)
}

/// Parses `Endpoint=sb://<host>[:<port>]/;SharedAccessKeyName=..;SharedAccessKey=..` (or
/// `SharedAccessSignature=..`), with `UseDevelopmentEmulator=true` for plain TCP. Errors
/// never quote it.
fn parse_connection_string(secret: &Secret) -> Result<Namespace> {
    let malformed = |what: &str| {
        Error::config(format!(
            "the Service Bus connection string is malformed ({what}; its contents are not \
             shown): expected Endpoint=sb://<namespace>/;SharedAccessKeyName=...;SharedAccessKey=... \
             or Endpoint=...;SharedAccessSignature=..."
        ))
    };
    let mut endpoint = None;
    let (mut key_name, mut key, mut signature) = (None, None, None);
    let mut emulator = false;
    for part in secret.expose().split(';') {
        let Some((k, v)) = part.split_once('=') else {
            continue;
        };
        let v = v.trim();
        match k.trim().to_ascii_lowercase().as_str() {
            "endpoint" => endpoint = Some(v),
            "sharedaccesskeyname" => key_name = Some(v),
            "sharedaccesskey" => key = Some(v),
            "sharedaccesssignature" => signature = Some(v),
            "usedevelopmentemulator" => emulator = v.eq_ignore_ascii_case("true"),
            _ => {}
        }
    }
    let endpoint = endpoint.ok_or_else(|| malformed("no Endpoint"))?;
    let authority = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest)
        .trim_end_matches('/');
    let authority = authority.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (
            host,
            Some(
                port.parse::<u16>()
                    .map_err(|_| malformed("the Endpoint's port is not a number"))?,
            ),
        ),
        None => (authority, None),
    };
    if host.is_empty() {
        return Err(malformed("the Endpoint has no host"));
    }
    let auth = match (key_name, key, signature) {
        (_, _, Some(signature)) => TokenSource::SasToken(Secret::new(signature)),
        (Some(name), Some(key), None) => TokenSource::SasKey {
            name: name.to_string(),
            key: Secret::new(key),
        },
        _ => {
            return Err(malformed(
                "neither SharedAccessKeyName with SharedAccessKey nor SharedAccessSignature",
            ));
        }
    };
    Ok(Namespace {
        host: host.to_string(),
        port: port.unwrap_or(if emulator { AMQP_PORT } else { AMQPS_PORT }),
        tls: !emulator,
        auth,
    })
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
    fn connection_strings_select_tls_and_keep_the_port() {
        let config = |cs: &str| {
            let mut config = servicebus_config("servicebus://q");
            config.connection_string = Some(Secret::new(cs));
            config
        };
        let emulator = namespace(&config(
            "Endpoint=sb://127.0.0.7;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true;",
        ))
        .unwrap();
        assert_eq!(
            (emulator.host.as_str(), emulator.port, emulator.tls),
            ("127.0.0.7", 5672, false)
        );
        let cloud = namespace(&config(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=v",
        ))
        .unwrap();
        assert_eq!(
            (cloud.host.as_str(), cloud.port, cloud.tls),
            ("ns.servicebus.windows.net", 5671, true)
        );
        let other_port = namespace(&config(
            "Endpoint=sb://localhost:5673;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true;",
        ))
        .unwrap();
        assert_eq!(
            (other_port.host.as_str(), other_port.port),
            ("localhost", 5673)
        );
        let token = namespace(&config(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessSignature=SharedAccessSignature sr=a&sig=b&se=1&skn=k",
        ))
        .unwrap();
        assert!(matches!(token.auth, TokenSource::SasToken(_)));
        for bad in [
            "SharedAccessKey=topsecret",
            "Endpoint=sb://x;SharedAccessKey=topsecret",
            "Endpoint=sb://x:yy;SharedAccessKeyName=k;SharedAccessKey=topsecret",
        ] {
            let text = namespace(&config(bad))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                text.contains("malformed") && !text.contains("topsecret"),
                "{text}"
            );
        }
        let text = format!("{:?}", config("Endpoint=sb://x;SharedAccessKey=topsecret"));
        assert!(!text.contains("topsecret"), "{text}");
        let text = format!(
            "{:?}",
            namespace(&config(
                "Endpoint=sb://x;SharedAccessKeyName=k;SharedAccessKey=topsecret"
            ))
        );
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
            match namespace(&servicebus_config(url)) {
                Ok(found) => {
                    assert_eq!(found.host, expected, "{url}");
                    assert!(matches!(found.auth, TokenSource::EntraId(_)), "{url}");
                }
                Err(error) => panic!("{url}: {error}"),
            }
        }
        let mut both = servicebus_config("servicebus://q?namespace=my-ns");
        both.connection_string = Some(Secret::new("Endpoint=sb://x;SharedAccessKey=k"));
        let text = namespace(&both)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(text.contains("set one"), "{text}");
        let bad = namespace(&servicebus_config("servicebus://q?namespace=a;b"));
        assert!(matches!(bad, Err(Error::InvalidInput { field, .. }) if field == "namespace"));
    }

    fn servicebus_config(url: &str) -> ServiceBusConfig {
        ServiceBusConfig::from_url(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }
}
