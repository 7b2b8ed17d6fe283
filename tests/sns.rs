//! The conformance suite on SNS fanning out to two SQS queues (LocalStack).

cloudbus::conformance_tests!(cloudbus::testkit::aws::SnsHarness);
