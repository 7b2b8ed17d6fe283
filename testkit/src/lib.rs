//! The conformance and consumer suites: the same cases for every transport, over
//! `dyn Publisher` / `dyn Subscriber`, so any adapter can run them, including one written
//! outside the cloudbus workspace.
//!
//! An adapter author implements [`Harness`] (how to make fresh entities, and which
//! [`Features`] the transport has) and expands [`conformance_tests!`](crate::conformance_tests)
//! and [`consumer_tests!`](crate::consumer_tests) in a test file, which write one `#[test]`
//! per case:
//!
//! ```
//! // tests/memory.rs
//! cloudbus_testkit::conformance_tests!(cloudbus_testkit::MemoryHarness::queue());
//! cloudbus_testkit::consumer_tests!(cloudbus_testkit::MemoryHarness::queue());
//! ```
//!
//! A harness hands out [`Entity`] values: where to publish, each subscriber and its
//! dead-letter queue, each as a [`Connect`] (a transport's configuration struct, or
//! anything else that opens a publisher and a subscriber).
//!
//! A transport that cannot do something declares it in [`Features`] with the reason
//! ([`Support::No`]); the case then checks that the transport *refuses* the feature with
//! [`Error::Unsupported`] (or [`Error::InvalidInput`]) instead of ignoring it, and prints the
//! reason. Nothing is skipped silently.

mod cases;
mod consumer;
mod faults;
mod memory;
pub mod proxy;

use std::time::Duration;

use async_trait::async_trait;

pub use cases::*;
pub use consumer::*;
pub use faults::*;
pub use memory::MemoryHarness;
pub use proxy::{FaultProxy, ReservedProxy};

pub use cloudbus_core::driver::Connect;

/// Logs to stderr at the `RUST_LOG` levels when it is set (`RUST_LOG=cloudbus_rabbitmq=debug`),
/// for looking into a failing test; otherwise warnings and errors only, through the test
/// harness's capture, so that a failing test shows what went wrong around it. Harnesses
/// call it when they build a config; later calls do nothing.
pub fn log_to_stderr() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    } else {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
            .with_test_writer()
            .try_init();
    }
}
use cloudbus_core::{Error, Inspector, Publisher, Result, Subscriber};

/// Whether a transport supports a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Supported: the case must pass.
    Yes,
    /// Not supported, for this reason: the case checks the transport refuses it.
    No(&'static str),
}

/// What a transport can do, declared by its harness. Start from [`Features::default`]
/// (everything supported, the memory transport's limits) and override what differs, so a
/// harness keeps compiling when the suite learns a new feature.
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
    /// Replay: a new subscription that starts at the beginning gets every message the
    /// topic still holds (Kafka, memory topics).
    pub replay: Support,
    /// Two subscribers of one subscription compete for its messages one by one, each
    /// taking what the other has not (a queue). `No` where the members of a subscription
    /// share partitions instead (a Kafka consumer group): a second subscriber may get no
    /// partition, or take over one with the records the first held. The cases that watch a
    /// second subscriber then watch the first one's own receive calls instead, or say
    /// what they leave out.
    pub competing_subscribers: Support,
    /// Whether the transport may deliver a message again although nothing failed (no nack,
    /// no lock expiry, no crash), as SQS's at-least-once delivery may. With `false`, the
    /// consumer suite asserts no duplicates where nothing failed.
    pub spurious_redeliveries: bool,
    /// Whether a message that was on its way to a subscriber when it closed may come back
    /// with its delivery count raised although no handler saw it. RabbitMQ's quorum queues
    /// count every return, and a message the broker sends just before it takes a consumer's
    /// cancellation reaches no one and returns with the channel. With `true`, the shutdown
    /// cases check that such a message was never handled, not that its count is 1.
    pub close_may_raise_counts: bool,
}

impl Default for Features {
    fn default() -> Self {
        Features {
            fan_out: Support::Yes,
            ordering: Support::Yes,
            delayed_delivery: Support::Yes,
            time_to_live: Support::Yes,
            max_message_size: 1024 * 1024,
            unit: Duration::from_secs(1),
            replay: Support::Yes,
            competing_subscribers: Support::Yes,
            spurious_redeliveries: true,
            close_may_raise_counts: false,
        }
    }
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
    /// The case replays the topic: the subscribers the harness hands out are new
    /// subscriptions that start at the earliest message the topic holds
    /// (`with_start(Start::Earliest)`), created when they are first opened, after the case
    /// has published. A harness of a transport without replay returns the transport's
    /// refusal from `create`.
    pub replay: bool,
}

