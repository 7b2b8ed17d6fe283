//! Every test of the AWS adapters against LocalStack (or any endpoint given by
//! `CLOUDBUS_TEST_AWS_ENDPOINT`, default `http://127.0.0.1:4566`), in one test binary:
//! the conformance and consumer suites on SQS standard and FIFO queues and on an SNS topic
//! with two subscribed queues, interoperability with boto3, and a broker outage.
//!
//! Run through `scripts/test` (it starts LocalStack and exports its credentials), or start
//! `localstack/start` and export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
//! AWS_REGION=us-east-1.

mod harness;
mod interop;
mod outage;

use cloudbus_aws::{SnsConfig, SqsConfig};
use cloudbus_core::driver::{Connect, TransportConfig};
use cloudbus_core::{Publisher, Subscriber};

mod sqs_standard {
    cloudbus_testkit::conformance_tests!(crate::harness::SqsHarness::standard());
}

mod sqs_fifo {
    cloudbus_testkit::conformance_tests!(crate::harness::SqsHarness::fifo());
}

mod sns {
    cloudbus_testkit::conformance_tests!(crate::harness::SnsHarness);
}

mod consumer_sqs_standard {
    cloudbus_testkit::consumer_tests!(crate::harness::SqsHarness::standard());
}

mod consumer_sqs_fifo {
    cloudbus_testkit::consumer_tests!(crate::harness::SqsHarness::fifo());
}

mod consumer_sns {
    cloudbus_testkit::consumer_tests!(crate::harness::SnsHarness);
}

/// The configuration an `sqs://` or `sns://` URL names.
fn config(url: &str) -> Box<dyn Connect> {
    if url.starts_with("sns://") {
        Box::new(SnsConfig::from_url(url).expect("valid sns:// URL"))
    } else {
        Box::new(SqsConfig::from_url(url).expect("valid sqs:// URL"))
    }
}

/// A publisher on what an `sqs://` or `sns://` URL names.
async fn connect_publisher(url: &str) -> Box<dyn Publisher> {
    config(url)
        .connect_publisher()
        .await
        .unwrap_or_else(|e| panic!("connect a publisher to {url}: {e}"))
}

/// A subscriber on what an `sqs://` or `sns://` URL names.
async fn connect_subscriber(url: &str) -> Box<dyn Subscriber> {
    config(url)
        .connect_subscriber()
        .await
        .unwrap_or_else(|e| panic!("connect a subscriber to {url}: {e}"))
}

/// The fault suite (cuts, a stalled network, latency, an unreachable endpoint, a killed
/// consumer process) through the fault proxy in front of LocalStack.
mod faults_sqs {
    cloudbus_testkit::fault_tests!(crate::harness::SqsHarness::standard());
}

mod faults_sns {
    cloudbus_testkit::fault_tests!(crate::harness::SnsHarness);
}
