//! Every test of the Kafka adapter against the Kafka-compatible broker of `kafka/start`
//! (or `KAFKA_BROKERS`), in one test binary: the conformance and consumer suites on a
//! topic with one subscription and with two, and the Kafka-specific cases (rebalances, a
//! consumer killed mid-stream, out-of-order acks, poison records, interop with the Python
//! `confluent-kafka` client).

mod groups;
mod harness;
mod interop;

mod topic {
    cloudbus_testkit::conformance_tests!(crate::harness::KafkaHarness::topic());
}

mod fan_out {
    cloudbus_testkit::conformance_tests!(crate::harness::KafkaHarness::fan_out());
}

mod consumer_topic {
    cloudbus_testkit::consumer_tests!(crate::harness::KafkaHarness::topic());
}

/// The fault suite (cuts, a stalled network, latency, an unreachable broker, a killed
/// consumer process) on a topic, through the fault proxy in front of a broker of its own.
mod faults {
    cloudbus_testkit::fault_tests!(crate::harness::KafkaFaultHarness::new());
}
