//! Throughput benchmark for the emulator with the Rust client `azservicebus`.
//!
//! ```text
//! cargo run --release -p servicebus-emulator --example bench -- --messages 100000
//! ```
//!
//! The emulator runs in a child process (this executable with `--serve`), so
//! its resident memory can be read from /proc with all messages queued. The
//! parent sends `--messages` messages of `--size` bytes in batches, reads the
//! child's RSS, then receives them all with prefetch, in receive-and-delete
//! mode and (for `--peek-lock` messages) in peek-lock mode with completion,
//! and finally sends `--singles` messages one per call.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use azservicebus::prelude::*;
use clap::Parser;
use servicebus_emulator::{Emulator, QueueConfig, Topology};

#[derive(Parser, Debug)]
struct Args {
    /// Run as the emulator process on this address (internal).
    #[arg(long)]
    serve: Option<String>,
    /// Loopback address for the emulator (the Rust client always dials port 5672).
    #[arg(long, default_value = "127.0.0.250")]
    host: String,
    /// Messages to send and receive in receive-and-delete mode.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Messages to send and receive in peek-lock mode with completion.
    #[arg(long, default_value_t = 10_000)]
    peek_lock: usize,
    /// Messages to send one per call (no batching), received in receive-and-delete mode.
    #[arg(long, default_value_t = 5_000)]
    singles: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Receiver prefetch count.
    #[arg(long, default_value_t = 1000)]
    prefetch: u32,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn serve(addr: &str) -> Result<(), Box<dyn std::error::Error>> {
    if let Ok(filter) = std::env::var("EMULATOR_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let mut topology = Topology::default();
    let mut q = QueueConfig::new("bench");
    q.properties.default_message_ttl = Duration::from_secs(24 * 3600);
    topology.queues.push(q);
    let h = Emulator::start(addr, topology).await?;
    println!("{}", h.connection_string());
    // Serve until the parent closes our stdin.
    let mut line = String::new();
    let _ = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
    h.shutdown().await;
    Ok(())
}

async fn send_all(
    sender: &mut ServiceBusSender,
    n: usize,
    size: usize,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let body = vec![b'x'; size];
    let start = Instant::now();
    let mut sent = 0;
    while sent < n {
        let mut batch = sender.create_message_batch(Default::default())?;
        while sent < n
            && batch
                .try_add_message(ServiceBusMessage::new(body.clone()))
                .is_ok()
        {
            sent += 1;
        }
        sender.send_message_batch(batch).await?;
    }
    Ok(start.elapsed())
}

// A current-thread runtime: fe2o3-amqp 0.14 registers a sent delivery as
// unsettled only after handing the frame to its session task, so on a
// multi-threaded runtime a fast broker's disposition can arrive first and be
// lost (the send then waits for its 60 s timeout and azservicebus's retry
// panics with "called after complete").
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Some(addr) = &args.serve {
        return serve(addr).await;
    }
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--serve", &format!("{}:5672", args.host)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    let conn = line.trim().to_string();
    println!("emulator pid {pid}: {conn}");
    println!("idle emulator RSS: {} KiB", rss_kib(pid).unwrap_or(0));

    let mut client = ServiceBusClient::unsecured()
        .new_from_connection_string(conn, Default::default())
        .await?;
    let mut sender = client.create_sender("bench", Default::default()).await?;

    let n = args.messages;
    let t = send_all(&mut sender, n, args.size).await?;
    println!(
        "send (batched): {n} messages of {} B in {:.2?} = {:.0} msg/s",
        args.size,
        t,
        n as f64 / t.as_secs_f64()
    );
    println!(
        "emulator RSS with {n} messages queued: {} KiB",
        rss_kib(pid).unwrap_or(0)
    );

    let options = ServiceBusReceiverOptions {
        prefetch_count: args.prefetch,
        receive_mode: ServiceBusReceiveMode::ReceiveAndDelete,
        ..Default::default()
    };
    let mut receiver = client.create_receiver_for_queue("bench", options).await?;
    let start = Instant::now();
    let mut got = 0;
    while got < n {
        let msgs = receiver
            .receive_messages_with_max_wait_time(args.prefetch, Some(Duration::from_secs(10)))
            .await?;
        if msgs.is_empty() {
            return Err(format!("stalled after {got} messages").into());
        }
        got += msgs.len();
    }
    let t = start.elapsed();
    println!(
        "receive (receive-and-delete, prefetch {}): {got} messages in {:.2?} = {:.0} msg/s",
        args.prefetch,
        t,
        got as f64 / t.as_secs_f64()
    );
    receiver.dispose().await?;

    if args.peek_lock > 0 {
        let m = args.peek_lock;
        send_all(&mut sender, m, args.size).await?;
        let options = ServiceBusReceiverOptions {
            prefetch_count: args.prefetch,
            ..Default::default()
        };
        let mut receiver = client.create_receiver_for_queue("bench", options).await?;
        let start = Instant::now();
        let mut got = 0;
        while got < m {
            let msgs = receiver
                .receive_messages_with_max_wait_time(args.prefetch, Some(Duration::from_secs(10)))
                .await?;
            if msgs.is_empty() {
                return Err(format!("peek-lock receive stalled after {got} messages").into());
            }
            for msg in &msgs {
                receiver.complete_message(msg).await?;
            }
            got += msgs.len();
        }
        let t = start.elapsed();
        println!(
            "receive (peek-lock + complete each, prefetch {}): {got} messages in {:.2?} = {:.0} msg/s",
            args.prefetch,
            t,
            got as f64 / t.as_secs_f64()
        );
        receiver.dispose().await?;
    }
    if args.singles > 0 {
        let m = args.singles;
        let body = vec![b'x'; args.size];
        let start = Instant::now();
        for _ in 0..m {
            sender
                .send_message(ServiceBusMessage::new(body.clone()))
                .await?;
        }
        let t = start.elapsed();
        println!(
            "send (one message per call): {m} messages in {:.2?} = {:.0} msg/s",
            t,
            m as f64 / t.as_secs_f64()
        );
        let options = ServiceBusReceiverOptions {
            prefetch_count: args.prefetch,
            receive_mode: ServiceBusReceiveMode::ReceiveAndDelete,
            ..Default::default()
        };
        let mut receiver = client.create_receiver_for_queue("bench", options).await?;
        let mut got = 0;
        while got < m {
            let want = (m - got).min(args.prefetch as usize) as u32;
            let msgs = receiver
                .receive_messages_with_max_wait_time(want, Some(Duration::from_secs(10)))
                .await?;
            if msgs.is_empty() {
                return Err(format!("stalled after {got} single messages").into());
            }
            got += msgs.len();
        }
        receiver.dispose().await?;
    }
    println!(
        "emulator RSS after draining: {} KiB",
        rss_kib(pid).unwrap_or(0)
    );
    sender.dispose().await?;
    client.dispose().await?;
    drop(child.stdin.take());
    let _ = child.wait();
    Ok(())
}
