//! The conformance cases. Each is an `async fn(&impl Harness)` that panics on failure.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use cloudbus_core::subscriber::{DEAD_LETTER_DESCRIPTION, DEAD_LETTER_REASON};
use cloudbus_core::{Delivery, Error, Message, Publisher, Subscriber};

use super::{Entity, Harness, Spec, Support, assert_refused};

/// The longest any case waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(60);

fn spec(harness: &impl Harness) -> Spec {
    Spec {
        visibility: harness.features().unit * 10,
        max_deliveries: 10,
        ordered: false,
        replay: false,
    }
}

struct Opened {
    entity: Entity,
    publisher: Box<dyn Publisher>,
    subscribers: Vec<Box<dyn Subscriber>>,
}

async fn open(harness: &impl Harness, spec: &Spec) -> Opened {
    let entity = harness
        .create(spec)
        .await
        .expect("harness creates entities");
    let publisher = entity.publisher().await.expect("connect publisher");
    let mut subscribers = Vec::new();
    for index in 0..entity.subscriptions() {
        subscribers.push(entity.subscriber(index).await.expect("connect subscriber"));
    }
    Opened {
        entity,
        publisher,
        subscribers,
    }
}

async fn dead_letter_subscriber(opened: &Opened, index: usize) -> Box<dyn Subscriber> {
    opened
        .entity
        .dead_letters(index)
        .await
        .expect("connect to the dead-letter queue")
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
        let wait = left.min(Duration::from_secs(5));
        let batch = subscriber
            .receive((count - got.len()).min(10), wait)
            .await
            .expect("receive");
        got.extend(batch);
    }
    got
}

/// Receives exactly one delivery within `timeout`, or panics.
async fn receive_one(subscriber: &dyn Subscriber, timeout: Duration, what: &str) -> Delivery {
    let mut got = receive_n(subscriber, 1, timeout).await;
    assert_eq!(got.len(), 1, "expected {what} within {timeout:?}");
    got.remove(0)
}

/// Asserts nothing is delivered during `window`.
async fn expect_nothing(subscriber: &dyn Subscriber, window: Duration, why: &str) {
    let deadline = Instant::now() + window;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let got = subscriber.receive(10, left).await.expect("receive");
        assert!(
            got.is_empty(),
            "{why}: got {:?}",
            got.iter()
                .map(|d| d.message().id.clone())
                .collect::<Vec<_>>()
        );
    }
}

async fn ack_all(deliveries: Vec<Delivery>) {
    for delivery in deliveries {
        delivery.ack().await.expect("ack");
    }
}

/// A message with every field set travels with all of them intact, on every subscriber.
pub async fn round_trip_with_every_field(harness: &impl Harness) {
    let features = harness.features();
    let opened = open(harness, &spec(harness)).await;
    let mut message = Message::new("round trip")
        .with_id(format!("id-{}", cloudbus_core::message::new_id()))
        .with_attribute("tenant", "acme")
        .with_attribute("priority", "7")
        .with_content_type("text/plain; charset=utf-8")
        .with_correlation_id("corr-42")
        .with_subject("greeting");
    if features.time_to_live == Support::Yes {
        message = message.with_time_to_live(Duration::from_secs(3600));
    }
    let before = SystemTime::now() - Duration::from_secs(60);
    let id = opened
        .publisher
        .publish(message.clone())
        .await
        .expect("publish");
    assert_eq!(id, message.id, "publish returns the message id");
    for subscriber in &opened.subscribers {
        let delivery = receive_one(subscriber.as_ref(), PATIENCE, "the message").await;
        let got = delivery.message();
        assert_eq!(got.id, message.id);
        assert_eq!(got.payload, message.payload);
        assert_eq!(got.attributes, message.attributes);
        assert_eq!(got.content_type, message.content_type);
        assert_eq!(got.correlation_id, message.correlation_id);
        assert_eq!(got.subject, message.subject);
        assert_eq!(delivery.delivery_count(), 1);
        assert!(
            delivery.enqueued_at() > before
                && delivery.enqueued_at() < SystemTime::now() + Duration::from_secs(60),
            "enqueue time {:?} is not about now",
            delivery.enqueued_at()
        );
        assert!(!delivery.transport_id().is_empty());
        delivery.ack().await.expect("ack");
    }
}

