//! How a [`Message`] travels as an SQS message or SNS notification, and back.
//!
//! - **Body**: a payload that is non-empty UTF-8 made only of the characters SQS accepts
//!   goes as is. Anything else (binary, control characters, empty) goes base64-encoded,
//!   flagged by `"enc":"base64"` in the `cloudbus` attribute; an empty payload (which SQS
//!   and SNS refuse) goes as the body `(empty)` flagged by `"enc":"empty"`.
//! - **Attributes**: each user attribute whose name SQS/SNS accept (`A-Za-z0-9_-.`, at most
//!   256 characters, no leading, trailing or doubled `.`, no `AWS.`/`Amazon.` prefix) and
//!   whose value is non-empty and made of accepted characters becomes a `String` message
//!   attribute of the same name. The others travel inside the `cloudbus` attribute, so
//!   every key and value round-trips exactly.
//! - **The `cloudbus` attribute** (one slot of the ten SQS and SNS allow) holds a compact
//!   JSON object with what has no native place: `id` (the cloudbus message id), and when
//!   set `ct` (content type), `cid` (correlation id), `sub` (subject), `enc`, `exp` (expiry,
//!   unix milliseconds, from the time to live), `attrs` (attributes carried here), and
//!   `nokey`/`nodedup` when a FIFO group or deduplication id was defaulted to the message id.
//! - Messages from other producers (no `cloudbus` attribute) get the transport's message
//!   id as their id and all their attributes; `Number` attributes arrive as their string
//!   form and `Binary` ones base64-encoded.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use cloudbus_core::{Attributes, Error, Message, Result};

/// The name of the attribute that carries cloudbus's own fields.
pub(crate) const CLOUDBUS_ATTRIBUTE: &str = "cloudbus";
/// Message attributes SQS and SNS allow per message.
pub(crate) const MAX_ATTRIBUTES: usize = 10;
/// User attributes per message: the service's limit less the `cloudbus` attribute.
pub(crate) const MAX_USER_ATTRIBUTES: usize = MAX_ATTRIBUTES - 1;
/// The longest delay SQS supports (`DelaySeconds`).
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(15 * 60);
/// The body that stands for an empty payload (flagged `"enc":"empty"`).
const EMPTY_BODY: &str = "(empty)";
/// SQS FIFO limit on `MessageGroupId` and `MessageDeduplicationId`.
const MAX_ID_LEN: usize = 128;

/// The cloudbus fields that ride in the `cloudbus` attribute.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Header {
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ct: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    attrs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "is_false")]
    nokey: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    nodedup: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Where a message is going: decides which fields are allowed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target {
    /// `sqs` or `sns`.
    pub(crate) transport: &'static str,
    /// A FIFO queue or topic.
    pub(crate) fifo: bool,
    /// Whether `DelaySeconds` is available (SQS standard queues).
    pub(crate) delay: bool,
    /// The size limit in bytes (body plus attribute names, types and values).
    pub(crate) max_size: usize,
}

/// A message ready for the wire.
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    /// The message body.
    pub(crate) body: String,
    /// String attributes, the `cloudbus` one included.
    pub(crate) attributes: Vec<(String, String)>,
    /// FIFO `MessageGroupId`.
    pub(crate) group_id: Option<String>,
    /// FIFO `MessageDeduplicationId`.
    pub(crate) deduplication_id: Option<String>,
    /// `DelaySeconds`.
    pub(crate) delay_seconds: Option<i32>,
    /// The size as the service counts it.
    pub(crate) size: usize,
}

