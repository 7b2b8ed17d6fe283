//! Transports. Each adapter depends on the core traits only, never on another adapter.

#[cfg(feature = "aws")]
pub mod aws;
pub mod memory;
