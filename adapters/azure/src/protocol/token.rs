//! Tokens for claims-based authorization (`$cbs` put-token): SAS tokens signed here from a
//! key, SAS tokens given in a connection string, and Entra ID tokens.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use azure_core::credentials::TokenCredential;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use cloudbus_core::config::Secret;
use cloudbus_core::{Error, Result};
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use sha2::Sha256;

use crate::TRANSPORT;
use crate::credentials::redact;

/// How long a SAS token signed here is valid.
const SAS_LIFETIME: Duration = Duration::from_secs(3600);
/// The Entra ID scope of Service Bus.
const SCOPE: &str = "https://servicebus.azure.net/.default";

/// What URL encoding leaves alone in SAS tokens (as `encodeURIComponent` does).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// Where tokens come from. Never logged.
#[derive(Clone)]
pub(crate) enum TokenSource {
    /// A shared access key: tokens are signed here, per audience.
    SasKey { name: String, key: Secret },
    /// A SAS token given as it is (its expiry is the token's own).
    SasToken(Secret),
    /// An Entra ID credential.
    EntraId(Arc<dyn TokenCredential>),
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenSource::SasKey { .. } => "TokenSource::SasKey(<redacted>)",
            TokenSource::SasToken(_) => "TokenSource::SasToken(<redacted>)",
            TokenSource::EntraId(_) => "TokenSource::EntraId",
        })
    }
}

/// A token for one audience.
pub(crate) struct Token {
    pub(crate) value: Secret,
    /// The put-token `type`.
    pub(crate) kind: &'static str,
    pub(crate) expires: SystemTime,
}

impl TokenSource {
    /// A token for `audience` (`sb://<host>/<path>`).
    pub(crate) async fn token(&self, audience: &str) -> Result<Token> {
        match self {
            TokenSource::SasKey { name, key } => {
                let expires = SystemTime::now() + SAS_LIFETIME;
                let value = sas_token(audience, name, key.expose(), expires);
                Ok(Token {
                    value: Secret::new(value),
                    kind: "servicebus.windows.net:sastoken",
                    expires,
                })
            }
            TokenSource::SasToken(token) => Ok(Token {
                value: token.clone(),
                kind: "servicebus.windows.net:sastoken",
                expires: sas_expiry(token.expose())
                    .unwrap_or_else(|| SystemTime::now() + SAS_LIFETIME),
            }),
            TokenSource::EntraId(credential) => {
                let token = credential.get_token(&[SCOPE], None).await.map_err(|e| {
                    Error::Unauthorized {
                        transport: TRANSPORT,
                        message: format!(
                            "cannot get an Entra ID token for Service Bus: {}",
                            redact(&e.to_string())
                        ),
                        source: None,
                    }
                })?;
                let expires = UNIX_EPOCH
                    + Duration::from_secs(
                        u64::try_from(token.expires_on.unix_timestamp()).unwrap_or(0),
                    );
                Ok(Token {
                    value: Secret::new(token.token.secret()),
                    kind: "jwt",
                    expires,
                })
            }
        }
    }
}

/// `SharedAccessSignature sr=<audience>&sig=<HMAC-SHA256 of audience + "\n" + expiry>&se=<expiry>&skn=<key name>`,
/// every part URL-encoded.
pub(crate) fn sas_token(audience: &str, key_name: &str, key: &str, expires: SystemTime) -> String {
    let expiry = expires
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let resource = utf8_percent_encode(audience, COMPONENT).to_string();
    let signed = format!("{resource}\n{expiry}");
    // HMAC takes a key of any length: new_from_slice cannot fail.
    let signature = match Hmac::<Sha256>::new_from_slice(key.as_bytes()) {
        Ok(mut mac) => {
            mac.update(signed.as_bytes());
            BASE64.encode(mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    };
    format!(
        "SharedAccessSignature sr={resource}&sig={}&se={expiry}&skn={}",
        utf8_percent_encode(&signature, COMPONENT),
        utf8_percent_encode(key_name, COMPONENT)
    )
}

/// The `se=` of a SAS token.
fn sas_expiry(token: &str) -> Option<SystemTime> {
    let se = token
        .split(['&', ' '])
        .find_map(|part| part.strip_prefix("se="))?;
    Some(UNIX_EPOCH + Duration::from_secs(se.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sas_tokens_match_the_official_algorithm() {
        // Computed with Python: urllib.parse.quote_plus, hmac.new(key, f"{sr}\n{se}", sha256), base64.
        let token = sas_token(
            "sb://my-ns.servicebus.windows.net/orders",
            "RootManageSharedAccessKey",
            "c2VjcmV0LWtleQ==",
            UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        );
        assert_eq!(
            token,
            "SharedAccessSignature sr=sb%3A%2F%2Fmy-ns.servicebus.windows.net%2Forders\
             &sig=3doHwRFG1skYLKBSEaV3qWZUXdpmNB%2FgWw%2FSUHcVu0s%3D&se=1800000000&skn=RootManageSharedAccessKey"
        );
    }

    #[test]
    fn a_given_sas_token_keeps_its_expiry() {
        let expiry = sas_expiry("SharedAccessSignature sr=x&sig=y&se=1800000000&skn=k");
        assert_eq!(
            expiry,
            Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        );
    }
}
