//! Messages as the broker keeps them: decoded header, annotations and
//! properties (needed for routing, filters and broker annotations), and the
//! body sections kept as the client encoded them.

use bytes::Bytes;
use fe2o3_amqp_types::messaging::{
    ApplicationProperties, DeliveryAnnotations, Header, MessageAnnotations, MessageId, Properties,
    annotations::OwnedKey,
};
use fe2o3_amqp_types::primitives::SimpleValue;
use serde_amqp::primitives::{OrderedMap, Symbol, Timestamp, Uuid};
use serde_amqp::{Value, from_slice};

use crate::codec::{DecodeError, encode, section, split_sections};

/// Message format of a batch: each data section holds one encoded message.
pub const BATCH_FORMAT: u32 = 0x8001_3700;

/// A message split into the parts the broker reads or rewrites.
#[derive(Debug, Clone, Default)]
pub struct AmqpMessage {
    /// The header section, if sent.
    pub header: Option<Header>,
    /// Message annotations.
    pub annotations: OrderedMap<OwnedKey, Value>,
    /// The properties section.
    pub properties: Option<Properties>,
    /// Application properties.
    pub application_properties: Option<OrderedMap<String, SimpleValue>>,
    /// Body sections and footer, as encoded by the client.
    pub body: Bytes,
}

impl AmqpMessage {
    /// Split an encoded message.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut msg = AmqpMessage::default();
        let mut body_start = None;
        for (code, start, end) in split_sections(bytes)? {
            let raw = &bytes[start..end];
            match code {
                section::HEADER => msg.header = Some(from_slice(raw)?),
                section::DELIVERY_ANNOTATIONS => {}
                section::MESSAGE_ANNOTATIONS => {
                    let ma: MessageAnnotations = from_slice(raw)?;
                    msg.annotations = ma.0;
                }
                section::PROPERTIES => msg.properties = Some(from_slice(raw)?),
                section::APPLICATION_PROPERTIES => {
                    let ap: ApplicationProperties = from_slice(raw)?;
                    msg.application_properties = Some(ap.0);
                }
                section::DATA | section::AMQP_SEQUENCE | section::AMQP_VALUE | section::FOOTER => {
                    if body_start.is_none() {
                        body_start = Some(start);
                    }
                }
                other => {
                    return Err(DecodeError(format!("unknown message section 0x{other:x}")));
                }
            }
        }
        if let Some(start) = body_start {
            msg.body = Bytes::copy_from_slice(&bytes[start..]);
        }
        Ok(msg)
    }

    /// The inner messages of a batch (format 0x80013700): one per data section.
    pub fn decode_batch(bytes: &[u8]) -> Result<Vec<AmqpMessage>, DecodeError> {
        let mut out = Vec::new();
        for (code, start, end) in split_sections(bytes)? {
            if code == section::DATA {
                let data: fe2o3_amqp_types::messaging::Data = from_slice(&bytes[start..end])?;
                out.push(AmqpMessage::decode(&data.0)?);
            }
        }
        Ok(out)
    }

    /// The body as a single amqp-value, if it is one.
    pub fn value_body(&self) -> Option<Value> {
        let sections = split_sections(&self.body).ok()?;
        let (code, start, end) = *sections.first()?;
        if code != section::AMQP_VALUE {
            return None;
        }
        let v: fe2o3_amqp_types::messaging::AmqpValue<Value> =
            from_slice(&self.body[start..end]).ok()?;
        Some(v.0)
    }

    /// Message id as given.
    pub fn message_id(&self) -> Option<&MessageId> {
        self.properties.as_ref()?.message_id.as_ref()
    }

    /// The session id (AMQP group-id).
    pub fn session_id(&self) -> Option<&str> {
        self.properties.as_ref()?.group_id.as_deref()
    }

    /// A message annotation by symbol key.
    pub fn annotation(&self, key: &str) -> Option<&Value> {
        self.annotations.get(&OwnedKey::Symbol(Symbol::from(key)))
    }

    /// Set a message annotation.
    pub fn set_annotation(&mut self, key: &str, value: Value) {
        self.annotations
            .insert(OwnedKey::Symbol(Symbol::from(key)), value);
    }

    /// Remove a message annotation.
    pub fn remove_annotation(&mut self, key: &str) {
        self.annotations
            .swap_remove(&OwnedKey::Symbol(Symbol::from(key)));
    }

    /// Set an application property.
    pub fn set_property(&mut self, key: &str, value: SimpleValue) {
        self.application_properties
            .get_or_insert_with(OrderedMap::new)
            .insert(key.to_string(), value);
    }

    /// An application property.
    pub fn property(&self, key: &str) -> Option<&SimpleValue> {
        self.application_properties.as_ref()?.get(key)
    }

    /// Encode with the given header and delivery annotations.
    pub fn encode_with(
        &self,
        header: Option<&Header>,
        delivery_annotations: Option<&OrderedMap<OwnedKey, Value>>,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 256);
        if let Some(h) = header {
            out.extend_from_slice(&encode(h));
        }
        if let Some(da) = delivery_annotations {
            out.extend_from_slice(&encode(&DeliveryAnnotations(da.clone())));
        }
        if !self.annotations.is_empty() {
            out.extend_from_slice(&encode(&MessageAnnotations(self.annotations.clone())));
        }
        if let Some(p) = &self.properties {
            out.extend_from_slice(&encode(p));
        }
        if let Some(ap) = &self.application_properties {
            out.extend_from_slice(&encode(&ApplicationProperties(ap.clone())));
        }
        out.extend_from_slice(&self.body);
        out
    }

    /// Encode as sent (header included).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with(self.header.as_ref(), None)
    }

    /// Rough size used for quota checks.
    pub fn size(&self) -> usize {
        self.body.len()
            + self.annotations.len() * 32
            + self
                .application_properties
                .as_ref()
                .map_or(0, |a| a.len() * 32)
            + 64
    }
}

