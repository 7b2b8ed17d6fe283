//! Messages to AMQP 0-9-1 messages and back.
//!
//! - payload = body, byte-exact; id = `message_id`, content type = `content_type`,
//!   correlation id = `correlation_id`, subject = `type`; the publish time is
//!   `timestamp` (whole seconds); messages are persistent (`delivery_mode` 2).
//! - attributes = headers, sent as long strings. Headers of other producers arrive as
//!   text: strings as they are (bytes that are not UTF-8, and byte arrays, as base64),
//!   booleans `true`/`false`, integers and floats in decimal, decimals with their scale
//!   (`12.50`), timestamps in RFC 3339 (past the year 9999 in unix seconds), tables and
//!   arrays as JSON. The broker's own headers (`x-…`) are not attributes.
//! - time to live = `expiration`, and the header `cloudbus-expires-at` (unix milliseconds)
//!   by which the subscriber drops a message that outlived it on the way (a delayed copy
//!   travels without `expiration`).
//! - `cloudbus-deliveries`: on a copy that a delayed nack made, the deliveries before it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use cloudbus_core::{Attributes, Error, Message, Result};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::TRANSPORT;

/// Unix milliseconds after which the message is not delivered.
pub(crate) const EXPIRES_AT: &str = "cloudbus-expires-at";
/// Deliveries of the message before this copy (a delayed nack's copy).
pub(crate) const DELIVERIES: &str = "cloudbus-deliveries";
/// Where a delayed copy goes when its delay is over: `q:<queue>` or `x:<exchange>`.
pub(crate) const DELAY_TARGET: &str = "cloudbus-delay-target";
/// The prefixes of headers that are not attributes: the broker's and cloudbus's own.
const RESERVED: [&str; 2] = ["x-", "cloudbus-"];
/// Longest AMQP short string: header names and the message properties.
const SHORT: usize = 255;
/// Per header and property, what the encoding adds beyond the text (type tag, length).
const OVERHEAD: usize = 6;

/// A message ready to publish.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub(crate) properties: BasicProperties,
    pub(crate) body: Bytes,
}

