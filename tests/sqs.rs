//! The conformance suite and the consumer suite on SQS (LocalStack): a standard queue and
//! a FIFO queue. Needs LocalStack: run through `scripts/test`, or start `localstack/start`
//! and export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1.

mod standard {
    cloudbus::conformance_tests!(cloudbus::testkit::aws::SqsHarness::standard());
}

mod fifo {
    cloudbus::conformance_tests!(cloudbus::testkit::aws::SqsHarness::fifo());
}

mod consumer_standard {
    cloudbus::consumer_tests!(cloudbus::testkit::aws::SqsHarness::standard());
}

mod consumer_fifo {
    cloudbus::consumer_tests!(cloudbus::testkit::aws::SqsHarness::fifo());
}
