//! The consumer suite: the [`Consumer`] runtime on any transport, through the same
//! [`Harness`] as the conformance suite.
//!
//! ```
//! // tests/memory.rs
//! cloudbus_testkit::consumer_tests!(cloudbus_testkit::MemoryHarness::queue());
//! ```
//!
//! Each case publishes to fresh entities, runs one or two consumers over the first
//! subscriber, and checks what the handlers saw, what the [`Summary`] counts and what is
//! left in the queue and its dead-letter queue. Times are multiples of the harness's
//! `unit`, and only semantic timing is asserted (a message is not redelivered before its
//! delay, a run returns within its deadline).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::trace::{SpanKind, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing::instrument::WithSubscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

use cloudbus_core::consumer::{
    CancellationToken, Consumer, ConsumerBuilder, Context, Handler, HandlerError, Idempotent,
    LockRenewal, MALFORMED_BODY, MemoryIdempotencyStore, RETRIES_EXHAUSTED, RetryPolicy, Summary,
    TracingPublisher, json,
};
use cloudbus_core::subscriber::{DEAD_LETTER_DESCRIPTION, DEAD_LETTER_REASON};
use cloudbus_core::{Delivery, Message, Publisher, Subscriber};

use super::{Entity, Harness, Spec, Support};

/// The longest any case waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(60);

/// Writes one `#[test]` per consumer case for the harness that `$harness` builds;
/// `consumer_tests!(ignore: "why", harness)` writes them ignored, with the reason.
#[macro_export]
macro_rules! consumer_tests {
    (ignore: $why:literal, $harness:expr) => {
        $crate::consumer_tests!(@attrs [#[ignore = $why]] $harness);
    };
    ($harness:expr) => {
        $crate::consumer_tests!(@attrs [] $harness);
    };
    (@attrs [$($attr:tt)*] $harness:expr) => {
        $crate::__tests!([$($attr)*] $harness;
            consumer_retries_with_increasing_delays,
            consumer_dead_letters_after_max_attempts,
            consumer_dead_letters_malformed_json_at_once,
            consumer_dead_letters_permanent_errors_at_once,
            consumer_survives_a_panicking_handler,
            consumer_renews_the_lock_of_a_slow_handler,
            consumer_holds_no_more_than_its_concurrency,
            consumer_shutdown_lets_in_flight_handlers_finish,
            consumer_shutdown_deadline_releases_unfinished_handlers,
            consumer_two_instances_handle_10000_messages,
            consumer_keeps_ordering_keys_in_order,
            consumer_skips_duplicates_with_an_idempotency_store,
            consumer_continues_the_publishers_trace,
        );
    };
}

fn spec(harness: &impl Harness) -> Spec {
    Spec {
        visibility: harness.features().unit * 10,
        max_deliveries: 10,
        ordered: false,
        replay: false,
    }
}

async fn open(harness: &impl Harness, spec: &Spec) -> (Entity, Box<dyn Publisher>) {
    let entity = harness
        .create(spec)
        .await
        .expect("harness creates entities");
    let publisher = entity.publisher().await.expect("connect publisher");
    (entity, publisher)
}

/// A consumer on the first subscriber with the suite's defaults (times in units, exact
/// retry delays), adjusted by `configure`.
pub(crate) async fn consumer(
    harness: &impl Harness,
    entity: &Entity,
    spec: &Spec,
    configure: impl FnOnce(ConsumerBuilder) -> ConsumerBuilder,
) -> Consumer {
    let unit = harness.features().unit;
    let subscriber = entity.subscriber(0).await.expect("connect consumer");
    let builder = Consumer::builder(subscriber)
        .receive_wait((unit * 5).min(Duration::from_secs(20)))
        .shutdown_timeout(unit * 20)
        .lock_renewal(LockRenewal::default().lock_duration(spec.visibility))
        .retry(
            RetryPolicy::exponential(unit)
                .cap(unit * 8)
                .max_attempts(5)
                .jitter(0.0),
        );
    configure(builder).build().expect("valid consumer options")
}

/// A consumer running in a task of its own.
struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Summary>,
}

fn start(consumer: Consumer, handler: impl Handler) -> Running {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(handler, shutdown.clone()));
    Running { shutdown, task }
}

impl Running {
    /// Requests shutdown and waits for the summary.
    async fn stop(self) -> Summary {
        self.shutdown.cancel();
        self.join().await
    }

    async fn join(self) -> Summary {
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the consumer returns after shutdown")
            .expect("the consumer task does not fail")
    }
}

