//! Transports. Each adapter depends on the core traits only, never on another adapter.

#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "azure")]
pub mod azure;
pub mod memory;
