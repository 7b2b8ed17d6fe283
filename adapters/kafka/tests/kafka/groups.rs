//! Consumer groups against the broker: members joining and leaving mid-stream, a member
//! killed with SIGKILL, acks out of order, and a poison record, each losing nothing.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cloudbus_core::config::Start;
use cloudbus_core::consumer::{
    CancellationToken, Consumer, Context, HandlerError, RETRIES_EXHAUSTED, RetryPolicy, Summary,
};
use cloudbus_core::driver::TransportConfig;
use cloudbus_core::subscriber::DEAD_LETTER_REASON;
use cloudbus_core::{Message, Publisher, Subscriber};
use cloudbus_kafka::{KafkaConfig, KafkaPublisher, KafkaSubscriber, create_subscription};

use crate::harness::config;

const PATIENCE: Duration = Duration::from_secs(120);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .expect("a handler panicked while holding a lock")
}

/// A fresh topic and a subscription on it that starts at its beginning.
async fn subscription(partitions: i32) -> (KafkaConfig, KafkaConfig) {
    let topic = format!("groups-{}", cloudbus_core::message::new_id());
    let mut publisher = config(&topic);
    publisher.create = true;
    publisher.partitions = partitions;
    KafkaPublisher::connect(&publisher)
        .await
        .expect("create the topic");
    let mut group = publisher
        .with_subscription(&format!("{topic}-g"))
        .expect("group")
        .with_start(Start::Earliest)
        .expect("start");
    group.create = true;
    (publisher, group)
}

async fn publish(publisher: &KafkaConfig, messages: &[Message]) {
    let publisher = KafkaPublisher::connect(publisher).await.expect("publisher");
    for chunk in messages.chunks(500) {
        for outcome in publisher.publish_batch(chunk.to_vec()).await {
            outcome.expect("publish");
        }
    }
    publisher.close().await.expect("close");
}

/// Handled ids and how often each was handled, across consumers.
type Seen = Arc<Mutex<HashMap<String, usize>>>;

/// A consumer on `group` that records what it handles in `seen`.
async fn start_consumer(
    group: &KafkaConfig,
    seen: &Seen,
) -> (CancellationToken, tokio::task::JoinHandle<Summary>) {
    let subscriber = KafkaSubscriber::connect(group).await.expect("subscriber");
    let consumer = Consumer::builder(subscriber)
        .concurrency(16)
        .receive_wait(Duration::from_secs(1))
        .build()
        .expect("consumer");
    let seen = seen.clone();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(
        move |message: Message, _context: Context| {
            let seen = seen.clone();
            async move {
                *lock(&seen).entry(message.id).or_default() += 1;
                Ok(())
            }
        },
        shutdown.clone(),
    ));
    (shutdown, task)
}

async fn wait_for(what: &str, timeout: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn report(what: &str, sent: &HashSet<String>, seen: &HashMap<String, usize>) {
    let handled: HashSet<String> = seen.keys().cloned().collect();
    let lost = sent.difference(&handled).count();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "{what}: {} sent, {lost} lost, {duplicates} duplicates",
        sent.len()
    );
    assert_eq!(
        lost,
        0,
        "{what}: {lost} of {} messages never handled",
        sent.len()
    );
    assert!(
        handled.is_subset(sent),
        "{what}: handled ids that were never sent"
    );
}

/// 5,000 messages through a group of two consumers; a third joins after the first 1,500
/// are handled, and the second leaves (a graceful shutdown) after 3,000: the group
/// rebalances twice and every message is handled. (The first member, the group's leader,
/// stays: the tansu broker used here cannot elect a new leader when its leader leaves.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_join_and_leave_mid_stream_and_nothing_is_lost() {
    let (publisher, group) = subscription(4).await;
    create_subscription(&group)
        .await
        .expect("create the subscription");
    let messages: Vec<Message> = (0..5_000)
        .map(|i| Message::new(format!("m{i}")).with_ordering_key(format!("k{}", i % 40)))
        .collect();
    let sent: HashSet<String> = messages.iter().map(|m| m.id.clone()).collect();
    let seen: Seen = Arc::default();
    let (first_stop, first) = start_consumer(&group, &seen).await;
    let (second_stop, second) = start_consumer(&group, &seen).await;
    let feeder = {
        let (publisher, messages) = (publisher.clone(), messages.clone());
        tokio::spawn(async move {
            for chunk in messages.chunks(250) {
                publish(&publisher, chunk).await;
            }
        })
    };
    wait_for("1,500 handled", PATIENCE, || lock(&seen).len() >= 1_500).await;
    let (third_stop, third) = start_consumer(&group, &seen).await;
    wait_for("3,000 handled", PATIENCE, || lock(&seen).len() >= 3_000).await;
    second_stop.cancel();
    let second = second.await.expect("second consumer");
    feeder.await.expect("feeder");
    wait_for("every message handled", PATIENCE, || {
        lock(&seen).len() >= sent.len()
    })
    .await;
    first_stop.cancel();
    third_stop.cancel();
    let first = first.await.expect("first consumer");
    let third = third.await.expect("third consumer");
    eprintln!("first {first:?}\nsecond {second:?}\nthird {third:?}");
    assert!(
        first.acked > 0 && second.acked > 0 && third.acked > 0,
        "every member handled messages"
    );
    report("join and leave", &sent, &lock(&seen));
}