/// Encodes `message`; `expiration` says whether the broker should expire it (not for a
/// copy that travels through the delay queues, whose own expiry would move it on early).
pub(crate) fn encode(
    message: &Message,
    max_message_size: usize,
    expiration: bool,
) -> Result<Outgoing> {
    let mut size = message.payload.len();
    let mut headers = FieldTable::default();
    for (key, value) in &message.attributes {
        if key.len() > SHORT {
            return Err(Error::InvalidAttribute {
                transport: TRANSPORT,
                key: key.clone(),
                rule: format!(
                    "a header name has at most {SHORT} bytes; this one has {}",
                    key.len()
                ),
            });
        }
        if key.is_empty() || RESERVED.iter().any(|p| key.starts_with(p)) {
            return Err(Error::InvalidAttribute {
                transport: TRANSPORT,
                key: key.clone(),
                rule: "attribute names are not empty and do not start with `x-` (the \
                       broker's headers) or `cloudbus-` (cloudbus's own)"
                    .into(),
            });
        }
        size += key.len() + value.len() + OVERHEAD;
        headers.insert(
            key.as_str().into(),
            AMQPValue::LongString(value.as_str().into()),
        );
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(short("id", &message.id)?)
        .with_timestamp(unix_seconds(SystemTime::now()));
    size += message.id.len() + OVERHEAD;
    if let Some(content_type) = &message.content_type {
        properties = properties.with_content_type(short("content_type", content_type)?);
        size += content_type.len() + OVERHEAD;
    }
    if let Some(correlation_id) = &message.correlation_id {
        properties = properties.with_correlation_id(short("correlation_id", correlation_id)?);
        size += correlation_id.len() + OVERHEAD;
    }
    if let Some(subject) = &message.subject {
        properties = properties.with_type(short("subject", subject)?);
        size += subject.len() + OVERHEAD;
    }
    if let Some(ttl) = message.time_to_live {
        let millis = ttl.as_millis().max(1);
        let expires_at = SystemTime::now() + ttl;
        headers.insert(
            EXPIRES_AT.into(),
            AMQPValue::LongString(unix_millis(expires_at).to_string().into()),
        );
        if expiration {
            properties = properties.with_expiration(millis.to_string().into());
        }
        size += 2 * (EXPIRES_AT.len() + 20 + OVERHEAD);
    }
    if size > max_message_size {
        return Err(Error::TooLarge {
            transport: TRANSPORT,
            size,
            limit: max_message_size,
        });
    }
    Ok(Outgoing {
        properties: properties.with_headers(headers),
        body: message.payload.clone(),
    })
}

/// A property value: at most 255 bytes.
fn short(field: &'static str, value: &str) -> Result<ShortString> {
    if value.len() > SHORT {
        return Err(Error::InvalidInput {
            transport: TRANSPORT,
            field,
            rule: format!(
                "an AMQP property has at most {SHORT} bytes; this one has {}: shorten it, or \
                 carry it in an attribute",
                value.len()
            ),
        });
    }
    Ok(value.into())
}

/// A received message, with what the transport needs besides.
#[derive(Debug)]
pub(crate) struct Decoded {
    pub(crate) message: Message,
    /// Deliveries before this one: of earlier copies, plus the broker's count of this one.
    pub(crate) earlier_deliveries: u32,
    pub(crate) enqueued_at: SystemTime,
    pub(crate) expires_at: Option<SystemTime>,
}

/// Decodes a received message. `fallback_id` names a message that has no `message_id`
/// (from another producer).
pub(crate) fn decode(
    properties: &BasicProperties,
    body: Vec<u8>,
    redelivered: bool,
    fallback_id: impl FnOnce() -> String,
) -> Decoded {
    let id = properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_string())
        .unwrap_or_else(fallback_id);
    let mut message = Message::with_id_and_payload(id, Bytes::from(body));
    message.content_type = properties
        .content_type()
        .as_ref()
        .map(|v| v.as_str().to_string());
    message.correlation_id = properties
        .correlation_id()
        .as_ref()
        .map(|v| v.as_str().to_string());
    message.subject = properties.kind().as_ref().map(|v| v.as_str().to_string());
    let mut attributes = Attributes::new();
    let mut copies = 0u32;
    let mut broker_count = 0u32;
    let mut expires_at = None;
    let mut death_reason = None;
    if let Some(headers) = properties.headers() {
        for (key, value) in headers {
            let key = key.as_str();
            match key {
                DELIVERIES => copies = integer(value).unwrap_or(0),
                EXPIRES_AT => {
                    expires_at = text(value)
                        .parse::<u64>()
                        .ok()
                        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
                }
                // RabbitMQ before 4.3 counts returns in x-delivery-count; 4.3 counts
                // acquisitions in x-acquired-count and no longer counts nacks in the other.
                "x-delivery-count" | "x-acquired-count" => {
                    broker_count = broker_count.max(integer(value).unwrap_or(0));
                }
                "x-death" => death_reason = broker_death(value),
                _ if RESERVED.iter().any(|p| key.starts_with(p)) => {}
                _ => {
                    attributes.insert(key.to_string(), text(value));
                }
            }
        }
    }
    if let Some(reason) = death_reason {
        // Dead-lettered by the broker rather than by cloudbus: say why, in cloudbus's terms.
        attributes
            .entry(cloudbus_core::subscriber::DEAD_LETTER_REASON.to_string())
            .or_insert_with(|| broker_reason(&reason));
    }
    message.attributes = attributes;
    let broker_count = if redelivered {
        broker_count.max(1)
    } else {
        broker_count
    };
    // A foreign producer's timestamp may lie past what SystemTime holds: then it is unknown.
    let enqueued_at = properties
        .timestamp()
        .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s)))
        .unwrap_or_else(SystemTime::now);
    Decoded {
        message,
        earlier_deliveries: copies.saturating_add(broker_count),
        enqueued_at,
        expires_at,
    }
}

/// The reason of the latest dead-lettering in an `x-death` header (newest first) that
/// was not a hop through the delay queues.
fn broker_death(value: &AMQPValue) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = value else {
        return None;
    };
    deaths.as_slice().iter().find_map(|death| {
        let AMQPValue::FieldTable(death) = death else {
            return None;
        };
        let field = |name: &str| death.inner().get(name).map(text);
        let queue = field("queue").unwrap_or_default();
        if queue.starts_with(crate::topology::DELAY_PREFIX) {
            return None;
        }
        field("reason")
    })
}

