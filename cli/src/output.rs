//! What the commands print: a readable table, or with `--json` one object per line; and
//! progress bars on standard error for long work.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::SystemTime;

use base64::Engine;
use cloudbus::subscriber::{DEAD_LETTER_DESCRIPTION, DEAD_LETTER_REASON};
use cloudbus::{Delivery, Message, Peeked};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

/// A message as the tool prints it, and as `send --from-json` reads it back.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Record {
    pub id: String,
    /// The body, when it is UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The body in base64, when it is not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
    pub attributes: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ordering_key: Option<String>,
    /// How many times it was delivered (with this delivery, for a received message).
    /// Read back by `send --from-json` and not sent: the broker counts anew.
    pub delivery_count: u32,
    /// When the broker took it, RFC 3339 (read back and not sent, like the count).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enqueued_at: Option<String>,
    /// The broker's own id: a sequence number, `partition:offset`, SQS's MessageId (read
    /// back and not sent).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub transport_id: String,
}

impl Record {
    fn of(
        message: &Message,
        delivery_count: u32,
        enqueued_at: SystemTime,
        transport_id: &str,
    ) -> Record {
        let (body, body_base64) = match std::str::from_utf8(&message.payload) {
            Ok(text) => (Some(text.to_string()), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&message.payload)),
            ),
        };
        Record {
            id: message.id.clone(),
            body,
            body_base64,
            attributes: message
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            content_type: message.content_type.clone(),
            correlation_id: message.correlation_id.clone(),
            subject: message.subject.clone(),
            ordering_key: message.ordering_key.clone(),
            delivery_count,
            enqueued_at: Some(humantime::format_rfc3339_millis(enqueued_at).to_string()),
            transport_id: transport_id.to_string(),
        }
    }

    pub fn of_delivery(delivery: &Delivery) -> Record {
        Record::of(
            delivery.message(),
            delivery.delivery_count(),
            delivery.enqueued_at(),
            delivery.transport_id(),
        )
    }

    pub fn of_peeked(peeked: &Peeked) -> Record {
        Record::of(
            &peeked.message,
            peeked.delivery_count,
            peeked.enqueued_at,
            &peeked.transport_id,
        )
    }

    /// The dead-letter reason, or `(none)`.
    pub fn reason(&self) -> &str {
        self.attributes
            .get(DEAD_LETTER_REASON)
            .map_or("(none)", String::as_str)
    }

    fn body_shown(&self) -> String {
        match (&self.body, &self.body_base64) {
            (Some(text), _) => shorten(text, 60),
            (None, Some(b64)) => format!("base64:{}", shorten(b64, 53)),
            (None, None) => String::new(),
        }
    }

    fn attributes_shown(&self) -> String {
        let text: Vec<String> = self
            .attributes
            .iter()
            .filter(|(k, _)| *k != DEAD_LETTER_REASON && *k != DEAD_LETTER_DESCRIPTION)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        shorten(&text.join(","), 40)
    }
}

/// `text` on one line, cut to `max` characters with an ellipsis.
fn shorten(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        flat
    } else {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// Where output goes, and how.
pub struct Output {
    pub json: bool,
    header_printed: std::cell::Cell<bool>,
}

/// Which columns a message table has.
#[derive(Clone, Copy, PartialEq)]
pub enum Columns {
    /// id, deliveries, enqueued, attributes, body
    Messages,
    /// as Messages, with the dead-letter reason and description
    DeadLetters,
}

impl Output {
    pub fn new(json: bool) -> Output {
        Output {
            json,
            header_printed: std::cell::Cell::new(false),
        }
    }

    /// Prints one JSON line.
    pub fn json_line(&self, value: &impl Serialize) {
        let line =
            serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    /// Prints a message: a JSON line, or a table row (the header before the first; the
    /// columns have fixed widths, so rows can stream as messages arrive).
    pub fn message(&self, record: &Record, columns: Columns) {
        if self.json {
            self.json_line(record);
            return;
        }
        let mut cells = vec![
            (record.id.clone(), 36),
            (record.delivery_count.to_string(), 10),
            (record.enqueued_at.clone().unwrap_or_default(), 24),
            (record.attributes_shown(), 30),
        ];
        if columns == Columns::DeadLetters {
            cells.push((shorten(record.reason(), 26), 26));
            cells.push((
                shorten(
                    record
                        .attributes
                        .get(DEAD_LETTER_DESCRIPTION)
                        .map_or("", String::as_str),
                    30,
                ),
                30,
            ));
        }
        cells.push((record.body_shown(), 0));
        if !self.header_printed.replace(true) {
            let mut header = vec![
                ("ID", 36),
                ("DELIVERIES", 10),
                ("ENQUEUED", 24),
                ("ATTRIBUTES", 30),
            ];
            if columns == Columns::DeadLetters {
                header.extend([("REASON", 26), ("DESCRIPTION", 30)]);
            }
            header.push(("BODY", 0));
            row(header.iter().map(|(c, w)| (c.to_string(), *w)).collect());
        }
        row(cells);
    }

    /// A line for people (standard error), never mixed into the data on standard output.
    pub fn note(&self, text: &str) {
        eprintln!("{text}");
    }

    /// A progress bar on standard error with rate and ETA (a spinner when the total is
    /// unknown); hidden when standard error is not a terminal.
    pub fn progress(&self, total: Option<u64>, what: &str) -> ProgressBar {
        if !std::io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        match total {
            Some(total) => {
                let bar = ProgressBar::new(total);
                if let Ok(style) =
                    ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                {
                    bar.set_style(style.progress_chars("=> "));
                }
                bar.set_message(what.to_string());
                bar
            }
            None => {
                let bar = ProgressBar::new_spinner();
                if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {pos} {per_sec}") {
                    bar.set_style(style);
                }
                bar.set_message(what.to_string());
                bar
            }
        }
    }
}

/// Prints one table row: each cell cut and padded to its width (0: the rest of the line).
fn row(cells: Vec<(String, usize)>) {
    let text: Vec<String> = cells
        .into_iter()
        .map(|(cell, width)| {
            if width == 0 {
                cell
            } else {
                format!("{:<width$}", shorten(&cell, width))
            }
        })
        .collect();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", text.join("  ").trim_end());
    let _ = out.flush();
}

/// Prints an aligned table with a header row (for short tables: stats, reason counts).
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, cell) in r.iter().enumerate() {
            if let Some(width) = widths.get_mut(i) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }
    row(header
        .iter()
        .zip(&widths)
        .map(|(h, w)| (h.to_string(), *w))
        .collect());
    for r in rows {
        row(r
            .iter()
            .zip(&widths)
            .map(|(c, w)| (c.clone(), *w))
            .collect());
    }
}
