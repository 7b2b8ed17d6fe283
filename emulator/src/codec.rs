//! Frames and raw AMQP 1.0 encoding helpers.
//!
//! Performatives, SASL frames and message sections are encoded and decoded with
//! `serde_amqp` / `fe2o3-amqp-types`; this module adds what those crates do not
//! offer a server: the frame layout (2.3), protocol headers (2.2), and a
//! value skipper that finds where an encoded value ends, so a transfer's
//! performative can be separated from its payload and a message split into its
//! sections without decoding the body.

use bytes::{BufMut, Bytes, BytesMut};
use fe2o3_amqp_types::performatives::Performative;
use serde::Serialize;

/// The AMQP protocol header (protocol id 0, version 1.0.0).
pub const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
/// The SASL protocol header (protocol id 3, version 1.0.0).
pub const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
/// Frame type of AMQP frames.
pub const FRAME_TYPE_AMQP: u8 = 0;
/// Frame type of SASL frames.
pub const FRAME_TYPE_SASL: u8 = 1;
/// The smallest max-frame-size a peer may announce (2.7.1).
pub const MIN_MAX_FRAME_SIZE: u32 = 512;

/// Descriptor codes of the message sections (3.2).
pub mod section {
    /// header
    pub const HEADER: u64 = 0x70;
    /// delivery-annotations
    pub const DELIVERY_ANNOTATIONS: u64 = 0x71;
    /// message-annotations
    pub const MESSAGE_ANNOTATIONS: u64 = 0x72;
    /// properties
    pub const PROPERTIES: u64 = 0x73;
    /// application-properties
    pub const APPLICATION_PROPERTIES: u64 = 0x74;
    /// data
    pub const DATA: u64 = 0x75;
    /// amqp-sequence
    pub const AMQP_SEQUENCE: u64 = 0x76;
    /// amqp-value
    pub const AMQP_VALUE: u64 = 0x77;
    /// footer
    pub const FOOTER: u64 = 0x78;
}

/// Descriptor codes of SASL frames (5.3.3).
pub mod sasl_code {
    /// sasl-mechanisms
    pub const MECHANISMS: u64 = 0x40;
    /// sasl-init
    pub const INIT: u64 = 0x41;
    /// sasl-challenge
    pub const CHALLENGE: u64 = 0x42;
    /// sasl-response
    pub const RESPONSE: u64 = 0x43;
    /// sasl-outcome
    pub const OUTCOME: u64 = 0x44;
}

/// A malformed encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

impl DecodeError {
    fn truncated() -> Self {
        DecodeError("truncated AMQP value".into())
    }
}

impl From<serde_amqp::Error> for DecodeError {
    fn from(e: serde_amqp::Error) -> Self {
        DecodeError(e.to_string())
    }
}

/// One frame read from the wire: its type, channel and body (after the extended header).
#[derive(Debug, Clone)]
pub struct Frame {
    /// 0 for AMQP, 1 for SASL.
    pub frame_type: u8,
    /// The channel number.
    pub channel: u16,
    /// The frame body; empty for a heartbeat.
    pub body: Bytes,
}

/// Validate a frame header; returns `(doff_bytes, size)` or a framing problem.
pub fn parse_frame_header(header: &[u8; 8], max_frame_size: u32) -> Result<(usize, usize), String> {
    let size = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    if size < 8 {
        return Err(format!(
            "frame size {size} is smaller than the 8-byte frame header"
        ));
    }
    if size > max_frame_size {
        return Err(format!(
            "frame size {size} exceeds the negotiated max-frame-size {max_frame_size}"
        ));
    }
    let doff = usize::from(header[4]) * 4;
    if doff < 8 || doff > size as usize {
        return Err(format!("invalid data offset {}", header[4]));
    }
    Ok((doff, size as usize))
}

/// Append one frame with an already encoded body to `out`.
pub fn write_frame(out: &mut BytesMut, frame_type: u8, channel: u16, body_parts: &[&[u8]]) {
    let len: usize = 8 + body_parts.iter().map(|p| p.len()).sum::<usize>();
    out.reserve(len);
    out.put_u32(len as u32);
    out.put_u8(2);
    out.put_u8(frame_type);
    out.put_u16(channel);
    for p in body_parts {
        out.put_slice(p);
    }
}

/// Append an empty (heartbeat) frame.
pub fn write_heartbeat(out: &mut BytesMut) {
    write_frame(out, FRAME_TYPE_AMQP, 0, &[]);
}

