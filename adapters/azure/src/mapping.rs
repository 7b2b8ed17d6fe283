//! A cloudbus [`Message`] as a Service Bus message and back (the README's "Mapping and
//! settlement"), with the limits checked before sending.

use std::time::SystemTime;

use azservicebus::{ServiceBusMessage, ServiceBusPeekedMessage, ServiceBusReceivedMessage};
use cloudbus_core::{Error, Message, Result};
use fe2o3_amqp_types::messaging::{ApplicationProperties, Body};
use fe2o3_amqp_types::primitives::{OrderedMap, SimpleValue, Value};

use crate::TRANSPORT;

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
) -> Result<ServiceBusMessage> {
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
    let mut out = ServiceBusMessage::new(message.payload.to_vec());
    out.set_message_id(message.id.clone())
        .map_err(|e| invalid("id", e.to_string()))?;
    out.set_content_type(message.content_type.clone());
    out.set_correlation_id(message.correlation_id.clone());
    out.set_subject(message.subject.clone());
    if let Some(session_id) = session_id {
        out.set_session_id(session_id)
            .map_err(|e| invalid("ordering_key", e.to_string()))?;
    }
    if let Some(ttl) = message.time_to_live {
        out.set_time_to_live(ttl)
            .map_err(|e| invalid("time_to_live", e.to_string()))?;
    }
    if let Some(at) = message.deliver_at.filter(|at| *at > SystemTime::now()) {
        out.set_scheduled_enqueue_time(at.into());
    }
    if !message.attributes.is_empty() {
        let map: OrderedMap<String, SimpleValue> = message
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), SimpleValue::String(v.clone())))
            .collect();
        *out.application_properties_mut() = Some(ApplicationProperties(map));
    }
    Ok(out)
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

/// What the decoding reads of a received or a peeked message (azservicebus gives the two
/// the same accessors on different types).
pub(crate) trait Incoming {
    fn raw(&self) -> &fe2o3_amqp_types::messaging::Message<Body<Value>>;
    fn message_id(&self) -> Option<std::borrow::Cow<'_, str>>;
    fn sequence_number(&self) -> i64;
    fn application_properties(&self) -> Option<&ApplicationProperties>;
    fn content_type(&self) -> Option<&str>;
    fn correlation_id(&self) -> Option<std::borrow::Cow<'_, str>>;
    fn subject(&self) -> Option<&str>;
    fn session_id(&self) -> Option<&str>;
    fn time_to_live(&self) -> Option<std::time::Duration>;
}

macro_rules! incoming {
    ($type:ty) => {
        impl Incoming for $type {
            fn raw(&self) -> &fe2o3_amqp_types::messaging::Message<Body<Value>> {
                self.raw_amqp_message()
            }
            fn message_id(&self) -> Option<std::borrow::Cow<'_, str>> {
                <$type>::message_id(self)
            }
            fn sequence_number(&self) -> i64 {
                <$type>::sequence_number(self)
            }
            fn application_properties(&self) -> Option<&ApplicationProperties> {
                <$type>::application_properties(self)
            }
            fn content_type(&self) -> Option<&str> {
                <$type>::content_type(self)
            }
            fn correlation_id(&self) -> Option<std::borrow::Cow<'_, str>> {
                <$type>::correlation_id(self)
            }
            fn subject(&self) -> Option<&str> {
                <$type>::subject(self)
            }
            fn session_id(&self) -> Option<&str> {
                <$type>::session_id(self)
            }
            fn time_to_live(&self) -> Option<std::time::Duration> {
                <$type>::time_to_live(self)
            }
        }
    };
}

incoming!(ServiceBusReceivedMessage);
incoming!(ServiceBusPeekedMessage);

/// Converts a received (or peeked) message; `sessions` says whether a session id is an
/// ordering key.
pub(crate) fn from_servicebus(received: &impl Incoming, sessions: bool) -> Message {
    let raw = received.raw();
    let payload: Vec<u8> = match &raw.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
        Body::Value(value) => match &value.0 {
            Value::String(s) => s.clone().into_bytes(),
            Value::Binary(b) => b.to_vec(),
            other => format!("{other:?}").into_bytes(),
        },
        other => format!("{other:?}").into_bytes(),
    };
    let id = received
        .message_id()
        .map(|id| id.into_owned())
        .unwrap_or_else(|| received.sequence_number().to_string());
    let mut message = Message::with_id_and_payload(id.clone(), payload);
    if let Some(ApplicationProperties(properties)) = received.application_properties() {
        message.attributes = properties
            .iter()
            .map(|(k, v)| (k.clone(), simple_text(v)))
            .collect();
    }
    message.content_type = received.content_type().map(str::to_string);
    message.correlation_id = received.correlation_id().map(|c| c.into_owned());
    message.subject = received.subject().map(str::to_string);
    message.ordering_key = received
        .session_id()
        .filter(|s| sessions && !s.starts_with(UNORDERED_SESSION_PREFIX))
        .map(str::to_string);
    message.time_to_live = received.time_to_live();
    message
}

#[cfg(test)]
mod tests {
    use super::*;

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