/// Polls `done` until it holds, failing after `timeout`.
pub(crate) async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts `value` stays the same for `window`.
async fn stays_the_same<T: PartialEq + std::fmt::Debug>(
    what: &str,
    window: Duration,
    value: impl Fn() -> T,
) {
    let before = value();
    let deadline = Instant::now() + window;
    while Instant::now() < deadline {
        assert_eq!(value(), before, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Receives until `count` deliveries arrived or `timeout` passed; does not settle them.
async fn receive_n(subscriber: &dyn Subscriber, count: usize, timeout: Duration) -> Vec<Delivery> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let batch = subscriber
            .receive(
                (count - got.len()).min(10),
                left.min(Duration::from_secs(5)),
            )
            .await
            .expect("receive");
        got.extend(batch);
    }
    got
}

/// Asserts nothing is delivered during `window`.
async fn expect_nothing(subscriber: &dyn Subscriber, window: Duration, why: &str) {
    let got = receive_n(subscriber, 1, window).await;
    assert!(
        got.is_empty(),
        "{why}: got {:?}",
        got.iter()
            .map(|d| d.message().id.clone())
            .collect::<Vec<_>>()
    );
}

/// The one message that reaches the first dead-letter queue, with the subscriber it came
/// from: a delivery can be settled only while its subscriber is open (closing or dropping
/// it gives its deliveries back), so a case holds both until it has settled.
async fn dead_letter(entity: &Entity) -> (Box<dyn Subscriber>, Delivery) {
    let dead_letters = entity
        .dead_letters(0)
        .await
        .expect("connect to the dead-letter queue");
    let mut got = receive_n(dead_letters.as_ref(), 1, PATIENCE).await;
    assert_eq!(got.len(), 1, "a message must reach the dead-letter queue");
    (dead_letters, got.remove(0))
}

fn attribute<'a>(delivery: &'a Delivery, key: &str) -> &'a str {
    delivery
        .message()
        .attributes
        .get(key)
        .map(String::as_str)
        .unwrap_or_default()
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .expect("a test handler panicked while holding a lock")
}

/// A handler that fails twice then succeeds sees the message three times, and the second
/// delay (twice the base) is longer than the first (the base).
pub async fn consumer_retries_with_increasing_delays(harness: &impl Harness) {
    let unit = harness.features().unit;
    let base = unit * 2;
    let spec = spec(harness);
    let (entity, publisher) = open(harness, &spec).await;
    let consumer = consumer(harness, &entity, &spec, |b| {
        b.retry(
            RetryPolicy::exponential(base)
                .cap(base * 8)
                .max_attempts(5)
                .jitter(0.0),
        )
    })
    .await;
    let attempts = Arc::new(Mutex::new(Vec::<(u32, Instant)>::new()));
    let seen = attempts.clone();
    let running = start(consumer, move |_message: Message, context: Context| {
        let seen = seen.clone();
        async move {
            lock(&seen).push((context.delivery_count(), Instant::now()));
            if context.delivery_count() < 3 {
                return Err(HandlerError::transient("not yet"));
            }
            Ok(())
        }
    });
    publisher
        .publish(Message::new("fails twice"))
        .await
        .expect("publish");
    wait_until("three attempts", PATIENCE, || lock(&attempts).len() >= 3).await;
    let summary = running.stop().await;
    let attempts = lock(&attempts).clone();
    let counts: Vec<u32> = attempts.iter().map(|(count, _)| *count).collect();
    assert_eq!(counts, [1, 2, 3], "one message, three deliveries");
    let first_delay = attempts[1].1 - attempts[0].1;
    let second_delay = attempts[2].1 - attempts[1].1;
    eprintln!("delays between attempts: {first_delay:?}, {second_delay:?} (base {base:?})");
    assert!(
        first_delay >= base,
        "redelivered {first_delay:?} after the first failure, before the base delay {base:?}"
    );
    assert!(
        second_delay >= base * 2,
        "redelivered {second_delay:?} after the second failure, before twice the base"
    );
    assert!(
        second_delay > first_delay,
        "delays must increase: {first_delay:?} then {second_delay:?}"
    );
    assert_eq!(
        (summary.nacked, summary.acked, summary.dead_lettered),
        (2, 1, 0),
        "{summary:?}"
    );
}

