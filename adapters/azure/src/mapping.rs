//! A cloudbus [`Message`] as a Service Bus message and back (the README's "Mapping and
//! settlement"), with the limits checked before sending.

use std::time::SystemTime;

use cloudbus_core::{Error, Message, Result};
use fe2o3_amqp_types::messaging::{
    ApplicationProperties, Batch, Body, Data, Header, MessageAnnotations, MessageId, Properties,
};
use fe2o3_amqp_types::primitives::{Binary, OrderedMap, SimpleValue, Timestamp, Value};

use crate::TRANSPORT;
use crate::protocol::codec::{AmqpMessage, annotation, to_millis};

/// Service Bus limit on message ids and session ids.
pub(crate) const MAX_ID_LEN: usize = 128;
/// Allowance for the AMQP encoding around payload and properties, in the size check.
pub(crate) const ENCODING_OVERHEAD: usize = 256;

/// Session ids given to messages without an ordering key on a session-enabled entity
/// (which needs a session id on every message): one of [`UNORDERED_SESSIONS`] sessions
/// chosen by a hash of the message id, so that unordered messages spread over a few
/// sessions that consumers can take in parallel, instead of one session each.
pub(crate) const UNORDERED_SESSION_PREFIX: &str = "cloudbus-unordered-";
/// How many sessions carry messages without an ordering key.
const UNORDERED_SESSIONS: u64 = 16;

pub(crate) fn unordered_session(message_id: &str) -> String {
    // FNV-1a: stable across processes and versions, unlike the std hasher.
    let hash = message_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{UNORDERED_SESSION_PREFIX}{}", hash % UNORDERED_SESSIONS)
}

/// Converts a cloudbus message for the wire, checking limits first.
pub(crate) fn to_servicebus(
    message: &Message,
    sessions: bool,
    limit: usize,
) -> Result<AmqpMessage> {
    let invalid = |field: &'static str, rule: String| Error::InvalidInput {
        transport: TRANSPORT,
        field,
        rule,
    };
    if message.id.is_empty() || message.id.len() > MAX_ID_LEN {
        return Err(invalid(
            "id",
            format!("Service Bus message ids are 1 to {MAX_ID_LEN} characters"),
        ));
    }
    if message
        .deduplication_id
        .as_ref()
        .is_some_and(|d| d != &message.id)
    {
        return Err(Error::Unsupported {
            transport: TRANSPORT,
            feature: "a deduplication id other than the message id: Service Bus detects \
                      duplicates by message id, so set the message id instead"
                .into(),
        });
    }
    let session_id = match (&message.ordering_key, sessions) {
        (Some(key), true) => Some(key.clone()),
        (None, true) => Some(unordered_session(&message.id)),
        (None, false) => None,
        (Some(_), false) => {
            return Err(Error::Unsupported {
                transport: TRANSPORT,
                feature: "ordering keys on an entity without sessions: create it with \
                          RequiresSession and connect with ?sessions=true"
                    .into(),
            });
        }
    };
    if session_id.as_ref().is_some_and(|s| s.len() > MAX_ID_LEN) {
        return Err(invalid(
            "ordering_key",
            format!("Service Bus session ids are at most {MAX_ID_LEN} characters"),
        ));
    }
    let headers = [
        &message.content_type,
        &message.correlation_id,
        &message.subject,
    ];
    let size = message.payload_and_attributes_len()
        + message.id.len()
        + headers
            .iter()
            .filter_map(|h| h.as_ref())
            .map(String::len)
            .sum::<usize>()
        + session_id.as_ref().map_or(0, String::len)
        + ENCODING_OVERHEAD;
    if size > limit {
        return Err(Error::TooLarge {
            transport: TRANSPORT,
            size,
            limit,
        });
    }
    let mut properties = Properties::builder()
        .message_id(MessageId::String(message.id.clone()))
        .build();
    properties.subject = message.subject.clone();
    properties.correlation_id = message.correlation_id.clone().map(MessageId::String);
    properties.content_type = message.content_type.clone().map(Into::into);
    properties.group_id = session_id;
    let header = message.time_to_live.map(|ttl| Header {
        durable: true,
        ttl: Some(u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX)),
        ..Header::default()
    });
    let message_annotations = message
        .deliver_at
        .filter(|at| *at > SystemTime::now())
        .map(|at| {
            MessageAnnotations::builder()
                .insert(
                    "x-opt-scheduled-enqueue-time",
                    Value::Timestamp(Timestamp::from_milliseconds(to_millis(at))),
                )
                .build()
        });
    let application_properties = (!message.attributes.is_empty()).then(|| {
        ApplicationProperties(
            message
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), SimpleValue::String(v.clone())))
                .collect::<OrderedMap<String, SimpleValue>>(),
        )
    });
    Ok(AmqpMessage {
        header,
        delivery_annotations: None,
        message_annotations,
        properties: Some(properties),
        application_properties,
        body: Body::Data(Batch::new(vec![Data(Binary::from(
            message.payload.to_vec(),
        ))])),
        footer: None,
    })
}

