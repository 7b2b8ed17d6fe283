//! lapin errors to cloudbus errors.

use std::sync::Arc;

use cloudbus_core::Error;
use lapin::ErrorKind;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

use crate::TRANSPORT;

/// What an operation was about, for the error: the entity it named.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Subject<'a> {
    /// `queue`, `exchange`, or `queue or exchange`.
    pub(crate) entity: &'static str,
    pub(crate) name: &'a str,
}

/// Maps a client error: a missing entity (404) to `NotFound`, refused access and failed
/// logins to `Unauthorized`, a declaration that contradicts what exists to a permanent
/// `Transport` error with the fix, the rest (connections, channels) to transient
/// `Transport` errors.
pub(crate) fn map_error(action: &str, subject: Subject<'_>, error: lapin::Error) -> Error {
    let text = format!("{action} `{}`: {error}", subject.name);
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => Error::NotFound {
                transport: TRANSPORT,
                entity: subject.entity,
                name: subject.name.to_string(),
            },
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
            | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => Error::Unauthorized {
                transport: TRANSPORT,
                message: format!(
                    "{text} (the user lacks the permission, or the vhost does not exist)"
                ),
                source: Some(Arc::new(error)),
            },
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => Error::Transport {
                transport: TRANSPORT,
                message: format!(
                    "{text}: it exists with other arguments than cloudbus declares (a \
                     classic queue, or another delivery limit or dead-letter exchange); \
                     delete it, or connect without `create`"
                ),
                transient: false,
                source: Some(Arc::new(error)),
            },
            _ => transient(text, error),
        },
        ErrorKind::AuthProviderError(_) => Error::Unauthorized {
            transport: TRANSPORT,
            message: text,
            source: Some(Arc::new(error)),
        },
        _ if is_login_failure(&error) => Error::Unauthorized {
            transport: TRANSPORT,
            message: format!("{text} (check the user name and password of the URI)"),
            source: Some(Arc::new(error)),
        },
        _ => transient(text, error),
    }
}

fn transient(text: String, error: lapin::Error) -> Error {
    Error::Transport {
        transport: TRANSPORT,
        message: text,
        transient: true,
        source: Some(Arc::new(error)),
    }
}

/// RabbitMQ answers a bad login by closing the connection with ACCESS_REFUSED (403).
fn is_login_failure(error: &lapin::Error) -> bool {
    error.to_string().contains("ACCESS_REFUSED")
}

/// A failure that a new connection may cure (as opposed to a missing entity, a refused
/// permission or conflicting arguments).
pub(crate) fn is_connection_failure(error: &Error) -> bool {
    matches!(
        error,
        Error::Transport {
            transient: true,
            ..
        }
    )
}
