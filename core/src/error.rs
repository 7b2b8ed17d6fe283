//! The one error type of cloudbus, with kinds a caller can match on.

use std::sync::Arc;

/// A boxed error from a transport's client library, kept as the [`std::error::Error::source`]
/// of a cloudbus [`Error`]. It is reference-counted so that [`Error`] is `Clone`: a batch
/// that fails as a whole reports the same error for each of its messages.
pub type Source = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of cloudbus operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in cloudbus.
///
/// Each variant says what happened and what to do about it. Use [`Error::is_transient`] to
/// decide whether retrying the same call can succeed. Messages never contain credentials.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL or configuration is invalid, or names a transport this build lacks.
    #[error("configuration error: {message}")]
    Config {
        /// What is wrong and how to fix it.
        message: String,
    },

    /// The queue, topic or subscription does not exist.
    #[error(
        "{entity} `{name}` not found on {transport}; create it first (or pass create=true where the transport supports it)"
    )]
    NotFound {
        /// The transport that reported it (`memory`, `sqs`, `sns`, `servicebus`).
        transport: &'static str,
        /// What kind of entity: `queue`, `topic`, `subscription`.
        entity: &'static str,
        /// The entity's name.
        name: String,
    },

    /// The credentials were missing, wrong, expired, or lack a permission.
    #[error("{transport}: not authorized: {message}")]
    Unauthorized {
        /// The transport that reported it.
        transport: &'static str,
        /// The service's explanation, without any secret.
        message: String,
        /// The underlying client error.
        #[source]
        source: Option<Source>,
    },

    /// The encoded message is larger than the transport accepts. Nothing was sent.
    #[error(
        "message too large for {transport}: {size} bytes encoded, limit is {limit} bytes (body plus attributes); send a smaller body, or store the payload elsewhere and send a reference"
    )]
    TooLarge {
        /// The transport whose limit applies.
        transport: &'static str,
        /// The encoded size in bytes, as the transport counts it.
        size: usize,
        /// The transport's limit in bytes.
        limit: usize,
    },

    /// An attribute key or value breaks a rule of the transport. Nothing was sent.
    #[error("invalid attribute `{key}` for {transport}: {rule}")]
    InvalidAttribute {
        /// The transport whose rule applies.
        transport: &'static str,
        /// The offending key.
        key: String,
        /// The rule that was broken, with the limit where there is one.
        rule: String,
    },

    /// A message field (other than an attribute) or an argument is invalid. Nothing was sent.
    #[error("invalid {field} for {transport}: {rule}")]
    InvalidInput {
        /// The transport whose rule applies.
        transport: &'static str,
        /// The field or argument, e.g. `ordering_key`, `deliver_at`, `max`.
        field: &'static str,
        /// The rule that was broken, with the limit where there is one.
        rule: String,
    },

    /// The transport cannot do this, and cloudbus does not emulate it.
    #[error("{transport} does not support {feature}")]
    Unsupported {
        /// The transport.
        transport: &'static str,
        /// What was asked for, with the limit or the alternative where there is one.
        feature: String,
    },

    /// The lock (Service Bus) or receipt handle (SQS) of a delivery is no longer valid:
    /// the message may already have been redelivered to another consumer.
    #[error(
        "{transport}: the lock on message `{message_id}` was lost; it will be (or was) redelivered"
    )]
    LockLost {
        /// The transport.
        transport: &'static str,
        /// The id of the message whose lock was lost.
        message_id: String,
    },

    /// The publisher or subscriber was closed; create a new one.
    #[error("{transport}: the {what} is closed")]
    Closed {
        /// The transport.
        transport: &'static str,
        /// `publisher` or `subscriber`.
        what: &'static str,
    },

    /// The transport or its client library failed. `transient` says whether a retry can help.
    #[error("{transport}: {message}")]
    Transport {
        /// The transport.
        transport: &'static str,
        /// What failed.
        message: String,
        /// Whether retrying the same call may succeed (throttling, timeouts, 5xx, broken connections).
        transient: bool,
        /// The underlying client error.
        #[source]
        source: Option<Source>,
    },
}

impl Error {
    /// True when retrying the same operation later may succeed: throttling, timeouts,
    /// server errors, broken connections, a full in-memory queue. False for errors that
    /// a retry cannot fix (bad input, missing entities, bad credentials, closed handles).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Transport {
                transient: true,
                ..
            }
        )
    }

    /// A configuration error with the given explanation.
    pub fn config(message: impl Into<String>) -> Self {
        Error::Config {
            message: message.into(),
        }
    }

    /// `Closed` for a transport's `publisher` or `subscriber`.
    pub fn closed(transport: &'static str, what: &'static str) -> Self {
        Error::Closed { transport, what }
    }

    /// The transient error of an item a batch call did not report on: it may or may not
    /// have been sent (or settled), so a retry is safe only for at-least-once delivery.
    pub fn unreported(transport: &'static str) -> Self {
        Error::transport(
            transport,
            "the batch call reported nothing for this message; it may or may not have been sent",
            true,
            None,
        )
    }

    /// A transport error with an optional source.
    pub fn transport(
        transport: &'static str,
        message: impl Into<String>,
        transient: bool,
        source: Option<Source>,
    ) -> Self {
        Error::Transport {
            transport,
            message: message.into(),
            transient,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_only_for_transient_transport_errors() {
        assert!(Error::transport("example", "throttled", true, None).is_transient());
        assert!(!Error::transport("example", "bad request", false, None).is_transient());
        assert!(!Error::config("x").is_transient());
        assert!(
            !Error::Closed {
                transport: "memory",
                what: "publisher"
            }
            .is_transient()
        );
    }

    #[test]
    fn too_large_names_size_and_limit() {
        let e = Error::TooLarge {
            transport: "example",
            size: 2_000_000,
            limit: 1_048_576,
        };
        let text = e.to_string();
        assert!(
            text.contains("2000000") && text.contains("1048576"),
            "{text}"
        );
    }
}
