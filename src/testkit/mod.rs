//! The conformance suite (feature `testkit`): the same cases for every transport.
//!
//! An adapter author implements [`Harness`] (how to make fresh entities, and which
//! [`Features`] the transport has) and expands [`conformance_tests!`](crate::conformance_tests)
//! in a test file, which writes one `#[test]` per case:
//!
//! ```
//! // tests/memory.rs
//! cloudbus::conformance_tests!(cloudbus::testkit::MemoryHarness::queue());
//! ```
//!
//! A transport that cannot do something declares it in [`Features`] with the reason
//! ([`Support::No`]); the case then checks that the transport *refuses* the feature with
//! [`Error::Unsupported`] (or [`Error::InvalidInput`]) instead of ignoring it, and prints the
//! reason. Nothing is skipped silently.

#[cfg(feature = "aws")]
pub mod aws;
mod cases;
mod consumer;
mod memory;

use std::time::Duration;

use async_trait::async_trait;

pub use cases::*;
pub use consumer::*;
pub use memory::MemoryHarness;

use crate::{Config, Error, Result};

/// Whether a transport supports a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Supported: the case must pass.
    Yes,
    /// Not supported, for this reason: the case checks the transport refuses it.
    No(&'static str),
}

/// What a transport can do, declared by its harness.
#[derive(Debug, Clone)]
pub struct Features {
    /// Topics whose subscriptions each get every message.
    pub fan_out: Support,
    /// Ordering keys delivered in order within a key.
    pub ordering: Support,
    /// Delayed delivery (`deliver_at` / `deliver_after`).
    pub delayed_delivery: Support,
    /// Time to live on messages.
    pub time_to_live: Support,
    /// The largest message the transport takes (payload plus attributes), in bytes.
    pub max_message_size: usize,
    /// The time unit of the timing cases: locks, delays and waits are small multiples of
    /// it. Use the transport's timer granularity (1 s for SQS, less for memory).
    pub unit: Duration,
}

/// What a case asks the harness to create.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Lock (visibility) duration of received messages.
    pub visibility: Duration,
    /// Deliveries after which the transport dead-letters a message.
    pub max_deliveries: u32,
    /// Whether the case needs messages with ordering keys.
    pub ordered: bool,
}

/// Fresh entities for one case: where to publish, where to receive, and the dead-letter
/// queue of each subscriber.
#[derive(Debug, Clone)]
pub struct Entity {
    /// Where to publish.
    pub publisher: Config,
    /// Where to receive: one queue, or each subscription of a topic (every one gets every
    /// message).
    pub subscribers: Vec<Config>,
    /// The dead-letter queue of each subscriber, in the same order.
    pub dead_letters: Vec<Config>,
}

/// How the suite talks to a transport.
#[async_trait]
pub trait Harness: Send + Sync {
    /// What the transport supports.
    fn features(&self) -> Features;

    /// Creates fresh, empty entities that no other case uses.
    async fn create(&self, spec: &Spec) -> Result<Entity>;

    /// Entities that do not exist (and will not be created by connecting).
    async fn missing(&self) -> Result<Entity>;
}

/// Runs a case on a new multi-threaded runtime; used by [`conformance_tests!`](crate::conformance_tests).
pub fn run<F: std::future::Future<Output = ()>>(case: F) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(case),
        Err(error) => panic!("cannot start a tokio runtime: {error}"),
    }
}

/// Checks that `outcome` is the refusal a transport owes for an unsupported feature.
pub fn assert_refused<T: std::fmt::Debug>(outcome: Result<T>, feature: &str, reason: &str) {
    match outcome {
        Err(Error::Unsupported { .. } | Error::InvalidInput { .. }) => {
            eprintln!("declared unsupported: {feature}: {reason} (and the transport refuses it)");
        }
        other => panic!(
            "{feature} is declared unsupported ({reason}), so the transport must refuse it with \
             Unsupported or InvalidInput, but it returned {other:?}"
        ),
    }
}

/// Writes one `#[test]` per conformance case for the harness that `$harness` (an
/// expression, which may use `.await`) builds. `conformance_tests!(ignore: "why", harness)`
/// writes them ignored, with the reason.
#[macro_export]
macro_rules! conformance_tests {
    (ignore: $why:literal, $harness:expr) => {
        $crate::conformance_tests!(@all [#[ignore = $why]] $harness);
    };
    ($harness:expr) => {
        $crate::conformance_tests!(@all [] $harness);
    };
    (@all [$($attr:tt)*] $harness:expr) => {
        $crate::conformance_tests!(@cases [$($attr)*] $harness;
            round_trip_with_every_field,
            two_subscriptions_each_receive_all,
            competing_consumers_lose_nothing,
            json_body_is_not_mangled,
            binary_body_round_trips,
            unusual_attributes_round_trip_or_are_rejected,
            nack_redelivers_with_count_plus_one,
            nack_with_delay_is_not_redelivered_early,
            unsettled_delivery_comes_back_after_lock,
            dead_letter_records_reason,
            max_delivery_count_dead_letters,
            extend_keeps_message_locked,
            batch_of_25_all_arrive,
            concurrent_publishes_and_close_lose_nothing,
            delayed_delivery_is_not_visible_early,
            ordering_keys_keep_order,
            missing_entity_is_not_found,
            use_after_close_is_closed,
            oversized_message_is_rejected,
        );
    };
    (@cases [$($attr:tt)*] $harness:expr; $case:ident, $($rest:ident,)*) => {
        #[test]
        $($attr)*
        fn $case() {
            $crate::testkit::run(async {
                let harness = $harness;
                $crate::testkit::$case(&harness).await;
            });
        }
        $crate::conformance_tests!(@cases [$($attr)*] $harness; $($rest,)*);
    };
    (@cases [$($attr:tt)*] $harness:expr;) => {};
}
