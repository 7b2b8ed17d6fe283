//! Amazon MSK IAM authentication: the SASL OAUTHBEARER token is a SigV4-presigned URL for
//! the `kafka-cluster:Connect` action, base64url-encoded (the scheme of AWS's
//! `aws-msk-iam-sasl-signer` libraries), signed with credentials from the standard AWS
//! chain and refreshed before it expires.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{
    SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign,
};
use aws_sigv4::sign::v4;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cloudbus_core::{Error, Result};

use crate::TRANSPORT;

/// How long a token is valid: the MSK signers' default.
const TOKEN_LIFETIME: Duration = Duration::from_secs(900);
/// Re-read the credentials this often (they may be temporary, from a role).
const CREDENTIALS_REFRESH: Duration = Duration::from_secs(300);
/// The signing name of MSK's IAM action.
const SERVICE: &str = "kafka-cluster";
/// Named in the token, as AWS's own signers name themselves.
const USER_AGENT: &str = concat!("cloudbus-kafka/", env!("CARGO_PKG_VERSION"));

/// A token and when it expires (unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Token {
    pub(crate) value: String,
    pub(crate) expires_ms: i64,
}

/// The presigned URL of a token, and its base64url encoding (the token itself).
pub(crate) fn token(
    region: &str,
    credentials: &Credentials,
    now: SystemTime,
) -> std::result::Result<Token, String> {
    let url = format!("https://kafka.{region}.amazonaws.com/?Action=kafka-cluster%3AConnect");
    let identity = credentials.clone().into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(TOKEN_LIFETIME);
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SERVICE)
        .time(now)
        .settings(settings)
        .build()
        .map_err(|e| format!("cannot build the signing parameters: {e}"))?
        .into();
    let request = SignableRequest::new(
        "GET",
        url.as_str(),
        std::iter::empty(),
        SignableBody::Bytes(&[]),
    )
    .map_err(|e| format!("cannot sign the MSK token request: {e}"))?;
    let (instructions, _) = sign(request, &params)
        .map_err(|e| format!("cannot sign the MSK token request: {e}"))?
        .into_parts();
    let mut signed = url::form_urlencoded::Serializer::new(String::new());
    signed.append_pair("Action", "kafka-cluster:Connect");
    for (name, value) in instructions.params() {
        signed.append_pair(name, value);
    }
    signed.append_pair("User-Agent", USER_AGENT);
    let presigned = format!("https://kafka.{region}.amazonaws.com/?{}", signed.finish());
    let expires = now + TOKEN_LIFETIME;
    let expires_ms = expires
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    Ok(Token {
        value: URL_SAFE_NO_PAD.encode(presigned),
        expires_ms,
    })
}

/// Signs tokens on demand from credentials a background task keeps fresh, so that
/// librdkafka's (synchronous) token callback never waits on the network.
#[derive(Clone)]
pub(crate) struct Signer {
    region: String,
    credentials: Arc<Mutex<Credentials>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads the AWS configuration (region and credentials from the standard chain; the
    /// config's `region` overrides) and starts refreshing the credentials.
    pub(crate) async fn start(region: Option<&str>) -> Result<Signer> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = region {
            loader = loader.region(aws_config::Region::new(region.to_string()));
        }
        let sdk = loader.load().await;
        let region = sdk.region().map(|r| r.to_string()).ok_or_else(|| {
            Error::config(
                "auth=msk_iam needs the MSK cluster's AWS region: set `region` or AWS_REGION",
            )
        })?;
        let provider = sdk.credentials_provider().ok_or_else(|| {
            Error::config("auth=msk_iam found no AWS credentials provider in the AWS configuration")
        })?;
        let credentials = fetch(&provider).await?;
        let signer = Signer {
            region,
            credentials: Arc::new(Mutex::new(credentials)),
        };
        let shared = Arc::downgrade(&signer.credentials);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CREDENTIALS_REFRESH).await;
                let Some(slot) = shared.upgrade() else { return };
                match fetch(&provider).await {
                    Ok(fresh) => {
                        if let Ok(mut current) = slot.lock() {
                            *current = fresh;
                        }
                    }
                    Err(error) => tracing::warn!(
                        messaging.system = "kafka",
                        %error,
                        "cannot refresh the AWS credentials for MSK IAM; keeping the current ones"
                    ),
                }
            }
        });
        Ok(signer)
    }

    /// A fresh token.
    pub(crate) fn token(&self) -> std::result::Result<Token, String> {
        let credentials = self
            .credentials
            .lock()
            .map_err(|_| "the MSK credentials are unavailable".to_string())?
            .clone();
        token(&self.region, &credentials, SystemTime::now())
    }
}

async fn fetch(provider: &SharedCredentialsProvider) -> Result<Credentials> {
    provider
        .provide_credentials()
        .await
        .map_err(|e| Error::Unauthorized {
            transport: TRANSPORT,
            message: format!("auth=msk_iam: no AWS credentials: {e}"),
            source: None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The token's form, checked offline (no MSK cluster is reachable here): a base64url
    /// presigned URL for kafka-cluster:Connect in the region, SigV4 in the query, 900 s.
    #[test]
    fn a_token_is_a_presigned_connect_url() {
        let credentials =
            Credentials::new("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", None, None, "test");
        let now = UNIX_EPOCH + Duration::from_secs(1_780_000_000);
        let token = token("eu-west-1", &credentials, now).unwrap();
        assert!(
            !token.value.contains(['=', '+', '/']),
            "base64url without padding"
        );
        let url = String::from_utf8(URL_SAFE_NO_PAD.decode(&token.value).unwrap()).unwrap();
        let parsed = url::Url::parse(&url).unwrap();
        assert_eq!(parsed.host_str(), Some("kafka.eu-west-1.amazonaws.com"));
        let query: std::collections::HashMap<String, String> =
            parsed.query_pairs().into_owned().collect();
        assert_eq!(query["Action"], "kafka-cluster:Connect");
        assert_eq!(query["X-Amz-Algorithm"], "AWS4-HMAC-SHA256");
        assert!(
            query["X-Amz-Credential"].starts_with("AKIDEXAMPLE/")
                && query["X-Amz-Credential"].ends_with("/eu-west-1/kafka-cluster/aws4_request"),
            "{}",
            query["X-Amz-Credential"]
        );
        assert_eq!(query["X-Amz-Expires"], "900");
        assert_eq!(query["X-Amz-SignedHeaders"], "host");
        assert_eq!(query["X-Amz-Signature"].len(), 64);
        assert!(query["User-Agent"].starts_with("cloudbus-kafka/"));
        assert!(
            !url.contains("wJalrXUtnFEMI"),
            "the secret key never leaves"
        );
        assert_eq!(token.expires_ms, (1_780_000_000 + 900) * 1000);
        // The same inputs sign the same; another time signs differently.
        assert_eq!(token, super::token("eu-west-1", &credentials, now).unwrap());
        let later = super::token("eu-west-1", &credentials, now + Duration::from_secs(1)).unwrap();
        assert_ne!(token.value, later.value);
    }
}
