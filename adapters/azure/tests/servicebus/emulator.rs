//! Isolated emulator instances, one per test, and configs that reach them.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};

use cloudbus_azure::ServiceBusConfig;
use cloudbus_core::config::Secret;
use servicebus_emulator::{Emulator, EmulatorHandle, Topology};

static NEXT_ADDRESS: AtomicU32 = AtomicU32::new(0);

/// Starts an emulator on the next free loopback address, port 5672.
pub async fn start_emulator() -> EmulatorHandle {
    for _ in 0..1000 {
        let n = NEXT_ADDRESS.fetch_add(1, Ordering::Relaxed);
        let base = 20 + (std::process::id() % 100) as u8;
        let ip = Ipv4Addr::new(127, base, (n / 250) as u8, (n % 250 + 2) as u8);
        if let Ok(handle) = Emulator::start(SocketAddr::from((ip, 5672)), Topology::default()).await
        {
            return handle;
        }
    }
    panic!("no free loopback address for an emulator");
}

/// A peek-lock, sessionless config for `entity` with the emulator's connection string.
pub fn config(connection_string: &str, entity: &str) -> ServiceBusConfig {
    cloudbus_testkit::log_to_stderr();
    let mut config = ServiceBusConfig::new(entity);
    config.connection_string = Some(Secret::new(connection_string));
    config
}
