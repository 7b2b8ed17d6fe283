//! The consumer runtime: write a [`Handler`], and a [`Consumer`] receives, runs it with
//! bounded concurrency, settles each message from the result, renews locks while it runs,
//! retries with backoff, dead-letters poison messages, and shuts down gracefully.
//!
//! It works over any `dyn` [`Subscriber`], so the same handler runs on every transport.
//!
//! ```
//! use std::time::Duration;
//! use cloudbus_core::{Message, Publisher};
//! use cloudbus_core::consumer::{CancellationToken, Consumer, Context, HandlerError, RetryPolicy, json};
//! use cloudbus_core::memory::{MemoryConfig, MemoryPublisher, MemorySubscriber};
//!
//! #[derive(serde::Deserialize)]
//! struct Order {
//!     id: u64,
//!     total: i64,
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // With the `cloudbus` facade: `cloudbus::connect_publisher(url)` and
//! // `cloudbus::connect_subscriber(url)` for any transport.
//! let config = MemoryConfig::new("doc-orders");
//! let publisher = MemoryPublisher::connect(&config).await?;
//! publisher.publish(Message::from_json(&serde_json::json!({ "id": 1, "total": 20 }))?).await?;
//!
//! // Cancel this on SIGTERM / ctrl-c; here the handler cancels it after the first order.
//! let shutdown = CancellationToken::new();
//! let consumer = Consumer::builder(MemorySubscriber::connect(&config).await?)
//!     .concurrency(16)
//!     .retry(RetryPolicy::exponential(Duration::from_secs(1)).max_attempts(5))
//!     .shutdown_timeout(Duration::from_secs(30))
//!     .build()?;
//!
//! let stop = shutdown.clone();
//! let handler = json(move |order: Order, context: Context| {
//!     let stop = stop.clone();
//!     async move {
//!         if order.total < 0 {
//!             // Dead-lettered at once, with this reason and text.
//!             return Err(HandlerError::permanent("negative total").with_reason("InvalidOrder"));
//!         }
//!         // `?` on any error makes it transient: retried with backoff, then dead-lettered.
//!         println!("order {} (attempt {})", order.id, context.delivery_count());
//!         stop.cancel();
//!         Ok(())
//!     }
//! });
//!
//! let summary = consumer.run(handler, shutdown).await;
//! assert_eq!(summary.acked, 1);
//! # Ok(())
//! # }
//! # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
//! ```
//!
//! ## What the consumer does with each message
//!
//! | handler result | settlement |
//! |---|---|
//! | `Ok(())` | ack |
//! | [`HandlerError::transient`] (what `?` makes), or a panic | nack with [`RetryPolicy`] backoff from the delivery count; on attempt [`RetryPolicy::max_attempts`], dead-letter with [`RETRIES_EXHAUSTED`] |
//! | [`HandlerError::permanent`] | dead-letter with its reason ([`PERMANENT_ERROR`] by default) |
//! | body not the expected JSON ([`json`] handlers) | dead-letter with [`MALFORMED_BODY`], without calling the handler |
//!
//! The dead-letter description is the error's text with its sources (at most 1,024 bytes).
//!
//! - **Concurrency and prefetch.** At most [`ConsumerBuilder::concurrency`] messages are
//!   in the consumer at once, and it receives only for free slots (at most the
//!   subscriber's [`Subscriber::receive_batch`] per call: 10 on SQS, 100 on Service Bus),
//!   so no message waits in a local buffer while its lock runs out. While messages flow,
//!   several receive calls run at once ([`ConsumerBuilder::receivers`]); on an idle queue
//!   one long poll at a time.
//! - **Lock renewal.** While a handler runs, its message's lock is extended at two thirds
//!   of the lock duration, up to [`LockRenewal::max_total`]; see [`LockRenewal`].
//! - **Ordering keys.** Messages with the same [`Message::ordering_key`](crate::Message)
//!   are handled one at a time, in order, even when one receive returns several of them.
//!   When one is retried, the ones behind it are released, hidden for the retry's delay, and
//!   come back after it.
//! - **Receive errors.** A failing receive is retried with exponential backoff
//!   ([`ConsumerBuilder::receive_backoff`]), logged with `tracing::warn!` when transient and
//!   `tracing::error!` when not (a missing queue or a lost permission is often fixed while
//!   the service runs); the consumer never exits because of them and never spins. Only
//!   [`Error::Closed`] ends the run.
//! - **Shutdown.** When the [`CancellationToken`] is cancelled the consumer stops receiving,
//!   releases (nacks with no delay) the messages it holds but has not started, lets
//!   running handlers finish and settles them. Handlers still running at
//!   [`ConsumerBuilder::shutdown_timeout`] are stopped and their messages released in the
//!   background; [`Consumer::run`] returns at the deadline with a [`Summary`]. A receive
//!   call in progress is not dropped (an SQS long poll goes on at the broker after the
//!   client hangs up, and hides the messages it takes until their visibility timeout): the
//!   consumer lets it finish and releases what it returns, and its own releases wait until
//!   it has ended, so they are not taken back. So stopping an idle consumer on SQS takes
//!   up to [`ConsumerBuilder::receive_wait`] (within the deadline); transports whose
//!   receive can be dropped safely ([`Subscriber::receive_is_cancel_safe`], the in-memory
//!   one) stop at once. What is left at the deadline finishes in the background, while the
//!   Tokio runtime lives.
//! - **Duplicates.** Delivery is at-least-once; wrap a handler in [`Idempotent`] to skip
//!   message ids already processed.
//!
//! ## Telemetry
//!
//! Each message is handled in an `info` span named `process` (OpenTelemetry name
//! `process <destination>`, kind consumer) with the fields `messaging.system`,
//! `messaging.destination.name`, `messaging.destination.subscription.name`,
//! `messaging.operation.type` (`process`), `messaging.message.id`,
//! `messaging.message.conversation_id` (the correlation id),
//! `messaging.message.delivery_count`, `cloudbus.settlement` (`ack`, `nack`,
//! `dead_letter`, `release`) and, on failure, `error.type`. Its parent is the trace
//! context the message carries: publish through [`TracingPublisher`] (or call
//! [`inject_trace_context`]) and one trace runs from the publisher to the handler; see
//! [`TRACEPARENT`] for what that needs.
//!
//! Metrics go through the [`metrics`](https://docs.rs/metrics) facade, so the application
//! picks the exporter (Prometheus, OpenTelemetry, StatsD...); without one they cost next
//! to nothing. Every metric has the labels `system` and `destination` (`queue`, or
//! `topic/subscription`):
//!
//! | metric | kind |
//! |---|---|
//! | `cloudbus.consumer.received` | counter |
//! | `cloudbus.consumer.acked` | counter |
//! | `cloudbus.consumer.nacked` | counter: retried after a transient error or a panic |
//! | `cloudbus.consumer.dead_lettered` | counter |
//! | `cloudbus.consumer.released` | counter: returned unhandled at shutdown, or behind a retried message of the same ordering key |
//! | `cloudbus.consumer.receive_errors` | counter |
//! | `cloudbus.consumer.handler.duration` | histogram in seconds, with the label `outcome` (`ok`, `transient`, `permanent`, `panic`) |

