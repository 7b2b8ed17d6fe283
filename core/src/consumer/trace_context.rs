//! W3C trace context across the queue: a `traceparent` attribute written on publish and
//! read on consume, so that one trace runs from the publisher through the broker to the
//! handler.
//!
//! The context comes from the current `tracing` span through `tracing-opentelemetry`, so it
//! flows only when the application's `tracing` subscriber has an OpenTelemetry layer of
//! `tracing-opentelemetry` 0.34 (OpenTelemetry 0.33), the versions cloudbus is built with.
//! Without one, nothing is written and nothing is read: no attribute, no cost.
//!
//! Exactly one attribute is used, `traceparent`: SQS carries at most 10 message
//! attributes, so the W3C `tracestate` (vendor data) is not propagated.

use async_trait::async_trait;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::telemetry::publish_span;
use crate::{Destination, Message, Publisher, Result};

/// The attribute that carries the W3C trace context (`00-<trace id>-<span id>-<flags>`).
///
/// The context comes from the current `tracing` span through `tracing-opentelemetry`, so it
/// flows only when the application's `tracing` subscriber has an OpenTelemetry layer of
/// `tracing-opentelemetry` 0.34 (OpenTelemetry 0.33), the versions cloudbus is built
/// with; without one nothing is written or read, at no cost. It is the only attribute
/// used: SQS carries at most 10 message attributes, so the W3C `tracestate` (vendor data)
/// is not propagated.
pub const TRACEPARENT: &str = "traceparent";

/// Writes the trace context of the current `tracing` span into `message` as its
/// [`TRACEPARENT`] attribute. Returns `false` (and leaves the message alone) when there is
/// no valid OpenTelemetry context to write.
///
/// [`TracingPublisher`] does this for every message; call it yourself when you publish
/// another way.
pub fn inject_trace_context(message: &mut Message) -> bool {
    inject(&tracing::Span::current().context(), message)
}

/// The trace context a message carries in its [`TRACEPARENT`] attribute, as the remote
/// parent for a span that processes it. `None` when it has none, or a malformed one.
pub fn extract_trace_context(message: &Message) -> Option<opentelemetry::Context> {
    extract(message)
}

pub(crate) fn inject(context: &opentelemetry::Context, message: &mut Message) -> bool {
    let span = context.span();
    let span_context = span.span_context();
    if !span_context.is_valid() {
        return false;
    }
    message
        .attributes
        .insert(TRACEPARENT.to_string(), format_traceparent(span_context));
    true
}

pub(crate) fn extract(message: &Message) -> Option<opentelemetry::Context> {
    let span_context = parse_traceparent(message.attributes.get(TRACEPARENT)?)?;
    Some(opentelemetry::Context::new().with_remote_span_context(span_context))
}

fn format_traceparent(context: &SpanContext) -> String {
    format!(
        "00-{:032x}-{:016x}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags() & TraceFlags::SAMPLED
    )
}

/// Parses `version-traceid-parentid-flags` as the W3C Trace Context spec says: lowercase
/// hex, ids not all zero, version `ff` invalid, later versions may append fields.
fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let flags = parts.next()?;
    let is_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !is_hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !is_hex(trace_id, 32) || !is_hex(span_id, 16) || !is_hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let context = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
}

/// A [`Publisher`] that opens a `send` span for each publish call and writes its trace
/// context into every message (one attribute, [`TRACEPARENT`]), so the consumer's
/// `process` span continues the same trace.
///
/// ```
/// # async fn run() -> cloudbus_core::Result<()> {
/// use cloudbus_core::{Message, Publisher};
/// use cloudbus_core::consumer::TracingPublisher;
/// use cloudbus_core::memory::{MemoryConfig, MemoryPublisher};
///
/// let publisher = TracingPublisher::new(MemoryPublisher::connect(&MemoryConfig::new("doc-traced")).await?);
/// publisher.publish(Message::new("hello")).await?;
/// # Ok(())
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
/// ```
pub struct TracingPublisher<P> {
    inner: P,
    destination: Destination,
}

impl<P: Publisher> TracingPublisher<P> {
    /// Wraps `inner`; spans name its [`Publisher::destination`].
    pub fn new(inner: P) -> Self {
        let destination = inner.destination();
        TracingPublisher { inner, destination }
    }

    /// The wrapped publisher.
    pub fn into_inner(self) -> P {
        self.inner
    }

    /// Injects the context of `span` (or, where that has none, of the current span).
    fn inject_all(span: &tracing::Span, messages: &mut [Message]) {
        let mut context = span.context();
        if !context.span().span_context().is_valid() {
            context = tracing::Span::current().context();
        }
        for message in messages {
            inject(&context, message);
        }
    }
}

#[async_trait]
impl<P: Publisher> Publisher for TracingPublisher<P> {
    async fn publish(&self, message: Message) -> Result<String> {
        let mut messages = [message];
        let span = publish_span(&self.destination, &messages);
        Self::inject_all(&span, &mut messages);
        let [message] = messages;
        self.inner.publish(message).instrument(span).await
    }

    async fn publish_batch(&self, mut messages: Vec<Message>) -> Vec<Result<String>> {
        let span = publish_span(&self.destination, &messages);
        Self::inject_all(&span, &mut messages);
        self.inner.publish_batch(messages).instrument(span).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }

    fn destination(&self) -> Destination {
        self.destination.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn round_trips_a_valid_traceparent() {
        let context = parse_traceparent(VALID).expect("valid");
        assert!(context.is_remote() && context.is_sampled());
        assert_eq!(format_traceparent(&context), VALID);
        let mut message = Message::new("x");
        let cx = opentelemetry::Context::new().with_remote_span_context(context);
        assert!(inject(&cx, &mut message));
        assert_eq!(message.attributes[TRACEPARENT], VALID);
        assert!(extract(&message).is_some());
    }

    #[test]
    fn rejects_malformed_traceparents() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?} must be rejected");
        }
        // A later version may add fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")
                .is_some()
        );
    }

    #[test]
    fn without_an_opentelemetry_layer_nothing_is_injected() {
        let mut message = Message::new("x");
        assert!(!inject_trace_context(&mut message));
        assert!(message.attributes.is_empty());
    }
}
