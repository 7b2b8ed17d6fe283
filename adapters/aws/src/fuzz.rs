//! Fuzz targets (property tests) for what SQS and SNS hand the adapter from foreign
//! producers: arbitrary bodies, attributes and `cloudbus` headers decode without a panic,
//! and a message without a readable header is delivered as it came, never dropped. Every
//! message `encode` accepts decodes back unchanged. Cases: `PROPTEST_CASES` (256 by
//! default); RELIABILITY.md gives the long run.

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

use cloudbus_core::Message;

use crate::codec::{CLOUDBUS_ATTRIBUTE, Target, decode, encode, unwrap_sns_envelope};

const SQS: Target = Target {
    transport: "sqs",
    fifo: false,
    delay: true,
    max_size: 256 * 1024,
};
const FIFO: Target = Target {
    transport: "sqs",
    fifo: true,
    delay: false,
    max_size: 256 * 1024,
};

/// What another producer may put in the `cloudbus` attribute: anything, or JSON shaped
/// like a header with arbitrary values.
fn header() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        (
            any::<String>(),
            prop::option::of(prop_oneof![
                Just("base64".to_string()),
                Just("empty".to_string()),
                any::<String>()
            ]),
            prop::option::of(any::<u64>()),
            btree_map(any::<String>(), any::<String>(), 0..4),
        )
            .prop_map(|(id, enc, exp, attrs)| {
                serde_json::json!({ "id": id, "enc": enc, "exp": exp, "attrs": attrs }).to_string()
            }),
    ]
}

/// Mostly text SQS allows, sometimes anything.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![4 => "[ -~]{0,30}", 1 => any::<String>()]
}

fn message() -> impl Strategy<Value = Message> {
    (
        prop_oneof![
            vec(any::<u8>(), 0..512),
            text().prop_map(String::into_bytes)
        ],
        btree_map("[A-Za-z0-9_.-]{1,20}", text(), 0..10),
        prop::option::of(text()),
        prop::option::of(text()),
        prop::option::of("[A-Za-z0-9]{1,20}"),
    )
        .prop_map(|(payload, attributes, content_type, subject, key)| {
            let mut message = Message::new(payload);
            message.attributes = attributes;
            message.content_type = content_type;
            message.subject = subject;
            message.ordering_key = key;
            message
        })
}

proptest! {
    #[test]
    fn fuzz_foreign_bodies_and_attributes_decode_without_loss(
        body in any::<String>(),
        mut attributes in btree_map(any::<String>(), any::<String>(), 0..10),
        header in prop::option::of(header()),
        group in prop::option::of(any::<String>()),
    ) {
        if let Some(header) = &header {
            attributes.insert(CLOUDBUS_ATTRIBUTE.to_string(), header.clone());
        }
        let decoded = decode(&body, attributes.clone(), "transport-id", group, None);
        let readable = header.as_deref().is_some_and(|h| {
            serde_json::from_str::<serde_json::Value>(h)
                .ok()
                .and_then(|v| v.get("id").map(serde_json::Value::is_string))
                .unwrap_or(false)
        });
        if !readable {
            // No cloudbus header: the body and every attribute as they came.
            prop_assert_eq!(&decoded.message.payload[..], body.as_bytes());
            prop_assert_eq!(&decoded.message.attributes, &attributes);
            prop_assert_eq!(decoded.message.id.as_str(), "transport-id");
        }
    }

    #[test]
    fn fuzz_sns_envelopes_never_panic(body in any::<String>(), json in header()) {
        let _ = unwrap_sns_envelope(&body);
        let _ = unwrap_sns_envelope(&json);
    }

    #[test]
    fn fuzz_what_encode_accepts_decodes_back(mut message in message(), fifo in any::<bool>()) {
        let target = if fifo { FIFO } else { SQS };
        if !fifo {
            // Refused on a standard queue (Unsupported): that case has a test of its own.
            message.ordering_key = None;
        }
        let encoded = encode(&message, target, true);
        if fifo || message.attributes.len() < 9 && message.attributes.values().all(|v| v.is_ascii()) {
            // What SQS allows is accepted.
            prop_assert!(encoded.is_ok() || fifo, "{:?}", encoded.err());
        }
        if let Ok(encoded) = encoded {
            let attributes = encoded.attributes.iter().cloned().collect();
            let decoded = decode(
                &encoded.body,
                attributes,
                "transport-id",
                encoded.group_id,
                encoded.deduplication_id,
            )
            .message;
            prop_assert_eq!(&decoded.id, &message.id);
            prop_assert_eq!(&decoded.payload, &message.payload);
            prop_assert_eq!(&decoded.attributes, &message.attributes);
            prop_assert_eq!(&decoded.content_type, &message.content_type);
            prop_assert_eq!(&decoded.subject, &message.subject);
            if fifo {
                prop_assert_eq!(&decoded.ordering_key, &message.ordering_key);
            }
        }
    }
}