/// Serialize a value with `serde_amqp`.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing the protocol's own types into a Vec cannot fail except on
    // types that serde_amqp does not support, which we never use.
    serde_amqp::to_vec(value).unwrap_or_default()
}

/// Append a performative frame.
pub fn write_performative(
    out: &mut BytesMut,
    channel: u16,
    performative: &Performative,
    payload: &[u8],
) {
    let body = encode(performative);
    write_frame(out, FRAME_TYPE_AMQP, channel, &[&body, payload]);
}

/// Decode the performative at the start of an AMQP frame body; returns it and the payload.
pub fn decode_performative(body: &Bytes) -> Result<(Performative, Bytes), DecodeError> {
    let end = skip_value(body, 0)?;
    let code = descriptor_code(body, 0)?;
    if !(0x10..=0x18).contains(&code) {
        return Err(DecodeError(format!(
            "unknown performative descriptor 0x{code:x}"
        )));
    }
    let performative: Performative = match serde_amqp::from_slice(&body[..end]) {
        Ok(p) => p,
        Err(e) => {
            // Lenient second try: error infos with string keys (rhea, see below).
            let mut copy = body[..end].to_vec();
            if symbolize_error_info_keys(&mut copy, 0, 0)? == 0 {
                return Err(e.into());
            }
            serde_amqp::from_slice(&copy).map_err(|_| DecodeError::from(e))?
        }
    };
    Ok((performative, body.slice(end..)))
}

/// Descriptor code of `error` (2.8.15).
const ERROR_CODE: u64 = 0x1d;

/// rhea, the AMQP stack of the JavaScript SDK `@azure/service-bus`, encodes the `info` of an
/// `error` (2.8.15) as a map with *string* keys where the spec says `fields` (symbol keys):
/// the SDK's dead-letter is a rejected disposition whose error info is
/// `{"DeadLetterReason": .., "DeadLetterErrorDescription": ..}` as str8 keys, which
/// serde_amqp refuses ("Invalid format code") and Service Bus accepts. Rewrites such keys to
/// symbols in place, in every `error` inside the value at `pos` (str8 0xa1 -> sym8 0xa3,
/// str32 0xb1 -> sym32 0xb3: the same layout); returns how many keys it rewrote.
fn symbolize_error_info_keys(buf: &mut [u8], pos: usize, depth: u32) -> Result<usize, DecodeError> {
    if depth > 64 {
        return Err(DecodeError("AMQP value nested too deeply".into()));
    }
    let code = *buf.get(pos).ok_or_else(DecodeError::truncated)?;
    match code {
        0x00 => {
            let value = skip_value(buf, pos + 1)?;
            if descriptor_code(buf, pos)? != ERROR_CODE {
                return symbolize_error_info_keys(buf, value, depth + 1);
            }
            // error: [condition, description, info]
            let Some(&info) = compound_items(buf, value)?.get(2) else {
                return Ok(0);
            };
            let mut rewritten = 0;
            if matches!(buf[info], 0xc1 | 0xd1) {
                for key in compound_items(buf, info)?.into_iter().step_by(2) {
                    if matches!(buf[key], 0xa1 | 0xb1) {
                        buf[key] += 2;
                        rewritten += 1;
                    }
                }
            }
            Ok(rewritten)
        }
        0xc0 | 0xd0 | 0xc1 | 0xd1 => {
            let mut rewritten = 0;
            for item in compound_items(buf, pos)? {
                rewritten += symbolize_error_info_keys(buf, item, depth + 1)?;
            }
            Ok(rewritten)
        }
        _ => Ok(0),
    }
}

/// The offsets of the items of the list or map at `pos` (keys and values alternate in a
/// map); none for any other value.
fn compound_items(buf: &[u8], pos: usize) -> Result<Vec<usize>, DecodeError> {
    let code = *buf.get(pos).ok_or_else(DecodeError::truncated)?;
    let (count, first) = match code {
        0xc0 | 0xc1 => (read_len(buf, pos + 2, 1)?, pos + 3),
        0xd0 | 0xd1 => (read_len(buf, pos + 5, 4)?, pos + 9),
        _ => return Ok(Vec::new()),
    };
    let end = skip_value(buf, pos)?;
    let mut items = Vec::with_capacity(count.min(64));
    let mut at = first;
    for _ in 0..count {
        if at >= end {
            return Err(DecodeError::truncated());
        }
        items.push(at);
        at = skip_value(buf, at)?;
    }
    Ok(items)
}

