//! Receives messages with a [`cloudbus::Consumer`] and prints one JSON object per message
//! on standard output: `{"id", "body" (or "body_base64" when not UTF-8), "attributes",
//! "delivery_count"}`. Each message is acked after it is printed (the handler returns
//! `Ok`). Stops after `--max` messages, after `--idle-timeout` seconds without one, or on
//! ctrl-c / SIGTERM, letting the message being printed finish. Logs go to standard error
//! (`RUST_LOG`, default `warn`).
//!
//! ```sh
//! CLOUDBUS_URL=sqs://orders cargo run --features aws --example subscriber -- --max 10 --idle-timeout 5
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use clap::Parser;
use cloudbus::Message;
use cloudbus::consumer::{CancellationToken, Consumer, Context, HandlerError};
use tokio::sync::watch;

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
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = Args::parse();
    let shutdown = CancellationToken::new();
    if args.max == Some(0) {
        return Ok(());
    }

    // One message at a time: lines come out in the order they are handled, and with
    // --max the consumer never holds a message beyond the last one it prints.
    // Long polls of 2 s: stopping lets the receive call in progress finish (so that no
    // message is left hidden), so ctrl-c takes up to that long.
    let consumer = Consumer::builder(cloudbus::connect_subscriber(&args.url).await?)
        .concurrency(1)
        .receive_wait(Duration::from_secs(2))
        .build()?;

    let printed = Arc::new(AtomicUsize::new(0));
    let (activity, last_activity) = watch::channel(());
    let activity = Arc::new(activity);
    let handler = {
        let (printed, stop, max) = (printed.clone(), shutdown.clone(), args.max);
        move |message: Message, context: Context| {
            let (printed, stop) = (printed.clone(), stop.clone());
            let activity = activity.clone();
            async move {
                println!("{}", json_line(&message, context.delivery_count()));
                activity.send_replace(());
                let count = printed.fetch_add(1, Ordering::SeqCst) + 1;
                if max.is_some_and(|max| count >= max) {
                    stop.cancel();
                }
                Ok::<_, HandlerError>(())
            }
        }
    };

    if let Some(idle) = args.idle_timeout {
        tokio::spawn(stop_when_idle(
            Duration::from_secs(idle),
            last_activity,
            shutdown.clone(),
        ));
    }
    tokio::spawn(cloudbus::consumer::cancel_on_signals(shutdown.clone()));

    let summary = consumer.run(handler, shutdown).await;
    if summary.settle_failed > 0 || summary.receive_errors > 0 {
        eprintln!(
            "printed {}; {} acks failed (those messages come back), {} receive errors",
            printed.load(Ordering::SeqCst),
            summary.settle_failed,
            summary.receive_errors
        );
    }
    Ok(())
}

/// The JSON line of one message.
fn json_line(message: &Message, delivery_count: u32) -> serde_json::Value {
    let mut line = serde_json::json!({
        "id": message.id,
        "attributes": message.attributes,
        "delivery_count": delivery_count,
    });
    match message.text() {
        Some(text) => line["body"] = text.into(),
        None => {
            line["body_base64"] = base64::engine::general_purpose::STANDARD
                .encode(&message.payload)
                .into()
        }
    }
    line
}

/// Cancels `shutdown` once `idle` passes without a message.
async fn stop_when_idle(
    idle: Duration,
    mut activity: watch::Receiver<()>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = tokio::time::timeout(idle, activity.changed()) => match changed {
                Ok(Ok(())) => {}
                // Idle for `idle`, or the handler is gone.
                Ok(Err(_)) | Err(_) => {
                    shutdown.cancel();
                    return;
                }
            },
        }
    }
}
