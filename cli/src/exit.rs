//! Exit codes that scripts can rely on, and the error a command ends with.
//!
//! | code | meaning |
//! |---:|---|
//! | 0 | done |
//! | 1 | failed (anything not below) |
//! | 2 | bad command line (from clap) |
//! | 3 | bad configuration or input: fix the URL, config or message |
//! | 4 | the queue, topic or subscription does not exist |
//! | 5 | not authorized: check the credentials |
//! | 6 | the broker could not be reached or timed out: retrying may help |
//! | 7 | the transport does not support this |
//! | 8 | partly done: some messages failed (each is reported) |

use std::fmt;

use cloudbus::Error;

pub const FAILURE: u8 = 1;
pub const CONFIG: u8 = 3;
pub const NOT_FOUND: u8 = 4;
pub const UNAUTHORIZED: u8 = 5;
pub const TRANSIENT: u8 = 6;
pub const UNSUPPORTED: u8 = 7;
pub const PARTIAL: u8 = 8;

/// Why a command failed: the library's error, with what it was doing, on which URL
/// (redacted) and transport. Boxed: it travels through every `Result` of the tool.
#[derive(Debug)]
pub struct Failure(Box<Inner>);

#[derive(Debug)]
struct Inner {
    doing: String,
    place: String,
    error: Option<Error>,
    message: String,
    code: u8,
}

impl Failure {
    /// A failure of `doing` on `place` (`sqs://orders`, redacted).
    pub fn of(doing: impl Into<String>, place: impl Into<String>, error: Error) -> Failure {
        let code = code_of(&error);
        Failure(Box::new(Inner {
            doing: doing.into(),
            place: place.into(),
            message: error.to_string(),
            error: Some(error),
            code,
        }))
    }

    /// A failure that is not the library's (bad input to the tool).
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure(Box::new(Inner {
            doing: String::new(),
            place: String::new(),
            error: None,
            message: message.into(),
            code: CONFIG,
        }))
    }

    pub fn code(&self) -> u8 {
        self.0.code
    }

    /// A hint for the common failures, where the library's message does not already
    /// carry the fix.
    fn hint(&self) -> Option<&'static str> {
        match self.0.error.as_ref()? {
            Error::NotFound { .. } => Some(
                "check the name and the account or namespace; `create=true` in the URL makes \
                 a missing queue where the transport can",
            ),
            Error::Unauthorized { .. } => Some(
                "check the credentials in the environment (AWS chain, \
                 AZURE_SERVICEBUS_CONNECTION_STRING, RABBITMQ_URL, KAFKA_SASL_PASSWORD)",
            ),
            error if error.is_transient() => {
                Some("is the broker running and reachable from here? retrying may help")
            }
            _ => None,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.0;
        if inner.place.is_empty() {
            write!(f, "cloudbus: {}", inner.message)?;
        } else {
            write!(
                f,
                "cloudbus: {} {} failed: {}",
                inner.doing, inner.place, inner.message
            )?;
        }
        if let Some(hint) = self.hint() {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// The exit code for a library error.
pub fn code_of(error: &Error) -> u8 {
    match error {
        Error::Config { .. }
        | Error::TooLarge { .. }
        | Error::InvalidAttribute { .. }
        | Error::InvalidInput { .. } => CONFIG,
        Error::NotFound { .. } => NOT_FOUND,
        Error::Unauthorized { .. } => UNAUTHORIZED,
        Error::Unsupported { .. } => UNSUPPORTED,
        error if error.is_transient() => TRANSIENT,
        _ => FAILURE,
    }
}
