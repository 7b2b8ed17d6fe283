//! What the consumer reports: a `tracing` span per message with OpenTelemetry messaging
//! fields, and counters and a histogram through the `metrics` facade.
//!
//! The names are listed in the [consumer module docs](super).

use std::time::Duration;

use metrics::{Counter, Histogram};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::trace_context;
use crate::{Delivery, Destination, Message};

/// The span of one message being processed. Its OpenTelemetry parent is the trace context
/// the message carries (see [`trace_context`]), if any.
pub(crate) fn process_span(destination: &Destination, delivery: &Delivery) -> tracing::Span {
    let message = delivery.message();
    let span = tracing::info_span!(
        "process",
        otel.name = %format!("process {}", destination.name()),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.system = %destination.system(),
        messaging.destination.name = %destination.name(),
        messaging.destination.subscription.name = tracing::field::Empty,
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.message.id = %message.id,
        messaging.message.conversation_id = tracing::field::Empty,
        messaging.message.delivery_count = delivery.delivery_count(),
        cloudbus.settlement = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    if let Some(subscription) = destination.subscription() {
        span.record("messaging.destination.subscription.name", subscription);
    }
    if let Some(correlation_id) = &message.correlation_id {
        span.record("messaging.message.conversation_id", correlation_id.as_str());
    }
    if let Some(parent) = trace_context::extract(message) {
        // Fails only when no OpenTelemetry layer is installed: then there is no trace to join.
        let _ = span.set_parent(parent);
    }
    span
}

/// The span of one publish call (`send`), whose context is injected into the messages.
pub(crate) fn publish_span(destination: &Destination, messages: &[Message]) -> tracing::Span {
    let span = tracing::info_span!(
        "send",
        otel.name = %format!("send {}", destination.name()),
        otel.kind = "producer",
        messaging.system = %destination.system(),
        messaging.destination.name = %destination.name(),
        messaging.operation.type = "send",
        messaging.operation.name = "send",
        messaging.message.id = tracing::field::Empty,
        messaging.batch.message_count = tracing::field::Empty,
    );
    match messages {
        [one] => {
            span.record("messaging.message.id", one.id.as_str());
        }
        many => {
            span.record("messaging.batch.message_count", many.len());
        }
    }
    span
}

/// How a handler call ended, for the duration histogram.
#[derive(Debug, Clone, Copy)]
pub(crate) enum HandlerOutcome {
    Ok,
    Transient,
    Permanent,
    Panic,
}

/// The consumer's metric handles, registered once per run.
pub(crate) struct Instruments {
    pub(crate) received: Counter,
    pub(crate) acked: Counter,
    pub(crate) nacked: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) released: Counter,
    pub(crate) receive_errors: Counter,
    durations: [Histogram; 4],
}

impl Instruments {
    pub(crate) fn new(destination: &Destination) -> Self {
        let system = destination.system().to_string();
        let label = destination.label();
        let counter = |name: &'static str| metrics::counter!(name, "system" => system.clone(), "destination" => label.clone());
        let histogram = |outcome: &'static str| {
            metrics::histogram!(
                "cloudbus.consumer.handler.duration",
                "system" => system.clone(),
                "destination" => label.clone(),
                "outcome" => outcome
            )
        };
        Instruments {
            received: counter("cloudbus.consumer.received"),
            acked: counter("cloudbus.consumer.acked"),
            nacked: counter("cloudbus.consumer.nacked"),
            dead_lettered: counter("cloudbus.consumer.dead_lettered"),
            released: counter("cloudbus.consumer.released"),
            receive_errors: counter("cloudbus.consumer.receive_errors"),
            durations: [
                histogram("ok"),
                histogram("transient"),
                histogram("permanent"),
                histogram("panic"),
            ],
        }
    }

    pub(crate) fn handler_duration(&self, outcome: HandlerOutcome, duration: Duration) {
        self.durations[outcome as usize].record(duration.as_secs_f64());
    }
}

/// Describes the metrics to the installed recorder (units and help texts).
pub(crate) fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(
        "cloudbus.consumer.received",
        "messages received by consumers"
    );
    describe_counter!("cloudbus.consumer.acked", "messages handled and acked");
    describe_counter!(
        "cloudbus.consumer.nacked",
        "messages whose handler failed transiently, returned for a retry"
    );
    describe_counter!("cloudbus.consumer.dead_lettered", "messages dead-lettered");
    describe_counter!(
        "cloudbus.consumer.released",
        "messages returned unhandled (shutdown, or behind a failed message of their ordering key)"
    );
    describe_counter!(
        "cloudbus.consumer.receive_errors",
        "failed receive calls (the consumer backs off and retries)"
    );
    describe_histogram!(
        "cloudbus.consumer.handler.duration",
        Unit::Seconds,
        "time spent in the handler per message"
    );
}
