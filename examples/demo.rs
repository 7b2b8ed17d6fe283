//! A tour of cloudbus in one process: a topic with two subscriptions, a pair of competing
//! workers (two [`Consumer`]s running one handler), a transient failure that is retried
//! after a backoff, and a poison message that is dead-lettered.
//!
//! ```sh
//! cargo run --example demo                      # the embedded broker (memory://)
//! CLOUDBUS_URL='sns://demo?create=true&endpoint=http://127.0.0.1:4566' cargo run --features aws --example demo
//! CLOUDBUS_URL='sqs://demo?create=true&endpoint=http://127.0.0.1:4566' cargo run --features aws --example demo
//! ```
//!
//! The URL names the topic; the demo receives through two subscriptions of it,
//! `demo-billing` and `demo-audit`. On a plain queue (sqs://) it skips the fan-out. It ends
//! once every billing message is settled, or on ctrl-c / SIGTERM.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use cloudbus::consumer::{
    CancellationToken, Consumer, Context, Handler, HandlerError, MALFORMED_BODY, RetryPolicy,
    Summary, json,
};
use cloudbus::{Config, Message};

#[derive(Parser)]
#[command(about = "A tour of cloudbus")]
struct Args {
    /// The topic to use (a cloudbus URL).
    #[arg(long, env = "CLOUDBUS_URL", default_value = "memory://demo")]
    url: String,
}

const ORDERS: u64 = 6;
/// The first retry of a transient failure comes after this long.
const RETRY_BASE: Duration = Duration::from_secs(1);
/// How long the demo may take.
const LIMIT: Duration = Duration::from_secs(60);

#[derive(serde::Deserialize)]
struct Order {
    order: u64,
    total: u64,
}

/// What the billing workers have settled so far, by message id.
#[derive(Default)]
struct Progress {
    billed: HashSet<String>,
    dead_lettered: HashSet<String>,
}

impl Progress {
    fn settled(&self) -> usize {
        self.billed.len() + self.dead_lettered.len()
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let topic: Config = args.url.parse()?;
    println!("transport: {} ({})", topic.transport(), args.url);
    let shutdown = CancellationToken::new();
    tokio::spawn(cloudbus::consumer::cancel_on_signals(shutdown.clone()));

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
    // Connecting the workers now creates the billing subscription (with create=true).
    let mut workers = Vec::new();
    for _ in 1..=2 {
        workers.push(
            Consumer::builder(cloudbus::connect_subscriber(&billing_url).await?)
                .concurrency(4)
                // Short long polls: a consumer that stops lets its receive call in progress
                // finish (so that no message is left hidden), and the demo ends soon after.
                .receive_wait(Duration::from_secs(2))
                .retry(
                    RetryPolicy::exponential(RETRY_BASE)
                        .max_attempts(5)
                        .jitter(0.0),
                )
                .shutdown_timeout(Duration::from_secs(10))
                .build()?,
        );
    }
    let publisher = cloudbus::connect_publisher(&topic).await?;

    let mut messages: Vec<Message> = (1..=ORDERS)
        .map(|n| {
            Message::from_json(&serde_json::json!({ "order": n, "total": n * 10 }))
                .map(|m| m.with_attribute("kind", "order"))
        })
        .collect::<Result<_, _>>()?;
    messages.push(Message::new("this is not JSON").with_attribute("kind", "order"));
    let total = messages.len();
    for outcome in publisher.publish_batch(messages).await {
        println!("published      {}", outcome?);
    }

    // The audit subscription gets every message (read with plain receive calls).
    if let Some(audit) = audit {
        let mut audited = 0;
        while audited < total {
            let batch = tokio::select! {
                batch = audit.receive(10, Duration::from_secs(10)) => batch?,
                () = shutdown.cancelled() => return Ok(()),
            };
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

    // The billing subscription is shared by two competing workers running one handler.
    let progress = Arc::new(Mutex::new(Progress::default()));
    let all_settled = CancellationToken::new();
    let runs: Vec<_> = workers
        .into_iter()
        .enumerate()
        .map(|(i, consumer)| {
            let handler = billing_handler(i + 1, progress.clone(), total, all_settled.clone());
            tokio::spawn(consumer.run(handler, shutdown.clone()))
        })
        .collect();
    let outcome: Result<(), String> = tokio::select! {
        () = all_settled.cancelled() => Ok(()),
        () = shutdown.cancelled() => Err("interrupted".into()),
        () = tokio::time::sleep(LIMIT) => Err(format!("the demo did not finish in {LIMIT:?}")),
    };
    // Stop both workers: they finish what is in hand, settle it and return a summary.
    shutdown.cancel();
    for (i, run) in runs.into_iter().enumerate() {
        let summary: Summary = run.await?;
        println!(
            "worker {}       stopped: received {}, acked {}, retried {}, dead-lettered {}",
            i + 1,
            summary.received,
            summary.acked,
            summary.nacked,
            summary.dead_lettered
        );
    }
    outcome?;

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

/// The billing handler of one worker: bills orders (order 2 fails once with a transient
/// error, so the consumer retries it after the backoff); a body that is not a JSON order
/// never reaches it: `json` dead-letters it with `MalformedBody`. Cancels `all_settled`
/// once all `total` messages are billed or dead-lettered.
fn billing_handler(
    worker: usize,
    progress: Arc<Mutex<Progress>>,
    total: usize,
    all_settled: CancellationToken,
) -> impl Handler {
    let orders = {
        let progress = progress.clone();
        json(move |order: Order, context: Context| {
            let progress = progress.clone();
            async move {
                let attempt = context.delivery_count();
                if order.order == 2 && attempt == 1 {
                    println!(
                        "worker {worker}       order 2: payment service busy (transient error, retried in {RETRY_BASE:?})"
                    );
                    return Err(HandlerError::transient("payment service busy"));
                }
                println!(
                    "worker {worker}       order {} billed {} (delivery {attempt})",
                    order.order, order.total
                );
                if let Ok(mut progress) = progress.lock() {
                    progress.billed.insert(context.message_id().to_string());
                }
                Ok(())
            }
        })
    };
    let orders = Arc::new(orders);
    move |message: Message, context: Context| {
        let (orders, progress, all_settled) =
            (orders.clone(), progress.clone(), all_settled.clone());
        async move {
            let id = context.message_id().to_string();
            let result = orders.handle(message, context).await;
            if let Err(error) = &result {
                if error.reason() == MALFORMED_BODY {
                    println!(
                        "worker {worker}       message is not a JSON order: dead-lettered ({MALFORMED_BODY})"
                    );
                    if let Ok(mut progress) = progress.lock() {
                        progress.dead_lettered.insert(id);
                    }
                }
            }
            if progress
                .lock()
                .map(|p| p.settled() >= total)
                .unwrap_or(false)
            {
                all_settled.cancel();
            }
            result
        }
    }
}
