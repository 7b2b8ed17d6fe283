//! # cloudbus-aws
//!
//! Amazon SQS (`sqs://`) and SNS fanning out to SQS (`sns://`) for cloudbus, on the
//! official AWS SDK for Rust. Both share one codec: SQS and SNS each carry a body string
//! and at most ten string attributes, and SNS raw delivery hands SQS exactly what SNS was
//! given, so one mapping serves both (see the README's "Message mapping").
//!
//! Credentials and region come from the standard AWS configuration chain (environment,
//! profile, SSO, web identity, IMDS); `region` and `endpoint` options override them.
//!
//! Timeouts: connecting to the endpoint may take 3 s; one attempt of a call 10 s and the
//! call 30 s in all (the SDK retries transient failures, 3 attempts); a long poll
//! (`ReceiveMessage`) its wait plus 5 s, in one attempt. So when the broker or the network
//! stops answering, calls fail with a transient [`Error::Transport`](cloudbus_core::Error)
//! instead of hanging, and a consumer backs off and resumes once the broker is back.
//!
//! ```no_run
//! use cloudbus_aws::{SqsConfig, SqsPublisher};
//! use cloudbus_core::driver::TransportConfig;
//! use cloudbus_core::{Message, Publisher};
//!
//! # async fn run() -> cloudbus_core::Result<()> {
//! let config = SqsConfig::from_url("sqs://orders?create=true&endpoint=http://127.0.0.1:4566")?;
//! let publisher = SqsPublisher::connect(&config).await?;
//! publisher.publish(Message::new("hello")).await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod batch;
mod client;
mod codec;
mod config;
mod error;
#[cfg(test)]
mod fuzz;
mod inspector;
mod queue;
mod sns;
mod sqs;

pub use config::{SnsConfig, SqsConfig, sqs_dead_letter_name};
pub use inspector::SqsInspector;
pub use sns::{SnsPublisher, SnsSubscriber};
pub use sqs::{SqsPublisher, SqsSubscriber};
