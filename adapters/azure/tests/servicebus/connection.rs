//! The connection: the port a connection string gives is the one dialled, and a dropped
//! connection is recovered by publishers and subscribers by themselves.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudbus_azure::{ServiceBusPublisher, ServiceBusSubscriber};
use cloudbus_core::{Message, Publisher, Subscriber};
use cloudbus_testkit::FaultProxy;
use servicebus_emulator::{Emulator, EntityProperties, QueueConfig, Topology};

use crate::emulator::config;

/// An emulator on 127.0.0.1 with a port the system picks (never 5672).
async fn emulator_on_any_port() -> servicebus_emulator::EmulatorHandle {
    Emulator::start(SocketAddr::from(([127, 0, 0, 1], 0)), Topology::default())
        .await
        .expect("emulator")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaches_an_emulator_on_the_port_its_connection_string_gives() {
    let emulator = emulator_on_any_port().await;
    let connection_string = emulator.connection_string();
    assert!(
        connection_string.contains("Endpoint=sb://127.0.0.1:")
            && !connection_string.contains(":5672"),
        "{connection_string}"
    );
    emulator
        .create_queue(QueueConfig::new("port"))
        .expect("queue");
    let queue = config(&connection_string, "port");
    let publisher = ServiceBusPublisher::connect(&queue)
        .await
        .expect("publisher");
    let id = publisher
        .publish(Message::new("on another port"))
        .await
        .expect("publish");
    let subscriber = ServiceBusSubscriber::connect(&queue)
        .await
        .expect("subscriber");
    let got = subscriber
        .receive(1, Duration::from_secs(10))
        .await
        .expect("receive");
    assert_eq!(got.len(), 1, "the message");
    assert_eq!(got[0].message().id, id);
    for delivery in got {
        delivery.ack().await.expect("ack");
    }
    publisher.close().await.expect("close");
    subscriber.close().await.expect("close");
    emulator.shutdown().await;
}

/// 5,000 messages published by 16 tasks and consumed through a proxy that cuts every
/// connection twice: every message is handled, nothing is reported published that the
/// broker does not hold, and neither side is restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_every_connection_twice_loses_nothing_and_needs_no_restart() {
    const MESSAGES: usize = 5_000;
    const PUBLISHERS: usize = 16;
    let emulator = emulator_on_any_port().await;
    // Deliveries of a cut link stay locked until their lock expires: keep that short.
    emulator
        .create_queue(QueueConfig {
            name: "cut".into(),
            properties: EntityProperties {
                lock_duration: Duration::from_secs(5),
                ..EntityProperties::default()
            },
        })
        .expect("queue");
    let proxy = FaultProxy::start(emulator.local_addr())
        .await
        .expect("proxy");
    let queue = config(&servicebus_emulator::connection_string(proxy.addr()), "cut");
    let publisher = Arc::new(
        ServiceBusPublisher::connect(&queue)
            .await
            .expect("publisher"),
    );
    let subscriber = Arc::new(
        ServiceBusSubscriber::connect(&queue)
            .await
            .expect("subscriber"),
    );
    let started = Instant::now();

    let published = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let publishing: Vec<_> = (0..PUBLISHERS)
        .map(|task| {
            let (publisher, published, failed) =
                (publisher.clone(), published.clone(), failed.clone());
            tokio::spawn(async move {
                for i in (task..MESSAGES).step_by(PUBLISHERS) {
                    match publisher.publish(Message::new(format!("cut {i}"))).await {
                        Ok(id) => {
                            published.lock().expect("lock").insert(id);
                        }
                        Err(_) => {
                            failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();

    let mut handled: HashMap<String, usize> = HashMap::new();
    let mut cuts = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut cut_at = Vec::new();
    loop {
        let done_publishing = publishing.iter().all(|p| p.is_finished());
        let all = published.lock().expect("lock").clone();
        if done_publishing && all.iter().all(|id| handled.contains_key(id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stuck: {} of {} published messages handled after {cuts} cuts",
            all.iter().filter(|id| handled.contains_key(*id)).count(),
            all.len()
        );
        // Cut every connection (the publisher's and the subscriber's) once a third and once
        // two thirds are published.
        if cuts < 2 && all.len() >= MESSAGES * (cuts + 1) / 3 {
            assert!(
                proxy.wait_for_connections(2, Duration::from_secs(30)).await,
                "both clients connected again before cut {}",
                cuts + 1
            );
            let cut = proxy.cut();
            cuts += 1;
            cut_at.push((handled.len(), cut, started.elapsed()));
        }
        match subscriber.receive(50, Duration::from_millis(500)).await {
            Ok(batch) => {
                for delivery in batch {
                    *handled.entry(delivery.message().id.clone()).or_default() += 1;
                    // A settlement of a delivery from a cut link fails: it comes back.
                    let _ = delivery.ack().await;
                }
            }
            Err(error) => assert!(error.is_transient(), "receive: {error}"),
        }
    }
    let elapsed = started.elapsed();
    for task in publishing {
        task.await.expect("publisher task");
    }
    let published = published.lock().expect("lock").clone();
    let duplicates: usize = handled.values().map(|n| n - 1).sum();
    eprintln!(
        "{MESSAGES} messages, cuts at {cut_at:?}: {} published, {} publish errors, {} handled, \
         {duplicates} duplicates, in {elapsed:?}",
        published.len(),
        failed.load(std::sync::atomic::Ordering::Relaxed),
        handled.len()
    );
    assert_eq!(cuts, 2, "both cuts happened");
    assert!(
        cut_at.iter().all(|(_, cut, _)| *cut == 2),
        "each cut hit both clients: {cut_at:?}"
    );
    assert_eq!(
        published.len(),
        MESSAGES,
        "every publish succeeded, retried over the cuts"
    );
    // Nothing reported published that the broker did not get: all of them were handled.
    assert!(
        published.iter().all(|id| handled.contains_key(id)),
        "every message handled"
    );
    assert!(
        proxy.accepted() > 2,
        "the clients reconnected ({} connections)",
        proxy.accepted()
    );
    // The queue drains: what was handled is settled, nothing is left behind.
    let settling = Instant::now() + Duration::from_secs(60);
    while emulator.message_count("cut") != Some(0) && Instant::now() < settling {
        for delivery in subscriber
            .receive(50, Duration::from_millis(500))
            .await
            .unwrap_or_default()
        {
            let _ = delivery.ack().await;
        }
    }
    assert_eq!(
        emulator.message_count("cut"),
        Some(0),
        "nothing left behind"
    );
    publisher.close().await.expect("close");
    subscriber.close().await.expect("close");
    emulator.shutdown().await;
}
