//! 10,000 messages through one subscriber.

use std::time::Duration;

use cloudbus_azure::{ServiceBusPublisher, ServiceBusSubscriber};
use cloudbus_core::{Message, Publisher, Subscriber};
use servicebus_emulator::QueueConfig;

use crate::emulator::{config, start_emulator};

/// 10,000 messages through one cloudbus subscriber: none lost, every queued message
/// delivered and completed once, none left behind. (A publish retried after a failed
/// first attempt may queue a copy: at-least-once allows that, so the copies are counted and
/// must be consumed too.)
#[test]
fn soak_10000_messages_through_one_subscriber() {
    cloudbus_testkit::run(async {
        let emulator = start_emulator().await;
        emulator
            .create_queue(QueueConfig::new("soak"))
            .expect("queue");
        let queue = config(&emulator.connection_string(), "soak");
        let publisher = ServiceBusPublisher::connect(&queue)
            .await
            .expect("publisher");
        let messages: Vec<Message> = (0..10_000)
            .map(|i| Message::new(format!("soak {i}")))
            .collect();
        let sent: std::collections::HashSet<String> =
            messages.iter().map(|m| m.id.clone()).collect();
        for chunk in messages.chunks(500) {
            for outcome in publisher.publish_batch(chunk.to_vec()).await {
                outcome.expect("publish");
            }
        }
        let queued = emulator.message_count("soak").expect("queue exists");
        assert!(
            queued >= sent.len() && queued < sent.len() + 500,
            "{queued} queued for {} published (copies come from one retried batch at most)",
            sent.len()
        );
        let subscriber = ServiceBusSubscriber::connect(&queue)
            .await
            .expect("subscriber");
        let mut seen = std::collections::HashSet::new();
        let mut delivered = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(240);
        while delivered < queued {
            assert!(
                std::time::Instant::now() < deadline,
                "stuck after {delivered} of {queued} deliveries ({} of {} ids)",
                seen.len(),
                sent.len()
            );
            for delivery in subscriber
                .receive(10, Duration::from_secs(2))
                .await
                .expect("receive")
            {
                assert_eq!(delivery.delivery_count(), 1, "redelivered: {delivery:?}");
                seen.insert(delivery.message().id.clone());
                delivered += 1;
                delivery.ack().await.expect("ack");
            }
        }
        assert_eq!(seen, sent, "every message");
        // azservicebus's complete returns once its disposition is sent, not when the broker
        // has applied it (under load the emulator lags by some milliseconds): wait for it.
        let settling = std::time::Instant::now() + Duration::from_secs(10);
        while emulator.message_count("soak") != Some(0) && std::time::Instant::now() < settling {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            emulator.message_count("soak"),
            Some(0),
            "nothing left behind"
        );
        emulator.shutdown().await;
    });
}