/// Fresh entities for one case: where to publish, where to receive (one queue, or each
/// subscription of a topic, every one of which gets every message), and the dead-letter
/// queue of each subscriber.
///
/// ```
/// use cloudbus_testkit::Entity;
/// use cloudbus_core::memory::MemoryConfig;
///
/// let queue = MemoryConfig::new("orders");
/// let mut dead_letters = queue.clone();
/// dead_letters.dead_letter = true;
/// let entity = Entity::new(queue.clone()).with_subscriber(queue, dead_letters);
/// assert_eq!(entity.subscriptions(), 1);
/// ```
#[derive(Debug)]
pub struct Entity {
    publisher: Box<dyn Connect>,
    subscribers: Vec<Subscription>,
}

/// One subscriber of an [`Entity`] and its dead-letter queue.
#[derive(Debug)]
struct Subscription {
    subscriber: Box<dyn Connect>,
    dead_letters: Box<dyn Connect>,
}

impl Entity {
    /// Entities published to through `publisher`; add where to receive with
    /// [`Entity::with_subscriber`].
    pub fn new(publisher: impl Connect + 'static) -> Self {
        Entity {
            publisher: Box::new(publisher),
            subscribers: Vec::new(),
        }
    }

    /// Adds a subscriber (the queue, or one subscription of the topic) and its dead-letter
    /// queue.
    pub fn with_subscriber(
        mut self,
        subscriber: impl Connect + 'static,
        dead_letters: impl Connect + 'static,
    ) -> Self {
        self.subscribers.push(Subscription {
            subscriber: Box::new(subscriber),
            dead_letters: Box::new(dead_letters),
        });
        self
    }

    /// How many subscribers there are: 1 for a queue, one per subscription of a topic.
    pub fn subscriptions(&self) -> usize {
        self.subscribers.len()
    }

    /// Opens a publisher.
    pub async fn publisher(&self) -> Result<Box<dyn Publisher>> {
        self.publisher.connect_publisher().await
    }

    /// Opens a (new) subscriber on subscription `index`.
    pub async fn subscriber(&self, index: usize) -> Result<Box<dyn Subscriber>> {
        self.subscription(index)?
            .subscriber
            .connect_subscriber()
            .await
    }

    /// Opens a subscriber on the dead-letter queue of subscription `index`.
    pub async fn dead_letters(&self, index: usize) -> Result<Box<dyn Subscriber>> {
        self.subscription(index)?
            .dead_letters
            .connect_subscriber()
            .await
    }

    /// Opens an inspector (peek, stats) on subscription `index`.
    pub async fn inspector(&self, index: usize) -> Result<Box<dyn Inspector>> {
        self.subscription(index)?
            .subscriber
            .connect_inspector()
            .await
    }

    fn subscription(&self, index: usize) -> Result<&Subscription> {
        self.subscribers.get(index).ok_or_else(|| {
            Error::config(format!(
                "the harness made {} subscribers, so there is no subscriber {index}",
                self.subscribers.len()
            ))
        })
    }
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

/// Runs a case on a new multi-threaded runtime; used by [`conformance_tests!`](crate::conformance_tests)
/// and [`consumer_tests!`](crate::consumer_tests).
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
        $crate::conformance_tests!(@attrs [#[ignore = $why]] $harness);
    };
    ($harness:expr) => {
        $crate::conformance_tests!(@attrs [] $harness);
    };
    (@attrs [$($attr:tt)*] $harness:expr) => {
        $crate::__tests!([$($attr)*] $harness;
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
            inspecting_takes_nothing,
            extend_keeps_message_locked,
            batch_of_25_all_arrive,
            concurrent_publishes_and_close_lose_nothing,
            replay_from_the_beginning_returns_every_message,
            delayed_delivery_is_not_visible_early,
            ordering_keys_keep_order,
            missing_entity_is_not_found,
            use_after_close_is_closed,
            oversized_message_is_rejected,
        );
    };
}

/// Writes one `#[test]` per case of a suite; the shape both suite macros share.
#[doc(hidden)]
#[macro_export]
macro_rules! __tests {
    (@one [$($attr:tt)*] $harness:expr; $case:ident) => {
        #[test]
        $($attr)*
        fn $case() {
            $crate::run(async {
                let harness = $harness;
                $crate::$case(&harness).await;
            });
        }
    };
    ($attrs:tt $harness:expr; $($case:ident),* $(,)?) => {
        $( $crate::__tests!(@one $attrs $harness; $case); )*
    };
}
