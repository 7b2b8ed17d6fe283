//! Link endpoints: what a link is attached to, its credit and its pending work.

use std::collections::VecDeque;

use fe2o3_amqp_types::definitions::{ReceiverSettleMode, SenderSettleMode};

/// What a link is attached to, seen from the emulator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    /// The client sends CBS requests (`$cbs`).
    CbsRequests,
    /// The client sends management requests to `<entity>/$management`.
    ManagementRequests(String),
    /// The client sends messages to an entity.
    EntitySender(String),
    /// The client receives replies from `$cbs` or `<entity>/$management`.
    Replies(crate::broker::Address),
    /// The client receives messages from a queue, subscription or dead-letter queue.
    EntityReceiver {
        /// Canonical entity path.
        entity: String,
        /// Peek-lock (`true`) or receive-and-delete.
        peek_lock: bool,
        /// The locked session, for session receivers.
        session: Option<String>,
    },
}

/// A partially received multi-frame delivery.
#[derive(Debug, Default)]
pub struct Partial {
    /// Delivery id of the first frame.
    pub delivery_id: Option<u32>,
    /// Message format of the first frame.
    pub message_format: u32,
    /// Whether the sender settled it.
    pub settled: bool,
    /// Payload so far.
    pub payload: Vec<u8>,
}

/// One attached link.
#[derive(Debug)]
pub struct Link {
    /// Link name.
    pub name: String,
    /// The peer's handle; the emulator uses the same number as its own handle for
    /// the link (its handles map one-to-one onto the peer's, so they are unique too).
    pub handle: u32,
    /// A process-unique id (owner of session locks).
    pub id: u64,
    /// What the link is attached to.
    pub kind: LinkKind,
    /// The peer's requested sender settle mode.
    pub snd_settle_mode: SenderSettleMode,
    /// The peer's requested receiver settle mode.
    pub rcv_settle_mode: ReceiverSettleMode,
    /// The link's target address as sent by the peer.
    pub target_address: Option<String>,
    /// Delivery count (ours when we send, theirs when we receive).
    pub delivery_count: u32,
    /// Credit: what we may send, or what we granted.
    pub credit: u32,
    /// The peer asked us to drain.
    pub drain: bool,
    /// Encoded replies waiting for credit (reply links).
    pub pending: VecDeque<Vec<u8>>,
    /// A multi-frame delivery being received.
    pub partial: Option<Partial>,
    /// Largest message accepted on this link.
    pub max_message_size: u64,
}

impl Link {
    /// Whether the emulator is the sending end.
    pub fn we_send(&self) -> bool {
        matches!(
            self.kind,
            LinkKind::Replies(_) | LinkKind::EntityReceiver { .. }
        )
    }
}
