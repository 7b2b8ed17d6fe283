//! Session endpoints: transfer windows, delivery ids and unsettled deliveries.

use std::collections::{HashMap, HashSet};

use crate::link::Link;

/// The incoming window the emulator grants; refreshed at half.
pub const INCOMING_WINDOW: u32 = 10_000;

/// A delivery sent by the emulator and not yet settled by the client.
#[derive(Debug, Clone)]
pub struct Unsettled {
    /// The link handle it went out on.
    pub handle: u32,
    /// The broker lock token.
    pub lock_token: uuid::Uuid,
}

/// One begun session.
#[derive(Debug, Default)]
pub struct Session {
    /// The peer's channel; the emulator answers on the same number (its own
    /// channels map one-to-one onto the peer's, so they are unique too).
    pub channel: u16,
    /// Next transfer id expected from the peer.
    pub next_incoming_id: u32,
    /// Frames received since the window was last announced.
    pub received_since_flow: u32,
    /// Next transfer id we send.
    pub next_outgoing_id: u32,
    /// How many more transfer frames the peer accepts.
    pub remote_incoming_window: u32,
    /// Next delivery id we assign.
    pub next_delivery_id: u32,
    /// Links by handle.
    pub links: HashMap<u32, Link>,
    /// Handles the emulator detached first (refused attaches), until the peer's
    /// answering detach: frames already in flight on them are ignored.
    pub detached_by_us: HashSet<u32>,
    /// Our unsettled deliveries by delivery id.
    pub unsettled: HashMap<u32, Unsettled>,
    /// Delivery ids of client transfers to accept (coalesced into ranges).
    pub pending_accepts: Vec<u32>,
}
