//! The `cloudbus` binary driven as a user drives it: a child process, arguments, standard
//! input, standard output and exit codes, against the memory transport where that means
//! something (in a fresh process its broker is empty), LocalStack (SQS, SNS), the Service
//! Bus emulator, the Kafka-compatible broker and RabbitMQ. Each case has its own entities.
//!
//! Needs what `scripts/test` starts: LocalStack on 127.0.0.1:4566 (with
//! AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1), a Kafka broker
//! at KAFKA_BROKERS, RabbitMQ at RABBITMQ_URL. The Service Bus cases start emulators
//! in-process.

mod cases;
mod common;
mod kafka;
mod memory;
mod rabbitmq;
mod servicebus;
mod sqs;