/// A message whose handler always fails transiently is dead-lettered after max attempts,
/// with the reason and the error's text.
pub async fn consumer_dead_letters_after_max_attempts(harness: &impl Harness) {
    let unit = harness.features().unit;
    let spec = spec(harness);
    let (entity, publisher) = open(harness, &spec).await;
    let consumer = consumer(harness, &entity, &spec, |b| {
        b.retry(
            RetryPolicy::exponential(unit)
                .cap(unit * 2)
                .max_attempts(3)
                .jitter(0.0),
        )
    })
    .await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let running = start(consumer, move |_message: Message, _context: Context| {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            Err(std::io::Error::other("database unavailable"))?;
            Ok(())
        }
    });
    let id = publisher
        .publish(Message::new("poison"))
        .await
        .expect("publish");
    let (dead_letters, dead) = dead_letter(&entity).await;
    assert_eq!(dead.message().id, id);
    assert_eq!(attribute(&dead, DEAD_LETTER_REASON), RETRIES_EXHAUSTED);
    let description = attribute(&dead, DEAD_LETTER_DESCRIPTION);
    assert!(
        description.contains("database unavailable") && description.contains("attempt 3 of 3"),
        "the description names the error and the attempts: {description:?}"
    );
    dead.ack().await.expect("ack");
    dead_letters
        .close()
        .await
        .expect("close the dead-letter subscriber");
    let summary = running.stop().await;
    assert_eq!(calls.load(Ordering::SeqCst), 3, "exactly max attempts");
    assert_eq!(
        (summary.nacked, summary.dead_lettered, summary.acked),
        (2, 1, 0),
        "{summary:?}"
    );
}

#[derive(Debug, serde::Deserialize)]
struct Order {
    id: u64,
}

/// A body that does not deserialize is dead-lettered on its first delivery, without
/// calling the handler; a good one is handled.
pub async fn consumer_dead_letters_malformed_json_at_once(harness: &impl Harness) {
    let spec = spec(harness);
    let (entity, publisher) = open(harness, &spec).await;
    let consumer = consumer(harness, &entity, &spec, |b| b).await;
    let orders = Arc::new(Mutex::new(Vec::new()));
    let seen = orders.clone();
    let running = start(
        consumer,
        json(move |order: Order, _context: Context| {
            let seen = seen.clone();
            async move {
                lock(&seen).push(order.id);
                Ok(())
            }
        }),
    );
    let malformed = publisher
        .publish(Message::new("{\"id\": not json").with_content_type("application/json"))
        .await
        .expect("publish");
    let good = Message::from_json(&serde_json::json!({ "id": 7 })).expect("serialize");
    publisher.publish(good).await.expect("publish");
    let (dead_letters, dead) = dead_letter(&entity).await;
    assert_eq!(dead.message().id, malformed);
    assert_eq!(attribute(&dead, DEAD_LETTER_REASON), MALFORMED_BODY);
    assert!(
        attribute(&dead, DEAD_LETTER_DESCRIPTION).contains("JSON"),
        "the description carries the parse error: {:?}",
        attribute(&dead, DEAD_LETTER_DESCRIPTION)
    );
    dead.ack().await.expect("ack");
    dead_letters
        .close()
        .await
        .expect("close the dead-letter subscriber");
    wait_until("the good order", PATIENCE, || !lock(&orders).is_empty()).await;
    let summary = running.stop().await;
    assert_eq!(*lock(&orders), [7]);
    assert_eq!(
        summary.nacked, 0,
        "dead-lettered at once, never retried: {summary:?}"
    );
    assert_eq!(
        (summary.dead_lettered, summary.acked),
        (1, 1),
        "{summary:?}"
    );
}

/// A permanent error dead-letters at once with the handler's reason and text.
pub async fn consumer_dead_letters_permanent_errors_at_once(harness: &impl Harness) {
    let spec = spec(harness);
    let (entity, publisher) = open(harness, &spec).await;
    let consumer = consumer(harness, &entity, &spec, |b| b).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let running = start(consumer, move |_message: Message, _context: Context| {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            Err(HandlerError::permanent("order 17 has a negative total")
                .with_reason("InvalidOrder"))
        }
    });
    publisher
        .publish(Message::new("order 17"))
        .await
        .expect("publish");
    let (dead_letters, dead) = dead_letter(&entity).await;
    assert_eq!(attribute(&dead, DEAD_LETTER_REASON), "InvalidOrder");
    assert_eq!(
        attribute(&dead, DEAD_LETTER_DESCRIPTION),
        "order 17 has a negative total"
    );
    dead.ack().await.expect("ack");
    dead_letters
        .close()
        .await
        .expect("close the dead-letter subscriber");
    let summary = running.stop().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        (summary.dead_lettered, summary.nacked),
        (1, 0),
        "{summary:?}"
    );
}

