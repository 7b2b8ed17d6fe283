//! Publishes messages given as arguments, or one per line of standard input.
//!
//! ```sh
//! cargo run --example publisher -- --url memory://orders hello world
//! echo '{"order": 1}' | CLOUDBUS_URL=sqs://orders cargo run --features aws --example publisher -- --json
//! cargo run --example publisher -- --count 1000 --attr tenant=acme
//! ```
//! Prints each published message id.

use std::io::BufRead;

use clap::Parser;
use cloudbus::Message;

#[derive(Parser)]
#[command(about = "Publish messages with cloudbus")]
struct Args {
    /// Where to publish (a cloudbus URL).
    #[arg(long, env = "CLOUDBUS_URL", default_value = "memory://")]
    url: String,
    /// An attribute to set on every message, as key=value (repeatable).
    #[arg(long = "attr", value_parser = parse_attr)]
    attributes: Vec<(String, String)>,
    /// Generate this many messages ("message 1", "message 2", ...) instead of reading input.
    #[arg(long)]
    count: Option<usize>,
    /// Send each input line as a JSON body (it must be valid JSON).
    #[arg(long)]
    json: bool,
    /// Message bodies; without them (and without --count), lines of standard input.
    bodies: Vec<String>,
}

fn parse_attr(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{text}` is not key=value"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let publisher = cloudbus::connect_publisher(&args.url).await?;
    let bodies: Box<dyn Iterator<Item = std::io::Result<String>>> = if let Some(count) = args.count
    {
        Box::new((1..=count).map(|i| Ok(format!("message {i}"))))
    } else if !args.bodies.is_empty() {
        Box::new(args.bodies.clone().into_iter().map(Ok))
    } else {
        Box::new(std::io::stdin().lock().lines())
    };
    let mut batch = Vec::new();
    for body in bodies {
        let body = body?;
        let mut message = if args.json {
            let value: serde_json::Value = serde_json::from_str(&body)
                .map_err(|e| format!("--json: `{body}` is not JSON: {e}"))?;
            Message::from_json(&value)?
        } else {
            Message::new(body)
        };
        for (key, value) in &args.attributes {
            message = message.with_attribute(key, value);
        }
        batch.push(message);
        if batch.len() == 100 {
            publish(publisher.as_ref(), std::mem::take(&mut batch)).await?;
        }
    }
    publish(publisher.as_ref(), batch).await?;
    publisher.close().await?;
    Ok(())
}

async fn publish(
    publisher: &dyn cloudbus::Publisher,
    batch: Vec<Message>,
) -> Result<(), cloudbus::Error> {
    for outcome in publisher.publish_batch(batch).await {
        println!("{}", outcome?);
    }
    Ok(())
}
