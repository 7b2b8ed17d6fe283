//! The conformance suite and the consumer suite on SNS fanning out to two SQS queues
//! (LocalStack).

mod conformance {
    cloudbus::conformance_tests!(cloudbus::testkit::aws::SnsHarness);
}

mod consumer {
    cloudbus::consumer_tests!(cloudbus::testkit::aws::SnsHarness);
}