mod handler;
mod idempotency;
mod ordering;
mod renewal;
mod retry;
mod run;
mod signal;
mod summary;
mod telemetry;
mod trace_context;

use std::sync::Arc;
use std::time::Duration;

pub use handler::{
    BoxError, Context, Handler, HandlerError, Json, MALFORMED_BODY, PERMANENT_ERROR,
    RETRIES_EXHAUSTED, json,
};
pub use idempotency::{Claim, IdempotencyStore, Idempotent, MemoryIdempotencyStore};
pub use renewal::LockRenewal;
pub use retry::RetryPolicy;
pub use signal::cancel_on_signals;
pub use summary::{StopReason, Summary};
pub use tokio_util::sync::CancellationToken;
pub use trace_context::{
    TRACEPARENT, TracingPublisher, extract_trace_context, inject_trace_context,
};

use crate::{Destination, Error, Result, Subscriber};

/// Runs a [`Handler`] over a [`Subscriber`]. Build one with [`Consumer::builder`]; see the
/// [module docs](self) for what it does.
pub struct Consumer {
    subscriber: Arc<dyn Subscriber>,
    settings: Settings,
}

/// How a consumer runs; set through [`ConsumerBuilder`].
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) destination: Destination,
    pub(crate) concurrency: usize,
    pub(crate) retry: RetryPolicy,
    pub(crate) renewal: LockRenewal,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) receive_wait: Duration,
    pub(crate) receive_backoff: (Duration, Duration),
    /// Receive calls in flight at most; `None`: one per 10 slots, 1 to 8.
    pub(crate) receivers: Option<usize>,
}

impl Settings {
    /// Receive calls in flight at most.
    pub(crate) fn receivers(&self) -> usize {
        self.receivers
            .unwrap_or_else(|| self.concurrency.div_ceil(10).clamp(1, 8))
    }
}

/// Options of a [`Consumer`].
pub struct ConsumerBuilder {
    subscriber: Arc<dyn Subscriber>,
    settings: Settings,
}

