//! The window of messages the broker sends a subscriber: by default only what receive
//! calls ask for (the rest stays in the queue for the others); with `prefetch`, at least
//! that many from the first receive on.

use std::time::{Duration, Instant};

use cloudbus_core::{Delivery, Message, Publisher, Subscriber, message};
use cloudbus_rabbitmq::{RabbitMqPublisher, RabbitMqSubscriber};

use crate::harness::config;

/// Receives until `n` deliveries or `patience` passed.
async fn receive_up_to(subscriber: &dyn Subscriber, n: usize, patience: Duration) -> Vec<Delivery> {
    let deadline = Instant::now() + patience;
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        got.extend(
            subscriber
                .receive(n - got.len(), Duration::from_millis(300))
                .await
                .expect("receive"),
        );
    }
    got
}

/// Publishes 10 messages to a new queue; the first subscriber receives one, and a second
/// one then gets what the first one's window left in the queue.
async fn left_for_a_second_subscriber(prefetch: u16) -> usize {
    let mut queue = config(&format!("cb-{}", message::new_id()));
    queue.create = true;
    queue.prefetch = prefetch;
    let publisher = RabbitMqPublisher::connect(&queue).await.expect("publisher");
    for outcome in publisher
        .publish_batch((0..10).map(|i| Message::new(format!("m{i}"))).collect())
        .await
    {
        outcome.expect("publish");
    }
    let first = RabbitMqSubscriber::connect(&queue).await.expect("first");
    let one = receive_up_to(&first, 1, Duration::from_secs(10)).await;
    assert_eq!(one.len(), 1, "the first subscriber receives one");
    let second = RabbitMqSubscriber::connect(&queue).await.expect("second");
    let rest = receive_up_to(&second, 10, Duration::from_secs(3)).await;
    let left = rest.len();
    for delivery in rest.into_iter().chain(one) {
        delivery.ack().await.expect("ack");
    }
    // What the first one was sent ahead comes back when it closes.
    first.close().await.expect("close");
    let after = receive_up_to(&second, 9 - left, Duration::from_secs(10)).await;
    assert_eq!(
        after.len(),
        9 - left,
        "nothing is lost when the first one closes"
    );
    for delivery in after {
        delivery.ack().await.expect("ack");
    }
    left
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_subscriber_takes_only_what_it_asks_for() {
    assert_eq!(left_for_a_second_subscriber(0).await, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_prefetch_the_broker_sends_that_many_ahead() {
    assert_eq!(left_for_a_second_subscriber(5).await, 5);
}
