//! A cloudbus [`Message`] as a Kafka record and back (the README's "Kafka mapping"), so
//! that other Kafka producers and consumers interoperate:
//!
//! - **value** = the payload, byte-exact (an empty payload is an empty value, not a null).
//! - **key** = the ordering key (records of one key go to one partition, in order); no key
//!   without one.
//! - **headers**: every attribute as a header of the same name with its UTF-8 value, and
//!   cloudbus's own fields in headers under `cloudbus.`: `cloudbus.id` (the message id),
//!   `cloudbus.content-type`, `cloudbus.correlation-id`, `cloudbus.subject`, and
//!   `cloudbus.expires-at` (unix milliseconds, from the time to live). Attribute names
//!   starting with `cloudbus.` are reserved.
//! - Records of other producers: the id is `<topic>/<partition>/<offset>` (stable across
//!   redeliveries); a header whose value is not UTF-8 arrives base64-encoded, one without
//!   a value as an empty attribute; of repeated header names the last one wins; a null
//!   value arrives as an empty payload.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use cloudbus_core::{Attributes, Error, Message, Result};
use rdkafka::message::{Header, Headers, OwnedHeaders};

use crate::TRANSPORT;

/// The prefix of cloudbus's own headers; attribute names may not start with it.
pub(crate) const RESERVED_PREFIX: &str = "cloudbus.";
/// The message id.
pub(crate) const ID: &str = "cloudbus.id";
/// The content type.
pub(crate) const CONTENT_TYPE: &str = "cloudbus.content-type";
/// The correlation id.
pub(crate) const CORRELATION_ID: &str = "cloudbus.correlation-id";
/// The subject.
pub(crate) const SUBJECT: &str = "cloudbus.subject";
/// When the message expires (its time to live), in unix milliseconds.
pub(crate) const EXPIRES_AT: &str = "cloudbus.expires-at";
/// On a dead-lettered copy: where the original was (`<topic>/<partition>/<offset>`);
/// received as the attribute [`DEAD_LETTER_SOURCE`](cloudbus_core::subscriber::DEAD_LETTER_SOURCE),
/// which a publisher may send again (names under `cloudbus.` it refuses).
pub(crate) const DEAD_LETTER_SOURCE: &str = "cloudbus.dead-letter-source";

/// A message ready to be produced.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) key: Option<String>,
    pub(crate) value: Vec<u8>,
    pub(crate) headers: Vec<(String, String)>,
}

impl Record {
    /// The record's size as the limit counts it: value, key, header names and values.
    pub(crate) fn size(&self) -> usize {
        self.value.len()
            + self.key.as_ref().map_or(0, String::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    pub(crate) fn owned_headers(&self) -> OwnedHeaders {
        self.headers.iter().fold(
            OwnedHeaders::new_with_capacity(self.headers.len()),
            |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                })
            },
        )
    }
}

/// Converts `message`, checking what Kafka cannot carry and the size limit first.
pub(crate) fn encode(message: &Message, max_size: usize) -> Result<Record> {
    if message.deliver_at.is_some_and(|at| at > SystemTime::now()) {
        return Err(Error::Unsupported {
            transport: TRANSPORT,
            feature: "delayed delivery (deliver_at / deliver_after): a Kafka record is readable \
                      as soon as it is written; publish later, or use a transport with scheduling"
                .into(),
        });
    }
    if message
        .deduplication_id
        .as_ref()
        .is_some_and(|d| d != &message.id)
    {
        return Err(Error::Unsupported {
            transport: TRANSPORT,
            feature: "a deduplication id: Kafka does not deduplicate by id (the idempotent \
                      producer already keeps its own retries from duplicating)"
                .into(),
        });
    }
    if message.id.is_empty() {
        return Err(Error::InvalidInput {
            transport: TRANSPORT,
            field: "id",
            rule: "a message id is not empty".into(),
        });
    }
    let mut headers = Vec::with_capacity(message.attributes.len() + 5);
    for (key, value) in &message.attributes {
        if key.starts_with(RESERVED_PREFIX) {
            return Err(Error::InvalidAttribute {
                transport: TRANSPORT,
                key: key.clone(),
                rule: format!(
                    "header names starting with `{RESERVED_PREFIX}` carry cloudbus's own fields; \
                     rename the attribute"
                ),
            });
        }
        headers.push((key.clone(), value.clone()));
    }
    headers.push((ID.to_string(), message.id.clone()));
    let fields = [
        (CONTENT_TYPE, &message.content_type),
        (CORRELATION_ID, &message.correlation_id),
        (SUBJECT, &message.subject),
    ];
    for (name, value) in fields {
        if let Some(value) = value {
            headers.push((name.to_string(), value.clone()));
        }
    }
    if let Some(ttl) = message.time_to_live {
        let expires = SystemTime::now() + ttl;
        headers.push((EXPIRES_AT.to_string(), unix_millis(expires).to_string()));
    }
    let record = Record {
        key: message.ordering_key.clone(),
        value: message.payload.to_vec(),
        headers,
    };
    let size = record.size();
    if size > max_size {
        return Err(Error::TooLarge {
            transport: TRANSPORT,
            size,
            limit: max_size,
        });
    }
    Ok(record)
}

