//! Service Bus on the project's emulator (a separate process, so none of it is measured):
//! starting it, the raw azservicebus scenarios (the raw baseline), the latency scenario,
//! and the pre-filled backlogs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use azservicebus::prelude::*;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, ChildStdout, Command};

use cloudbus::{Message, Publisher as _};

use crate::harness::{self, BATCH, BODY, CONSUME_TASKS, PUBLISH_TASKS, Report, Sink, Source};
use crate::plan::{Job, is_consume};

/// The variable cloudbus (and the raw scenarios) read the connection string from.
pub const CONNECTION_STRING_ENV: &str = "AZURE_SERVICEBUS_CONNECTION_STRING";
/// azservicebus always dials port 5672, so the emulator gets a loopback address of its own.
const LISTEN: &str = "127.0.0.9:5672";
const RECEIVE_WAIT: Duration = Duration::from_secs(1);

type Client = ServiceBusClient<azservicebus::core::BasicRetryPolicy>;

/// The emulator process, with the queues of this run; killed when dropped.
pub struct Emulator {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    dir: PathBuf,
    pub connection_string: String,
}

impl Emulator {
    /// Starts `target/release/servicebus-emulator` (building it first if missing) with a
    /// Config.json holding `queues`.
    pub async fn start(queues: &[String], run_id: &str) -> Result<Emulator> {
        if tokio::net::TcpStream::connect(LISTEN).await.is_ok() {
            bail!("something already listens on {LISTEN} (a leftover emulator?): stop it first");
        }
        let binary = emulator_binary().await?;
        let dir = std::env::temp_dir().join(format!("cloudbus-bench-{run_id}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("Config.json");
        std::fs::write(&config, emulator_config(queues).to_string())
            .with_context(|| format!("writing {}", config.display()))?;
        let mut child = Command::new(&binary)
            .arg("--config")
            .arg(&config)
            .args(["--listen", LISTEN, "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("no stdout from the emulator")?;
        // Kept open while the emulator runs, so that it never writes into a closed pipe.
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        match tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut line)).await {
            Ok(Ok(_)) if line.starts_with("Endpoint=") => {}
            Ok(_) => {
                bail!("the emulator exited or printed no connection string (its errors are above)")
            }
            Err(_) => bail!("the emulator printed no connection string within 30 s"),
        }
        Ok(Emulator {
            child,
            _stdout: stdout,
            dir,
            connection_string: line.trim().to_string(),
        })
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The emulator next to this executable; built with cargo when missing.
async fn emulator_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let binary = exe.with_file_name("servicebus-emulator");
    if binary.exists() {
        return Ok(binary);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!(
        "{} is missing: cargo build --release -p servicebus-emulator",
        binary.display()
    );
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "servicebus-emulator",
            "--manifest-path",
        ])
        .arg(&manifest)
        .status()
        .await;
    match status {
        Ok(status) if status.success() && binary.exists() => Ok(binary),
        _ => bail!(
            "{} is missing and building it failed: run `cargo build --release -p servicebus-emulator`",
            binary.display()
        ),
    }
}

/// The official emulator's Config.json format, one plain queue per name.
fn emulator_config(queues: &[String]) -> serde_json::Value {
    let queues: Vec<_> = queues
        .iter()
        .map(|name| {
            serde_json::json!({
                "Name": name,
                "Properties": {
                    "DeadLetteringOnMessageExpiration": false,
                    "DefaultMessageTimeToLive": "PT1H",
                    "LockDuration": "PT1M",
                    "MaxDeliveryCount": 10,
                    "RequiresDuplicateDetection": false,
                    "RequiresSession": false,
                },
            })
        })
        .collect();
    serde_json::json!({
        "UserConfig": {
            "Namespaces": [{ "Name": "sbemulatorns", "Queues": queues, "Topics": [] }],
            "Logging": { "Type": "File" },
        },
    })
}

async fn client(connection_string: &str) -> Result<Client> {
    ServiceBusClient::unsecured()
        .new_from_connection_string(connection_string, ServiceBusClientOptions::default())
        .await
        .context("connecting azservicebus to the emulator")
}

/// The parent's untimed set-up: the backlog of consume scenarios, in batches.
pub async fn prepare(job: &Job, connection_string: &str) -> Result<()> {
    if !is_consume(job.scenario) {
        return Ok(());
    }
    let client = client(connection_string).await?;
    let mut sink = SenderSink::connect(client, &job.entity, true).await?;
    for from in (0..job.messages).step_by(BATCH) {
        sink.send(BATCH.min(job.messages - from)).await?;
    }
    // The sender first: closing the client under it fails.
    sink.sender.dispose().await.context("closing the sender")?;
    sink.client.dispose().await.context("closing the client")?;
    Ok(())
}

/// The raw azservicebus scenarios. Senders and receivers take `&mut self`, so each task
/// has its own, each on a connection of its own, as a raw-SDK service scaled out by
/// clients would (the most the SDK can do; cloudbus uses one link per publisher or
/// subscriber).
pub async fn run(job: &Job) -> Result<Report> {
    let connection_string = std::env::var(CONNECTION_STRING_ENV)
        .map_err(|_| anyhow!("{CONNECTION_STRING_ENV} is not set (the parent sets it)"))?;
    let n = job.messages;
    let elapsed = match job.scenario {
        "raw-single" | "raw-batch" => {
            let batch = job.scenario == "raw-batch";
            let mut sinks = Vec::with_capacity(PUBLISH_TASKS);
            for _ in 0..PUBLISH_TASKS {
                let client = client(&connection_string).await?;
                sinks.push(SenderSink::connect(client, &job.entity, batch).await?);
            }
            harness::publish(sinks, n, if batch { BATCH } else { 1 }).await?
        }
        "raw-consume" => {
            let mut sources = Vec::with_capacity(CONSUME_TASKS);
            for _ in 0..CONSUME_TASKS {
                let mut client = client(&connection_string).await?;
                let receiver = client
                    .create_receiver_for_queue(&job.entity, ServiceBusReceiverOptions::default())
                    .await
                    .context("creating a receiver")?;
                sources.push(ReceiverSource {
                    receiver,
                    _client: client,
                });
            }
            harness::consume(sources, n).await?
        }
        "latency" => return latency(&connection_string, job).await,
        other => bail!("no raw Service Bus scenario `{other}`"),
    };
    Ok(Report::timed(n, elapsed))
}

/// `send_message`, or `send_message_batch` of a batch of up to 10.
struct SenderSink {
    sender: ServiceBusSender,
    client: Client,
    batch: bool,
}

impl SenderSink {
    async fn connect(mut client: Client, queue: &str, batch: bool) -> Result<Self> {
        let sender = client
            .create_sender(queue, ServiceBusSenderOptions::default())
            .await
            .context("creating a sender")?;
        Ok(SenderSink {
            sender,
            client,
            batch,
        })
    }
}

impl Sink for SenderSink {
    async fn send(&mut self, n: usize) -> Result<()> {
        if !self.batch {
            for _ in 0..n {
                self.sender
                    .send_message(ServiceBusMessage::new(BODY))
                    .await
                    .context("azservicebus send_message")?;
            }
            return Ok(());
        }
        let mut batch = self
            .sender
            .create_message_batch(CreateMessageBatchOptions::default())
            .map_err(|e| anyhow!("azservicebus create_message_batch: {e:?}"))?;
        for _ in 0..n {
            batch
                .try_add_message(ServiceBusMessage::new(BODY))
                .map_err(|e| anyhow!("azservicebus try_add_message: {e:?}"))?;
        }
        self.sender
            .send_message_batch(batch)
            .await
            .context("azservicebus send_message_batch")
    }
}

/// `receive_messages_with_max_wait_time` (up to 10, 1 s) in peek-lock, then
/// `complete_message` of each.
struct ReceiverSource {
    receiver: ServiceBusReceiver,
    _client: Client,
}

impl Source for ReceiverSource {
    async fn take(&mut self) -> Result<usize> {
        let messages = self
            .receiver
            .receive_messages_with_max_wait_time(BATCH as u32, RECEIVE_WAIT)
            .await
            .context("azservicebus receive_messages")?;
        for message in &messages {
            self.receiver
                .complete_message(message)
                .await
                .context("azservicebus complete_message")?;
        }
        Ok(messages.len())
    }
}

/// Sequential calls alternating a raw azservicebus `send_message` and a cloudbus `publish()`
/// with `batching=false`, each to a queue of its own.
async fn latency(connection_string: &str, job: &Job) -> Result<Report> {
    let client = client(connection_string).await?;
    let mut raw_sink = SenderSink::connect(client, &format!("{}-raw", job.entity), false).await?;
    let publisher =
        cloudbus::connect_publisher(format!("servicebus://{}-cb?batching=false", job.entity))
            .await?;
    let report = harness::Latency::measure(
        async || raw_sink.send(1).await,
        async || {
            publisher
                .publish(Message::new(BODY))
                .await
                .map(|_| ())
                .context("cloudbus publish")
        },
    )
    .await?;
    publisher.close().await?;
    Ok(report)
}
