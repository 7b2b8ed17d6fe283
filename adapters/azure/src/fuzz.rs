//! Fuzz targets (property tests) for what Service Bus hands the adapter from foreign
//! producers: arbitrary bytes where an encoded message is expected (peeked messages,
//! batches) and arbitrary messages (bodies of every kind, ids of every type, application
//! properties of every simple type, annotations) convert without a panic, with the body
//! kept as the payload. Every message `to_servicebus` accepts converts back unchanged.
//! Cases: `PROPTEST_CASES` (256 by default); RELIABILITY.md gives the long run.

use fe2o3_amqp_types::messaging::message::__private::Serializable;
use fe2o3_amqp_types::messaging::{
    AmqpValue, ApplicationProperties, Batch, Body, Data, Header, Message as Amqp, MessageId,
    Properties,
};
use fe2o3_amqp_types::primitives::{Binary, OrderedMap, SimpleValue, Timestamp, Value};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

use cloudbus_core::Message;

use crate::mapping::{from_servicebus, to_servicebus};
use crate::protocol::codec::{AmqpMessage, decode, received};

fn simple() -> impl Strategy<Value = SimpleValue> {
    prop_oneof![
        any::<String>().prop_map(SimpleValue::String),
        any::<bool>().prop_map(SimpleValue::Bool),
        any::<i64>().prop_map(SimpleValue::Long),
        any::<u64>().prop_map(SimpleValue::Ulong),
        any::<f64>().prop_map(|f| SimpleValue::Double(f.into())),
        any::<i64>().prop_map(|t| SimpleValue::Timestamp(Timestamp::from_milliseconds(t))),
        any::<[u8; 16]>().prop_map(|u| SimpleValue::Uuid(u.into())),
        vec(any::<u8>(), 0..16).prop_map(|b| SimpleValue::Binary(Binary::from(b))),
        Just(SimpleValue::Null),
    ]
}

fn id() -> impl Strategy<Value = MessageId> {
    prop_oneof![
        any::<String>().prop_map(MessageId::String),
        any::<u64>().prop_map(MessageId::Ulong),
        any::<[u8; 16]>().prop_map(|u| MessageId::Uuid(u.into())),
        vec(any::<u8>(), 0..16).prop_map(|b| MessageId::Binary(Binary::from(b))),
    ]
}

/// A body and the payload cloudbus must make of it.
fn body() -> impl Strategy<Value = (Body<Value>, Option<Vec<u8>>)> {
    prop_oneof![
        vec(vec(any::<u8>(), 0..64), 1..4).prop_map(|sections| {
            let payload = sections.concat();
            let batch: Vec<Data> = sections
                .into_iter()
                .map(|s| Data(Binary::from(s)))
                .collect();
            (Body::Data(Batch::new(batch)), Some(payload))
        }),
        any::<String>().prop_map(|s| {
            let payload = s.clone().into_bytes();
            (Body::Value(AmqpValue(Value::String(s))), Some(payload))
        }),
        vec(any::<u8>(), 0..64).prop_map(|b| {
            (
                Body::Value(AmqpValue(Value::Binary(Binary::from(b.clone())))),
                Some(b),
            )
        }),
        any::<i64>().prop_map(|n| (Body::Value(AmqpValue(Value::Long(n))), None)),
        Just((Body::Empty, Some(Vec::new()))),
    ]
}

fn foreign() -> impl Strategy<Value = (AmqpMessage, Option<Vec<u8>>)> {
    (
        body(),
        prop::option::of(id()),
        prop::option::of(id()),
        prop::option::of(any::<String>()),
        btree_map(any::<String>(), simple(), 0..6),
        prop::option::of(any::<u32>()),
        prop::option::of(any::<u32>()),
    )
        .prop_map(
            |((body, payload), message_id, correlation, group, application, ttl, count)| {
                let properties = Properties {
                    message_id,
                    correlation_id: correlation,
                    group_id: group,
                    ..Default::default()
                };
                let header = Header {
                    ttl,
                    delivery_count: count.unwrap_or(0),
                    ..Default::default()
                };
                let message = Amqp {
                    header: Some(header),
                    delivery_annotations: None,
                    message_annotations: None,
                    properties: Some(properties),
                    application_properties: Some(ApplicationProperties(
                        application.into_iter().collect::<OrderedMap<_, _>>(),
                    )),
                    body,
                    footer: None,
                };
                (message, payload)
            },
        )
}

proptest! {
    #[test]
    fn fuzz_arbitrary_bytes_decode_or_fail_without_a_panic(bytes in vec(any::<u8>(), 0..256)) {
        if let Ok(message) = decode(&bytes) {
            let _ = from_servicebus(&message, true);
            let _ = received(&message, &bytes[..bytes.len().min(16)]);
        }
    }

    #[test]
    fn fuzz_foreign_messages_convert_without_loss(
        (message, payload) in foreign(),
        sessions in any::<bool>(),
        tag in vec(any::<u8>(), 0..20),
    ) {
        // On the wire and back, as a receive or a peek delivers it.
        let encoded = serde_amqp::to_vec(&Serializable(&message));
        prop_assert!(encoded.is_ok(), "{:?}", encoded.err());
        let decoded = decode(&encoded.unwrap_or_default());
        prop_assert!(decoded.is_ok(), "{:?}", decoded.err());
        let decoded = decoded.unwrap_or(message);
        let converted = from_servicebus(&decoded, sessions);
        let _ = received(&decoded, &tag);
        if let Some(payload) = payload {
            prop_assert_eq!(&converted.payload[..], &payload[..]);
        }
        let attributes = decoded.application_properties.as_ref().map_or(0, |a| a.0.len());
        prop_assert_eq!(converted.attributes.len(), attributes);
    }

    #[test]
    fn fuzz_what_to_servicebus_accepts_converts_back(
        payload in vec(any::<u8>(), 0..512),
        attributes in btree_map(any::<String>(), any::<String>(), 0..8),
        subject in prop::option::of(any::<String>()),
        key in prop::option::of("[a-z0-9]{1,20}"),
    ) {
        let mut message = Message::new(payload);
        message.attributes = attributes;
        message.subject = subject;
        message.ordering_key = key;
        if let Ok(amqp) = to_servicebus(&message, true, 256 * 1024) {
            let back = from_servicebus(&amqp, true);
            prop_assert_eq!(&back.id, &message.id);
            prop_assert_eq!(&back.payload, &message.payload);
            prop_assert_eq!(&back.attributes, &message.attributes);
            prop_assert_eq!(&back.subject, &message.subject);
            prop_assert_eq!(&back.ordering_key, &message.ordering_key);
        }
    }
}
