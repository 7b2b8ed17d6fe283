//! Fuzz targets (property tests) for records from foreign producers: arbitrary keys,
//! values and headers (cloudbus's own names included, with arbitrary values) decode
//! without a panic, and the value is always the payload: nothing is dropped. Every message
//! `encode` accepts decodes back unchanged. Cases: `PROPTEST_CASES` (256 by default);
//! RELIABILITY.md gives the long run.

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use rdkafka::message::{Header, OwnedHeaders};

use cloudbus_core::Message;

use crate::mapping::{CONTENT_TYPE, EXPIRES_AT, ID, decode, encode};

/// A header name: cloudbus's own or anything.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![ID, CONTENT_TYPE, EXPIRES_AT, "cloudbus.other"])
            .prop_map(str::to_string),
        any::<String>(),
    ]
}

proptest! {
    #[test]
    fn fuzz_foreign_records_decode_without_loss(
        key in prop::option::of(vec(any::<u8>(), 0..32)),
        value in prop::option::of(vec(any::<u8>(), 0..256)),
        headers in vec((header_name(), prop::option::of(vec(any::<u8>(), 0..32))), 0..8),
    ) {
        let owned = headers.iter().fold(OwnedHeaders::new(), |owned, (key, value)| {
            owned.insert(Header { key, value: value.as_deref() })
        });
        let decoded = decode(key.as_deref(), value.as_deref(), Some(&owned), || "t/0/7".to_string());
        prop_assert_eq!(&decoded.message.payload[..], value.as_deref().unwrap_or_default());
        if !headers.iter().any(|(name, _)| name == ID) {
            prop_assert_eq!(decoded.message.id.as_str(), "t/0/7");
        }
    }

    #[test]
    fn fuzz_what_encode_accepts_decodes_back(
        payload in vec(any::<u8>(), 0..512),
        attributes in btree_map("[a-z][a-z0-9_.-]{0,15}", any::<String>(), 0..8),
        subject in prop::option::of(any::<String>()),
        key in prop::option::of(any::<String>()),
    ) {
        let mut message = Message::new(payload);
        message.attributes = attributes;
        message.subject = subject;
        message.ordering_key = key;
        let record = encode(&message, 1_000_000);
        prop_assert!(record.is_ok(), "{:?}", record.err());
        if let Ok(record) = record {
            let headers = record.owned_headers();
            let decoded = decode(
                record.key.as_deref().map(str::as_bytes),
                Some(&record.value),
                Some(&headers),
                || "t/0/7".to_string(),
            )
            .message;
            prop_assert_eq!(&decoded.id, &message.id);
            prop_assert_eq!(&decoded.payload, &message.payload);
            prop_assert_eq!(&decoded.attributes, &message.attributes);
            prop_assert_eq!(&decoded.subject, &message.subject);
            prop_assert_eq!(&decoded.ordering_key, &message.ordering_key);
        }
    }
}