/// Runs a consumer as the child process of `a_member_killed_with_sigkill_loses_nothing`:
/// prints `handled <id>` per message before acking it, until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by a_member_killed_with_sigkill_loses_nothing"]
async fn child_consumer() {
    let (Ok(topic), Ok(group)) = (
        std::env::var("CLOUDBUS_KAFKA_CHILD_TOPIC"),
        std::env::var("CLOUDBUS_KAFKA_CHILD_GROUP"),
    ) else {
        return;
    };
    let group = config(&topic).with_subscription(&group).expect("group");
    let subscriber = KafkaSubscriber::connect(&group).await.expect("subscriber");
    let consumer = Consumer::builder(subscriber)
        .concurrency(16)
        .receive_wait(Duration::from_secs(1))
        .build()
        .expect("consumer");
    consumer
        .run(
            |message: Message, _context: Context| async move {
                println!("handled {}", message.id);
                Ok(())
            },
            CancellationToken::new(),
        )
        .await;
}

fn spawn_child(group: &KafkaConfig) -> Child {
    Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "groups::child_consumer",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("CLOUDBUS_KAFKA_CHILD_TOPIC", &group.topic)
        .env(
            "CLOUDBUS_KAFKA_CHILD_GROUP",
            group.subscription.as_deref().expect("a group"),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the child consumer")
}

/// Two members of a group share 5,000 messages; one (a child process) is killed with
/// SIGKILL at a random point mid-stream. After the session timeout the survivor takes its
/// partitions from their committed offsets: every message is handled at least once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_killed_with_sigkill_loses_nothing() {
    let (publisher, group) = subscription(4).await;
    let messages: Vec<Message> = (0..5_000).map(|i| Message::new(format!("m{i}"))).collect();
    let sent: HashSet<String> = messages.iter().map(|m| m.id.clone()).collect();
    // The group exists (pinned at the beginning) before either member joins; the
    // survivor joins first, as the group's leader (tansu cannot elect another).
    create_subscription(&group)
        .await
        .expect("create the subscription");
    let seen: Seen = Arc::default();
    let (stop, survivor) = start_consumer(&group, &seen).await;
    let mut child = spawn_child(&group);
    let child_seen = seen.clone();
    let by_child = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let child_count = by_child.clone();
    let stdout = child.stdout.take().expect("the child's stdout");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if let Some(id) = line.strip_prefix("handled ") {
                *lock(&child_seen).entry(id.to_string()).or_default() += 1;
                child_count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    publish(&publisher, &messages).await;
    // Kill the child somewhere between 20% and 70% of the stream, once it takes part.
    let at = 1_000 + (std::process::id() as usize * 7919) % 2_500;
    wait_for("the kill point", PATIENCE, || {
        lock(&seen).len() >= at && by_child.load(std::sync::atomic::Ordering::SeqCst) >= 100
    })
    .await;
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");
    let killed_at = Instant::now();
    reader.join().expect("the reader");
    let by_child = by_child.load(std::sync::atomic::Ordering::SeqCst);
    wait_for("every message handled", PATIENCE, || {
        lock(&seen).len() >= sent.len()
    })
    .await;
    eprintln!(
        "killed after {at} handled ({by_child} by the child); the rest took {:?}",
        killed_at.elapsed()
    );
    stop.cancel();
    let summary = survivor.await.expect("survivor");
    assert!(summary.acked > 0, "{summary:?}");
    report("SIGKILL", &sent, &lock(&seen));
}

/// Acks out of order commit only the acked prefix: with the fourth record unacked, the
/// next member starts at it (redelivering what follows), never after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_out_of_order_never_commit_past_an_unacked_record() {
    let (publisher, group) = subscription(1).await;
    let messages: Vec<Message> = (0..10).map(|i| Message::new(format!("m{i}"))).collect();
    let first = KafkaSubscriber::connect(&group).await.expect("subscriber");
    publish(&publisher, &messages).await;
    let mut got = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while got.len() < messages.len() && Instant::now() < deadline {
        got.extend(
            first
                .receive(10, Duration::from_secs(1))
                .await
                .expect("receive"),
        );
    }
    assert_eq!(got.len(), messages.len());
    let mut held = None;
    // Acks in reverse order, all but the fourth record.
    for delivery in got.into_iter().rev() {
        if delivery.message().id == messages[3].id {
            held = Some(delivery);
        } else {
            delivery.ack().await.expect("ack");
        }
    }
    // Closing makes the last commit.
    first.close().await.expect("close");
    drop(held);
    let next = KafkaSubscriber::connect(&group)
        .await
        .expect("the next member");
    let mut again = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while again.len() < 7 && Instant::now() < deadline {
        for delivery in next
            .receive(10, Duration::from_secs(1))
            .await
            .expect("receive")
        {
            again.push(delivery.message().id.clone());
            delivery.ack().await.expect("ack");
        }
    }
    let expected: Vec<String> = messages[3..].iter().map(|m| m.id.clone()).collect();
    assert_eq!(
        again, expected,
        "the next member starts at the unacked record; nothing before it comes back"
    );
}

