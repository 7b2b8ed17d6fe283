//! Client errors to cloudbus errors.

use cloudbus_core::Error;

use crate::TRANSPORT;
use crate::credentials::redact;

/// Maps a client error to a cloudbus error by its AMQP condition.
pub(crate) fn map_error(
    action: &str,
    error: &azure_core::Error,
    entity: &'static str,
    name: &str,
) -> Error {
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

pub(crate) fn lock_lost(message_id: &str) -> Error {
    Error::LockLost {
        transport: TRANSPORT,
        message_id: message_id.to_string(),
    }
}

pub(crate) fn is_lock_lost(error: &azure_core::Error) -> bool {
    let text = format!("{error:?} {error}").to_ascii_lowercase();
    text.contains("lock-lost") || text.contains("locklost") || text.contains("lock lost")
}

pub(crate) fn closed(what: &'static str) -> Error {
    Error::closed(TRANSPORT, what)
}
