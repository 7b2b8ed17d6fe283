//! Shared helpers for the emulator's interop tests.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use servicebus_emulator::{
    CorrelationFilter, EmulatorHandle, Filter, QueueConfig, Rule, SubscriptionConfig, TopicConfig,
    Topology,
};

/// The entities every interop test uses.
pub fn topology() -> Topology {
    let mut short = QueueConfig::new("q-short-lock");
    short.properties.lock_duration = Duration::from_secs(1);
    short.properties.max_delivery_count = 10;
    let mut mdc = QueueConfig::new("q-mdc");
    mdc.properties.max_delivery_count = 2;
    let mut ttl = QueueConfig::new("q-ttl");
    ttl.properties.dead_lettering_on_message_expiration = true;
    let mut dup = QueueConfig::new("q-dup");
    dup.properties.requires_duplicate_detection = true;
    let mut sess = QueueConfig::new("q-sess");
    sess.properties.requires_session = true;
    let mut corr = SubscriptionConfig::new("s-corr");
    corr.rules = vec![Rule {
        name: "red".into(),
        filter: Filter::Correlation(CorrelationFilter {
            label: Some("red".into()),
            ..Default::default()
        }),
    }];
    let mut sql = SubscriptionConfig::new("s-sql");
    sql.rules = vec![Rule {
        name: "blue".into(),
        filter: Filter::Sql("color = 'blue' AND qty > 5".into()),
    }];
    Topology {
        queues: vec![QueueConfig::new("q"), short, mdc, ttl, dup, sess],
        topics: vec![TopicConfig::new(
            "t",
            vec![
                SubscriptionConfig::new("s1"),
                SubscriptionConfig::new("s2"),
                corr,
                sql,
            ],
        )],
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Start an emulator on a loopback address of its own, port 5672 (the Rust
/// client always dials 5672). Addresses in use are skipped.
pub async fn start_on_5672(topology: Topology) -> EmulatorHandle {
    init_logging();
    let base = (std::process::id() % 200) + 20;
    for _ in 0..2000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let ip = Ipv4Addr::new(127, base as u8, (n / 250) as u8, (n % 250 + 2) as u8);
        let addr = SocketAddr::new(IpAddr::V4(ip), 5672);
        if let Ok(h) = servicebus_emulator::Emulator::start(addr, topology.clone()).await {
            return h;
        }
    }
    panic!("no free loopback address for port 5672");
}

/// Start an emulator on an ephemeral port of 127.0.0.1.
pub async fn start_ephemeral(topology: Topology) -> EmulatorHandle {
    init_logging();
    servicebus_emulator::Emulator::start("127.0.0.1:0", topology)
        .await
        .expect("emulator starts")
}

/// Emulator logs for debugging: set `EMULATOR_TEST_LOG=debug`.
pub fn init_logging() {
    if let Ok(filter) = std::env::var("EMULATOR_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}