/// A handler that panics does not stop the consumer: the message is redelivered and
/// handled, and later messages are handled too.
pub async fn consumer_survives_a_panicking_handler(harness: &impl Harness) {
    let spec = spec(harness);
    let (entity, publisher) = open(harness, &spec).await;
    let consumer = consumer(harness, &entity, &spec, |b| b).await;
    let handled = Arc::new(Mutex::new(Vec::<(String, u32)>::new()));
    let seen = handled.clone();
    let running = start(consumer, move |message: Message, context: Context| {
        let seen = seen.clone();
        async move {
            let text = message.text().unwrap_or_default().to_string();
            if text == "panic" && context.delivery_count() == 1 {
                panic!("a bug in the handler (expected by the test)");
            }
            lock(&seen).push((text, context.delivery_count()));
            Ok(())
        }
    });
    publisher
        .publish(Message::new("panic"))
        .await
        .expect("publish");
    wait_until("the redelivery after the panic", PATIENCE, || {
        !lock(&handled).is_empty()
    })
    .await;
    publisher
        .publish(Message::new("after"))
        .await
        .expect("publish");
    wait_until("a message after the panic", PATIENCE, || {
        lock(&handled).len() >= 2
    })
    .await;
    let summary = running.stop().await;
    assert_eq!(
        *lock(&handled),
        [("panic".to_string(), 2), ("after".to_string(), 1)]
    );
    assert_eq!(
        (summary.panicked, summary.nacked, summary.acked),
        (1, 1, 2),
        "{summary:?}"
    );
}

/// A handler that runs longer than the lock keeps its message: a second consumer does
/// not get it meanwhile, and the ack at the end succeeds.
pub async fn consumer_renews_the_lock_of_a_slow_handler(harness: &impl Harness) {
    let unit = harness.features().unit;
    let spec = Spec {
        visibility: unit * 3,
        ..spec(harness)
    };
    let (entity, publisher) = open(harness, &spec).await;
    let consumer = consumer(harness, &entity, &spec, |b| b).await;
    let started = Arc::new(AtomicUsize::new(0));
    let finish = CancellationToken::new();
    let (counted, gate) = (started.clone(), finish.clone());
    let running = start(consumer, move |_message: Message, _context: Context| {
        let (counted, gate) = (counted.clone(), gate.clone());
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            gate.cancelled().await;
            Ok(())
        }
    });
    publisher
        .publish(Message::new("slow"))
        .await
        .expect("publish");
    wait_until("the handler to start", PATIENCE, || {
        started.load(Ordering::SeqCst) == 1
    })
    .await;
    let started_at = Instant::now();
    // Another consumer, or (where members share partitions, and another would take over
    // some) this one's own handler, must not see the message again while it runs.
    let other = match harness.features().competing_subscribers {
        Support::Yes => Some(
            entity
                .subscriber(0)
                .await
                .expect("connect a second consumer"),
        ),
        Support::No(_) => None,
    };
    match &other {
        Some(other) => {
            expect_nothing(
                other.as_ref(),
                spec.visibility * 3,
                "redelivered to a second consumer while the handler was running",
            )
            .await
        }
        None => {
            stays_the_same(
                "redelivered to the handler while it was running",
                spec.visibility * 3,
                || started.load(Ordering::SeqCst),
            )
            .await
        }
    }
    assert!(
        started_at.elapsed() > spec.visibility * 2,
        "outlived the lock"
    );
    finish.cancel();
    let summary = running.stop().await;
    assert_eq!(started.load(Ordering::SeqCst), 1, "handled once");
    assert_eq!(
        (summary.acked, summary.settle_failed),
        (1, 0),
        "the ack succeeds: {summary:?}"
    );
    if let Some(other) = &other {
        expect_nothing(other.as_ref(), unit * 2, "an acked message came back").await;
    }
}

