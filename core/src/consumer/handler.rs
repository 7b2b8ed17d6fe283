//! What a service writes: a [`Handler`], the [`Context`] it gets with each message, and the
//! [`HandlerError`] that tells the consumer whether to retry or dead-letter.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::time::SystemTime;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use crate::{Delivery, Message};

/// Dead-letter reason when a handler returned transient errors on the last allowed attempt
/// ([`RetryPolicy::max_attempts`](super::RetryPolicy::max_attempts)).
pub const RETRIES_EXHAUSTED: &str = "RetriesExhausted";
/// Dead-letter reason of a [`HandlerError::permanent`] error that names no reason of its own.
pub const PERMANENT_ERROR: &str = "PermanentError";
/// Dead-letter reason of a body that the [`json`] handler cannot deserialize.
pub const MALFORMED_BODY: &str = "MalformedBody";

/// A boxed error, the source of a [`HandlerError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Processes one message. The consumer settles the delivery from the result:
///
/// - `Ok(())`: ack.
/// - [`HandlerError::transient`] (or a panic): nack with a backoff delay, or dead-letter
///   with [`RETRIES_EXHAUSTED`] on the last attempt.
/// - [`HandlerError::permanent`]: dead-letter at once.
///
/// Any `async fn(Message, Context) -> Result<(), HandlerError>` (or closure of that shape)
/// is a handler; [`json`] makes one that receives a deserialized value instead. A handler
/// may be called again for the same message (at-least-once delivery), and concurrently
/// for different messages.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles one message.
    async fn handle(&self, message: Message, context: Context) -> Result<(), HandlerError>;
}

#[async_trait]
impl<F, Fut> Handler for F
where
    F: Fn(Message, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    async fn handle(&self, message: Message, context: Context) -> Result<(), HandlerError> {
        self(message, context).await
    }
}

/// What the consumer knows about a message besides its content.
#[derive(Debug, Clone)]
pub struct Context {
    message_id: String,
    delivery_count: u32,
    enqueued_at: SystemTime,
    transport_id: String,
    max_attempts: u32,
}

impl Context {
    pub(crate) fn new(delivery: &Delivery, max_attempts: u32) -> Self {
        Context {
            message_id: delivery.message().id.clone(),
            delivery_count: delivery.delivery_count(),
            enqueued_at: delivery.enqueued_at(),
            transport_id: delivery.transport_id().to_string(),
            max_attempts,
        }
    }

    /// The message id ([`Message::id`]): the key for idempotent processing.
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    /// How many times the message has been delivered, including this time: 1 on the first
    /// attempt.
    pub fn delivery_count(&self) -> u32 {
        self.delivery_count
    }

    /// True when a transient error now dead-letters the message instead of retrying it.
    pub fn is_last_attempt(&self) -> bool {
        self.delivery_count >= self.max_attempts
    }

    /// When the broker enqueued the message.
    pub fn enqueued_at(&self) -> SystemTime {
        self.enqueued_at
    }

    /// The transport's own id for the message ([`Delivery::transport_id`]).
    pub fn transport_id(&self) -> &str {
        &self.transport_id
    }
}

/// Why a handler did not process a message: transient (retry later) or permanent
/// (dead-letter now).
///
/// The `?` operator turns any `std::error::Error` into a transient `HandlerError`, the
/// safe default: it is retried with backoff and dead-lettered after the last attempt.
/// Mark errors that no retry can fix as permanent:
///
/// ```
/// use cloudbus_core::consumer::HandlerError;
///
/// fn check(total: i64) -> Result<(), HandlerError> {
///     if total < 0 {
///         return Err(HandlerError::permanent(format!("negative total {total}"))
///             .with_reason("InvalidOrder"));
///     }
///     Ok(())
/// }
/// assert!(!check(-1).unwrap_err().is_transient());
/// ```
pub struct HandlerError {
    transient: bool,
    reason: Option<String>,
    error: BoxError,
}

impl HandlerError {
    /// An error a later attempt may not have (a timeout, a dependency that is down): the
    /// message is retried with backoff.
    pub fn transient(error: impl Into<BoxError>) -> Self {
        HandlerError {
            transient: true,
            reason: None,
            error: error.into(),
        }
    }

    /// An error no retry can fix (invalid content, a rejected business rule): the message is
    /// dead-lettered at once with reason [`PERMANENT_ERROR`] (or [`HandlerError::with_reason`])
    /// and this error's text as the description.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        HandlerError {
            transient: false,
            reason: None,
            error: error.into(),
        }
    }

    /// Sets the dead-letter reason, a short machine-readable code such as `InvalidOrder`.
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Whether the message should be retried.
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// The dead-letter reason: the one given, or [`PERMANENT_ERROR`] / [`RETRIES_EXHAUSTED`].
    pub fn reason(&self) -> &str {
        match (&self.reason, self.transient) {
            (Some(reason), _) => reason,
            (None, true) => RETRIES_EXHAUSTED,
            (None, false) => PERMANENT_ERROR,
        }
    }

    /// The underlying error.
    pub fn error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self.error.as_ref()
    }
}

/// Any error converts into a transient `HandlerError`, so `?` works in handlers.
impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        HandlerError::transient(error)
    }
}

impl fmt::Display for HandlerError {
    /// The error and its chain of sources, joined by `: `.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.error)?;
        let mut source = self.error.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("transient", &self.transient)
            .field("reason", &self.reason)
            .field("error", &self.error)
            .finish()
    }
}

/// A handler that receives the message body deserialized from JSON into `T`.
///
/// A body that does not deserialize is dead-lettered at once with reason
/// [`MALFORMED_BODY`] and the parse error as the description; the function is not called.
///
/// ```
/// use cloudbus_core::consumer::{Context, HandlerError, json};
///
/// #[derive(serde::Deserialize)]
/// struct Order { id: u64 }
///
/// let handler = json(|order: Order, context: Context| async move {
///     println!("order {} (attempt {})", order.id, context.delivery_count());
///     Ok::<_, HandlerError>(())
/// });
/// # let _ = handler;
/// ```
pub fn json<T, F, Fut>(handler: F) -> Json<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(T, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    Json {
        handler,
        _type: PhantomData,
    }
}

/// The handler made by [`json`].
pub struct Json<T, F> {
    handler: F,
    _type: PhantomData<fn() -> T>,
}

#[async_trait]
impl<T, F, Fut> Handler for Json<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(T, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    async fn handle(&self, message: Message, context: Context) -> Result<(), HandlerError> {
        let value: T = message.json().map_err(|error| {
            HandlerError::permanent(format!("the body is not the expected JSON: {error}"))
                .with_reason(MALFORMED_BODY)
        })?;
        (self.handler)(value, context).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("saving the order failed")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn question_mark_makes_transient_errors_with_their_sources() {
        fn fails() -> Result<(), HandlerError> {
            Err(Outer(std::io::Error::other("disk full")))?;
            Ok(())
        }
        let error = fails().unwrap_err();
        assert!(error.is_transient());
        assert_eq!(error.reason(), RETRIES_EXHAUSTED);
        assert_eq!(error.to_string(), "saving the order failed: disk full");
    }

    #[test]
    fn permanent_errors_carry_a_reason() {
        let error = HandlerError::permanent("bad");
        assert!(!error.is_transient());
        assert_eq!(error.reason(), PERMANENT_ERROR);
        assert_eq!(error.with_reason("Invalid").reason(), "Invalid");
    }
}
