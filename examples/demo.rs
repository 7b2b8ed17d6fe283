//! A tour of cloudbus in one process: a topic with two subscriptions, a pair of competing
//! consumers, a nack that is redelivered, and a poison message that is dead-lettered.
//!
//! ```sh
//! cargo run --example demo                      # the embedded broker (memory://)
//! CLOUDBUS_URL='sns://demo?create=true&endpoint=http://127.0.0.1:4566' cargo run --features aws --example demo
//! CLOUDBUS_URL='sqs://demo?create=true&endpoint=http://127.0.0.1:4566' cargo run --features aws --example demo
//! ```
//!
//! The URL names the topic; the demo receives through two subscriptions of it,
//! `demo-billing` and `demo-audit`. On a plain queue (sqs://) it skips the fan-out.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use cloudbus::{Config, Message, Subscriber};

#[derive(Parser)]
#[command(about = "A tour of cloudbus")]
struct Args {
    /// The topic to use (a cloudbus URL).
    #[arg(long, env = "CLOUDBUS_URL", default_value = "memory://demo")]
    url: String,
}

const ORDERS: usize = 6;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let topic: Config = args.url.parse()?;
    println!("transport: {} ({})", topic.transport(), args.url);

    // Subscriptions receive what is published after they exist: open them first. A plain
    // queue (sqs://) has no subscriptions: then both workers share the queue itself.
    let (billing_url, audit) = match topic.with_subscription("demo-billing") {
        Ok(billing_url) => {
            let audit_url = topic.with_subscription("demo-audit")?;
            (
                billing_url,
                Some(cloudbus::connect_subscriber(&audit_url).await?),
            )
        }
        Err(_) => {
            println!(
                "{} has no subscriptions: skipping fan-out",
                topic.transport()
            );
            (topic.clone(), None)
        }
    };
    let billing: Arc<dyn Subscriber> = Arc::from(cloudbus::connect_subscriber(&billing_url).await?);
    let publisher = cloudbus::connect_publisher(&topic).await?;

    let mut messages: Vec<Message> = (1..=ORDERS)
        .map(|n| {
            Message::from_json(&serde_json::json!({ "order": n, "total": n * 10 }))
                .map(|m| m.with_attribute("kind", "order"))
        })
        .collect::<Result<_, _>>()?;
    messages.push(Message::new("this is not JSON").with_attribute("kind", "order"));
    for outcome in publisher.publish_batch(messages).await {
        println!("published      {}", outcome?);
    }

    // The audit subscription gets every message.
    if let Some(audit) = audit {
        let mut audited = 0;
        while audited < ORDERS + 1 {
            let batch = audit.receive(10, Duration::from_secs(10)).await?;
            if batch.is_empty() {
                return Err("the audit subscription stopped receiving".into());
            }
            for delivery in batch {
                audited += 1;
                delivery.ack().await?;
            }
        }
        println!("audit          received all {audited} messages");
    }

    // The billing subscription is shared by two competing workers.
    let done = Arc::new(Mutex::new(HashSet::new()));
    let workers = (1..=2).map(|worker| {
        let billing = billing.clone();
        let done = done.clone();
        tokio::spawn(async move { work(worker, billing.as_ref(), &done).await })
    });
    for worker in futures::future::join_all(workers).await {
        worker??;
    }

    // The poison message is in the dead-letter queue, with its reason.
    let dead_letters = cloudbus::connect_subscriber(billing_url.dead_letter_queue()?).await?;
    for delivery in dead_letters.receive(10, Duration::from_secs(10)).await? {
        let m = delivery.message();
        println!(
            "dead letter    {} {:?}: reason {:?}, {:?}",
            m.id,
            m.text().unwrap_or("<binary>"),
            m.attributes.get(cloudbus::subscriber::DEAD_LETTER_REASON),
            m.attributes
                .get(cloudbus::subscriber::DEAD_LETTER_DESCRIPTION),
        );
        delivery.ack().await?;
    }
    publisher.close().await?;
    println!("done");
    Ok(())
}

/// Handles billing messages until every message is settled: nacks order 2 once, dead-letters
/// what is not JSON.
async fn work(
    worker: usize,
    billing: &dyn Subscriber,
    done: &Mutex<HashSet<String>>,
) -> Result<(), cloudbus::Error> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if done.lock().map(|d| d.len()).unwrap_or(0) > ORDERS {
            return Ok(());
        }
        for delivery in billing.receive(1, Duration::from_millis(500)).await? {
            let count = delivery.delivery_count();
            let id = delivery.message().id.clone();
            let Ok(order) = delivery.message().json::<serde_json::Value>() else {
                println!("worker {worker}       message is not JSON: dead-lettering it");
                delivery
                    .dead_letter("invalid-json", "the body is not a JSON order")
                    .await?;
                if let Ok(mut done) = done.lock() {
                    done.insert(id);
                }
                continue;
            };
            let n = order["order"].as_u64().unwrap_or_default();
            if n == 2 && count == 1 {
                println!(
                    "worker {worker}       order {n}: payment service busy, nack (retry in 1 s)"
                );
                delivery.nack(Duration::from_secs(1)).await?;
                continue;
            }
            println!("worker {worker}       order {n} billed (delivery {count})");
            delivery.ack().await?;
            if let Ok(mut done) = done.lock() {
                done.insert(id);
            }
        }
    }
    Err(cloudbus::Error::config("the demo did not finish in 60 s"))
}
