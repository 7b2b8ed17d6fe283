//! What every transport's configuration is made of: secrets that never show, durations
//! written as seconds or with a unit, and the URL form ([`ConfigUrl`]), which is parsed
//! into the same serde struct as a TOML, YAML or JSON configuration, so both take the same
//! options under the same names with the same defaults and the same errors.
//!
//! A transport's configuration struct derives `Deserialize` (with `deny_unknown_fields` and
//! `#[serde(default)]`, so its `Default` is the one place for defaults) and implements
//! [`TransportConfig`](crate::driver::TransportConfig), whose
//! [`from_config_url`](crate::driver::TransportConfig::from_config_url) is usually one call
//! to [`ConfigUrl::deserialize`].

mod url;

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use url::ConfigUrl;

/// The suffix of a path that addresses the dead-letter queue of a queue or subscription.
pub const DEAD_LETTER_SUFFIX: &str = "/$deadletter";

/// A secret string (a connection string, key or password). Its `Debug` and `Display` never
/// show it, and a URL can never carry one: [`ConfigUrl::deserialize`] refuses a secret
/// field, so secrets come from a config file or the environment only.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// The name under which a [`Secret`] deserializes (a newtype struct), so that the URL
/// deserializer can recognise and refuse it.
pub(crate) const SECRET_NAME: &str = "cloudbus::Secret";

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

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a secret string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Secret, E> {
                Ok(Secret::new(v))
            }
            fn visit_newtype_struct<D: Deserializer<'de>>(
                self,
                d: D,
            ) -> std::result::Result<Secret, D::Error> {
                String::deserialize(d).map(Secret)
            }
        }
        d.deserialize_newtype_struct(SECRET_NAME, Visitor)
    }
}

/// Where a new subscription of a transport that keeps a log (Kafka; memory topics) starts
/// reading: `start=earliest`, `latest` (the default) or an RFC 3339 time such as
/// `2026-12-01T09:00:00Z`. It applies when the subscription is created; an existing one
/// goes on from where it was. Replaying a topic to rebuild state is a new subscription
/// with `start=earliest` (or a time).
///
/// ```
/// use cloudbus_core::config::Start;
///
/// assert_eq!("earliest".parse::<Start>()?, Start::Earliest);
/// let at: Start = "2026-12-01T09:00:00Z".parse()?;
/// assert_eq!(at.to_string(), "2026-12-01T09:00:00Z");
/// # Ok::<(), String>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    /// From the oldest message the transport still holds.
    Earliest,
    /// From the messages published after the subscription was created (what a queue or a
    /// Service Bus / SNS subscription does).
    #[default]
    Latest,
    /// From the first message published at or after this time.
    At(SystemTime),
}

impl fmt::Display for Start {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Start::Earliest => f.write_str("earliest"),
            Start::Latest => f.write_str("latest"),
            Start::At(at) => write!(f, "{}", humantime::format_rfc3339(*at)),
        }
    }
}

impl std::str::FromStr for Start {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Start, String> {
        match text.trim() {
            "earliest" => Ok(Start::Earliest),
            "latest" => Ok(Start::Latest),
            other => humantime::parse_rfc3339_weak(other)
                .map(Start::At)
                .map_err(|_| {
                    format!(
                        "`{other}` is not a start position: use earliest, latest or an RFC 3339 \
                     time such as 2026-12-01T09:00:00Z"
                    )
                }),
        }
    }
}

impl Serialize for Start {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Start {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A URL safe for error messages and logs: any `user:password@` part replaced, and the
/// values of its query options left out (`?create=…&batch_size=…`), since an option can be
/// a secret whose name gives nothing away. Errors about one option name it and, where it is
/// not a secret, quote its value themselves.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut redacted = match (base.find("://"), base.find('@')) {
        (Some(start), Some(at)) if at > start => {
            format!("{}://<redacted>@{}", &base[..start], &base[at + 1..])
        }
        _ => base.to_string(),
    };
    if let Some(query) = query {
        let names: Vec<&str> = query
            .split('&')
            .filter(|part| !part.is_empty())
            .map(|part| part.split_once('=').map_or(part, |(name, _)| name))
            .collect();
        redacted.push('?');
        redacted.push_str(
            &names
                .iter()
                .map(|name| format!("{name}=…"))
                .collect::<Vec<_>>()
                .join("&"),
        );
    }
    redacted
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

/// Serde for durations (`#[serde(with = "cloudbus_core::config::duration")]`): a number of
/// seconds or a human-readable string; written as a string.
pub mod duration {
    use super::*;

    /// Writes a duration as a human-readable string (`1m 30s`).
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// Reads a number of seconds or a human-readable duration.
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

/// Serde for optional durations (`#[serde(with = "cloudbus_core::config::opt_duration")]`),
/// as [`duration`].
pub mod opt_duration {
    use super::*;

    /// Writes a duration as [`duration::serialize`] does, or nothing.
    pub fn serialize<S: Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    /// Reads an optional duration as [`duration::deserialize`] does.
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
    fn secrets_never_show() {
        let s = Secret::new("Endpoint=sb://x;SharedAccessKey=abc123");
        assert!(!format!("{s:?} {s}").contains("abc123"));
        let from_json: Secret = serde_json::from_str("\"abc123\"").unwrap();
        assert_eq!(from_json.expose(), "abc123");
        assert_eq!(
            redact_url("kafka://user:hunter2@host/q"),
            "kafka://<redacted>@host/q"
        );
        assert_eq!(
            redact_url("rabbitmq://q?uri=amqp://u:hunter2@h&create"),
            "rabbitmq://q?uri=…&create=…"
        );
    }

    #[test]
    fn start_positions() {
        assert_eq!("latest".parse::<Start>(), Ok(Start::Latest));
        assert_eq!(Start::default(), Start::Latest);
        let at: Start = "2026-12-01T09:00:00Z".parse().unwrap();
        assert_eq!(
            serde_json::to_string(&at).unwrap(),
            "\"2026-12-01T09:00:00Z\""
        );
        assert_eq!(
            serde_json::from_str::<Start>("\"earliest\"").unwrap(),
            Start::Earliest
        );
        assert!("soon".parse::<Start>().unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn durations_in_seconds_or_with_units() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").unwrap_err().contains("500ms"));
        assert!(parse_duration("-1").is_err());
    }
}