/// Encodes `message` for `target`, checking every limit first.
///
/// `check_count` enforces [`MAX_USER_ATTRIBUTES`]; copies made by cloudbus itself (for a
/// dead-letter queue) pass `false`, and attributes that no longer fit travel in the
/// `cloudbus` attribute.
pub(crate) fn encode(message: &Message, target: Target, check_count: bool) -> Result<Encoded> {
    let transport = target.transport;
    if check_count && message.attributes.len() > MAX_USER_ATTRIBUTES {
        return Err(Error::InvalidInput {
            transport,
            field: "attributes",
            rule: format!(
                "{transport} allows {MAX_ATTRIBUTES} message attributes and cloudbus uses 1, \
                 so a message may carry at most {MAX_USER_ATTRIBUTES}; this one has {}",
                message.attributes.len()
            ),
        });
    }
    let mut header = Header {
        id: message.id.clone(),
        ct: message.content_type.clone(),
        cid: message.correlation_id.clone(),
        sub: message.subject.clone(),
        ..Header::default()
    };
    let body = match std::str::from_utf8(&message.payload) {
        Ok(text) if !text.is_empty() && text.chars().all(allowed_char) => text.to_string(),
        // SQS and SNS refuse empty bodies.
        _ if message.payload.is_empty() => {
            header.enc = Some("empty".into());
            EMPTY_BODY.to_string()
        }
        _ => {
            header.enc = Some("base64".into());
            BASE64.encode(&message.payload)
        }
    };
    let mut attributes = Vec::with_capacity(message.attributes.len() + 1);
    for (key, value) in &message.attributes {
        let native = attributes.len() < MAX_USER_ATTRIBUTES
            && valid_name(key)
            && !value.is_empty()
            && value.chars().all(allowed_char);
        if native {
            attributes.push((key.clone(), value.clone()));
        } else {
            header.attrs.insert(key.clone(), value.clone());
        }
    }

    let (group_id, deduplication_id) = if target.fifo {
        header.nokey = message.ordering_key.is_none();
        header.nodedup = message.deduplication_id.is_none();
        let group = message.ordering_key.as_ref().unwrap_or(&message.id);
        let dedup = message.deduplication_id.as_ref().unwrap_or(&message.id);
        check_fifo_id(transport, "ordering_key", group)?;
        check_fifo_id(transport, "deduplication_id", dedup)?;
        (Some(group.clone()), Some(dedup.clone()))
    } else {
        if message.ordering_key.is_some() {
            return Err(Error::Unsupported {
                transport,
                feature: format!(
                    "ordering keys on a standard {transport} {}: use a FIFO one (name ending in .fifo)",
                    entity(transport)
                ),
            });
        }
        if message.deduplication_id.is_some() {
            return Err(Error::Unsupported {
                transport,
                feature: format!(
                    "deduplication ids on a standard {transport} {}: use a FIFO one (name ending in .fifo)",
                    entity(transport)
                ),
            });
        }
        (None, None)
    };

    let delay = message.delay();
    let delay_seconds = if delay.is_zero() {
        None
    } else if !target.delay {
        return Err(Error::Unsupported {
            transport,
            feature: if target.fifo {
                "delayed delivery on FIFO queues (SQS supports only a queue-wide delay there)"
                    .into()
            } else {
                format!("delayed delivery on {transport}; publish to an SQS queue for delays")
            },
        });
    } else if delay > MAX_DELAY {
        return Err(Error::Unsupported {
            transport,
            feature: format!(
                "a delivery delay of {} s: SQS delays messages by at most {} s (15 minutes)",
                delay.as_secs(),
                MAX_DELAY.as_secs()
            ),
        });
    } else {
        // Round up: never deliver before the requested time.
        Some(delay.as_secs_f64().ceil() as i32)
    };

    if let Some(ttl) = message.time_to_live {
        let expiry = message.deliver_at.unwrap_or_else(SystemTime::now) + ttl;
        header.exp = Some(unix_millis(expiry));
    }

    let header = sqs_safe(&serde_json::to_string(&header).map_err(|e| {
        Error::transport(
            transport,
            format!("cannot encode the cloudbus attribute: {e}"),
            false,
            None,
        )
    })?);
    attributes.push((CLOUDBUS_ATTRIBUTE.to_string(), header));
    let size = body.len()
        + attributes
            .iter()
            .map(|(k, v)| k.len() + "String".len() + v.len())
            .sum::<usize>();
    if size > target.max_size {
        return Err(Error::TooLarge {
            transport,
            size,
            limit: target.max_size,
        });
    }
    Ok(Encoded {
        body,
        attributes,
        group_id,
        deduplication_id,
        delay_seconds,
        size,
    })
}

