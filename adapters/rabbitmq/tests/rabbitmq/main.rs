//! Every test of the RabbitMQ adapter against the broker of `rabbitmq/start`
//! (`RABBITMQ_URL`), in one test binary: the conformance and consumer suites on a task
//! queue and on an exchange with two subscriptions, and the RabbitMQ-specific cases:
//! interop with the Python client pika (its venv from `scripts/python-venv
//! adapters/rabbitmq/tests/rabbitmq/requirements.txt target/rabbitmq-py-venv`, or
//! CLOUDBUS_TEST_RABBITMQ_PYTHON), and recovery from connections the broker cuts
//! (`rabbitmq/ctl close_all_connections`, in a vhost of the test's own) and from a broker
//! that cannot be reached or goes silent.

mod harness;
mod interop;
mod recovery;
mod window;

mod queue {
    cloudbus_testkit::conformance_tests!(crate::harness::RabbitMqHarness::queue());
}

mod fan_out {
    cloudbus_testkit::conformance_tests!(crate::harness::RabbitMqHarness::fan_out());
}

mod consumer_queue {
    cloudbus_testkit::consumer_tests!(crate::harness::RabbitMqHarness::queue());
}

mod consumer_fan_out {
    cloudbus_testkit::consumer_tests!(crate::harness::RabbitMqHarness::fan_out());
}

/// The fault suite (cuts, a stalled network, latency, an unreachable broker, a killed
/// consumer process) on a quorum queue, through the fault proxy.
mod faults {
    cloudbus_testkit::fault_tests!(crate::harness::RabbitMqHarness::queue());
}
