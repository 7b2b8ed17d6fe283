//! Client errors to cloudbus errors.

use cloudbus_core::Error;

use crate::TRANSPORT;
use crate::credentials::redact;

/// Maps an AMQP error (its debug text: conditions such as `amqp:not-found`) to a cloudbus
/// error.
pub(crate) fn map_amqp_error(action: &str, text: &str, entity: &'static str, name: &str) -> Error {
    let error = redact(text);
    let lower = error.to_ascii_lowercase();
    if lower.contains("not-found") || lower.contains("notfound") || lower.contains("not found") {
        return Error::NotFound {
            transport: TRANSPORT,
            entity,
            name: name.to_string(),
        };
    }
    if lower.contains("unauthorized") || lower.contains("unauthorised") {
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

pub(crate) fn closed(what: &'static str) -> Error {
    Error::closed(TRANSPORT, what)
}
