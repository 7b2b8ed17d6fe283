//! The consumer suite on the in-memory transport: as queues, and as topics with two
//! subscriptions, through the same harness interface the cloud transports use.

mod queue {
    cloudbus::consumer_tests!(cloudbus::testkit::MemoryHarness::queue());
}

mod topic {
    cloudbus::consumer_tests!(cloudbus::testkit::MemoryHarness::topic());
}