/// The numeric descriptor code of the described value at `pos`, mapping the
/// symbolic descriptors of the standard types to their codes.
pub fn descriptor_code(buf: &[u8], pos: usize) -> Result<u64, DecodeError> {
    if buf.get(pos) != Some(&0x00) {
        return Err(DecodeError("expected a described type".into()));
    }
    let d = pos + 1;
    match buf.get(d) {
        Some(0x53) => buf
            .get(d + 1)
            .map(|b| u64::from(*b))
            .ok_or_else(DecodeError::truncated),
        Some(0x44) => Ok(0),
        Some(0x80) => {
            let bytes = buf.get(d + 1..d + 9).ok_or_else(DecodeError::truncated)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(bytes);
            Ok(u64::from_be_bytes(a))
        }
        Some(0xa3) | Some(0xb3) => {
            let end = skip_value(buf, d)?;
            let start = if buf[d] == 0xa3 { d + 2 } else { d + 5 };
            let name = buf.get(start..end).ok_or_else(DecodeError::truncated)?;
            Ok(symbolic_code(name))
        }
        _ => Err(DecodeError("unsupported descriptor encoding".into())),
    }
}

fn symbolic_code(name: &[u8]) -> u64 {
    match name {
        b"amqp:open:list" => 0x10,
        b"amqp:begin:list" => 0x11,
        b"amqp:attach:list" => 0x12,
        b"amqp:flow:list" => 0x13,
        b"amqp:transfer:list" => 0x14,
        b"amqp:disposition:list" => 0x15,
        b"amqp:detach:list" => 0x16,
        b"amqp:end:list" => 0x17,
        b"amqp:close:list" => 0x18,
        b"amqp:error:list" => ERROR_CODE,
        b"amqp:header:list" => section::HEADER,
        b"amqp:delivery-annotations:map" => section::DELIVERY_ANNOTATIONS,
        b"amqp:message-annotations:map" => section::MESSAGE_ANNOTATIONS,
        b"amqp:properties:list" => section::PROPERTIES,
        b"amqp:application-properties:map" => section::APPLICATION_PROPERTIES,
        b"amqp:data:binary" => section::DATA,
        b"amqp:amqp-sequence:list" => section::AMQP_SEQUENCE,
        b"amqp:amqp-value:*" => section::AMQP_VALUE,
        b"amqp:footer:map" => section::FOOTER,
        _ => u64::MAX,
    }
}

fn read_len(buf: &[u8], pos: usize, width: usize) -> Result<usize, DecodeError> {
    let bytes = buf
        .get(pos..pos + width)
        .ok_or_else(DecodeError::truncated)?;
    Ok(bytes
        .iter()
        .fold(0usize, |acc, b| (acc << 8) | usize::from(*b)))
}

/// Return the offset just past the encoded value starting at `pos`.
pub fn skip_value(buf: &[u8], pos: usize) -> Result<usize, DecodeError> {
    skip_value_depth(buf, pos, 0)
}

fn skip_value_depth(buf: &[u8], pos: usize, depth: u32) -> Result<usize, DecodeError> {
    if depth > 64 {
        return Err(DecodeError("AMQP value nested too deeply".into()));
    }
    let code = *buf.get(pos).ok_or_else(DecodeError::truncated)?;
    let p = pos + 1;
    let end = match code {
        0x00 => {
            let after_descriptor = skip_value_depth(buf, p, depth + 1)?;
            return skip_value_depth(buf, after_descriptor, depth + 1);
        }
        0x40..=0x45 => p,
        0x50..=0x56 => p + 1,
        0x60 | 0x61 => p + 2,
        0x70..=0x74 => p + 4,
        0x80..=0x84 => p + 8,
        0x94 | 0x98 => p + 16,
        0xa0 | 0xa1 | 0xa3 | 0xc0 | 0xc1 | 0xe0 => p + 1 + read_len(buf, p, 1)?,
        0xb0 | 0xb1 | 0xb3 | 0xd0 | 0xd1 | 0xf0 => p + 4 + read_len(buf, p, 4)?,
        other => {
            return Err(DecodeError(format!(
                "invalid AMQP format code 0x{other:02x}"
            )));
        }
    };
    if end > buf.len() {
        return Err(DecodeError::truncated());
    }
    Ok(end)
}

