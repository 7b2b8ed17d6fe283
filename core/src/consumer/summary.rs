//! [`Summary`]: what a consumer run did, returned when it stops.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why [`Consumer::run`](super::Consumer::run) returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The cancellation token was cancelled.
    Cancelled,
    /// The subscriber was closed ([`crate::Error::Closed`]).
    SubscriberClosed,
}

/// Counts of one consumer run, returned by [`Consumer::run`](super::Consumer::run).
///
/// Every received message ends in exactly one of `acked`, `nacked`, `dead_lettered`,
/// `released`, `settle_failed` or `timed_out`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Summary {
    /// Why the run ended.
    pub stopped: StopReason,
    /// Messages received.
    pub received: u64,
    /// Handler calls that finished (with success, an error or a panic).
    pub handled: u64,
    /// Messages acked after their handler succeeded.
    pub acked: u64,
    /// Messages nacked with a backoff delay after a transient error or a panic.
    pub nacked: u64,
    /// Messages dead-lettered (permanent error, malformed body, or retries exhausted).
    pub dead_lettered: u64,
    /// Messages returned to the broker unhandled, with no delay: received but not started
    /// at shutdown, or behind a message of the same ordering key that was not settled.
    pub released: u64,
    /// Handlers still running at the shutdown deadline: stopped, and their messages
    /// released without waiting for the outcome.
    pub timed_out: u64,
    /// Handler calls that panicked (included in `handled`; the message was retried).
    pub panicked: u64,
    /// Settlements (ack, nack, dead-letter, release) that failed, typically because the
    /// lock was lost; the broker redelivers those messages.
    pub settle_failed: u64,
    /// Receive calls that failed (the consumer backed off and went on).
    pub receive_errors: u64,
}

/// The live counters behind a [`Summary`].
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) received: AtomicU64,
    pub(crate) handled: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) nacked: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) released: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    pub(crate) panicked: AtomicU64,
    pub(crate) settle_failed: AtomicU64,
    pub(crate) receive_errors: AtomicU64,
}

/// Adds one to a counter.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Stats {
    pub(crate) fn summary(&self, stopped: StopReason) -> Summary {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Summary {
            stopped,
            received: get(&self.received),
            handled: get(&self.handled),
            acked: get(&self.acked),
            nacked: get(&self.nacked),
            dead_lettered: get(&self.dead_lettered),
            released: get(&self.released),
            timed_out: get(&self.timed_out),
            panicked: get(&self.panicked),
            settle_failed: get(&self.settle_failed),
            receive_errors: get(&self.receive_errors),
        }
    }
}