/// Build a reply/request style message with properties, application properties and an amqp-value body.
pub fn value_message(
    properties: Properties,
    app: OrderedMap<String, SimpleValue>,
    body: Value,
) -> Vec<u8> {
    let mut out = encode(&properties);
    out.extend_from_slice(&encode(&ApplicationProperties(app)));
    out.extend_from_slice(&encode(&fe2o3_amqp_types::messaging::AmqpValue(body)));
    out
}

/// Current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An AMQP timestamp value.
pub fn timestamp(ms: i64) -> Value {
    Value::Timestamp(Timestamp::from_milliseconds(ms))
}

/// An AMQP uuid value from a Rust uuid.
pub fn uuid_value(u: uuid::Uuid) -> Value {
    Value::Uuid(Uuid::from(*u.as_bytes()))
}

/// A Rust uuid from an AMQP value (uuid, 16-byte binary or string).
pub fn uuid_from_value(v: &Value) -> Option<uuid::Uuid> {
    match v {
        Value::Uuid(u) => Some(uuid::Uuid::from_bytes(*u.as_inner())),
        Value::Binary(b) if b.len() == 16 => uuid::Uuid::from_slice_le(b).ok(),
        Value::String(s) => uuid::Uuid::parse_str(s).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::{Body, Message};

    #[test]
    fn decode_and_reencode() {
        let m = Message::builder()
            .properties(Properties {
                message_id: Some(MessageId::String("a".into())),
                ..Default::default()
            })
            .application_properties(ApplicationProperties::builder().insert("k", 1i32).build())
            .body(Body::<Value>::Data(
                fe2o3_amqp_types::messaging::Batch::new(vec![fe2o3_amqp_types::messaging::Data(
                    serde_bytes::ByteBuf::from(b"hi".to_vec()),
                )]),
            ))
            .build();
        let bytes = encode(&fe2o3_amqp_types::messaging::message::__private::Serializable(m));
        let parsed = AmqpMessage::decode(&bytes).expect("decodes");
        assert_eq!(parsed.message_id(), Some(&MessageId::String("a".into())));
        assert_eq!(parsed.property("k"), Some(&SimpleValue::Int(1)));
        let again = AmqpMessage::decode(&parsed.encode()).expect("decodes again");
        assert_eq!(again.body, parsed.body);
    }
}