/// Split an encoded message into its sections: `(descriptor code, start, end)`.
pub fn split_sections(buf: &[u8]) -> Result<Vec<(u64, usize, usize)>, DecodeError> {
    let mut out = Vec::with_capacity(6);
    let mut pos = 0;
    while pos < buf.len() {
        let code = descriptor_code(buf, pos)?;
        let end = skip_value(buf, pos)?;
        out.push((code, pos, end));
        pos = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::performatives::{Begin, Close};

    #[test]
    fn performative_round_trip_and_payload_split() {
        let p = Performative::Begin(Begin {
            remote_channel: Some(3),
            next_outgoing_id: 1,
            incoming_window: 10,
            outgoing_window: 10,
            handle_max: Default::default(),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        });
        let mut body = encode(&p);
        body.extend_from_slice(b"payload");
        let (decoded, payload) = decode_performative(&Bytes::from(body)).expect("decodes");
        assert_eq!(decoded, p);
        assert_eq!(&payload[..], b"payload");
    }

    #[test]
    fn unknown_performative_is_an_error() {
        let body = Bytes::from_static(&[0x00, 0x53, 0x30, 0x45]);
        assert!(decode_performative(&body).is_err());
        let close = encode(&Performative::Close(Close { error: None }));
        assert!(decode_performative(&Bytes::from(close)).is_ok());
    }

    /// The disposition the JavaScript SDK (rhea) sends to dead-letter a message: a rejected
    /// state whose error info map has string keys (as captured from @azure/service-bus 7.9.5).
    #[test]
    fn error_info_with_string_keys_decodes() {
        let hex = "005315d0000000790000000541434342005325d0000000690000000100531dd00000005d\
                   00000003a319636f6d2e6d6963726f736f66743a646561642d6c657474657240d10000003800\
                   000004a110446561644c6574746572526561736f6ea10152a11a446561644c65747465724572\
                   726f724465736372697074696f6ea10144";
        let hex: String = hex.split_whitespace().collect();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        assert!(serde_amqp::from_slice::<Performative>(&bytes).is_err());
        let (p, payload) = decode_performative(&Bytes::from(bytes)).expect("decodes");
        assert!(payload.is_empty());
        let Performative::Disposition(d) = p else {
            panic!("not a disposition: {p:?}");
        };
        let Some(fe2o3_amqp_types::messaging::DeliveryState::Rejected(r)) = d.state else {
            panic!("not rejected: {:?}", d.state);
        };
        let error = r.error.expect("error");
        let info = error.info.expect("info");
        let get = |k: &str| {
            info.get(&fe2o3_amqp_types::primitives::Symbol::from(k))
                .cloned()
        };
        assert_eq!(
            get("DeadLetterReason"),
            Some(fe2o3_amqp_types::primitives::Value::String("R".into()))
        );
        assert_eq!(
            get("DeadLetterErrorDescription"),
            Some(fe2o3_amqp_types::primitives::Value::String("D".into()))
        );
    }

    #[test]
    fn skipper_rejects_truncation() {
        assert!(skip_value(&[0xb0, 0, 0, 0, 9, 1], 0).is_err());
        assert!(skip_value(&[0xff], 0).is_err());
        assert_eq!(skip_value(&[0xa1, 2, b'h', b'i'], 0), Ok(4));
    }

    #[test]
    fn frame_header_limits() {
        assert!(parse_frame_header(&[0, 0, 0, 4, 2, 0, 0, 0], 1024).is_err());
        assert!(parse_frame_header(&[0, 0, 8, 0, 2, 0, 0, 0], 1024).is_err());
        assert_eq!(
            parse_frame_header(&[0, 0, 0, 8, 2, 0, 0, 0], 1024),
            Ok((8, 8))
        );
    }

    /// Random bytes behind valid descriptor prefixes never panic the decoders.
    #[test]
    fn random_input_does_not_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..20_000u32 {
            let len = (next() % 64) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 2 == 0 {
                let code = 0x10 + (next() % 9) as u8;
                let list = [0xc0u8, 0xd0, 0x45][(next() % 3) as usize];
                buf.splice(0..0, [0x00, 0x53, code, list]);
            }
            let body = Bytes::from(buf.clone());
            let _ = decode_performative(&body);
            let _ = crate::message::AmqpMessage::decode(&buf);
            let _ = crate::message::AmqpMessage::decode_batch(&buf);
        }
    }
}