/// The properties of a copy of a received message (a dead letter, or a delayed nack's):
/// its own, without the broker's headers and without `expiration` (a copy's time to live
/// is its `cloudbus-expires-at`), with `extra` headers.
pub(crate) fn copy(properties: &BasicProperties, extra: &[(&str, String)]) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(original) = properties.headers() {
        for (key, value) in original {
            if !key.as_str().starts_with("x-") {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    if let (Some(ttl), false) = (properties.expiration(), headers.contains_key(EXPIRES_AT)) {
        // Another producer's time to live: from now on, as far as anyone can tell.
        if let Ok(millis) = ttl.as_str().parse::<u64>() {
            let at = SystemTime::now() + Duration::from_millis(millis);
            headers.insert(EXPIRES_AT.into(), long_string(unix_millis(at).to_string()));
        }
    }
    for (key, value) in extra {
        headers.insert((*key).into(), long_string(value.as_str()));
    }
    carry(
        properties,
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers),
    )
}

/// Every property of `from` but headers, expiration and delivery mode, onto `to`.
fn carry(from: &BasicProperties, mut to: BasicProperties) -> BasicProperties {
    if let Some(v) = from.content_type() {
        to = to.with_content_type(v.clone());
    }
    if let Some(v) = from.content_encoding() {
        to = to.with_content_encoding(v.clone());
    }
    if let Some(v) = from.priority() {
        to = to.with_priority(*v);
    }
    if let Some(v) = from.correlation_id() {
        to = to.with_correlation_id(v.clone());
    }
    if let Some(v) = from.reply_to() {
        to = to.with_reply_to(v.clone());
    }
    if let Some(v) = from.message_id() {
        to = to.with_message_id(v.clone());
    }
    if let Some(v) = from.timestamp() {
        to = to.with_timestamp(*v);
    }
    if let Some(v) = from.kind() {
        to = to.with_type(v.clone());
    }
    if let Some(v) = from.user_id() {
        to = to.with_user_id(v.clone());
    }
    if let Some(v) = from.app_id() {
        to = to.with_app_id(v.clone());
    }
    to
}

/// The broker's dead-letter reasons in cloudbus's words.
fn broker_reason(reason: &str) -> String {
    match reason {
        "delivery_limit" => cloudbus_core::subscriber::MAX_DELIVERY_COUNT_EXCEEDED.to_string(),
        "expired" => "Expired".to_string(),
        "maxlen" => "MaxLength".to_string(),
        "rejected" => "Rejected".to_string(),
        other => other.to_string(),
    }
}

/// An integer header (any width), if it is one or is text of one.
fn integer(value: &AMQPValue) -> Option<u32> {
    match value {
        AMQPValue::ShortShortInt(v) => u32::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u32::from(*v)),
        AMQPValue::ShortInt(v) => u32::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u32::from(*v)),
        AMQPValue::LongInt(v) => u32::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(*v),
        AMQPValue::LongLongInt(v) => u32::try_from(*v).ok(),
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => text(value).parse().ok(),
        _ => None,
    }
}

/// A header value as text (see the module's documentation).
pub(crate) fn text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => bytes_text(s.as_bytes()),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::ByteArray(b) => base64::engine::general_purpose::STANDARD.encode(b.as_slice()),
        AMQPValue::Timestamp(t) => timestamp_text(*t),
        AMQPValue::Void => String::new(),
        AMQPValue::FieldTable(_) | AMQPValue::FieldArray(_) => json(value).to_string(),
        AMQPValue::DecimalValue(d) => decimal(d.value, d.scale),
        other => match json(other) {
            serde_json::Value::String(s) => s,
            v => v.to_string(),
        },
    }
}

/// The last second RFC 3339 can write (9999-12-31T23:59:59Z).
const LAST_RFC3339_SECOND: u64 = 253_402_300_799;

/// A timestamp header in RFC 3339; one past the year 9999, which RFC 3339 cannot write,
/// as its unix seconds.
fn timestamp_text(seconds: u64) -> String {
    if seconds > LAST_RFC3339_SECOND {
        return seconds.to_string();
    }
    humantime::format_rfc3339(UNIX_EPOCH + Duration::from_secs(seconds)).to_string()
}

fn bytes_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(_) => base64::engine::general_purpose::STANDARD.encode(bytes),
    }
}