/// A received record as a message, and when it expires (its time to live).
pub(crate) struct Decoded {
    pub(crate) message: Message,
    pub(crate) expires_at: Option<SystemTime>,
}

/// Converts a received record. `source` gives `<topic>/<partition>/<offset>`, the id of a
/// record that carries none.
pub(crate) fn decode(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: Option<&impl Headers>,
    source: impl FnOnce() -> String,
) -> Decoded {
    let mut attributes = Attributes::new();
    let mut id = None;
    let mut message =
        Message::with_id_and_payload(String::new(), value.unwrap_or_default().to_vec());
    let mut expires_at = None;
    for header in headers.into_iter().flat_map(|h| h.iter()) {
        let text = header.value.map(header_text).unwrap_or_default();
        match header.key {
            ID => id = Some(text),
            CONTENT_TYPE => message.content_type = Some(text),
            CORRELATION_ID => message.correlation_id = Some(text),
            SUBJECT => message.subject = Some(text),
            DEAD_LETTER_SOURCE => {
                attributes.insert(
                    cloudbus_core::subscriber::DEAD_LETTER_SOURCE.to_string(),
                    text,
                );
            }
            EXPIRES_AT => {
                expires_at = text
                    .parse::<u64>()
                    .ok()
                    .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
            }
            key => {
                attributes.insert(key.to_string(), text);
            }
        }
    }
    message.id = id.unwrap_or_else(source);
    message.attributes = attributes;
    message.ordering_key = key.map(|k| String::from_utf8_lossy(k).into_owned());
    message.time_to_live = expires_at.map(|at| {
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    });
    Decoded {
        message,
        expires_at,
    }
}

/// A header value as text: UTF-8 as it is, anything else base64-encoded.
fn header_text(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(text) => text.to_string(),
        Err(_) => BASE64.encode(value),
    }
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_round_trips_through_a_record() {
        let message = Message::new(vec![0u8, 255, 1])
            .with_attribute("tenant", "acme")
            .with_content_type("application/octet-stream")
            .with_correlation_id("c")
            .with_subject("s")
            .with_ordering_key("k")
            .with_time_to_live(Duration::from_secs(60));
        let record = encode(&message, 1_000_000).unwrap();
        assert_eq!(record.key.as_deref(), Some("k"));
        let headers = record.owned_headers();
        let decoded = decode(
            record.key.as_deref().map(str::as_bytes),
            Some(&record.value),
            Some(&headers),
            || "t/0/7".to_string(),
        );
        let got = decoded.message;
        assert_eq!(got.id, message.id);
        assert_eq!(got.payload, message.payload);
        assert_eq!(got.attributes, message.attributes);
        assert_eq!(got.content_type, message.content_type);
        assert_eq!(got.correlation_id, message.correlation_id);
        assert_eq!(got.subject, message.subject);
        assert_eq!(got.ordering_key, message.ordering_key);
        assert!(decoded.expires_at.is_some());
    }

    #[test]
    fn foreign_records_get_a_stable_id_and_text_headers() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "binary",
                value: Some(&[0xffu8, 0xfe][..]),
            })
            .insert(Header {
                key: "empty",
                value: None::<&[u8]>,
            });
        let decoded = decode(None, None, Some(&headers), || "t/2/40".to_string());
        assert_eq!(decoded.message.id, "t/2/40");
        assert!(decoded.message.payload.is_empty());
        assert_eq!(
            decoded.message.attributes["binary"],
            BASE64.encode([0xffu8, 0xfe])
        );
        assert_eq!(decoded.message.attributes["empty"], "");
    }

    #[test]
    fn what_kafka_cannot_carry_is_refused() {
        let delayed = Message::new("x").with_deliver_after(Duration::from_secs(60));
        assert!(matches!(
            encode(&delayed, 100),
            Err(Error::Unsupported { .. })
        ));
        let reserved = Message::new("x").with_attribute("cloudbus.id", "y");
        assert!(matches!(
            encode(&reserved, 100),
            Err(Error::InvalidAttribute { .. })
        ));
        let big = Message::new(vec![0u8; 100]);
        assert!(matches!(
            encode(&big, 100),
            Err(Error::TooLarge { limit: 100, .. })
        ));
    }
}
