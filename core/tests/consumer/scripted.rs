//! The consumer over a scripted subscriber: receive failures, a closed subscriber, a batch
//! with several messages of one ordering key, a transport that returns too many
//! messages, lock renewal where the transport does not report lock expiry, and a receive
//! call still in progress at shutdown (an SQS long poll). These are the situations the
//! in-memory broker never produces; the generic suite
//! (the consumer suite of `cloudbus-testkit`) covers the rest on real transports.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use cloudbus_core::consumer::{
    CancellationToken, Consumer, ConsumerBuilder, Context, HandlerError, LockRenewal, RetryPolicy,
    StopReason, Summary,
};
use cloudbus_core::driver::{DeliveryInfo, Settle};
use cloudbus_core::{Delivery, Destination, Error, Message, Result, Subscriber};

const PATIENCE: Duration = Duration::from_secs(30);

/// What the scripted subscriber does on each receive call, in order; when the script is
/// done it returns nothing at once (the worst case for spinning).
enum Step {
    Fail(Error),
    Deliver(Vec<Message>),
    /// A long poll: returns the messages once the token is cancelled.
    Poll(CancellationToken, Vec<Message>),
    Close,
}

/// What happened to a delivery.
#[derive(Debug, Clone, PartialEq)]
enum Settled {
    Ack,
    Nack(Duration),
    DeadLetter(String),
}

#[derive(Default)]
struct Log {
    /// Each receive call: when, and how many messages it asked for.
    receives: Vec<(Instant, usize)>,
    /// Each settlement, by message text.
    settled: Vec<(String, Settled)>,
    /// Lock extensions.
    extends: usize,
    /// Long polls ([`Step::Poll`]) that returned.
    polls_ended: usize,
    /// Receive calls in progress now, and the most at once.
    in_flight: usize,
    most_in_flight: usize,
}

struct Scripted {
    script: Mutex<VecDeque<Step>>,
    log: Arc<Mutex<Log>>,
    /// What [`Subscriber::concurrent_receives`] reports.
    concurrent: usize,
    /// What [`Subscriber::receive_batch`] reports; `None`: the trait's default.
    batch: Option<usize>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().expect("lock")
}

impl Scripted {
    fn deliveries(&self, messages: Vec<Message>) -> Vec<Delivery> {
        messages
            .into_iter()
            .map(|message| {
                let settle = ScriptedSettle {
                    text: message.text().unwrap_or_default().to_string(),
                    log: self.log.clone(),
                };
                let info = DeliveryInfo {
                    delivery_count: 1,
                    enqueued_at: SystemTime::now(),
                    transport_id: message.id.clone(),
                    locked_until: None,
                };
                Delivery::new(message, info, Box::new(settle))
            })
            .collect()
    }

    fn new(steps: Vec<Step>) -> (Arc<Scripted>, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let subscriber = Scripted {
            script: Mutex::new(steps.into()),
            log: log.clone(),
            concurrent: 1,
            batch: None,
        };
        (Arc::new(subscriber), log)
    }

    /// Like [`Scripted::new`], reporting `concurrent` concurrent receives (like SQS).
    fn concurrent(steps: Vec<Step>, concurrent: usize) -> (Arc<Scripted>, Arc<Mutex<Log>>) {
        let (subscriber, log) = Scripted::new(steps);
        let subscriber = Scripted {
            script: Mutex::new(std::mem::take(&mut *lock(&subscriber.script))),
            log: log.clone(),
            concurrent,
            batch: None,
        };
        (Arc::new(subscriber), log)
    }
}

/// Counts a receive call in progress while it lives.
struct InFlight(Arc<Mutex<Log>>);

impl InFlight {
    fn enter(log: &Arc<Mutex<Log>>) -> InFlight {
        let mut entry = lock(log);
        entry.in_flight += 1;
        entry.most_in_flight = entry.most_in_flight.max(entry.in_flight);
        InFlight(log.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.0).in_flight -= 1;
    }
}

#[async_trait]
impl Subscriber for Scripted {
    async fn receive(&self, max: usize, _wait: Duration) -> Result<Vec<Delivery>> {
        lock(&self.log).receives.push((Instant::now(), max));
        let _in_flight = InFlight::enter(&self.log);
        let step = lock(&self.script).pop_front();
        match step {
            None => Ok(Vec::new()),
            Some(Step::Fail(error)) => Err(error),
            Some(Step::Close) => Err(Error::Closed {
                transport: "scripted",
                what: "subscriber",
            }),
            Some(Step::Deliver(messages)) => Ok(self.deliveries(messages)),
            Some(Step::Poll(arrived, messages)) => {
                arrived.cancelled().await;
                let deliveries = self.deliveries(messages);
                lock(&self.log).polls_ended += 1;
                Ok(deliveries)
            }
        }
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }

