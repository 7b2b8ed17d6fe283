//! Fuzz targets (property tests) for messages from foreign producers: arbitrary bodies,
//! properties and header tables (nested arrays and tables, `x-death`, counts and
//! cloudbus's own names with values of any type) decode without a panic, and the body is
//! always the payload: nothing is dropped. Every message `encode` accepts decodes back
//! unchanged. Cases: `PROPTEST_CASES` (256 by default); RELIABILITY.md gives the long run.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

use cloudbus_core::Message;

use crate::mapping::{decode, encode};

/// Any header value, nested up to three levels.
fn value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<f64>().prop_map(AMQPValue::Double),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        "[ -~]{0,20}".prop_map(|s| AMQPValue::ShortString(ShortString::from(s))),
        vec(any::<u8>(), 0..32).prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
            table(inner).prop_map(AMQPValue::FieldTable),
        ]
    })
}

/// A header name: one the adapter or the broker gives meaning to, or anything.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "x-death",
            "x-delivery-count",
            "x-acquired-count",
            "queue",
            "reason",
            "cloudbus-deliveries",
            "cloudbus-expires-at",
            "cloudbus-other",
        ])
        .prop_map(str::to_string),
        "[ -~]{0,20}",
    ]
}

fn table(value: impl Strategy<Value = AMQPValue>) -> impl Strategy<Value = FieldTable> {
    vec((name(), value), 0..6).prop_map(|entries| {
        let mut table = FieldTable::default();
        for (key, value) in entries {
            table.insert(ShortString::from(key), value);
        }
        table
    })
}

fn properties() -> impl Strategy<Value = BasicProperties> {
    (
        prop::option::of("[ -~]{0,40}"),
        prop::option::of("[ -~]{0,20}"),
        prop::option::of(any::<u64>()),
        prop::option::of(table(value())),
    )
        .prop_map(|(id, kind, timestamp, headers)| {
            let mut properties = BasicProperties::default();
            if let Some(id) = id {
                properties = properties.with_message_id(ShortString::from(id));
            }
            if let Some(kind) = kind {
                properties = properties.with_type(ShortString::from(kind));
            }
            if let Some(timestamp) = timestamp {
                properties = properties.with_timestamp(timestamp);
            }
            if let Some(headers) = headers {
                properties = properties.with_headers(headers);
            }
            properties
        })
}

proptest! {
    #[test]
    fn fuzz_foreign_messages_decode_without_loss(
        properties in properties(),
        body in vec(any::<u8>(), 0..256),
        redelivered in any::<bool>(),
    ) {
        let decoded = decode(&properties, body.clone(), redelivered, || "fallback".to_string());
        prop_assert_eq!(&decoded.message.payload[..], &body[..]);
        let id = properties.message_id().as_ref().map_or("fallback", |id| id.as_str());
        prop_assert_eq!(decoded.message.id.as_str(), id);
    }

    #[test]
    fn fuzz_what_encode_accepts_decodes_back(
        payload in vec(any::<u8>(), 0..512),
        // Names encode refuses (`x-`, `cloudbus-`) have a test of their own.
        attributes in btree_map(
            "[a-z][a-z0-9_.-]{0,15}".prop_filter("not reserved", |k| !k.starts_with("x-") && !k.starts_with("cloudbus-")),
            any::<String>(),
            0..8,
        ),
        subject in prop::option::of("[ -~]{0,40}"),
        content_type in prop::option::of("[ -~]{0,40}"),
    ) {
        let mut message = Message::new(payload);
        message.attributes = attributes;
        message.subject = subject;
        message.content_type = content_type;
        let outgoing = encode(&message, 16 * 1024 * 1024, false);
        prop_assert!(outgoing.is_ok(), "{:?}", outgoing.err());
        if let Ok(outgoing) = outgoing {
            let decoded = decode(&outgoing.properties, outgoing.body.to_vec(), false, || "x".into())
                .message;
            prop_assert_eq!(&decoded.id, &message.id);
            prop_assert_eq!(&decoded.payload, &message.payload);
            prop_assert_eq!(&decoded.attributes, &message.attributes);
            prop_assert_eq!(&decoded.subject, &message.subject);
            prop_assert_eq!(&decoded.content_type, &message.content_type);
        }
    }
}
