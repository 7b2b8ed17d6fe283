//! Every test of the Service Bus adapter, against the project's emulator, in one test
//! binary: the conformance and consumer suites on a queue, a topic with two subscriptions,
//! a session-enabled queue and a queue read through three receivers; the fault suite on a
//! queue; a 10,000-message soak; the emulator under 200 connections (`load`); and
//! interoperability with the official Python SDK (`interop`) and the official
//! JavaScript SDK `@azure/service-bus` (`interop_js`, `npm ci --prefix
//! adapters/azure/tests/servicebus/js` first).

mod connection;
mod emulator;
mod harness;
mod interop;
mod interop_js;
mod load;
mod soak;

mod queue {
    cloudbus_testkit::conformance_tests!(crate::harness::ServiceBusHarness::new(
        crate::harness::Kind::Queue
    ));
}

mod topic {
    cloudbus_testkit::conformance_tests!(crate::harness::ServiceBusHarness::new(
        crate::harness::Kind::Topic
    ));
}

/// The session-enabled queue (ordering keys become session ids).
mod sessions {
    cloudbus_testkit::conformance_tests!(crate::harness::ServiceBusHarness::new(
        crate::harness::Kind::Sessions
    ));
}

/// A queue read through three receivers, each on a connection of its own.
mod receivers {
    cloudbus_testkit::conformance_tests!(crate::harness::ServiceBusHarness::new(
        crate::harness::Kind::Receivers
    ));
}

mod consumer_queue {
    cloudbus_testkit::consumer_tests!(crate::harness::ServiceBusHarness::new(
        crate::harness::Kind::Queue
    ));
}

mod consumer_topic {
    cloudbus_testkit::consumer_tests!(crate::harness::ServiceBusHarness::new(
        crate::harness::Kind::Topic
    ));
}

mod consumer_receivers {
    cloudbus_testkit::consumer_tests!(crate::harness::ServiceBusHarness::new(
        crate::harness::Kind::Receivers
    ));
}

/// The fault suite (cuts, a stalled network, latency, an unreachable broker, a killed
/// consumer process) on a queue, through the fault proxy.
mod faults {
    cloudbus_testkit::fault_tests!(crate::harness::ServiceBusHarness::new(
        crate::harness::Kind::Queue
    ));
}
