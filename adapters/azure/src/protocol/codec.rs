//! What Service Bus adds to AMQP messages: batches (message format 0x80013700, each data
//! section one encoded message), lock tokens, and the broker's annotations on what it
//! delivers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cloudbus_core::{Error, Result};
use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp_types::messaging::annotations::OwnedKey;
use fe2o3_amqp_types::messaging::message::__private::Serializable;
use fe2o3_amqp_types::messaging::{Annotations, Batch, Body, Data, Message};
use fe2o3_amqp_types::primitives::{Binary, Value};

use crate::TRANSPORT;

/// The message format of a batch.
pub(crate) const BATCH_FORMAT: u32 = 0x8001_3700;

/// An AMQP message as Service Bus carries it.
pub(crate) type AmqpMessage = Message<Body<Value>>;

/// One transfer for `messages`: the message itself, or a batch of them.
pub(crate) fn transfer(mut messages: Vec<AmqpMessage>) -> Result<Sendable<Body<Value>>> {
    if messages.len() == 1 {
        if let Some(message) = messages.pop() {
            return Ok(Sendable::builder().message(message).settled(false).build());
        }
    }
    let mut sections = Vec::with_capacity(messages.len());
    for message in &messages {
        let encoded = serde_amqp::to_vec(&Serializable(message)).map_err(|e| {
            Error::transport(
                TRANSPORT,
                format!("cannot encode a message: {e}"),
                false,
                None,
            )
        })?;
        sections.push(Data(Binary::from(encoded)));
    }
    // The envelope carries the first message's properties and annotations (its message id,
    // session id and partition key), as the official clients do.
    let first = messages.first();
    let envelope = Message {
        header: None,
        delivery_annotations: None,
        message_annotations: first.and_then(|m| m.message_annotations.clone()),
        properties: first.and_then(|m| m.properties.clone()),
        application_properties: None,
        body: Body::Data(Batch::new(sections)),
        footer: None,
    };
    Ok(Sendable::builder()
        .message(envelope)
        .message_format(BATCH_FORMAT)
        .settled(false)
        .build())
}

/// An annotation by name, in message or delivery annotations.
pub(crate) fn annotation<'a>(
    annotations: Option<&'a Annotations>,
    name: &str,
) -> Option<&'a Value> {
    annotations?
        .iter()
        .find(|(k, _)| matches!(k, OwnedKey::Symbol(s) if s.0 == name))
        .map(|(_, v)| v)
}

/// What the broker says of a message it delivered.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    /// The lock token (peek-lock).
    pub(crate) lock_token: uuid::Uuid,
    pub(crate) sequence_number: i64,
    pub(crate) enqueued_at: SystemTime,
    pub(crate) locked_until: Option<SystemTime>,
    /// Deliveries so far, this one included.
    pub(crate) delivery_count: u32,
}

/// The broker's facts of `message`, delivered with `tag`.
pub(crate) fn received(message: &AmqpMessage, tag: &[u8]) -> Received {
    let annotations = message.message_annotations.as_ref().map(|a| &a.0);
    let lock_token = match annotation(
        message.delivery_annotations.as_ref().map(|a| &a.0),
        "x-opt-lock-token",
    ) {
        Some(Value::Uuid(u)) => uuid::Uuid::from_bytes(*u.as_inner()),
        _ => <[u8; 16]>::try_from(tag)
            .map(uuid::Uuid::from_bytes_le)
            .unwrap_or_default(),
    };
    let long = |name| match annotation(annotations, name) {
        Some(Value::Long(n)) => Some(*n),
        Some(Value::Int(n)) => Some(i64::from(*n)),
        Some(Value::Ulong(n)) => i64::try_from(*n).ok(),
        _ => None,
    };
    let time = |name| match annotation(annotations, name) {
        Some(Value::Timestamp(t)) => Some(from_millis(t.milliseconds())),
        _ => None,
    };
    Received {
        lock_token,
        sequence_number: long("x-opt-sequence-number").unwrap_or(0),
        enqueued_at: time("x-opt-enqueued-time").unwrap_or_else(SystemTime::now),
        locked_until: time("x-opt-locked-until"),
        delivery_count: message
            .header
            .as_ref()
            .map_or(0, |h| h.delivery_count)
            .saturating_add(1),
    }
}

/// A time from unix milliseconds.
pub(crate) fn from_millis(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

/// Unix milliseconds of a time.
pub(crate) fn to_millis(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Decodes one message encoded on its own (as peek and batches carry them).
pub(crate) fn decode(bytes: &[u8]) -> Result<AmqpMessage> {
    use fe2o3_amqp_types::messaging::message::__private::Deserializable;
    serde_amqp::from_slice::<Deserializable<AmqpMessage>>(bytes)
        .map(|d| d.0)
        .map_err(|e| {
            Error::transport(
                TRANSPORT,
                format!("cannot decode a message: {e}"),
                false,
                None,
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_each_message_encoded_and_decode_back() {
        let message = |text: &str| {
            Message::builder()
                .properties(
                    fe2o3_amqp_types::messaging::Properties::builder()
                        .message_id(text.to_string())
                        .build(),
                )
                .data(Binary::from(text.as_bytes().to_vec()))
                .build()
                .map_body(|d: Data| Body::<Value>::Data(Batch::new(vec![d])))
        };
        let batch = transfer(vec![message("a"), message("b")]).expect("batch");
        assert_eq!(batch.message_format, BATCH_FORMAT);
        let Body::Data(sections) = &batch.message.body else {
            panic!("a batch's body is data sections");
        };
        let inner: Vec<AmqpMessage> = sections
            .iter()
            .map(|d| decode(&d.0).expect("decodes"))
            .collect();
        assert_eq!(inner.len(), 2);
        assert_eq!(
            inner[1]
                .properties
                .as_ref()
                .and_then(|p| p.message_id.clone()),
            Some("b".to_string().into())
        );
        let single = transfer(vec![message("c")]).expect("single");
        assert_eq!(single.message_format, 0);
    }

    #[test]
    fn the_lock_token_is_the_delivery_tag_in_guid_layout() {
        let token = uuid::Uuid::new_v4();
        let message: AmqpMessage = Message::builder().body(Body::Empty).build();
        assert_eq!(received(&message, &token.to_bytes_le()).lock_token, token);
        assert_eq!(received(&message, &token.to_bytes_le()).delivery_count, 1);
    }
}
