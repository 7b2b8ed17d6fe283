//! Service Bus on an emulator of the test's own.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};

use servicebus_emulator::{Emulator, EmulatorHandle, QueueConfig, Topology};

use crate::cases::{
    Place, Waiting, dead_letters_list_and_redrive, peek_leaves_messages, round_trip, stats_report,
};
use crate::common::unique;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// An emulator on a loopback address of its own (port 5672), with the queue `queue`.
async fn emulator(queue: &str) -> EmulatorHandle {
    let mut topology = Topology::default();
    let mut config = QueueConfig::new(queue);
    config.properties.max_delivery_count = 3;
    topology.queues.push(config);
    for _ in 0..1000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = 140 + (std::process::id() % 50) as u8;
        let ip = Ipv4Addr::new(127, base, (n / 250) as u8, (n % 250 + 2) as u8);
        if let Ok(handle) = Emulator::start(SocketAddr::from((ip, 5672)), topology.clone()).await {
            return handle;
        }
    }
    panic!("no free loopback address for an emulator");
}

const ENV: &str = "AZURE_SERVICEBUS_CONNECTION_STRING";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servicebus_round_trip_peek_and_stats() {
    let queue = unique("cli");
    let emulator = emulator(&queue).await;
    let connection = emulator.connection_string();
    let url = format!("servicebus://{queue}");
    let env = [(ENV, connection.as_str())];
    let place = Place {
        publish: &url,
        receive: &url,
        env: &env,
        idle: "3s",
    };
    round_trip(&place);
    peek_leaves_messages(&place, true);
    stats_report(&place, Waiting::NotReported);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servicebus_dead_letters() {
    let queue = unique("cli");
    let emulator = emulator(&queue).await;
    let connection = emulator.connection_string();
    let url = format!("servicebus://{queue}");
    let mut config = cloudbus::azure::ServiceBusConfig::new(&queue);
    config.connection_string = Some(cloudbus::config::Secret::new(connection.as_str()));
    let consumer = cloudbus::connect_subscriber(config)
        .await
        .expect("subscriber");
    let env = [(ENV, connection.as_str())];
    dead_letters_list_and_redrive(
        &Place {
            publish: &url,
            receive: &url,
            env: &env,
            idle: "3s",
        },
        None,
        consumer,
        true,
    )
    .await;
}
