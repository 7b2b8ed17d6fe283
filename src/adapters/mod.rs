//! Transports. Each adapter depends on the core traits only, never on another adapter.

pub mod memory;