/// The session id of a message for the wire.
pub(crate) fn session_of(message: &AmqpMessage) -> Option<&str> {
    message.properties.as_ref()?.group_id.as_deref()
}

/// The text form of an application property from another producer: numbers and booleans
/// as written, timestamps as unix milliseconds, uuids hyphenated, binary as base64.
pub(crate) fn simple_text(value: &SimpleValue) -> String {
    use base64::Engine;
    match value {
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.0.clone(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Float(n) => n.to_string(),
        SimpleValue::Double(n) => n.to_string(),
        SimpleValue::Char(c) => c.to_string(),
        SimpleValue::Timestamp(t) => t.milliseconds().to_string(),
        SimpleValue::Uuid(u) => uuid::Uuid::from_bytes(*u.as_inner()).to_string(),
        SimpleValue::Binary(b) => {
            base64::engine::general_purpose::STANDARD.encode(b.as_ref() as &[u8])
        }
        SimpleValue::Null => String::new(),
        other => format!("{other:?}"),
    }
}

/// The text of a message id or correlation id.
fn id_text(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => uuid::Uuid::from_bytes(*u.as_inner()).to_string(),
        MessageId::Binary(b) => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(b.as_ref() as &[u8])
        }
    }
}

/// Converts a received (or peeked) message; `sessions` says whether a session id is an
/// ordering key.
pub(crate) fn from_servicebus(raw: &AmqpMessage, sessions: bool) -> Message {
    let payload: Vec<u8> = match &raw.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
        Body::Value(value) => match &value.0 {
            Value::String(s) => s.clone().into_bytes(),
            Value::Binary(b) => b.to_vec(),
            // A null value (what a body-less message decodes to) is an empty payload.
            Value::Null => Vec::new(),
            other => format!("{other:?}").into_bytes(),
        },
        Body::Empty => Vec::new(),
        other => format!("{other:?}").into_bytes(),
    };
    let properties = raw.properties.as_ref();
    let id = properties
        .and_then(|p| p.message_id.as_ref())
        .map(id_text)
        .unwrap_or_else(|| {
            match annotation(
                raw.message_annotations.as_ref().map(|a| &a.0),
                "x-opt-sequence-number",
            ) {
                Some(Value::Long(n)) => n.to_string(),
                _ => String::new(),
            }
        });
    let mut message = Message::with_id_and_payload(id, payload);
    if let Some(ApplicationProperties(properties)) = &raw.application_properties {
        message.attributes = properties
            .iter()
            .map(|(k, v)| (k.clone(), simple_text(v)))
            .collect();
    }
    message.content_type = properties
        .and_then(|p| p.content_type.as_ref())
        .map(|c| c.0.clone());
    message.correlation_id = properties
        .and_then(|p| p.correlation_id.as_ref())
        .map(id_text);
    message.subject = properties.and_then(|p| p.subject.clone());
    message.ordering_key = properties
        .and_then(|p| p.group_id.as_deref())
        .filter(|s| sessions && !s.starts_with(UNORDERED_SESSION_PREFIX))
        .map(str::to_string);
    message.time_to_live = raw
        .header
        .as_ref()
        .and_then(|h| h.ttl)
        .map(|ms| std::time::Duration::from_millis(u64::from(ms)));
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fuzz target: an empty body arrived as the text `Null`.
    #[test]
    fn a_body_less_message_is_an_empty_payload() {
        let message: AmqpMessage = fe2o3_amqp_types::messaging::Message::builder()
            .body(Body::Empty)
            .build();
        let bytes = serde_amqp::to_vec(
            &fe2o3_amqp_types::messaging::message::__private::Serializable(&message),
        )
        .expect("encodes");
        let decoded = crate::protocol::codec::decode(&bytes).expect("decodes");
        assert!(from_servicebus(&decoded, false).payload.is_empty());
    }

    #[test]
    fn unordered_sessions_are_stable_and_few() {
        assert_eq!(unordered_session("a"), unordered_session("a"));
        let distinct: std::collections::HashSet<String> = (0..1000)
            .map(|i| unordered_session(&i.to_string()))
            .collect();
        assert_eq!(distinct.len() as u64, UNORDERED_SESSIONS);
        assert!(
            distinct
                .iter()
                .all(|s| s.starts_with(UNORDERED_SESSION_PREFIX))
        );
    }
}
