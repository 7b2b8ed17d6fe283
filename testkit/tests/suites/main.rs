//! Both suites on the in-memory transport (the reference), as queues and as topics with
//! two subscriptions, and the conformance suite on an adapter defined in this test, outside
//! the cloudbus crates, as a third party would write one.

mod memory;
mod outside_adapter;
