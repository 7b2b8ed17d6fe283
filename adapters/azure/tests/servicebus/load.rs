//! The emulator under load: 200 publishers, each on a connection of its own with one sender
//! link, publish 10,000 messages to a topic at once, and a subscriber reads all of them
//! from one subscription while a second subscription's subscriber has stopped reading (its
//! connection goes through a paused `FaultProxy`, so the emulator's writes to it block once
//! the socket buffers are full). The stalled reader must not stall the rest. The peak RSS
//! of the process (the emulator with its 200 clients) is reported, not asserted.
//! The stalled reader grants 5,000 credits, so the emulator owes it about 1 MB, more than
//! an unread loopback socket buffers by default (128 KiB).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cloudbus_azure::{ServiceBusPublisher, ServiceBusSubscriber};
use cloudbus_core::{Message, Publisher, Subscriber};
use cloudbus_testkit::FaultProxy;
use servicebus_emulator::{Emulator, SubscriptionConfig, TopicConfig, Topology};

use crate::emulator::config;

const PUBLISHERS: usize = 200;
const MESSAGES: usize = 10_000;
/// Bytes of padding per message.
const SIZE: usize = 100;

/// The process's peak resident set (VmHWM), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_connections_and_a_stalled_reader_do_not_stall_the_rest() {
    let emulator = Emulator::start(SocketAddr::from(([127, 0, 0, 1], 0)), Topology::default())
        .await
        .expect("emulator");
    emulator
        .create_topic(TopicConfig::new(
            "load",
            vec![
                SubscriptionConfig::new("fast"),
                SubscriptionConfig::new("slow"),
            ],
        ))
        .expect("topic");
    let connection_string = emulator.connection_string();

    // The stalled reader: prefetching, so the emulator pushes to it, then never reading.
    let proxy = FaultProxy::start(emulator.local_addr())
        .await
        .expect("proxy");
    let mut slow = config(
        &servicebus_emulator::connection_string(proxy.addr()),
        "load",
    );
    slow.subscription = Some("slow".into());
    slow.prefetch = 5_000;
    let stalled = ServiceBusSubscriber::connect(&slow)
        .await
        .expect("slow subscriber");
    let _ = stalled.receive(1, Duration::from_millis(100)).await;
    proxy.pause(true);

    let started = Instant::now();
    let mut publishers = Vec::with_capacity(PUBLISHERS);
    for _ in 0..PUBLISHERS {
        let topic = config(&connection_string, "load");
        publishers.push(tokio::spawn(async move {
            ServiceBusPublisher::connect(&topic)
                .await
                .expect("publisher")
        }));
    }
    let mut connected = Vec::with_capacity(PUBLISHERS);
    for publisher in publishers {
        connected.push(publisher.await.expect("connect task"));
    }
    let connect_time = started.elapsed();

    let per = MESSAGES / PUBLISHERS;
    let padding: std::sync::Arc<str> = "x".repeat(SIZE).into();
    let sends = connected.into_iter().enumerate().map(|(p, publisher)| {
        let padding = padding.clone();
        tokio::spawn(async move {
            let mut ids = Vec::with_capacity(per);
            for i in 0..per {
                let message = Message::new(format!("p{p} m{i} {padding}"));
                ids.push(publisher.publish(message).await.expect("publish"));
            }
            publisher.close().await.expect("close");
            ids
        })
    });
    let receiving = tokio::spawn({
        let mut fast = config(&connection_string, "load");
        fast.subscription = Some("fast".into());
        async move {
            let subscriber = ServiceBusSubscriber::connect(&fast)
                .await
                .expect("fast subscriber");
            let mut got = HashSet::new();
            let deadline = Instant::now() + Duration::from_secs(240);
            while got.len() < MESSAGES && Instant::now() < deadline {
                let batch = subscriber
                    .receive(500, Duration::from_secs(2))
                    .await
                    .expect("receive");
                let mut settles = Vec::with_capacity(batch.len());
                for delivery in batch {
                    got.insert(delivery.message().id.clone());
                    settles.push(delivery.ack());
                }
                for outcome in futures::future::join_all(settles).await {
                    outcome.expect("ack");
                }
            }
            subscriber.close().await.expect("close");
            got
        }
    });
    let mut sent = HashSet::new();
    for send in sends {
        sent.extend(send.await.expect("publisher task"));
    }
    let published = started.elapsed();
    let got = receiving.await.expect("receiver task");
    let took = started.elapsed();
    let missing = sent.difference(&got).count();
    eprintln!(
        "load: {PUBLISHERS} publisher connections (connected in {:.1} s) and a stalled reader; \
         {} messages published in {:.1} s, {} received in {:.1} s, {missing} missing; \
         peak RSS {:.0} MiB",
        connect_time.as_secs_f64(),
        sent.len(),
        published.as_secs_f64(),
        got.len(),
        took.as_secs_f64(),
        peak_rss_mib().unwrap_or(f64::NAN),
    );
    assert_eq!(sent.len(), MESSAGES, "every publish reported its id");
    assert_eq!(missing, 0, "the fast subscriber got every message");
    assert!(
        proxy.connections() >= 1,
        "the stalled reader's connection is still open"
    );
    proxy.pause(false);
    drop(stalled);
    emulator.shutdown().await;
}