fn entity(transport: &str) -> &'static str {
    if transport == "sns" { "topic" } else { "queue" }
}

fn check_fifo_id(transport: &'static str, field: &'static str, id: &str) -> Result<()> {
    let ok = !id.is_empty() && id.len() <= MAX_ID_LEN && id.chars().all(|c| c.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput {
            transport,
            field,
            rule: format!(
                "on FIFO queues it becomes a group or deduplication id: 1 to {MAX_ID_LEN} \
                 printable ASCII characters (this message id or key does not fit)"
            ),
        })
    }
}

/// Splits encoded messages (with their input positions) into batches of at most
/// `max_entries` entries and `max_bytes` bytes, keeping input order.
pub(crate) fn batches(
    encoded: Vec<(usize, Encoded)>,
    max_entries: usize,
    max_bytes: usize,
) -> Vec<Vec<(usize, Encoded)>> {
    let mut batches: Vec<Vec<(usize, Encoded)>> = Vec::new();
    let mut bytes = 0;
    for entry in encoded {
        let fits = batches
            .last()
            .is_some_and(|b| b.len() < max_entries && bytes + entry.1.size <= max_bytes);
        if !fits {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += entry.1.size;
        if let Some(batch) = batches.last_mut() {
            batch.push(entry);
        }
    }
    batches
}

/// What a received message decodes to, besides the transport's own metadata.
#[derive(Debug)]
pub(crate) struct Decoded {
    /// The message.
    pub(crate) message: Message,
    /// Past its time to live: discard instead of delivering.
    pub(crate) expired: bool,
}

/// Decodes a received body and string attributes. `transport_id` becomes the id of
/// messages that carry no cloudbus header; `group_id`/`deduplication_id` are the FIFO
/// system attributes.
pub(crate) fn decode(
    body: &str,
    mut attributes: Attributes,
    transport_id: &str,
    group_id: Option<String>,
    deduplication_id: Option<String>,
) -> Decoded {
    let header = attributes
        .get(CLOUDBUS_ATTRIBUTE)
        .and_then(|h| serde_json::from_str::<Header>(h).ok());
    let Some(header) = header else {
        let mut message =
            Message::with_id_and_payload(transport_id, Bytes::copy_from_slice(body.as_bytes()));
        message.attributes = attributes;
        message.ordering_key = group_id;
        message.deduplication_id = deduplication_id;
        return Decoded {
            message,
            expired: false,
        };
    };
    attributes.remove(CLOUDBUS_ATTRIBUTE);
    attributes.extend(header.attrs);
    let payload = match header.enc.as_deref() {
        Some("empty") => Bytes::new(),
        Some("base64") => match BASE64.decode(body) {
            Ok(bytes) => Bytes::from(bytes),
            Err(_) => Bytes::copy_from_slice(body.as_bytes()),
        },
        _ => Bytes::copy_from_slice(body.as_bytes()),
    };
    let mut message = Message::with_id_and_payload(header.id, payload);
    message.attributes = attributes;
    message.content_type = header.ct;
    message.correlation_id = header.cid;
    message.subject = header.sub;
    message.ordering_key = group_id.filter(|_| !header.nokey);
    message.deduplication_id = deduplication_id.filter(|_| !header.nodedup);
    let expired = header
        .exp
        .is_some_and(|exp| exp <= unix_millis(SystemTime::now()));
    Decoded { message, expired }
}

/// An SNS notification envelope, as delivered to a queue subscribed without raw delivery.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Envelope {
    #[serde(rename = "Type")]
    kind: String,
    message_id: String,
    topic_arn: String,
    #[allow(dead_code)]
    timestamp: String,
    message: String,
    #[serde(default)]
    message_attributes: BTreeMap<String, EnvelopeAttribute>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EnvelopeAttribute {
    value: String,
}

/// Unwraps an SNS notification envelope: only a JSON object with `Type: "Notification"`,
/// `MessageId`, `TopicArn` (an ARN), `Timestamp` and `Message` is one; anything else (a
/// user's own JSON included) is returned as `None`.
pub(crate) fn unwrap_sns_envelope(body: &str) -> Option<(String, Attributes, String)> {
    if !body.trim_start().starts_with('{') {
        return None;
    }
    let envelope: Envelope = serde_json::from_str(body).ok()?;
    if envelope.kind != "Notification" || !envelope.topic_arn.starts_with("arn:") {
        return None;
    }
    let attributes = envelope
        .message_attributes
        .into_iter()
        .map(|(k, v)| (k, v.value))
        .collect();
    Some((envelope.message, attributes, envelope.message_id))
}

/// Characters SQS accepts in bodies and attribute values:
/// `#x9 | #xA | #xD | #x20-#xD7FF | #xE000-#xFFFD | #x10000-#x10FFFF`.
pub(crate) fn allowed_char(c: char) -> bool {
    matches!(c, '\u{9}' | '\u{A}' | '\u{D}' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Escapes the characters SQS refuses as JSON `\uXXXX` sequences (the text must be JSON).
fn sqs_safe(json: &str) -> String {
    if json.chars().all(allowed_char) {
        return json.to_string();
    }
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if allowed_char(c) {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// Whether SQS and SNS accept `name` as a message attribute name.
pub(crate) fn valid_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.is_empty()
        && name.len() <= 256
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.")
        && name != CLOUDBUS_ATTRIBUTE
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The enqueue time from SQS's `SentTimestamp` (unix milliseconds).
pub(crate) fn sent_timestamp(millis: Option<&str>) -> SystemTime {
    millis
        .and_then(|m| m.parse::<u64>().ok())
        .map_or_else(SystemTime::now, |m| UNIX_EPOCH + Duration::from_millis(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SQS: Target = Target {
        transport: "sqs",
        fifo: false,
        delay: true,
        max_size: 1024 * 1024,
    };

    fn round_trip(message: &Message, target: Target) -> Message {
        let encoded = encode(message, target, true).unwrap();
        let attributes = encoded.attributes.iter().cloned().collect();
        decode(
            &encoded.body,
            attributes,
            "sqs-id",
            encoded.group_id,
            encoded.deduplication_id,
        )
        .message
    }

    #[test]
    fn text_goes_as_is_and_binary_as_base64() {
        let text = encode(&Message::new("héllo"), SQS, true).unwrap();
        assert_eq!(text.body, "héllo");
        let binary = Message::new(vec![0u8, 159, 146, 150]);
        let encoded = encode(&binary, SQS, true).unwrap();
        assert_eq!(encoded.body, BASE64.encode([0u8, 159, 146, 150]));
        assert_eq!(round_trip(&binary, SQS).payload, binary.payload);
        let empty = Message::new("");
        assert_eq!(round_trip(&empty, SQS).payload, empty.payload);
        let control = Message::new("a\u{1}b");
        assert_eq!(round_trip(&control, SQS).payload, control.payload);
    }

    #[test]
    fn awkward_attributes_ride_in_the_header() {
        let message = Message::new("x")
            .with_attribute("plain", "v")
            .with_attribute("with space", "v")
            .with_attribute("AWS.thing", "v")
            .with_attribute("empty", "")
            .with_attribute("nul", "a\u{0}b");
        let encoded = encode(&message, SQS, true).unwrap();
        let names: Vec<&str> = encoded.attributes.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["plain", CLOUDBUS_ATTRIBUTE]);
        assert_eq!(round_trip(&message, SQS).attributes, message.attributes);
    }

    #[test]
    fn too_many_attributes_names_the_limit() {
        let mut message = Message::new("x");
        for i in 0..10 {
            message = message.with_attribute(format!("a{i}"), "v");
        }
        let error = encode(&message, SQS, true).unwrap_err().to_string();
        assert!(
            error.contains("at most 9") && error.contains("has 10"),
            "{error}"
        );
        // cloudbus's own copies (dead-letter) may spill into the header.
        let encoded = encode(&message, SQS, false).unwrap();
        assert_eq!(encoded.attributes.len(), MAX_ATTRIBUTES);
    }

    #[test]
    fn headers_round_trip() {
        let message = Message::new("x")
            .with_content_type("text/plain")
            .with_correlation_id("c")
            .with_subject("s");
        let got = round_trip(&message, SQS);
        assert_eq!(got, message);
    }

    #[test]
    fn fifo_defaults_group_and_dedup_without_inventing_a_key() {
        let fifo = Target {
            fifo: true,
            delay: false,
            ..SQS
        };
        let plain = Message::new("x");
        let encoded = encode(&plain, fifo, true).unwrap();
        assert_eq!(encoded.group_id.as_deref(), Some(plain.id.as_str()));
        assert_eq!(round_trip(&plain, fifo).ordering_key, None);
        let keyed = Message::new("x").with_ordering_key("k");
        assert_eq!(round_trip(&keyed, fifo).ordering_key.as_deref(), Some("k"));
        assert!(matches!(
            encode(&Message::new("x").with_ordering_key("k"), SQS, true),
            Err(Error::Unsupported { .. })
        ));
    }

    #[test]
    fn delays_round_up_and_are_limited() {
        let m = Message::new("x").with_deliver_after(Duration::from_millis(1500));
        assert_eq!(encode(&m, SQS, true).unwrap().delay_seconds, Some(2));
        let m = Message::new("x").with_deliver_after(Duration::from_secs(3600));
        let e = encode(&m, SQS, true).unwrap_err().to_string();
        assert!(e.contains("900"), "{e}");
    }

    #[test]
    fn size_counts_attributes() {
        let small = Target {
            max_size: 100,
            ..SQS
        };
        let m = Message::new("x".repeat(40)).with_attribute("k", "v".repeat(40));
        assert!(matches!(
            encode(&m, small, true),
            Err(Error::TooLarge { limit: 100, .. })
        ));
    }

    #[test]
    fn only_real_envelopes_are_unwrapped() {
        let real = r#"{"Type":"Notification","MessageId":"m1","TopicArn":"arn:aws:sns:us-east-1:0:t",
            "Timestamp":"2026-01-01T00:00:00Z","Message":"hi",
            "MessageAttributes":{"k":{"Type":"String","Value":"v"}}}"#;
        let (body, attrs, id) = unwrap_sns_envelope(real).unwrap();
        assert_eq!(
            (body.as_str(), attrs["k"].as_str(), id.as_str()),
            ("hi", "v", "m1")
        );
        let user = r#"{"Type":"Notification","Message":"not an envelope","MessageId":"x"}"#;
        assert!(unwrap_sns_envelope(user).is_none());
        assert!(unwrap_sns_envelope("plain text").is_none());
    }

    #[test]
    fn batches_respect_count_and_bytes() {
        let encoded = |size| Encoded {
            body: String::new(),
            attributes: Vec::new(),
            group_id: None,
            deduplication_id: None,
            delay_seconds: None,
            size,
        };
        let sizes = batches((0..25).map(|i| (i, encoded(1))).collect(), 10, 100)
            .iter()
            .map(Vec::len)
            .collect::<Vec<_>>();
        assert_eq!(sizes, [10, 10, 5]);
        let sizes = batches((0..5).map(|i| (i, encoded(40))).collect(), 10, 100)
            .iter()
            .map(Vec::len)
            .collect::<Vec<_>>();
        assert_eq!(sizes, [2, 2, 1]);
    }

    #[test]
    fn names() {
        assert!(valid_name("a.b-c_d"));
        for bad in [
            "", ".a", "a.", "a..b", "AWS.x", "amazon.y", "sp ace", "ü", "cloudbus",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