/// A record whose handler always fails is dead-lettered after its attempts with the
/// reason, while the records of other keys and partitions are handled meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_record_dead_letters_without_holding_the_others() {
    let (publisher, group) = subscription(4).await;
    let poison = Message::new("poison").with_ordering_key("poison");
    let others: Vec<Message> = (0..200)
        .map(|i| Message::new(format!("ok {i}")).with_ordering_key(format!("k{}", i % 20)))
        .collect();
    let mut messages = vec![poison.clone()];
    messages.extend(others.iter().cloned());
    let subscriber = KafkaSubscriber::connect(&group).await.expect("subscriber");
    let consumer = Consumer::builder(subscriber)
        .concurrency(16)
        .receive_wait(Duration::from_secs(1))
        .retry(
            RetryPolicy::exponential(Duration::from_secs(1))
                .max_attempts(3)
                .jitter(0.0),
        )
        .build()
        .expect("consumer");
    let handled: Seen = Arc::default();
    let all_others_at = Arc::new(Mutex::new(None::<Instant>));
    let (seen, done_at, count) = (handled.clone(), all_others_at.clone(), others.len());
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(consumer.run(
        move |message: Message, _context: Context| {
            let (seen, done_at) = (seen.clone(), done_at.clone());
            async move {
                if message.text() == Some("poison") {
                    return Err(HandlerError::transient("always fails"));
                }
                let mut seen = lock(&seen);
                *seen.entry(message.id).or_default() += 1;
                if seen.len() == count {
                    *lock(&done_at) = Some(Instant::now());
                }
                Ok(())
            }
        },
        shutdown.clone(),
    ));
    publish(&publisher, &messages).await;
    let dead_letters = KafkaSubscriber::connect(&group.dead_letter_queue().expect("dlq"))
        .await
        .expect("the dead-letter topic");
    let mut dead = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while dead.is_empty() && Instant::now() < deadline {
        dead = dead_letters
            .receive(1, Duration::from_secs(1))
            .await
            .expect("receive");
    }
    let dead_lettered_at = Instant::now();
    assert_eq!(
        dead.len(),
        1,
        "the poison record reaches the dead-letter topic"
    );
    let copy = dead[0].message();
    assert_eq!(copy.id, poison.id);
    assert_eq!(copy.attributes[DEAD_LETTER_REASON], RETRIES_EXHAUSTED);
    wait_for("the other records", PATIENCE, || {
        lock(&handled).len() >= others.len()
    })
    .await;
    let others_done = lock(&all_others_at).expect("all others handled");
    assert!(
        others_done < dead_lettered_at,
        "the other records waited for the poison record"
    );
    shutdown.cancel();
    let summary = run.await.expect("consumer");
    assert_eq!(summary.dead_lettered, 1, "{summary:?}");
    assert_eq!(summary.acked as usize, others.len(), "{summary:?}");
}