/// The consumer holds at most `concurrency` messages: the rest stay available to others.
pub async fn consumer_holds_no_more_than_its_concurrency(harness: &impl Harness) {
    let spec = spec(harness);
    let (entity, publisher) = open(harness, &spec).await;
    let consumer = consumer(harness, &entity, &spec, |b| b.concurrency(2)).await;
    let started = Arc::new(AtomicUsize::new(0));
    let finish = CancellationToken::new();
    let (counted, gate) = (started.clone(), finish.clone());
    let running = start(consumer, move |_message: Message, _context: Context| {
        let (counted, gate) = (counted.clone(), gate.clone());
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            gate.cancelled().await;
            Ok(())
        }
    });
    let messages: Vec<Message> = (0..10).map(|i| Message::new(format!("m{i}"))).collect();
    for outcome in publisher.publish_batch(messages).await {
        outcome.expect("publish");
    }
    wait_until("two handlers to start", PATIENCE, || {
        started.load(Ordering::SeqCst) == 2
    })
    .await;
    match harness.features().competing_subscribers {
        Support::Yes => {
            let other = entity.subscriber(0).await.expect("connect");
            let rest = receive_n(other.as_ref(), 8, PATIENCE).await;
            assert_eq!(
                rest.len(),
                8,
                "the consumer must leave the other 8 messages in the queue"
            );
            for delivery in rest {
                delivery.ack().await.expect("ack");
            }
        }
        Support::No(reason) => eprintln!(
            "declared: subscribers do not compete message by message ({reason}): not \
             checking that another subscriber gets the other 8"
        ),
    }
    assert_eq!(started.load(Ordering::SeqCst), 2);
    finish.cancel();
    let summary = running.stop().await;
    match harness.features().competing_subscribers {
        Support::Yes => assert_eq!((summary.received, summary.acked), (2, 2), "{summary:?}"),
        // The other 8 are still this consumer's: it may handle some once the gate opens.
        Support::No(_) => assert!(
            summary.received >= 2 && summary.acked + summary.released == summary.received,
            "{summary:?}"
        ),
    }
}