/// Every subscription of a topic receives every message.
pub async fn two_subscriptions_each_receive_all(harness: &impl Harness) {
    if let Support::No(reason) = harness.features().fan_out {
        eprintln!("declared unsupported: fan-out: {reason}");
        return;
    }
    let opened = open(harness, &spec(harness)).await;
    assert!(
        opened.subscribers.len() >= 2,
        "a harness with fan-out must create at least two subscriptions"
    );
    let messages: Vec<Message> = (0..20).map(|i| Message::new(format!("fan {i}"))).collect();
    let sent: HashSet<String> = messages.iter().map(|m| m.id.clone()).collect();
    for outcome in opened.publisher.publish_batch(messages).await {
        outcome.expect("publish");
    }
    for (i, subscriber) in opened.subscribers.iter().enumerate() {
        let got = receive_n(subscriber.as_ref(), sent.len(), PATIENCE).await;
        let ids: HashSet<String> = got.iter().map(|d| d.message().id.clone()).collect();
        assert_eq!(ids, sent, "subscription {i} must receive every message");
        ack_all(got).await;
    }
}

/// 2,000 messages split among 8 competing receivers: every one is received and acked.
pub async fn competing_consumers_lose_nothing(harness: &impl Harness) {
    const COUNT: usize = 2_000;
    const RECEIVERS: usize = 8;
    let mut opened = open(harness, &spec(harness)).await;
    let messages: Vec<Message> = (0..COUNT).map(|i| Message::new(format!("m{i}"))).collect();
    let sent: HashSet<String> = messages.iter().map(|m| m.id.clone()).collect();
    for chunk in messages.chunks(100) {
        for outcome in opened.publisher.publish_batch(chunk.to_vec()).await {
            outcome.expect("publish");
        }
    }
    // A subscriber connected now; where members share partitions, the one already
    // connected (a second member would hold partitions nobody here receives from).
    let subscriber: Arc<dyn Subscriber> = match harness.features().competing_subscribers {
        Support::Yes => Arc::from(opened.entity.subscriber(0).await.expect("connect")),
        Support::No(_) => Arc::from(opened.subscribers.remove(0)),
    };
    let seen = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let per_receiver = Arc::new(Mutex::new(vec![0usize; RECEIVERS]));
    let deadline = Instant::now() + Duration::from_secs(180);
    // Every receiver takes its first batch before any acks, so that all of them compete.
    let first_batches_taken = Arc::new(tokio::sync::Barrier::new(RECEIVERS));
    let mut tasks = Vec::new();
    for r in 0..RECEIVERS {
        let subscriber = subscriber.clone();
        let seen = seen.clone();
        let per_receiver = per_receiver.clone();
        let first_batches_taken = first_batches_taken.clone();
        tasks.push(tokio::spawn(async move {
            let mut first = true;
            while Instant::now() < deadline {
                if seen.lock().map(|s| s.len()).unwrap_or(0) >= COUNT {
                    break;
                }
                let batch = subscriber
                    .receive(10, Duration::from_secs(1))
                    .await
                    .expect("receive");
                if std::mem::take(&mut first) {
                    first_batches_taken.wait().await;
                }
                for delivery in batch {
                    let id = delivery.message().id.clone();
                    delivery.ack().await.expect("ack");
                    *seen.lock().expect("lock").entry(id).or_default() += 1;
                    per_receiver.lock().expect("lock")[r] += 1;
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("receiver task");
    }
    let seen = seen.lock().expect("lock").clone();
    let ids: HashSet<String> = seen.keys().cloned().collect();
    let missing = sent.difference(&ids).count();
    assert_eq!(missing, 0, "{missing} of {COUNT} messages never arrived");
    assert_eq!(ids, sent, "received ids that were never sent");
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    let per_receiver = per_receiver.lock().expect("lock").clone();
    eprintln!("competing consumers: per receiver {per_receiver:?}, duplicates {duplicates}");
    assert!(
        per_receiver.iter().filter(|&&n| n > 0).count() >= 2,
        "the stream was not split among receivers: {per_receiver:?}"
    );
}

/// A JSON body (including one that looks like an SNS envelope) arrives byte-exact.
pub async fn json_body_is_not_mangled(harness: &impl Harness) {
    let opened = open(harness, &spec(harness)).await;
    let bodies = [
        serde_json::json!({
            "order": 17, "price": 12.50, "tags": ["a", "b"], "nested": {"k": null},
            "text": "quotes \" backslash \\ newline \n unicode é 🚀 <tag> &amp;"
        }),
        // A user's JSON that resembles an SNS notification must not be unwrapped.
        serde_json::json!({"Type": "Notification", "Message": "not an envelope", "MessageId": "x"}),
    ];
    for body in bodies {
        let message = Message::from_json(&body).expect("serialize");
        opened
            .publisher
            .publish(message.clone())
            .await
            .expect("publish");
        for subscriber in &opened.subscribers {
            let delivery = receive_one(subscriber.as_ref(), PATIENCE, "the JSON message").await;
            assert_eq!(delivery.message().payload, message.payload);
            assert_eq!(
                delivery
                    .message()
                    .json::<serde_json::Value>()
                    .expect("JSON"),
                body
            );
            assert_eq!(
                delivery.message().content_type.as_deref(),
                Some("application/json")
            );
            delivery.ack().await.expect("ack");
        }
    }
}

/// Bodies with all 256 byte values, invalid UTF-8, or text that looks like base64 arrive
/// byte-exact.
pub async fn binary_body_round_trips(harness: &impl Harness) {
    let opened = open(harness, &spec(harness)).await;
    let mut all_bytes: Vec<u8> = (0..=255u8).collect();
    all_bytes.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28, 0x00]);
    let bodies: Vec<Vec<u8>> = vec![
        all_bytes,
        vec![0xc3, 0x28],
        b"aGVsbG8gd29ybGQ=".to_vec(),
        Vec::new(),
    ];
    for body in bodies {
        let message = Message::new(body.clone());
        opened.publisher.publish(message).await.expect("publish");
        for subscriber in &opened.subscribers {
            let delivery = receive_one(subscriber.as_ref(), PATIENCE, "the binary message").await;
            assert_eq!(
                delivery.message().payload.as_ref(),
                body.as_slice(),
                "body must round-trip byte-exact"
            );
            delivery.ack().await.expect("ack");
        }
    }
}

/// Attribute keys and values with unicode, spaces, punctuation or empty values either
/// round-trip exactly or are rejected at publish with `InvalidAttribute` naming the key.
pub async fn unusual_attributes_round_trip_or_are_rejected(harness: &impl Harness) {
    let opened = open(harness, &spec(harness)).await;
    let cases = [
        ("plain", "value"),
        ("with space", "two words"),
        ("unicode-ключ-🔑", "значение ✓"),
        ("punct!#$%&'()*+,-/:;<=>?@[]^`{|}~", "p!u@n#c$t"),
        ("dots.in.key", "v"),
        ("UPPER_lower", "MiXeD"),
        ("empty-value", ""),
        ("value-with-newline", "line1\nline2\ttab"),
        ("aws.reserved-looking", "x"),
    ];
    let mut rejected = Vec::new();
    for (key, value) in cases {
        let message = Message::new("attrs").with_attribute(key, value);
        match opened.publisher.publish(message.clone()).await {
            Ok(_) => {
                for subscriber in &opened.subscribers {
                    let delivery =
                        receive_one(subscriber.as_ref(), PATIENCE, "the attribute message").await;
                    assert_eq!(
                        delivery.message().attributes,
                        message.attributes,
                        "attribute `{key}` must round-trip exactly"
                    );
                    delivery.ack().await.expect("ack");
                }
            }
            Err(Error::InvalidAttribute {
                key: named, rule, ..
            }) => {
                assert_eq!(named, key, "the error must name the offending key");
                assert!(!rule.is_empty(), "the error must state the rule");
                rejected.push(key);
            }
            Err(other) => {
                panic!("attribute `{key}`: expected success or InvalidAttribute, got {other:?}")
            }
        }
    }
    if !rejected.is_empty() {
        eprintln!("rejected attribute keys (with InvalidAttribute): {rejected:?}");
    }
}

/// A nack with no delay redelivers the message with its delivery count plus one.
pub async fn nack_redelivers_with_count_plus_one(harness: &impl Harness) {
    let opened = open(harness, &spec(harness)).await;
    let subscriber = opened.subscribers[0].as_ref();
    let id = opened
        .publisher
        .publish(Message::new("nack me"))
        .await
        .expect("publish");
    let first = receive_one(subscriber, PATIENCE, "the message").await;
    assert_eq!(first.delivery_count(), 1);
    first.nack(Duration::ZERO).await.expect("nack");
    let second = receive_one(subscriber, PATIENCE, "the redelivery").await;
    assert_eq!(second.message().id, id, "the id survives redelivery");
    assert_eq!(second.delivery_count(), 2);
    second.ack().await.expect("ack");
    expect_nothing(
        subscriber,
        harness.features().unit * 2,
        "acked message came back",
    )
    .await;
}

/// A nack with a delay is not redelivered before the delay, and is redelivered after it.
pub async fn nack_with_delay_is_not_redelivered_early(harness: &impl Harness) {
    let unit = harness.features().unit;
    let opened = open(harness, &spec(harness)).await;
    let subscriber = opened.subscribers[0].as_ref();
    opened
        .publisher
        .publish(Message::new("later"))
        .await
        .expect("publish");
    let first = receive_one(subscriber, PATIENCE, "the message").await;
    let delay = unit * 5;
    let nacked_at = Instant::now();
    first.nack(delay).await.expect("nack");
    expect_nothing(subscriber, unit * 4, "redelivered before the nack delay").await;
    let again = receive_one(subscriber, PATIENCE, "the redelivery after the delay").await;
    assert!(nacked_at.elapsed() >= unit * 4);
    assert_eq!(again.delivery_count(), 2);
    again.ack().await.expect("ack");
}

/// A delivery dropped without settling comes back after its lock expires.
pub async fn unsettled_delivery_comes_back_after_lock(harness: &impl Harness) {
    let unit = harness.features().unit;
    let spec = Spec {
        visibility: unit * 3,
        ..spec(harness)
    };
    let opened = open(harness, &spec).await;
    let subscriber = opened.subscribers[0].as_ref();
    let id = opened
        .publisher
        .publish(Message::new("dropped"))
        .await
        .expect("publish");
    let first = receive_one(subscriber, PATIENCE, "the message").await;
    drop(first);
    let again = receive_one(subscriber, PATIENCE, "the message after its lock expired").await;
    assert_eq!(again.message().id, id);
    assert_eq!(again.delivery_count(), 2);
    again.ack().await.expect("ack");
}

/// Dead-lettering moves the message to the dead-letter queue with its reason and description.
pub async fn dead_letter_records_reason(harness: &impl Harness) {
    let unit = harness.features().unit;
    let opened = open(harness, &spec(harness)).await;
    let subscriber = opened.subscribers[0].as_ref();
    let message = Message::new("poison").with_attribute("tenant", "acme");
    opened
        .publisher
        .publish(message.clone())
        .await
        .expect("publish");
    let delivery = receive_one(subscriber, PATIENCE, "the message").await;
    delivery
        .dead_letter("bad-format", "field `total` is missing")
        .await
        .expect("dead-letter");
    let dead_letters = dead_letter_subscriber(&opened, 0).await;
    let dead = receive_one(dead_letters.as_ref(), PATIENCE, "the dead-lettered message").await;
    let got = dead.message();
    assert_eq!(got.id, message.id);
    assert_eq!(got.payload, message.payload);
    assert_eq!(
        got.attributes.get("tenant").map(String::as_str),
        Some("acme")
    );
    assert_eq!(
        got.attributes.get(DEAD_LETTER_REASON).map(String::as_str),
        Some("bad-format")
    );
    assert_eq!(
        got.attributes
            .get(DEAD_LETTER_DESCRIPTION)
            .map(String::as_str),
        Some("field `total` is missing")
    );
    dead.ack().await.expect("ack");
    expect_nothing(subscriber, unit * 2, "a dead-lettered message came back").await;
}

/// An inspector looks without taking: `peek` shows the waiting messages with no delivery
/// counted (or, where the broker cannot show a message without delivering it, is
/// `Unsupported` and touches nothing), and `stats` reports each count or says why not.
/// Afterwards every message is delivered as if nobody had looked.
pub async fn inspecting_takes_nothing(harness: &impl Harness) {
    let opened = open(harness, &spec(harness)).await;
    let texts = ["a", "b", "c"];
    for text in texts {
        opened
            .publisher
            .publish(Message::new(text))
            .await
            .expect("publish");
    }
    match opened.entity.inspector(0).await {
        Ok(inspector) => {
            let deadline = Instant::now() + PATIENCE;
            loop {
                match inspector.peek(10).await {
                    Ok(peeked) if peeked.len() < texts.len() && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Ok(peeked) => {
                        let mut got: Vec<_> =
                            peeked.iter().filter_map(|p| p.message.text()).collect();
                        got.sort();
                        assert_eq!(got, texts, "peek shows what waits");
                        assert!(
                            peeked.iter().all(|p| p.delivery_count == 0),
                            "peeking counts no delivery"
                        );
                        break;
                    }
                    Err(Error::Unsupported { feature, .. }) => {
                        println!("peek is unsupported: {feature}");
                        break;
                    }
                    Err(other) => panic!("peek failed: {other:?}"),
                }
            }
            loop {
                let stats = inspector.stats().await.expect("stats");
                for (field, value) in [
                    ("waiting", stats.waiting),
                    ("in_flight", stats.in_flight),
                    ("dead_lettered", stats.dead_lettered),
                ] {
                    assert!(
                        value.is_some() || stats.not_reported.iter().any(|(f, _)| *f == field),
                        "{field} is neither reported nor explained: {stats:?}"
                    );
                }
                match stats.waiting {
                    Some(waiting) if waiting != 3 && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Some(waiting) => {
                        assert_eq!(waiting, 3, "{stats:?}");
                        assert_eq!(stats.dead_lettered.unwrap_or(0), 0, "{stats:?}");
                        break;
                    }
                    None => break,
                }
            }
            inspector.close().await.expect("close the inspector");
        }
        Err(Error::Unsupported { feature, .. }) => {
            println!("inspecting is unsupported here: {feature}");
        }
        Err(other) => panic!("connecting an inspector failed: {other:?}"),
    }
    let subscriber = opened.subscribers[0].as_ref();
    let deliveries = receive_n(subscriber, texts.len(), PATIENCE).await;
    assert_eq!(
        deliveries.len(),
        texts.len(),
        "every message is still there"
    );
    assert!(
        deliveries.iter().all(|d| d.delivery_count() == 1),
        "looking counted no delivery: {:?}",
        deliveries
            .iter()
            .map(|d| d.delivery_count())
            .collect::<Vec<_>>()
    );
    ack_all(deliveries).await;
}

/// A message delivered `max_deliveries` times without success is dead-lettered by the transport.
pub async fn max_delivery_count_dead_letters(harness: &impl Harness) {
    let spec = Spec {
        max_deliveries: 2,
        ..spec(harness)
    };
    let opened = open(harness, &spec).await;
    let subscriber = opened.subscribers[0].as_ref();
    let id = opened
        .publisher
        .publish(Message::new("always fails"))
        .await
        .expect("publish");
    for attempt in 1..=2 {
        let delivery = receive_one(subscriber, PATIENCE, "a delivery").await;
        assert_eq!(delivery.delivery_count(), attempt);
        delivery.nack(Duration::ZERO).await.expect("nack");
    }
    let dead_letters = dead_letter_subscriber(&opened, 0).await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        // Some transports move the message when a receive would exceed the count.
        let main = subscriber
            .receive(10, Duration::from_millis(200))
            .await
            .expect("receive");
        assert!(
            main.is_empty(),
            "delivered more than max_deliveries times (count {})",
            main[0].delivery_count()
        );
        let dead = dead_letters
            .receive(1, Duration::from_secs(1))
            .await
            .expect("receive");
        if let Some(dead) = dead.into_iter().next() {
            assert_eq!(dead.message().id, id);
            dead.ack().await.expect("ack");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the message never reached the dead-letter queue"
        );
    }
}

/// Extending a lock keeps the message from other receivers past its original timeout,
/// and the ack afterwards succeeds.
pub async fn extend_keeps_message_locked(harness: &impl Harness) {
    let unit = harness.features().unit;
    let spec = Spec {
        visibility: unit * 3,
        ..spec(harness)
    };
    let opened = open(harness, &spec).await;
    let subscriber = opened.subscribers[0].as_ref();
    opened
        .publisher
        .publish(Message::new("slow"))
        .await
        .expect("publish");
    let mut delivery = receive_one(subscriber, PATIENCE, "the message").await;
    let received_at = Instant::now();
    delivery.extend(unit * 10).await.expect("extend");
    // Another receiver of the subscription, or (where members share partitions) this one.
    let other = match harness.features().competing_subscribers {
        Support::Yes => Some(opened.entity.subscriber(0).await.expect("connect")),
        Support::No(_) => None,
    };
    let watcher = other.as_deref().unwrap_or(subscriber);
    expect_nothing(watcher, unit * 6, "redelivered while its lock was extended").await;
    assert!(
        received_at.elapsed() > unit * 3,
        "waited past the original lock"
    );
    delivery.ack().await.expect("ack after extend");
    expect_nothing(watcher, unit * 2, "acked message came back").await;
}

/// A batch of 25 (more than any service's per-call maximum) is accepted and all arrive.
pub async fn batch_of_25_all_arrive(harness: &impl Harness) {
    let opened = open(harness, &spec(harness)).await;
    let messages: Vec<Message> = (0..25)
        .map(|i| Message::new(format!("batch {i}")).with_attribute("i", i.to_string()))
        .collect();
    let sent: Vec<String> = messages.iter().map(|m| m.id.clone()).collect();
    let outcomes = opened.publisher.publish_batch(messages).await;
    assert_eq!(outcomes.len(), 25, "one outcome per message");
    for (outcome, id) in outcomes.iter().zip(&sent) {
        assert_eq!(outcome.as_ref().expect("published"), id);
    }
    for subscriber in &opened.subscribers {
        let got = receive_n(subscriber.as_ref(), 25, PATIENCE).await;
        let ids: HashSet<String> = got.iter().map(|d| d.message().id.clone()).collect();
        assert_eq!(ids, sent.iter().cloned().collect::<HashSet<_>>());
        ack_all(got).await;
    }
}

/// Concurrent `publish` calls (which transports with automatic batching coalesce) each
/// get their own id; `close` while publishes are in progress sends what was queued: every
/// publish that returned `Ok` arrives, every other one failed with `Closed`.
pub async fn concurrent_publishes_and_close_lose_nothing(harness: &impl Harness) {
    const COUNT: usize = 60;
    let opened = open(harness, &spec(harness)).await;
    let publisher: Arc<dyn Publisher> = opened.publisher.into();
    let publish_all = |label: &'static str| {
        (0..COUNT)
            .map(|i| {
                let publisher = publisher.clone();
                let message = Message::new(format!("{label} {i}"));
                let id = message.id.clone();
                tokio::spawn(async move { (id, publisher.publish(message).await) })
            })
            .collect::<Vec<_>>()
    };
    let mut expected = HashSet::new();
    for task in publish_all("concurrent") {
        let (id, outcome) = task.await.expect("publish task");
        assert_eq!(
            outcome.expect("published"),
            id,
            "each caller gets its own id"
        );
        expected.insert(id);
    }
    // A second wave, closed while it is on its way.
    let wave = publish_all("closing");
    tokio::task::yield_now().await;
    publisher.close().await.expect("close");
    for task in wave {
        let (id, outcome) = task.await.expect("publish task");
        match outcome {
            Ok(sent) => {
                assert_eq!(sent, id);
                expected.insert(id);
            }
            Err(Error::Closed { .. }) => {}
            Err(other) => panic!("a publish during close failed with {other}"),
        }
    }
    for subscriber in &opened.subscribers {
        let got = receive_n(subscriber.as_ref(), expected.len(), PATIENCE).await;
        let ids: HashSet<String> = got.iter().map(|d| d.message().id.clone()).collect();
        assert_eq!(ids, expected, "published messages went missing");
        ack_all(got).await;
    }
}

/// A new subscription that starts at the beginning receives every message the topic
/// holds, also those published before it existed, in order within each ordering key: how a
/// service rebuilds its state from a log (replay).
pub async fn replay_from_the_beginning_returns_every_message(harness: &impl Harness) {
    const KEYS: usize = 3;
    const PER_KEY: usize = 10;
    let features = harness.features();
    let spec = Spec {
        replay: true,
        ordered: features.ordering == Support::Yes,
        ..spec(harness)
    };
    if let Support::No(reason) = features.replay {
        assert_refused(harness.create(&spec).await.map(|_| ()), "replay", reason);
        return;
    }
    let entity = harness
        .create(&spec)
        .await
        .expect("harness creates entities");
    let publisher = entity.publisher().await.expect("connect publisher");
    let mut sent = HashSet::new();
    for seq in 0..PER_KEY {
        for key in 0..KEYS {
            let mut message = Message::new(format!("event {key}/{seq}"))
                .with_attribute("key", format!("key-{key}"))
                .with_attribute("seq", seq.to_string());
            if spec.ordered {
                message = message.with_ordering_key(format!("key-{key}"));
            }
            sent.insert(message.id.clone());
            publisher.publish(message).await.expect("publish");
        }
    }
    // The replaying subscription is created now, after everything was published. Acked as
    // they come: a transport hands out one message per ordering key at a time.
    let subscriber = entity.subscriber(0).await.expect("connect the replay");
    let deadline = Instant::now() + PATIENCE;
    let mut order: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut ids = HashSet::new();
    while ids.len() < sent.len() && Instant::now() < deadline {
        for delivery in subscriber
            .receive(10, Duration::from_secs(1))
            .await
            .expect("receive")
        {
            let message = delivery.message();
            let seq: usize = message.attributes["seq"].parse().expect("seq");
            order
                .entry(message.attributes["key"].clone())
                .or_default()
                .push(seq);
            ids.insert(message.id.clone());
            delivery.ack().await.expect("ack");
        }
    }
    assert_eq!(
        ids, sent,
        "the replay returns every message, and only those"
    );
    if spec.ordered {
        for (key, seqs) in order {
            assert_eq!(seqs, (0..PER_KEY).collect::<Vec<_>>(), "order within {key}");
        }
    }
}

/// A delayed message is not delivered before its time, and is delivered after it.
pub async fn delayed_delivery_is_not_visible_early(harness: &impl Harness) {
    let unit = harness.features().unit;
    let opened = open(harness, &spec(harness)).await;
    let message = Message::new("delayed").with_deliver_after(unit * 5);
    if let Support::No(reason) = harness.features().delayed_delivery {
        assert_refused(
            opened.publisher.publish(message).await,
            "delayed delivery",
            reason,
        );
        return;
    }
    let published_at = Instant::now();
    opened.publisher.publish(message).await.expect("publish");
    let subscriber = opened.subscribers[0].as_ref();
    expect_nothing(
        subscriber,
        unit * 4,
        "a delayed message was delivered early",
    )
    .await;
    let delivery = receive_one(subscriber, PATIENCE, "the delayed message").await;
    assert!(published_at.elapsed() >= unit * 4);
    delivery.ack().await.expect("ack");
}

/// Messages with the same ordering key arrive in publish order.
pub async fn ordering_keys_keep_order(harness: &impl Harness) {
    const KEYS: usize = 3;
    const PER_KEY: usize = 10;
    let spec = Spec {
        ordered: true,
        ..spec(harness)
    };
    let opened = open(harness, &spec).await;
    if let Support::No(reason) = harness.features().ordering {
        let message = Message::new("ordered").with_ordering_key("k");
        assert_refused(
            opened.publisher.publish(message).await,
            "ordering keys",
            reason,
        );
        return;
    }
    let mut messages = Vec::new();
    for i in 0..PER_KEY {
        for k in 0..KEYS {
            messages.push(
                Message::new(format!("{k}:{i}"))
                    .with_ordering_key(format!("key-{k}"))
                    .with_attribute("seq", i.to_string()),
            );
        }
    }
    // One at a time, so publish order is well defined.
    for message in messages {
        opened.publisher.publish(message).await.expect("publish");
    }
    let subscriber = opened.subscribers[0].as_ref();
    // While one receiver holds messages of a key, no other receiver gets that key: another
    // subscriber, or (where members share partitions) another receive call of this one.
    let held = receive_n(subscriber, 1, PATIENCE).await;
    let held_keys: HashSet<String> = held
        .iter()
        .filter_map(|d| d.message().ordering_key.clone())
        .collect();
    let other = match harness.features().competing_subscribers {
        Support::Yes => Some(opened.entity.subscriber(0).await.expect("connect")),
        Support::No(_) => None,
    };
    let second = other.as_deref().unwrap_or(subscriber);
    for delivery in receive_n(second, KEYS * PER_KEY, harness.features().unit * 3).await {
        let key = delivery.message().ordering_key.clone().unwrap_or_default();
        assert!(
            !held_keys.contains(&key),
            "a second receiver got a message of key {key} while another held an earlier one"
        );
        delivery.nack(Duration::ZERO).await.expect("nack");
    }
    for delivery in held {
        delivery.nack(Duration::ZERO).await.expect("nack");
    }
    // Then everything arrives in order within each key, redeliveries included.
    let mut order: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let deadline = Instant::now() + PATIENCE;
    while order.values().map(Vec::len).sum::<usize>() < KEYS * PER_KEY {
        assert!(
            Instant::now() < deadline,
            "ordered messages stopped arriving: {order:?}"
        );
        let batch = subscriber
            .receive(10, Duration::from_secs(1))
            .await
            .expect("receive");
        for delivery in batch {
            let message = delivery.message();
            let key = message
                .ordering_key
                .clone()
                .expect("the ordering key survives");
            let seq: usize = message.attributes["seq"].parse().expect("seq");
            order.entry(key).or_default().push(seq);
            delivery.ack().await.expect("ack");
        }
    }
    for (key, seqs) in order {
        assert_eq!(seqs, (0..PER_KEY).collect::<Vec<_>>(), "order within {key}");
    }
}

/// Publishing to or receiving from an entity that does not exist fails with `NotFound`
/// (when connecting, or at the first call).
pub async fn missing_entity_is_not_found(harness: &impl Harness) {
    let missing = harness.missing().await.expect("harness");
    let publish = match missing.publisher().await {
        Ok(publisher) => publisher.publish(Message::new("x")).await.map(|_| ()),
        Err(error) => Err(error),
    };
    assert!(
        matches!(publish, Err(Error::NotFound { .. })),
        "publish to a missing entity: expected NotFound, got {publish:?}"
    );
    let receive = match missing.subscriber(0).await {
        Ok(subscriber) => subscriber
            .receive(1, Duration::from_secs(1))
            .await
            .map(|_| ()),
        Err(error) => Err(error),
    };
    assert!(
        matches!(receive, Err(Error::NotFound { .. })),
        "receive from a missing entity: expected NotFound, got {receive:?}"
    );
}

/// After `close`, publishing and receiving fail with `Closed`.
pub async fn use_after_close_is_closed(harness: &impl Harness) {
    let opened = open(harness, &spec(harness)).await;
    opened.publisher.close().await.expect("close");
    let outcome = opened.publisher.publish(Message::new("late")).await;
    assert!(
        matches!(outcome, Err(Error::Closed { .. })),
        "publish after close: {outcome:?}"
    );
    let batch = opened
        .publisher
        .publish_batch(vec![Message::new("late")])
        .await;
    assert!(
        matches!(batch.as_slice(), [Err(Error::Closed { .. })]),
        "batch after close: {batch:?}"
    );
    let subscriber = &opened.subscribers[0];
    subscriber.close().await.expect("close");
    let outcome = subscriber.receive(1, Duration::from_millis(100)).await;
    assert!(
        matches!(outcome, Err(Error::Closed { .. })),
        "receive after close: {outcome:?}"
    );
    opened
        .publisher
        .close()
        .await
        .expect("closing twice is harmless");
}

/// A message over the size limit fails at publish with its size and the limit, counting
/// attributes too; nothing is delivered.
pub async fn oversized_message_is_rejected(harness: &impl Harness) {
    let limit = harness.features().max_message_size;
    let opened = open(harness, &spec(harness)).await;
    let too_big = Message::new(vec![b'x'; limit + 1]);
    match opened.publisher.publish(too_big).await {
        Err(Error::TooLarge {
            size, limit: got, ..
        }) => {
            assert!(
                size > limit,
                "reported size {size} must exceed the limit {limit}"
            );
            assert_eq!(got, limit, "the error reports the transport's limit");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // The body fits, but with its attributes the message does not.
    let with_attributes =
        Message::new(vec![b'x'; limit - 8]).with_attribute("attribute", "x".repeat(64));
    assert!(
        matches!(
            opened.publisher.publish(with_attributes).await,
            Err(Error::TooLarge { .. })
        ),
        "attributes count against the size limit"
    );
    let batch = opened
        .publisher
        .publish_batch(vec![
            Message::new("fits"),
            Message::new(vec![b'x'; limit + 1]),
        ])
        .await;
    assert!(
        batch[0].is_ok(),
        "the small message of the batch goes: {:?}",
        batch[0]
    );
    assert!(
        matches!(batch[1], Err(Error::TooLarge { .. })),
        "the large one fails alone: {:?}",
        batch[1]
    );
    for subscriber in &opened.subscribers {
        let got = receive_n(subscriber.as_ref(), 2, harness.features().unit * 5).await;
        assert_eq!(got.len(), 1, "only the message that fits is delivered");
        assert_eq!(got[0].message().text(), Some("fits"));
        ack_all(got).await;
    }
}
