//! `servicebus-emulator`: a Docker-free Azure Service Bus emulator (AMQP 1.0).

use std::path::PathBuf;

use clap::Parser;
use servicebus_emulator::{Emulator, Topology};

/// A Docker-free Azure Service Bus emulator speaking AMQP 1.0.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The official emulator's Config.json (comments allowed). Without it: queue.1 and topic.1 with subscription.1/2.
    #[arg(long, env = "SERVICEBUS_EMULATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on. Clients such as the Rust `azservicebus` crate always dial port 5672.
    #[arg(
        long,
        default_value = "127.0.0.1:5672",
        env = "SERVICEBUS_EMULATOR_LISTEN"
    )]
    listen: String,
    /// Log level or filter (error, warn, info, debug, trace, or a tracing filter).
    #[arg(long, default_value = "info", env = "SERVICEBUS_EMULATOR_LOG")]
    log_level: String,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let topology = match &args.config {
        Some(path) => match Topology::from_config_file(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                return std::process::ExitCode::from(2);
            }
        },
        None => Topology::default_sample(),
    };
    let handle = match Emulator::start(args.listen.as_str(), topology).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    println!("{}", handle.connection_string());
    let _ = tokio::signal::ctrl_c().await;
    handle.shutdown().await;
    std::process::ExitCode::SUCCESS
}
