//! Both suites on `memory://`: queues, and topics with two subscriptions.

mod queue {
    cloudbus_testkit::conformance_tests!(cloudbus_testkit::MemoryHarness::queue());
}

mod topic {
    cloudbus_testkit::conformance_tests!(cloudbus_testkit::MemoryHarness::topic());
}

mod consumer_queue {
    cloudbus_testkit::consumer_tests!(cloudbus_testkit::MemoryHarness::queue());
}

mod consumer_topic {
    cloudbus_testkit::consumer_tests!(cloudbus_testkit::MemoryHarness::topic());
}
