//! Messages from the command line: bodies (text or base64), `--attr key=value`, and the
//! JSON records that `receive --json` prints.

use base64::Engine;
use cloudbus::Message;

use crate::exit::Failure;
use crate::output::Record;

/// How `send` turns a body or a line into a message.
pub struct MessageInput {
    pub attributes: Vec<(String, String)>,
    pub base64: bool,
    pub from_json: bool,
}

impl MessageInput {
    /// Parses `--attr key=value` arguments.
    pub fn new(attributes: &[String], base64: bool, from_json: bool) -> Result<Self, Failure> {
        let attributes = attributes
            .iter()
            .map(|a| {
                a.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| {
                        Failure::usage(format!(
                            "--attr `{a}` is not key=value (e.g. --attr tenant=acme)"
                        ))
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(MessageInput {
            attributes,
            base64,
            from_json,
        })
    }

    /// The message for one body argument or input line (`line` counts from 1, for errors).
    pub fn message(&self, text: &str, line: usize) -> Result<Message, Failure> {
        let mut message = if self.from_json {
            let record: Record = serde_json::from_str(text).map_err(|e| {
                Failure::usage(format!(
                    "line {line} is not a message as `receive --json` prints it: {e}"
                ))
            })?;
            from_record(record, line)?
        } else if self.base64 {
            Message::new(decode(text.trim(), line)?)
        } else {
            Message::new(text.to_string())
        };
        for (key, value) in &self.attributes {
            message.attributes.insert(key.clone(), value.clone());
        }
        Ok(message)
    }
}

fn decode(text: &str, line: usize) -> Result<Vec<u8>, Failure> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| Failure::usage(format!("body {line} is not base64: {e}")))
}

/// A message from a printed record: the same id (so consumers that deduplicate by id see
/// the same message), body, attributes and properties.
pub fn from_record(record: Record, line: usize) -> Result<Message, Failure> {
    let payload = match (record.body, record.body_base64) {
        (Some(text), None) => text.into_bytes(),
        (None, Some(b64)) => decode(&b64, line)?,
        (None, None) => Vec::new(),
        (Some(_), Some(_)) => {
            return Err(Failure::usage(format!(
                "line {line} has both body and body_base64: keep one"
            )));
        }
    };
    let mut message = if record.id.is_empty() {
        Message::new(payload)
    } else {
        Message::with_id_and_payload(record.id, payload)
    };
    message.attributes = record.attributes.into_iter().collect();
    message.content_type = record.content_type;
    message.correlation_id = record.correlation_id;
    message.subject = record.subject;
    message.ordering_key = record.ordering_key;
    Ok(message)
}