/// Shutdown while 16 handlers run: all finish and are acked, the run returns within its
/// deadline, and after a restart nothing comes back and nothing is missing.
pub async fn consumer_shutdown_lets_in_flight_handlers_finish(harness: &impl Harness) {
    const IN_FLIGHT: usize = 16;
    const WAITING: usize = 8;
    let unit = harness.features().unit;
    let deadline = unit * 20;
    let spec = spec(harness);
    let (entity, publisher) = open(harness, &spec).await;
    let messages: Vec<Message> = (0..IN_FLIGHT + WAITING)
        .map(|i| Message::new(format!("m{i}")))
        .collect();
    let sent: HashSet<String> = messages.iter().map(|m| m.id.clone()).collect();
    for outcome in publisher.publish_batch(messages).await {
        outcome.expect("publish");
    }

    let first = consumer(harness, &entity, &spec, |b| {
        b.concurrency(IN_FLIGHT).shutdown_timeout(deadline)
    })
    .await;
    let started = Arc::new(Mutex::new(HashSet::<String>::new()));
    let finished = Arc::new(AtomicUsize::new(0));
    let finish = CancellationToken::new();
    let (seen, done, gate) = (started.clone(), finished.clone(), finish.clone());
    let running = start(first, move |message: Message, _context: Context| {
        let (seen, done, gate) = (seen.clone(), done.clone(), gate.clone());
        async move {
            lock(&seen).insert(message.id);
            gate.cancelled().await;
            done.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    wait_until("16 handlers in flight", PATIENCE, || {
        lock(&started).len() == IN_FLIGHT
    })
    .await;
    let shutdown_at = Instant::now();
    running.shutdown.cancel();
    finish.cancel();
    let summary = running.join().await;
    let took = shutdown_at.elapsed();
    assert!(
        took < deadline,
        "returned {took:?} after shutdown, deadline {deadline:?}"
    );
    assert_eq!(
        finished.load(Ordering::SeqCst),
        IN_FLIGHT,
        "every handler finished"
    );
    assert_eq!(
        (
            summary.acked,
            summary.received,
            summary.timed_out,
            summary.settle_failed
        ),
        (IN_FLIGHT as u64, IN_FLIGHT as u64, 0, 0),
        "{summary:?}"
    );

    // Restart: exactly the messages never started arrive, each for the first time.
    let second = consumer(harness, &entity, &spec, |b| b).await;
    let after = Arc::new(Mutex::new(Vec::<(String, u32)>::new()));
    let seen = after.clone();
    let running = start(second, move |message: Message, context: Context| {
        let seen = seen.clone();
        async move {
            lock(&seen).push((message.id, context.delivery_count()));
            Ok(())
        }
    });
    wait_until("the waiting messages after restart", PATIENCE, || {
        lock(&after).len() >= WAITING
    })
    .await;
    stays_the_same(
        "a message handled before shutdown came back",
        spec.visibility + unit * 2,
        || lock(&after).len(),
    )
    .await;
    let summary = running.stop().await;
    let after = lock(&after).clone();
    let started = lock(&started).clone();
    let raised = harness.features().close_may_raise_counts;
    if raised {
        eprintln!(
            "declared: a message on its way to the closed subscriber may come back with a \
             raised count; checking only that none of them was handled before"
        );
    }
    assert!(
        after
            .iter()
            .all(|(id, count)| (raised || *count == 1) && !started.contains(id)),
        "after restart only messages never delivered before may arrive: {after:?}"
    );
    let all: HashSet<String> = started
        .into_iter()
        .chain(after.into_iter().map(|(id, _)| id))
        .collect();
    assert_eq!(all, sent, "every message was handled, none lost");
    assert_eq!(summary.acked, WAITING as u64, "{summary:?}");
}

/// A handler still running at the shutdown deadline is stopped; the run returns at the
/// deadline and the message is released for another consumer at once (well before its
/// lock would expire).
pub async fn consumer_shutdown_deadline_releases_unfinished_handlers(harness: &impl Harness) {
    let unit = harness.features().unit;
    let deadline = unit * 2;
    let spec = spec(harness);
    let (entity, publisher) = open(harness, &spec).await;
    let consumer = consumer(harness, &entity, &spec, |b| b.shutdown_timeout(deadline)).await;
    let started = Arc::new(AtomicUsize::new(0));
    let counted = started.clone();
    let running = start(consumer, move |_message: Message, _context: Context| {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
            Ok(())
        }
    });
    let id = publisher
        .publish(Message::new("stuck"))
        .await
        .expect("publish");
    wait_until("the handler to start", PATIENCE, || {
        started.load(Ordering::SeqCst) == 1
    })
    .await;
    let shutdown_at = Instant::now();
    let summary = running.stop().await;
    let took = shutdown_at.elapsed();
    assert!(
        took >= deadline,
        "returned after {took:?}, before the deadline {deadline:?}"
    );
    assert!(
        took < deadline + unit * 3,
        "returned {took:?} after shutdown, deadline {deadline:?}"
    );
    assert_eq!((summary.timed_out, summary.acked), (1, 0), "{summary:?}");
    if let Support::No(reason) = harness.features().competing_subscribers {
        eprintln!(
            "declared: subscribers do not compete message by message ({reason}): the released \
             message goes to whichever member holds its partition; not checking another one"
        );
        return;
    }
    let other = entity.subscriber(0).await.expect("connect");
    let got = receive_n(other.as_ref(), 1, spec.visibility / 2).await;
    assert_eq!(
        got.len(),
        1,
        "the stopped handler's message must be released at once"
    );
    assert_eq!(got[0].message().id, id);
    assert_eq!(got[0].delivery_count(), 2);
    for delivery in got {
        delivery.ack().await.expect("ack");
    }
}

/// 10,000 messages, two consumers with concurrency 16 each: every message is handled;
/// duplicates are counted (and there are none on the in-memory transport).
pub async fn consumer_two_instances_handle_10000_messages(harness: &impl Harness) {
    const COUNT: usize = 10_000;
    let spec = spec(harness);
    let (entity, publisher) = open(harness, &spec).await;
    let seen = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let mut running = Vec::new();
    let per_instance: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::default()).collect();
    for calls in &per_instance {
        let consumer = consumer(harness, &entity, &spec, |b| b.concurrency(16)).await;
        let (seen, calls) = (seen.clone(), calls.clone());
        running.push(start(
            consumer,
            move |message: Message, _context: Context| {
                let (seen, calls) = (seen.clone(), calls.clone());
                async move {
                    *lock(&seen).entry(message.id).or_default() += 1;
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            },
        ));
    }
    let messages: Vec<Message> = (0..COUNT).map(|i| Message::new(format!("m{i}"))).collect();
    let sent: HashSet<String> = messages.iter().map(|m| m.id.clone()).collect();
    for chunk in messages.chunks(100) {
        for outcome in publisher.publish_batch(chunk.to_vec()).await {
            outcome.expect("publish");
        }
    }
    wait_until("every message handled", PATIENCE * 5, || {
        lock(&seen).len() >= COUNT
    })
    .await;
    let mut summaries = Vec::new();
    for consumer in running {
        summaries.push(consumer.stop().await);
    }
    let seen = lock(&seen).clone();
    let ids: HashSet<String> = seen.keys().cloned().collect();
    assert_eq!(ids, sent, "every message handled, and only those");
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    let calls: Vec<usize> = per_instance
        .iter()
        .map(|c| c.load(Ordering::SeqCst))
        .collect();
    eprintln!("10,000 messages: handled per instance {calls:?}, duplicates {duplicates}");
    assert!(
        calls.iter().all(|&n| n > 0),
        "both instances take part: {calls:?}"
    );
    let acked: u64 = summaries.iter().map(|s| s.acked).sum();
    assert_eq!(acked as usize, COUNT + duplicates, "{summaries:?}");
    if !harness.features().spurious_redeliveries {
        assert_eq!(
            duplicates, 0,
            "nothing failed and the harness declares no spurious redeliveries"
        );
    }
}

/// Messages with the same ordering key are handled one at a time and in order, also when
/// one of them fails and is retried.
pub async fn consumer_keeps_ordering_keys_in_order(harness: &impl Harness) {
    const KEYS: usize = 4;
    const PER_KEY: usize = 10;
    let unit = harness.features().unit;
    if let Support::No(reason) = harness.features().ordering {
        // Nothing to consume in order: the transport must refuse the key at publish.
        let (_entity, publisher) = open(harness, &spec(harness)).await;
        let keyed = Message::new("keyed").with_ordering_key("key-0");
        super::assert_refused(publisher.publish(keyed).await, "ordering keys", reason);
        return;
    }
    let spec = Spec {
        ordered: true,
        ..spec(harness)
    };
    let (entity, publisher) = open(harness, &spec).await;
    for i in 0..PER_KEY {
        for k in 0..KEYS {
            let message = Message::new(format!("{k}:{i}"))
                .with_ordering_key(format!("key-{k}"))
                .with_attribute("seq", i.to_string());
            publisher.publish(message).await.expect("publish");
        }
    }
    let consumer = consumer(harness, &entity, &spec, |b| b.concurrency(8)).await;
    let order = Arc::new(Mutex::new(BTreeMap::<String, Vec<usize>>::new()));
    let active = Arc::new(Mutex::new(HashSet::<String>::new()));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let (seen, busy, overlapped) = (order.clone(), active.clone(), overlaps.clone());
    let running = start(consumer, move |message: Message, context: Context| {
        let (seen, busy, overlapped) = (seen.clone(), busy.clone(), overlapped.clone());
        async move {
            let key = message.ordering_key.clone().unwrap_or_default();
            let seq: usize = message.attributes["seq"].parse().unwrap_or(usize::MAX);
            if !lock(&busy).insert(key.clone()) {
                overlapped.fetch_add(1, Ordering::SeqCst);
            }
            // Work that takes a moment, so that overlapping handlers would show.
            tokio::time::sleep(unit / 20).await;
            let fail = key == "key-1" && seq == 3 && context.delivery_count() == 1;
            if !fail {
                lock(&seen).entry(key.clone()).or_default().push(seq);
            }
            lock(&busy).remove(&key);
            if fail {
                return Err(HandlerError::transient("fails once, on purpose"));
            }
            Ok(())
        }
    });
    wait_until("every ordered message", PATIENCE, || {
        lock(&order).values().map(Vec::len).sum::<usize>() >= KEYS * PER_KEY
    })
    .await;
    let summary = running.stop().await;
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two messages of one key ran at once"
    );
    for (key, seqs) in lock(&order).iter() {
        assert_eq!(
            *seqs,
            (0..PER_KEY).collect::<Vec<_>>(),
            "order within {key}"
        );
    }
    assert_eq!(summary.acked, (KEYS * PER_KEY) as u64, "{summary:?}");
}

/// Two messages with the same id: an idempotent handler processes the id once, and both
/// deliveries are acked.
pub async fn consumer_skips_duplicates_with_an_idempotency_store(harness: &impl Harness) {
    let spec = spec(harness);
    let (entity, publisher) = open(harness, &spec).await;
    let consumer = consumer(harness, &entity, &spec, |b| b.concurrency(1)).await;
    let processed = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = processed.clone();
    let inner = move |_message: Message, _context: Context| {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    };
    let store = Arc::new(MemoryIdempotencyStore::new(Duration::from_secs(600), 1_000));
    let idempotent = Arc::new(Idempotent::new(inner, store));
    let outer = calls.clone();
    let running = start(consumer, move |message: Message, context: Context| {
        let (idempotent, outer) = (idempotent.clone(), outer.clone());
        async move {
            let outcome = idempotent.handle(message, context).await;
            outer.fetch_add(1, Ordering::SeqCst);
            outcome
        }
    });
    let id = format!("order-{}", cloudbus_core::message::new_id());
    for text in ["first", "duplicate"] {
        // A distinct deduplication id, so that a FIFO queue delivers both: the duplicate
        // is the consumer's to catch here. A transport without deduplication ids (standard
        // SQS queues and SNS topics) must refuse one; it then does not deduplicate by id
        // either, so the message goes without.
        let message = Message::new(text).with_id(id.clone());
        let deduplicated = message
            .clone()
            .with_deduplication_id(format!("{id}-{text}"));
        match publisher.publish(deduplicated).await {
            Ok(_) => {}
            Err(crate::Error::Unsupported { feature, .. }) => {
                eprintln!("no deduplication ids ({feature}): publishing the duplicate without");
                publisher.publish(message).await.expect("publish");
            }
            Err(error) => panic!("publish: {error:?}"),
        }
    }
    wait_until("both deliveries", PATIENCE, || {
        calls.load(Ordering::SeqCst) >= 2
    })
    .await;
    let summary = running.stop().await;
    assert_eq!(
        processed.load(Ordering::SeqCst),
        1,
        "the id is processed once"
    );
    assert_eq!(summary.acked, 2, "the duplicate is acked too: {summary:?}");
}

/// A trace started at publish is the parent of the consumer's `process` span: the
/// `traceparent` attribute carries it across the transport.
pub async fn consumer_continues_the_publishers_trace(harness: &impl Harness) {
    let spec = spec(harness);
    let (entity, publisher) = open(harness, &spec).await;
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("cloudbus-testkit"));
    let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));
    // `tracing` caches per callsite whether any subscriber is interested. While only one
    // dispatcher is registered, a callsite first reached on another test's thread (whose
    // default is no subscriber) is cached as "never", and the spans of this case would
    // vanish. With a second dispatcher registered, every callsite asks all of them, so
    // this case's subscriber is always consulted; the rebuild covers callsites cached
    // before. (An application sets its subscriber once at start and never meets this.)
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    tracing::callsite::rebuild_interest_cache();

    let publisher = TracingPublisher::new(publisher);
    let (trace_id, id) = async {
        let root = tracing::info_span!("checkout");
        let trace_id = root.context().span().span_context().trace_id();
        let id = publisher
            .publish(Message::new("traced"))
            .instrument(root)
            .await
            .expect("publish");
        (trace_id, id)
    }
    .with_subscriber(dispatch.clone())
    .await;

    let consumer = consumer(harness, &entity, &spec, |b| b).await;
    let handler_traces = Arc::new(Mutex::new(Vec::new()));
    let seen = handler_traces.clone();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(
        consumer
            .run(
                move |_message: Message, _context: Context| {
                    let seen = seen.clone();
                    async move {
                        let current = tracing::Span::current().context();
                        lock(&seen).push(current.span().span_context().trace_id());
                        Ok(())
                    }
                },
                shutdown.clone(),
            )
            .with_subscriber(dispatch),
    );
    wait_until("the traced message", PATIENCE, || {
        !lock(&handler_traces).is_empty()
    })
    .await;
    shutdown.cancel();
    let summary = tokio::time::timeout(PATIENCE, task)
        .await
        .expect("the consumer returns")
        .expect("the consumer task");
    assert_eq!(summary.acked, 1, "{summary:?}");
    assert_eq!(
        *lock(&handler_traces),
        [trace_id],
        "the handler runs in the publisher's trace"
    );

    let spans = exporter.get_finished_spans().expect("finished spans");
    let find = |what: &str, test: &dyn Fn(&SpanData) -> bool| -> SpanData {
        spans
            .iter()
            .find(|s| test(s))
            .cloned()
            .unwrap_or_else(|| panic!("no {what} span among {:?}", names(&spans)))
    };
    let root = find("checkout", &|s| s.name == "checkout");
    let send = find("send", &|s| {
        s.name.starts_with("send ") && s.parent_span_id == root.span_context.span_id()
    });
    let process = find("process", &|s| {
        s.name.starts_with("process ") && value(s, "messaging.message.id").as_deref() == Some(&id)
    });
    assert_eq!(send.span_kind, SpanKind::Producer);
    assert_eq!(process.span_kind, SpanKind::Consumer);
    assert_eq!(
        process.span_context.trace_id(),
        trace_id,
        "one trace across the queue"
    );
    assert_eq!(
        process.parent_span_id,
        send.span_context.span_id(),
        "the process span's parent is the publisher's send span"
    );
    assert!(process.parent_span_is_remote);
    assert_eq!(
        value(&process, "messaging.operation.type").as_deref(),
        Some("process")
    );
    // The consumer names what its subscriber reports.
    let destination = entity.subscriber(0).await.expect("connect").destination();
    assert_eq!(
        value(&process, "messaging.system").as_deref(),
        Some(destination.system())
    );
    assert_eq!(
        value(&process, "messaging.destination.name").as_deref(),
        Some(destination.name())
    );
    assert_eq!(
        value(&process, "messaging.destination.subscription.name").as_deref(),
        destination.subscription()
    );
    assert_eq!(
        value(&process, "cloudbus.settlement").as_deref(),
        Some("ack")
    );
}

fn value(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

fn names(spans: &[SpanData]) -> Vec<String> {
    spans.iter().map(|s| s.name.to_string()).collect()
}
