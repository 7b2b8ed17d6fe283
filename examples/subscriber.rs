//! Receives messages and prints one JSON object per message on standard output:
//! `{"id", "body" (or "body_base64" when not UTF-8), "attributes", "delivery_count"}`.
//! Each message is acked after it is printed.
//!
//! ```sh
//! CLOUDBUS_URL=sqs://orders cargo run --features aws --example subscriber -- --max 10 --idle-timeout 5
//! ```

use std::time::Duration;

use base64::Engine;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Receive messages with cloudbus and print them as JSON lines")]
struct Args {
    /// Where to receive from (a cloudbus URL).
    #[arg(long, env = "CLOUDBUS_URL", default_value = "memory://")]
    url: String,
    /// Exit after this many messages.
    #[arg(long)]
    max: Option<usize>,
    /// Exit after this many seconds without a message.
    #[arg(long)]
    idle_timeout: Option<u64>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let subscriber = cloudbus::connect_subscriber(&args.url).await?;
    let mut received = 0usize;
    let mut idle_since = std::time::Instant::now();
    loop {
        if args.max.is_some_and(|max| received >= max) {
            break;
        }
        if let Some(idle) = args.idle_timeout {
            if idle_since.elapsed() >= Duration::from_secs(idle) {
                break;
            }
        }
        let want = args.max.map_or(10, |max| (max - received).min(10));
        let wait = args.idle_timeout.map_or(Duration::from_secs(20), |s| {
            Duration::from_secs(s)
                .saturating_sub(idle_since.elapsed())
                .min(Duration::from_secs(20))
        });
        let deliveries = subscriber.receive(want, wait).await?;
        if !deliveries.is_empty() {
            idle_since = std::time::Instant::now();
        }
        for delivery in deliveries {
            let message = delivery.message();
            let mut line = serde_json::json!({
                "id": message.id,
                "attributes": message.attributes,
                "delivery_count": delivery.delivery_count(),
            });
            match message.text() {
                Some(text) => line["body"] = text.into(),
                None => {
                    line["body_base64"] = base64::engine::general_purpose::STANDARD
                        .encode(&message.payload)
                        .into()
                }
            }
            println!("{line}");
            delivery.ack().await?;
            received += 1;
        }
    }
    subscriber.close().await?;
    Ok(())
}
