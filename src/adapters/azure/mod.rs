//! Azure Service Bus (feature `azure`).

pub mod servicebus;