    fn concurrent_receives(&self) -> usize {
        self.concurrent
    }

    fn receive_batch(&self) -> usize {
        self.batch.unwrap_or(10)
    }

    fn destination(&self) -> Destination {
        Destination::new("scripted", "script")
    }
}

struct ScriptedSettle {
    text: String,
    log: Arc<Mutex<Log>>,
}

impl ScriptedSettle {
    fn record(&self, settled: Settled) {
        lock(&self.log).settled.push((self.text.clone(), settled));
    }
}

#[async_trait]
impl Settle for ScriptedSettle {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.record(Settled::Ack);
        Ok(())
    }

    async fn nack(self: Box<Self>, delay: Duration) -> Result<()> {
        self.record(Settled::Nack(delay));
        Ok(())
    }

    async fn dead_letter(self: Box<Self>, reason: &str, _description: &str) -> Result<()> {
        self.record(Settled::DeadLetter(reason.to_string()));
        Ok(())
    }

    async fn extend(&mut self, by: Duration) -> Result<SystemTime> {
        lock(&self.log).extends += 1;
        Ok(SystemTime::now() + by)
    }
}

fn builder(subscriber: Arc<Scripted>) -> ConsumerBuilder {
    let subscriber: Arc<dyn Subscriber> = subscriber;
    Consumer::builder(subscriber)
        .receive_wait(Duration::from_millis(50))
        .receive_backoff(Duration::from_millis(20), Duration::from_millis(80))
        .shutdown_timeout(Duration::from_secs(5))
        .retry(RetryPolicy::exponential(Duration::from_secs(1)).jitter(0.0))
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn texts(texts: &[&str]) -> Vec<Message> {
    texts.iter().map(|t| Message::new(t.to_string())).collect()
}

async fn ok(_message: Message, _context: Context) -> Result<(), HandlerError> {
    Ok(())
}

async fn stop(shutdown: CancellationToken, task: tokio::task::JoinHandle<Summary>) -> Summary {
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("returns")
        .expect("consumer task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_errors_back_off_and_the_consumer_goes_on() {
    let transient = || Error::transport("scripted", "throttled", true, None);
    let not_found = || Error::NotFound {
        transport: "scripted",
        entity: "queue",
        name: "orders".into(),
    };
    let (subscriber, log) = Scripted::new(vec![
        Step::Fail(transient()),
        Step::Fail(transient()),
        Step::Fail(transient()),
        Step::Fail(not_found()),
        Step::Fail(not_found()),
        Step::Deliver(texts(&["after the outage"])),
    ]);
    let consumer = builder(subscriber).build().expect("consumer");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(ok, shutdown.clone()));
    wait_until("the message after the errors", || {
        !lock(&log).settled.is_empty()
    })
    .await;
    let summary = stop(shutdown, task).await;
    assert_eq!(
        (summary.receive_errors, summary.acked),
        (5, 1),
        "{summary:?}"
    );
    let receives = lock(&log).receives.clone();
    for pair in receives[..6].windows(2) {
        let pause = pair[1].0 - pair[0].0;
        assert!(
            pause >= Duration::from_millis(18),
            "the consumer retried a failed receive after only {pause:?}"
        );
    }
    // Backoff doubles: the fourth pause is longer than the first.
    let pause = |i: usize| receives[i + 1].0 - receives[i].0;
    assert!(pause(3) > pause(0), "{:?} then {:?}", pause(0), pause(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_receives_that_return_at_once_do_not_spin() {
    let (subscriber, log) = Scripted::new(Vec::new());
    let consumer = builder(subscriber).build().expect("consumer");
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(consumer.run(ok, shutdown.clone()));
    wait_until("a few receive calls", || lock(&log).receives.len() >= 4).await;
    let summary = stop(shutdown, task).await;
    let calls = lock(&log).receives.len();
    let elapsed = started.elapsed();
    // The consumer pauses 50 ms after an empty receive that returned at once.
    let most = (elapsed.as_millis() / 50) as usize + 1;
    assert!(calls <= most, "{calls} receive calls in {elapsed:?}");
    assert_eq!(summary.received, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_receives_run_while_messages_flow_and_one_when_idle() {
    let tokens = |n: usize| (0..n).map(|_| CancellationToken::new()).collect::<Vec<_>>();
    let (full, empty, idle) = (tokens(3), tokens(4), tokens(2));
    let mut steps = vec![Step::Deliver(texts(&["first"]))];
    for (i, poll) in full.iter().enumerate() {
        steps.push(Step::Poll(poll.clone(), texts(&[&format!("poll {i}")])));
    }
    for poll in empty.iter().chain(&idle) {
        steps.push(Step::Poll(poll.clone(), Vec::new()));
    }
    let (subscriber, log) = Scripted::concurrent(steps, 8);
    // 40 slots: 4 receivers by default.
    let consumer = builder(subscriber)
        .concurrency(40)
        .build()
        .expect("consumer");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(ok, shutdown.clone()));
    // After a receive that returned messages, four long polls run at once.
    wait_until("four receive calls at once", || lock(&log).in_flight == 4).await;
    full.iter().for_each(CancellationToken::cancel);
    wait_until("every message", || lock(&log).settled.len() == 4).await;
    wait_until("the empty polls", || lock(&log).in_flight == 4).await;
    // They return nothing: from then on, one call at a time.
    empty.iter().for_each(CancellationToken::cancel);
    let first_idle = 1 + full.len() + empty.len();
    wait_until("an idle poll", || {
        lock(&log).receives.len() == first_idle + 1
    })
    .await;
    // Give the consumer the chance to start a second one before checking it did not.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(lock(&log).receives.len(), first_idle + 1);
    assert_eq!(lock(&log).in_flight, 1, "idle polls overlapped");
    idle.iter().for_each(CancellationToken::cancel);
    let summary = stop(shutdown, task).await;
    assert_eq!(summary.acked, 4, "{summary:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receives_never_exceed_what_the_subscriber_allows() {
    let polls: Vec<CancellationToken> = (0..4).map(|_| CancellationToken::new()).collect();
    let mut steps = vec![Step::Deliver(texts(&["first"]))];
    for poll in &polls {
        steps.push(Step::Poll(poll.clone(), Vec::new()));
    }
    let (subscriber, log) = Scripted::concurrent(steps, 2);
    let consumer = builder(subscriber)
        .concurrency(80)
        .build()
        .expect("consumer");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(ok, shutdown.clone()));
    wait_until("two receive calls at once", || lock(&log).in_flight == 2).await;
    // Give the consumer the chance to overstep before checking it did not.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(lock(&log).most_in_flight, 2);
    for poll in &polls {
        poll.cancel();
    }
    stop(shutdown, task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_subscriber_ends_the_run() {
    let (subscriber, _log) = Scripted::new(vec![Step::Deliver(texts(&["last"])), Step::Close]);
    let consumer = builder(subscriber).build().expect("consumer");
    let summary = tokio::time::timeout(PATIENCE, consumer.run(ok, CancellationToken::new()))
        .await
        .expect("the run ends by itself");
    assert_eq!(summary.stopped, StopReason::SubscriberClosed);
    assert_eq!(
        summary.acked, 1,
        "in-flight work is finished first: {summary:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_at_a_time_in_order_and_a_retry_releases_the_rest() {
    let keyed = |text: &str, key: &str| Message::new(text.to_string()).with_ordering_key(key);
    let (subscriber, log) = Scripted::new(vec![Step::Deliver(vec![
        keyed("a1", "a"),
        keyed("a2", "a"),
        keyed("b1", "b"),
        keyed("a3", "a"),
        keyed("a4", "a"),
        keyed("b2", "b"),
    ])]);
    let consumer = builder(subscriber)
        .concurrency(8)
        .build()
        .expect("consumer");
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let running = Arc::new(Mutex::new(Vec::<String>::new()));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let (seen, busy, overlapped) = (events.clone(), running.clone(), overlaps.clone());
    let handler = move |message: Message, _context: Context| {
        let (seen, busy, overlapped) = (seen.clone(), busy.clone(), overlapped.clone());
        async move {
            let text = message.text().unwrap_or_default().to_string();
            let key = message.ordering_key.clone().unwrap_or_default();
            {
                let mut busy = lock(&busy);
                if busy.contains(&key) {
                    overlapped.fetch_add(1, Ordering::SeqCst);
                }
                busy.push(key.clone());
            }
            lock(&seen).push(format!("start {text}"));
            tokio::time::sleep(Duration::from_millis(20)).await;
            lock(&seen).push(format!("end {text}"));
            lock(&busy).retain(|k| *k != key);
            if text == "a2" {
                return Err(HandlerError::transient("a2 fails"));
            }
            Ok(())
        }
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(handler, shutdown.clone()));
    wait_until("every message settled", || lock(&log).settled.len() == 6).await;
    let summary = stop(shutdown, task).await;
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two messages of one key ran at once"
    );
    let events = lock(&events).clone();
    let position = |event: &str| {
        events
            .iter()
            .position(|e| e == event)
            .unwrap_or_else(|| panic!("no `{event}` in {events:?}"))
    };
    assert!(position("end a1") < position("start a2"), "{events:?}");
    assert!(position("end b1") < position("start b2"), "{events:?}");
    assert!(
        !events
            .iter()
            .any(|e| e.ends_with("a3") || e.ends_with("a4")),
        "messages behind a retried one must not run: {events:?}"
    );
    let settled = lock(&log).settled.clone();
    let of = |text: &str| {
        settled
            .iter()
            .find(|(t, _)| t == text)
            .map(|(_, s)| s.clone())
    };
    assert_eq!(of("a1"), Some(Settled::Ack));
    assert_eq!(of("a2"), Some(Settled::Nack(Duration::from_secs(1))));
    // Released hidden as long as the retried a2, so that they cannot come back before it.
    assert_eq!(of("a3"), Some(Settled::Nack(Duration::from_secs(1))));
    assert_eq!(of("a4"), Some(Settled::Nack(Duration::from_secs(1))));
    assert_eq!(of("b2"), Some(Settled::Ack));
    assert_eq!(
        (summary.acked, summary.nacked, summary.released),
        (3, 1, 2),
        "{summary:?}"
    );
}

/// The first receive call of a consumer with 80 free slots asks for the subscriber's
/// `receive_batch`: 10 by default, more where the subscriber says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_asks_for_the_subscribers_batch() {
    for (batch, expected) in [(None, 10), (Some(50), 50)] {
        let log = Arc::new(Mutex::new(Log::default()));
        let subscriber = Arc::new(Scripted {
            script: Mutex::new(VecDeque::new()),
            log: log.clone(),
            concurrent: 1,
            batch,
        });
        let consumer = builder(subscriber)
            .concurrency(80)
            .build()
            .expect("consumer");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(consumer.run(ok, shutdown.clone()));
        wait_until("a receive call", || !lock(&log).receives.is_empty()).await;
        stop(shutdown, task).await;
        let first = lock(&log).receives[0].1;
        assert_eq!(first, expected, "receive_batch {batch:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receives_ask_only_for_free_slots_and_extras_are_released() {
    let (subscriber, log) = Scripted::new(vec![
        // Asked for 2 (the concurrency), the transport returns 3.
        Step::Deliver(texts(&["one", "two", "three"])),
    ]);
    let consumer = builder(subscriber)
        .concurrency(2)
        .build()
        .expect("consumer");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(ok, shutdown.clone()));
    wait_until("three settlements", || lock(&log).settled.len() == 3).await;
    let summary = stop(shutdown, task).await;
    let log = lock(&log);
    assert!(
        log.receives.iter().all(|(_, max)| *max >= 1 && *max <= 2),
        "receive asked for more than the free slots: {:?}",
        log.receives.iter().map(|(_, m)| m).collect::<Vec<_>>()
    );
    assert_eq!(summary.received, 2, "{summary:?}");
    assert!(
        log.settled
            .contains(&("three".into(), Settled::Nack(Duration::ZERO)))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_without_a_reported_expiry_uses_the_configured_duration_and_stops() {
    let lock_duration = Duration::from_millis(60);
    let (subscriber, log) = Scripted::new(vec![Step::Deliver(texts(&["slow", "stuck"]))]);
    let consumer = builder(subscriber)
        .shutdown_timeout(Duration::from_millis(200))
        .lock_renewal(
            LockRenewal::default()
                .lock_duration(lock_duration)
                .max_total(Duration::from_millis(600)),
        )
        .build()
        .expect("consumer");
    let finish = CancellationToken::new();
    let gate = finish.clone();
    let handler = move |message: Message, _context: Context| {
        let gate = gate.clone();
        async move {
            if message.text() == Some("slow") {
                gate.cancelled().await;
            } else {
                // Never finishes: renewal must stop at max_total.
                std::future::pending::<()>().await;
            }
            Ok::<_, HandlerError>(())
        }
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(handler, shutdown.clone()));
    // Two handlers renewing every 40 ms.
    wait_until("a few renewals", || lock(&log).extends >= 4).await;
    finish.cancel();
    wait_until("the slow message acked", || !lock(&log).settled.is_empty()).await;
    // The stuck handler renews until 600 ms after receipt, then stops.
    let extends = || lock(&log).extends;
    let mut last = extends();
    let deadline = Instant::now() + PATIENCE;
    loop {
        tokio::time::sleep(lock_duration * 3).await;
        let now = extends();
        if now == last {
            break;
        }
        last = now;
        assert!(Instant::now() < deadline, "renewal never stopped");
    }
    assert!(last <= 2 * (600 / 40) + 2, "{last} renewals");
    let summary = stop(shutdown, task).await;
    assert_eq!((summary.acked, summary.timed_out), (1, 1), "{summary:?}");
}

/// A receive call in progress at shutdown is not dropped (an SQS long poll would go on at
/// the broker and hide what it takes): it finishes in the background, what it returns is
/// released, and the message of the handler stopped at the deadline is released only after
/// it, so the poll cannot take that message back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_in_progress_at_shutdown_finishes_and_releases_come_after_it() {
    let arrived = CancellationToken::new();
    let (subscriber, log) = Scripted::new(vec![
        Step::Deliver(texts(&["stuck"])),
        Step::Poll(arrived.clone(), texts(&["late"])),
    ]);
    let deadline = Duration::from_millis(200);
    let consumer = builder(subscriber)
        .concurrency(4)
        .shutdown_timeout(deadline)
        .build()
        .expect("consumer");
    let started = Arc::new(AtomicUsize::new(0));
    let counted = started.clone();
    let handler = move |_message: Message, _context: Context| {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
            Ok::<_, HandlerError>(())
        }
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(handler, shutdown.clone()));
    wait_until("the handler to start and the long poll to begin", || {
        started.load(Ordering::SeqCst) == 1 && lock(&log).receives.len() >= 2
    })
    .await;
    let shutdown_at = Instant::now();
    let summary = stop(shutdown, task).await;
    assert!(
        shutdown_at.elapsed() >= deadline,
        "returned before the deadline"
    );
    assert_eq!(summary.timed_out, 1, "{summary:?}");
    {
        let log = lock(&log);
        assert_eq!(
            (log.polls_ended, log.settled.len()),
            (0, 0),
            "nothing is released while the consumer's own poll is in progress: {:?}",
            log.settled
        );
        assert_eq!(log.receives.len(), 2, "no receive after shutdown");
    }
    arrived.cancel();
    wait_until("both messages released", || lock(&log).settled.len() == 2).await;
    let mut settled = lock(&log).settled.clone();
    settled.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        settled,
        [
            ("late".to_string(), Settled::Nack(Duration::ZERO)),
            ("stuck".to_string(), Settled::Nack(Duration::ZERO)),
        ]
    );
}

/// Stopping an idle consumer waits for its receive call in progress (not cancel-safe here,
/// like an SQS long poll) instead of abandoning it, and releases what it returns without
/// handling it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_consumer_stops_once_its_receive_in_progress_returns() {
    let arrived = CancellationToken::new();
    let (subscriber, log) = Scripted::new(vec![Step::Poll(arrived.clone(), texts(&["late"]))]);
    let consumer = builder(subscriber).build().expect("consumer");
    let handled = Arc::new(AtomicUsize::new(0));
    let counted = handled.clone();
    let handler = move |_message: Message, _context: Context| {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok::<_, HandlerError>(())
        }
    };
    let shutdown = CancellationToken::new();
    let mut task = tokio::spawn(consumer.run(handler, shutdown.clone()));
    wait_until("the long poll to begin", || !lock(&log).receives.is_empty()).await;
    shutdown.cancel();
    let early = tokio::time::timeout(Duration::from_millis(200), &mut task).await;
    assert!(
        early.is_err(),
        "the run returned while its receive call was still in progress"
    );
    arrived.cancel();
    let summary = tokio::time::timeout(PATIENCE, task)
        .await
        .expect("returns once the receive call has returned")
        .expect("consumer task");
    assert_eq!(
        handled.load(Ordering::SeqCst),
        0,
        "nothing starts after shutdown"
    );
    assert_eq!(
        (summary.received, summary.released, summary.acked),
        (1, 1, 0),
        "{summary:?}"
    );
    assert_eq!(
        lock(&log).settled,
        [("late".to_string(), Settled::Nack(Duration::ZERO))]
    );
}