/// A decimal header: `value` × 10^-`scale`. The value is a signed 32-bit integer on the
/// wire (lapin's type is unsigned: the bits are reread as signed).
fn decimal(value: u32, scale: u8) -> String {
    let value = value as i32;
    let digits = value.unsigned_abs().to_string();
    let sign = if value < 0 { "-" } else { "" };
    let scale = usize::from(scale);
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = padded.split_at(padded.len() - scale);
    format!("{sign}{whole}.{fraction}")
}

fn json(value: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => (*v).into(),
        AMQPValue::Float(v) => {
            serde_json::Number::from_f64(f64::from(*v)).map_or(Value::Null, Value::Number)
        }
        AMQPValue::Double(v) => serde_json::Number::from_f64(*v).map_or(Value::Null, Value::Number),
        AMQPValue::FieldTable(table) => Value::Object(
            table
                .into_iter()
                .map(|(k, v)| (k.as_str().to_string(), json(v)))
                .collect(),
        ),
        AMQPValue::FieldArray(array) => Value::Array(array.as_slice().iter().map(json).collect()),
        AMQPValue::Void => Value::Null,
        other => Value::String(text(other)),
    }
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(crate) fn unix_millis(at: SystemTime) -> u128 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

/// A header holding text, as cloudbus sends every header.
pub(crate) fn long_string(value: impl Into<String>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{DecimalValue, FieldArray};

    /// Found by the fuzz target: a timestamp past what `SystemTime` holds panicked.
    #[test]
    fn a_timestamp_past_what_system_time_holds_is_unknown_not_a_panic() {
        let properties = BasicProperties::default().with_timestamp(1 << 63);
        let before = SystemTime::now();
        let decoded = decode(&properties, b"body".to_vec(), false, || "x".into());
        assert!(decoded.enqueued_at >= before);
        assert_eq!(&decoded.message.payload[..], b"body");
    }

    #[test]
    fn every_field_round_trips() {
        let message = Message::new(vec![0u8, 159, 146, 150])
            .with_id("id-1")
            .with_attribute("tenant", "acme")
            .with_content_type("application/octet-stream")
            .with_correlation_id("c")
            .with_subject("s")
            .with_time_to_live(Duration::from_secs(60));
        let out = encode(&message, 1 << 20, true).unwrap();
        assert_eq!(out.properties.delivery_mode(), &Some(2));
        assert_eq!(
            out.properties.expiration().as_ref().map(|e| e.as_str()),
            Some("60000")
        );
        let got = decode(&out.properties, out.body.to_vec(), false, || "x".into());
        assert_eq!(got.message.id, "id-1");
        assert_eq!(got.message.payload, message.payload);
        assert_eq!(got.message.attributes, message.attributes);
        assert_eq!(got.message.content_type, message.content_type);
        assert_eq!(got.message.correlation_id.as_deref(), Some("c"));
        assert_eq!(got.message.subject.as_deref(), Some("s"));
        assert_eq!(got.earlier_deliveries, 0);
        assert!(got.expires_at.is_some());
        let delayed = encode(&message, 1 << 20, false).unwrap();
        assert_eq!(delayed.properties.expiration(), &None);
    }

    #[test]
    fn reserved_and_oversized_names_and_properties_are_refused() {
        for key in ["x-death", "cloudbus-deliveries", ""] {
            let error =
                encode(&Message::new("b").with_attribute(key, "v"), 1 << 20, true).unwrap_err();
            assert!(
                matches!(error, Error::InvalidAttribute { .. }),
                "{key}: {error}"
            );
        }
        let long = "k".repeat(256);
        assert!(encode(&Message::new("b").with_attribute(&long, "v"), 1 << 20, true).is_err());
        let error = encode(&Message::new("b").with_id("i".repeat(256)), 1 << 20, true).unwrap_err();
        assert!(
            matches!(error, Error::InvalidInput { field: "id", .. }),
            "{error}"
        );
        let error = encode(&Message::new(vec![0; 100]), 100, true).unwrap_err();
        assert!(
            matches!(error, Error::TooLarge { limit: 100, .. }),
            "{error}"
        );
    }

    #[test]
    fn foreign_headers_arrive_as_documented_text() {
        let mut table = FieldTable::default();
        table.insert("n".into(), AMQPValue::LongInt(1));
        let mut headers = FieldTable::default();
        let cases = [
            ("int", AMQPValue::LongLongInt(-42), "-42"),
            ("bool", AMQPValue::Boolean(true), "true"),
            ("short", AMQPValue::ShortString("s".into()), "s"),
            ("float", AMQPValue::Double(1.5), "1.5"),
            (
                "decimal",
                AMQPValue::DecimalValue(DecimalValue {
                    scale: 2,
                    value: 1250,
                }),
                "12.50",
            ),
            (
                "small-decimal",
                AMQPValue::DecimalValue(DecimalValue { scale: 3, value: 5 }),
                "0.005",
            ),
            (
                "negative-decimal",
                AMQPValue::DecimalValue(DecimalValue {
                    scale: 1,
                    value: (-15i32) as u32,
                }),
                "-1.5",
            ),
            ("time", AMQPValue::Timestamp(0), "1970-01-01T00:00:00Z"),
            // Found by the fuzz target: RFC 3339 ends with the year 9999, and this panicked.
            ("far", AMQPValue::Timestamp(253_402_300_800), "253402300800"),
            ("table", AMQPValue::FieldTable(table), r#"{"n":1}"#),
            (
                "array",
                AMQPValue::FieldArray(FieldArray::from(vec![
                    AMQPValue::Boolean(false),
                    long_string("a"),
                ])),
                r#"[false,"a"]"#,
            ),
            ("bytes", AMQPValue::LongString(vec![0xff, 0].into()), "/wA="),
            ("void", AMQPValue::Void, ""),
        ];
        for (key, value, _) in &cases {
            headers.insert((*key).into(), value.clone());
        }
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        headers.insert(DELIVERIES.into(), long_string("3"));
        let properties = BasicProperties::default().with_headers(headers);
        let got = decode(&properties, b"body".to_vec(), true, || "q/1".into());
        assert_eq!(got.message.id, "q/1");
        for (key, _, text) in &cases {
            assert_eq!(
                got.message.attributes.get(*key).map(String::as_str),
                Some(*text),
                "{key}"
            );
        }
        assert_eq!(
            got.message.attributes.len(),
            cases.len(),
            "no x- or cloudbus- headers"
        );
        assert_eq!(got.earlier_deliveries, 5);
    }

    #[test]
    fn a_broker_dead_letter_says_why_and_delay_hops_do_not_count() {
        let death = |queue: &str, reason: &str| {
            let mut death = FieldTable::default();
            death.insert("queue".into(), long_string(queue));
            death.insert("reason".into(), long_string(reason));
            AMQPValue::FieldTable(death)
        };
        let decoded = |deaths: Vec<AMQPValue>| {
            let mut headers = FieldTable::default();
            headers.insert("x-death".into(), AMQPValue::FieldArray(deaths.into()));
            let properties = BasicProperties::default().with_headers(headers);
            decode(&properties, Vec::new(), false, || "q/1".into())
                .message
                .attributes
        };
        let reason = cloudbus_core::subscriber::DEAD_LETTER_REASON;
        let got = decoded(vec![
            death("orders", "delivery_limit"),
            death("cloudbus.delay.03", "expired"),
        ]);
        assert_eq!(
            got.get(reason).map(String::as_str),
            Some(cloudbus_core::subscriber::MAX_DELIVERY_COUNT_EXCEEDED)
        );
        assert!(decoded(vec![death("cloudbus.delay.00", "expired")]).is_empty());
    }

    #[test]
    fn a_copy_keeps_the_message_and_drops_the_brokers_headers_and_expiration() {
        let mut headers = FieldTable::default();
        headers.insert("tenant".into(), long_string("acme"));
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        let original = BasicProperties::default()
            .with_message_id("m".into())
            .with_correlation_id("c".into())
            .with_timestamp(7)
            .with_expiration("60000".into())
            .with_headers(headers);
        let copy = copy(&original, &[(DELIVERIES, "4".to_string())]);
        assert_eq!(copy.expiration(), &None);
        assert_eq!(copy.delivery_mode(), &Some(2));
        assert_eq!(copy.message_id(), original.message_id());
        assert_eq!(copy.timestamp(), &Some(7));
        let headers = copy.headers().clone().unwrap_or_default();
        assert!(headers.contains_key("tenant") && headers.contains_key(EXPIRES_AT));
        assert!(!headers.contains_key("x-delivery-count"));
        let got = decode(&copy, Vec::new(), false, || "x".into());
        assert_eq!(got.earlier_deliveries, 4);
        assert_eq!(got.message.correlation_id.as_deref(), Some("c"));
    }
}