impl Consumer {
    /// Starts a builder over a subscriber (`Box<dyn Subscriber>`, `Arc<dyn Subscriber>` or a
    /// transport's own subscriber type); telemetry names the subscriber's
    /// [`Subscriber::destination`].
    pub fn builder(subscriber: impl Subscriber + 'static) -> ConsumerBuilder {
        let subscriber: Arc<dyn Subscriber> = Arc::new(subscriber);
        ConsumerBuilder {
            settings: Settings {
                destination: subscriber.destination(),
                concurrency: 16,
                retry: RetryPolicy::default(),
                renewal: LockRenewal::default(),
                shutdown_timeout: Duration::from_secs(30),
                receive_wait: Duration::from_secs(20),
                receive_backoff: (Duration::from_millis(200), Duration::from_secs(10)),
                receivers: None,
            },
            subscriber,
        }
    }

    /// Runs `handler` on every message until `shutdown` is cancelled (or the subscriber is
    /// closed), then drains as the [module docs](self) describe and returns what it did.
    ///
    /// Needs a Tokio runtime: each message is handled in a task of its own, which inherits
    /// the caller's `tracing` subscriber.
    pub async fn run<H: Handler>(self, handler: H, shutdown: CancellationToken) -> Summary {
        run::run(self.subscriber, self.settings, handler, shutdown).await
    }
}

impl ConsumerBuilder {
    /// How many messages are handled at once (and held at most). Default 16.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.settings.concurrency = concurrency;
        self
    }

    /// Backoff and attempts for transient failures. Default [`RetryPolicy::default`].
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.settings.retry = retry;
        self
    }

    /// Lock renewal while handlers run. Default [`LockRenewal::default`].
    pub fn lock_renewal(mut self, renewal: LockRenewal) -> Self {
        self.settings.renewal = renewal;
        self
    }

    /// How long running handlers get to finish after shutdown is requested. Default 30 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.settings.shutdown_timeout = timeout;
        self
    }

    /// How long each receive call waits for messages (the long poll). Default 20 s, the
    /// most SQS allows.
    pub fn receive_wait(mut self, wait: Duration) -> Self {
        self.settings.receive_wait = wait;
        self
    }

    /// Receive calls in flight at most, while messages are flowing. Default: one per 10
    /// slots of [`ConsumerBuilder::concurrency`], 1 to 8; never more than the subscriber's
    /// [`Subscriber::concurrent_receives`] (SQS and SNS: several; Service Bus and memory: 1). After a receive that returned
    /// nothing the consumer polls with one call until messages come again, so an idle
    /// queue costs one long poll per [`ConsumerBuilder::receive_wait`].
    pub fn receivers(mut self, receivers: usize) -> Self {
        self.settings.receivers = Some(receivers);
        self
    }

    /// The pause after a failed receive: `base`, doubling per failure up to `cap`. Default
    /// 200 ms to 10 s.
    pub fn receive_backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.settings.receive_backoff = (base, cap);
        self
    }

    /// The transport and queue that spans and metrics name, instead of the subscriber's own
    /// [`Subscriber::destination`].
    pub fn destination(mut self, destination: Destination) -> Self {
        self.settings.destination = destination;
        self
    }

    /// Checks the options and builds the consumer.
    pub fn build(self) -> Result<Consumer> {
        let settings = self.settings;
        if settings.concurrency == 0 {
            return Err(Error::config("consumer: concurrency must be at least 1"));
        }
        if settings.receivers == Some(0) {
            return Err(Error::config("consumer: receivers must be at least 1"));
        }
        settings.retry.validate()?;
        let (base, cap) = settings.receive_backoff;
        if base.is_zero() || base > cap {
            return Err(Error::config(format!(
                "consumer: receive backoff needs 0 < base <= cap, got base {base:?} and cap {cap:?}"
            )));
        }
        Ok(Consumer {
            subscriber: self.subscriber,
            settings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::memory::{MemoryConfig, MemorySubscriber};

    #[tokio::test]
    async fn invalid_options_are_config_errors() {
        let subscriber = || async {
            MemorySubscriber::connect(&MemoryConfig::new("consumer-options"))
                .await
                .expect("connect")
        };
        let zero = Consumer::builder(subscriber().await).concurrency(0).build();
        assert!(matches!(zero, Err(Error::Config { .. })));
        let backoff = Consumer::builder(subscriber().await)
            .receive_backoff(Duration::from_secs(5), Duration::from_secs(1))
            .build();
        assert!(matches!(backoff, Err(Error::Config { .. })));
        let retry = Consumer::builder(subscriber().await)
            .retry(RetryPolicy::default().max_attempts(0))
            .build();
        assert!(matches!(retry, Err(Error::Config { .. })));
        assert!(Consumer::builder(subscriber().await).build().is_ok());
    }
}
