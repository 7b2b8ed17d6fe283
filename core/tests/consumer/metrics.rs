//! The consumer's metrics through the `metrics` facade, read back with a debugging
//! recorder, installed for this test binary (the other tests' metrics carry other
//! destinations, which this test leaves out).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cloudbus_core::consumer::{CancellationToken, Consumer, Context, HandlerError, RetryPolicy};
use cloudbus_core::memory::{MemoryConfig, MemoryPublisher, MemorySubscriber};
use cloudbus_core::{Message, Publisher};
use metrics_util::MetricKind;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_durations_are_recorded_per_destination() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");

    let queue = format!("metrics-{}", cloudbus_core::message::new_id());
    let config = MemoryConfig::new(&queue);
    let publisher = MemoryPublisher::connect(&config).await.expect("publisher");
    for text in ["ok", "permanent", "retry"] {
        publisher
            .publish(Message::new(text))
            .await
            .expect("publish");
    }
    let subscriber = MemorySubscriber::connect(&config).await.expect("connect");
    let consumer = Consumer::builder(subscriber)
        .retry(RetryPolicy::exponential(Duration::from_millis(10)).jitter(0.0))
        .build()
        .expect("consumer");
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let handled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = handled.clone();
    let handler = move |message: Message, context: Context| {
        let count = count.clone();
        async move {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match (message.text(), context.delivery_count()) {
                (Some("permanent"), _) => Err(HandlerError::permanent("no")),
                (Some("retry"), 1) => Err(HandlerError::transient("later")),
                _ => Ok(()),
            }
        }
    };
    let task = tokio::spawn(consumer.run(handler, shutdown));
    let deadline = Instant::now() + Duration::from_secs(30);
    while handled.load(std::sync::atomic::Ordering::SeqCst) < 4 {
        assert!(
            Instant::now() < deadline,
            "the handler calls did not happen"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    let summary = task.await.expect("consumer task");
    assert_eq!(
        (summary.acked, summary.nacked, summary.dead_lettered),
        (2, 1, 1)
    );

    let mut counters = HashMap::new();
    let mut durations = HashMap::new();
    for (key, _unit, _description, value) in snapshotter.snapshot().into_vec() {
        let labels: HashMap<String, String> = key
            .key()
            .labels()
            .map(|l| (l.key().to_string(), l.value().to_string()))
            .collect();
        if labels.get("destination") != Some(&queue) {
            continue;
        }
        assert_eq!(labels.get("system").map(String::as_str), Some("memory"));
        let name = key.key().name().to_string();
        match (key.kind(), value) {
            (MetricKind::Counter, DebugValue::Counter(n)) => {
                counters.insert(name, n);
            }
            (MetricKind::Histogram, DebugValue::Histogram(values)) => {
                durations.insert(labels["outcome"].clone(), values.len());
            }
            other => panic!("unexpected metric {name}: {other:?}"),
        }
    }
    let counter = |name: &str| counters.get(name).copied().unwrap_or(0);
    assert_eq!(counter("cloudbus.consumer.received"), 4, "{counters:?}");
    assert_eq!(counter("cloudbus.consumer.acked"), 2, "{counters:?}");
    assert_eq!(counter("cloudbus.consumer.nacked"), 1, "{counters:?}");
    assert_eq!(
        counter("cloudbus.consumer.dead_lettered"),
        1,
        "{counters:?}"
    );
    assert_eq!(durations.get("ok"), Some(&2), "{durations:?}");
    assert_eq!(durations.get("transient"), Some(&1), "{durations:?}");
    assert_eq!(durations.get("permanent"), Some(&1), "{durations:?}");
}
