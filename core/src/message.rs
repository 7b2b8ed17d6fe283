//! [`Message`]: a payload of bytes with string attributes and the header fields every
//! transport maps to its own.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The attribute map of a message: string keys to string values, ordered by key.
pub type Attributes = BTreeMap<String, String>;

/// A message: a payload of bytes, string attributes, and optional header fields.
///
/// The fields are public so a handler can read them directly; build a message with
/// [`Message::new`] (or [`Message::from_json`]) and the `with_*` methods:
///
/// ```
/// use std::time::Duration;
/// use cloudbus_core::Message;
///
/// let message = Message::new("hello")
///     .with_attribute("tenant", "acme")
///     .with_correlation_id("order-17")
///     .with_ordering_key("customer-42")
///     .with_deliver_after(Duration::from_secs(30));
/// assert_eq!(message.payload.as_ref(), b"hello");
/// assert_eq!(message.attributes["tenant"], "acme");
/// ```
///
/// Every transport carries every field, or rejects the message at publish time with an
/// error that names the field (for example an ordering key on an SQS standard queue).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Message {
    /// The message id: set by the caller or generated (a UUIDv7). It survives every
    /// transport and every redelivery, so it is the key for idempotent processing.
    pub id: String,
    /// The body, byte-exact on every transport.
    pub payload: Bytes,
    /// Application attributes (SQS message attributes, Service Bus application properties).
    pub attributes: Attributes,
    /// MIME type of the payload, e.g. `application/json`.
    pub content_type: Option<String>,
    /// Correlation id, e.g. the id of the request this message answers.
    pub correlation_id: Option<String>,
    /// Subject or label (Service Bus `Subject`), a short description of the message.
    pub subject: Option<String>,
    /// Messages with the same ordering key are delivered in publish order, one at a time
    /// (SQS FIFO `MessageGroupId`, Service Bus `SessionId`).
    pub ordering_key: Option<String>,
    /// Deduplication id (SQS FIFO `MessageDeduplicationId`); the message id is used where
    /// the transport deduplicates by message id.
    pub deduplication_id: Option<String>,
    /// Do not deliver before this time (delayed or scheduled delivery).
    pub deliver_at: Option<SystemTime>,
    /// Discard (or dead-letter, where configured) the message if it is not delivered
    /// within this time after it was enqueued.
    pub time_to_live: Option<Duration>,
}

impl Message {
    /// A message with the given payload and a newly generated id (UUIDv7).
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Message::with_id_and_payload(new_id(), payload)
    }

    /// A message with the given id and payload, and nothing else set: how adapters build a
    /// received message, whose id the transport carried (no id is generated).
    pub fn with_id_and_payload(id: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Message {
            id: id.into(),
            payload: payload.into(),
            attributes: Attributes::new(),
            content_type: None,
            correlation_id: None,
            subject: None,
            ordering_key: None,
            deduplication_id: None,
            deliver_at: None,
            time_to_live: None,
        }
    }

    /// A message whose payload is `value` serialized as JSON, with content type
    /// `application/json`.
    ///
    /// ```
    /// #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    /// struct Order { id: u32 }
    ///
    /// let message = cloudbus_core::Message::from_json(&Order { id: 7 })?;
    /// assert_eq!(message.json::<Order>()?, Order { id: 7 });
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn from_json<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        let payload = serde_json::to_vec(value)?;
        Ok(Message::new(payload).with_content_type("application/json"))
    }

    /// Deserializes the payload as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }

    /// The payload as UTF-8 text, if it is valid UTF-8.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }

    /// Sets the message id (instead of the generated one).
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Adds (or replaces) an attribute.
    pub fn with_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(key.into(), value.into());
        self
    }

    /// Sets the content type.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// Sets the subject (label).
    pub fn with_subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Sets the ordering key: messages with the same key are delivered in order.
    pub fn with_ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Sets the deduplication id.
    pub fn with_deduplication_id(mut self, id: impl Into<String>) -> Self {
        self.deduplication_id = Some(id.into());
        self
    }

    /// Delays delivery until `delay` from now.
    pub fn with_deliver_after(mut self, delay: Duration) -> Self {
        self.deliver_at = Some(SystemTime::now() + delay);
        self
    }

    /// Delays delivery until the given time.
    pub fn with_deliver_at(mut self, at: SystemTime) -> Self {
        self.deliver_at = Some(at);
        self
    }

    /// Sets the time to live.
    pub fn with_time_to_live(mut self, ttl: Duration) -> Self {
        self.time_to_live = Some(ttl);
        self
    }

    /// The delay until [`Message::deliver_at`], measured from now; zero when it is unset or past.
    pub fn delay(&self) -> Duration {
        self.deliver_at
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .unwrap_or_default()
    }

    /// Payload bytes plus the UTF-8 bytes of every attribute key and value: the size most
    /// transports count against their message size limit.
    pub fn payload_and_attributes_len(&self) -> usize {
        self.payload.len()
            + self
                .attributes
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// A new message id: a UUIDv7 (time-ordered) in its hyphenated form.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_unique_uuids() {
        let a = Message::new("x");
        let b = Message::new("x");
        assert_ne!(a.id, b.id);
        assert_eq!(
            uuid::Uuid::parse_str(&a.id).map(|u| u.get_version_num()),
            Ok(7)
        );
    }

    #[test]
    fn json_round_trip_sets_content_type() {
        let m = Message::from_json(&serde_json::json!({"a": [1, 2]})).unwrap();
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        let v: serde_json::Value = m.json().unwrap();
        assert_eq!(v["a"][1], 2);
    }

    #[test]
    fn delay_is_zero_when_unset_or_past() {
        assert_eq!(Message::new("x").delay(), Duration::ZERO);
        let past = Message::new("x").with_deliver_at(SystemTime::UNIX_EPOCH);
        assert_eq!(past.delay(), Duration::ZERO);
        let later = Message::new("x").with_deliver_after(Duration::from_secs(60));
        assert!(later.delay() > Duration::from_secs(50));
    }
}
